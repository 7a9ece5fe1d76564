"""``python -m metakd_ray.sweep CONFIG [key=value ...] [--dry-run [--json]] [--verbose]``: run a sweep (see the
package doc). ``--verbose`` shows what :mod:`metakd_ray.logs` hides by default (Ray's INFO lines, Tune's tables).

``--dry-run`` runs the preflight checks the run starts with (``metakd_ray.preflight``: storage root, data, models,
cluster address) and prints the plan with its cost estimate; it exits 2, with ``error: <line>`` per problem, when
the run would fail them. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from metakd_ray import config as C
from metakd_ray import logs, preflight
from metakd_ray.sweep.plan import format_plan, make_plan


def _fail(errors: list[str]) -> int:
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.sweep",
                                 description="Run a sweep: teachers (Ray Train), caches (Ray Data), trials (Ray Tune)")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--dry-run", action="store_true", help="check everything, print the plan and exit")
    ap.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    ap.add_argument("--verbose", action="store_true",
                    help="also print Ray's INFO logs, Tune's trial tables and the libraries' progress bars")
    args = ap.parse_intermixed_args(argv)
    logs.quiet_environment(args.verbose)  # before anything imports ray
    try:
        cfg = C.load(args.config, args.overrides)
    except C.ConfigError as e:
        return _fail(e.errors)
    if args.dry_run:
        found = preflight.findings(cfg, cluster=True)
        if found.errors:
            return _fail(found.errors)
        try:
            p = make_plan(cfg, found.domain_sizes, found.eval_sizes)
        except ValueError as e:  # a plan-time rule preflight does not know yet: still one line, exit 2
            return _fail([preflight.one_line(e)])
        print(json.dumps(p.to_json(), default=str) if args.json else format_plan(p))
        return 0
    from metakd_ray.raycluster import UnsatisfiableResources
    from metakd_ray.sweep.run import SweepConflict, run

    try:
        return run(cfg)
    except preflight.PreflightError as e:
        return _fail(e.errors)
    except (SweepConflict, UnsatisfiableResources) as e:
        return _fail([str(e)])


if __name__ == "__main__":
    sys.exit(main())

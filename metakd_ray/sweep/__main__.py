"""``python -m metakd_ray.sweep CONFIG [key=value ...] [--dry-run [--json]]``: run a sweep (see the package doc)."""

from __future__ import annotations

import argparse
import json
import sys

from metakd_ray import config as C
from metakd_ray.sweep.plan import format_plan, make_plan


def domain_sizes(cfg: C.Config) -> dict[str, int] | None:
    """Training examples per domain, or None when the data cannot be read (the plan does not need it; its
    estimate does)."""
    from metakd_ray import data as D

    try:
        splits = D.load_splits(cfg.data)
    except (D.DataError, OSError):
        return None
    doms = splits["train"]["domain"]
    return {d: doms.count(d) for d in splits.domains}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.sweep",
                                 description="Run a sweep: teachers (Ray Train), caches (Ray Data), trials (Ray Tune)")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
    except C.ConfigError as e:
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.dry_run:
        p = make_plan(cfg, domain_sizes(cfg))
        print(json.dumps(p.to_json(), default=str) if args.json else format_plan(p))
        return 0
    from metakd_ray.raycluster import UnsatisfiableResources
    from metakd_ray.sweep.run import SweepConflict, run

    try:
        return run(cfg)
    except (SweepConflict, UnsatisfiableResources) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

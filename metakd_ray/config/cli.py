"""``python -m metakd_ray.config validate FILE [key=value ...]`` (console script ``metakd-config``).

Checks the config (types, ranges, cross-field rules), then runs the preflight pass (``metakd_ray.preflight``: data,
models, storage root; the cluster with ``--cluster``) that a sweep's dry run and its run also run. Prints the
resolved config as YAML (exit 0), or ``error: <line>`` per problem on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from metakd_ray.config.fields import ConfigError
from metakd_ray.config.load import load, to_yaml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.config",
                                 description="Typed, frozen configuration for every stage of metakd_ray.")
    cmds = ap.add_subparsers(dest="cmd", required=True)
    v = cmds.add_parser("validate", help="print the resolved config, or every error (exit 2)")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", metavar="key=value")
    v.add_argument("--schema-only", action="store_true",
                   help="check the config alone: skip the preflight checks of data, models and storage root")
    v.add_argument("--cluster", action="store_true", help="also check that ray.address (or $RAY_ADDRESS) answers")
    args, rest = ap.parse_known_args(argv)  # overrides may follow the flags too (argparse stops at the first flag)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        return _fail(e.errors)
    if not args.schema_only:
        from metakd_ray import preflight

        found = preflight.findings(cfg, cluster=args.cluster)
        if found.errors:
            return _fail(found.errors)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _fail(errors: list[str]) -> int:
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 2

"""``python -m metakd_ray.config validate FILE [key=value ...]`` (console script ``metakd-config``)."""

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
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(cfg))
    return 0

"""``python -m metakd_ray.models describe CONFIG [key=value ...] [--json]``: load the config's teacher, build its
student, and print both shapes, parameter counts, the compression ratio and the layer map.

Errors are printed as ``error: ...`` lines on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from metakd_ray import config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.models describe",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if not argv or argv[0] != "describe":
        ap.print_usage(sys.stderr)
        print("error: expected the subcommand 'describe'", file=sys.stderr)
        return 2
    args = ap.parse_intermixed_args(argv[1:])
    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as e:
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    from metakd_ray.models import ModelLoadError, build_student, describe_models, load_encoder

    try:
        teacher, tokenizer = load_encoder(cfg.model.teacher)
        student = build_student(cfg.model, teacher, tokenizer)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = describe_models(teacher, student)
    info["teacher_name"] = cfg.model.teacher
    info["student_source"] = cfg.model.student.source
    if args.json:
        print(json.dumps(info, default=list))
        return 0
    print(f"{'':8} {'layers':>6} {'hidden':>6} {'heads':>5} {'params':>12}")
    for who in ("teacher", "student"):
        s = info[who]
        print(f"{who:8} {s['layers']:>6} {s['hidden']:>6} {s['heads']:>5} {s['params']:>12,}")
    print(f"teacher: {cfg.model.teacher}; student: {cfg.model.student.source}"
          + (f", teacher layers {list(info['teacher_layers_kept'])}" if info["teacher_layers_kept"] else ""))
    print(f"compression: {info['compression_ratio']:.2f}x; layer map g = {info['layer_map']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

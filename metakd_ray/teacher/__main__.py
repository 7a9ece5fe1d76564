"""``python -m metakd_ray.teacher CONFIG [key=value ...] [--kind K --target D --rate R --seed S] [--list]``: make
(or reuse) the teachers a config's sweep needs, with Ray Train."""

from __future__ import annotations

import argparse
import json
import sys

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.raycluster import connect_ray
from metakd_ray.storage import Storage
from metakd_ray.teacher.artefact import TEACHERS, check_worker_split, finished_teacher, teacher_spec, teacher_specs_for


def _errors(e: Exception) -> int:
    for line in str(e).splitlines():
        print(f"error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m metakd_ray.teacher",
        description="Make (or reuse) the teachers a config's sweep needs, with Ray Train. Without --kind: every "
                    "teacher of the sweep axes; with --kind: one (defaults: the first target, rate and seed).")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--kind", choices=C.TEACHER_KINDS)
    ap.add_argument("--target", help="target domain (only used by teachers that depend on it)")
    ap.add_argument("--rate", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--list", action="store_true", help="list the teachers and whether they exist; train nothing")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        if args.kind is None:
            if args.target is not None or args.rate is not None or args.seed is not None:
                raise ValueError("--target, --rate and --seed choose one teacher; use them with --kind")
            specs = teacher_specs_for(cfg)
        else:
            target = args.target or (cfg.sweep.target_domains or cfg.data.domains)[0]
            rate = args.rate if args.rate is not None else cfg.sweep.sample_rates[0]
            seed = args.seed if args.seed is not None else cfg.sweep.seeds[0]
            specs = [teacher_spec(cfg, args.kind, target, rate, seed)]
        check_worker_split(cfg)
    except (C.ConfigError, ValueError) as e:
        return _errors(e)
    storage = Storage(cfg.storage.root)
    if args.list:
        for spec in specs:
            done = finished_teacher(storage, spec.key) is not None
            print(f"{'done   ' if done else 'missing'} {storage.uri(TEACHERS, spec.key)}")
        return 0
    if not specs:
        print("no teachers needed (sweep.methods has only none/finetune)")
        return 0
    if cfg.ray.train_workers > 0:
        connect_ray(cfg)
    import ray.train

    from metakd_ray.teacher.job import ensure_teacher

    def show(event: dict) -> None:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in event.items()}), flush=True)

    failed = 0
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] teacher {spec.key}", flush=True)
        try:
            art = ensure_teacher(cfg, spec, storage, log=show)
        except (D.DataError, M.ModelLoadError, ValueError) as e:
            return _errors(e)
        except ray.train.TrainingFailedError as e:
            print(f"error: teacher {spec.key} failed: {e}", file=sys.stderr)
            failed += 1
            continue
        m = art.manifest
        tests = ", ".join(f"{d} {a:.4f}" for d, a in m["test_accuracy"].items())
        print(f"  best dev {m['best_dev']:.4f} (epoch {m['best_epoch']}); test {tests}\n  {art.path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

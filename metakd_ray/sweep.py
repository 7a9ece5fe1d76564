"""The sweep service: ``python -m metakd_ray.sweep CONFIG [key=value ...] [--dry-run [--json]]``.

Runs the whole pipeline idempotently on whatever Ray it finds — a running cluster (``ray job submit``, or
``RAY_ADDRESS`` / ``ray.address``) or else an embedded local Ray:

1. teachers (Ray Train), one per distinct :class:`~metakd_ray.teacher.TeacherSpec` the cells need, each with its
   prototype scores — skipped when its manifest exists;
2. teacher-output caches (Ray Data), one per (teacher, target domain, training subset) — skipped when a verified
   cache with the same fingerprint exists;
3. student trials (Ray Tune + Optuna): the axes (target domain × sample rate × method × seed [× gamma2]) form a grid
   of cells; inside each cell an Optuna study tunes the student on the target domain's dev accuracy
   (:mod:`metakd_ray.search`); the cell's score is the test accuracy of its dev-best trial;
4. the report (:mod:`metakd_ray.results`): a DataFrame, the scarcity curve PNG and the paper table.

Everything lives under ``<storage.root>/``: ``teachers/``, ``caches/`` and ``sweeps/<name>/`` (``plan.json``,
``config.yaml``, ``costs.json``, the Tune experiment in ``tune/``, the report in ``report/``). Re-running the same
command after an interruption restores the Tune experiment: finished trials are not run again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from metakd_ray import config as C

# Rough CPU-seconds per example on this project's 2-CPU machines (MiniLM-L6 teacher, 3-layer student, 128 tokens),
# measured with benchmarks/student_depth.py and the smoke runs; a GPU node is roughly 50x faster. For the plan's
# estimate only.
SECONDS_PER_EXAMPLE = {"teacher_epoch": 0.16, "cache": 0.03, "student_epoch": 0.06}


def cell_id(domain: str, rate: float, method: str, seed: int, gamma2: float | None) -> str:
    return f"{domain}|{rate:g}|{method}|{seed}|{'-' if gamma2 is None else f'{gamma2:g}'}"


def plan_cells(cfg: C.Config) -> list[dict]:
    """Every cell of the grid, in a stable order: target domain × rate × method × seed (× gamma2)."""
    targets = cfg.sweep.target_domains or cfg.data.domains
    gammas: tuple[float | None, ...] = cfg.sweep.gamma2 or (None,)
    cells = []
    for domain, rate, method, seed, g in itertools.product(targets, cfg.sweep.sample_rates, cfg.sweep.methods,
                                                             cfg.sweep.seeds, gammas):
        if g is not None and not method.endswith("meta_kd"):
            g = None  # gamma2 only means something for meta_kd
        cells.append({"cell": cell_id(domain, rate, method, seed, g), "domain": domain, "rate": rate,
                      "method": method, "seed": seed, "gamma2": g})
    unique = {c["cell"]: c for c in cells}  # a gamma2 axis collapses for non-meta_kd methods
    return list(unique.values())


def plan(cfg: C.Config, splits_sizes: dict[str, int] | None = None) -> dict:
    """The plan: cells, trials, the teachers and caches to build (with what exists already when storage is
    readable), and an estimated cost in CPU-seconds at this machine's speed."""
    from metakd_ray.teacher import teacher_spec

    cells = plan_cells(cfg)
    teachers: dict[str, Any] = {}
    caches: dict[str, dict] = {}
    for c in cells:
        kind = c["method"].split("/")[0]
        if kind == "none":
            continue
        spec = teacher_spec(cfg, kind, c["domain"], c["rate"], c["seed"])
        teachers.setdefault(spec.key, spec)
        caches.setdefault(f"{spec.key}|{c['domain']}", {"teacher": spec.key, "domain": c["domain"],
                                                        "rate": c["rate"], "seed": c["seed"]})
        c["teacher_key"] = spec.key
    n_trials = len(cells) * cfg.sweep.trials_per_cell
    est = None
    if splits_sizes:
        per_domain = splits_sizes
        t_cost = sum(sum(per_domain[d] for d in spec.domains) * spec.rate * cfg.teacher.epochs
                     for spec in teachers.values()) * SECONDS_PER_EXAMPLE["teacher_epoch"]
        c_cost = sum(per_domain[c["domain"]] * c["rate"] for c in caches.values()) * SECONDS_PER_EXAMPLE["cache"]
        epochs = cfg.distill.stage1_epochs + cfg.distill.stage2_epochs
        s_cost = sum(per_domain[c["domain"]] * c["rate"] * epochs for c in cells) * cfg.sweep.trials_per_cell \
            * SECONDS_PER_EXAMPLE["student_epoch"]
        est = {"teacher_cpu_s": round(t_cost), "cache_cpu_s": round(c_cost), "trial_cpu_s": round(s_cost),
               "total_cpu_s": round(t_cost + c_cost + s_cost)}
    return {"name": cfg.name, "cells": cells, "trials_per_cell": cfg.sweep.trials_per_cell, "trials": n_trials,
            "teachers": [dict(key=k, kind=s.kind, domains=list(s.domains), rate=s.rate, seed=s.seed)
                         for k, s in teachers.items()],
            "caches": list(caches.values()), "estimate": est}


def print_plan(p: dict) -> None:
    print(f"sweep {p['name']}: {len(p['cells'])} cells x {p['trials_per_cell']} trials = {p['trials']} trials; "
          f"{len(p['teachers'])} teachers, {len(p['caches'])} caches")
    for t in p["teachers"]:
        print(f"  teacher {t['key']}: {t['kind']} on {', '.join(t['domains'])}, rate {t['rate']:g}, seed {t['seed']}")
    for c in p["cells"]:
        print(f"  cell {c['cell']}")
    if p["estimate"]:
        e = p["estimate"]
        print(f"estimated cost: {e['total_cpu_s'] / 3600:.2f} CPU-hours at 2-CPU speed (teachers "
              f"{e['teacher_cpu_s'] / 3600:.1f}, caches {e['cache_cpu_s'] / 3600:.1f}, trials "
              f"{e['trial_cpu_s'] / 3600:.1f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.sweep", description=__doc__.split("\n\n")[0])
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
        sizes = None
        try:
            from metakd_ray import data as D

            splits = D.load_splits(cfg.data)
            doms = splits["train"]["domain"]
            sizes = {d: doms.count(d) for d in splits.domains}
        except Exception:  # the plan does not need the data; the estimate does
            sizes = None
        p = plan(cfg, sizes)
        if args.json:
            print(json.dumps(p, default=str))
        else:
            print_plan(p)
        return 0
    from metakd_ray.sweep_run import SweepConflict, run

    try:
        return run(cfg)
    except SweepConflict as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

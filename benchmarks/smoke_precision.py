"""The smoke sweep end to end in fp32 and in the resolved ``auto`` precision: the same command, one run each, each
from nothing (its own storage root), wall and CPU seconds per stage.

    python benchmarks/smoke_precision.py [--order fp32,auto] [overrides ...]

Runs ``python -m metakd_ray.sweep sweeps/smoke.yaml ray.address=local ray.num_cpus=2 storage.root=<tmp>/<p>
compute.precision=<p>`` for p in fp32 and auto, one after the other, and reads each sweep's own accounting
(``metakd_ray.results.load_results``: the teachers' and caches' wall and CPU seconds from their manifests, each
trial's own wall and CPU seconds) plus the command's wall time (Ray start-up and report included). Prints a table per
stage, the accuracies of both runs, and the speed-up of the whole command (target >= 1.5x); writes
benchmarks/results/smoke_precision.json. It also records, per precision, the seconds each teacher run and each trial
spends beyond the calibrated compute (start-up, loading, evaluation, export) in ``metakd_ray/sweep/calibration.json``,
where the plan's estimate adds them per run. About 10 minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _env import REPO


def run(precision: str, root: Path, extra: list[str]) -> dict:
    from metakd_ray.results import cells, load_results

    cmd = [sys.executable, "-m", "metakd_ray.sweep", "sweeps/smoke.yaml", "ray.address=local", "ray.num_cpus=2",
           f"storage.root={root}", f"compute.precision={precision}", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"the {precision} sweep failed (exit {proc.returncode})")
    df = load_results(root / "sweeps" / "smoke")
    costs = json.loads((root / "sweeps" / "smoke" / "costs.json").read_text())
    teachers = list(costs["teachers"].values())
    caches = list(costs["caches"].values())
    plan = json.loads((root / "sweeps" / "smoke" / "plan.json").read_text())
    stages = {
        "teachers": {"wall_s": sum(t["wall_s"] for t in teachers), "cpu_s": sum(t["cpu_s"] for t in teachers)},
        "caches": {"wall_s": sum(c["wall_s"] for c in caches), "cpu_s": sum(c["cpu_s"] for c in caches)},
        "trials": {"wall_s": float(df["wall_s"].sum()), "cpu_s": float(df["cpu_s"].sum())},
    }
    c = cells(df)
    overhead = per_run_overhead(root, df, plan, precision)
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "stages": stages, "compute": plan.get("compute"),
            "overhead_seconds": overhead,
            "test_acc": dict(zip(c["cell"], c["test_acc"].round(4))), "dev_acc": dict(zip(c["cell"], c["dev_acc"]
                                                                                       .round(4)))}


def per_run_overhead(root: Path, df, plan: dict, precision: str) -> dict:
    """Seconds per teacher run and per trial beyond the calibrated compute (``metakd_ray/sweep/calibration.json``:
    training examples x epochs x seconds per example, and a trial's dev and test evaluations): start-up, data and
    model loading, export, checkpoints (a teacher's evaluations too). The mean over this sweep's teachers and
    trials."""
    cal = json.loads((REPO / "metakd_ray" / "sweep" / "calibration.json").read_text())
    key = "fp32" if plan["compute"]["teacher"].startswith("fp32") else "bf16"
    sec = cal["seconds_per_example"][key]
    cfg = yaml.safe_load((root / "sweeps" / "smoke" / "config.yaml").read_text())
    teachers = []
    for m in (json.loads(f.read_text()) for f in root.glob("teachers/*/manifest.json")):
        compute = m["n_train"] * cfg["teacher"]["epochs"] * sec["teacher_epoch"] + m["n_pool"] * sec["eval"]
        teachers.append(m["seconds"]["total"] - compute)
    d = cfg["distill"]
    ev = eval_sizes(cfg)  # the plan's estimate counts a trial's dev and test evaluations itself
    trials = [row.wall_s - row.n_train * (d["stage1_epochs"] * sec["student_stage1_epoch"]
                                          + d["stage2_epochs"] * sec["student_stage2_epoch"])
              - (d["stage2_epochs"] * ev["dev"][row.domain] + ev["test"][row.domain]) * sec["eval"]
              for row in df.itertuples()]
    return {"teacher_run": round(sum(teachers) / len(teachers), 1), "trial": round(sum(trials) / len(trials), 1)}


def eval_sizes(cfg: dict) -> dict:
    """{"dev": {domain: rows}, "test": ...} of the sweep's data, as the plan's estimate gets them (preflight)."""
    from metakd_ray import config as C
    from metakd_ray import preflight

    found = preflight.Findings()
    preflight.data_errors(C.from_dict(cfg), found)
    return found.eval_sizes


def write_overheads(runs: dict) -> None:
    """Record the per-run overheads in the calibration the plan's estimate reads (per precision)."""
    path = REPO / "metakd_ray" / "sweep" / "calibration.json"
    cal = json.loads(path.read_text())
    cal["overhead_seconds"] = {("fp32" if p == "fp32" else "bf16"): r["overhead_seconds"] for p, r in runs.items()}
    cal["overhead_source"] = ("python benchmarks/smoke_precision.py (the smoke sweep: measured wall seconds per "
                              "teacher run and per trial minus the calibrated compute)")
    path.write_text(json.dumps(cal, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--order", default="fp32,auto")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smoke-precision-"))
    runs = {}
    for p in args.order.split(","):
        runs[p] = run(p, work / p, args.overrides)
        print(f"{p}: {runs[p]['wall_s']:.0f} s ({runs[p]['compute']})", flush=True)
    a, b = runs["fp32"], runs["auto"]
    print(f"\n{'stage':<10} {'fp32 wall':>10} {'auto wall':>10} {'speedup':>8} {'fp32 cpu':>10} {'auto cpu':>10}")
    ratios = {}
    for s in ("teachers", "caches", "trials"):
        fa, fb = a["stages"][s], b["stages"][s]
        ratios[s] = fa["wall_s"] / fb["wall_s"] if fb["wall_s"] else float("nan")
        print(f"{s:<10} {fa['wall_s']:>10.1f} {fb['wall_s']:>10.1f} {ratios[s]:>7.2f}x {fa['cpu_s']:>10.1f} "
              f"{fb['cpu_s']:>10.1f}")
    ratios["command"] = a["wall_s"] / b["wall_s"]
    print(f"{'command':<10} {a['wall_s']:>10.1f} {b['wall_s']:>10.1f} {ratios['command']:>7.2f}x")
    for p, r in runs.items():
        print(f"{p} test accuracy: {r['test_acc']}")
    result = {"runs": runs, "speedup": ratios, "target": 1.5, "meets_target": ratios["command"] >= 1.5,
              "command": "python benchmarks/smoke_precision.py " + " ".join(sys.argv[1:])}
    write_overheads(runs)
    for p, r in runs.items():
        print(f"{p} overhead per teacher run {r['overhead_seconds']['teacher_run']:.0f} s, per trial "
              f"{r['overhead_seconds']['trial']:.0f} s")
    out = REPO / "benchmarks" / "results" / "smoke_precision.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"smoke sweep: {ratios['command']:.2f}x faster end to end in {b['compute']['trial'].split()[0]} "
          f"(teachers {ratios['teachers']:.2f}x, caches {ratios['caches']:.2f}x, trials {ratios['trials']:.2f}x); "
          f"target >= 1.5x; wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

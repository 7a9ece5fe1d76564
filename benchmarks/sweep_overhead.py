"""Sweep overhead: how close a 16-trial sweep on 2 CPUs comes to perfect packing of its trials.

    python benchmarks/sweep_overhead.py            # ~5 min on 2 CPUs

Builds a toy project (three synthetic domains of 2400 examples, a randomly initialised 4-layer BERT, 128 wide, and
a 2-layer student: trials of ~10-20 s, still far shorter than real ones, so the fixed per-trial cost shows), runs the
sweep's teacher and cache stages once, then times the trial phase of a 16-trial sweep (4 cells x 4 Optuna trials, 1 CPU
per trial, 2 at a time) exactly as ``python -m metakd_ray.sweep`` runs it (``sweep_run.run_trials``):

- ``ratio`` = trial-phase wall time / (sum of the trials' own wall times / concurrency); target <= 1.10;
- ``cpu_busy`` = the fraction of the machine's CPU time that was busy during the trial phase (from /proc/stat);
  target >= 0.85.

The last line printed is ``ratio=... cpu_busy=...``; the figures go to ``benchmarks/results/sweep_overhead.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def write_project(root: Path) -> Path:
    import yaml

    import toy
    from metakd_ray import models as M

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus").mkdir(exist_ok=True)
    splits = toy.toy_splits(n_per_domain=2400)
    for name in ("train", "dev", "test"):
        splits[name].select_columns(["text", "label", "domain"]).to_csv(str(root / "corpus" / f"{name}.csv"))
    tok = toy.toy_tokenizer()
    enc = M.random_encoder(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                           vocab_size=len(tok), max_position=64, dropout=0.0, seed=0)
    enc.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    cfg = {
        "name": "overhead",
        "data": {"dataset": "table", "root": str(root / "corpus"), "domains": list(toy.DOMAINS), "max_length": 32,
                 "table": {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}},
        "model": {"teacher": str(root / "model"), "dropout": 0.0, "student": {"num_layers": 2}},
        "teacher": {"epochs": 1, "lr": 0.001, "batch_size": 16},
        "distill": {"stage1_epochs": 3, "stage1_lr": 0.001, "stage2_epochs": 3, "stage2_lr": 0.001,
                    "batch_size": 16},
        "sweep": {"target_domains": ["alpha", "beta"], "sample_rates": [1.0],
                  "methods": ["single/tinybert_kd", "meta/meta_kd"], "seeds": [0], "trials_per_cell": 4},
        "ray": {"address": "local", "num_cpus": 2, "train_workers": 0, "cache_actors": 1, "cpus_per_actor": 1.0,
                "trial_cpus": 1.0},
        "storage": {"root": str(root / "runs")},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    import datasets

    from metakd_ray import config as C
    from metakd_ray.raycluster import connect_ray
    from metakd_ray.results import load_results
    from metakd_ray.storage import Storage
    from metakd_ray.sweep.plan import make_plan
    from metakd_ray.sweep.run import run_trials
    from metakd_ray.sweep.stages import build_artefacts

    datasets.disable_progress_bars()
    root = Path(tempfile.mkdtemp(prefix="metakd-overhead-"))
    cfg = C.load(write_project(root))
    storage = Storage(cfg.storage.root)
    p = make_plan(cfg)
    t0 = time.time()
    connect_ray(cfg)
    p, _ = build_artefacts(cfg, p, storage)
    storage.write_bytes(C.to_yaml(cfg).encode(), "sweeps", cfg.name, "config.yaml")
    storage.write_json(p.to_json(), "sweeps", cfg.name, "plan.json")
    setup_s = time.time() - t0

    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.time(), *cpu_times()))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t1 = time.time()
    run_trials(cfg, list(p.cells), storage)
    wall = time.time() - t1
    stop.set()
    sampler.join()
    busy = (samples[-1][1] - samples[0][1]) / max(samples[-1][2] - samples[0][2], 1e-9)

    df = load_results(storage.uri("sweeps", cfg.name))
    concurrency = int(2 // cfg.ray.trial_cpus)
    trial_sum = float(df["wall_s"].sum())
    ideal = trial_sum / concurrency
    ratio = wall / ideal
    import ray
    import torch

    result = {
        "ratio": ratio, "target": 1.10, "cpu_busy": busy, "cpu_busy_target": 0.85,
        "trial_phase_wall_s": wall, "sum_trial_wall_s": trial_sum, "concurrency": concurrency,
        "ideal_s": ideal, "n_trials": int(len(df)),
        "fixed_cost_per_trial_s": (wall - ideal) * concurrency / len(df), "trial_wall_s": sorted(df["wall_s"].round(3).tolist()),
        "setup_s (ray init, teachers, caches)": setup_s,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "ray": ray.__version__, "load_avg": os.getloadavg()},
    }
    out = HERE / "results" / "sweep_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{len(df)} trials, {concurrency} at a time: trial phase {wall:.1f} s, sum of trial times {trial_sum:.1f} s "
          f"-> ideal {ideal:.1f} s; CPU busy {busy:.1%}; written {out}")
    print(f"fixed cost per trial: {(wall - ideal) * concurrency / len(df):.2f} s")
    print(f"ratio={ratio:.3f} cpu_busy={busy:.3f}")


if __name__ == "__main__":
    main()

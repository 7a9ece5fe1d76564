"""Disk budget of a sweep's teacher-output caches: their total size, and the waves the sweep runs in so that the
caches on disk never pass ``storage.cache_max_gb``.

    python benchmarks/cache_budget.py [sweeps/scarcity.yaml] [key=value ...]

For every cache the sweep's cells need (one per teacher x target domain x rate x seed), the target's training data
is subsampled and tokenised exactly as the sweep does (``trial.student_data``), and the cache's size is estimated
from the real token counts with ``cache.estimate_bytes`` (the stored float16 layers at each example's real length +
1 KB of small fields per example; Parquet's zstd makes the files ~7 % smaller, so this bounds them). No teacher is
trained: the shapes come from the configured pre-trained encoder. The cells are then split into waves with
``sweep_run.plan_waves``, as ``python -m metakd_ray.sweep`` does.

``ratio = largest wave's caches / budget`` (target <= 1.0: the disk never holds more than the budget), with the
caches' total, the number of waves and the measured-vs-estimated check of ``results/cache_vs_online.json`` beside it.
Writes benchmarks/results/cache_budget.json; the last line is the headline.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.cache import estimate_bytes, stored_layers  # noqa: E402
from metakd_ray.cell import student_data  # noqa: E402
from metakd_ray.sweep.plan import make_plan, plan_waves  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = argv[0] if argv and not argv[0].count("=") else str(REPO / "sweeps" / "scarcity.yaml")
    overrides = [a for a in argv if "=" in a]
    t0 = time.perf_counter()
    cfg = C.load(config, overrides)
    p = make_plan(cfg)
    splits = D.load_splits(cfg.data)
    enc, tokenizer = M.load_encoder(cfg.model.teacher)
    hidden, n_layers = enc.config.hidden_size, enc.config.num_hidden_layers
    matrices = len(stored_layers(M.student_layer_map(cfg.model, n_layers)))
    groups, examples, tokens = {}, 0, 0
    lengths_of: dict[tuple, list[int]] = {}  # the data of (domain, rate, seed) is the same whatever the teacher
    for key in dict.fromkeys(c.cache_group for c in p.cells if c.cache_group):
        _, domain, rate, seed = key
        if (domain, rate, seed) not in lengths_of:
            train = student_data(cfg, splits, tokenizer, domain, rate, seed, None).train
            lengths_of[(domain, rate, seed)] = [len(x) for x in train["input_ids"]]
        lengths = lengths_of[(domain, rate, seed)]
        examples += len(lengths)
        tokens += sum(lengths)
        groups[key] = estimate_bytes(lengths, matrices, hidden)
    budget = cfg.storage.cache_max_gb * 1e9
    waves = plan_waves(p.cells, groups, budget if budget > 0 else None)
    group_of = {c.id: c.cache_group for c in p.cells if c.cache_group}
    wave_bytes = [sum(groups[k] for k in {group_of[c] for c in w.cells if c in group_of}) for w in waves]
    total = sum(groups.values())
    measured = None
    cvo = REPO / "benchmarks" / "results" / "cache_vs_online.json"
    if cvo.is_file():
        measured = json.loads(cvo.read_text()).get("bytes_per_example")
    out = {
        "ratio": max(wave_bytes) / budget if budget > 0 else None, "target": 1.0,
        "budget_gb": cfg.storage.cache_max_gb, "total_gb": total / 1e9, "waves": len(waves),
        "wave_gb": [b / 1e9 for b in wave_bytes], "wave_cells": [len(w.cells) for w in waves],
        "caches": len(groups), "examples": examples, "real_tokens": tokens, "mean_tokens": tokens / max(examples, 1),
        "estimated_bytes_per_example": total / max(examples, 1), "stored_matrices": matrices, "hidden": hidden,
        "measured_bytes_per_example_cache_vs_online": measured,
        "seconds": time.perf_counter() - t0, "config": config, "overrides": overrides,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "command": " ".join(["python", "benchmarks/cache_budget.py", *argv]),
    }
    dest = REPO / "benchmarks" / "results" / "cache_budget.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(groups)} caches, {examples} examples ({tokens / max(examples, 1):.1f} real tokens each), "
          f"{total / 1e9:.1f} GB estimated; budget {cfg.storage.cache_max_gb:g} GB -> {len(waves)} waves of "
          + ", ".join(f"{b / 1e9:.1f} GB ({n} cells)" for b, n in zip(wave_bytes, out["wave_cells"])))
    if out["ratio"] is not None:
        print(f"ratio={out['ratio']:.3f} (largest wave / budget; target <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy parity of the resolved ``auto`` precision with fp32: the same cell trained both ways, and the same
teacher's cache-pass outputs computed both ways.

    python benchmarks/precision_parity.py [--target books] [--rate 0.25] [--teacher-epochs 3] [--seed 0]

1. One cell, twice, with ``python -m metakd_ray.local``'s ``run_cell`` (meta-teacher, 3 epochs, then a Meta-KD
   student; the smoke preset's model and data at the given rate): ``compute.precision=fp32`` and ``=auto`` (bf16 on a
   CPU with native bf16). Each run trains its own teacher in its precision; compared: the teacher's and the
   student's test accuracy (target: within 1.0 point each) and the wall seconds.
2. The fp32 run's teacher (one model) runs the cache pass (``cache.build.TeacherPass``, what the Ray Data actors call)
   over the student's training rows in fp32 and in ``auto``; compared on the stored (float16) values: logits, h_d and
   every stored hidden state — max |difference| relative to the values' scale, the fraction of values whose
   difference exceeds float16's rounding (2^-11 relative), cosine similarity, and argmax agreement of the logits.

Writes benchmarks/results/precision_parity.json; the last line is the headline. About 15 minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _env import REPO

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.cache.build import TeacherPass  # noqa: E402
from metakd_ray.cache.format import decode_matrix, stored_layers  # noqa: E402
from metakd_ray.cache.job import input_table  # noqa: E402
from metakd_ray.cell import student_data  # noqa: E402
from metakd_ray.local import run_cell  # noqa: E402
from metakd_ray.runtime import resolve_precision  # noqa: E402


def cache_pass(teacher_dir: Path, rows, layers, compute: str, batch: int = 32) -> dict[str, list[np.ndarray]]:
    """The cache pass over ``rows`` (an input table), in ``compute``: per column, one decoded array per example."""
    tp = TeacherPass(str(teacher_dir), (), layers, (), "float16", torch.get_num_threads(), compute=compute)
    out: dict[str, list[np.ndarray]] = {}
    width = None
    for lo in range(0, rows.num_rows, batch):
        part = rows.slice(lo, batch).to_pydict()
        np_batch = {k: np.array(v, dtype=object) if k in ("input_ids", "token_type_ids") else np.asarray(v)
                    for k, v in part.items()}
        table = tp(np_batch)
        n_tok = table["n_tokens"].to_numpy()
        width = width or tp.model.encoder.config.hidden_size
        for name in table.column_names:
            if name in ("id", "n_tokens", "prototype_score"):
                continue
            cells = table[name].to_pylist()
            if name == "logits":
                vals = [np.frombuffer(c, dtype="<f4") for c in cells]
            elif name == "domain_hidden":
                vals = [np.frombuffer(c, dtype="<f2").astype(np.float32) for c in cells]
            else:
                vals = [decode_matrix(c, int(t), width, "float16").astype(np.float32) for c, t in zip(cells, n_tok)]
            out.setdefault(name, []).extend(vals)
    return out


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    x, y = np.concatenate([v.ravel() for v in a]), np.concatenate([v.ravel() for v in b])
    scale = float(np.abs(x).max())
    diff = np.abs(x - y)
    cos = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return {"max_abs_diff": float(diff.max()), "max_rel_to_scale": float(diff.max() / scale),
            "mean_abs_diff": float(diff.mean()), "scale": scale, "cosine": cos,
            "frac_beyond_fp16_rounding": float((diff > 2 ** -11 * np.maximum(np.abs(x), 1e-3)).mean())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="books")
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny run for development (rate 0.02, 1 epoch)")
    args = ap.parse_args()
    if args.quick:
        args.rate, args.teacher_epochs = 0.02, 1
    torch.set_num_threads(os.cpu_count() or 2)
    auto = resolve_precision("auto", "cpu")
    overrides = [f"teacher.epochs={args.teacher_epochs}", "teacher.lr=5e-5", "distill.stage1_epochs=3",
                 "distill.stage2_epochs=3", "distill.stage2_lr=5e-5"]
    runs, work = {}, Path(tempfile.mkdtemp(prefix="parity-"))
    splits = D.load_splits(C.load(REPO / "sweeps/smoke.yaml").data)
    for precision in ("fp32", "auto"):
        cfg = C.load(REPO / "sweeps/smoke.yaml", [*overrides, f"compute.precision={precision}",
                                                  f"storage.root={work / precision}"])
        t0 = time.perf_counter()
        res = run_cell(cfg, args.target, "meta/meta_kd", args.rate, args.seed, work / precision / "cell",
                       splits=splits)
        runs[precision] = {"resolved": res["precision"], "wall_s": time.perf_counter() - t0,
                           "teacher_test": res["teacher_test"], "student_test": res["student_test"],
                           "stage_seconds": res["stage_seconds"]}
        print(f"{precision:>5} ({res['precision']}): teacher {res['teacher_test'][args.target]:.4f} "
              f"(mean {res['teacher_test']['mean']:.4f}), student {res['student_test'][args.target]:.4f}, "
              f"{runs[precision]['wall_s']:.0f} s", flush=True)

    # 2. the fp32 teacher's cache pass in both precisions, on the student's training rows
    cfg = C.load(REPO / "sweeps/smoke.yaml", [*overrides, "compute.precision=fp32"])
    _, tokenizer = M.load_encoder(cfg.model.teacher)
    sd = student_data(cfg, splits, tokenizer, args.target, args.rate, args.seed, None)
    rows = input_table(sd.train)
    teacher_dir = work / "fp32" / "cell" / "teacher" / "best"
    n_layers = json.loads((teacher_dir / "encoder" / "config.json").read_text())["num_hidden_layers"]
    layers = stored_layers(M.student_layer_map(cfg.model, n_layers))
    outs = {p: cache_pass(teacher_dir, rows, layers, p) for p in ("fp32", auto)}
    cache = {name: compare(outs["fp32"][name], outs[auto][name]) for name in outs["fp32"]}
    la, lb = np.stack(outs["fp32"]["logits"]), np.stack(outs[auto]["logits"])
    cache["logits"]["argmax_agreement"] = float((la.argmax(1) == lb.argmax(1)).mean())
    for name, c in cache.items():
        print(f"cache {name:>14}: max|d| {c['max_abs_diff']:.4g} ({c['max_rel_to_scale']:.2%} of scale), "
              f"cosine {c['cosine']:.6f}, beyond fp16 rounding {c['frac_beyond_fp16_rounding']:.1%}")

    d_teacher = 100 * abs(runs["fp32"]["teacher_test"][args.target] - runs["auto"]["teacher_test"][args.target])
    d_student = 100 * abs(runs["fp32"]["student_test"][args.target] - runs["auto"]["student_test"][args.target])
    result = {
        "command": "python benchmarks/precision_parity.py" + (" --quick" if args.quick else ""),
        "target": args.target, "rate": args.rate, "teacher_epochs": args.teacher_epochs, "seed": args.seed,
        "auto_resolves_to": auto, "runs": runs, "cache_pass": cache,
        "teacher_diff_points": d_teacher, "student_diff_points": d_student,
        "speedup_cell": runs["fp32"]["wall_s"] / runs["auto"]["wall_s"],
        "target_points": 1.0, "parity": bool(d_teacher <= 1.0 and d_student <= 1.0),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    out = REPO / "benchmarks" / "results" / ("precision_parity_quick.json" if args.quick else "precision_parity.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"parity: teacher {d_teacher:.1f} points, student {d_student:.1f} points apart (target <= 1.0); "
          f"cell {result['speedup_cell']:.2f}x faster in {auto}; wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

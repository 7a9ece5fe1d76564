"""The Ray Data teacher pass (``metakd_ray.cache``) vs a plain single-process torch loop doing the same work, and its
FLOP/s as a fraction of this machine's fp32 matmul FLOP/s.

    python benchmarks/precompute.py [--examples 4096] [--batch 32] [--max-length 128]

Same model (the real MiniLM-L6 teacher with meta-teacher heads, exported with ``save_pretrained``), same rows (real
Amazon training reviews, longest first so batches carry little padding), same batch size, same output (the cache rows
of ``cache.TeacherPass``: float16 hidden states 1..6 on real tokens, logits, h_d, written as zstd Parquet):

- ``plain``: in the driver, ``torch.set_num_threads(2)``: load the teacher, run ``TeacherPass`` on each batch,
  ``pyarrow.parquet.write_table`` per block;
- ``ray``: ``cache.run_teacher_job`` (from_arrow -> repartition -> map_batches on an actor pool -> write_parquet), timed
  from submission to the last file, actor start-up and model load included, in two pool layouts that respect the
  deadlock rule on 2 CPUs: 1 actor x 1 CPU running 2 torch threads, and 2 actors x 0.5 CPU with 1 thread each.

``ratio = plain seconds / best Ray seconds`` (target >= 0.9). A Ray job has a fixed cost (actor start-up, model load,
planning) that a longer pass amortises; it is measured on its own (the best layout on one batch, ``ray_fixed_s``), and
``ratio_at`` gives the ratio this predicts for the sweep's cache sizes (one cell's training data: 16-1,631 examples
for the Amazon sweeps): p n / (fixed + r n), p and r the plain and Ray seconds per example of the long pass. FLOPs are counted analytically over the real tokens
(padding excluded), per sequence of t tokens and per encoder layer (d hidden, f intermediate)::

    dense    2 t (4 d^2 + 2 d f)         Q, K, V, output projections and the two feed-forward matrices
    attn     4 t^2 d                     Q K^T and (softmax) V, over all heads
    heads    2 d (c + 2 d + k) per sequence (classifier, domain head, domain classifier; negligible)

Embedding lookups, LayerNorm, GELU and softmax are not counted (they are not matmul FLOPs). ``peak`` is the best of
five 2048^3 fp32 matmuls with the same thread count, measured before, between and after the passes (the best
of all: a busy machine only lowers it); ``peak_fraction = FLOPs / best Ray seconds / peak`` (target
>= 0.6); the plain loop's own fraction is reported too. Writes benchmarks/results/precompute.json; the last line is
the headline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _env import REPO  # noqa: E402,F401  (sets the environment first)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.cache.build import TeacherPass, run_teacher_job  # noqa: E402
from metakd_ray.cache.job import input_table  # noqa: E402
from metakd_ray.cache.format import stored_layers  # noqa: E402
from metakd_ray.storage import Storage  # noqa: E402
from metakd_ray.teacher.artefact import TeacherLocation  # noqa: E402

THREADS = min(2, os.cpu_count() or 1)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n^3 matmul with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def encoder_flops(lengths, layers: int, d: int, f: int, classes: int = 2, domains: int = 4) -> float:
    """Analytic matmul FLOPs of a BERT encoder forward over sequences of real length ``lengths`` (see docstring)."""
    t = np.asarray(lengths, dtype=np.float64)
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t ** 2 * d
    return float(layers * per_layer.sum() + len(t) * 2 * d * (classes + 2 * d + domains))


def plain_loop(table: pa.Table, tdir: Path, out: Path, layers, batch: int, rows_per_block: int) -> float:
    """The same work as the Ray job, in this process: load, TeacherPass per batch, one Parquet file per block."""
    t0 = time.perf_counter()
    udf = TeacherPass(str(tdir), (), layers, (), "float16", THREADS)
    out.mkdir(parents=True, exist_ok=True)
    for b0 in range(0, table.num_rows, rows_per_block):
        block = table.slice(b0, rows_per_block)
        parts = []
        for i in range(0, block.num_rows, batch):
            rows = block.slice(i, batch)
            parts.append(udf({c: np.array(rows[c].to_pylist(), dtype=object) if c in ("input_ids", "token_type_ids")
                              else rows[c].to_numpy(zero_copy_only=False) for c in rows.column_names}))
        pq.write_table(pa.concat_tables(parts), out / f"part-{b0:06d}.parquet", compression="zstd")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precompute.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    import ray
    import ray.data

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    cfg = C.from_dict({}, [f"data.max_length={args.max_length}"])
    splits = D.load_splits(cfg.data)
    enc, tokenizer = M.load_encoder("default", dropout=0.0)
    teacher = M.MetaTeacher(enc, 2, 4, dropout=0.0)
    ds = D.tokenize(splits["train"].select(range(args.examples)), tokenizer, args.max_length)
    table = input_table(ds)
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    layers = stored_layers((0, 2, 4, 6))
    c = enc.config
    flops = encoder_flops(lengths, c.num_hidden_layers, c.hidden_size, c.intermediate_size)
    rows_per_block = max(args.batch, min(4 * args.batch, math.ceil(args.examples / 2)))
    peaks = [matmul_peak()]  # measured before, between and after the passes; the best counts (conservative)
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="precompute-bench-") as tmp:
        tdir = Path(tmp) / "teacher"
        teacher.save_pretrained(tdir, tokenizer)
        del teacher, enc
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 object_store_memory=1 << 30)
        ray.data.DataContext.get_current().enable_progress_bars = False
        storage = Storage(str(Path(tmp) / "store"))
        layouts = {"1x1cpu_2threads": (1, 1.0, 2), "2x0.5cpu_1thread": (2, 0.5, 1)}
        # plain first, then the two layouts, then plain again: the two plain runs bracket the Ray runs
        res["plain"] = [plain_loop(table, tdir, Path(tmp) / "plain0", layers, args.batch, rows_per_block)]
        print(f"plain: {res['plain'][0]:.1f}s", flush=True)
        peaks.append(matmul_peak())
        runs: dict[str, list[float]] = {name: [] for name in layouts}
        for name in [*layouts, *layouts]:  # each layout twice, interleaved; the best run of each counts (as plain)
            actors, cpus, threads = layouts[name]
            runs[name].append(run_teacher_job(table, TeacherLocation(str(tdir)), storage, (name,), layers=layers,
                                              qk_layers=(), precision="float16", actors=actors, cpus_per_actor=cpus,
                                              threads_per_actor=threads, batch_size=args.batch,
                                              rows_per_block=rows_per_block))
            print(f"ray {name}: {runs[name][-1]:.1f}s", flush=True)
            peaks.append(matmul_peak())
        res.update({name: min(times) for name, times in runs.items()})
        best_layout = min(layouts, key=lambda k: res[k])
        actors, cpus, threads = layouts[best_layout]
        res["fixed"] = min(run_teacher_job(table.slice(0, args.batch), TeacherLocation(str(tdir)), storage,
                                           (f"fixed{k}",), layers=layers, qk_layers=(), precision="float16",
                                           actors=actors, cpus_per_actor=cpus, threads_per_actor=threads,
                                           batch_size=args.batch, rows_per_block=args.batch) for k in range(2))
        print(f"ray {best_layout} on one batch ({args.batch} rows): {res['fixed']:.1f}s", flush=True)
        res["plain"].append(plain_loop(table, tdir, Path(tmp) / "plain1", layers, args.batch, rows_per_block))
        print(f"plain again: {res['plain'][1]:.1f}s", flush=True)
        peaks.append(matmul_peak())
        n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (Path(tmp) / "store" / "1x1cpu_2threads").iterdir())
        assert n_rows == args.examples, n_rows
        ray.shutdown()
    peak = max(peaks)
    plain = min(res["plain"])
    best = min(layouts, key=lambda k: res[k])
    ratio = plain / res[best]
    peak_fraction = flops / res[best] / peak
    # Ray time of a pass over n examples ~ fixed + r n, with r from this run's long pass; plain ~ p n
    p_ex, r_ex = plain / args.examples, max(res[best] - res["fixed"], 0.0) / args.examples
    ratio_at = {n: p_ex * n / (res["fixed"] + r_ex * n) for n in (163, 816, 1631, args.examples)}
    out = dict(
        ratio=ratio, target=0.9, peak_fraction=peak_fraction, peak_fraction_target=0.6,
        plain_peak_fraction=flops / plain / peak, best_layout=best, ray_fixed_s=res["fixed"],
        ratio_at={str(k): v for k, v in ratio_at.items()},
        timings=dict(plain=res["plain"], **runs), flops=flops, peak_flops=peak, peak_flops_samples=peaks,
        examples=args.examples, real_tokens=int(lengths.sum()), mean_tokens=float(lengths.mean()),
        batch=args.batch, rows_per_block=rows_per_block,
        flop_formula="per layer: 2t(4d^2+2df) + 4t^2 d over real tokens; + 2d(c+2d+k) per sequence",
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                     ray=ray.__version__, torch_threads=THREADS, load_avg_start=load_start,
                     load_avg_end=os.getloadavg()),
        total_seconds=time.perf_counter() - t_start, command=" ".join(["python", *sys.argv]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"FLOPs {flops / 1e12:.2f} T over {int(lengths.sum())} real tokens; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"plain {flops / plain / 1e9:.1f} GFLOP/s ({flops / plain / peak:.2f} of peak)")
    print("predicted ratio for one cell's cache of n examples (fixed cost %.1f s): " % res["fixed"]
          + ", ".join(f"n={k}: {v:.2f}" for k, v in ratio_at.items()))
    print(f"ratio={ratio:.3f} (target 0.9; plain {plain:.1f}s / ray {best} {res[best]:.1f}s) "
          f"peak_fraction={peak_fraction:.2f} (target 0.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

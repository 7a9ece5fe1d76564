"""Student epoch from the teacher-output cache vs with the teacher run online; bytes per example; the disk budget.

    python benchmarks/cache_vs_online.py [--examples 256] [--paper-examples 64] [--batch 32] [--max-length 128]

Two shapes, each in one run on real Amazon reviews (books, training split), distillation stage 1 of ``meta_kd`` (the
layer objective: hidden states, attention scores, h_d; the heavy stage):

- ``minilm``: the real MiniLM-L6 teacher (``load_encoder("default")``, meta-teacher heads) -> the default 3-layer
  student cut from it (g = (0, 2, 4, 6));
- ``paper``: BERT-base shapes (12 x 768) -> TinyBERT 4 x 312, random weights (``random_encoder(**PAPER_SHAPES)``),
  g = (0, 3, 6, 9, 12).

The cache is built with the Ray Data job (``ensure_cache``, 1 actor). Then, batch by batch (pre-collated, same
order), four timings interleaved so that other load on the machine hits all alike: T = the teacher forward alone
(``LiveTeacher``), S = a student step (loss, backward, AdamW) on that batch's record already in memory, O = a
student step with the teacher online, C = a student step reading the cache (``CachedTeacher``). Epoch times are the
sums. ``ideal = (T + S) / S``; ``ratio = O / C``; target ``ratio >= 0.85 * ideal``. Every step and teacher forward
runs under ``--precision`` (default ``auto``: bf16 on a CPU with native bf16), and so does the cache pass; both
attention layouts (``inputs``: the mapped layers' inputs, scores rebuilt with the teacher's Q/K projections; ``qk``:
Q and K stored) are built and timed for both shapes.

Budget: the MiniLM tokenizer's real token lengths over all Amazon training reviews give the bytes per example of each
design option, times the 73,094 examples ``sweeps/scarcity.yaml`` caches; the measured Parquet size of the benchmark
cache calibrates the chosen design. Writes benchmarks/results/cache_vs_online.json; the last line is the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from _env import REPO  # noqa: E402,F401  (sets the environment first)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.cache import ensure_cache  # noqa: E402
from metakd_ray.cache.format import design_bytes  # noqa: E402
from metakd_ray.cache.reader import CachedTeacher, load_cache  # noqa: E402
from metakd_ray.distill import LiveTeacher, student_loss  # noqa: E402
from metakd_ray.runtime import CPU_FP32, Runtime, runtime_for  # noqa: E402
from metakd_ray.storage import Storage  # noqa: E402

SWEEP_EXAMPLES = 2 * 3 * 1.88 * 6480  # 2 teachers x 3 seeds x sum of sample rates x Amazon training examples
BUDGET_GB = 12.0


def machine() -> dict:
    import ray

    return dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__, ray=ray.__version__,
                torch_threads=torch.get_num_threads(), load_avg_start=os.getloadavg())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_shape(name: str, teacher, student, tokenizer, gmap, ds, args, cfg, storage, tmp: Path,
              modes: tuple[str, ...] = ("inputs", "qk"), rt: Runtime = CPU_FP32) -> dict:
    """Build the cache (one per attention mode), then the interleaved per-batch timings (min of ``args.repeats``)."""
    from metakd_ray.cache.reader import unload

    tdir = tmp / f"{name}-teacher"
    teacher.save_pretrained(tdir, tokenizer)
    rng = random.Random(0)
    protos = {i: rng.random() for i in ds["id"]}
    refs, build_s, load_s, loaded, cached = {}, {}, {}, {}, {}
    for mode in modes:
        refs[mode], build_s[mode] = timed(lambda: ensure_cache(cfg, storage, tdir, "books", ds, gmap, protos,
                                                               batch_size=args.batch, attention=mode))
        unload(refs[mode].fingerprint)
        loaded[mode], load_s[mode] = timed(lambda: load_cache(refs[mode]))
        cached[mode] = CachedTeacher(refs[mode], gmap)
    live = LiveTeacher(teacher.eval(), gmap)
    ds = ds.add_column("prototype_score", [protos[i] for i in ds["id"]])
    coll = D.collator(tokenizer)
    batches = [coll([ds[j] for j in range(i, min(i + args.batch, len(ds)))]) for i in range(0, len(ds), args.batch)]
    dcfg = C.DistillConfig()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    student.train()

    def step(source) -> None:
        with rt.autocast():
            loss = student_loss("meta_kd", "layers", student, batch, source, dcfg).total
        opt.zero_grad()
        loss.backward()
        opt.step()

    batch = coll([ds[j] for j in range(4)])
    for src in (live, *cached.values()):  # warm-up
        step(src)
    per = {k: [] for k in ("teacher_forward", "student_step", "online", *[f"cached_{m}" for m in modes])}
    for batch in batches:
        best = {k: float("inf") for k in per}
        for _ in range(args.repeats):
            with rt.autocast():
                rec, t = timed(lambda: live(batch))
            best["teacher_forward"] = min(best["teacher_forward"], t)
            fixed = lambda b, needs_layers=True, rec=rec: rec  # noqa: E731
            best["student_step"] = min(best["student_step"], timed(lambda: step(fixed))[1])
            best["online"] = min(best["online"], timed(lambda: step(live))[1])
            for m in modes:
                best[f"cached_{m}"] = min(best[f"cached_{m}"], timed(lambda: step(cached[m]))[1])
        for k in per:
            per[k].append(best[k])
    ep = {k: float(np.sum(v)) for k, v in per.items()}
    t, s, o = ep["teacher_forward"], ep["student_step"], ep["online"]
    ideal = (t + s) / s
    lengths = [len(x) for x in ds["input_ids"]]
    enc_cfg = teacher.encoder.config
    raw = design_bytes(lengths, gmap, enc_cfg.hidden_size, enc_cfg.num_attention_heads, max_length=args.max_length)
    out = dict(examples=len(ds), batch=args.batch, repeats=args.repeats, layer_map=list(gmap),
               teacher_params=M.param_count(teacher), student_params=M.param_count(student),
               epoch_seconds=ep, per_batch_seconds=per, ideal=ideal, target=0.85 * ideal, modes={})
    for m in modes:
        c = ep[f"cached_{m}"]
        ref = refs[m]
        out["modes"][m] = dict(
            ratio=o / c, ratio_over_ideal=o / c / ideal, cache_read_overhead=(c - s) / s,
            stored_layers=ref.manifest["stored_layers"], qk_layers=ref.manifest["qk_layers"],
            build_seconds=build_s[m], job_seconds=ref.manifest["build_seconds"], load_seconds=load_s[m],
            in_memory_bytes=loaded[m].nbytes, on_disk_bytes=ref.total_bytes,
            bytes_per_example_on_disk=ref.total_bytes / ref.num_examples,
            bytes_per_example_raw_matrices=ref.manifest["bytes_per_example"]["raw_matrices"],
            mean_tokens=ref.manifest["mean_tokens"], compression=ref.manifest["compression"])
        print(f"[{name} attention={m}] T {t:.1f}s S {s:.1f}s online {o:.1f}s cached {c:.1f}s -> ratio {o / c:.3f}, "
              f"ideal {ideal:.3f} ({o / c / ideal:.2f} of ideal; target 0.85); cache "
              f"{ref.total_bytes / ref.num_examples / 1e3:.0f} KB/example on disk, built in {build_s[m]:.1f}s, "
              f"loaded in {load_s[m]:.2f}s", flush=True)
    out["fields_raw_inputs_design"] = raw["float16_layer_inputs"]["fields"]
    return out


def budget(tokenizer, max_length: int, parquet_factor: float) -> dict:
    splits = D.load_splits(C.Config().data)
    texts = list(splits["train"]["text"])
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    table = design_bytes(lengths, (0, 2, 4, 6), hidden=384, heads=12, max_length=max_length)
    for v in table.values():
        v["sweep_gb"] = round(v["total"] * SWEEP_EXAMPLES / 1e9, 2)
        v["fits_12gb"] = v["sweep_gb"] <= BUDGET_GB
    chosen = table["float16_layer_inputs"]
    lens = np.array(lengths)
    return dict(
        examples=round(SWEEP_EXAMPLES), n_reviews=len(lengths), mean_tokens=float(lens.mean()),
        mean_tokens_sq=float((lens.astype(float) ** 2).mean()), median_tokens=float(np.median(lens)),
        truncated_fraction=float((lens >= max_length).mean()), designs=table,
        chosen="float16_layer_inputs", parquet_over_raw=parquet_factor,
        chosen_measured_gb=round(chosen["total"] * parquet_factor * SWEEP_EXAMPLES / 1e9, 2),
        bytes_per_example_to_fit=BUDGET_GB * 1e9 / SWEEP_EXAMPLES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--paper-examples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timings per batch and path; the minimum counts")
    ap.add_argument("--precision", default="auto", help="compute.precision of the steps and the cache pass")
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cache_vs_online.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             object_store_memory=1 << 30)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    info = machine()
    t_start = time.perf_counter()
    rt = runtime_for(args.precision, "cpu")
    info["precision"] = rt.precision
    cfg = C.from_dict({}, [f"data.max_length={args.max_length}", "ray.cache_actors=1", "ray.cpus_per_actor=1",
                           f"compute.precision={rt.precision}"])
    splits = D.load_splits(cfg.data)
    books = splits["train"].filter(lambda d: [x == 0 for x in d], input_columns="domain_id", batched=True)
    enc, tokenizer = M.load_encoder("default", dropout=0.0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        storage = Storage(str(Path(tmp) / "store"))
        ds = D.tokenize(books.select(range(args.examples)), tokenizer, args.max_length)
        pretrained = M.build_student(cfg.model, enc, tokenizer)
        teacher = M.MetaTeacher(enc, 2, 4, dropout=0.0)
        gmap = M.layer_map(3, 6, M.kept_teacher_layers(pretrained))
        student = M.Student(pretrained, 2, teacher_hidden_size=384, teacher_domain_hidden_size=384, num_domains=4,
                            dropout=0.0)
        results["minilm"] = run_shape("minilm", teacher, student, tokenizer, gmap, ds, args, cfg, storage, Path(tmp),
                                      rt=rt)
        del teacher, student, pretrained
        if not args.skip_paper:
            t_enc = M.random_encoder(**M.PAPER_SHAPES["bert-base"], dropout=0.0, seed=0)
            s_enc = M.random_encoder(**M.PAPER_SHAPES["tinybert-4l-312d"], dropout=0.0, seed=1)
            teacher = M.MetaTeacher(t_enc, 2, 4, dropout=0.0)
            student = M.Student(s_enc, 2, teacher_hidden_size=768, teacher_domain_hidden_size=768, num_domains=4,
                                dropout=0.0)
            ds_p = ds.select(range(min(args.paper_examples, len(ds))))
            results["paper"] = run_shape("paper", teacher, student, tokenizer, M.layer_map(4, 12), ds_p, args, cfg,
                                         storage, Path(tmp), rt=rt)
    mini = results["minilm"]
    mm = mini["modes"]["inputs"]
    factor = mm["bytes_per_example_on_disk"] / (mm["bytes_per_example_raw_matrices"] + 800)
    results["budget"] = budget(tokenizer, args.max_length, factor)
    ray.shutdown()
    info["load_avg_end"] = os.getloadavg()
    out = dict(ratio=mm["ratio"], target=mini["target"], ideal=mini["ideal"],
               ratio_over_ideal=mm["ratio_over_ideal"], timings=mini["epoch_seconds"],
               bytes_per_example=mm["bytes_per_example_on_disk"], shapes=results, machine=info,
               total_seconds=time.perf_counter() - t_start, command=" ".join(["python", *sys.argv]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    b = results["budget"]
    print("budget (73,094 cached examples, real Amazon lengths: mean "
          f"{b['mean_tokens']:.2f} tokens, {b['truncated_fraction']:.0%} truncated):")
    for k, v in b["designs"].items():
        print(f"  {k:30s} {v['total'] / 1e3:9.1f} KB/example  {v['sweep_gb']:7.1f} GB  "
              f"{'fits' if v['fits_12gb'] else 'does not fit'} 12 GB")
    print(f"  chosen (measured Parquet x{factor:.3f}): {b['chosen_measured_gb']} GB")
    if "paper" in results:
        p = results["paper"]
        for m, v in p["modes"].items():
            print(f"paper shapes, attention={m}: ratio={v['ratio']:.3f} ideal={p['ideal']:.3f} "
                  f"({v['ratio_over_ideal']:.2f} of ideal)")
    for m, v in mini["modes"].items():
        print(f"minilm, attention={m}: ratio={v['ratio']:.3f} ideal={mini['ideal']:.3f} "
              f"({v['ratio_over_ideal']:.2f} of ideal)")
    print(f"ratio={mm['ratio']:.3f} ideal={mini['ideal']:.3f} target={mini['target']:.3f} "
          f"({mm['ratio_over_ideal']:.2f} of ideal; MiniLM-L6 -> 3-layer, {mini['examples']} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

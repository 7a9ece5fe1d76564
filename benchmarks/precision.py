"""fp32 vs ``compute.precision=auto`` (bf16 on a CPU with avx512_bf16/amx_bf16) on every compute path; padding saved
by length grouping; the sweep's cost calibration.

    python benchmarks/precision.py [--repeats 5] [--quick]

One run, torch with 2 threads, real Amazon reviews (books training split, the longest rows, so that every batch is a
full 32 x 128 tokens), the real MiniLM-L6 teacher (``load_encoder("default")``) and the default 3-layer student. Per
repetition each op runs in fp32, then in the resolved ``auto`` precision (A, B, A, B, ...: other load on the machine
hits both alike); the minimum over repetitions counts. A warm-up call per op and precision comes first.

Ops (batch 32, max_length 128 unless said):

- ``teacher_step``: a MetaTeacher training step (``teacher_loss`` kind ``meta``, backward, grad-norm clipping, AdamW,
  schedule) exactly as ``train_stage`` runs it: under ``Runtime.autocast()``, through ``Runtime.scaler()``;
- ``stage1_step``: a student step of ``meta_kd`` stage 1 (objective ``layers``) reading the teacher-output cache
  (``CachedTeacher``; the cache is built once with ``ensure_cache`` on an embedded Ray, ``compute.precision=fp32``,
  so both arms read the same cache);
- ``stage2_step``: the same student, objective ``soft_ce``;
- ``cache_pass``: ``TeacherPass(...)(numpy batch)`` in-process, constructed as ``run_teacher_job`` does (2 threads,
  ``compute="fp32"`` vs the resolved precision): the teacher forward plus encoding the cache rows;
- ``eval``: a student forward, no gradients, batch 64 (``EVAL_BATCH_SIZE``).

Matmul peaks: ``torch.mm`` of n x n (n = 2048 and 3072; the faster counts) in fp32 and bf16, 2 threads, timed in
each repetition after the ops (same load); GFLOP/s = 2 n^3 / min time.

FLOPs of a teacher forward, counted analytically for a batch of b sequences of t (padded) tokens:

    FLOPs = 2 * P_lin * b * t  +  L * 4 * b * t^2 * d  +  2 * P_head * b

P_lin: parameters of the encoder layers' linear maps (Q, K, V, attention output, FFN in and out; no embeddings,
LayerNorms or biases), L layers of width d (Q K^T and the attention-weighted sum of V: 2 t^2 d each per sequence and
layer), P_head: the heads' linear parameters (pooled: once per sequence). ``cache_peak_fraction`` = this over the
cache pass time in the ``auto`` precision, divided by the measured bf16 matmul peak.

Padding (exact counts from token lengths, no timing): the Amazon training split (all four domains, MiniLM tokenizer,
max_length 128), batches of 32 in ``EpochSampler`` order (epochs 0-4): ``group_by_length=False`` (random) vs True
(window 50), and longest-first (``by_length``: evaluation and the cache pass, whose rows ``input_table`` sorts).
``padding_*`` = padding tokens per real token; ``padding_saving`` = the fraction of padding tokens that grouping saves.

Targets (the issue): ``train_speedup`` (the smallest of the teacher-step, stage-1 and stage-2 speedups) >= 1.8,
``forward_speedup`` (the smaller of the cache-pass and eval speedups) >= 2.2, ``cache_peak_fraction`` >= 0.5.

A full run (not ``--quick``) also writes ``metakd_ray/sweep/calibration.json``, the per-example seconds the sweep
plan's cost estimate uses (``sweep.plan.calibration``): seconds per full 32 x 128 batch / 32, times the padded tokens
per example of real batches / 128 (grouped, random or longest-first, see the file's ``notes``).
Writes benchmarks/results/precision.json; the last line is the headline.
"""

from __future__ import annotations

import argparse
import copy
import datetime
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
from torch import nn  # noqa: E402

from metakd_ray import cell as CELL  # noqa: E402
from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.cache import ensure_cache  # noqa: E402
from metakd_ray.cache.build import TeacherPass  # noqa: E402
from metakd_ray.cache.job import cache_job  # noqa: E402
from metakd_ray.cache.reader import CachedTeacher  # noqa: E402
from metakd_ray.data.batching import EpochSampler, by_length, lengths_of  # noqa: E402
from metakd_ray.distill import student_logits, student_loss  # noqa: E402
from metakd_ray.runtime import Runtime, cpu_has_bf16, resolve_precision  # noqa: E402
from metakd_ray.storage import Storage  # noqa: E402
from metakd_ray.teacher.model import build_teacher, teacher_loss  # noqa: E402
from metakd_ray.training import make_optimizer  # noqa: E402

THREADS = 2
TARGETS = {"train_speedup": 1.8, "forward_speedup": 2.2, "cache_peak_fraction": 0.5}
OPS = ("teacher_step", "stage1_step", "stage2_step", "cache_pass", "eval")
TRAIN_OPS, FORWARD_OPS = ("teacher_step", "stage1_step", "stage2_step"), ("cache_pass", "eval")
CALIBRATION = REPO / "metakd_ray" / "sweep" / "calibration.json"


def machine() -> dict:
    import ray

    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        flags = sorted(set(text.split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})
    except OSError:
        model, flags = platform.processor(), []
    return dict(platform=platform.platform(), cpu=model, cpu_flags=flags, cpu_count=os.cpu_count(),
                torch=torch.__version__, ray=ray.__version__, torch_threads=torch.get_num_threads(),
                mkldnn=torch.backends.mkldnn.is_available(), cpu_has_bf16=cpu_has_bf16(),
                load_avg_start=os.getloadavg())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# Matmul peak and FLOPs
# ----------------------------------------------------------------------------------------------------------


class Matmuls:
    """torch.mm of n x n per dtype, timed inside the ops' repetitions (same load); GFLOP/s = 2 n^3 / min time,
    the best size per dtype."""

    def __init__(self, sizes: tuple[int, ...]):
        g = torch.Generator().manual_seed(0)
        self.sizes = sizes
        self.mats = {}
        for n in sizes:
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                a = torch.randn(n, n, generator=g).to(dt)
                b = torch.randn(n, n, generator=g).to(dt)
                torch.mm(a, b)  # warm-up (oneDNN primitive creation)
                self.mats[f"{name}_{n}"] = (a, b)
        self.times: dict[str, list[float]] = {k: [] for k in self.mats}

    def run(self) -> None:
        for k, (a, b) in self.mats.items():
            self.times[k].append(timed(lambda a=a, b=b: torch.mm(a, b)))

    def summary(self) -> dict:
        out: dict = {"sizes": list(self.sizes), "runs": {}}
        for k, ts in self.times.items():
            n = int(k.split("_")[1])
            out["runs"][k] = {"seconds": min(ts), "gflops": 2 * n ** 3 / min(ts) / 1e9, "all_s": ts}
        for k in ("fp32", "bf16"):
            out[f"{k}_gflops"] = max(v["gflops"] for name, v in out["runs"].items() if name.startswith(k + "_"))
        out["bf16_over_fp32"] = out["bf16_gflops"] / out["fp32_gflops"]
        return out


def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def teacher_forward_flops(teacher: nn.Module, b: int, t: int) -> dict:
    """The docstring's formula for the teacher (``MetaTeacher``) on b sequences of t tokens."""
    enc = teacher.encoder
    cfg = enc.config
    p_lin = linear_params(enc.encoder)  # the layers: no embeddings (and the pooler is not loaded)
    p_head = linear_params(teacher) - linear_params(enc)
    linear = 2 * p_lin * b * t
    attention = cfg.num_hidden_layers * 4 * b * t * t * cfg.hidden_size
    heads = 2 * p_head * b
    return dict(formula="2*P_lin*b*t + L*4*b*t^2*d + 2*P_head*b", P_lin=p_lin, P_head=p_head,
                L=cfg.num_hidden_layers, d=cfg.hidden_size, b=b, t=t, linear=linear, attention=attention,
                heads=heads, total=linear + attention + heads)


# ----------------------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------------------


def padded_tokens(lengths: np.ndarray, order, batch: int) -> int:
    """Tokens of the padded batches (each batch as long as its longest row) in ``order``."""
    x = lengths[np.asarray(order, dtype=np.int64)]
    return int(sum(len(c) * c.max() for c in np.array_split(x, range(batch, len(x), batch))))


def padding(lengths: list[int], batch: int, window: int, epochs: int = 5) -> dict:
    """Padding tokens per real token: random and grouped batches (mean over ``epochs`` epochs) and longest-first."""
    lens = np.asarray(lengths, dtype=np.int64)
    real = int(lens.sum())
    out = {"examples": len(lens), "mean_tokens": real / len(lens), "batch": batch, "window": window,
           "epochs": epochs}
    for name, group in (("random", False), ("grouped", True)):
        s = EpochSampler(lengths, batch, seed=0, group_by_length=group, window=window)
        total = 0
        for e in range(epochs):
            s.set_epoch(e)
            total += padded_tokens(lens, list(s), batch)
        out[name] = total / epochs / real - 1
    out["sorted"] = padded_tokens(lens, by_length(lengths), batch) / real - 1
    for k in ("random", "grouped", "sorted"):
        out[f"tokens_per_example_{k}"] = out["mean_tokens"] * (1 + out[k])
    out["saving"] = 1 - out["grouped"] / out["random"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------


class Step:
    """One training step as ``train_stage`` runs it (model in train mode; its own optimiser and schedule)."""

    def __init__(self, model: nn.Module, loss_fn, lr: float, grad_norm: float = 1.0):
        self.model, self.loss_fn, self.grad_norm = model, loss_fn, grad_norm
        self.opt, self.sched = make_optimizer(model, lr, 0.01, 10_000, 0.0)
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, rt: Runtime, scaler, batch: dict) -> None:
        self.model.train()
        with rt.autocast():
            terms = self.loss_fn(rt.to_device(batch), self.gen)
        self.opt.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_norm)
        scaler.step(self.opt)
        scaler.update()
        self.sched.step()


def numpy_batch(table) -> dict:
    """A pyarrow table as a Ray Data numpy batch (list columns: object arrays of 1-d arrays)."""
    out = {}
    for name in table.column_names:
        values = table[name].to_pylist()
        if values and isinstance(values[0], list):
            arr = np.empty(len(values), dtype=object)
            arr[:] = [np.asarray(v) for v in values]
            out[name] = arr
        else:
            out[name] = np.asarray(values)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timings per op and precision; the minimum counts")
    ap.add_argument("--quick", action="store_true",
                    help="development: 2 repeats, batch 8 (eval 16), small matmuls; no calibration written")
    ap.add_argument("--out", default=None, help="default benchmarks/results/precision.json (--quick: a temp file)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 2
    batch_size, eval_batch, max_length = (8, 16, 128) if args.quick else (32, CELL.EVAL_BATCH_SIZE, 128)
    out_path = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "precision-quick.json" if args.quick
        else REPO / "benchmarks" / "results" / "precision.json")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    auto = resolve_precision("auto", "cpu")
    arms = ("fp32", auto)
    t_start = time.perf_counter()
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             object_store_memory=1 << 30)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    info = machine()
    cfg = C.from_dict({}, [f"data.max_length={max_length}", "ray.cache_actors=1", "ray.cpus_per_actor=1",
                           "compute.precision=fp32"])
    splits = D.load_splits(cfg.data)
    enc, tokenizer = M.load_encoder(cfg.model.teacher, dropout=cfg.model.dropout)
    train = D.tokenize(splits["train"], tokenizer, max_length)

    # padding: exact counts over the whole training split
    pad = padding(lengths_of(train), 32, cfg.compute.length_window)
    print(f"padding (Amazon train, {pad['examples']} reviews, mean {pad['mean_tokens']:.1f} tokens, batch 32): "
          f"random {pad['random']:.3f}, grouped {pad['grouped']:.3f}, longest-first {pad['sorted']:.4f} padding "
          f"tokens per real token; grouping saves {pad['saving']:.1%} of the padding", flush=True)

    # the longest books rows: full batch x max_length batches
    books = train.filter(lambda d: [x == 0 for x in d], input_columns="domain_id", batched=True)
    lens = np.asarray(lengths_of(books))
    longest = [int(i) for i in np.argsort(-lens, kind="stable")[:max(batch_size, eval_batch)]]
    rows = books.select(longest)
    if min(lengths_of(rows)) < max_length:
        raise SystemExit(f"fewer than {len(longest)} books reviews reach {max_length} tokens")
    rng = random.Random(0)
    protos = {i: rng.random() for i in rows["id"]}
    rows = rows.add_column("prototype_score", [protos[i] for i in rows["id"]])
    coll = D.collator(tokenizer)
    train_batch = coll([rows[j] for j in range(batch_size)])
    eval_rows = coll([rows[j] for j in range(eval_batch)])
    num_labels, num_domains = splits.num_labels, len(splits.domains)

    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        storage = Storage(str(Path(tmp) / "store"))
        # the teacher: real MiniLM weights, meta heads; exported once for the cache build and the cache pass
        teacher = build_teacher("meta", copy.deepcopy(enc), num_labels, num_domains, cfg.model)
        tdir = Path(tmp) / "teacher"
        teacher.save_pretrained(tdir, tokenizer)
        gmap = M.student_layer_map(cfg.model, enc.config.num_hidden_layers)
        cache_rows = rows.select(range(batch_size))
        t0 = time.perf_counter()
        ref = ensure_cache(cfg, storage, tdir, "books", cache_rows, gmap, protos, batch_size=batch_size)
        build_s = time.perf_counter() - t0
        # Ray is needed for the cache build only: its daemons (raylet, GCS, idle workers) would take CPU time from
        # the timed ops on 2 cores, so it stops before anything is timed
        ray.shutdown()
        cached = CachedTeacher(ref, gmap)
        print(f"cache: {ref.num_examples} examples built in {build_s:.1f}s (compute {ref.manifest['compute']})",
              flush=True)
        job = cache_job(cfg, storage, tdir, "books", cache_rows, gmap, protos)
        passes = {p: TeacherPass(job.teacher.root, tuple(job.teacher.parts), job.layers, job.qk_layers,
                                 job.precision, THREADS, compute=p) for p in arms}
        torch.set_num_threads(THREADS)
        np_batch = numpy_batch(job.table.slice(0, batch_size))

        student = CELL.build_student(cfg, enc, tokenizer, "meta_kd", num_labels, num_domains, cached, seed=0)
        dcfg = cfg.distill
        teacher_step = Step(teacher, lambda b, g: teacher_loss("meta", teacher, b, cfg.teacher, num_domains, g),
                            cfg.teacher.lr)
        stage1 = Step(student, lambda b, g: student_loss("meta_kd", "layers", student, b, cached, dcfg),
                      dcfg.stage1_lr)
        stage2 = Step(student, lambda b, g: student_loss("meta_kd", "soft_ce", student, b, cached, dcfg),
                      dcfg.stage2_lr)

        @torch.no_grad()
        def evaluate(rt: Runtime) -> None:
            student.eval()
            with rt.autocast():
                student_logits(student, rt.to_device(eval_rows)).argmax(-1)

        runtimes = {p: Runtime(torch.device("cpu"), p) for p in arms}
        scalers = {p: rt.scaler() for p, rt in runtimes.items()}
        ops = {
            "teacher_step": lambda p: teacher_step(runtimes[p], scalers[p], train_batch),
            "stage1_step": lambda p: stage1(runtimes[p], scalers[p], train_batch),
            "stage2_step": lambda p: stage2(runtimes[p], scalers[p], train_batch),
            "cache_pass": lambda p: passes[p](np_batch),
            "eval": lambda p: evaluate(runtimes[p]),
        }
        for op in OPS:  # warm-up
            for p in arms:
                ops[op](p)
        matmuls = Matmuls((1024,) if args.quick else (2048, 3072))
        times = {op: {p: [] for p in arms} for op in OPS}
        for r in range(args.repeats):
            for op in OPS:
                for p in arms:
                    times[op][p].append(timed(lambda op=op, p=p: ops[op](p)))
            matmuls.run()
            print(f"  repetition {r + 1}/{args.repeats}: " + ", ".join(
                f"{op} {times[op]['fp32'][-1]:.3f}/{times[op][auto][-1]:.3f}s" for op in OPS), flush=True)
        flops = teacher_forward_flops(teacher, batch_size, max_length)
        teacher_params, student_params = M.param_count(teacher), M.param_count(student)

    mm = matmuls.summary()
    per_op = {}
    for op in OPS:
        a, b = min(times[op]["fp32"]), min(times[op][auto])
        per_op[op] = {"fp32_s": a, "auto_s": b, "speedup": a / b, "fp32_all_s": times[op]["fp32"],
                      "auto_all_s": times[op][auto],
                      "batch": eval_batch if op == "eval" else batch_size, "tokens": max_length}
    train_speedup = min(per_op[op]["speedup"] for op in TRAIN_OPS)
    forward_speedup = min(per_op[op]["speedup"] for op in FORWARD_OPS)
    cache_gflops = {p: flops["total"] / min(times["cache_pass"][p]) / 1e9 for p in arms}
    cache_peak_fraction = cache_gflops[auto] * 1e9 / (mm["bf16_gflops"] * 1e9)
    values = dict(train_speedup=train_speedup, forward_speedup=forward_speedup,
                  cache_peak_fraction=cache_peak_fraction)
    targets = {k: {"target": t, "value": values[k], "pass": values[k] >= t} for k, t in TARGETS.items()}
    info["load_avg_end"] = os.getloadavg()
    out = dict(
        **values, train_speedup_is="min of teacher_step, stage1_step, stage2_step speedups",
        forward_speedup_is="min of cache_pass, eval speedups",
        padding_random=pad["random"], padding_grouped=pad["grouped"], padding_saving=pad["saving"],
        padding=pad, targets=targets, auto_precision=auto, ops=per_op, matmul=mm,
        cache_pass_flops=flops, cache_pass_gflops=cache_gflops,
        models=dict(teacher_params=teacher_params, student_params=student_params, layer_map=list(gmap)),
        cache_build_seconds=build_s, batch_size=batch_size, eval_batch_size=eval_batch, max_length=max_length,
        repeats=args.repeats, threads=THREADS, quick=args.quick, machine=info,
        total_seconds=time.perf_counter() - t_start, command=" ".join(["python", *sys.argv]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    if not args.quick:
        cal = calibration(per_op, pad, auto, info, batch_size, max_length)
        if CALIBRATION.exists():  # smoke_precision.py's per-run overheads: kept (rerun it after this script)
            previous = json.loads(CALIBRATION.read_text())
            cal.update({k: previous[k] for k in ("overhead_seconds", "overhead_source") if k in previous})
        CALIBRATION.write_text(json.dumps(cal, indent=2) + "\n")

    print(f"\n{'op':14s} {'batch':>5s} {'fp32 s':>8s} {auto + ' s':>8s} {'speedup':>8s}")
    for op, v in per_op.items():
        print(f"{op:14s} {v['batch']:5d} {v['fp32_s']:8.3f} {v['auto_s']:8.3f} {v['speedup']:7.2f}x")
    print(f"matmul peaks (2 threads): fp32 {mm['fp32_gflops']:.0f} GFLOP/s, bf16 {mm['bf16_gflops']:.0f} GFLOP/s "
          f"({mm['bf16_over_fp32']:.2f}x); cache pass {flops['total'] / 1e9:.1f} GFLOP per batch: "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in cache_gflops.items()))
    for k, v in targets.items():
        print(f"  {k:20s} {v['value']:6.3f}  target >= {v['target']}  {'pass' if v['pass'] else 'FAIL'}")
    print(f"wrote {out_path}" + ("" if args.quick else f" and {CALIBRATION}") +
          f" ({out['total_seconds']:.0f}s, load {info['load_avg_start'][0]:.1f} -> {info['load_avg_end'][0]:.1f})")
    print(f"{auto} vs fp32: train_speedup={train_speedup:.2f}x (target 1.8) forward_speedup={forward_speedup:.2f}x "
          f"(target 2.2) cache_peak_fraction={cache_peak_fraction:.2f} (target 0.5); padding grouped "
          f"{pad['grouped']:.3f} vs random {pad['random']:.3f} per real token ({pad['saving']:.0%} saved)")
    return 0


def calibration(per_op: dict, pad: dict, auto: str, info: dict, batch: int, max_length: int) -> dict:
    """The per-example seconds of ``sweep.plan.calibration`` (see ``notes`` in the output)."""
    full = {}
    for key, p in (("fp32", "fp32"), (auto, "auto")):
        s = {op: v[f"{p}_s"] / v["batch"] for op, v in per_op.items()}
        full[key] = {"teacher_epoch": s["teacher_step"], "cache": s["cache_pass"],
                     "student_stage1_epoch": s["stage1_step"], "student_stage2_epoch": s["stage2_step"],
                     "student_epoch": (s["stage1_step"] + s["stage2_step"]) / 2, "eval": s["eval"]}

    def scaled(train_padding: str) -> dict:
        f_train = pad[f"tokens_per_example_{train_padding}"] / max_length
        f_sorted = pad["tokens_per_example_sorted"] / max_length  # cache pass and eval: rows longest first
        return {k: {name: round(v * (f_sorted if name in ("cache", "eval") else f_train), 5)
                    for name, v in per.items()} for k, per in full.items()}

    return {
        "source": "python benchmarks/precision.py",
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: info[k] for k in ("cpu", "cpu_flags", "cpu_count", "torch", "load_avg_start")},
        "unit": ("wall seconds per example on a 2-CPU machine with torch at 2 threads, i.e. the plan's "
                 "'CPU-seconds at 2-CPU speed' (seconds of the whole 2-CPU machine, not x 2)"),
        "max_length": max_length,
        "batch_size": batch,
        "seconds_per_example": scaled("grouped"),
        "seconds_per_example_random": scaled("random"),
        "seconds_per_example_full_batch": {k: {n: round(v, 5) for n, v in per.items()} for k, per in full.items()},
        "padding": {"random": round(pad["random"], 4), "grouped": round(pad["grouped"], 4),
                    "sorted": round(pad["sorted"], 5), "mean_tokens": round(pad["mean_tokens"], 2)},
        "notes": [
            "seconds_per_example (compute.group_by_length=true) and seconds_per_example_random (false): seconds per "
            "full batch x max_length batch / batch size, times the padded tokens per example of real batches / "
            "max_length (grouped resp. random training batches; the cache pass and eval always take rows longest "
            "first, so 'cache' and 'eval' use the longest-first padding in both tables)",
            "padding: padding tokens per real token over the Amazon training split (4 domains), batch 32",
            "student_epoch: the average of one stage-1 (layers, from the cache) and one stage-2 (soft_ce) epoch, "
            "for a plan that multiplies it by stage1_epochs + stage2_epochs; student_stage1_epoch and "
            "student_stage2_epoch are the two separately",
            "teacher_epoch: MetaTeacher training steps only (no dev evaluation, no prototype pass); cache: the "
            "TeacherPass of run_teacher_job in-process at 2 threads (no Ray start-up or I/O); eval: student "
            "forward at batch 64",
        ],
    }


if __name__ == "__main__":
    sys.exit(main())

"""Inference latency of the exported student beside its teacher, on this CPU: what a user ships, run as they run it.

    python benchmarks/latency.py [--repeats 15] [--budget 90] [--threads 2]

One run, torch with 2 threads, ``max_length`` 128, real Amazon reviews (``metakd_ray.data.read_amazon`` over the
four domains, 16 + 32 reviews drawn with a fixed seed; tokenised before timing, so the tokenizer is not timed).

- The teacher: the default offline model (``load_encoder("default")``, all-MiniLM-L6-v2, 6 layers) with a
  classification head (``ClassifierTeacher``: mean pooling + linear). Its inference path is exactly the exported
  student's (encoder -> pooling -> classifier), so it is exported the same way — as a 6-layer ``Student`` holding the
  teacher's encoder and classifier, through ``export.export_student`` — and the logits of the loaded export are
  checked against the ``ClassifierTeacher``'s. Both models then run through the same ``transformers`` class, and the
  comparison measures depth, not two implementations.
- The student: ``cell.build_student`` as a sweep trial builds it (default config: ``meta/meta_kd``, 3 layers cut from
  the teacher's [2, 4, 6], shaped by a live meta-teacher), exported with ``export_student`` to a temporary folder
  (``W_h``, the domain head and ``W_d`` are left out, as for every export) and loaded back with plain
  ``transformers.AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``; its logits are
  checked against the ``Student``'s.

Nothing is trained for the task (the encoder is the pre-trained MiniLM, the heads are freshly initialised): latency
does not depend on the weights' values (same shapes, same ops), so none of the numbers here needs a trained model.
Parameters are counted on the loaded exports; MB on disk is the export's ``model.safetensors`` (10^6 bytes).

Timing: per repetition every setting — batch 1 (16 reviews, one forward each, unpadded) and batch 32 (one batch of
32 other reviews, padded to the longest) x fp32 and bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``) — runs
the teacher and the student taking turns forward by forward, in alternating order (teacher first on even
repetitions), so a burst of load from other processes hits both alike; one warm-up round comes first.
``torch.inference_mode`` throughout. ``--repeats`` repetitions (15), fewer (at least 3) when one more would pass
``--budget`` seconds (90) of timing: on a CPU without native bf16 (no ``avx512_bf16``/AMX) bf16 autocast is
emulated, several times slower than fp32, and dominates the run.

Latency per example = round seconds / examples in the round, median over repetitions; throughput = examples per
second at that median. ``speedup_b<batch>_<precision>`` = teacher / student latency; ``compression`` = teacher /
student parameters. The minimum over repetitions (the least-disturbed figure on a shared machine) is kept too:
``ms_per_example_min``, ``speedup_min``.

Writes benchmarks/results/latency.json; prints a table, and the ratios on the last line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from _env import REPO  # noqa: E402,F401  (sets the environment first)

import torch  # noqa: E402

from metakd_ray import cell as CELL  # noqa: E402
from metakd_ray import config as C  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.distill import LiveTeacher  # noqa: E402
from metakd_ray.export import export_student  # noqa: E402
from metakd_ray.runtime import cpu_has_bf16  # noqa: E402

THREADS = 2
MAX_LENGTH = 128
PRECISIONS = ("fp32", "bf16")
LABELS = ("negative", "positive")
DOMAINS = ("books", "dvd", "electronics", "kitchen")
MODELS = ("teacher", "student")
MIN_REPEATS = 3


# ----------------------------------------------------------------------------------------------------------
# The two exports
# ----------------------------------------------------------------------------------------------------------


def export_pair(cfg: C.Config, encoder: torch.nn.Module, tokenizer: Any, workdir: Path, *,
                num_domains: int = len(DOMAINS), max_length: int = MAX_LENGTH, seed: int = 0
                ) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Export the teacher (encoder + classifier, as a full-depth Student) and the sweep's student built from it
    into ``workdir/{teacher,student}`` and load each back with plain transformers; return {name: (folder, loaded
    model)}. Each loaded export's logits are checked against the model it was written from (two short inputs)."""
    torch.manual_seed(seed)
    teacher = M.ClassifierTeacher(copy.deepcopy(encoder), len(LABELS), pooling=cfg.model.pooling,
                                  dropout=cfg.model.dropout).eval()
    # The teacher's inference path as the export's class holds it: same encoder, pooling and classifier weights.
    as_student = M.Student(teacher.encoder, len(LABELS), teacher_hidden_size=encoder.config.hidden_size,
                           pooling=cfg.model.pooling, dropout=cfg.model.dropout).eval()
    as_student.classifier.load_state_dict(teacher.classifier.state_dict())

    meta_teacher = M.MetaTeacher(copy.deepcopy(encoder), len(LABELS), num_domains, pooling=cfg.model.pooling,
                                 dropout=cfg.model.dropout)
    source = LiveTeacher(meta_teacher, M.student_layer_map(cfg.model, encoder.config.num_hidden_layers))
    student = CELL.build_student(cfg, encoder, tokenizer, "meta_kd", len(LABELS), num_domains, source, seed=seed)
    student.eval()

    out = {}
    probe = tokenizer(["a short probe", "another, somewhat longer probe sentence"], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
    for name, model, reference in (("teacher", as_student, teacher), ("student", student, student)):
        folder = export_student(model, tokenizer, workdir / name, LABELS, max_length=max_length,
                                extra_metadata={"benchmark": "latency", "role": name, "trained": False})
        out[name] = (folder, load_export(folder))
        with torch.inference_mode():
            # domain_ids: read only by the student's domain head (not part of the export)
            domain_ids = torch.zeros(len(probe["input_ids"]), dtype=torch.long)
            want = reference(probe["input_ids"], probe["attention_mask"], probe.get("token_type_ids"),
                             domain_ids=domain_ids).logits
            got = out[name][1](**probe).logits
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            raise SystemExit(f"the {name}'s export does not reproduce its logits "
                             f"(max diff {(got - want).abs().max().item():.2e})")
    return out


def load_export(directory: Path) -> torch.nn.Module:
    """What a user runs: plain transformers, the export's own modeling file."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per load
    return AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True).eval()


def num_layers(model: torch.nn.Module) -> int:
    """Transformer layers of a loaded export: its config's ``num_hidden_layers`` (the encoder's settings inline), or
    that of its ``encoder_config`` (exports that hold any encoder family)."""
    config = model.config
    n = getattr(config, "num_hidden_layers", None)
    return int(n if n is not None else (getattr(config, "encoder_config", None) or {})["num_hidden_layers"])


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def rounds(tokenizer: Any, texts: Sequence[str], batch_sizes: Sequence[int], per_round: int, max_length: int
           ) -> dict[int, list[dict]]:
    """The inputs of one timed round per batch size: batch 1 -> ``per_round`` single reviews (no padding); batch b
    -> the texts after them in batches of b (padded to the batch's longest)."""
    out = {}
    for b in batch_sizes:
        if b == 1:
            chunk = [[t] for t in texts[:per_round]]
        else:
            rest = list(texts[per_round:]) or list(texts)
            chunk = [rest[i:i + b] for i in range(0, len(rest) - b + 1, b)] or [rest[:b]]
        out[b] = [dict(tokenizer(c, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
                  for c in chunk]
    return out


def forward_s(model: torch.nn.Module, batch: dict, precision: str) -> float:
    """Seconds for one forward of ``batch`` in ``precision``."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        t0 = time.perf_counter()
        model(**batch)
        return time.perf_counter() - t0


def run_round(models: dict[str, torch.nn.Module], batches: list[dict], precision: str, order: Sequence[str]
              ) -> dict[str, float]:
    """Seconds per model for forwards of ``batches`` in ``precision``, the models taking turns batch by batch (in
    ``order``): a burst of load from other processes hits both, not one model's whole round."""
    total = dict.fromkeys(order, 0.0)
    for batch in batches:
        for name in order:
            total[name] += forward_s(models[name], batch, precision)
    return total


def measure(cfg: C.Config, encoder: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, repeats: int = 15,
            budget_s: float | None = None, batch_sizes: Sequence[int] = (1, 32), per_round: int = 16,
            precisions: Sequence[str] = PRECISIONS, max_length: int = MAX_LENGTH, workdir: Path | None = None,
            log=print) -> dict[str, Any]:
    """Export teacher and student (:func:`export_pair`), load them back with plain transformers and time them
    (module docstring); return the results dict written to latency.json. The core of the benchmark: any encoder,
    tokenizer and texts (the test runs it on a tiny random BERT). ``budget_s``: stop before ``repeats`` (after at
    least ``MIN_REPEATS``) when one more repetition, at the mean pace so far, would pass this many seconds."""
    with tempfile.TemporaryDirectory(prefix="latency-bench-", dir=workdir) as tmp:
        exports = export_pair(cfg, encoder, tokenizer, Path(tmp), max_length=max_length)
        models = {name: model for name, (_, model) in exports.items()}
        size = {name: (d / "model.safetensors").stat().st_size for name, (d, _) in exports.items()}
        layers = {name: num_layers(m) for name, m in models.items()}
        params = {name: M.param_count(m) for name, m in models.items()}
    inputs = rounds(tokenizer, texts, batch_sizes, per_round, max_length)
    settings = [(b, p) for b in batch_sizes for p in precisions]
    examples = {b: sum(int(x["input_ids"].shape[0]) for x in inputs[b]) for b in batch_sizes}
    t0 = time.perf_counter()
    for b, p in settings:  # warm-up (first calls pay for kernel selection, allocator growth, ...)
        run_round(models, inputs[b], p, MODELS)
    warm_s, t0 = time.perf_counter() - t0, time.perf_counter()
    times: dict[tuple, list[float]] = {(name, b, p): [] for name in MODELS for b, p in settings}
    loads = []  # the 1-minute load average after each repetition: other processes on the CPUs slow both models
    for r in range(repeats):
        spent = time.perf_counter() - t0
        if budget_s is not None and r >= MIN_REPEATS and spent * (r + 1) / r > budget_s:
            log(f"  {r} repetitions (of {repeats}) in {spent:.0f}s: another would pass the {budget_s:.0f}s budget")
            break
        for b, p in settings:
            for name, seconds in run_round(models, inputs[b], p, MODELS if r % 2 == 0 else MODELS[::-1]).items():
                times[(name, b, p)].append(seconds)
        loads.append(os.getloadavg()[0])
        log(f"  repetition {r + 1}/{repeats} (load {loads[-1]:.1f}), teacher/student ms per example: " + ", ".join(
            f"b{b} {p} {1e3 * times[('teacher', b, p)][-1] / examples[b]:.1f}/"
            f"{1e3 * times[('student', b, p)][-1] / examples[b]:.1f}" for b, p in settings))

    per_setting = {}
    for b, p in settings:
        entry: dict[str, Any] = {"batch": b, "precision": p, "examples_per_round": examples[b],
                                 "mean_tokens": sum(int(x["attention_mask"].sum()) for x in inputs[b]) / examples[b],
                                 "padded_tokens": sum(x["input_ids"].numel() for x in inputs[b]) / examples[b]}
        for name in MODELS:
            per_example = statistics.median(times[(name, b, p)]) / examples[b]
            entry[name] = {"ms_per_example": 1e3 * per_example, "examples_per_s": 1.0 / per_example,
                           "ms_per_example_min": 1e3 * min(times[(name, b, p)]) / examples[b],
                           "round_s": times[(name, b, p)]}
        entry["speedup"] = entry["teacher"]["ms_per_example"] / entry["student"]["ms_per_example"]
        # the least-disturbed figures: what the models cost when nothing else ran
        entry["speedup_min"] = entry["teacher"]["ms_per_example_min"] / entry["student"]["ms_per_example_min"]
        per_setting[f"b{b}_{p}"] = entry
    out: dict[str, Any] = {
        "teacher_params": params["teacher"], "student_params": params["student"],
        "compression": params["teacher"] / params["student"],
        "teacher_mb": size["teacher"] / 1e6, "student_mb": size["student"] / 1e6,
        "disk_ratio": size["teacher"] / size["student"],
        "teacher_layers": layers["teacher"], "student_layers": layers["student"],
    }
    for key, v in per_setting.items():
        out[f"speedup_{key}"] = v["speedup"]
        for name in MODELS:
            out[f"{name}_ms_{key}"] = v[name]["ms_per_example"]
            out[f"{name}_throughput_{key}"] = v[name]["examples_per_s"]
    out.update(settings=per_setting, repeats=len(loads), repeats_requested=repeats, warmup_round_s=warm_s,
               load_avg_per_repeat=loads, max_length=max_length)
    return out


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def amazon_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` review texts (title + body) drawn with ``seed`` from the four Amazon domains' labeled reviews."""
    from metakd_ray import data as D

    root = Path(os.environ.get("METAKD_DATA") or REPO.parent / "shared" / "data")
    rows = D.read_amazon(root, DOMAINS)
    return [r["text"] for r in random.Random(seed).sample(rows, n)]


def table(res: dict) -> str:
    lines = [f"{'model':8s} {'layers':>6s} {'params':>12s} {'MB':>7s}",
             *(f"{m:8s} {res[f'{m}_layers']:6d} {res[f'{m}_params']:12,d} {res[f'{m}_mb']:7.1f}" for m in MODELS),
             "", f"{'setting':10s} {'teacher ms/ex':>14s} {'student ms/ex':>14s} {'teacher ex/s':>13s} "
                 f"{'student ex/s':>13s} {'speedup':>8s} {'(min)':>7s}"]
    for key, v in res["settings"].items():
        lines.append(f"{key:10s} {v['teacher']['ms_per_example']:14.2f} {v['student']['ms_per_example']:14.2f} "
                     f"{v['teacher']['examples_per_s']:13.1f} {v['student']['examples_per_s']:13.1f} "
                     f"{v['speedup']:7.2f}x {v['speedup_min']:6.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per model and setting; the median counts")
    ap.add_argument("--budget", type=float, default=90.0,
                    help="seconds of timing: stop (after at least 3 repetitions) before passing it")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latency.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    cfg = C.from_dict({}, [f"data.max_length={MAX_LENGTH}"])
    encoder, tokenizer = M.load_encoder(cfg.model.teacher, dropout=cfg.model.dropout)
    texts = amazon_texts(16 + 32)
    res = measure(cfg, encoder, tokenizer, texts, repeats=args.repeats, budget_s=args.budget)
    res.update(weights="not trained for the task: pre-trained MiniLM encoder, random classifier (latency does not "
                       "depend on the values)",
               threads=args.threads, teacher_model=cfg.model.teacher, student_method="meta/meta_kd",
               student_teacher_layers=list(cfg.model.student.layers or M.evenly_spaced_layers(
                   cfg.model.student.num_layers, encoder.config.num_hidden_layers)),
               texts="Amazon reviews, 4 domains, random.Random(0).sample of 48 (16 at batch 1, 32 at batch 32)",
               machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                            cpu_has_bf16=cpu_has_bf16(), load_avg_start=load_start, load_avg_end=os.getloadavg()),
               total_seconds=time.perf_counter() - t_start, command=" ".join(["python", *sys.argv]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print("\n" + table(res))
    print(f"wrote {args.out} ({res['total_seconds']:.0f}s, load {load_start[0]:.1f} -> "
          f"{res['machine']['load_avg_end'][0]:.1f})")
    print(f"compression={res['compression']:.2f}x (disk {res['disk_ratio']:.2f}x) " + " ".join(
        f"speedup_{k}={v['speedup']:.2f}x" for k, v in res["settings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

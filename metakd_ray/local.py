"""One sweep cell, end to end, in a single process with no Ray: data -> prototype scores -> teacher -> student
-> per-domain test accuracy. The reference for what the Ray stages distribute, and a quick real example::

    python -m metakd_ray.local sweeps/smoke.yaml --target books --method meta/meta_kd --rate 0.1

Artefacts go to ``<storage.root>/local/<target>-<teacher kind>-<student method>-r<rate>-s<seed>/`` with the
resolved config beside them; a rerun resumes every stage from its checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
from torch import nn

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.cells import filter_domains as _filter
from metakd_ray.cells import loader, teacher_domains, tokenize_splits, training_pool, with_prototype_scores
from metakd_ray.distill import LiveTeacher, distill, student_logits
from metakd_ray.teacher import build_teacher, pool_prototype_scores, teacher_logits, train_teacher
from metakd_ray.training import LocalCheckpointer, accuracy_by_domain, atomic_export


@dataclass(frozen=True)
class CellData:
    """Tokenised data of one cell: the teacher's training/dev sets, the student's (target domain) sets, and every
    domain's test set; all carry ``prototype_score``."""

    teacher_train: datasets.Dataset
    teacher_dev: datasets.Dataset
    student_train: datasets.Dataset
    student_dev: datasets.Dataset
    test: datasets.Dataset
    domains: tuple[str, ...]
    teacher_domains: tuple[str, ...]
    num_labels: int


def split_method(method: str) -> tuple[str, str]:
    """``"meta/meta_kd"`` -> ("meta", "meta_kd"); ``"none/finetune"`` -> ("none", "finetune")."""
    if method not in C.VALID_METHODS:
        raise ValueError(f"method {method!r} is not allowed; expected one of {', '.join(C.VALID_METHODS)}")
    kind, student = method.split("/")
    return kind, student


def prepare_cell(cfg: C.Config, splits: D.Splits, tokenizer: Any, encoder: nn.Module, target: str, kind: str,
                 rate: float, seed: int) -> CellData:
    """Subsample (``data.scarcity``), tokenise, and attach prototype scores computed by the frozen pre-trained
    ``encoder`` over the training pool (the union of every domain's subsampled training data)."""
    domains = splits.domains
    tok = tokenize_splits(cfg, tokenizer, train=training_pool(cfg, splits, target, rate, seed), dev=splits["dev"],
                          test=splits["test"])
    excluded = domains.index(target) if cfg.teacher.exclude_target and kind not in ("single", "none") else None
    scores = pool_prototype_scores(encoder, tok["train"], D.collator(tokenizer), cfg, len(domains), splits.num_labels,
                                   excluded_domain=excluded)
    tok["train"] = with_prototype_scores(tok["train"], scores.tolist())
    for name in ("dev", "test"):  # not used for training; zeros keep batches uniform
        tok[name] = with_prototype_scores(tok[name], None)
    tdoms = teacher_domains(kind, target, domains, cfg.teacher.exclude_target) if kind != "none" else (target,)
    return CellData(
        teacher_train=_filter(tok["train"], tdoms, domains), teacher_dev=_filter(tok["dev"], tdoms, domains),
        student_train=_filter(tok["train"], (target,), domains), student_dev=_filter(tok["dev"], (target,), domains),
        test=tok["test"], domains=domains, teacher_domains=tdoms, num_labels=splits.num_labels)


def run_cell(cfg: C.Config, target: str, method: str, rate: float, seed: int, out_dir: Path, *,
             splits: D.Splits | None = None, encoder: nn.Module | None = None, tokenizer: Any = None,
             log: Callable[[dict], None] | None = None) -> dict:
    """Train the teacher (unless ``finetune``) and the student of one cell; return per-domain test accuracies.
    ``splits``/``encoder``/``tokenizer`` may be passed in (tests use a tiny random encoder)."""
    kind, student_method = split_method(method)
    out_dir = Path(out_dir)
    C.write_resolved(cfg, out_dir)
    t0 = time.time()
    splits = splits or D.load_splits(cfg.data)
    if encoder is None:
        encoder, tokenizer = M.load_encoder(cfg.model.teacher, dropout=cfg.model.dropout)
    M.check_max_length(encoder, cfg.data.max_length)
    pretrained = copy.deepcopy(encoder)  # the student starts from the pre-trained encoder, not the fine-tuned one
    cell = prepare_cell(cfg, splits, tokenizer, encoder, target, kind, rate, seed)
    collate = D.collator(tokenizer)
    domains, k, c = cell.domains, len(cell.domains), cell.num_labels
    result: dict[str, Any] = {"target": target, "method": method, "rate": rate, "seed": seed,
                              "n_teacher_train": len(cell.teacher_train), "n_student_train": len(cell.student_train)}
    teacher = None
    if kind != "none":
        teacher = build_teacher(kind, encoder, c, k, cfg.model)
        tres = train_teacher(teacher, kind, loader(cell.teacher_train, collate, cfg.teacher.batch_size, True, seed),
                             loader(cell.teacher_dev, collate, 64, False), cfg.teacher, num_domains=k,
                             domain_names=domains, seed=seed,
                             checkpointer=LocalCheckpointer(out_dir / "teacher"), log=log)
        atomic_export(lambda d: teacher.save_pretrained(d, tokenizer), out_dir / "teacher" / "best")
        result["teacher_dev"] = tres.best_dev
        teacher_test = loader(_filter(cell.test, cell.teacher_domains, domains), collate, 64, shuffle=False)
        result["teacher_test"] = accuracy_by_domain(teacher, teacher_test, domains, teacher_logits)

    student_encoder = M.build_student(cfg.model, pretrained, tokenizer)
    meta = student_method == "meta_kd"
    if student_method != "finetune":
        M.check_attention_compatible(pretrained, student_encoder)
    student = M.Student(student_encoder, c, teacher_hidden_size=encoder.config.hidden_size,
                        teacher_domain_hidden_size=teacher.domain_hidden_size if meta else None,
                        num_domains=k if meta else None, pooling=cfg.model.pooling, dropout=cfg.model.dropout)
    source = None
    if teacher is not None:
        gmap = M.layer_map(student_encoder.config.num_hidden_layers, encoder.config.num_hidden_layers,
                           M.kept_teacher_layers(student_encoder))
        source = LiveTeacher(teacher, gmap, dropout=cfg.distill.teacher_dropout)
    distill(student, student_method, source,
            loader(cell.student_train, collate, cfg.distill.batch_size, True, seed),
            loader(cell.student_dev, collate, 64, False), cfg.distill, domain_names=domains, seed=seed,
            checkpoint_dir=out_dir / "student", log=log)
    atomic_export(lambda d: student.save_pretrained(d, tokenizer), out_dir / "student" / "best")
    target_test = loader(_filter(cell.test, (target,), domains), collate, 64, shuffle=False)
    result["student_test"] = accuracy_by_domain(student, target_test, domains, student_logits)
    result["params"] = M.describe_models(encoder, student_encoder)
    result["seconds"] = time.time() - t0
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.local", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--target", help="target domain (default: the first of sweep.target_domains or data.domains)")
    ap.add_argument("--method", default="meta/meta_kd", help=f"one of {', '.join(C.VALID_METHODS)}")
    ap.add_argument("--rate", type=float, default=None, help="sample rate (default: the first of sweep.sample_rates)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: the first of sweep.seeds)")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        target = args.target or (cfg.sweep.target_domains or cfg.data.domains)[0]
        if target not in cfg.data.domains:
            raise C.ConfigError([f"--target: {target!r} is not in data.domains ({', '.join(cfg.data.domains)})"])
        rate = args.rate if args.rate is not None else cfg.sweep.sample_rates[0]
        D.check_rate(rate)
        split_method(args.method)
    except (C.ConfigError, ValueError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else cfg.sweep.seeds[0]
    kind, sm = args.method.split("/")
    out = Path(cfg.storage.root) / "local" / f"{target}-{kind}-{sm}-r{rate:g}-s{seed}"
    try:
        res = run_cell(cfg, target, args.method, rate, seed, out,
                       log=lambda m: print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                       for k, v in m.items()}), flush=True))
    except (D.DataError, M.ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{args.method} on {target}, rate {rate:g}, seed {seed}: "
          f"{res['n_teacher_train']} teacher / {res['n_student_train']} student training examples")
    if "teacher_test" in res:
        print("teacher test accuracy: " + ", ".join(f"{d} {a:.4f}" for d, a in res["teacher_test"].items()))
    print("student test accuracy: " + ", ".join(f"{d} {a:.4f}" for d, a in res["student_test"].items()))
    p = res["params"]
    print(f"student {p['student']['params']:,} params, teacher {p['teacher']['params']:,}: "
          f"{p['compression_ratio']:.2f}x smaller; {res['seconds']:.0f} s; artefacts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

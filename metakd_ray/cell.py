"""One cell — (target domain, sample rate, method, seed) — from rows to a trained student. The only place a cell is
built: the single-process path (``local.py``) and a sweep trial (``sweep/trial.py``) both call :func:`student_data`,
:func:`build_student` and :func:`train_student`; the teacher stage takes its rows from :func:`teacher_sets`.

* The *training pool* of (rate, seed[, target]): every domain's training data, subsampled at ``rate`` (all domains
  with ``data.scarcity: all``; only the target with ``scarcity: target``). Prototype scores are computed over it.
* A teacher of ``kind`` trains on the pool's rows of :func:`teacher_domains`; a student on its target's rows, and is
  selected on its target's dev rows and scored on its target's test rows.
* The student starts from the pre-trained encoder (``model.student``), shaped by its teacher source: W_h maps to the
  teacher's width, a meta_kd student gets a domain head of the teacher's h_d width, and its layer count must match
  the teacher source's layer map g.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.data.batching import EpochSampler, by_length, lengths_of
from metakd_ray.distill import Stage, TeacherSource, distill, student_logits
from metakd_ray.runtime import CPU_FP32, Runtime
from metakd_ray.training import Checkpointer, Predictions, StageResult, predict

# Batch size of every evaluation and inference pass (dev/test accuracy, prototype features): no gradients, so
# larger than a training batch; results do not depend on it.
EVAL_BATCH_SIZE = 64


def split_method(method: str) -> tuple[str, str]:
    """``"meta/meta_kd"`` -> ("meta", "meta_kd"); ``"none/finetune"`` -> ("none", "finetune")."""
    if method not in C.VALID_METHODS:
        raise ValueError(f"method {method!r} is not allowed; expected one of {', '.join(C.VALID_METHODS)}")
    kind, student = method.split("/")
    return kind, student


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------


def teacher_domains(kind: str, target: str | None, domains: tuple[str, ...], exclude_target: bool) -> tuple[str, ...]:
    """Domains a teacher of ``kind`` trains on: the target alone (single), else all (minus the target for the
    no-in-domain-data variant)."""
    if kind == "single":
        if target is None:
            raise ValueError("teacher kind 'single' needs a target domain")
        return (target,)
    return tuple(d for d in domains if not (exclude_target and d == target))


def filter_domains(ds: datasets.Dataset, keep: Sequence[str], domains: tuple[str, ...]) -> datasets.Dataset:
    """The rows of ``ds`` whose domain is in ``keep``."""
    wanted = {domains.index(d) for d in keep}
    return ds.filter(lambda ids: [i in wanted for i in ids], input_columns="domain_id", batched=True)


def loader(ds: datasets.Dataset, collate: Callable, batch_size: int, seed: int,
           compute: C.ComputeConfig) -> DataLoader:
    """A training loader: each epoch's order a function of (``seed``, epoch), grouped by length per
    ``compute.group_by_length`` (``data/batching.py``); ``train_stage`` sets the epoch."""
    sampler = EpochSampler(lengths_of(ds), batch_size, seed=seed, group_by_length=compute.group_by_length,
                           window=compute.length_window)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def eval_loader(ds: datasets.Dataset, collate: Callable) -> DataLoader:
    """Rows longest first (least padding), ``EVAL_BATCH_SIZE`` at a time; ``loader.sampler`` lists the row order."""
    return DataLoader(ds, batch_size=EVAL_BATCH_SIZE, sampler=by_length(lengths_of(ds)), collate_fn=collate)


def training_pool(cfg: C.Config, splits: D.Splits, target: str | None, rate: float, seed: int) -> datasets.Dataset:
    """Every domain's training rows, subsampled at ``rate`` with ``seed`` per ``data.scarcity`` (``target`` is only
    needed, and required, for ``scarcity: target``)."""
    only = None
    if cfg.data.scarcity == "target":
        if target is None:
            raise ValueError("data.scarcity: target needs a target domain to subsample")
        only = (target,)
    return D.subsample(splits["train"], rate, seed, only_domains=only)


def with_prototype_scores(ds: datasets.Dataset,
                          scores: Sequence[float] | Mapping[str, float] | None) -> datasets.Dataset:
    """``ds`` plus a ``prototype_score`` column: ``scores`` in row order (a sequence), looked up by ``id`` (a
    mapping; every row must have one), or zeros (None: splits not used for training keep batches uniform)."""
    if scores is None:
        values = [0.0] * len(ds)
    elif isinstance(scores, Mapping):
        ids = D.column(ds, "id")
        missing = [i for i in ids if i not in scores]
        if missing:
            raise ValueError(f"{len(missing)} rows have no prototype score (e.g. id {missing[0]!r}); the scores were "
                             "computed for a different training pool")
        values = [float(scores[i]) for i in ids]
    else:
        values = [float(s) for s in scores]
    return ds.add_column("prototype_score", values)


def tokenize_splits(cfg: C.Config, tokenizer: Any, **parts: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """``tokenize`` each named dataset at ``data.max_length``."""
    return {name: D.tokenize(ds, tokenizer, cfg.data.max_length) for name, ds in parts.items()}


def teacher_sets(cfg: C.Config, splits: D.Splits, tokenizer: Any, domains: Sequence[str], target: str | None,
                 rate: float, seed: int, scores: Mapping[str, float]) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A teacher's tokenised (train, dev) sets: its ``domains``' rows of the training pool (with prototype scores)
    and of the dev split."""
    pool = training_pool(cfg, splits, target, rate, seed)
    tok = tokenize_splits(cfg, tokenizer, train=pool, dev=splits["dev"])
    train = with_prototype_scores(tok["train"], scores)
    dev = with_prototype_scores(tok["dev"], None)
    return filter_domains(train, domains, splits.domains), filter_domains(dev, domains, splits.domains)


@dataclass(frozen=True)
class StudentData:
    """The target domain's tokenised sets: subsampled train (with prototype scores when given), dev and test."""

    train: datasets.Dataset
    dev: datasets.Dataset
    test: datasets.Dataset


def student_data(cfg: C.Config, splits: D.Splits, tokenizer: Any, target: str, rate: float, seed: int,
                 prototype_scores: Mapping[str, float] | None) -> StudentData:
    doms = splits.domains
    train = filter_domains(training_pool(cfg, splits, target, rate, seed), (target,), doms)
    tok = tokenize_splits(cfg, tokenizer, train=train, dev=filter_domains(splits["dev"], (target,), doms),
                          test=filter_domains(splits["test"], (target,), doms))
    return StudentData(train=with_prototype_scores(tok["train"], prototype_scores),
                       dev=with_prototype_scores(tok["dev"], None), test=with_prototype_scores(tok["test"], None))


# ----------------------------------------------------------------------------------------------------------
# The student
# ----------------------------------------------------------------------------------------------------------


def build_student(cfg: C.Config, encoder: nn.Module, tokenizer: Any, method: str, num_labels: int, num_domains: int,
                  teacher: TeacherSource | None, seed: int) -> M.Student:
    """The student of student ``method`` (``finetune``, ``tinybert_kd``, ``meta_kd``) from the pre-trained
    ``encoder`` (copied, never changed), shaped by its ``teacher`` source (None for ``finetune``). Its new layers
    are drawn from ``seed`` alone, whatever ran before in the process (a reused Tune actor)."""
    student_encoder = M.build_student(cfg.model, copy.deepcopy(encoder), tokenizer)
    meta = method == "meta_kd"
    if teacher is not None and method != "finetune":
        M.check_attention_compatible(encoder, student_encoder)
        layers = student_encoder.config.num_hidden_layers
        if layers != len(teacher.layer_map) - 1:
            raise ValueError(f"the student has {layers} layers but its teacher's layer map "
                             f"{list(teacher.layer_map)} is for {len(teacher.layer_map) - 1}; set "
                             "model.student.num_layers (or model.student.layers) to the student's depth")
        if meta and teacher.domain_hidden_size is None:
            raise ValueError("meta_kd needs a teacher with a domain head (kind 'meta')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return M.Student(student_encoder, num_labels,
                         teacher_hidden_size=teacher.hidden_size if teacher is not None else encoder.config.hidden_size,
                         teacher_domain_hidden_size=teacher.domain_hidden_size if meta and teacher is not None else None,
                         num_domains=num_domains if meta else None, pooling=cfg.model.pooling,
                         dropout=cfg.model.dropout)


@dataclass
class StudentRun:
    student: M.Student
    stages: list[StageResult]
    test_accuracy: dict[str, float]  # the target's test accuracy (and "mean", the same value)
    test_predictions: Predictions  # per test example, in the test loader's order


def train_student(cfg: C.Config, data: StudentData, student: M.Student, method: str, teacher: TeacherSource | None,
                  *, tokenizer: Any, domains: tuple[str, ...], seed: int,
                  checkpointer: Callable[[Stage], Checkpointer] | None = None,
                  checkpoint_dir: str | Path | None = None,
                  log: Callable[[dict], None] | None = None, runtime: Runtime = CPU_FP32) -> StudentRun:
    """Distil (or fine-tune) ``student`` on ``data.train``, keep its dev-best epoch, score it on ``data.test``.
    Each stage checkpoints every epoch, through ``checkpointer(stage)`` or to ``<checkpoint_dir>/<stage name>``,
    and a rerun resumes. The student is moved to ``runtime.device`` and trained and scored in its precision
    (the teacher source must give records on that device)."""
    collate = D.collator(tokenizer)
    student.to(runtime.device)
    stages = distill(student, method, teacher, loader(data.train, collate, cfg.distill.batch_size, seed, cfg.compute),
                     eval_loader(data.dev, collate), cfg.distill, domain_names=domains, seed=seed,
                     checkpoint_dir=checkpoint_dir, checkpointer=checkpointer, log=log, runtime=runtime)
    preds = predict(student, eval_loader(data.test, collate), student_logits, runtime=runtime)
    return StudentRun(student, stages, preds.accuracy_by_domain(domains), preds)

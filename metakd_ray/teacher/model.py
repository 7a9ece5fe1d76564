"""Teacher models and their training: prototype scores (method doc §1), one explicit PyTorch loop for every
teacher kind (§2).

Kinds: ``single`` (target domain only, plain CE), ``mix`` (all domains, plain CE), ``mtl`` (shared encoder, one
classifier per domain), ``meta`` (L_MT: prototype-score weighted CE plus the domain-corruption loss).
``train_teacher`` is the loop; the single-process path (``local.py``) runs it directly and the Ray Train job
(``teacher/job.py``) runs it unchanged in every worker with a distributed loader and a checkpointer that reports to
Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch import nn

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import logs, losses
from metakd_ray.cell import eval_loader, tokenize_splits, training_pool
from metakd_ray.config import ModelConfig, TeacherConfig
from metakd_ray.models import ClassifierTeacher, MetaTeacher, MTLTeacher
from metakd_ray.runtime import CPU_FP32, Runtime
from metakd_ray.training import (Checkpointer, StageConfig, StageResult, accuracy_by_domain, model_inputs,
                                 train_stage)

# ----------------------------------------------------------------------------------------------------------
# Prototype scores (method doc §1)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader: Iterable[dict], pooling: str = "mean", *,
                    runtime: Runtime = CPU_FP32, progress: str | None = None) -> torch.Tensor:
    """h(x) for every example of ``loader``: (n, d) float32 on the CPU, from a frozen encoder in eval mode (on
    ``runtime``'s device, in its precision). Rows are in dataset order when the loader's ``sampler`` is a list of
    row indices (``cell.eval_loader``, which runs rows longest first), else in loader order. ``progress``: a name
    to show the pass's progress under (``logs.StepProgress``)."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for batch in (logs.progress_iter(loader, progress) if progress else loader):
        batch = runtime.to_device(batch)
        with runtime.autocast():
            hidden = encoder(**model_inputs(batch)).last_hidden_state  # (b, t, d)
        out.append(losses.pooled_representation(hidden, batch["attention_mask"], pooling).cpu())
    encoder.train(was_training)
    feats = torch.cat(out)
    order = getattr(loader, "sampler", None)
    if isinstance(order, list):
        feats[torch.tensor(order)] = feats.clone()
    return feats


def compute_prototype_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    num_classes: int,
    tcfg: TeacherConfig,
    excluded_domain: int | None = None,
) -> torch.Tensor:
    """Prototype scores t (n,) for one training set: prototypes from the same set (per (domain, class) or per
    domain as ``teacher.prototypes`` says), then t_i with ``teacher.alpha``.

    ``excluded_domain`` (the no-in-domain-data variant): the rows of the other domains — the teacher's training
    rows — are scored against the other domains' prototypes only (K-1 domains), so nothing of the excluded domain
    reaches the teacher; the excluded domain's own rows (used only by its student, which has that data) are scored
    against all K."""
    protos = losses.class_prototypes(features, labels, domain_ids, num_domains, num_classes, mode=tcfg.prototypes)
    scores = losses.prototype_scores(features, labels, domain_ids, protos, alpha=tcfg.alpha, mode=tcfg.score_formula)
    if excluded_domain is None:
        return scores
    keep = domain_ids != excluded_domain
    kept_ids = domain_ids[keep] - (domain_ids[keep] > excluded_domain).long()  # renumber 0..K-2
    protos = losses.class_prototypes(features[keep], labels[keep], kept_ids, num_domains - 1, num_classes,
                                     mode=tcfg.prototypes)
    scores[keep] = losses.prototype_scores(features[keep], labels[keep], kept_ids, protos, alpha=tcfg.alpha,
                                           mode=tcfg.score_formula)
    return scores


def pool_prototype_scores(cfg: C.Config, splits: D.Splits, encoder: nn.Module, tokenizer: Any, kind: str,
                          target: str | None, rate: float, seed: int,
                          runtime: Runtime = CPU_FP32) -> tuple[list[str], torch.Tensor]:
    """(ids, prototype scores (n,)) of the training pool of (``target``, ``rate``, ``seed``), from the frozen
    pre-trained ``encoder``. With ``teacher.exclude_target`` (and a teacher kind other than ``single``), the
    target's prototypes are left out for the other domains' rows (see ``compute_prototype_scores``)."""
    pool = tokenize_splits(cfg, tokenizer, pool=training_pool(cfg, splits, target, rate, seed))["pool"]
    domains = splits.domains
    excluded = domains.index(target) if cfg.teacher.exclude_target and kind not in ("single", "none") and target \
        else None
    feats = pooled_features(encoder.to(runtime.device), eval_loader(pool, D.collator(tokenizer)), cfg.model.pooling,
                            runtime=runtime, progress="[teacher] prototype pass")
    labels = torch.tensor(D.column(pool, "label"))
    domain_ids = torch.tensor(D.column(pool, "domain_id"))
    scores = compute_prototype_scores(feats, labels, domain_ids, len(domains), splits.num_labels, cfg.teacher,
                                      excluded)
    return D.column(pool, "id"), scores


# ----------------------------------------------------------------------------------------------------------
# Models, per-kind losses, the loop
# ----------------------------------------------------------------------------------------------------------


def build_teacher(kind: str, encoder: nn.Module, num_labels: int, num_domains: int, mcfg: ModelConfig) -> nn.Module:
    """The teacher model for ``kind`` around ``encoder``."""
    if kind in ("single", "mix"):
        return ClassifierTeacher(encoder, num_labels, pooling=mcfg.pooling, dropout=mcfg.dropout)
    if kind == "mtl":
        return MTLTeacher(encoder, num_labels, num_domains, pooling=mcfg.pooling, dropout=mcfg.dropout)
    if kind == "meta":
        return MetaTeacher(encoder, num_labels, num_domains, pooling=mcfg.pooling, dropout=mcfg.dropout)
    raise ValueError(f"teacher kind {kind!r} is not allowed; expected one of single, mix, mtl, meta")


def teacher_forward(model: nn.Module, batch: dict):
    return model(**model_inputs(batch), domain_ids=batch["domain_ids"])


def teacher_loss(kind: str, model: nn.Module, batch: dict, tcfg: TeacherConfig, num_domains: int,
                 generator: torch.Generator | None = None) -> losses.LossTerms:
    """The training loss of one batch for a teacher ``kind``; named per-instance terms for logging."""
    out = teacher_forward(model, batch)
    if kind != "meta":
        ce = losses.hard_cross_entropy(out.logits, batch["labels"])
        return losses.LossTerms(total=ce.mean(), terms={"ce": ce.detach()})
    false_domains = losses.false_domain_labels(batch["domain_ids"], num_domains, generator=generator,
                                               mode=tcfg.false_domain)
    return losses.meta_teacher_loss(out.logits, batch["labels"], out.domain_logits, false_domains,
                                    batch["prototype_scores"], gamma1=tcfg.gamma1)


def teacher_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return teacher_forward(model, batch).logits


def teacher_stage(tcfg: TeacherConfig, kind: str) -> StageConfig:
    """The optimisation settings of a teacher run (``teacher.min_steps`` raises a small pool's epochs)."""
    return StageConfig(name=f"teacher-{kind}", epochs=tcfg.epochs, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                       warmup=tcfg.warmup, grad_norm=tcfg.grad_norm, min_steps=tcfg.min_steps)


def train_teacher(
    model: nn.Module,
    kind: str,
    train_loader: Iterable[dict],
    dev_loader: Iterable[dict],
    tcfg: TeacherConfig,
    *,
    num_domains: int,
    domain_names: tuple[str, ...],
    seed: int = 0,
    checkpointer: Checkpointer | None = None,
    log: Callable[[dict], None] | None = None,
    set_epoch: Callable[[int], None] | None = None,
    runtime: Runtime = CPU_FP32,
    on_step: Callable[[int, int, int], None] | None = None,
) -> StageResult:
    """Train a teacher of ``kind`` with the reference recipe (AdamW, linear warmup/decay, grad-norm clipping),
    keeping the epoch with the best mean dev accuracy over the dev loader's domains. Resumable through
    ``checkpointer``. Batches carry ``labels``, ``domain_ids`` and, for ``meta``, ``prototype_scores``."""
    if kind == "meta" and num_domains < 2:
        raise ValueError("teacher kind 'meta' needs at least 2 domains (the domain-corruption loss draws a false "
                         f"domain from the others); got {num_domains}")
    logs.quiet_driver()  # in a Ray Train worker, once Ray Train has set up its loggers (unless --verbose)
    return train_stage(
        model,
        lambda batch, gen: teacher_loss(kind, model, batch, tcfg, num_domains, gen),
        train_loader,
        teacher_stage(tcfg, kind),
        evaluate=lambda: accuracy_by_domain(model, dev_loader, domain_names, teacher_logits, runtime=runtime),
        seed=seed,
        checkpointer=checkpointer,
        log=log,
        set_epoch=set_epoch,
        extra_state={"teacher_config": dataclasses.asdict(tcfg), "kind": kind},
        runtime=runtime,
        on_step=on_step,
    )

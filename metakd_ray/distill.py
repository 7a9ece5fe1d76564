"""Distillation stage: a student for one target domain from a teacher's outputs (method doc §3–4).

Student methods:
- ``finetune``: no teacher; hard-label CE (stage-2 learning rate and epochs).
- ``tinybert_kd``: layer losses (embeddings, hidden states, attention scores) then soft CE; lambda = 1, no L_TKD.
  Works from any teacher kind.
- ``meta_kd``: the same with domain-expertise weights lambda_i and the transferable-knowledge loss
  (gamma2 * L_TKD); needs the meta-teacher (its h_d and the prototype scores).

``distill.stages: two`` (default, reference code): stage 1 = the layer objective, constant lr after warmup,
no dev selection; stage 2 = soft CE with linear warmup/decay, best epoch on the target domain's dev accuracy.
``stages: one``: the paper's single objective L_KD with stage-1 lr/epochs, linear schedule, best on dev.

The student step reads teacher outputs as a :class:`TeacherRecord` from a :class:`TeacherSource`: a live
teacher here (:class:`LiveTeacher`), or a precomputed cache (same record, read from storage), so the loop
does not change when the cache feeds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Protocol

import torch
from torch import Tensor, nn

from metakd_ray import losses
from metakd_ray.config import STUDENT_METHODS, DistillConfig
from metakd_ray.models import Student
from metakd_ray.runtime import CPU_FP32, Runtime
from metakd_ray.training import (Checkpointer, LocalCheckpointer, StageConfig, StageResult, accuracy_by_domain, model_inputs,
                                 train_stage)



@dataclass(frozen=True)
class TeacherRecord:
    """What the student needs from the teacher for one batch (shapes: b batch, t tokens, dt teacher width,
    h heads, c classes; M student layers, g the layer map)."""

    logits: Tensor  # (b, c)
    hidden_states: tuple[Tensor, ...]  # M+1 of (b, t, dt): teacher hidden_states[g(m)], m = 0..M (0 = embeddings)
    attention_scores: tuple[Tensor, ...]  # M of (b, h, t, t): pre-softmax scores of teacher layer g(m), m = 1..M
    domain_hidden: Tensor | None = None  # (b, dt) h_d^T(x), meta teacher only
    prototype_scores: Tensor | None = None  # (b,) t_i, meta_kd only


class TeacherSource(Protocol):
    """Gives the teacher's record for a collated batch (``needs_layers=False``: logits and h_d only).

    ``kind``: ``"live"`` or ``"cache"``; ``layer_map``: g; ``hidden_size``: the teacher's width dt;
    ``domain_hidden_size``: the width of its h_d (None without a domain head) — what a student is shaped by."""

    kind: str
    layer_map: tuple[int, ...]
    hidden_size: int
    domain_hidden_size: int | None

    def __call__(self, batch: dict, needs_layers: bool = True) -> TeacherRecord: ...


class LiveTeacher:
    """Runs the teacher on each batch, in eval mode (``dropout=True`` keeps its dropout on, as the reference
    code does), without gradients; keeps only the layers ``layer_map`` selects."""

    kind = "live"

    def __init__(self, teacher: nn.Module, layer_map: tuple[int, ...], dropout: bool = False):
        self.teacher, self.layer_map, self.dropout = teacher, tuple(layer_map), dropout
        self.hidden_size = teacher.encoder.config.hidden_size
        self.domain_hidden_size = teacher.domain_hidden_size

    @torch.no_grad()
    def __call__(self, batch: dict, needs_layers: bool = True) -> TeacherRecord:
        self.teacher.train(self.dropout)
        out = self.teacher(**model_inputs(batch), domain_ids=batch["domain_ids"],
                           with_attention_scores=needs_layers)
        hidden: tuple[Tensor, ...] = ()
        scores: tuple[Tensor, ...] = ()
        if needs_layers:
            hidden = tuple(out.encoder.hidden_states[g] for g in self.layer_map)
            scores = tuple(out.encoder.attention_scores[g - 1] for g in self.layer_map[1:])
        return TeacherRecord(out.logits, hidden, scores, out.domain_hidden, batch.get("prototype_scores"))


Objective = Literal["hard_ce", "layers", "soft_ce", "kd"]


@dataclass(frozen=True)
class Stage:
    """One stage of a student method: its ``name`` (the checkpoint directory and the ``stage`` of every logged
    metric), the objective it minimises, its optimisation settings and whether it keeps its dev-best epoch.

    Objectives: ``hard_ce`` (fine-tuning on labels), ``layers`` (stage 1: embedding, hidden and attention losses,
    plus L_TKD for meta_kd), ``soft_ce`` (stage 2: soft cross-entropy against the teacher's logits), ``kd`` (the
    paper's single objective L_KD: the layer losses plus soft CE)."""

    name: str
    objective: Objective
    config: StageConfig
    select_on_dev: bool


def student_loss(method: str, objective: Objective, student: Student, batch: dict, teacher: TeacherSource | None,
                 dcfg: DistillConfig) -> losses.LossTerms:
    """The loss of one batch of ``method`` (a student method) under ``objective`` (see :class:`Stage`)."""
    labels, mask = batch["labels"], batch["attention_mask"]
    if objective == "hard_ce":
        out = student(**model_inputs(batch), domain_ids=batch["domain_ids"])
        ce = losses.hard_cross_entropy(out.logits, labels)
        return losses.LossTerms(total=ce.mean(), terms={"ce": ce.detach()})
    if teacher is None:
        raise ValueError(f"student method {method!r} needs a teacher")
    needs_layers = objective in ("layers", "kd")
    rec = teacher(batch, needs_layers=needs_layers)
    out = student(**model_inputs(batch), domain_ids=batch["domain_ids"], with_attention_scores=needs_layers)
    if objective == "soft_ce":  # stage 2 of the reference code: soft CE, unweighted
        return losses.stage2_objective(out.logits, rec.logits, temperature=dcfg.temperature,
                                       scale_by_t2=dcfg.scale_by_t2)
    meta = method == "meta_kd"
    if meta and (rec.domain_hidden is None or rec.prototype_scores is None):
        raise ValueError("meta_kd needs the meta-teacher's domain head output and prototype scores; "
                         "pair meta_kd with teacher kind 'meta'")
    weights = (losses.expertise_weights(rec.logits, labels, rec.prototype_scores)
               if meta and dcfg.expertise_weights else None)
    layer_args = dict(
        student_hidden_states=[student.project_hidden(h) for h in out.encoder.hidden_states],
        teacher_hidden_states=rec.hidden_states,
        student_attention_scores=out.encoder.attention_scores,
        teacher_attention_scores=rec.attention_scores,
        attention_mask=mask,
        student_domain_hidden=student.project_domain(out.domain_hidden) if meta else None,
        teacher_domain_hidden=rec.domain_hidden if meta else None,
        weights=weights,
        gamma2=dcfg.gamma2,
        include_padding=dcfg.include_padding,
    )
    if objective == "layers":
        return losses.stage1_objective(**layer_args)
    return losses.single_stage_objective(**layer_args, student_logits=out.logits, teacher_logits=rec.logits,
                                         temperature=dcfg.temperature, scale_by_t2=dcfg.scale_by_t2)


def stage_plan(method: str, dcfg: DistillConfig) -> list[Stage]:
    """The stages ``method`` runs, in order (``distill.stages``; stage 1 is skipped when ``stage1_epochs`` is 0)."""
    if method not in STUDENT_METHODS:
        raise ValueError(f"student method {method!r} is not allowed; expected one of {', '.join(STUDENT_METHODS)}")
    common = dict(weight_decay=dcfg.weight_decay, grad_norm=dcfg.grad_norm, warmup=dcfg.warmup,
                  min_steps=dcfg.min_steps)
    if method == "finetune":
        return [Stage("finetune", "hard_ce", StageConfig("finetune", dcfg.stage2_epochs, dcfg.stage2_lr, **common),
                      True)]
    if dcfg.stages == "one":
        return [Stage("one", "kd", StageConfig("one", dcfg.stage1_epochs, dcfg.stage1_lr, **common), True)]
    plan = []
    if dcfg.stage1_epochs > 0:  # constant lr, no warmup, no dev selection (reference code)
        plan.append(Stage("stage1", "layers", StageConfig("stage1", dcfg.stage1_epochs, dcfg.stage1_lr,
                                                          schedule="constant", **{**common, "warmup": 0.0}), False))
    return plan + [Stage("stage2", "soft_ce", StageConfig("stage2", dcfg.stage2_epochs, dcfg.stage2_lr, **common),
                         True)]


def student_logits(model: nn.Module, batch: dict) -> Tensor:
    return model(**model_inputs(batch), domain_ids=batch["domain_ids"]).logits


def distill(
    student: Student,
    method: str,
    teacher: TeacherSource | None,
    train_loader: Iterable[dict],
    dev_loader: Iterable[dict],
    dcfg: DistillConfig,
    *,
    domain_names: tuple[str, ...],
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpointer: Callable[[Stage], Checkpointer] | None = None,
    log: Callable[[dict], None] | None = None,
    runtime: Runtime = CPU_FP32,
) -> list[StageResult]:
    """Distil (or fine-tune) ``student`` on the target domain's ``train_loader``; stages as ``dcfg.stages`` says.
    The final stage keeps the epoch with the best accuracy on ``dev_loader`` (the target domain's dev split).
    Each stage checkpoints every epoch and a rerun resumes: to ``<checkpoint_dir>/<stage>``, or through
    ``checkpointer(stage)`` (a sweep trial keeps its own state and reports to Tune)."""
    if checkpointer is None and checkpoint_dir is not None:
        checkpointer = lambda stage: LocalCheckpointer(Path(checkpoint_dir) / stage.name)  # noqa: E731
    if method != "finetune" and teacher is None:
        raise ValueError(f"student method {method!r} needs a teacher")
    results = []
    for stage in stage_plan(method, dcfg):
        results.append(train_stage(
            student,
            lambda batch, _gen, obj=stage.objective: student_loss(method, obj, student, batch, teacher, dcfg),
            train_loader,
            stage.config,
            evaluate=((lambda: accuracy_by_domain(student, dev_loader, domain_names, student_logits,
                                                  runtime=runtime))
                      if stage.select_on_dev else None),
            seed=seed,
            checkpointer=checkpointer(stage) if checkpointer else None,
            log=log,
            extra_state={"distill_config": dataclasses.asdict(dcfg), "method": method},
            runtime=runtime,
        ))
    return results

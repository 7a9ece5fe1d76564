"""The one training loop every stage runs (teacher, distillation stage 1, stage 2), plus its pieces:
optimiser and schedule, seeding, full-state checkpoints and per-domain accuracy.

A stage is: a model, a loss function of one batch (returning named per-instance terms), a number of epochs,
an lr schedule and, optionally, an evaluation whose ``mean`` selects the best epoch. The loop is plain PyTorch
and single-process; the Ray Train stage calls it unchanged with a distributed loader and a checkpointer that
reports to Ray.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Protocol

import numpy as np
import torch
from torch import nn

from metakd_ray.losses import LossTerms
from metakd_ray.runtime import CPU_FP32, Runtime, release_memory

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Steps between handing freed heap memory back to the OS (``runtime.release_memory``; ~ms each).
TRIM_EVERY = 16


def model_inputs(batch: dict) -> dict:
    """The encoder's inputs from a collated batch (``token_type_ids`` only when the tokenizer gives them)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as plain types and tensors (numpy's key array as an int64 tensor), so that a checkpoint
    holding it loads with ``torch.load(..., weights_only=True)`` (:func:`load_state`)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


class CheckpointError(ValueError):
    """A saved training state cannot be read (damaged, or not one this project wrote). One line."""


def load_state(source: str | os.PathLike | bytes, what: str) -> dict:
    """A training state written by ``torch.save`` (a checkpoint, a trial's progress), loaded with
    ``weights_only=True``: tensors, numbers, strings and containers only, never arbitrary pickled objects.
    ``what`` names the file in the error (:class:`CheckpointError`) when it cannot be read."""
    import io
    import pickle

    try:
        f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what}: cannot be read as a training state ({first[:200]}); delete it to start "
                              "that stage over") from None


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup: float,
                   schedule: Literal["linear", "constant"] = "linear"):
    """AdamW (no decay on biases and LayerNorm weights); ``linear`` = warmup then linear decay to 0,
    ``constant`` = warmup then constant (the reference code's distillation stage 1)."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warm = int(warmup * total_steps)
    if schedule == "constant":
        sched = get_constant_schedule_with_warmup(opt, warm)
    else:
        sched = get_linear_schedule_with_warmup(opt, warm, max(total_steps, 1))
    return opt, sched


@dataclass(frozen=True)
class Predictions:
    """Per-example outputs of a model on a loader, in the loader's order. Shapes: ``[N]`` for ``ids`` (strings),
    ``labels``, ``preds``, ``domain_ids``; ``probs`` ``[N, C]`` float32 (softmax computed in fp32)."""

    ids: list[str]
    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    domain_ids: np.ndarray

    def accuracy_by_domain(self, domain_names: tuple[str, ...]) -> dict[str, float]:
        """Accuracy per domain present (keyed by name) and their unweighted ``mean``."""
        hits = self.preds == self.labels
        acc = {domain_names[d]: float(hits[self.domain_ids == d].mean()) for d in sorted(set(self.domain_ids.tolist()))}
        acc["mean"] = float(np.mean(list(acc.values()))) if acc else float("nan")
        return acc


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[dict], logits_fn: Callable[[nn.Module, dict], torch.Tensor], *,
            runtime: Runtime = CPU_FP32) -> Predictions:
    """Forward passes over ``loader`` on ``runtime``'s device and in its precision (``model`` must be on that
    device); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    ids: list[str] = []
    labels, probs, domains = [], [], []
    for batch in loader:
        with runtime.autocast():
            logits = logits_fn(model, runtime.to_device(batch))
        probs.append(logits.float().softmax(-1).cpu())
        labels.append(batch["labels"].cpu())
        domains.append(batch["domain_ids"].cpu())
        ids.extend(str(i) for i in batch.get("ids", [""] * len(batch["labels"])))
    model.train(was_training)
    p = torch.cat(probs).numpy().astype(np.float32) if probs else np.zeros((0, 0), np.float32)
    return Predictions(ids=ids, labels=torch.cat(labels).numpy().astype(np.int64) if labels else np.zeros(0, np.int64),
                       preds=p.argmax(-1).astype(np.int64) if len(p) else np.zeros(0, np.int64), probs=p,
                       domain_ids=torch.cat(domains).numpy().astype(np.int64) if domains else np.zeros(0, np.int64))


def accuracy_by_domain(model: nn.Module, loader: Iterable[dict], domain_names: tuple[str, ...],
                       logits_fn: Callable[[nn.Module, dict], torch.Tensor], *,
                       runtime: Runtime = CPU_FP32) -> dict[str, float]:
    """Accuracy per domain present in ``loader`` (keyed by name) and their unweighted ``mean``; forward passes on
    ``runtime``'s device and in its precision (``model`` must be on that device)."""
    return predict(model, loader, logits_fn, runtime=runtime).accuracy_by_domain(domain_names)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


class Checkpointer(Protocol):
    """Where a stage's full state goes after every epoch, and comes back from on resume. A checkpointer with an
    ``every_s`` attribute > 0 gets a state after an epoch only when that many seconds have passed since the last one
    (and always after the stage's last epoch), and the other epochs' metrics through its ``skipped(metrics)`` if it
    has one: many short epochs (a small split under ``distill.min_steps``) do not each write the full state; a
    resume repeats at most ``every_s`` of training, exactly."""

    def load(self) -> dict | None: ...

    def save(self, state: dict, metrics: dict) -> None: ...


@dataclass
class LocalCheckpointer:
    """Full state in ``<directory>/last.pt`` (written to a temp file, then atomically renamed) and one JSON line of
    metrics per epoch in ``<directory>/metrics.jsonl``."""

    directory: Path

    def load(self) -> dict | None:
        p = Path(self.directory) / "last.pt"
        return load_state(p, str(p)) if p.exists() else None

    def save(self, state: dict, metrics: dict) -> None:
        d = Path(self.directory)
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".pt.tmp")
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, d / "last.pt")
        with open(d / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")


def atomic_export(export: Callable[[Path], None], target: Path) -> Path:
    """Run ``export(tmp_dir)`` then move the result to ``target``, replacing an older export only when the new
    one is complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        export(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """One stage's optimisation settings."""

    name: str
    epochs: int
    lr: float
    weight_decay: float = 0.01
    warmup: float = 0.1
    grad_norm: float = 1.0
    schedule: Literal["linear", "constant"] = "linear"
    min_steps: int = 0  # at least this many optimisation steps: epochs raised when an epoch has fewer batches

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The epochs this stage runs with ``steps_per_epoch`` batches per epoch: ``epochs``, raised to
        ceil(min_steps / steps_per_epoch) when that is more."""
        return max(self.epochs, -(-self.min_steps // max(int(steps_per_epoch), 1)))


@dataclass
class StageResult:
    best_dev: float  # NaN when the stage does no dev selection
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def train_stage(
    model: nn.Module,
    loss_fn: Callable[[dict, torch.Generator], LossTerms],
    train_loader: Iterable[dict],
    stage: StageConfig,
    *,
    evaluate: Callable[[], dict[str, float]] | None = None,
    seed: int = 0,
    checkpointer: Checkpointer | None = None,
    log: Callable[[dict], None] | None = None,
    set_epoch: Callable[[int], None] | None = None,
    extra_state: dict | None = None,
    runtime: Runtime = CPU_FP32,
    on_step: Callable[[int, int, int], None] | None = None,
) -> StageResult:
    """Train ``model`` for one stage.

    Every epoch (``stage.epochs_for(len(train_loader))`` of them): one pass of ``loss_fn`` over ``train_loader`` (AdamW, schedule, grad-norm clipping), then
    ``evaluate()`` if given; the epoch with the best ``mean`` is kept and its weights are loaded at the end
    (without ``evaluate`` the last epoch is kept). After every epoch (see :class:`Checkpointer` for ``every_s``)
    the full state (model, optimiser,
    scheduler, epoch, step, RNG states, best weights, history, ``extra_state``) goes to ``checkpointer``; a
    checkpoint found at the start resumes from the epoch after it; one marked ``complete`` (the summary kept for a
    finished stage whose weights a later stage carries on) returns at once. ``set_epoch`` lets a distributed
    sampler reshuffle per epoch. ``loss_fn(batch, generator)`` gets a seeded generator for its own sampling.
    ``on_step(epoch, step_in_epoch, steps_per_epoch)`` after every optimisation step (progress displays).
    """
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = 1
    epochs = stage.epochs_for(steps_per_epoch)
    opt, sched = make_optimizer(model, stage.lr, stage.weight_decay, epochs * steps_per_epoch, stage.warmup,
                                stage.schedule)
    if set_epoch is None:
        set_epoch = getattr(getattr(train_loader, "sampler", None), "set_epoch", None)
    scaler = runtime.scaler()
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start, step, history = 0, 0, []
    best_dev, best_epoch, best_state = float("-inf"), -1, None
    state = checkpointer.load() if checkpointer else None
    if state is not None and state.get("complete"):  # a finished stage whose weights a later stage carries on
        return StageResult(best_dev=state["best_dev"] if evaluate is not None else float("nan"),
                           best_epoch=state["best_epoch"], history=state["history"])
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, step, history = state["epoch"] + 1, state["step"], state["history"]
        best_dev, best_epoch, best_state = state["best_dev"], state["best_epoch"], state["best_state"]
        gen.set_state(state["generator"])
        set_rng_state(state["rng"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    model.train()
    every_s = float(getattr(checkpointer, "every_s", 0.0) or 0.0)
    saved_at = time.monotonic()
    for epoch in range(start, epochs):
        if set_epoch:
            set_epoch(epoch)
        sums: dict[str, Any] = {}
        batches = 0
        for batch in train_loader:
            with runtime.autocast():
                terms = loss_fn(runtime.to_device(batch), gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            batches += 1
            if batches % TRIM_EVERY == 0:
                release_memory()
            if on_step is not None:
                on_step(epoch, batches, steps_per_epoch)
            # summed on the device: no host sync per step
            sums["loss"] = sums.get("loss", 0.0) + terms.total.detach().float()
            for name, value in terms.terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float().mean()
        metrics: dict = {"stage": stage.name, "epoch": epoch, "step": step,
                         **{f"train_{k}": float(v) / max(batches, 1) for k, v in sums.items()}}
        if evaluate is not None:
            dev = evaluate()
            metrics.update({f"dev_acc_{k}": v for k, v in dev.items()})
            if dev["mean"] > best_dev:
                best_dev, best_epoch = dev["mean"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(metrics)
        release_memory()  # the epoch's freed activations back to the OS
        if log:
            log(metrics)
        if checkpointer and epoch < epochs - 1 and time.monotonic() - saved_at < every_s:
            if (skipped := getattr(checkpointer, "skipped", None)) is not None:
                skipped(metrics)
        elif checkpointer:
            saved_at = time.monotonic()
            checkpointer.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "epoch": epoch, "step": step, "history": history,
                               "best_dev": best_dev, "best_epoch": best_epoch, "best_state": best_state,
                               "generator": gen.get_state(), "rng": rng_state(), "scaler": scaler.state_dict(),
                               "precision": runtime.precision, **(extra_state or {})},
                              metrics)
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
    model.eval()
    return StageResult(best_dev=best_dev if evaluate is not None else float("nan"), best_epoch=best_epoch,
                       history=history)

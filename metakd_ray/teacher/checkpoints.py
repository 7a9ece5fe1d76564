"""A teacher's training checkpoints in a Ray Train run: where they are (``teachers/<key>/train/checkpoint_epoch=NNNN/
state.pt``), the newest one, and ``RayCheckpointer``, the ``Checkpointer`` a Ray Train worker gives
``teacher.model.train_teacher`` (it saves through ``ray.train.report`` and resumes from ``ray.train.get_checkpoint``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import ray.train
import torch
from ray.train import Checkpoint

from metakd_ray.storage import Storage
from metakd_ray.teacher.artefact import TEACHERS
from metakd_ray.training import load_state

RUN_NAME = "train"  # the Ray Train run: teachers/<key>/train/ (same name and path = resume)
STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "checkpoint_epoch="
DDP_PREFIX = "module."


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def latest_stored_state(storage: Storage, key: str) -> dict | None:
    """The full training state in the newest ``teachers/<key>/train/checkpoint_epoch=NNNN/state.pt``, or None."""
    names = [n for n in storage.listdir(TEACHERS, key, RUN_NAME)
             if n.startswith(CHECKPOINT_PREFIX) and storage.is_file(TEACHERS, key, RUN_NAME, n, STATE_FILE)]
    if not names:
        return None
    raw = storage.read_bytes(TEACHERS, key, RUN_NAME, max(names), STATE_FILE)
    return load_state(raw, storage.uri(TEACHERS, key, RUN_NAME, max(names), STATE_FILE))


def _rekey(state: dict, fn: Callable[[str], str]) -> dict:
    """``state`` with the keys of its model and best-weights state dicts mapped by ``fn``."""
    out = dict(state)
    for field in ("model", "best_state"):
        if out.get(field) is not None:
            out[field] = {fn(k): v for k, v in out[field].items()}
    return out


class RayCheckpointer:
    """The ``Checkpointer`` of a Ray Train worker.

    ``save``: rank 0 writes the full state to ``state.pt`` in a temporary directory and every rank calls
    ``ray.train.report(metrics, checkpoint=...)`` (a barrier; V2 keeps metrics only when they come with a
    checkpoint), which Ray persists as ``teachers/<key>/train/checkpoint_epoch=NNNN``. Weights are stored with the
    unwrapped module's keys (no DDP ``module.`` prefix), so a run resumes, and exports, at any worker count.
    In local mode (``train_workers=0``) Ray persists nothing, so rank 0 writes the same directory to storage itself
    and reports that persistent directory.

    ``load``: ``ray.train.get_checkpoint()`` (a resumed or retried run), else the newest stored checkpoint (local
    mode, where Ray keeps nothing between runs; or a Ray run continuing a local-mode one).
    """

    def __init__(self, storage: Storage, key: str, *, ddp: bool, local_mode: bool):
        self.storage, self.key, self.ddp, self.local_mode = storage, key, ddp, local_mode
        self.start_epoch = 0  # the first epoch this run trains

    def load(self) -> dict | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = load_state(os.path.join(d, STATE_FILE), f"teacher {self.key}'s checkpoint")
        else:
            state = latest_stored_state(self.storage, self.key)
        if state is None:
            return None
        self.start_epoch = state["epoch"] + 1
        return _rekey(state, lambda k: DDP_PREFIX + k) if self.ddp else state

    def save(self, state: dict, metrics: dict) -> None:
        if self.ddp:
            state = _rekey(state, lambda k: k.removeprefix(DDP_PREFIX))
        name = checkpoint_name(state["epoch"])
        with tempfile.TemporaryDirectory(prefix="metakd-ckpt-") as tmp:
            if self.local_mode:
                torch.save(state, os.path.join(tmp, STATE_FILE))
                self.storage.upload_dir(tmp, TEACHERS, self.key, RUN_NAME, name)
                for old in self.storage.listdir(TEACHERS, self.key, RUN_NAME):
                    if old.startswith(CHECKPOINT_PREFIX) and old < name:
                        self.storage.delete(TEACHERS, self.key, RUN_NAME, old)
                kept = Checkpoint(self.storage.path(TEACHERS, self.key, RUN_NAME, name), filesystem=self.storage.fs)
                ray.train.report(metrics, checkpoint=kept)
                return
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(state, os.path.join(tmp, STATE_FILE))
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

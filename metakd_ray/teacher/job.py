"""The Ray Train job that makes one teacher artefact (``ensure_teacher``): prototype scores on the driver, a Ray
Train ``TorchTrainer`` whose workers run ``teacher.model.train_teacher`` unchanged, then export of the dev-best
weights and the manifest (layout in ``teacher/artefact.py``). Imports ``ray.train`` (~4 s): import it only to make
teachers; everything that reads them is in ``teacher/artefact.py``.

Data path: every worker loads the splits itself (``inputs(cfg)``: the data root comes from ``data.root`` or
``$METAKD_DATA``, so every node reads the same files), tokenises, attaches the stored prototype scores by id and
reads them through a map-style ``DataLoader`` with our ``data.batching.EpochSampler`` (not Ray Data shards: a
teacher's training set is small and map-style, and the loop stays the single-process one). The sampler gives exact
epochs ordered by (``spec.seed``, epoch), grouped by length per ``compute.group_by_length``, dealt out by stride as
``DistributedSampler`` does, with a per-worker batch of ``teacher.batch_size / workers``: the global batches are
then the same rows for 1 or N workers, and DDP's gradient average over N equal shards equals the full batch's
mean-loss gradient (up to float summation order). ``prepare_data_loader`` is not used: it would replace any sampler
that is not a ``DistributedSampler``; ``train_stage`` moves each batch to the worker's device
(``ray.train.torch.get_device``) and runs it in the precision the driver resolved (``spec.precision``).
"""

from __future__ import annotations

import sys
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn
from torch.utils.data import DataLoader

from metakd_ray import cell, logs
from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.data.batching import EpochSampler, lengths_of
from metakd_ray.locks import teacher_lock
from metakd_ray.runtime import runtime_for
from metakd_ray.storage import Storage
from metakd_ray.teacher.artefact import (
    MANIFEST,
    MODEL_DIR,
    PROTOTYPE_FILE,
    TEACHERS,
    TeacherArtefact,
    TeacherSpec,
    check_worker_split,
    finished_teacher,
    model_location,
    prototype_parts,
    read_prototype_scores,
    teacher_fingerprint,
    teacher_identity,
    write_prototype_scores,
)
from metakd_ray.teacher.checkpoints import RUN_NAME, STATE_FILE, RayCheckpointer, latest_stored_state
from metakd_ray.teacher.model import build_teacher, pool_prototype_scores, teacher_logits, teacher_stage, train_teacher
from metakd_ray.tracking import teacher_tracking
from metakd_ray.training import accuracy_by_domain, load_state, set_seed


@dataclass
class TeacherInputs:
    """What a teacher is made from: the splits, a fresh pre-trained encoder (trained in place), its tokenizer."""

    splits: D.Splits
    encoder: nn.Module
    tokenizer: Any


def load_inputs(cfg: C.Config) -> TeacherInputs:
    """The production inputs: splits from the data root, encoder and tokenizer from ``model.teacher``."""
    splits = D.load_splits(cfg.data)
    encoder, tokenizer = M.load_encoder(cfg.model.teacher, dropout=cfg.model.dropout)
    M.check_max_length(encoder, cfg.data.max_length)
    return TeacherInputs(splits, encoder, tokenizer)


# ----------------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> dict:
    """One Ray Train worker: build data and model, then ``train_teacher`` with a ``RayCheckpointer``.

    All ranks share ``spec.seed``: the model's heads start identical (DDP also broadcasts rank 0's weights), and the
    RNG draws (dropout, false domains) repeat across ranks on different rows; this keeps resume exact at any worker
    count, since the checkpoint holds rank 0's RNG state and every rank restores it. Every rank evaluates the
    whole dev set (small) so all ranks agree on the best epoch without a collective. ``train_*`` metrics are rank
    0's mean over its shard.
    """
    cfg, spec, storage = config["cfg"], config["spec"], config["storage"]
    hook: Callable[[dict], None] | None = config.get("epoch_hook")
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    inputs: TeacherInputs = config["inputs"](cfg)
    splits = inputs.splits
    train, dev = cell.teacher_sets(cfg, splits, inputs.tokenizer, spec.domains, spec.target, spec.rate, spec.seed,
                                   read_prototype_scores(storage, *prototype_parts(spec.key)))
    collate = D.collator(inputs.tokenizer)
    sampler = EpochSampler(lengths_of(train), cfg.teacher.batch_size, seed=spec.seed,
                           group_by_length=cfg.compute.group_by_length, window=cfg.compute.length_window,
                           num_replicas=world, rank=rank)
    # the batches stay on the CPU here: train_stage moves them to the worker's device (runtime below)
    train_loader = DataLoader(train, batch_size=cfg.teacher.batch_size // world, sampler=sampler, collate_fn=collate)
    dev_loader = cell.eval_loader(dev, collate)
    # the precision the driver resolved; "auto" (a driver that could not tell) resolves on this worker's device
    runtime = runtime_for(spec.precision, ray.train.torch.get_device())
    set_seed(spec.seed)
    model = build_teacher(spec.kind, inputs.encoder, splits.num_labels, len(splits.domains), cfg.model)
    # The encoder's buffers (position and token-type ids) are constants: synced once at DDP init, not every forward.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    checkpointer = RayCheckpointer(storage, spec.key, ddp=world > 1, local_mode=config["local_mode"])
    tracker = config["tracking"].open() if rank == 0 else None  # storage.tracking; ends with the last epoch's log
    epochs = teacher_stage(cfg.teacher, spec.kind).epochs_for(len(train_loader))  # teacher.min_steps raises them
    progress = logs.StepProgress(f"[teacher] {spec.key}", epochs, len(train_loader), stream=sys.stdout) if rank == 0 \
        else None

    def log(metrics: dict) -> None:
        if rank == 0:
            print(logs.epoch_line(f"[teacher] {spec.key}", metrics, epochs), flush=True)
            tracker.log(metrics)
        if hook is not None:
            hook(metrics)

    result = train_teacher(model, spec.kind, train_loader, dev_loader, cfg.teacher, num_domains=len(splits.domains),
                           domain_names=splits.domains, seed=spec.seed, checkpointer=checkpointer, log=log,
                           set_epoch=sampler.set_epoch, runtime=runtime,
                           on_step=progress.update if progress is not None else None)
    if progress is not None:
        progress.close()
    return {"start_epoch": checkpointer.start_epoch, "best_dev": result.best_dev, "best_epoch": result.best_epoch,
            "world_size": world, "n_train": len(train), "n_dev": len(dev), "device": runtime.device.type,
            "precision": runtime.precision}


# ----------------------------------------------------------------------------------------------------------
# The driver: fit, export, manifest
# ----------------------------------------------------------------------------------------------------------


def fit_off_main_thread(trainer: TorchTrainer):
    """``trainer.fit()`` in a helper thread. From the main thread, Ray Train V2 installs a SIGINT handler that stays
    installed after ``fit()`` returns and swallows every later Ctrl-C of the sweep (ray guide); from another thread
    it installs none (as under Tune). The main thread waits in short joins, so Ctrl-C and SIGTERM reach it as
    ``KeyboardInterrupt`` at once; the run's actors end with the driver, and its last checkpoint is where a rerun
    resumes."""
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            out["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in out:
        raise out["error"]
    return out["result"]


def fit(cfg: C.Config, spec: TeacherSpec, storage: Storage, inputs: Callable[[C.Config], TeacherInputs], *,
        epoch_hook: Callable[[dict], None] | None = None, max_failures: int = 1) -> tuple[dict, dict]:
    """Run (or resume) the Ray Train run of ``spec``; return (the final checkpoint's full state, rank 0's return
    value). Resuming is running again with the same run name and storage path."""
    # Train's print patch tees output that libraries capture (datasets' function hashing runs dis.dis into a
    # captured stdout) into the worker logs; plain prints are forwarded to the driver anyway.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    r = cfg.ray
    resources = r.requests("teacher")  # {"CPU": cpus_per_worker, "GPU": 1 with use_gpu, **teacher_resources}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "spec": spec, "storage": storage, "inputs": inputs, "epoch_hook": epoch_hook,
                           "local_mode": r.train_workers == 0, "tracking": teacher_tracking(cfg, spec, storage)},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.train_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage.path(TEACHERS, spec.key),
                             storage_filesystem=storage.fs, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=max_failures),
                             logging_config=LoggingConfig(log_level=logs.ray_log_level())),  # --verbose: INFO
    )
    result = fit_off_main_thread(trainer)
    state = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE), f"teacher {spec.key}'s checkpoint")
    else:  # local mode after a run that had nothing left to train: no report, no Result.checkpoint
        state = latest_stored_state(storage, spec.key)
    if state is None:
        raise RuntimeError(f"teacher {spec.key}: training finished without a checkpoint")
    return state, result.return_value or {}


def ensure_teacher(cfg: C.Config, spec: TeacherSpec, storage: Storage, *,
                   inputs: Callable[[C.Config], TeacherInputs] | None = None,
                   log: Callable[[dict], None] | None = None, epoch_hook: Callable[[dict], None] | None = None,
                   max_failures: int | None = None, keep_checkpoints: bool = False) -> TeacherArtefact:
    """Make the teacher of ``spec`` under ``teachers/<spec.key>/`` unless its manifest exists (then nothing runs).

    Steps, each reused when its output exists: prototype scores, the Ray Train run (resumes from its latest
    checkpoint; ``cfg.ray.train_workers`` workers, 0 = in this process), export of the dev-best weights, config.yaml,
    and manifest.json last. Then the run's checkpoints are deleted unless ``keep_checkpoints``.

    Prototype scores are computed on the driver, over the whole training pool (every domain's subsampled training
    rows, as ``local.py`` does, so a student of any target finds its rows' scores there): one inference pass of the
    frozen encoder over a few thousand rows is cheap and needs no Ray Data job; the teacher-output cache, which
    runs the trained teachers over every student's data, is where Ray Data pays off.

    ``inputs(cfg)`` gives the splits, a freshly loaded pre-trained encoder and its tokenizer, on the driver and in
    every worker (default: ``load_inputs``, from the config; tests pass a tiny picklable factory).
    ``log`` gets driver-side progress events; ``epoch_hook`` runs in every worker with each epoch's metrics
    before that epoch's checkpoint is saved (tests inject failures with it). A Ray run that fails is retried
    ``max_failures`` (default ``cfg.ray.train_max_failures``) times from its latest checkpoint, then
    ``ray.train.TrainingFailedError`` is raised.
    With ``train_workers >= 1`` and no Ray yet, it connects with ``raycluster.connect_ray(cfg)``.
    """
    done = finished_teacher(storage, spec.key)
    if done is not None:
        return done
    # One builder per teacher: a driver building it holds the lock; wait, then use what it exported.
    lock = teacher_lock(storage, spec.key).acquire(
        wait=True, say=lambda m: (log or (lambda e: None))({"teacher": spec.key, "event": "waiting", "message": m}))
    try:
        done = finished_teacher(storage, spec.key)
        if done is not None:
            return done
        return make_teacher(cfg, spec, storage, inputs=inputs or load_inputs, log=log, epoch_hook=epoch_hook,
                            max_failures=cfg.ray.train_max_failures if max_failures is None else max_failures,
                            keep_checkpoints=keep_checkpoints)
    finally:
        lock.release()


def make_teacher(cfg: C.Config, spec: TeacherSpec, storage: Storage, *, inputs: Callable[[C.Config], TeacherInputs],
                 log: Callable[[dict], None] | None, epoch_hook: Callable[[dict], None] | None, max_failures: int,
                 keep_checkpoints: bool) -> TeacherArtefact:
    """``ensure_teacher`` without the manifest check (see there)."""
    say = log or (lambda event: None)
    check_worker_split(cfg)
    if cfg.ray.train_workers > 0 and not ray.is_initialized():
        from metakd_ray.raycluster import connect_ray

        connect_ray(cfg)  # else fit() would call a bare ray.init(), ignoring ray.address and ray.num_cpus
    t0 = time.time()
    driver = inputs(cfg)
    splits, domains = driver.splits, driver.splits.domains
    collate = D.collator(driver.tokenizer)

    # 1. Prototype scores, on the driver (see ensure_teacher).
    if not storage.is_file(*prototype_parts(spec.key)):
        # on the driver's CPU (or its GPU), in the precision resolved for it
        ids, scores = pool_prototype_scores(cfg, splits, driver.encoder, driver.tokenizer, spec.kind, spec.target,
                                            spec.rate, spec.seed, runtime_for(cfg.compute.precision))
        driver.encoder.cpu()
        write_prototype_scores(storage, spec.key, ids, scores)
        say({"teacher": spec.key, "event": "prototype_scores", "rows": len(ids)})
    t1 = time.time()

    # 2. Ray Train.
    say({"teacher": spec.key, "event": "train", "workers": cfg.ray.train_workers})
    state, ret = fit(cfg, spec, storage, inputs, epoch_hook=epoch_hook, max_failures=max_failures)
    t2 = time.time()

    # 3. Export the dev-best weights, with the teacher's test accuracy on its domains.
    model = build_teacher(spec.kind, driver.encoder, splits.num_labels, len(domains), cfg.model)
    model.load_state_dict(state["best_state"])
    model.eval()
    test = cell.filter_domains(cell.tokenize_splits(cfg, driver.tokenizer, test=splits["test"])["test"],
                               spec.domains, domains)
    here = runtime_for(cfg.compute.precision)  # the driver's device, the precision resolved for it
    model.to(here.device)
    test_acc = accuracy_by_domain(model, cell.eval_loader(test, collate), domains, teacher_logits, runtime=here)
    model.cpu()
    with tempfile.TemporaryDirectory(prefix="metakd-teacher-") as tmp:
        model.save_pretrained(tmp, driver.tokenizer)
        storage.upload_dir(tmp, TEACHERS, spec.key, MODEL_DIR)
    digest = teacher_fingerprint(model_location(storage, spec.key))["weights"]
    storage.write_bytes(C.to_yaml(cfg).encode(), TEACHERS, spec.key, "config.yaml")
    t3 = time.time()

    history = state["history"]
    workers = cfg.ray.train_workers
    reserved = workers * cfg.ray.cpus_per_worker if workers else 1.0
    manifest = {
        "key": spec.key, "spec": asdict(spec), "identity": teacher_identity(cfg, spec.kind, spec.domains, spec.target,
                                                                            spec.rate, spec.seed),
        "domains": list(domains), "label_names": list(splits.label_names), "model": MODEL_DIR,
        "prototype_scores": PROTOTYPE_FILE, "n_pool": len(read_prototype_scores(storage, *prototype_parts(spec.key))),
        "n_train": ret.get("n_train"), "n_dev": ret.get("n_dev"),
        "dev_accuracy": [h.get("dev_acc_mean") for h in history], "history": history,
        "best_dev": state["best_dev"], "best_epoch": state["best_epoch"], "test_accuracy": test_acc,
        "fingerprint": digest, "resumed_at_epoch": ret.get("start_epoch", 0),
        "ray": {"train_workers": workers, "cpus_per_worker": cfg.ray.cpus_per_worker, "use_gpu": cfg.ray.use_gpu},
        "compute": {"precision": ret.get("precision", spec.precision), "device": ret.get("device", "cpu"),
                    "group_by_length": cfg.compute.group_by_length},
        # Wall seconds of this call's steps (a resumed run counts only what it ran). CPU-seconds = wall x CPUs
        # reserved: train_workers x cpus_per_worker for the Ray run (1 in local mode); 1 for the driver's
        # prototype and export steps. A reservation, not measured utilisation.
        "seconds": {"prototypes": t1 - t0, "train": t2 - t1, "export": t3 - t2, "total": t3 - t0},
        "cpu_seconds": (t2 - t1) * reserved + (t1 - t0) + (t3 - t2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
    }
    storage.write_json(manifest, TEACHERS, spec.key, MANIFEST)  # last: the artefact is complete from here on
    if not keep_checkpoints:
        storage.delete(TEACHERS, spec.key, RUN_NAME)
    say({"teacher": spec.key, "event": "exported", "best_dev": state["best_dev"], "test_mean": test_acc["mean"]})
    return finished_teacher(storage, spec.key)  # as every later reader sees it

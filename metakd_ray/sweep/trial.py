"""One student trial of a sweep cell, as a Ray Tune function trainable.

The trial reads everything from storage — the cell's teacher outputs from its Ray Data cache (or the exported teacher
run live, when the cell has no usable cache), the prototype scores, the data from the data root — never through the
object store, and builds its cell with ``metakd_ray.cell`` like the single-process path does.

It keeps its own record and training state (``sweep/records.py``): the record when it starts, after every epoch
(the state too after an epoch at most every 30 s and after each stage's last one; then the record, then the
report to Tune: a retry resumes from the last state and repeats the epochs after it with the same values), when it
fails (the exception line) and when it finishes (the final report). Why not Tune checkpoints: Tune deletes a
trial's older checkpoints (``num_to_keep``) as soon as the driver registers a newer one, while the experiment state
a restored sweep starts from is snapshotted only every >= 10 s; a driver killed in between restores a trial from a
checkpoint that no longer exists, and Tune errors the trial. Here the one state there is, is the newest.

Reported metrics: every epoch ``dev_acc`` (best target-domain dev accuracy so far of the dev-selected stage; 0.0
before it), ``phase`` (stage name), ``epoch``, ``train_*``; the last report ``phase: "final"``, ``test_acc``,
``dev_acc``, ``wall_s``, ``cpu_s``, ``gpu_s``, ``n_train``, ``teacher_key``, ``cache_key``, ``teacher_source``
(``cache``, ``live``, or ``""`` without a teacher), ``device`` and ``precision`` (what the student ran with),
``node_id`` (the Ray node it ran on).
``gpu_s`` counts the GPU share the trial held (``ray.trial_gpus``), not whole GPUs. The final report also gives
``n_params`` (the exported student's parameters), ``teacher_params`` (the teacher encoder's and its classifier's),
``student_dir`` and ``student_bytes`` (where the dev-best student was exported, and its size; ``""``/0 with
``storage.keep_students: none``). Before its final record the trial writes its test predictions, resolved config
and student (``sweep/students.py``).
"""

from __future__ import annotations

import functools
import io
import os
import resource
import signal
import time
from typing import Any

import torch
import yaml

from metakd_ray import cell as CELL
from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import faults
from metakd_ray import models as M
from metakd_ray.distill import LiveTeacher, Stage
from metakd_ray.faults import FAULTS_ENV
from metakd_ray.runtime import CPU_FP32, Runtime, release_memory, runtime_for
from metakd_ray.storage import Storage
from metakd_ray.sweep.plan import Cell
from metakd_ray.sweep.records import TrialRecord, TrialStore, error_line, trial_key
from metakd_ray.training import load_state

FINAL = "final"


def cell_config(trial_config: dict) -> C.Config:
    """The resolved config of this trial: the sweep's config (``sweeps/<name>/config.yaml``, written by the driver)
    with the cell's gamma2 axis value and the trial's tuned values."""
    storage = Storage(trial_config["storage_root"])
    base = yaml.safe_load(storage.read_bytes("sweeps", trial_config["sweep"], "config.yaml"))
    hp = dict(trial_config.get("hp") or {})
    overrides = [f"distill.{k}={v}" for k, v in hp.items()]
    if trial_config.get("gamma2") is not None and "gamma2" not in hp:
        overrides.append(f"distill.gamma2={trial_config['gamma2']}")
    return C.from_dict(base, overrides)


@functools.lru_cache(maxsize=2)
def _splits(data_yaml: str) -> D.Splits:
    """Splits per data config, kept for the life of the (reused) trial actor."""
    return D.load_splits(C.from_dict({"data": yaml.safe_load(data_yaml)}).data)


@functools.lru_cache(maxsize=1)
def _pretrained(name: str, dropout: float):
    return M.load_encoder(name, dropout=dropout)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class TrialCheckpointer:
    """The ``Checkpointer`` of one distillation stage inside a trial: the state of every stage so far goes to the
    trial's store, then its record, then the epoch's metrics are reported to Tune. The state at most every
    ``every_s`` seconds and after each stage's last epoch (``training.Checkpointer``; the other epochs go through
    :meth:`skipped`): a state is ~280 MB for the MiniLM student, about a second to write, and a small split's
    epochs under ``distill.min_steps`` last less than that."""

    every_s = 30.0

    def __init__(self, progress: dict, stage: Stage, store: TrialStore, record: list[TrialRecord]):
        self.progress, self.stage, self.store, self.record = progress, stage, store, record

    def load(self) -> dict | None:
        state = self.progress["states"].get(self.stage.name)
        if state is not None and not state.get("complete"):  # resumed mid-stage: say from where, in the final report
            self.progress.setdefault("resumed", {})[self.stage.name] = int(state.get("epoch", -1)) + 1
        return state

    def save(self, state: dict, metrics: dict) -> None:
        # Earlier stages are complete and their weights live on in this stage's: keep only their summary.
        done = {name: {"complete": True, "history": st["history"], "best_dev": st["best_dev"],
                       "best_epoch": st["best_epoch"]}
                for name, st in self.progress["states"].items() if name != self.stage.name}
        self.progress["states"] = {**done, self.stage.name: state}
        buf = io.BytesIO()
        torch.save(self.progress, buf)
        self.store.write_state(self.record[0].key, buf.getvalue())  # first the state, then the record, the report
        self._report(metrics, after_state=True)

    def skipped(self, metrics: dict) -> None:
        """An epoch whose state is not written (``every_s``): its record and report only. A retry resumes from the
        last state and repeats the epochs after it, reporting them again with the same values."""
        self._report(metrics, after_state=False)

    def _report(self, metrics: dict, after_state: bool) -> None:
        from ray import tune

        if self.stage.select_on_dev and "dev_acc_mean" in metrics:  # every epoch comes here, saved or not
            self.progress["best_dev"] = max(self.progress["best_dev"], metrics["dev_acc_mean"])
        dev = max(self.progress["best_dev"], 0.0)
        self.record[0] = self.record[0].reported(self.stage.name, metrics["epoch"], dev)
        self.store.write(self.record[0])
        if after_state:
            kill_fault(self.record[0])
        tune.report({"dev_acc": dev, "phase": self.stage.name, "epoch": metrics["epoch"],
                     **{k: v for k, v in metrics.items() if k.startswith("train_")}})


def open_teacher_source(cfg: C.Config, c: Cell, runtime: Runtime = CPU_FP32) -> tuple[Any, dict[str, float]]:
    """(teacher source, prototype scores by id) of a cell: its cache when it is there and verifies, else the
    exported teacher run live on ``runtime.device`` (same records up to float16; slower). A cache gives its
    records on the batch's device."""
    from metakd_ray.cache import CachedTeacher, CacheError, verify
    from metakd_ray.cache.store import CacheRef
    from metakd_ray.teacher.artefact import load_teacher, prototype_parts, read_prototype_scores

    storage = Storage(cfg.storage.root)
    scores = read_prototype_scores(storage, *prototype_parts(c.teacher_key))
    if c.cache_key:
        try:
            return CachedTeacher(CacheRef(storage.uri(), c.cache_key, verify(c.cache_key, storage))), scores
        except (CacheError, OSError) as e:
            print(f"[trial] cache {c.cache_key} unusable ({e}); running the teacher live", flush=True)
    model, _, _ = load_teacher(storage, c.teacher_key)
    model.to(runtime.device)
    g = M.student_layer_map(cfg.model, model.encoder.config.num_hidden_layers)
    return LiveTeacher(model, g, dropout=cfg.distill.teacher_dropout), scores


def kill_fault(record: TrialRecord) -> None:
    """``METAKD_FAULTS="kill=<s>"``: the first attempt of a trial whose cell id contains ``<s>`` SIGKILLs its own
    process right after its first saved epoch (a node or OOM kill mid-training; tests of the retry from state)."""
    rule = faults.rules().get("kill")
    if rule and rule in record.cell and record.attempts == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def inject_fault(config: dict, attempt: int) -> None:
    """Fault injection for tests of retries and failed cells: ``METAKD_FAULTS="once=<s>;always=<s>"`` makes a
    trial whose cell id contains ``<s>`` raise at its start — ``once``: on its first attempt only, ``always``: on
    every attempt (``kill=<s>``: see :func:`kill_fault`). Unset in normal use."""
    rules = faults.rules()
    cell = config["cell"]
    if rules.get("always") and rules["always"] in cell:
        raise RuntimeError(f"injected failure ({FAULTS_ENV}=always) in cell {cell}")
    if rules.get("once") and rules["once"] in cell and attempt == 1:
        raise RuntimeError(f"injected failure ({FAULTS_ENV}=once) in cell {cell}")


def _train(config: dict, c: Cell, store: TrialStore, record: list[TrialRecord], progress: dict) -> dict:
    """Train the trial's student; return its final report."""
    from ray import tune

    release_memory(collect=True)  # what an earlier trial of this (reused) actor left in reference cycles
    t0, c0 = time.time(), _cpu_seconds()
    cfg = cell_config(config)
    torch.set_num_threads(max(1, int(round(cfg.ray.trial_cpus))))
    # the device Ray gave this trial (its GPU share, if any) and the precision the driver resolved for trials
    runtime = runtime_for(config.get("precision") or cfg.compute.precision)
    kind, method = CELL.split_method(c.method)
    splits = _splits(yaml.safe_dump(C.to_dict(cfg.data)))
    encoder, tokenizer = _pretrained(cfg.model.teacher, cfg.model.dropout)
    teacher, scores = (None, None) if kind == "none" else open_teacher_source(cfg, c, runtime)
    data = CELL.student_data(cfg, splits, tokenizer, c.domain, c.rate, c.seed, scores)
    student = CELL.build_student(cfg, encoder, tokenizer, method, splits.num_labels, len(splits.domains), teacher,
                                 seed=c.seed)
    run = CELL.train_student(cfg, data, student, method, teacher, tokenizer=tokenizer, domains=splits.domains,
                             seed=c.seed, runtime=runtime,
                             checkpointer=lambda stage: TrialCheckpointer(progress, stage, store, record))
    dev, test = max(progress["best_dev"], 0.0), run.test_accuracy[c.domain]
    kept = keep_outputs(config, cfg, c, store, record[0].key, run, tokenizer, splits.label_names,
                        {"dev_acc": dev, "test_acc": test, "teacher_key": c.teacher_key})
    wall = time.time() - t0
    gpus = float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0))
    return {"dev_acc": dev, "phase": FINAL, "epoch": -1,
            "test_acc": test, "wall_s": wall, "cpu_s": _cpu_seconds() - c0,
            "gpu_s": wall * gpus, "n_train": len(data.train), "teacher_key": c.teacher_key,
            "cache_key": c.cache_key, "teacher_source": teacher.kind if teacher is not None else "",
            "device": runtime.device.type, "precision": runtime.precision, "node_id": _node_id(),
            "teacher_params": M.param_count(encoder) + (encoder.config.hidden_size + 1) * splits.num_labels,
            **kept, "resumed": dict(progress.get("resumed", {}))}  # stage -> the epoch a retry resumed at


def _node_id() -> str:
    """The Ray node this trial ran on (its hex id; ``""`` outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def keep_outputs(config: dict, cfg: C.Config, c: Cell, store: TrialStore, key: str, run: CELL.StudentRun,
                 tokenizer: Any, label_names: tuple[str, ...], scores: dict) -> dict:
    """Write the trial's test predictions, resolved config and (``storage.keep_students``) exported student
    (``sweep/students.py``); returns the final report's ``n_params`` (the exported student's), ``student_dir``
    and ``student_bytes``."""
    from metakd_ray.export import build_hf_model
    from metakd_ray.sweep import students as S

    sweep = store.storage
    S.write_predictions(sweep, key, run.test_predictions)
    hp = dict(config.get("hp") or {})
    S.write_config(sweep, key, {"cell": c.to_json(), "slot": int(config["slot"]), "hp": hp,
                                "config": C.to_dict(cfg)})
    n_params = sum(p.numel() for p in build_hf_model(run.student, label_names).parameters())
    student_dir, size = "", 0
    if cfg.storage.keep_students != "none":
        meta = {"sweep": config["sweep"], "trial_key": key, "cell": c.id, "domain": c.domain, "rate": c.rate,
                "method": c.method, "seed": c.seed, "gamma2": c.gamma2, "hp": hp, **scores}
        student_dir, size = S.export_to(sweep, key, run.student, tokenizer, label_names,
                                        max_length=cfg.data.max_length, metadata=meta)
    return {"n_params": int(n_params), "student_dir": student_dir, "student_bytes": int(size)}


def run_trial(config: dict) -> None:
    """Ray Tune function trainable: one student trial of one cell (see the module docstring)."""
    import datasets
    from ray import tune

    datasets.disable_progress_bars()
    c = Cell.from_json(config)
    store = TrialStore(Storage(config["storage_root"]).sub("sweeps", config["sweep"]))
    key = trial_key(c.id, config["slot"], config.get("hp"))
    rec = store.read(key) or TrialRecord(key, c.id, int(config["slot"]), dict(config.get("hp") or {}))
    if rec.final is not None:
        # Finished before the sweep driver was killed, but Tune had not recorded it: nothing to redo; Tune gets the
        # final report again (its logs are not what results are built from).
        tune.report(rec.final)
        return
    record = [rec.started(tune.get_context().get_trial_id(), config.get("experiment") or "tune")]
    store.write(record[0])
    raw = store.read_state(key)
    progress = (load_state(raw, f"the saved state of trial {key}") if raw is not None
                else {"states": {}, "best_dev": float("-inf")})
    try:
        inject_fault(config, record[0].attempts)
        final = _train(config, c, store, record, progress)
    except Exception as e:
        store.write(record[0].failed(error_line(e)))  # Tune retries it (sweep.max_failures) or marks it failed
        raise
    store.write(record[0].finished(final))  # first the record, then the report
    store.drop_state(key)
    release_memory(collect=True)  # the student, optimiser and cache rows of this trial, before the actor idles
    tune.report(final)

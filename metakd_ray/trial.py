"""One student-distillation trial of a sweep cell, as a Ray Tune function trainable.

The trial reads everything from storage — the cell's teacher outputs from the Ray Data cache (or the exported
teacher, when the cell has no cache), the prototype scores, the data from the data root — never through the object
store. It runs ``distill.distill`` unchanged, with a checkpointer that reports every epoch to Tune together with the
full training state saved first (``TrialStateStore``), so a trial that fails, or whose sweep driver is killed, resumes
from its last epoch. Reported metrics (the contract
``metakd_ray.results`` reads):

- every report: ``dev_acc`` (best target-domain dev accuracy so far of the dev-selected stage; 0.0 before it),
  ``phase`` (stage name), ``epoch``;
- the last report: ``phase: "final"``, ``test_acc`` (target-domain test accuracy of the dev-best student),
  ``dev_acc``, ``wall_s``, ``cpu_s``, ``gpu_s``, ``n_train``, ``teacher_key``, ``cache_key``, ``teacher_source``
  (``cache``, ``live`` when the cache was missing or unusable, ``""`` without a teacher).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.cells import filter_domains, tokenize_splits, training_pool, with_prototype_scores
from metakd_ray.distill import LiveTeacher, distill, student_logits
from metakd_ray.training import accuracy_by_domain

FINAL = "final"
STATES = "trial_states"


def cell_config(trial_config: dict) -> C.Config:
    """The resolved config of this trial: the sweep's config (``sweeps/<name>/config.yaml`` under the storage root,
    written by the driver) with the cell's axis values and tuned values."""
    import yaml

    from metakd_ray.storage import Storage

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
    return D.load_splits(C.from_dict({"data": __import__("yaml").safe_load(data_yaml)}).data)


@functools.lru_cache(maxsize=1)
def _pretrained(name: str):
    return M.load_encoder(name)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class TrialStateStore:
    """The training state of one trial, kept by the trial itself in ``<storage>/sweeps/<sweep>/trial_states/
    <key>.pt`` and overwritten atomically after every epoch; at the end ``<key>.final.json`` (the final report)
    replaces it.

    Not a Tune checkpoint, on purpose: Tune deletes a trial's older checkpoints (``num_to_keep``) as soon as the driver
    registers a newer one, while the experiment state a restored sweep starts from is snapshotted only every >= 10 s.
    A driver killed in between restores a trial from a checkpoint that no longer exists, and Tune errors the trial
    ("Could not recover from checkpoint as it does not exist on storage anymore"). Here the one state there is, is
    the newest: Tune restarts an unfinished or failed trial and the trial resumes from it.

    The key is the trial's content — cell, slot (its index in the cell) and hyper-parameters — not Tune's trial id:
    a trial started after the last snapshot is unknown to the restored experiment, whose restored searcher suggests
    it again under a new id; that trial then finds the work already done."""

    def __init__(self, trial_config: dict, trial_id: str):
        from metakd_ray.storage import Storage

        self.storage = Storage(trial_config["storage_root"])
        self.sweep, self.trial_id = trial_config["sweep"], trial_id
        self.experiment = trial_config.get("experiment") or "tune"
        self.key = self.state_key(trial_config)
        self.parts = ("sweeps", self.sweep, STATES, f"{self.key}.pt")
        self.final_parts = ("sweeps", self.sweep, STATES, f"{self.key}.final.json")

    @staticmethod
    def state_key(trial_config: dict) -> str:
        what = {k: trial_config.get(k) for k in ("cell", "slot", "hp")}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def load(self) -> dict:
        """{"states", "best_dev", "final"}: the final report once the trial finished, else its training state."""
        if self.storage.is_file(*self.final_parts):
            rec = self.storage.read_json(*self.final_parts)
            return {"states": {}, "best_dev": rec["best_dev"], "final": rec["final"]}
        if not self.storage.is_file(*self.parts):
            return {"states": {}, "best_dev": float("-inf"), "final": None}
        st = torch.load(io.BytesIO(self.storage.read_bytes(*self.parts)), weights_only=False)
        return {"states": st["states"], "best_dev": st["best_dev"], "final": None}

    def save(self, shared: dict) -> None:
        buf = io.BytesIO()
        torch.save({"states": shared["states"], "best_dev": shared["best_dev"]}, buf)
        self.storage.write_bytes(buf.getvalue(), *self.parts)

    def save_final(self, final: dict, best_dev: float) -> None:
        """The trial is done: its final report (small, JSON) replaces its training state."""
        self.storage.write_json({"final": final, "best_dev": best_dev}, *self.final_parts)
        self.storage.delete(*self.parts)

    def final_reported(self) -> bool:
        """Whether Tune's result log of this trial already holds its final report."""
        parts = ("sweeps", self.sweep, self.experiment, self.trial_id, "result.json")
        if not self.storage.is_file(*parts):
            return False
        return any(json.loads(line).get("phase") == FINAL
                   for line in self.storage.read_bytes(*parts).decode().splitlines() if line.strip())


def drop_unfinished_states(storage_root: str, sweep: str) -> list[str]:
    """Delete the training states left in ``trial_states/`` (those of failed trials, or of trials a restored
    searcher never suggested again); call only when no trial of the sweep runs. Final reports stay."""
    from metakd_ray.storage import Storage

    storage = Storage(storage_root)
    gone = [n for n in storage.listdir("sweeps", sweep, STATES) if n.endswith(".pt")]
    for n in gone:
        storage.delete("sweeps", sweep, STATES, n)
    return gone


class TuneCheckpointer:
    """The ``Checkpointer`` of one distillation stage inside a Tune trial: the state of every stage so far is saved
    to the trial's ``TrialStateStore``, then the epoch's metrics are reported to Tune."""

    def __init__(self, shared: dict, stage: str, selecting: bool, store: TrialStateStore):
        self.shared, self.stage, self.selecting, self.store = shared, stage, selecting, store

    def load(self) -> dict | None:
        return self.shared["states"].get(self.stage)

    def save(self, state: dict, metrics: dict) -> None:
        from ray import tune

        # Earlier stages are complete and their weights live on in this stage's: keep only their summary.
        done = {name: {"complete": True, "history": st["history"], "best_dev": st["best_dev"],
                       "best_epoch": st["best_epoch"]}
                for name, st in self.shared["states"].items() if name != self.stage}
        self.shared["states"] = {**done, self.stage: state}
        if self.selecting and "dev_acc_mean" in metrics:
            self.shared["best_dev"] = max(self.shared["best_dev"], metrics["dev_acc_mean"])
        report = {"dev_acc": max(self.shared["best_dev"], 0.0), "phase": self.stage, "epoch": metrics["epoch"],
                  **{k: v for k, v in metrics.items() if k.startswith("train_")}}
        self.store.save(self.shared)  # first the state, then the report: a reported epoch is never lost
        tune.report(report)


@dataclass(frozen=True)
class StudentData:
    train: Any
    dev: Any
    test: Any


def student_data(cfg: C.Config, splits: D.Splits, tokenizer: Any, target: str, rate: float, seed: int,
                 prototype_scores: dict[str, float] | None) -> StudentData:
    """The target domain's subsampled training set (with prototype scores when given), dev and test sets,
    tokenised."""
    doms = splits.domains
    train = filter_domains(training_pool(cfg, splits, target, rate, seed), (target,), doms)
    tok = tokenize_splits(cfg, tokenizer, train=train, dev=filter_domains(splits["dev"], (target,), doms),
                          test=filter_domains(splits["test"], (target,), doms))
    return StudentData(train=with_prototype_scores(tok["train"], prototype_scores),
                       dev=with_prototype_scores(tok["dev"], None), test=with_prototype_scores(tok["test"], None))


def open_teacher_source(cfg: C.Config, trial_config: dict):
    """(teacher source, prototype scores by id) of a trial: its cell's cache when it is there and verifies, else
    the exported teacher run live (same records up to float16; slower)."""
    from metakd_ray import cache as K
    from metakd_ray import teacher as T
    from metakd_ray.cache_reader import CachedTeacher
    from metakd_ray.storage import Storage

    storage = Storage(cfg.storage.root)
    key = trial_config["teacher_key"]
    scores = T.read_prototype_scores(storage, key)
    fp = trial_config.get("cache_key")
    if fp:
        try:
            return CachedTeacher(K.CacheRef(storage.uri(), fp, K.verify(fp, storage))), scores
        except (K.CacheError, FileNotFoundError, OSError) as e:
            print(f"[trial] cache {fp} unusable ({e}); running the teacher live", flush=True)
    model, _, _ = T.load_teacher(storage, key)
    gmap = K.student_layer_map(cfg, model.encoder.config.num_hidden_layers)
    return LiveTeacher(model, gmap, dropout=cfg.distill.teacher_dropout), scores


FAULTS_ENV = "METAKD_FAULTS"


def inject_fault(config: dict) -> None:
    """Fault injection for tests of retries and failed cells: ``METAKD_FAULTS="once=<s>;always=<s>"`` makes a
    trial whose cell id contains ``<s>`` raise at its start — ``once``: on its first attempt only (a marker under
    ``<storage>/sweeps/<name>/faults/`` remembers it), ``always``: on every attempt. Unset in normal use."""
    spec = os.environ.get(FAULTS_ENV, "")
    if not spec:
        return
    from ray import tune

    from metakd_ray.storage import Storage

    rules = dict(part.split("=", 1) for part in spec.split(";") if "=" in part)
    cell = config["cell"]
    if rules.get("always") and rules["always"] in cell:
        raise RuntimeError(f"injected failure ({FAULTS_ENV}=always) in cell {cell}")
    if rules.get("once") and rules["once"] in cell:
        storage = Storage(config["storage_root"])
        marker = ("sweeps", config["sweep"], "faults", tune.get_context().get_trial_id())
        if not storage.exists(*marker):
            storage.write_bytes(b"failed once", *marker)
            raise RuntimeError(f"injected failure ({FAULTS_ENV}=once) in cell {cell}")


def run_trial(config: dict) -> None:
    """Ray Tune function trainable: one student trial of one cell (see the module docstring)."""
    from ray import tune
    from torch.utils.data import DataLoader

    store = TrialStateStore(config, tune.get_context().get_trial_id())
    shared = store.load()
    if shared.get("final") is not None:
        # The trial finished before the sweep driver was killed, but Tune had not recorded it as finished: nothing to
        # redo. Report the final result again only if Tune's log lost it (reporting twice would duplicate it).
        if not store.final_reported():
            tune.report(shared["final"])
        return
    inject_fault(config)
    import datasets

    datasets.disable_progress_bars()
    t0, c0 = time.time(), _cpu_seconds()
    cfg = cell_config(config)
    torch.set_num_threads(max(1, int(round(cfg.ray.trial_cpus))))
    target, rate, seed, method = config["domain"], float(config["rate"]), int(config["seed"]), config["method"]
    kind, student_method = method.split("/")
    splits = _splits(__import__("yaml").safe_dump(C.to_dict(cfg.data)))
    encoder, tokenizer = _pretrained(cfg.model.teacher)
    teacher_source, prototype_scores = None, None
    if kind != "none":
        teacher_source, prototype_scores = open_teacher_source(cfg, config)
    data = student_data(cfg, splits, tokenizer, target, rate, seed, prototype_scores)
    collate = D.collator(tokenizer)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(data.train, batch_size=cfg.distill.batch_size, shuffle=True, collate_fn=collate,
                              generator=g)
    dev_loader = DataLoader(data.dev, batch_size=64, collate_fn=collate)
    test_loader = DataLoader(data.test, batch_size=64, collate_fn=collate)

    student_encoder = M.build_student(cfg.model, copy.deepcopy(encoder), tokenizer)
    meta = student_method == "meta_kd"
    k = len(splits.domains)
    student = M.Student(student_encoder, splits.num_labels, teacher_hidden_size=encoder.config.hidden_size,
                        teacher_domain_hidden_size=encoder.config.hidden_size if meta else None,
                        num_domains=k if meta else None, pooling=cfg.model.pooling, dropout=cfg.model.dropout)
    selecting = {"stage2", "finetune", "one"}
    distill(student, student_method, teacher_source, train_loader, dev_loader, cfg.distill,
            domain_names=splits.domains, seed=seed,
            checkpointer=lambda stage: TuneCheckpointer(shared, stage, stage in selecting, store))
    test = accuracy_by_domain(student, test_loader, splits.domains, student_logits)
    wall = time.time() - t0
    gpus = float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0))
    final = {"dev_acc": max(shared["best_dev"], 0.0), "phase": FINAL, "epoch": -1, "test_acc": test[target],
             "wall_s": wall, "cpu_s": _cpu_seconds() - c0, "gpu_s": wall * gpus, "n_train": len(data.train),
             "teacher_key": config.get("teacher_key", ""), "cache_key": config.get("cache_key", ""),
             "teacher_source": "" if teacher_source is None else
             "cache" if type(teacher_source).__name__ == "CachedTeacher" else "live"}
    store.save_final(final, shared["best_dev"])  # first the record, then the report (see TrialStateStore)
    tune.report(final)



"""Experiment tracking: follow a sweep's metrics live in TensorBoard, MLflow or W&B (``storage.tracking``).

The sweep's own records (``sweeps/<name>/trials/``, teacher manifests) stay what results are built from; trackers
only show the run as it goes. Two writers, one per kind of stage:

* **Students** (Ray Tune trials): Ray Tune's own logger callbacks on the driver (:func:`tune_callbacks`, passed to
  the Tuner's ``RunConfig(callbacks=...)``): ``TBXLoggerCallback``, ``MLflowLoggerCallback``,
  ``WandbLoggerCallback``. They see every ``tune.report`` of a trial: ``dev_acc`` (best so far) and the ``train_*``
  losses after each epoch, then the final row with ``test_acc``.
* **Teachers** (Ray Train): Train V2 has no logger callbacks, and its local mode (``ray.train_workers=0``) runs no
  callbacks at all, so the rank-0 worker writes each epoch's metrics itself (:class:`TeacherTracker`): ``train_loss``
  and each loss term, ``dev_acc_mean`` and ``dev_acc_<domain>``, step = epoch. What it needs (URIs, modes) is
  resolved on the driver (:func:`teacher_tracking`), so a worker never depends on its own environment.

Where it lands (``S`` = ``<storage.root>/sweeps/<name>``; the layout is also in the README):

* tensorboard: ``S/tune*/<trial id>/events.out.tfevents.*`` (students; tags ``ray/tune/<metric>``) and
  ``S/tracking/teachers/<teacher key>/events.out.tfevents.*``; ``tensorboard --logdir S`` shows both.
* mlflow: ``$MLFLOW_TRACKING_URI`` if set, else the SQLite store ``sqlite:///S/tracking/mlflow.db`` (artifacts in
  ``S/tracking/mlartifacts``); experiment = the sweep's name; one run per trial and one per teacher. Not a
  ``file://`` store: MLflow 3.18 refuses that backend ("maintenance mode") unless ``MLFLOW_ALLOW_FILE_STORE=true``.
* wandb: project = the sweep's name; offline (runs in ``S/tracking/wandb/wandb/offline-run-*``, uploaded later by
  ``wandb sync``) unless ``WANDB_MODE`` or ``WANDB_API_KEY`` is set.

Ray Tune adds its TensorBoard logger to every experiment by itself (unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``),
so the trials' event files appear even without ``tensorboard`` here; adding it explicitly keeps them whatever that
default becomes. Only the driver and rank 0 import the trackers' packages, and only those asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from metakd_ray.storage import Storage

if TYPE_CHECKING:  # not imported at run time: preflight imports this module (see there)
    from metakd_ray import config as C
    from metakd_ray.teacher.artefact import TeacherSpec

TRACKING_DIR = "tracking"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
# tracker -> (the module it imports, how to install it)
PACKAGES = {
    "tensorboard": ("tensorboardX", "pip install 'tensorboardX>=2.6.5'"),
    "mlflow": ("mlflow", "pip install 'mlflow-skinny>=3.18.0' (the project's [mlflow] extra)"),
    "wandb": ("wandb", "pip install 'wandb>=0.31.0' (the project's [wandb] extra)"),
}


def check(trackers: Sequence[str], storage_root: str) -> list[str]:
    """One line per tracker of ``storage.tracking`` that cannot run here: its package is not installed (the line
    gives the pip command), or ``mlflow`` on a remote storage root with no ``MLFLOW_TRACKING_URI`` (its default
    store is a SQLite file, which must be on a local disk)."""
    errors = []
    for name in trackers:
        module, pip = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            errors.append(f"storage.tracking: {name} needs the {module} package, which is not installed; run: {pip}")
    if "mlflow" in trackers and "://" in storage_root and not os.environ.get("MLFLOW_TRACKING_URI"):
        errors.append(f"storage.tracking: mlflow with storage.root={storage_root} needs MLFLOW_TRACKING_URI (a "
                      "tracking server, or a sqlite:/// file on a local disk); its default store is a local file")
    return errors


def mlflow_uri(storage: Storage, sweep: str) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/sweeps/<sweep>/tracking/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = storage.local_path("sweeps", sweep, TRACKING_DIR, MLFLOW_DB)
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def mlflow_experiment(uri: str, name: str, artifacts: Path | None) -> str:
    """The id of MLflow experiment ``name`` at ``uri``, created (with its artifacts under ``artifacts``, when given:
    else MLflow would put them in the working directory) if it does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def _mlflow_setup(storage: Storage, sweep: str) -> tuple[str, str]:
    """(tracking URI, experiment id) of the sweep, the experiment created if needed."""
    uri = mlflow_uri(storage, sweep)
    default = not os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = storage.local_path("sweeps", sweep, TRACKING_DIR, MLFLOW_ARTIFACTS) if default else None
    return uri, mlflow_experiment(uri, sweep, artifacts)


def wandb_settings(storage: Storage, sweep: str) -> dict[str, Any]:
    """``wandb.init`` settings: the mode (``$WANDB_MODE``; else online with ``$WANDB_API_KEY``, offline without)
    and, on a local storage root, the directory its run files go to."""
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    out: dict[str, Any] = {"mode": mode}
    if storage.is_local:
        d = storage.local_path("sweeps", sweep, TRACKING_DIR, "wandb")
        d.mkdir(parents=True, exist_ok=True)
        out["dir"] = str(d)
    return out


def tune_callbacks(cfg: C.Config, storage: Storage) -> list:
    """Ray Tune logger callbacks for ``cfg.storage.tracking`` (students; see the module doc), for the Tuner's
    ``RunConfig(callbacks=...)``. Runs on the driver.

    Call it before ``metakd_ray.sweep.progress`` is imported: building the MLflow callback takes seconds (importing
    mlflow, creating the store), and ``EtaCallback``'s default output binds ``builtins.print`` at that import. Soon
    after ``ray.init``, Ray's ``tqdm_ray`` replaces ``builtins.print`` in the driver. If that happens between the
    import and ``Tuner(...)``, which pickles its run config, the Tuner fails with ``PicklingError: Can't pickle
    <built-in function print>``."""
    trackers, sweep = cfg.storage.tracking, cfg.name
    out: list = []
    if "tensorboard" in trackers:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    if "mlflow" in trackers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri, _ = _mlflow_setup(storage, sweep)
        out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=sweep,
                                        tags={"sweep": sweep, "stage": "student"}))
    if "wandb" in trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        settings = wandb_settings(storage, sweep)
        # Ray checks for an API key on the driver unless $WANDB_MODE says offline (or disabled)
        os.environ.setdefault("WANDB_MODE", settings["mode"])
        out.append(WandbLoggerCallback(project=sweep, **settings))
    return out


# ----------------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherTracking:
    """Where one teacher's metrics go, resolved on the driver (:func:`teacher_tracking`) and opened on rank 0."""

    trackers: tuple[str, ...]
    storage: Storage
    sweep: str
    key: str  # the teacher's key (teachers/<key>/)
    epochs: int  # teacher.epochs: the last epoch's log ends the runs
    params: dict  # what the teacher is (its spec and the teacher section): MLflow params, W&B config
    mlflow_uri: str = ""
    mlflow_experiment: str = ""
    wandb: dict | None = None

    def open(self) -> "TeacherTracker":
        return TeacherTracker(self)


def teacher_tracking(cfg: C.Config, spec: TeacherSpec, storage: Storage) -> TeacherTracking:
    """The tracking of teacher ``spec`` built for sweep ``cfg.name`` (creates the MLflow experiment if needed)."""
    trackers = tuple(cfg.storage.tracking)
    params = {**{k: v for k, v in dataclasses.asdict(spec).items() if k != "digest"},
              **{f"teacher.{k}": v for k, v in dataclasses.asdict(cfg.teacher).items()},
              "train_workers": cfg.ray.train_workers}
    uri = experiment = ""
    if "mlflow" in trackers:
        uri, experiment = _mlflow_setup(storage, cfg.name)
    wandb = wandb_settings(storage, cfg.name) if "wandb" in trackers else None
    return TeacherTracking(trackers, storage, cfg.name, spec.key, cfg.teacher.epochs, params, uri, experiment, wandb)


def _scalars(metrics: dict) -> dict[str, float]:
    """The epoch's numbers worth plotting: losses and dev accuracies."""
    return {k: float(v) for k, v in metrics.items()
            if k.startswith(("train_", "dev_acc")) and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TeacherTracker:
    """Writes a teacher's per-epoch metrics (``train_teacher``'s ``log`` events) to the chosen trackers; rank 0
    only. The last epoch's :meth:`log` also closes it (the worker loop needs no ``finally``; a run that fails
    leaves its MLflow run RUNNING). A retried run opens a new one: TensorBoard gets another event file in the same
    folder, MLflow and W&B continue the teacher's run (found by its key)."""

    def __init__(self, t: TeacherTracking):
        self.t = t
        self.parts = ("sweeps", t.sweep, TRACKING_DIR, "teachers", t.key)
        self._tb = self._tb_tmp = self._run = self._mlflow = self._run_id = None
        if "tensorboard" in t.trackers:
            # tensorboardX's synchronous event-file writer: its SummaryWriter writes from a background thread, so an
            # epoch's scalars could reach the file (and a remote root) only a flush interval later.
            from tensorboardX.event_file_writer import EventsWriter

            if t.storage.is_local:
                logdir = t.storage.local_path(*self.parts)
            else:  # written here, copied file by file to the storage root after each epoch
                self._tb_tmp = tempfile.TemporaryDirectory(prefix="metakd-tb-")
                logdir = Path(self._tb_tmp.name)
            logdir.mkdir(parents=True, exist_ok=True)
            self._tb = EventsWriter(str(logdir / "events"), filename_suffix=f".{os.getpid()}")  # a retry: a new file
        if "mlflow" in t.trackers:
            from mlflow import MlflowClient

            self._mlflow = MlflowClient(t.mlflow_uri)
            tag = f"tags.teacher_key = '{t.key}'"
            runs = self._mlflow.search_runs([t.mlflow_experiment], filter_string=tag, max_results=1)
            if runs:  # a retried run continues the teacher's MLflow run
                self._run_id = runs[0].info.run_id
            else:
                from mlflow.entities import Param

                self._run_id = self._mlflow.create_run(
                    t.mlflow_experiment, run_name=f"teacher {t.key}",
                    tags={"sweep": t.sweep, "stage": "teacher", "teacher_key": t.key}).info.run_id
                self._mlflow.log_batch(self._run_id, params=[Param(k, str(v)) for k, v in t.params.items()])
        if "wandb" in t.trackers:
            import wandb

            self._run = wandb.init(project=t.sweep, name=f"teacher {t.key}", group="teachers", job_type="teacher",
                                   id=re.sub(r"[^A-Za-z0-9_-]", "-", t.key)[:64], resume="allow",
                                   config={"teacher_key": t.key, **t.params}, **(t.wandb or {}))

    def log(self, metrics: dict) -> None:
        """One epoch's metrics (``epoch`` is the step); after the last epoch's, :meth:`close`."""
        step, values = int(metrics["epoch"]), _scalars(metrics)
        if self._tb is not None:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

            for name, value in values.items():
                self._tb.write_event(Event(wall_time=time.time(), step=step, summary=scalar(name, value)))
            self._tb.flush()
            self._upload()
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        if self._run is not None:
            self._run.log({**values, "epoch": step})
        if step >= self.t.epochs - 1:
            self.close()

    def close(self) -> None:
        """End the runs (MLflow: FINISHED) and flush the files; a second call does nothing."""
        if self._tb is not None:
            self._tb.close()
            self._upload()
            if self._tb_tmp is not None:
                self._tb_tmp.cleanup()
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._run_id, "FINISHED")
        if self._run is not None:
            self._run.finish()
        self._tb = self._tb_tmp = self._mlflow = self._run = None

    def _upload(self) -> None:
        if self._tb_tmp is None:
            return
        for f in Path(self._tb_tmp.name).iterdir():
            self.t.storage.write_bytes(f.read_bytes(), *self.parts, f.name)

"""Experiment tracking (``storage.tracking``): the config field, the preflight line for a missing package, the
teacher's writer on its own, and one toy sweep whose students and teacher reach TensorBoard and MLflow.

TensorBoard files are read with the protobufs that ship with tensorboardX (no ``tensorboard`` package needed)."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
import toy
from toy import tiny_config

from metakd_ray import config as C
from metakd_ray import preflight, tracking
from metakd_ray.local import cell_dir_name
from metakd_ray.storage import Storage
from metakd_ray.sweep.plan import make_plan
from metakd_ray.sweep.run import check_same_sweep
from metakd_ray.teacher.artefact import teacher_spec

REPO = Path(__file__).resolve().parents[1]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: tag -> [(step, value)] in file order. An event
    file is a sequence of records: length (uint64), its CRC (uint32), an ``Event`` protobuf, the data's CRC."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out[v.tag].append((event.step, v.simple_value))
    return dict(out)


# ----------------------------------------------------------------------------------------------------------
# The config field
# ----------------------------------------------------------------------------------------------------------


def errors_of(*overrides: str) -> list[str]:
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({}, list(overrides))
    return e.value.errors


def test_tracking_defaults_to_tensorboard_and_takes_any_subset():
    assert C.Config().storage.tracking == ("tensorboard",)
    assert C.from_dict({}, ["storage.tracking=[mlflow, wandb]"]).storage.tracking == ("mlflow", "wandb")
    assert C.from_dict({"storage": {"tracking": []}}).storage.tracking == ()
    assert C.from_dict({"storage": {"tracking": ["wandb", "tensorboard", "mlflow"]}}).storage.tracking == (
        "wandb", "tensorboard", "mlflow")


def test_unknown_or_repeated_trackers_are_one_line_each():
    assert errors_of("storage.tracking=[tensorbord]") == [
        "storage.tracking[0]: 'tensorbord' is not allowed; expected one of 'tensorboard', 'mlflow', 'wandb' "
        "(did you mean 'tensorboard'?)"]
    [line] = errors_of("storage.tracking=[mlflow, neptune]")
    assert line.startswith("storage.tracking[1]: 'neptune' is not allowed; expected one of 'tensorboard', 'mlflow', "
                           "'wandb'")
    assert errors_of("storage.tracking=[mlflow, mlflow]") == [
        "storage.tracking: ['mlflow', 'mlflow'] has duplicates; each tracker once"]
    [line] = errors_of("storage.tracking=mlflow")
    assert line.startswith("storage.tracking: 'mlflow' is not allowed; expected a list of")


def test_tracking_changes_no_fingerprint_and_a_rerun_may_change_it(tmp_path):
    """Trackers change where metrics are shown, not what is computed: the same teacher keys, plan and local cell
    directories, and a sweep may be rerun with other trackers (``check_same_sweep`` does not refuse it)."""
    a = tiny_config(tmp_path, "storage.tracking=[tensorboard]")
    b = tiny_config(tmp_path, "storage.tracking=[mlflow, wandb]")
    assert teacher_spec(a, "meta", None, 0.5, 0).key == teacher_spec(b, "meta", None, 0.5, 0).key
    assert make_plan(a).to_json() == make_plan(b).to_json()
    assert cell_dir_name(a, "beta", "meta/meta_kd", 0.5, 0) == cell_dir_name(b, "beta", "meta/meta_kd", 0.5, 0)
    storage = Storage(str(tmp_path))
    storage.write_bytes(C.to_yaml(a).encode(), "sweeps", a.name, "config.yaml")
    storage.write_json(make_plan(a).to_json(), "sweeps", a.name, "plan.json")
    check_same_sweep(b, storage)  # no SweepConflict


def test_a_config_field_added_since_is_no_change_but_a_changed_value_is(tmp_path):
    """A sweep written before ``sweep.seeds_per_rate`` existed (its config.yaml lacks the field) resumes; a sweep
    whose seeds changed is refused."""
    from metakd_ray.sweep.run import SweepConflict

    a = tiny_config(tmp_path)
    storage = Storage(str(tmp_path))
    old = C.to_dict(a)
    del old["sweep"]["seeds_per_rate"]
    storage.write_bytes(yaml.safe_dump(old).encode(), "sweeps", a.name, "config.yaml")
    storage.write_json(make_plan(a).to_json(), "sweeps", a.name, "plan.json")
    check_same_sweep(a, storage)  # no SweepConflict
    with pytest.raises(SweepConflict, match="sweep.seeds"):
        check_same_sweep(tiny_config(tmp_path, "sweep.seeds=[7]"), storage)


def test_a_tracker_whose_package_is_missing_fails_preflight_with_the_pip_command(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    cfg = tiny_config(tmp_path, "storage.tracking=[tensorboard, wandb]")
    found = preflight.findings(cfg, data=False, models=False, storage=False)
    assert found.errors == ["storage.tracking: wandb needs the wandb package, which is not installed; run: "
                            "pip install 'wandb>=0.31.0' (the project's [wandb] extra)"]
    [line] = tracking.check(("mlflow",), str(tmp_path))
    assert "pip install 'mlflow-skinny" in line and "\n" not in line
    assert tracking.check(("tensorboard",), str(tmp_path)) == []


def test_mlflow_on_a_remote_storage_root_needs_a_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path, "storage.tracking=[mlflow]", "storage.root=s3://bucket/runs")
    [line] = tracking.check(cfg.storage.tracking, cfg.storage.root)
    assert line.startswith("storage.tracking: mlflow with storage.root=s3://bucket/runs needs MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.check(cfg.storage.tracking, cfg.storage.root) == []


# ----------------------------------------------------------------------------------------------------------
# The teacher's writer
# ----------------------------------------------------------------------------------------------------------

EPOCHS = [{"stage": "teacher-meta", "epoch": e, "step": 4 * (e + 1), "train_loss": 1.0 - 0.1 * e, "train_ce": 0.5,
           "dev_acc_alpha": 0.5 + 0.1 * e, "dev_acc_mean": 0.6 + 0.1 * e} for e in range(2)]


def test_teacher_tracker_writes_each_epoch_to_a_remote_root_and_nothing_when_off(tmp_path):
    """On a non-local filesystem the event file is written locally and copied after every epoch (here a pyarrow
    SubTreeFileSystem, which the storage layer treats like s3://); with ``tracking: []`` nothing is written."""
    root = tmp_path / "remote"
    root.mkdir()
    storage = Storage("", filesystem=pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))
    assert not storage.is_local
    cfg = tiny_config(tmp_path, "teacher.epochs=2")
    spec = teacher_spec(cfg, "meta", None, 0.5, 0)
    tracker = tracking.teacher_tracking(cfg, spec, storage).open()
    folder = root / "sweeps" / cfg.name / "tracking" / "teachers" / spec.key
    tracker.log(EPOCHS[0])
    assert scalars(folder)["dev_acc_mean"] == [(0, pytest.approx(0.6))]  # there after the first epoch already
    tracker.log(EPOCHS[1])  # the last of teacher.epochs=2: closes the tracker
    tracker.close()  # a second close does nothing
    got = scalars(folder)
    assert got["dev_acc_mean"] == [(0, pytest.approx(0.6)), (1, pytest.approx(0.7))]
    assert got["train_loss"] == [(0, pytest.approx(1.0)), (1, pytest.approx(0.9))]
    assert set(got) == {"train_loss", "train_ce", "dev_acc_alpha", "dev_acc_mean"}  # not epoch, step or stage

    off = tiny_config(tmp_path / "off", "storage.tracking=[]")
    quiet = tracking.teacher_tracking(off, spec, Storage(str(tmp_path / "off"))).open()
    quiet.log(EPOCHS[0])
    quiet.close()
    assert not (tmp_path / "off").exists()


def test_teacher_epochs_reach_tensorboard_and_mlflow(tmp_path, monkeypatch):
    """A teacher made in local mode (``ray.train_workers=0``: the worker loop runs in this process, as rank 0):
    every epoch of its history, as its manifest records it, is in its TensorBoard folder and its MLflow run."""
    from mlflow import MlflowClient

    from metakd_ray.teacher.job import ensure_teacher

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path, "ray.train_workers=0", "storage.tracking=[tensorboard, mlflow]", "name=teach")
    spec = teacher_spec(cfg, "meta", None, 0.5, 0)
    pickle.loads(pickle.dumps(tracking.teacher_tracking(cfg, spec, Storage(str(tmp_path)))))  # goes to workers
    history = ensure_teacher(cfg, spec, Storage(str(tmp_path)), inputs=toy.ToyInputs()).manifest["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]

    got = scalars(tmp_path / "sweeps" / "teach" / "tracking" / "teachers" / spec.key)
    assert got["dev_acc_mean"] == [(h["epoch"], pytest.approx(h["dev_acc_mean"])) for h in history]
    assert got["train_loss"] == [(h["epoch"], pytest.approx(h["train_loss"])) for h in history]
    assert {f"dev_acc_{d}" for d in toy.DOMAINS} <= set(got)

    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'teach' / 'tracking' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("teach").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["teacher_key"] == spec.key
    assert run.data.params["kind"] == "meta" and run.data.params["teacher.epochs"] == "4"
    dev = sorted(client.get_metric_history(run.info.run_id, "dev_acc_mean"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in dev] == [(h["epoch"], pytest.approx(h["dev_acc_mean"])) for h in history]


# ----------------------------------------------------------------------------------------------------------
# One toy sweep: the students, through Ray Tune's logger callbacks
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory):
    """The toy sweep cut to one ``none/finetune`` cell (no teacher, no cache: the trials are what is tested here)
    with TensorBoard and MLflow on, run once through the CLI on an embedded Ray. Returns (its process, the sweep
    directory)."""
    pytest.importorskip("mlflow")
    project = tmp_path_factory.mktemp("tracked")
    cfg = toy.write_toy_project(project)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_", "RAY_ADDRESS"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    r = subprocess.run([sys.executable, "-m", "metakd_ray.sweep", str(cfg), "ray.address=local", "ray.num_cpus=2",
                        "name=tracked", "storage.tracking=[tensorboard, mlflow]", "sweep.methods=[none/finetune]",
                        "sweep.trials_per_cell=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    return r, project / "runs" / "sweeps" / "tracked"


def _tail(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _trial_dir(sweep: Path, r: subprocess.CompletedProcess) -> Path:
    trials = [d for d in (sweep / "tune").iterdir() if d.is_dir()] if (sweep / "tune").is_dir() else []
    assert len(trials) == 1, _tail(r)
    return trials[0]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(480)
def test_tensorboard_gets_each_trials_dev_acc(tracked_sweep):
    r, sweep = tracked_sweep
    got = scalars(_trial_dir(sweep, r))
    dev = [v for _, v in got.get("ray/tune/dev_acc", [])]
    # one report per epoch (the toy's distill.stage2_epochs=2), then the final row with the test accuracy
    assert len(dev) == 3 and all(0.0 <= v <= 1.0 for v in dev), (sorted(got), _tail(r))
    assert len(got["ray/tune/test_acc"]) == 1 and "ray/tune/train_loss" in got


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(480)
def test_mlflow_local_store_holds_the_same_dev_acc(tracked_sweep):
    from mlflow import MlflowClient

    r, sweep = tracked_sweep
    store = sweep / "tracking" / "mlflow.db"
    assert store.is_file(), _tail(r)
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("tracked")  # experiment = the sweep's name
    assert experiment.artifact_location == (sweep / "tracking" / "mlartifacts").as_uri()
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "student"
    assert run.data.params["sweep"] == "tracked" and "test_acc" in run.data.metrics
    history = sorted(client.get_metric_history(run.info.run_id, "dev_acc"), key=lambda m: m.step)
    tensorboard = scalars(_trial_dir(sweep, r))["ray/tune/dev_acc"]
    assert [(m.step, m.value) for m in history] == [(step, pytest.approx(v)) for step, v in tensorboard]

"""A trial's own record and state (what results and resume are built from), and the trial run by a real Ray Tune:
its final record, and a finished trial restarted under another id that reports its record without training."""

from __future__ import annotations

import pytest
import toy
import yaml

from metakd_ray import config as C
from metakd_ray.storage import Storage
from metakd_ray.sweep.plan import Cell
from metakd_ray.sweep.records import ERROR, OK, RUNNING, TrialRecord, TrialStore, error_line, trial_key


def _store(tmp_path) -> TrialStore:
    return TrialStore(Storage(str(tmp_path / "runs")).sub("sweeps", "s"))


def test_record_lifecycle_and_keys(tmp_path):
    store = _store(tmp_path)
    key = trial_key("beta|1|meta/meta_kd|0|-", 0, {"stage2_lr": 0.003})
    # keyed by what the trial is, not by Tune's id: the slot and every hyper-parameter count
    assert key == trial_key("beta|1|meta/meta_kd|0|-", 0, {"stage2_lr": 0.003})
    assert len({key, trial_key("beta|1|meta/meta_kd|0|-", 1, {"stage2_lr": 0.003}),
                trial_key("beta|1|meta/meta_kd|0|-", 0, {"stage2_lr": 0.01}),
                trial_key("beta|0.5|meta/meta_kd|0|-", 0, {"stage2_lr": 0.003})}) == 4
    assert store.read(key) is None
    rec = TrialRecord(key, "beta|1|meta/meta_kd|0|-", 0, {"stage2_lr": 0.003}).started("t1", "tune")
    store.write(rec)
    assert store.read(key) == rec and rec.status == RUNNING and rec.attempts == 1
    failed = rec.reported("stage1", 0, 0.0).failed(error_line(RuntimeError("boom\nmore")))
    store.write(failed)
    assert store.read(key).status == ERROR and store.read(key).error == "RuntimeError: boom"
    again = store.read(key).started("t9", "tune")  # Tune retries it under a new id after a restore
    assert again.attempts == 2 and again.start_time == rec.start_time and again.status == RUNNING
    done = again.finished({"phase": "final", "test_acc": 0.7, "dev_acc": 0.6, "epoch": -1})
    store.write(done)
    got = store.read(key)
    assert got.status == OK and got.final["test_acc"] == 0.7 and got.errors == ("RuntimeError: boom",)
    assert [r.key for r in store.records()] == [key]


def test_states_are_overwritten_and_unfinished_ones_dropped(tmp_path):
    store = _store(tmp_path)
    for n in range(3):
        store.write_state("a", f"state {n}".encode())
    store.write_state("b", b"x")
    assert store.read_state("a") == b"state 2" and store.read_state("zzz") is None
    trials = tmp_path / "runs" / "sweeps" / "s" / "trials"
    assert sorted(p.name for p in trials.iterdir()) == ["a.pt", "b.pt"]  # one file each, no temporary files left
    store.drop_state("b")
    store.write(TrialRecord("a", "c", 0, {}))
    assert store.drop_unfinished_states() == ["a.pt"]
    assert sorted(p.name for p in trials.iterdir()) == ["a.json"]  # records stay


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_trial_in_real_tune_writes_its_final_record_and_a_restart_reports_it(ray_session, tmp_path):
    from ray import tune

    from metakd_ray.sweep.run import absolute_paths
    from metakd_ray.sweep.trial import run_trial

    cfg = absolute_paths(C.load(toy.write_toy_project(tmp_path / "proj")))
    storage = Storage(cfg.storage.root)
    storage.write_bytes(C.to_yaml(cfg).encode(), "sweeps", "s", "config.yaml")
    cell = Cell("beta", 1.0, "none/finetune", 0)
    space = {**cell.to_json(), "hp": {"stage2_lr": 0.003}, "slot": 0, "storage_root": storage.uri(), "sweep": "s",
             "precision": "fp32"}

    def fit(experiment: str):
        tuner = tune.Tuner(tune.with_resources(run_trial, {"cpu": 1}), param_space={**space, "experiment": experiment},
                           run_config=tune.RunConfig(name=experiment, storage_path=storage.uri("sweeps", "s"),
                                                     verbose=0))
        (result,) = list(tuner.fit())
        return result

    # the trainable and its config come from the package: nothing of tests/ is shipped to workers
    first = fit("tune")
    store = TrialStore(storage.sub("sweeps", "s"))
    (rec,) = store.records()
    assert rec.status == OK and rec.attempts == 1 and rec.experiment == "tune" and rec.trial_id == first.metrics[
        "trial_id"]
    assert rec.final["phase"] == "final" and 0.0 <= rec.final["test_acc"] <= 1.0 and rec.final["n_train"] > 0
    assert rec.final["node_id"] == ray_session.get_runtime_context().get_node_id()  # the session's one node
    assert rec.final == {k: first.metrics[k] for k in rec.final}  # what Tune got is the record
    assert store.read_state(rec.key) is None  # the training state is gone once the trial is done
    assert yaml.safe_load((tmp_path / "proj" / "runs" / "sweeps" / "s" / "config.yaml").read_text())["name"]
    check_kept_outputs(tmp_path / "proj", storage.sub("sweeps", "s"), rec)
    # the same trial again (a restored searcher suggesting it under a new id): no training, the record reported
    second = fit("tune-again")
    (again,) = store.records()
    assert again == rec  # untouched: not started again
    assert {k: second.metrics[k] for k in rec.final} == rec.final
    assert second.metrics["trial_id"] != rec.trial_id


def check_kept_outputs(project, sweep: Storage, rec: TrialRecord) -> None:
    """A finished trial's predictions, resolved config and exported student (``sweep/students.py``): the student is
    the one that made the predictions (fp32 here: same probabilities to 1e-5), and they give its test accuracy."""
    import io

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from metakd_ray.sweep import students as S

    final = rec.final
    preds = pq.read_table(io.BytesIO(sweep.read_bytes("trials", f"{rec.key}{S.PREDICTIONS_SUFFIX}"))).to_pandas()
    test = pd.read_csv(project / "corpus" / "test.csv")
    test = test[test["domain"] == "beta"]
    assert sorted(preds["id"]) == sorted(f"test/{i:06d}" for i in test.index)
    assert (preds["pred"] == preds["label"]).mean() == pytest.approx(final["test_acc"], abs=1e-12)
    assert all(abs(sum(p) - 1) < 1e-5 for p in preds["probs"])
    resolved = yaml.safe_load(sweep.read_bytes("trials", f"{rec.key}{S.CONFIG_SUFFIX}"))
    assert resolved["cell"]["method"] == "none/finetune" and resolved["hp"] == {"stage2_lr": 0.003}
    assert resolved["config"]["distill"]["stage2_lr"] == 0.003 and C.from_dict(resolved["config"])
    folder = sweep.local_path("students", rec.key)
    assert final["student_dir"] == str(folder) and final["student_bytes"] == sweep.tree_size("students", rec.key) > 0
    assert 0 < final["n_params"] < final["teacher_params"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert sum(p.numel() for p in model.parameters()) == final["n_params"]
    texts = dict(zip((f"test/{i:06d}" for i in test.index), test["text"]))
    with torch.no_grad():
        probs = [model(**tok(texts[i], truncation=True, return_tensors="pt")).logits.softmax(-1)[0]
                 for i in preds["id"]]
    assert torch.allclose(torch.stack(probs), torch.from_numpy(np.stack(preds["probs"])), atol=1e-5)

"""The trial's own state store: what a trial resumes from when Tune restarts it (after a failure or a killed driver)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from metakd_ray import trial as TR


def _config(tmp_path, slot: int = 0, **hp) -> dict:
    return {"storage_root": str(tmp_path / "runs"), "sweep": "s", "cell": "beta|1|meta/meta_kd|0|-", "slot": slot,
            "hp": hp or {"stage2_lr": 0.003}}


def test_store_starts_empty_then_holds_the_newest_state(tmp_path):
    store = TR.TrialStateStore(_config(tmp_path), "t1")
    assert store.load() == {"states": {}, "best_dev": float("-inf"), "final": None}
    for epoch in range(3):
        store.save({"states": {"stage1": {"epoch": epoch, "w": torch.full((2,), float(epoch))}}, "best_dev": 0.5})
    got = store.load()
    assert got["states"]["stage1"]["epoch"] == 2 and torch.equal(got["states"]["stage1"]["w"], torch.full((2,), 2.0))
    assert got["best_dev"] == 0.5 and got["final"] is None
    # one file, overwritten in place; no temporary files left behind
    states = tmp_path / "runs" / "sweeps" / "s" / "trial_states"
    assert sorted(p.name for p in states.iterdir()) == [f"{store.key}.pt"]
    # keyed by what the trial is, not by Tune's id: the same trial suggested again under a new id finds its state
    assert TR.TrialStateStore(_config(tmp_path), "t9").load()["states"]["stage1"]["epoch"] == 2
    assert TR.TrialStateStore(_config(tmp_path, slot=1), "t1").load()["states"] == {}
    assert TR.TrialStateStore(_config(tmp_path, stage2_lr=0.01), "t1").load()["states"] == {}
    # the final record replaces the training state
    store.save_final({"phase": TR.FINAL, "test_acc": 0.7}, 0.5)
    assert store.load() == {"states": {}, "best_dev": 0.5, "final": {"phase": TR.FINAL, "test_acc": 0.7}}
    assert sorted(p.name for p in states.iterdir()) == [f"{store.key}.final.json"]


def test_unfinished_states_are_dropped_final_records_kept(tmp_path):
    a, b = TR.TrialStateStore(_config(tmp_path), "t1"), TR.TrialStateStore(_config(tmp_path, slot=1), "t2")
    a.save({"states": {"stage1": {"w": torch.ones(3)}}, "best_dev": 0.1})
    b.save({"states": {"stage1": {"w": torch.ones(3)}}, "best_dev": 0.1})
    b.save_final({"phase": TR.FINAL}, 0.2)
    assert TR.drop_unfinished_states(str(tmp_path / "runs"), "s") == [f"{a.key}.pt"]
    assert a.load()["states"] == {} and b.load()["final"] == {"phase": TR.FINAL}


def test_final_reported_reads_tunes_result_log(tmp_path):
    store = TR.TrialStateStore(_config(tmp_path), "t1")
    assert not store.final_reported()
    log = tmp_path / "runs" / "sweeps" / "s" / "tune" / "t1" / "result.json"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"phase": "stage1", "epoch": 0}) + "\n")
    assert not store.final_reported()
    log.write_text(log.read_text() + json.dumps({"phase": TR.FINAL, "test_acc": 0.7}) + "\n")
    assert store.final_reported()


@pytest.mark.parametrize("logged", [False, True])
def test_a_finished_trial_restarted_reports_its_final_result_only_if_tune_lost_it(tmp_path, monkeypatch, logged):
    from ray import tune

    cfg = _config(tmp_path)
    final = {"phase": TR.FINAL, "test_acc": 0.71, "dev_acc": 0.7}
    TR.TrialStateStore(cfg, "t1").save_final(final, 0.7)
    if logged:
        log = tmp_path / "runs" / "sweeps" / "s" / "tune" / "t1" / "result.json"
        log.parent.mkdir(parents=True)
        log.write_text(json.dumps(final) + "\n")
    reports = []
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: reports.append(metrics))
    TR.run_trial(cfg)  # returns before any training: the state says the trial is done
    assert reports == ([] if logged else [final])

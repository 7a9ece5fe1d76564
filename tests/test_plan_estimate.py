"""The plan's cost estimate comes from the shipped calibration (measured by benchmarks/precision.py and
smoke_precision.py): per precision, grouped or random batches, plus per-run overheads."""

from __future__ import annotations

import pytest
from toy import tiny_config

from metakd_ray import runtime as R
from metakd_ray.sweep.plan import calibration, estimate_cost, make_plan

SIZES = {"alpha": 1000, "beta": 1000, "gamma": 1000}


def test_the_calibration_ships_with_the_package():
    cal = calibration()
    assert cal["source"] == "python benchmarks/precision.py" and cal["measured"]
    for key in ("fp32", "bf16"):
        assert cal["seconds_per_example"][key]["teacher_epoch"] > 0
        assert cal["overhead_seconds"][key]["trial"] > 0


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(R, "cpu_has_bf16", lambda: True)


def test_estimate_follows_precision_grouping_and_counts_runs(tmp_path, bf16_cpu):
    def total(*o):
        cfg = tiny_config(tmp_path, *o)
        return estimate_cost(cfg, make_plan(cfg), SIZES)

    fp32 = total("compute.precision=fp32")
    bf16 = total("compute.precision=auto")
    fp32_random = total("compute.precision=fp32", "compute.group_by_length=false")
    assert bf16["total_cpu_s"] < fp32["total_cpu_s"] < fp32_random["total_cpu_s"]
    cal = calibration()
    cfg = tiny_config(tmp_path, "compute.precision=auto")
    p = make_plan(cfg)
    sec = cal["seconds_per_example"]["bf16"]
    teacher = sum(sum(SIZES[d] for d in t["domains"]) * t["rate"] for t in p.teachers) * cfg.teacher.epochs
    expected = teacher * sec["teacher_epoch"] + len(p.teachers) * cal["overhead_seconds"]["bf16"]["teacher_run"]
    assert bf16["teacher_cpu_s"] == round(expected)
    assert "precision.py" in bf16["calibration"]


def test_min_steps_raises_the_estimate_of_small_splits_only(tmp_path, bf16_cpu):
    # 1000 examples per domain, batch 8: 125 batches per epoch at rate 1, 13 at rate 0.1
    def trials(rate, *o):
        cfg = tiny_config(tmp_path, "compute.precision=auto", f"sweep.sample_rates=[{rate}]", *o)
        return estimate_cost(cfg, make_plan(cfg), SIZES)["trial_cpu_s"]

    assert trials(1.0, "distill.min_steps=300") == trials(1.0)  # 3 epochs x 125 batches > 300 steps already
    plain, raised = trials(0.1), trials(0.1, "distill.min_steps=300")  # 3 epochs of 13 batches -> 24 epochs
    overhead = len(make_plan(tiny_config(tmp_path, "sweep.sample_rates=[0.1]")).cells) * \
        calibration()["overhead_seconds"]["bf16"]["trial"]
    assert (raised - overhead) == pytest.approx(8 * (plain - overhead), rel=0.01)


def test_each_trial_adds_its_dev_evaluations_per_selected_epoch_and_its_test_split(tmp_path, bf16_cpu):
    # dev is scored after every stage-2 epoch (the stage selected on dev), test once; min_steps raises the epochs
    evals = {"dev": {"alpha": 200, "beta": 300, "gamma": 400}, "test": {"alpha": 100, "beta": 100, "gamma": 100}}
    sec = calibration()["seconds_per_example"]["bf16"]["eval"]

    def added(*o):
        cfg = tiny_config(tmp_path, "compute.precision=auto", "sweep.sample_rates=[0.1]", *o)
        p = make_plan(cfg)
        return estimate_cost(cfg, p, SIZES, evals)["trial_cpu_s"] - estimate_cost(cfg, p, SIZES)["trial_cpu_s"], p

    plain, p = added()
    cfg = tiny_config(tmp_path, "sweep.sample_rates=[0.1]")
    scored = sum(cfg.distill.stage2_epochs * evals["dev"][c.domain] + evals["test"][c.domain] for c in p.cells)
    assert plain == pytest.approx(scored * p.trials_per_cell * sec, abs=1)
    raised, _ = added("distill.min_steps=300")  # 13 batches per epoch at rate 0.1: 24 selected epochs
    scored = sum(24 * evals["dev"][c.domain] + evals["test"][c.domain] for c in p.cells)
    assert raised == pytest.approx(scored * p.trials_per_cell * sec, abs=1)
    assert make_plan(cfg, SIZES, evals).estimate["trial_cpu_s"] > make_plan(cfg, SIZES).estimate["trial_cpu_s"]


def test_teacher_min_steps_raises_the_teacher_estimate_of_small_pools_only(tmp_path, bf16_cpu):
    def teachers(rate, *o):
        cfg = tiny_config(tmp_path, "compute.precision=auto", f"sweep.sample_rates=[{rate}]", *o)
        return estimate_cost(cfg, make_plan(cfg), SIZES)["teacher_cpu_s"]

    assert teachers(1.0, "teacher.min_steps=100") == teachers(1.0)  # 125+ batches per epoch already
    assert teachers(0.1, "teacher.min_steps=400") > teachers(0.1)

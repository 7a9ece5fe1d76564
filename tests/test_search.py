"""The grid-of-studies searcher: exact grid coverage, one Optuna study per cell, defaults first, restore."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest

from metakd_ray import config as C
from metakd_ray.config import TUNABLE
from metakd_ray.sweep.plan import plan_cells
from metakd_ray.sweep.search import GridOfStudiesSearcher

DEFAULTS = {"stage1_lr": 5e-5, "stage2_lr": 3e-5, "temperature": 1.0, "gamma2": 0.5}


def make(cells, per_cell=3, names=("stage1_lr", "stage2_lr", "temperature", "gamma2"), axis=False):
    return GridOfStudiesSearcher(cells, names, DEFAULTS, per_cell, "dev_acc", "max", gamma2_is_axis=axis, seed=7)


def test_tunable_names_match_config():
    assert tuple(TUNABLE) == C.TUNABLE_NAMES


def test_every_cell_gets_exactly_its_budget_then_finished():
    cfg = C.from_dict({}, ["sweep.target_domains=[books, dvd]", "sweep.sample_rates=[0.1, 1.0]",
                           "sweep.methods=[single/tinybert_kd, meta/meta_kd, none/finetune]"])
    cells = [c.to_json() for c in plan_cells(cfg)]
    assert len(cells) == 2 * 2 * 3
    s = make(cells, per_cell=3)
    configs = []
    for i in range(len(cells) * 3):
        cfg_i = s.suggest(f"t{i}")
        assert isinstance(cfg_i, dict)
        configs.append(cfg_i)
        s.on_trial_complete(f"t{i}", {"dev_acc": 0.5 + 0.01 * i, "training_iteration": 1})
    assert s.suggest("extra") == GridOfStudiesSearcher.FINISHED
    assert Counter(c["cell"] for c in configs) == {c["cell"]: 3 for c in cells}
    for c in configs:  # hyper-parameters only where they mean something
        student = c["method"].split("/")[1]
        assert ("stage1_lr" in c["hp"]) == (student != "finetune")
        assert ("gamma2" in c["hp"]) == (student == "meta_kd")
    firsts = {}
    for c in configs:
        firsts.setdefault(c["cell"], c)
    for c in firsts.values():  # the first trial of each cell runs the configured recipe
        assert all(v == pytest.approx(DEFAULTS[k]) for k, v in c["hp"].items())
    later = [c for c in configs if c is not firsts[c["cell"]]]
    assert any(c["hp"]["stage2_lr"] != pytest.approx(DEFAULTS["stage2_lr"]) for c in later)


def test_gamma2_axis_is_not_tuned_and_collapses_for_other_methods():
    cfg = C.from_dict({}, ["sweep.target_domains=[books]", "sweep.gamma2=[0.0, 0.5, 1.0]",
                           "sweep.methods=[single/tinybert_kd, meta/meta_kd]"])
    cells = [c.to_json() for c in plan_cells(cfg)]
    assert sorted(c["gamma2"] for c in cells if c["method"] == "meta/meta_kd") == [0.0, 0.5, 1.0]
    assert [c["gamma2"] for c in cells if c["method"] == "single/tinybert_kd"] == [None]
    s = make(cells, per_cell=1, axis=True)
    got = [s.suggest(f"t{i}") for i in range(len(cells))]
    assert all("gamma2" not in c["hp"] for c in got)


def test_seeds_per_rate_runs_the_first_seeds_at_each_rate():
    cfg = C.from_dict({}, ["sweep.target_domains=[books]", "sweep.sample_rates=[0.05, 1.0]", "sweep.seeds=[4, 5, 6]",
                           "sweep.seeds_per_rate=[3, 1]", "sweep.methods=[single/tinybert_kd, meta/meta_kd]"])
    got = Counter((c.rate, c.seed) for c in plan_cells(cfg))
    assert got == {(0.05, 4): 2, (0.05, 5): 2, (0.05, 6): 2, (1.0, 4): 2}
    assert cfg.sweep.seeds_at(0.05) == (4, 5, 6) and cfg.sweep.seeds_at(1.0) == (4,)
    everywhere = C.from_dict({}, ["sweep.sample_rates=[0.05, 1.0]", "sweep.seeds=[4, 5]"])
    assert {c.seed for c in plan_cells(everywhere) if c.rate == 1.0} == {4, 5}  # empty: every seed at every rate


@pytest.mark.parametrize("counts", ["[3]", "[1, 4]", "[0, 1]"])
def test_seeds_per_rate_must_give_one_count_per_rate_within_the_seeds(counts):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({}, ["sweep.sample_rates=[0.05, 1.0]", "sweep.seeds=[0, 1, 2]", f"sweep.seeds_per_rate={counts}"])
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith("sweep.seeds_per_rate"), e.value.errors


def test_save_and_restore_continue_where_it_stopped(tmp_path):
    cfg = C.from_dict({}, ["sweep.target_domains=[books, dvd]", "sweep.methods=[meta/meta_kd]"])
    cells = [c.to_json() for c in plan_cells(cfg)]
    s = make(cells, per_cell=2)
    first = [s.suggest(f"t{i}") for i in range(3)]
    s.on_trial_complete("t0", {"dev_acc": 0.7, "training_iteration": 1})
    s.save(str(tmp_path / "s.pkl"))
    r = make(cells, per_cell=2)
    r.restore(str(tmp_path / "s.pkl"))
    rest = [r.suggest(f"t{i}") for i in range(3, 5)]
    assert rest[-1] == GridOfStudiesSearcher.FINISHED
    assert Counter(c["cell"] for c in first + rest[:-1]) == {c["cell"]: 2 for c in cells}


def test_a_resumed_trial_reporting_an_epoch_again_is_quiet_and_keeps_the_first_value():
    cfg = C.from_dict({}, ["sweep.target_domains=[books]", "sweep.methods=[meta/meta_kd]"])
    s = make([c.to_json() for c in plan_cells(cfg)], per_cell=1)
    s.suggest("t0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for it in (1, 2, 2, 3):  # epoch 2 again after a restore from the state saved at epoch 1
            s.on_trial_result("t0", {"dev_acc": 0.5 + 0.1 * it, "training_iteration": it})
    (study,) = s.studies.values()
    assert study._ot_study.trials[0].intermediate_values == pytest.approx({1: 0.6, 2: 0.7, 3: 0.8})


def test_sweep_paths_are_made_absolute(tmp_path, monkeypatch):
    from metakd_ray.sweep.run import absolute_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METAKD_DATA", "../data")
    cfg = absolute_paths(C.from_dict({}, ["storage.root=runs/x", "data.root=corpus"]))
    assert cfg.storage.root == str(tmp_path / "runs" / "x") and cfg.data.root == str(tmp_path / "corpus")
    import os

    assert os.environ["METAKD_DATA"] == str(tmp_path.parent / "data")
    assert absolute_paths(C.from_dict({}, ["storage.root=s3://bucket/p"])).storage.root == "s3://bucket/p"

"""Config: typed loading, overrides, and one clear message per problem."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metakd_ray import config as C

REPO = Path(__file__).resolve().parents[1]


def errors_of(data: dict, overrides=()) -> list[str]:
    with pytest.raises(C.ConfigError) as ei:
        C.from_dict(data, list(overrides))
    return ei.value.errors


def test_defaults_are_the_papers():
    cfg = C.Config()
    assert cfg.teacher.lr == 2e-5 and cfg.teacher.batch_size == 32 and cfg.teacher.epochs == 3
    assert cfg.teacher.alpha == 0.5 and cfg.teacher.gamma1 == 0.5
    assert cfg.teacher.prototypes == "class" and cfg.teacher.false_domain == "uniform"
    assert cfg.distill.gamma2 == 0.5 and cfg.distill.temperature == 1.0 and cfg.distill.stages == "two"
    assert cfg.distill.stage1_lr == 5e-5 and cfg.distill.stage1_epochs == 10
    assert cfg.distill.stage2_lr == 3e-5 and cfg.distill.stage2_epochs == 3
    assert cfg.model.pooling == "mean" and cfg.data.split_seed == 11111 and cfg.data.max_length == 128


def test_configs_are_frozen():
    cfg = C.Config()
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(Exception):
        cfg.distill.gamma2 = 0.1  # type: ignore[misc]


def test_overrides_are_typed_and_applied():
    cfg = C.from_dict({}, ["distill.gamma2=0.2", "sweep.sample_rates=[0.01, 1.0]", "teacher.lr=3e-5",
                           "data.domains=[books, dvd]", "ray.use_gpu=false", "seed=7"])
    assert cfg.distill.gamma2 == 0.2
    assert cfg.sweep.sample_rates == (0.01, 1.0)
    assert cfg.teacher.lr == pytest.approx(3e-5)
    assert cfg.data.domains == ("books", "dvd")
    assert cfg.seed == 7
    # an int where a float is expected is fine; YAML's 1e-5 (no dot) is read as a number
    assert C.from_dict({"teacher": {"lr": "1e-5", "grad_norm": 2}}).teacher.grad_norm == 2.0
    assert C.from_dict({"teacher": {"lr": "1e-5"}}).teacher.lr == pytest.approx(1e-5)


def test_round_trip_through_yaml():
    cfg = C.from_dict({"sweep": {"sample_rates": [0.1, 0.5]}, "model": {"student": {"layers": [2, 4, 6]}}})
    again = C.from_dict(yaml.safe_load(C.to_yaml(cfg)))
    assert again == cfg


BAD = [
    # (data, overrides, substrings the single message must contain)
    ({"data": {"domians": ["books"]}}, [], ["data.domians", "unknown key", "did you mean 'data.domains'"]),
    ({"distill": {"gama2": 0.1}}, [], ["distill.gama2", "did you mean 'distill.gamma2'"]),
    ({"distill": {"lr": 0.1}}, [], ["distill.lr", "unknown key", "did you mean 'distill.stage1_lr'"]),
    ({"sweep": {"sample_rates": [0.0, 0.5]}}, [], ["sweep.sample_rates[0]", "0.0", "(0.0, 1.0]"]),
    ({"sweep": {"sample_rates": [1.5]}}, [], ["sweep.sample_rates[0]", "1.5", "out of range"]),
    ({"distill": {"gamma2": "high"}}, [], ["distill.gamma2", "'high'", "expected a number"]),
    ({"teacher": {"batch_size": 3.5}}, [], ["teacher.batch_size", "3.5", "expected an integer"]),
    ({"teacher": {"batch_size": 0}}, [], ["teacher.batch_size", "0", "[1, 65536]"]),
    ({"teacher": {"prototypes": "clas"}}, [], ["teacher.prototypes", "'clas'", "'class', 'domain'", "did you mean 'class'"]),
    ({"teacher": {"false_domain": "shuffle"}}, [], ["teacher.false_domain", "'uniform', 'permute'"]),
    ({"model": {"pooling": "max"}}, [], ["model.pooling", "'mean', 'reference', 'cls'"]),
    ({"data": {"dataset": "imdb"}}, [], ["data.dataset", "'amazon', 'mnli', 'table'"]),
    ({"data": {"domains": ["books", "dvds"]}}, [], ["data.domains[1]", "'dvds'", "did you mean 'dvd'"]),
    ({"data": {"max_length": 2}}, [], ["data.max_length", "out of range"]),
    ({"ray": {"use_gpu": "yes"}}, [], ["ray.use_gpu", "'yes'", "true or false"]),
    ({"sweep": {"methods": ["meta/tinybert"]}}, [], ["sweep.methods[0]", "did you mean 'meta/tinybert_kd'"]),
    ({"sweep": {"target_domains": ["music"]}}, [], ["sweep.target_domains[0]", "'music'", "not in data.domains"]),
    ({"model": {"student": {"source": "pretrained"}}}, [], ["model.student.path", "hub id or directory"]),
    ({"model": {"student": {"num_layers": 3, "layers": [2, 4]}}}, [], ["model.student.layers", "num_layers=3"]),
    ({"model": {"student": {"layers": [4, 2, 6]}}}, [], ["model.student.layers", "increasing"]),
    ({"data": "amazon"}, [], ["data", "expected a mapping"]),
    ({}, ["distill.gamma2"], ["distill.gamma2", "key=value"]),
    ({}, ["distill.temprature=2"], ["distill.temprature", "did you mean 'distill.temperature'"]),
    ({}, ["distill.temperature=0"], ["distill.temperature", "(0.0, 100.0]"]),
]


@pytest.mark.parametrize("data,overrides,needles", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_message(data, overrides, needles):
    errs = errors_of(data, overrides)
    assert len(errs) == 1, errs
    for n in needles:
        assert n in errs[0], (n, errs[0])


def test_every_error_is_reported_at_once():
    errs = errors_of({"data": {"domians": []}, "distill": {"gamma2": -1}, "teacher": {"epochs": "3"}})
    assert len(errs) == 3
    assert [e.split(":")[0] for e in errs] == ["data.domians", "distill.gamma2", "teacher.epochs"]


def test_errors_of_every_section_are_reported_together():
    errs = errors_of({"data": {"max_length": 2}, "sweep": {"methods": ["meta/tinybert"]},
                      "model": {"student": {"layers": [4, 2, 6]}, "dropout": 1.0}})
    assert [e.split(":")[0] for e in errs] == ["data.max_length", "sweep.methods[0]", "model.student.layers",
                                               "model.dropout"]


# Constructing a section directly checks it and gives the YAML path's message for the same value.
DIRECT = [
    # (id, construct, the same value as YAML data)
    ("temperature", lambda: C.DistillConfig(temperature=-1.0), {"distill": {"temperature": -1.0}}),
    ("replace-method", lambda: dataclasses.replace(C.SweepConfig(), methods=("meta/typo",)),
     {"sweep": {"methods": ["meta/typo"]}}),
    ("method-hint", lambda: C.SweepConfig(methods=("meta/tinybert",)), {"sweep": {"methods": ["meta/tinybert"]}}),
    ("stage2-epochs", lambda: C.DistillConfig(stage2_epochs=0), {"distill": {"stage2_epochs": 0}}),
    ("literal-hint", lambda: C.TeacherConfig(prototypes="clas"), {"teacher": {"prototypes": "clas"}}),
    ("layers", lambda: C.StudentConfig(num_layers=3, layers=(4, 2, 6)),
     {"model": {"student": {"num_layers": 3, "layers": [4, 2, 6]}}}),
    ("random-heads", lambda: C.StudentConfig(source="random", hidden_size=100),
     {"model": {"student": {"source": "random", "hidden_size": 100}}}),
    ("rate", lambda: C.SweepConfig(sample_rates=(0.0,)), {"sweep": {"sample_rates": [0.0]}}),
    ("tune", lambda: C.SweepConfig(tune=("temprature",)), {"sweep": {"tune": ["temprature"]}}),
    ("gamma2-axis", lambda: C.SweepConfig(gamma2=(0.5, 200.0)), {"sweep": {"gamma2": [0.5, 200.0]}}),
    ("no-seeds", lambda: C.SweepConfig(seeds=()), {"sweep": {"seeds": []}}),
    ("cache-actors", lambda: C.RayConfig(cache_actors=0), {"ray": {"cache_actors": 0}}),
    ("gpu-workers", lambda: C.RayConfig(use_gpu=True, train_workers=0), {"ray": {"use_gpu": True, "train_workers": 0}}),
    ("no-domains", lambda: C.DataConfig(domains=()), {"data": {"domains": []}}),
    ("domain-hint", lambda: C.DataConfig(domains=("books", "dvds")), {"data": {"domains": ["books", "dvds"]}}),
    ("table-files", lambda: C.DataConfig(dataset="table", domains=("a",)),
     {"data": {"dataset": "table", "domains": ["a"]}}),
    ("dev-fraction", lambda: C.TableConfig(dev_fraction=1.0), {"data": {"table": {"dev_fraction": 1.0}}}),
    ("target-domain", lambda: C.Config(sweep=C.SweepConfig(target_domains=("nope",))),
     {"sweep": {"target_domains": ["nope"]}}),
    ("root-seed", lambda: C.Config(seed=-1), {"seed": -1}),
    ("int-given-bool", lambda: C.TeacherConfig(batch_size=True), {"teacher": {"batch_size": True}}),
    ("float-given-str", lambda: C.DistillConfig(gamma2="high"), {"distill": {"gamma2": "high"}}),
    ("list-given-str", lambda: C.DataConfig(domains="books"), {"data": {"domains": "books"}}),
    ("storage", lambda: C.StorageConfig(cache_max_gb=float("inf")), {"storage": {"cache_max_gb": float("inf")}}),
    ("model", lambda: C.ModelConfig(pooling="max"), {"model": {"pooling": "max"}}),
    ("several", lambda: C.DistillConfig(stages="three", temperature=0, stage2_epochs=0),
     {"distill": {"stages": "three", "temperature": 0, "stage2_epochs": 0}}),
]


@pytest.mark.parametrize("make,data", [d[1:] for d in DIRECT], ids=[d[0] for d in DIRECT])
def test_constructing_a_bad_section_raises_the_yaml_message(make, data):
    expected = errors_of(data)
    with pytest.raises(C.ConfigError) as ei:
        make()
    assert ei.value.errors == expected
    assert str(ei.value) == "\n".join(expected)
    assert isinstance(ei.value, ValueError)


def test_constructed_sections_are_coerced_and_equal_the_yaml_ones():
    built = C.DistillConfig(temperature=2, gamma2=1)
    assert built == C.from_dict({"distill": {"temperature": 2, "gamma2": 1}}).distill
    assert type(built.temperature) is float and type(built.gamma2) is float
    sweep = C.SweepConfig(sample_rates=[1, 0.5], seeds=[0, 1], target_domains=["books"])
    assert sweep == C.from_dict({}, ["sweep.sample_rates=[1, 0.5]", "sweep.seeds=[0, 1]",
                                     "sweep.target_domains=[books]"]).sweep
    assert sweep.sample_rates == (1.0, 0.5) and type(sweep.sample_rates[0]) is float
    assert isinstance(sweep.seeds, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sweep.seeds = (2,)  # type: ignore[misc]
    cfg = C.Config(distill=built, sweep=sweep)
    assert cfg == C.from_dict(C.to_dict(cfg))
    assert C.Config() == C.from_dict({})
    assert dataclasses.replace(cfg.distill, stage2_epochs=1).stage2_epochs == 1


def test_tunable_names_live_in_one_place():
    assert C.TUNABLE_NAMES == tuple(C.TUNABLE) == C.SweepConfig().tune
    assert all(lo < hi for lo, hi, _ in C.TUNABLE.values())


def test_config_error_pickles_with_its_errors():
    err = pickle.loads(pickle.dumps(C.ConfigError(["a: bad", "b: bad"], "x.yaml")))
    assert err.errors == ["a: bad", "b: bad"] and err.source == "x.yaml"
    assert str(err) == "x.yaml: a: bad\nx.yaml: b: bad"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "metakd_ray.config", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_cli_validate_ok_prints_resolved_config():
    r = run_cli("validate", "sweeps/smoke.yaml", "distill.gamma2=0.25")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["distill"]["gamma2"] == 0.25
    assert C.from_dict(resolved) == C.load(REPO / "sweeps/smoke.yaml", ["distill.gamma2=0.25"])


def test_cli_validate_reports_every_error_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  domians: [books]\ndistill:\n  gamma2: x\n")
    r = run_cli("validate", str(bad), "sweep.sample_rates=[2]")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, r.stderr
    assert all(line.startswith("error: ") for line in lines)
    assert r.stdout == ""


def test_cli_missing_file_and_invalid_yaml(tmp_path):
    r = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such config file" in r.stderr
    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [unclosed\n")
    r = run_cli("validate", str(bad))
    assert r.returncode == 2 and "not valid YAML" in r.stderr


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_preset_validates(preset):
    C.load(REPO / "sweeps" / preset)


def test_write_resolved(tmp_path):
    cfg = C.from_dict({}, ["seed=5"])
    out = C.write_resolved(cfg, tmp_path / "run")
    assert C.load(out) == cfg

"""Safe by default (docs/reliability.md): saved states load with ``weights_only=True``, configs with
``yaml.safe_load``; an embedded Ray's dashboard answers on 127.0.0.1 only; ``ray job submit --working-dir .`` uploads
no environment, data, run or artefact."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from metakd_ray.training import CheckpointError, LocalCheckpointer, load_state, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED-by-a-checkpoint",))


def test_security_a_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "last.pt"
    torch.save({"model": {}, "evil": _Payload()}, bad)
    with pytest.raises(CheckpointError) as e:
        LocalCheckpointer(tmp_path).load()
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "PWNED-by-a-checkpoint").exists()


def test_security_a_real_training_state_round_trips_with_weights_only(tmp_path):
    import random

    import numpy as np

    state = {"rng": rng_state(), "history": [{"epoch": 0, "train_loss": 0.5}], "best_dev": 0.7,
             "model": {"w": torch.ones(2)}}
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    LocalCheckpointer(tmp_path).save(state, {"epoch": 0})
    loaded = LocalCheckpointer(tmp_path).load()
    set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert loaded["history"] == state["history"] and torch.equal(loaded["model"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(b"not a checkpoint", "trial x")


def test_security_no_unsafe_loader_in_the_package():
    """Every torch.load passes weights_only=True; YAML is read with safe_load only. (The Tune searcher's own
    save/restore, ``sweep/search.py``, pickles Optuna studies as Ray Tune's searcher API does; it reads only files
    of the sweep's own experiment directory.)"""
    problems = []
    for path in (REPO / "metakd_ray").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{path.name}: {m.group(0)}")
        problems += [f"{path.name}: {m.group(0)}" for m in re.finditer(r"yaml\.(load|unsafe_load|full_load)\(", text)]
        if path.name != "search.py":
            problems += [f"{path.name}: {m.group(0)}" for m in re.finditer(r"\bpickle\.loads?\(", text)]
    assert not problems, problems


def test_security_embedded_ray_dashboard_binds_to_localhost(monkeypatch):
    import ray

    from metakd_ray import config as C
    from metakd_ray.raycluster import connect_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for address in ("local", ""):
        monkeypatch.setattr("metakd_ray.raycluster.running_cluster", lambda *a, **k: None)
        assert connect_ray(C.from_dict({}, [f"ray.address={address}"])) == "local"
    assert len(calls) == 2 and all(kw["dashboard_host"] == "127.0.0.1" for kw in calls)


@pytest.mark.parametrize("path, uploaded", [
    (".venv/lib/python3.11/site-packages/torch/__init__.py", False),
    ("runs/smoke/teachers/x/model/model.safetensors", False),
    ("data/amazon-multi-domain-sentiment/books/positive.review", False),
    ("caches/abc/part-0.parquet", False),
    ("teachers/k/manifest.json", False),
    (".git/objects/ab/cdef", False),
    ("metakd_ray/data/readers.py", True),
    ("metakd_ray/cache/build.py", True),
    ("sweeps/smoke.yaml", True),
    ("pyproject.toml", True),
])
def test_security_job_working_dir_upload_excludes(path, uploaded):
    """What ``ray job submit --working-dir .`` would upload from the repository, by Ray's own ignore-file logic."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    excludes = get_excludes_from_ignore_files(REPO, include_gitignore=True)
    excluded = any(f(REPO / path) for f in excludes) or any(
        f(REPO / Path(*Path(path).parts[:i])) for f in excludes for i in range(1, len(Path(path).parts)))
    assert excluded is not uploaded

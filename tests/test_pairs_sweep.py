"""Sentence pairs with 3 labels (MNLI-shaped) end to end through the sweep command, on toy data and a tiny BERT:
every teacher kind and student method the config allows, so pair inputs are covered here and not only by the long
MNLI run.

The toy rule (``toy.pair_splits``) puts the label in the second text only: a model that never sees ``text_pair``
stays at chance (1/3), so accuracies well above it show the pairs reach the teachers, their caches and the
students."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import toy
from metakd_ray import config as C
from metakd_ray.results import cells as result_cells
from metakd_ray.results import load_results

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]
TARGET = "beta"


def _env(**extra: str) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1", "PYTHONUNBUFFERED": "1", **extra}
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    e.pop("RAY_ADDRESS", None)
    return e


def _processes_with(marker: bytes) -> list[int]:
    """Processes whose environment holds ``marker``: the driver and everything it started, Ray's daemons and
    workers included (they inherit its environment, whatever their process group)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (d / "environ").read_bytes():
                out.append(int(d.name))
        except OSError:  # gone, or not ours
            pass
    return out


def _run_sweep(cfg: Path, timeout: int) -> tuple[subprocess.CompletedProcess, list[int]]:
    """The sweep on an embedded Ray: (its result, the pids of its processes still alive 15 s after it exited —
    killed then)."""
    token = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "metakd_ray.sweep", str(cfg), "ray.address=local", "ray.num_cpus=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(METAKD_PAIRS_TEST=token), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        out += f"\n[test] killed after {timeout} s"
    deadline = time.time() + 15
    while (left := _processes_with(f"METAKD_PAIRS_TEST={token}".encode())) and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), left


@pytest.mark.timeout(300)
def test_pairs_train_every_teacher_kind_and_student_method(tmp_path):
    cfg_path = toy.write_pair_project(tmp_path)
    cfg = C.load(cfg_path)
    assert set(cfg.sweep.methods) == set(C.VALID_METHODS) and cfg.data.table.text_pair_column
    r, left = _run_sweep(cfg_path, timeout=260)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not left, f"the sweep's processes {left} outlived it"
    assert f"[sweep] {len(C.VALID_METHODS)}/{len(C.VALID_METHODS)} cells ok, 0 failed" in r.stdout

    # one finished trial per planned cell, one cell per method
    d = tmp_path / "runs" / "sweeps" / cfg.name
    plan = json.loads((d / "plan.json").read_text())
    assert sorted(c["method"] for c in plan["cells"]) == sorted(C.VALID_METHODS)
    assert {c["domain"] for c in plan["cells"]} == {TARGET}
    df = load_results(d)
    assert len(df) == len(plan["cells"]) and set(df["status"]) == {"TERMINATED"}, df[["cell", "status", "error"]]
    c = result_cells(df)
    assert sorted(c["method"]) == sorted(C.VALID_METHODS) and set(c["status"]) == {"ok"}
    for col in ("test_acc", "dev_acc"):
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in c[col]), c[["method", col]]

    # 3-class predictions on the target's test set, consistent with the reported accuracy
    test = pd.read_csv(tmp_path / "corpus" / "test.csv")
    n_test = int((test["domain"] == TARGET).sum())
    for _, row in c.iterrows():
        p = pd.read_parquet(d / "trials" / f"{row['trial_key']}.predictions.parquet")
        probs = np.stack(p["probs"])
        assert len(p) == n_test and probs.shape == (n_test, 3), row["method"]
        assert set(p["label"]) == {0, 1, 2} and set(p["pred"]) <= {0, 1, 2}, row["method"]
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-4) and (probs.argmax(axis=1) == p["pred"]).all()
        assert (p["pred"] == p["label"]).mean() == pytest.approx(row["test_acc"]), row["method"]
        student = json.loads((Path(row["student_dir"]) / "config.json").read_text())
        assert len(student["id2label"]) == 3, row["method"]

    # one teacher per kind, each with the 3 labels (a table corpus's string labels, sorted)
    manifests = [json.loads(f.read_text()) for f in (tmp_path / "runs" / "teachers").glob("*/manifest.json")]
    assert sorted(m["spec"]["kind"] for m in manifests) == sorted(C.TEACHER_KINDS)
    for m in manifests:
        assert m["label_names"] == sorted(toy.PAIR_LABELS), m["key"]
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in m["test_accuracy"].values()), m["key"]

    # The pair text reaches the models: the label is in the second text only, chance is 1/3.
    meta = next(m for m in manifests if m["spec"]["kind"] == "meta")
    assert min(meta["test_accuracy"][dom] for dom in toy.DOMAINS) >= 0.75, meta["test_accuracy"]
    acc = c.set_index("method")["test_acc"]
    assert acc["meta/meta_kd"] >= 0.6 and acc["none/finetune"] >= 0.6, acc

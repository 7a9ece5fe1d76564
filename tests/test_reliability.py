"""Reliability of the sweep service (docs/reliability.md): Ctrl-C and SIGTERM in every stage, then a rerun that
loses nothing; a trial process SIGKILLed mid-training; a full disk while a cache is written; two drivers on one
sweep; safe defaults. The sweeps run the real CLI on the toy project (tests/toy.py) on an embedded Ray, each with its
own storage root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import toy

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def env(**extra: str) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1", "PYTHONUNBUFFERED": "1", **extra}
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    e.pop("RAY_ADDRESS", None)
    return e


def sweep_cmd(cfg: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "metakd_ray.sweep", str(cfg), "ray.address=local", "ray.num_cpus=2", *overrides]


@pytest.fixture
def project(tmp_path) -> Path:
    """A toy project with its own storage root (nothing shared with other tests)."""
    return toy.write_toy_project(tmp_path / "toy").parent


def records(project: Path, name: str) -> dict[str, dict]:
    d = project / "runs" / "sweeps" / name / "trials"
    out = {}
    for f in d.glob("*.json") if d.is_dir() else ():
        try:
            out[f.stem] = json.loads(f.read_text())
        except ValueError:  # being replaced right now
            continue
    return out


def finished(project: Path, name: str) -> dict[str, dict]:
    return {k: r for k, r in records(project, name).items() if r["status"] == "ok"}


class Driver:
    """A sweep driver in its own process group, as a terminal runs it; its output goes to a log file."""

    def __init__(self, project: Path, log: Path, *overrides: str, **extra_env: str):
        self.log_path = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen(sweep_cmd(project / "sweep.yaml", *overrides), cwd=REPO, env=env(**extra_env),
                                     stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, predicate, timeout: float = 300) -> None:
        t0 = time.time()
        while not predicate():
            assert self.proc.poll() is None, f"driver ended ({self.proc.returncode}) first:\n{self.text()[-4000:]}"
            assert time.time() < t0 + timeout, f"timed out waiting; log:\n{self.text()[-4000:]}"
            time.sleep(0.1)

    def signal(self, sig: int) -> float:
        """Send ``sig`` to the driver's whole process group (what Ctrl-C in a terminal does); return when."""
        os.killpg(self.proc.pid, sig)
        return time.time()

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.out.close()


def run(project: Path, *overrides: str, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(project / "sweep.yaml", *overrides), cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------------------

STAGES = {  # stage -> (signal, "the driver is in this stage now")
    "teacher": (signal.SIGINT, lambda log: "[sweep] teacher 1/" in log),
    "cache": (signal.SIGTERM, lambda log: "[sweep] caches (" in log),
    "trials": (signal.SIGINT, None),  # a trial has saved an epoch: see below
}


@pytest.mark.timeout(900)
def test_fault_interrupt_in_each_stage_then_rerun_loses_nothing(project, tmp_path):
    """Ctrl-C while a teacher trains, SIGTERM while the caches are built, Ctrl-C while trials run: each stops the
    driver within seconds with 128 + the signal and one line; each rerun continues, and the last one ends with every
    planned cell ok, no finished trial started again."""
    name = "interrupted"
    overrides = (f"name={name}", "sweep.trials_per_cell=4", "distill.stage2_epochs=3")
    done_before: dict[str, dict] = {}
    for stage, (sig, in_stage) in STAGES.items():
        d = Driver(project, tmp_path / f"{stage}.log", *overrides)
        try:
            if in_stage is None:  # some trial is mid-training: its record is running and its state is saved
                trials = project / "runs" / "sweeps" / name / "trials"
                d.wait_for(lambda: any(trials.glob("*.pt")) if trials.is_dir() else False)
            else:
                d.wait_for(lambda: in_stage(d.text()))
            done_before = finished(project, name)
            sent = d.signal(sig)
            try:
                code = d.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{stage}: the driver still runs 60 s after {sig.name}; log:\n{d.text()[-4000:]}")
            took = time.time() - sent
        finally:
            if d.proc.poll() is None:
                d.kill()
        log = d.text()
        assert code == 128 + sig, f"{stage}: exit {code}\n{log[-4000:]}"
        assert took < 30, f"{stage}: {took:.0f} s to stop"
        assert "interrupted" in log and "rerun the same command to resume" in log, log[-3000:]
        assert "Traceback" not in log, log[-4000:]
        assert "cells ok" not in log  # no report claiming an outcome
        for key, rec in done_before.items():  # finished trials stay finished, untouched
            assert records(project, name)[key] == rec
        if stage == "trials":  # the unfinished trials kept their records (not done) and their states
            recs = records(project, name)
            assert any(r["status"] == "running" for r in recs.values())
            assert list((project / "runs" / "sweeps" / name / "trials").glob("*.pt"))
            plan = json.loads((project / "runs" / "sweeps" / name / "plan.json").read_text())
            assert not any(w.get("done") for w in plan.get("waves", []))
    r = run(project, *overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2/2 cells ok" in r.stdout
    after = records(project, name)
    assert len(after) == 2 * 4 and all(rec["status"] == "ok" for rec in after.values())
    for key, rec in done_before.items():  # not rerun: same record, same start time and trial id
        assert after[key] == rec
    resumed = [rec for key, rec in after.items() if key not in done_before and rec["attempts"] > 1]
    assert resumed, "a trial interrupted mid-training resumed"
    # one teacher run per teacher, one cache per cache, despite three interruptions
    runs = project / "runs"
    assert len(list((runs / "teachers").glob("*/manifest.json"))) == 2
    assert len(list((runs / "caches").glob("*/manifest.json"))) == 2
    assert not list((runs / "caches").glob(".staging-*"))


# ----------------------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_fault_trial_process_sigkilled_mid_training_is_retried_from_its_state(project):
    r = run(project, "name=sigkill", "sweep.trials_per_cell=1", "distill.stage2_epochs=3",
            METAKD_FAULTS="kill=meta")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = records(project, "sigkill")
    assert len(recs) == 2 and all(rec["status"] == "ok" for rec in recs.values())
    killed = [rec for rec in recs.values() if "meta" in rec["cell"]]
    assert len(killed) == 1 and killed[0]["attempts"] == 2
    assert killed[0]["final"]["resumed"], killed[0]  # the retry started from the saved epoch, not from scratch
    # the killed attempt could not write its error: the driver recorded Tune's, once, and the trial still ended ok
    assert len(killed[0]["errors"]) == 1 and "Error" in killed[0]["errors"][0].split(":")[0], killed[0]
    other = [rec for rec in recs.values() if "meta" not in rec["cell"]]
    assert other[0]["attempts"] == 1 and other[0]["errors"] == []


@pytest.mark.timeout(600)
def test_fault_disk_full_while_a_cache_is_written(project):
    r = run(project, "name=diskfull", "sweep.trials_per_cell=1", METAKD_FAULTS="cache_write=enospc")
    caches = project / "runs" / "caches"
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not list(caches.glob("*/manifest.json"))  # nothing half-written counts as a cache
    assert not list(caches.glob(".staging-*"))
    # a build killed outright leaves its staging directory: the next build removes it
    orphan = caches / ".staging-0123456789abcdef-deadbeef"
    (orphan / "part").mkdir(parents=True)
    (orphan / "part" / "x.parquet").write_bytes(b"half")
    r = run(project, "name=diskfull", "sweep.trials_per_cell=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not orphan.exists()
    assert len(list(caches.glob("*/manifest.json"))) == 2


# ----------------------------------------------------------------------------------------------------------
# Concurrency
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_fault_two_drivers_on_one_sweep_and_two_sweeps_sharing_teachers(project, tmp_path):
    first = Driver(project, tmp_path / "first.log", "name=shared-a", "sweep.trials_per_cell=1")
    try:
        first.wait_for(lambda: "[sweep] precision:" in first.text())
        t0 = time.time()
        second = run(project, "name=shared-a", "sweep.trials_per_cell=1", timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert time.time() - t0 < 60
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "in use by pid" in errors[0] and str(first.proc.pid) in errors[0], errors
        # another sweep that needs the same teachers and caches, started while the first builds them
        other = Driver(project, tmp_path / "other.log", "name=shared-b", "sweep.trials_per_cell=1")
        try:
            assert first.wait(600) == 0, first.text()[-4000:]
            assert other.wait(600) == 0, other.text()[-4000:]
        finally:
            if other.proc.poll() is None:
                other.kill()
    finally:
        if first.proc.poll() is None:
            first.kill()
    runs = project / "runs"
    assert len(list((runs / "teachers").glob("*/manifest.json"))) == 2
    assert len(list((runs / "caches").glob("*/manifest.json"))) == 2
    # each teacher and cache was built by one driver only: its build lines appear in one log
    for key in (p.parent.name for p in (runs / "teachers").glob("*/manifest.json")):
        built = [log for log in ("first", "other") if f"[teacher] {key}: exported" in
                 (tmp_path / f"{log}.log").read_text()]
        assert len(built) == 1, (key, built)


@pytest.mark.timeout(120)
def test_fault_gpu_request_on_a_cpu_only_cluster_fails_fast(project):
    t0 = time.time()
    r = run(project, "name=gpu", "ray.use_gpu=true", "ray.train_workers=1", timeout=60)
    assert time.time() - t0 < 15  # checked against this machine before an embedded Ray even starts
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "GPU" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (project / "runs" / "sweeps" / "gpu").exists()

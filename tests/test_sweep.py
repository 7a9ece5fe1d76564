"""The sweep service end to end through its CLI, on toy data and a tiny BERT: embedded Ray, `ray job submit` to a
local cluster, a driver killed mid-run and restarted, injected trial failures.

The sweeps share one storage root (different sweep names), so teachers and caches are built once and reused — which
is itself what the service promises — except the disk-budget test, which evicts caches and so has its own. Every test
passes alone (``-k``) and in any order: what one needs from another run, a fixture makes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import toy
from toy import NO_METAKD
from metakd_ray.results import cells as result_cells
from metakd_ray.results import load_results

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return toy.write_toy_project(tmp_path_factory.mktemp("toyproject")).parent


def env(**extra: str) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1", "PYTHONUNBUFFERED": "1", **extra}
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    for k in ("RAY_ADDRESS",):
        e.pop(k, None)
    return e


def sweep_cmd(cfg: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "metakd_ray.sweep", str(cfg), "ray.address=local", "ray.num_cpus=2", *overrides]


def run_sweep(cfg: Path, *overrides: str, timeout: int = 420, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(cfg, *overrides), cwd=REPO, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def sweep_dir(project: Path, name: str) -> Path:
    return project / "runs" / "sweeps" / name


@pytest.mark.timeout(120)
def test_dry_run_prints_the_plan(project):
    def files() -> dict[str, int]:
        return {str(f): f.stat().st_mtime_ns for f in (project / "runs").rglob("*") if f.is_file()}

    before = files()
    r = subprocess.run([sys.executable, "-m", "metakd_ray.sweep", str(project / "sweep.yaml"), "--dry-run", "--json",
                        "sweep.sample_rates=[0.5, 1.0]", "sweep.seeds=[0, 1]"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert len(p["cells"]) == 1 * 2 * 2 * 2 and p["trials"] == 8 * 2
    assert {(c["rate"], c["seed"], c["method"]) for c in p["cells"]} == {
        (r_, s, m) for r_ in (0.5, 1.0) for s in (0, 1) for m in ("single/tinybert_kd", "meta/meta_kd")}
    assert all(c["domain"] == "beta" for c in p["cells"])
    # one meta teacher per (rate, seed) serves the target; single teachers likewise here (one target)
    assert len(p["teachers"]) == 2 * 2 * 2 and len(p["caches"]) == 8
    assert files() == before  # a dry run writes nothing (other tests' sweeps may share the project)


@pytest.fixture(scope="module")
def embedded(project) -> subprocess.CompletedProcess:
    """The toy sweep, run once on an embedded Ray."""
    return run_sweep(project / "sweep.yaml", "name=embedded")


@pytest.mark.timeout(480)
def test_embedded_sweep_gives_one_row_per_planned_trial(project, embedded):
    r = embedded
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[sweep] report:" in r.stdout
    df = load_results(sweep_dir(project, "embedded"))
    assert len(df) == 2 * 2 and set(df["status"]) == {"TERMINATED"}
    assert df["test_acc"].between(0, 1).all() and (df["cpu_s"] > 0).all()
    c = result_cells(df)
    assert len(c) == 2 and set(c["status"]) == {"ok"}
    # each cell's first trial ran the configured hyper-parameters
    first = df.sort_values("start_time").groupby("cell").head(1)
    assert (first["hp_stage2_lr"] == 0.003).all()
    assert (sweep_dir(project, "embedded") / "report" / "scarcity.png").is_file()
    # teachers and caches were built once, with their manifests
    assert len(list((project / "runs" / "teachers").glob("*/manifest.json"))) == 2
    assert len(list((project / "runs" / "caches").glob("*/manifest.json"))) == 2


@pytest.mark.timeout(480)
def test_a_quiet_log_without_traceback(project, embedded):
    """Without --verbose: this project's lines, no Ray INFO chatter, no Tune tables, no progress bars of model
    loads, no traceback — the toy sweep (2 teachers, 2 caches, 4 trials) in at most 50 lines besides its progress
    lines (at most one per 30 s per running stage)."""
    r = embedded
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    text = "\n".join(lines)
    # Progress lines come at most one per 30 s per running stage: their number grows with the run's wall time (a
    # loaded machine), so they are bounded by it; everything else is bounded by the sweep's size.
    periodic = [line for line in lines if line.startswith("[sweep] running:") or re.search(r"steps/s, ETA ", line)]
    last = r.stdout.splitlines()[-1]
    took = re.fullmatch(r"\[sweep\] this run took (\d+\.\d) min", last)  # the run's wall time, last
    assert took, last
    assert len(periodic) <= 3 * (2 * float(took.group(1)) + 2), text  # the driver's status and <= 2 stages at once
    assert len(lines) - len(periodic) <= 50, text
    for noise in ("Traceback", " INFO ", "Trial status", "╭", "Loading weights", "Reported metrics",
                  "A new study created", "Progress bars disabled"):
        assert noise not in text, f"{noise!r} in the log:\n{text}"
    assert sum("trials finished" in line for line in lines) == 4
    assert "[sweep] 2/2 cells ok, 0 failed" in lines


PIPELINE = NO_METAKD + r'''
from transformers import pipeline

out = {}
for folder, texts in json.load(open(sys.argv[1])).items():
    pipe = pipeline("text-classification", model=folder, trust_remote_code=True, top_k=None)
    got = [pipe(t) for t in texts]
    got = [g[0] if g and isinstance(g[0], list) else g for g in got]  # one text -> [[...]] in some versions
    out[folder] = [{r["label"]: r["score"] for r in g} for g in got]
json.dump(out, open(sys.argv[2], "w"))
'''


@pytest.mark.timeout(480)
def test_each_cell_keeps_its_selected_student_loadable_in_plain_transformers(project, embedded, tmp_path):
    """``storage.keep_students: selected`` (default): one student per cell — its dev-selected trial's — and its
    predictions as the trial recorded them, through transformers' pipeline in a process without metakd_ray."""
    import numpy as np
    import pyarrow.parquet as pq

    assert embedded.returncode == 0, embedded.stdout[-3000:] + embedded.stderr[-3000:]
    d = sweep_dir(project, "embedded")
    df = load_results(d)
    c = result_cells(df)
    kept = sorted(p.name for p in (d / "students").iterdir())
    assert kept == sorted(c["trial_key"]) and len(kept) == 2  # the other trial of each cell was removed
    assert set(df.loc[~df["trial_key"].isin(kept), "student_dir"]) == {""}
    for _, row in c.iterrows():
        assert f"cell {row['cell']}: test {row['test_acc']:.3f}, student {row['student_dir']}" in embedded.stdout
        assert row["student_bytes"] > 0 and 0 < row["n_params"] < row["teacher_params"]
    test = pd.read_csv(project / "corpus" / "test.csv")
    texts = dict(zip((f"test/{i:06d}" for i in test.index), test["text"]))
    preds = {row["student_dir"]: pq.read_table(d / "trials" / f"{row['trial_key']}.predictions.parquet").to_pandas()
             for _, row in c.iterrows()}
    (tmp_path / "cases.json").write_text(json.dumps({k: [texts[i] for i in p["id"]] for k, p in preds.items()}))
    (tmp_path / "pipe.py").write_text(PIPELINE)
    r = subprocess.run([sys.executable, str(tmp_path / "pipe.py"), str(tmp_path / "cases.json"),
                        str(tmp_path / "out.json")], env={**env(), "HF_MODULES_CACHE": str(tmp_path / "hf")},
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    labels = json.loads((d / "students" / kept[0] / "config.json").read_text())["id2label"]
    precision = {row["student_dir"]: json.loads((d / "trials" / f"{row['trial_key']}.json").read_text())["final"]
                 ["precision"] for _, row in c.iterrows()}
    for folder, got in json.loads((tmp_path / "out.json").read_text()).items():
        probs = np.array([[g[labels[str(j)]] for j in range(len(labels))] for g in got])
        # the trials ran in the sweep's precision (bf16 autocast on a CPU with native bf16), the pipeline in fp32
        tolerance = 1e-5 if precision[folder] == "fp32" else 0.02
        assert np.abs(probs - np.stack(preds[folder]["probs"])).max() < tolerance, precision[folder]


@pytest.mark.timeout(600)
def test_same_config_same_numbers(project, embedded, tmp_path):
    """The toy sweep again, from nothing (its own storage root: new teachers, caches, trials) and with the
    precision it resolves to here: every trial's dev and test accuracy is identical."""
    assert embedded.returncode == 0
    r = run_sweep(project / "sweep.yaml", "name=embedded", f"storage.root={tmp_path / 'runs'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cols = ["cell", "slot", "dev_acc", "test_acc"]

    def numbers(d: Path) -> list:
        return load_results(d)[cols].sort_values(["cell", "slot"]).values.tolist()

    again = numbers(tmp_path / "runs" / "sweeps" / "embedded")
    assert again == numbers(sweep_dir(project, "embedded")) and len(again) == 4


@pytest.mark.timeout(600)
def test_rerun_with_changed_config_is_refused(project, embedded):
    assert embedded.returncode == 0
    r = run_sweep(project / "sweep.yaml", "name=embedded", "distill.stage2_epochs=5", timeout=120)
    assert r.returncode == 2
    assert "already exists" in r.stderr and "distill.stage2_epochs" in r.stderr


def _records(project: Path, name: str) -> dict[str, dict]:
    """trial key -> its own record (written by the trial, before Tune hears of it)."""
    return {f.stem: json.loads(f.read_text()) for f in (sweep_dir(project, name) / "trials").glob("*.json")}


def _finished_trials(project: Path, name: str) -> dict[str, dict]:
    return {k: r for k, r in _records(project, name).items() if r["status"] == "ok"}


@pytest.mark.timeout(600)
def test_killed_driver_resumes_without_rerunning_finished_trials(project, tmp_path):
    cfg = project / "sweep.yaml"
    overrides = ("name=killed", "sweep.trials_per_cell=4", "distill.stage2_epochs=3")
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_cmd(cfg, *overrides), cwd=REPO, env=env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        while time.time() < t0 + 400 and proc.poll() is None and len(_finished_trials(project, "killed")) < 2:
            time.sleep(0.2)
    finally:
        exited = proc.poll()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _finished_trials(project, "killed")
    why = f"after {time.time() - t0:.0f} s, driver exit status {exited}; its log ends:\n" + log.read_text()[-4000:]
    assert 2 <= len(before) < 8, why  # killed mid-run
    r = run_sweep(cfg, *overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = load_results(sweep_dir(project, "killed"))
    assert len(df) == 2 * 4 and set(df["status"]) == {"TERMINATED"}, df[["trial_id", "status", "error"]]
    assert sorted(df["cell"].value_counts().tolist()) == [4, 4]
    after = _finished_trials(project, "killed")
    assert len(after) == 8
    assert not list((sweep_dir(project, "killed") / "trials").glob("*.pt"))  # training states dropped at the end
    for key, record in before.items():  # finished trials were kept, not started or trained again: a trial the
        assert after[key] == record     # restored Tune lost is suggested again and finds its record done
        assert (df["wall_s"] == record["final"]["wall_s"]).sum() == 1


@pytest.mark.timeout(480)
def test_trial_failing_once_is_retried_and_a_failing_cell_is_reported(project):
    r = run_sweep(project / "sweep.yaml", "name=faults", METAKD_FAULTS="once=single;always=meta")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the sweep completes, then says a cell failed
    df = load_results(sweep_dir(project, "faults"))
    assert len(df) == 4
    single = df[df["method"] == "single/tinybert_kd"]
    assert set(single["status"]) == {"TERMINATED"} and single["test_acc"].notna().all()
    assert (single["n_failures"] == 1).all()  # each failed once, then finished on its retry
    meta = df[df["method"] == "meta/meta_kd"]
    assert set(meta["status"]) == {"ERROR"} and (meta["n_failures"] == 2).all()
    assert set(meta["error"]) == {"RuntimeError: injected failure (METAKD_FAULTS=always) in cell beta|1|meta/meta_kd|0|-"}
    c = result_cells(df).set_index("method")
    assert c.loc["single/tinybert_kd", "status"] == "ok"
    assert c.loc["meta/meta_kd", "status"] == "failed"
    assert "injected failure" in c.loc["meta/meta_kd", "error"]
    # results come from the sweep's own records: without Ray Tune's files, the same trials, statuses and errors
    import shutil

    for state in sweep_dir(project, "faults").glob("tune/experiment_state-*.json"):
        state.unlink()
    shutil.rmtree(sweep_dir(project, "faults") / "tune")
    again = load_results(sweep_dir(project, "faults"))
    cols = ["trial_id", "cell", "status", "error", "n_failures", "test_acc"]
    pd.testing.assert_frame_equal(again[cols], df[cols])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_ray_job_submit_to_a_local_cluster(project, tmp_path):
    # Every port chosen free: another Ray on this machine (the test session's, say) holds the defaults, and a
    # dashboard agent that cannot bind its port leaves the job server with "No available agent".
    gcs, dash, agent, agent_grpc, metrics, env_agent = (_free_port() for _ in range(6))
    e = env(RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}"],
                            cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        submit = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
                  "python", "-m", "metakd_ray.sweep", str(project / "sweep.yaml"), "name=submitted"]
        while True:  # until the job server is up and its agent ready: it refuses jobs before that
            r = subprocess.run(submit, cwd=REPO, env=e, capture_output=True, text=True, timeout=480)
            not_ready = "No available agent" in r.stderr or "Failed to connect to Ray" in r.stderr
            if not not_ready or time.time() > deadline:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout.lower()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    df = load_results(sweep_dir(project, "submitted"))
    assert len(df) == 4 and set(df["status"]) == {"TERMINATED"}


@pytest.mark.timeout(600)
def test_caches_over_the_disk_budget_run_in_waves_and_resume(project, tmp_path):
    """Its own storage root: its small budget evicts caches."""
    import yaml

    from metakd_ray import cache as K
    from metakd_ray import config as C
    from metakd_ray import models as M
    from metakd_ray.storage import Storage

    cfg_path = project / "sweep.yaml"
    cfg = C.load(str(cfg_path))
    enc = json.loads((Path(cfg.model.teacher) / "config.json").read_text())
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.teacher)
    train = pd.read_csv(project / "corpus" / "train.csv")
    texts = train[train["domain"] == "beta"]["text"].tolist()
    lengths = [len(tok(t, truncation=True, max_length=cfg.data.max_length)["input_ids"]) for t in texts]
    one = K.estimate_bytes(lengths, len(K.stored_layers(M.student_layer_map(cfg.model, enc["num_hidden_layers"]))),
                           enc["hidden_size"])
    budget_gb = 1.5 * one / 1e9  # room for one of the two caches (same examples, same shapes), not both
    root = tmp_path / "waves-runs"
    overrides = ("name=waves", "sweep.seeds=[1]", f"storage.cache_max_gb={budget_gb:.9f}", f"storage.root={root}")
    r = run_sweep(cfg_path, *overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 waves of caches then trials" in r.stdout
    sd = root / "sweeps" / "waves"
    plan = json.loads((sd / "plan.json").read_text())
    assert [(w["experiment"], len(w["cells"]), w["done"]) for w in plan["waves"]] == [("tune", 1, True),
                                                                                    ("tune-2", 1, True)]
    df = load_results(sd)
    assert len(df) == 2 * 2 and set(df["status"]) == {"TERMINATED"}
    assert set(df["teacher_source"]) == {"cache"}  # every trial read its cache: none was evicted under it
    # the disk never held more than the budget: wave 1's cache made room for wave 2's
    sizes = K.cache_sizes(Storage(str(root)))
    assert sum(sizes.values()) <= budget_gb * 1e9
    first, second = (df[df["cell"] == plan["waves"][i]["cells"][0]]["cache_key"].iloc[0] for i in (0, 1))
    assert first not in sizes and second in sizes
    # a rerun finds both waves finished: no cache rebuilt, no trial rerun
    r2 = run_sweep(cfg_path, *overrides)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert r2.stdout.count("finished in an earlier run") == 2 and "[sweep] caches (" not in r2.stdout
    df2 = load_results(sd)
    assert sorted(df2["trial_id"]) == sorted(df["trial_id"]) and set(df2["status"]) == {"TERMINATED"}
    assert yaml.safe_load((sd / "config.yaml").read_text())["storage"]["cache_max_gb"] == pytest.approx(budget_gb)

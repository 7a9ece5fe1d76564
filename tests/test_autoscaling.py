"""The sweep on an autoscaling cluster: Ray's fake multi-node provider on this machine (cluster/local-fake.yaml,
ray guide §6.3), a head with 1 CPU and no worker at first; a ``ray.worker.gpu`` type (custom resource
``gpu_node``) and a ``ray.worker.trial`` type (``trial_node``, 2 CPUs), both min 0 and removed after a few idle
seconds.

One cluster for the module, started by hand (``ray start --head --block --autoscaling-config`` with
``RAY_FAKE_CLUSTER=1``; never ``ray.cluster_utils.AutoscalingCluster``, whose ``start()`` runs ``ray stop --force``),
on free ports and its own ``--temp-dir``, and torn down by its process group: every fake node is a raylet started
by the autoscaler inside that group. The sweeps run as subprocesses (this session may hold its own Ray). The tests
share the toy project's storage root, so the second one reuses the first one's teacher and cache; each passes
alone (``-k``) too. What ran where is read from the cluster's state API (dead nodes and actors included)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import toy
from metakd_ray.results import load_results

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]
# The stages on the worker types: teachers (1 Ray Train worker) and cache actors ask for gpu_node, trials for
# trial_node and 2 CPUs (the head has 1). Only one method: one teacher, one cache.
ON_FAKE = ("sweep.methods=[meta/meta_kd]", "ray.train_workers=1", "ray.teacher_resources.gpu_node=1",
           "ray.cache_resources.gpu_node=1", "ray.trial_cpus=2", "ray.trial_resources.trial_node=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    def __init__(self, root: Path, ip: str, gcs: int, dashboard: int, head: subprocess.Popen):
        self.root, self.address, self.api, self.head = root, f"{ip}:{gcs}", f"http://127.0.0.1:{dashboard}", head

    def nodes(self) -> dict[str, dict]:
        """node id -> {"type": head / gpu / trial, "alive": bool}, dead nodes included."""
        from ray.util.state import list_nodes

        kinds = {}
        for n in list_nodes(address=self.api, detail=True, limit=10000, raise_on_missing_output=False):
            kind = ("head" if n.is_head_node else "gpu" if "gpu_node" in n.resources_total
                    else "trial" if "trial_node" in n.resources_total else "?")
            kinds[n.node_id] = {"type": kind, "alive": n.state == "ALIVE"}
        return kinds

    def actors(self, alive_only: bool = False) -> list:
        from ray.util.state import list_actors

        filters = [("state", "=", "ALIVE")] if alive_only else None
        return list_actors(address=self.api, detail=True, limit=10000, filters=filters,
                           raise_on_missing_output=False)

    def monitor_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.root.glob("session_*/logs/monitor.log"))

    def node_pids(self, node_id: str) -> list[int]:
        """The processes of that fake node: its raylet (started in our process group by the autoscaler, which
        gives it the node id) and every process under it (its agents and workers)."""
        parents, raylet = {}, None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
                if os.getpgid(int(pid)) == self.head.pid:
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if args[0].endswith(b"/raylet") and f"--node_id={node_id}".encode() in args:
                        raylet = int(pid)
            except (OSError, IndexError, ValueError):
                continue
        if raylet is None:
            raise LookupError(f"no raylet of node {node_id} in process group {self.head.pid}")
        tree = [raylet]
        for pid in tree:
            tree += [c for c, p in parents.items() if p == pid]
        return tree

    def wait_for_workers_gone(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while any(n["alive"] and n["type"] != "head" for n in self.nodes().values()):
            assert time.time() < deadline, f"idle workers still up after {timeout:g} s: {self.nodes()}"
            time.sleep(1)


def _stop(head: subprocess.Popen) -> None:
    """Stop the cluster we started, and only it: its process group (the head's processes and every fake node's)."""
    try:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM...
        head.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # ...but its autoscaler can hang on the way out
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


@pytest.fixture(scope="module")
def fake_cluster():
    import ray._private.services

    root = Path(tempfile.mkdtemp(prefix="fakeray-", dir="/tmp"))  # short: Unix socket paths live under it
    ip = ray._private.services.get_node_ip_address()
    gcs, dashboard, *ports = (_free_port() for _ in range(7))
    config = yaml.safe_load((REPO / "cluster" / "local-fake.yaml").read_text())
    config["provider"]["gcs_address"] = f"{ip}:{gcs}"  # the provider starts the workers' raylets against it
    (root / "fake.yaml").write_text(yaml.safe_dump(config))
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"]["CPU"]
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",  # a lost node is replaced after 10 s (default 30)
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    agent, agent_grpc, metrics, env_agent, client = ports
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={head_cpus}", f"--temp-dir={root / 'ray'}",
         "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={env_agent}", f"--ray-client-server-port={client}",
         f"--autoscaling-config={root / 'fake.yaml'}"],
        cwd=root, env=env, stdout=open(root / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cluster = FakeCluster(root / "ray", ip, gcs, dashboard, head)
        deadline = time.time() + 90
        while True:  # the head is up and its autoscaler has reported once
            try:
                if "ray.head.default" in cluster.monitor_log() and any(
                        n["alive"] for n in cluster.nodes().values()):
                    break
            except Exception:  # noqa: BLE001  (the state API is not up yet)
                pass
            assert head.poll() is None and time.time() < deadline, (root / "head.log").read_text()[-3000:]
            time.sleep(1)
        yield cluster
    finally:
        _stop(head)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return toy.write_toy_project(tmp_path_factory.mktemp("fakeproject")).parent


def sweep_cmd(project: Path, cluster: FakeCluster, name: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "metakd_ray.sweep", str(project / "sweep.yaml"), f"ray.address={cluster.address}",
            f"name={name}", *ON_FAKE, *overrides]


def env() -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1", "PYTHONUNBUFFERED": "1",
         "RAY_AUTH_MODE": "disabled"}
    e.pop("RAY_ADDRESS", None)
    return e


def planned_trials(sweep: Path) -> int:
    plan = json.loads((sweep / "plan.json").read_text())
    per_cell = yaml.safe_load((sweep / "config.yaml").read_text())["sweep"]["trials_per_cell"]
    return len(plan["cells"]) * per_cell


@pytest.mark.timeout(300)
def test_stages_scale_their_worker_types_up_and_down(project, fake_cluster):
    r = subprocess.run(sweep_cmd(project, fake_cluster, "scale"), cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = load_results(project / "runs" / "sweeps" / "scale")
    assert len(df) == planned_trials(project / "runs" / "sweeps" / "scale") == 2
    assert set(df["status"]) == {"TERMINATED"}
    nodes = fake_cluster.nodes()
    # each stage ran on a worker of its type, launched for it: the head has neither gpu_node nor 2 CPUs
    assert {nodes[n]["type"] for n in df["node_id"]} == {"trial"}, (df["node_id"].tolist(), nodes)
    where = {}
    for a in fake_cluster.actors():
        where.setdefault(a.class_name, set()).add(nodes[a.node_id]["type"])
    assert where.get("RayTrainWorker") == {"gpu"}, where  # the teacher
    assert where.get("MapWorker(MapBatches(TeacherPass))") == {"gpu"}, where  # the cache actors
    assert where.get("ImplicitFunc") == {"trial"}, where  # the Tune trials
    log = fake_cluster.monitor_log()
    assert re.search(r"Adding \d+ node\(s\) of type ray\.worker\.gpu", log)
    assert re.search(r"Adding \d+ node\(s\) of type ray\.worker\.trial", log)
    # idle workers go away after idle_timeout_minutes (0.1): the gpu node once the caches were built, then all
    fake_cluster.wait_for_workers_gone(timeout=60)
    assert re.search(r"Removing \d+ nodes of type ray\.worker\.gpu \(idle\)", fake_cluster.monitor_log())
    assert re.search(r"Removing \d+ nodes of type ray\.worker\.trial \(idle\)", fake_cluster.monitor_log())
    assert [n["type"] for n in fake_cluster.nodes().values() if n["alive"]] == ["head"]


@pytest.mark.timeout(300)
def test_a_lost_worker_node_loses_no_trial(project, fake_cluster, tmp_path):
    """One trial at a time (ray.max_concurrent_trials=1): once a trial has finished and the next has started, the
    node of the running trial's actor is killed (its raylet and every process under it, SIGKILL). The sweep still
    ends with every planned trial, the trial that was hit retried on a new node, and no finished trial ran again
    (its record is untouched)."""
    name = "nodeloss"
    sweep = project / "runs" / "sweeps" / name
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(sweep_cmd(project, fake_cluster, name, "sweep.trials_per_cell=2",
                                      "ray.max_concurrent_trials=1", "sweep.max_failures=2",
                                      "distill.stage2_epochs=30"),
                            cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 200
        while True:
            records = {p.name: p.read_text() for p in (sweep / "trials").glob("*.json")} if (
                sweep / "trials").is_dir() else {}
            done = {k: v for k, v in records.items() if json.loads(v).get("final") is not None}
            # a trial still training (stage 2 has 30 epochs): seconds of training left when its node goes
            running = [k for k, v in records.items() if json.loads(v).get("status") == "running"
                       and (json.loads(v).get("last") or {}).get("phase") != "final"]
            live = [a for a in fake_cluster.actors(alive_only=True) if a.class_name == "ImplicitFunc"]
            if done and running and len(live) == 1:
                break
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished while another ran"
            time.sleep(0.5)
        lost = live[0].node_id
        assert fake_cluster.nodes()[lost]["type"] == "trial"
        for pid in fake_cluster.node_pids(lost):  # the node is gone: its raylet and all on it, at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=240) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    df = load_results(sweep)
    assert len(df) == planned_trials(sweep) == 2 and df["trial_key"].is_unique
    assert set(df["status"]) == {"TERMINATED"}, df[["trial_key", "status", "error"]]
    for key, text in done.items():  # finished before the node was lost: not run again, not even opened
        assert (sweep / "trials" / key).read_text() == text, key
    # the trial that ran on the lost node started again (a second attempt, from its own saved state) elsewhere
    final = {p.stem: json.loads(p.read_text()) for p in (sweep / "trials").glob("*.json")}
    hit = [k for k, rec in final.items() if f"{k}.json" not in done and rec["attempts"] >= 2]
    assert hit and all(final[k]["final"]["node_id"] != lost for k in hit), (final, lost)
    # and its record says why: the lost attempt's error, recorded by the driver from Tune (it could not write it)
    assert all(len(final[k]["errors"]) == final[k]["attempts"] - 1 for k in hit), final
    # the GCS marks the node dead after its health checks fail (seconds; the sweep may finish before that)
    deadline = time.time() + 90
    while fake_cluster.nodes()[lost]["alive"]:
        assert time.time() < deadline, f"node {lost} still alive 90 s after its raylet was killed"
        time.sleep(1)
    assert {fake_cluster.nodes()[n]["type"] for n in df["node_id"]} == {"trial"}

"""Locks on the storage root (metakd_ray/locks.py): flock on a local root, a lease with a heartbeat on object
storage (here a pyarrow SubTreeFileSystem, which the Storage treats as remote)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from metakd_ray import locks
from metakd_ray.locks import Lock, LockHeld, sweep_lock
from metakd_ray.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def test_fault_local_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    first = sweep_lock(storage, "s").acquire()
    with pytest.raises(LockHeld) as e:
        sweep_lock(storage, "s").acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and "sweep 's'" in msg and "\n" not in msg
    first.release()
    sweep_lock(storage, "s").acquire().release()  # free again


@pytest.mark.timeout(60)
def test_fault_local_lock_of_a_killed_process_is_free(tmp_path):
    """flock belongs to its process: SIGKILL leaves no stale lock (the lock file stays, unlocked)."""
    root = tmp_path / "root"
    code = ("import sys, time; from metakd_ray.storage import Storage; from metakd_ray.locks import sweep_lock; "
            f"sweep_lock(Storage({str(root)!r}), 's').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {proc.pid}"):
            sweep_lock(Storage(str(root)), "s").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sweep_lock(Storage(str(root)), "s").acquire().release()


def test_wait_returns_once_the_holder_is_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "POLL_S", 0.05)
    storage = Storage(str(tmp_path / "root"))
    holder = Lock(storage, "teacher-k", "teacher k").acquire()
    said = []
    import threading

    threading.Timer(0.3, holder.release).start()
    t0 = time.time()
    Lock(storage, "teacher-k", "teacher k").acquire(wait=True, say=said.append).release()
    assert 0.2 < time.time() - t0 < 5
    assert len(said) == 1 and "building teacher k" in said[0]


@pytest.fixture
def remote(tmp_path, monkeypatch) -> Storage:
    """A storage root on a filesystem Storage treats as object storage (no flock: the lease path)."""
    monkeypatch.setattr(locks, "SETTLE_S", 0.01)
    (tmp_path / "bucket").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    st = Storage("prefix", filesystem=fs)
    assert not st.is_local
    return st


def test_fault_lease_refuses_a_live_holder_and_takes_over_a_dead_one(remote, monkeypatch):
    first = sweep_lock(remote, "s").acquire()
    lease = json.loads(remote.read_bytes(locks.LOCKS, "sweep-s"))
    assert lease["pid"] == os.getpid() and lease["heartbeat"] > time.time() - 5
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        sweep_lock(remote, "s").acquire()
    first.release()
    assert not remote.exists(locks.LOCKS, "sweep-s")  # released: the lease is gone
    # a driver that died without releasing: its heartbeat stops; after LEASE_TTL_S the lease is taken over
    stale = {**lease, "pid": 999999, "heartbeat": time.time() - locks.LEASE_TTL_S - 1}
    remote.write_bytes(json.dumps(stale).encode(), locks.LOCKS, "sweep-s")
    taker = sweep_lock(remote, "s").acquire()
    assert json.loads(remote.read_bytes(locks.LOCKS, "sweep-s"))["pid"] == os.getpid()
    taker.release()


def test_lease_heartbeat_keeps_it_alive(remote, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    lock = sweep_lock(remote, "s").acquire()
    first = lock._read_lease()["heartbeat"]
    time.sleep(0.3)
    assert lock._read_lease()["heartbeat"] > first  # the fake store's writes are not atomic: read as the lock does
    lock.release()

"""Locks on the storage root: one driver per sweep, one builder per teacher and per cache.

Lock files live under ``<root>/locks/`` (``sweep-<name>``, ``teacher-<key>``, ``cache-<fingerprint>``), so artefact
directories hold only artefacts.

* **Local root**: an exclusive ``fcntl.flock`` on the lock file. The kernel drops it when its process dies, however
  it dies (SIGKILL included), so a lock is never left stale. The file holds the owner (host, pid, command, since)
  for the message a refused driver prints.
* **Object storage** (``s3://``, ``gs://``...): a *lease* file with the owner and a heartbeat that a daemon thread
  renews every ``HEARTBEAT_S`` seconds. A lease whose heartbeat is older than ``LEASE_TTL_S`` belongs to a dead
  driver and is taken over. Object stores have no atomic create-if-absent through ``pyarrow.fs``, so acquiring
  writes the lease, waits ``SETTLE_S`` and reads it back: of two drivers racing, the one whose write landed last
  keeps it and the other sees a foreign owner and backs off.

``Lock.acquire(wait=False)`` raises :class:`LockHeld` (one line naming the holder); ``wait=True`` polls until the
holder is gone, printing once whom it waits for. Used by ``sweep.run`` (the sweep, never waited for: a second
driver on the same sweep is refused), ``teacher.job.ensure_teacher`` and ``cache.build`` (waited for: two sweeps
that share a teacher or a cache build it once, the second finds it done).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

from metakd_ray.storage import Storage

LOCKS = "locks"
HEARTBEAT_S = 10.0
LEASE_TTL_S = 60.0
SETTLE_S = 1.0
POLL_S = 1.0


class LockHeld(RuntimeError):
    """Another live process holds the lock. The message is one line naming the holder."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300],
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}


def describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    return (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')} "
            f"({owner.get('command') or '?'})")


class Lock:
    """An exclusive lock named ``name`` (``sweep-smoke``, ``teacher-<key>``...) under ``<root>/locks/``; a context
    manager (``with Lock(storage, name, what):`` waits for it)."""

    def __init__(self, storage: Storage, name: str, what: str):
        self.storage, self.name, self.what = storage, name, what
        self._fd: int | None = None
        self._owner: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public ------------------------------------------------------------------------------------------------
    def acquire(self, wait: bool = False, say: Callable[[str], None] | None = None) -> "Lock":
        said = False
        while True:
            holder = self._try()
            if holder is None:
                return self
            if not wait:
                raise LockHeld(f"{self.what} is in use by {describe(holder)}; wait for it to finish or stop that "
                               f"process (lock: {self.storage.uri(LOCKS, self.name)})")
            if not said and say is not None:
                say(f"waiting for {describe(holder)}, which is building {self.what}")
                said = True
            time.sleep(POLL_S)

    def release(self) -> None:
        if self.storage.is_local:
            if self._fd is not None:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=HEARTBEAT_S)
            self._thread = None
        if self._owner is not None:
            current = self._read_lease()
            if current and current.get("token") == self._owner["token"]:
                self.storage.delete(LOCKS, self.name)
            self._owner = None

    def __enter__(self) -> "Lock":
        return self.acquire(wait=True, say=lambda m: print(f"[lock] {m}", flush=True))

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local: flock --------------------------------------------------------------------------------------------
    def _try(self) -> dict | None:
        """None when acquired, else the holder's owner record."""
        return self._try_local() if self.storage.is_local else self._try_lease()

    def _try_local(self) -> dict | None:
        import fcntl

        path = self.storage.local_path(LOCKS, self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = None
            os.close(fd)
            return holder or {}
        owner = _owner()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd, self._owner = fd, owner
        return None

    # -- object storage: lease + heartbeat -----------------------------------------------------------------------
    def _read_lease(self) -> dict | None:
        if not self.storage.is_file(LOCKS, self.name):
            return None
        for attempt in range(3):  # a store without atomic writes may show a lease mid-write: read it again
            try:
                return json.loads(self.storage.read_bytes(LOCKS, self.name))
            except (ValueError, OSError):
                time.sleep(0.05 * (attempt + 1))
        return None

    def _try_lease(self) -> dict | None:
        current = self._read_lease()
        if current and time.time() - float(current.get("heartbeat", 0)) < LEASE_TTL_S:
            return current
        owner = {**_owner(), "heartbeat": time.time()}
        self.storage.write_bytes(json.dumps(owner).encode(), LOCKS, self.name)
        time.sleep(SETTLE_S)
        current = self._read_lease()
        if not current or current.get("token") != owner["token"]:
            return current or {}
        self._owner = owner
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            owner = self._owner
            if owner is None:
                return
            try:
                self.storage.write_bytes(json.dumps({**owner, "heartbeat": time.time()}).encode(), LOCKS, self.name)
            except OSError:
                pass  # retried at the next beat; the lease stays valid for LEASE_TTL_S


def sweep_lock(storage: Storage, name: str) -> Lock:
    return Lock(storage, f"sweep-{name}", f"sweep {name!r} at {storage.uri('sweeps', name)}")


def teacher_lock(storage: Storage, key: str) -> Lock:
    return Lock(storage, f"teacher-{key}", f"teacher {key}")


def cache_lock(storage: Storage, fingerprint: str) -> Lock:
    return Lock(storage, f"cache-{fingerprint}", f"cache {fingerprint}")

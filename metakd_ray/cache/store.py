"""Caches in storage: ``caches/<fingerprint>/`` (``part-*.parquet``, ``manifest.json`` written last, ``.last_used``),
verified against their manifest before any use, evicted least recently used first under a disk budget."""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from metakd_ray import faults
from metakd_ray.cache.format import FORMAT_VERSION
from metakd_ray.locks import LockHeld, cache_lock
from metakd_ray.storage import Storage, sha256_hex

log = logging.getLogger(__name__)

CACHES = "caches"
MANIFEST = "manifest.json"
USED_MARK = ".last_used"
TEACHER_COL, CACHE_COL = "_teacher", "_cache"  # the columns of a job that builds several caches


class CacheError(RuntimeError):
    """A cache is missing, incomplete or corrupt (the message lists every problem found)."""


@dataclass(frozen=True)
class CacheRef:
    """A verified cache: ``caches/<fingerprint>/`` under the storage root ``root``."""

    root: str
    fingerprint: str
    manifest: dict
    built: bool = False  # True when this call ran the Ray job; False on a cache hit

    @property
    def parts(self) -> tuple[str, str]:
        return (CACHES, self.fingerprint)

    def storage(self) -> Storage:
        return Storage(self.root)

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def total_bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.manifest["files"])

def file_entry(storage: Storage, *parts: str) -> dict:
    data = storage.read_bytes(*parts)
    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return {"name": parts[-1], "bytes": len(data), "sha256": sha256_hex(data), "rows": rows}


def verify(cache: CacheRef | str, storage: Storage | None = None) -> dict:
    """Check every file of a cache against its manifest (presence, size, sha256, Parquet row count, total rows);
    return the manifest, or raise :class:`CacheError` naming each problem. ``cache``: a CacheRef or a fingerprint
    (then ``storage`` is needed)."""
    if isinstance(cache, CacheRef):
        storage, fp = cache.storage(), cache.fingerprint
    else:
        fp = cache
        assert storage is not None, "verify(fingerprint) needs the storage"
    where = storage.uri(CACHES, fp)
    if not storage.is_file(CACHES, fp, MANIFEST):
        raise CacheError(f"{where}: no manifest (never completed)")
    try:
        manifest = storage.read_json(CACHES, fp, MANIFEST)
    except (ValueError, OSError) as e:
        raise CacheError(f"{where}/{MANIFEST}: unreadable ({e})") from None
    problems = []
    if manifest.get("fingerprint") != fp or manifest.get("format") != FORMAT_VERSION:
        problems.append(f"manifest is for {manifest.get('fingerprint')!r} format {manifest.get('format')!r}")
    listed = {f["name"] for f in manifest.get("files", [])}
    present = {n for n in storage.listdir(CACHES, fp) if n.endswith(".parquet")}
    problems += [f"{n}: missing" for n in sorted(listed - present)]
    problems += [f"{n}: not in the manifest" for n in sorted(present - listed)]
    rows = 0
    for entry in manifest.get("files", []):
        if entry["name"] not in present:
            continue
        try:
            got = file_entry(storage, CACHES, fp, entry["name"])
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{entry['name']}: unreadable ({type(e).__name__}: {e})")
            continue
        for k in ("bytes", "sha256", "rows"):
            if got[k] != entry[k]:
                problems.append(f"{entry['name']}: {k} {got[k]} != manifest {entry[k]}")
        rows += got["rows"]
    if not problems and rows != manifest.get("num_examples"):
        problems.append(f"{rows} rows, manifest says {manifest.get('num_examples')} examples")
    if problems:
        raise CacheError(f"cache {where} is corrupt: " + "; ".join(problems))
    return manifest


def touch(storage: Storage, fp: str) -> None:
    storage.write_bytes(str(time.time()).encode(), CACHES, fp, USED_MARK)


def _last_used(storage: Storage, fp: str) -> float:
    try:
        return float(storage.read_bytes(CACHES, fp, USED_MARK))
    except (OSError, ValueError):
        return 0.0


def cache_sizes(storage: Storage) -> dict[str, int]:
    """fingerprint -> bytes on disk of every cache directory (complete or not) under ``caches/``."""
    return {fp: storage.tree_size(CACHES, fp) for fp in storage.listdir(CACHES) if not fp.startswith(".")}


def prune(storage: Storage, max_total_bytes: float, keep: Sequence[str] = ()) -> list[str]:
    """Evict least recently used caches (never those in ``keep``) until ``caches/`` holds at most
    ``max_total_bytes``; return the evicted fingerprints. A reader that already loaded a cache is unaffected."""
    sizes = cache_sizes(storage)
    total = sum(sizes.values())
    evicted = []
    for fp in sorted((f for f in sizes if f not in keep), key=lambda f: _last_used(storage, f)):
        if total <= max_total_bytes:
            break
        storage.delete(CACHES, fp)
        total -= sizes[fp]
        evicted.append(fp)
        log.info("cache %s evicted (LRU, %.0f MB)", fp, sizes[fp] / 1e6)
    return evicted


def publish(storage: Storage, staging: tuple[str, ...], fp: str) -> None:
    """Move the staged Parquet files into ``caches/<fp>/`` (replacing an incomplete or corrupt one)."""
    if faults.rules().get("cache_write") == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), storage.path(CACHES, fp))
    storage.delete(CACHES, fp)
    if storage.is_local:
        storage.fs.move(storage.path(*staging), storage.path(CACHES, fp))
    else:
        storage.fs.create_dir(storage.path(CACHES, fp), recursive=True)
        for name in storage.listdir(*staging):
            storage.fs.copy_file(storage.path(*staging, name), storage.path(CACHES, fp, name))
        storage.delete(*staging)


def find_cache(storage: Storage, fp: str) -> CacheRef | None:
    """The cache ``fp`` when it exists and verifies (marked used), else None (a corrupt one is logged)."""
    if not storage.exists(CACHES, fp):
        return None
    try:
        manifest = verify(fp, storage)
    except CacheError as e:
        log.warning("%s; rebuilding it", e)
        return None
    touch(storage, fp)
    log.info("cache %s: hit (%d examples), nothing recomputed", storage.uri(CACHES, fp), manifest["num_examples"])
    return CacheRef(storage.uri(), fp, manifest, built=False)


def remove_orphan_staging(storage: Storage, held: set[str] = frozenset()) -> list[str]:
    """Delete ``caches/.staging-<fp>-*`` directories that no live builder owns (left by a killed build): their
    cache's lock is free, or held by this process (``held``: it is about to build those). Returns the names
    removed."""
    removed = []
    for name in storage.listdir(CACHES):
        if not name.startswith(".staging-"):
            continue
        fp = name[len(".staging-"):].rsplit("-", 1)[0]
        lock = cache_lock(storage, fp)
        if fp not in held:
            try:
                lock.acquire(wait=False)
            except LockHeld:
                continue  # a live builder's
        try:
            storage.delete(CACHES, name)
            removed.append(name)
            log.warning("removed %s, left by a cache build that did not finish", storage.uri(CACHES, name))
        finally:
            lock.release()
    return removed


def root_cause(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``e`` (Ray wraps a task's exception: ``cause``)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    name = type(e).__name__
    if name.startswith("RayTaskError") and lines:  # no cause attached: its text ends with the original error
        return lines[-1][:300]
    return f"{name}: {lines[0][:300]}" if lines else name

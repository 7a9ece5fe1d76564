"""Building caches: one Ray Data job (an actor pool running the teacher) writes the rows of one or several caches
as Parquet into a staging directory; each cache is then published with its manifest, written last."""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metakd_ray import logs
from metakd_ray.cache.format import FORMAT_VERSION, encode_matrix, matrix_bytes
from metakd_ray.cache.job import CacheJob, cache_job
from metakd_ray.cache.store import (CACHES, MANIFEST, CacheError, CacheRef, file_entry, find_cache, log, prune,
                                    publish, remove_orphan_staging, root_cause, touch, verify)
from metakd_ray.locks import cache_lock
from metakd_ray.raycluster import actor_threads, max_cpus
from metakd_ray.storage import Storage
from metakd_ray.teacher.artefact import TeacherLocation

TEACHER_COL, CACHE_COL = "_teacher", "_cache"  # the columns of a job that builds several caches

def check_actor_pool(actors: int, cpus_per_actor: float, cluster_cpus: float) -> None:
    """Raise unless the actor pool leaves at least one CPU for Ray Data's read/write tasks: Ray Data starts the
    pool's actors before any other task, so a pool holding every CPU waits forever (ray-project/ray#44687).
    ``cluster_cpus``: what the cluster has or, with an autoscaler, can have (``raycluster.max_cpus``)."""
    if actors < 1 or cpus_per_actor <= 0:
        raise ValueError(f"ray.cache_actors={actors} and ray.cpus_per_actor={cpus_per_actor} must be positive")
    used = actors * cpus_per_actor
    if used > cluster_cpus - 1 + 1e-9:
        raise ValueError(
            f"ray.cache_actors * ray.cpus_per_actor = {actors} x {cpus_per_actor:g} = {used:g} CPUs, but the cluster "
            f"can have {cluster_cpus:g}: the cache job needs the pool to leave at least 1 CPU free for Ray Data's "
            f"read/write tasks, or it deadlocks (Ray starts the actors first; ray-project/ray#44687). Use at most "
            f"{max(cluster_cpus - 1, 0):g} CPUs in all, e.g. ray.cache_actors=1 ray.cpus_per_actor=1 on 2 CPUs, "
            f"or ray.cache_actors=2 ray.cpus_per_actor=0.5")


class TeacherPass:
    """Ray Data callable class: loads the exported teacher once per actor, then turns a numpy batch of input rows
    into a ``pa.Table`` of cache rows (``cache/format.py``)."""

    def __init__(self, teacher_root: str, teacher_parts: tuple[str, ...], layers: tuple[int, ...],
                 qk_layers: tuple[int, ...], precision: str, threads: int,
                 teachers: tuple[tuple[str, tuple[str, ...]], ...] | None = None, compute: str = "fp32"):
        import torch

        from metakd_ray.runtime import Runtime, current_device

        torch.set_num_threads(max(1, int(threads)))
        # the actor's GPU when Ray gave it one (ray.cache_gpus), in the precision the driver resolved for it
        self.runtime = Runtime(current_device(), compute)
        # several teachers (a job building several caches): row i uses teachers[row[TEACHER_COL]], loaded on first
        # use, one at a time (rows come grouped by teacher, so each actor loads each teacher about once)
        self.teachers = tuple(teachers) if teachers else ((teacher_root, tuple(teacher_parts)),)
        self.loaded: int | None = None
        self._load(0)
        self.layers, self.qk_layers, self.precision = layers, qk_layers, precision

    def _load(self, i: int) -> None:
        if self.loaded == i:
            return
        from metakd_ray.models import load_task_model
        from metakd_ray.models.families import family_of

        self.model = None
        root, parts = self.teachers[i]
        with Storage(root).local_copy(*parts) as d:
            self.model = load_task_model(d).eval().to(self.runtime.device)
        # No attention maps are read here (scores are rebuilt from stored layer inputs, or Q/K are hooked): the
        # family's fused kernel where it has one, as everywhere (teachers saved by older versions may ask for eager).
        if hasattr(self.model.encoder, "set_attn_implementation"):
            self.model.encoder.set_attn_implementation(family_of(self.model.encoder).attn_implementation)
        self.loaded = i

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if TEACHER_COL not in batch:
            return self._run(batch)
        which = np.asarray(batch[TEACHER_COL])
        cuts = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(which)]
        parts = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):  # runs of rows with the same teacher
            self._load(int(which[lo]))
            out = self._run({k: v[lo:hi] for k, v in batch.items()})
            parts.append(out.append_column(CACHE_COL, pa.array([str(x) for x in batch[CACHE_COL][lo:hi]],
                                                                pa.string())))
        return pa.concat_tables(parts)

    def _run(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from metakd_ray.models.encoders import _capture_query_key

        seqs = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
        lens = np.array([len(s) for s in seqs])
        b, t = len(seqs), int(lens.max())
        ids = torch.zeros(b, t, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.long)
        types = torch.zeros(b, t, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.from_numpy(s)
            mask[i, :len(s)] = 1
            if "token_type_ids" in batch:
                types[i, :len(s)] = torch.from_numpy(np.asarray(batch["token_type_ids"][i], dtype=np.int64))
        domain_ids = torch.from_numpy(np.asarray(batch["domain_id"], dtype=np.int64))
        rt = self.runtime
        ids, mask, types, domain_ids = (x.to(rt.device) for x in (ids, mask, types, domain_ids))
        with torch.inference_mode(), rt.autocast():
            if self.qk_layers:
                with _capture_query_key(self.model.encoder) as qk:
                    out = self.model(ids, mask, types, domain_ids=domain_ids)
            else:
                out = self.model(ids, mask, types, domain_ids=domain_ids)
        hs = out.encoder.hidden_states
        cols: dict[str, Any] = {
            "id": pa.array([str(x) for x in batch["id"]], pa.string()),
            "n_tokens": pa.array(lens, pa.int32()),
            "logits": pa.array([r.astype("<f4").tobytes() for r in out.logits.float().cpu().numpy()],
                               pa.large_binary()),
        }
        if out.domain_hidden is not None:
            cols["domain_hidden"] = pa.array([r.astype("<f2").tobytes()
                                              for r in out.domain_hidden.float().cpu().numpy()], pa.large_binary())
        if "prototype_score" in batch:
            cols["prototype_score"] = pa.array(np.asarray(batch["prototype_score"], dtype=np.float32), pa.float32())

        real = mask.bool()

        def cells(x: torch.Tensor) -> pa.Array:  # (b, t, d) -> one cell per example, real tokens only
            return encode_cells(x, real, lens, self.precision)

        for layer in self.layers:
            cols[f"hidden_{layer}"] = cells(hs[layer])
        for layer in self.qk_layers:
            cols[f"query_{layer}"] = cells(qk[(layer - 1, "query")])
            cols[f"key_{layer}"] = cells(qk[(layer - 1, "key")])
        return pa.table(cols)


def encode_cells(x: Any, real: Any, lens: np.ndarray, precision: str) -> pa.Array:
    """(b, t, d) tensor -> a ``large_binary`` array of b cells, cell i = ``encode_matrix(x[i, :lens[i]])``.
    float16 is converted in one tensor op and handed to Arrow as one buffer (no per-example copies): the boolean
    mask ``real`` (b, t) selects the real tokens in row-major order, i.e. example by example."""
    import torch

    if precision != "float16" or sys.byteorder != "little":
        xs = x.float().cpu().numpy()
        return pa.array([encode_matrix(xs[i, :n], precision) for i, n in enumerate(lens)], pa.large_binary())
    flat = x.to(torch.float16)[real].contiguous().cpu().numpy()  # (sum of lens, d)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lens, dtype=np.int64) * x.shape[-1] * 2, out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(lens),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def run_teacher_job(table: pa.Table, teacher: TeacherLocation, out_storage: Storage, out_parts: Sequence[str], *,
                    layers: tuple[int, ...], qk_layers: tuple[int, ...], precision: str, actors: int,
                    cpus_per_actor: float, threads_per_actor: int | None = None, batch_size: int = 32,
                    rows_per_block: int | None = None, compression: str = "zstd",
                    teachers: tuple[tuple[str, tuple[str, ...]], ...] | None = None,
                    partition_col: str | None = None, compute: str = "fp32", gpus_per_actor: float = 0.0,
                    resources_per_actor: dict[str, float] | None = None) -> float:
    """The Ray Data pass: rows -> repartition -> actor pool running the teacher -> Parquet under ``out_parts``
    (overwritten). With ``teachers``, rows name theirs in ``TEACHER_COL`` and the files are written partitioned by
    ``partition_col`` (``<out_parts>/<col>=<value>/``). ``resources_per_actor``: custom Ray resources each actor
    also holds (``ray.cache_resources``). Returns the wall time in seconds."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()  # per driver process
    ctx.enable_progress_bars = logs.data_progress_bars()
    ctx.execution_no_progress_timeout_s = 300
    # the CPUs the cluster has, or with an autoscaler can have (a head with none, workers added on demand)
    check_actor_pool(actors, cpus_per_actor, max_cpus())
    # torch threads per actor: the CPUs of a node that can hold one shared by the pool (the read/write tasks are
    # light); 2 actors x 1 thread beat 1 actor x 2 threads on 2 CPUs (benchmarks/precompute.py).
    request = {"CPU": cpus_per_actor, "GPU": gpus_per_actor, **(resources_per_actor or {})}
    threads = threads_per_actor or actor_threads(request, actors)
    n = table.num_rows
    rows = rows_per_block or max(batch_size, min(4 * batch_size, math.ceil(n / (2 * actors))))
    t0 = time.perf_counter()
    (ray.data.from_arrow(table)
        .repartition(target_num_rows_per_block=rows)
        .map_batches(TeacherPass,
                     fn_constructor_kwargs=dict(teacher_root=teacher.root, teacher_parts=tuple(teacher.parts),
                                                layers=layers, qk_layers=qk_layers, precision=precision,
                                                threads=threads, teachers=teachers, compute=compute),
                     compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                     num_gpus=gpus_per_actor or None, resources=resources_per_actor or None,
                     batch_size=batch_size, batch_format="numpy", udf_modifying_row_count=False)
        .write_parquet(out_storage.path(*out_parts), filesystem=out_storage.fs, mode=ray.data.SaveMode.OVERWRITE,
                       compression=compression, partition_cols=[partition_col] if partition_col else None))
    return time.perf_counter() - t0


def _finish(job: CacheJob, staging: tuple[str, ...], seconds: float, shared: dict | None = None,
            cfg_gpus: float = 0.0) -> CacheRef:
    """Check the staged files of ``job``, publish them and write the manifest (last)."""
    storage, fp = job.storage, job.fingerprint
    names = [n for n in storage.listdir(*staging) if n.endswith(".parquet")]
    files = [file_entry(storage, *staging, n) for n in names]
    if sum(f["rows"] for f in files) != job.num_examples:
        raise CacheError(f"the cache job wrote {sum(f['rows'] for f in files)} rows for {job.num_examples} examples")
    from metakd_ray.models.families import config_value

    publish(storage, staging, fp)
    loc = job.teacher
    model_args = loc.read_json("heads.json")
    enc_cfg = loc.read_json("encoder", "config.json")
    hidden = int(config_value(enc_cfg, "hidden_size"))  # DistilBERT saves dim, n_layers, n_heads
    total = sum(f["bytes"] for f in files)
    mean_tokens = float(np.mean(pc.list_value_length(job.table["input_ids"]).to_numpy()))
    n_mats = len(job.layers) + 2 * len(job.qk_layers)
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": fp, "key": job.key, "num_examples": job.num_examples,
        "teacher": {"root": loc.root, "parts": list(loc.parts), "class": model_args.get("cls"),
                    "num_labels": model_args.get("args", {}).get("num_labels"),
                    "num_layers": config_value(enc_cfg, "num_hidden_layers"), "hidden_size": hidden,
                    "num_heads": config_value(enc_cfg, "num_attention_heads")},
        "layer_map": list(job.key["layer_map"]), "stored_layers": list(job.layers), "qk_layers": list(job.qk_layers),
        "precision": job.precision, "attention": job.attention, "compute": job.compute,
        "device": "cuda" if cfg_gpus else "cpu",
        "has_domain_hidden": model_args.get("cls") == "MetaTeacher",
        "has_prototype_scores": job.has_prototype_scores, "compression": job.compression,
        "files": files, "mean_tokens": mean_tokens,
        "bytes_per_example": {"on_disk": round(total / max(job.num_examples, 1), 1),
                              "raw_matrices": round(n_mats * matrix_bytes(1, hidden, job.precision) * mean_tokens,
                                                    1)},
        "build_seconds": round(seconds, 3), "created": time.time(),
    }
    if shared:
        manifest["shared_job"] = shared
    storage.write_json(manifest, CACHES, fp, MANIFEST)  # last: the cache exists from here on
    touch(storage, fp)
    log.info("cache %s: built %d examples in %.1f s (%.0f KB/example)", storage.uri(CACHES, fp), job.num_examples,
             seconds, total / max(job.num_examples, 1) / 1e3)
    return CacheRef(storage.uri(), fp, verify(fp, storage), built=True)


def ensure_cache(cfg: Any, storage: Storage | None, teacher: str | os.PathLike, domain: str, split_dataset: Any,
                 layer_map: Sequence[int], prototype_scores: Mapping[str, float] | None = None, *,
                 split: str = "train", tokenizer: Any = None, max_length: int | None = None,
                 precision: str = "float16", attention: str = "inputs", batch_size: int = 32,
                 rows_per_block: int | None = None, threads_per_actor: int | None = None,
                 compression: str = "zstd", max_total_bytes: float | None = None,
                 keep: Sequence[str] = ()) -> CacheRef:
    """The verified cache of ``teacher`` on ``split_dataset`` (one domain's tokenised split, with ids): found by its
    fingerprint, or built with one Ray Data job (``cfg.ray.cache_actors`` actors x ``cfg.ray.cpus_per_actor``).

    ``teacher``: an exported teacher directory, a path under the storage root, or a teacher key
    (``teachers/<key>/model``). ``prototype_scores``: id -> t_i, stored with each example (meta_kd).
    ``tokenizer``: hashed into the fingerprint when the teacher's ``encoder/`` holds no tokenizer files (those
    win); the token ids themselves are hashed too.
    ``max_length``: default ``cfg.data.max_length``. ``max_total_bytes``: evict least recently used other caches
    (never those in ``keep``) so that the total stays within it — before a build, room is made for the new cache's
    estimated size (see the module docstring for the 12 GB sweep budget).
    """
    job = cache_job(cfg, storage, teacher, domain, split_dataset, layer_map, prototype_scores, split=split,
                    tokenizer=tokenizer, max_length=max_length, precision=precision, attention=attention,
                    compression=compression)
    return ensure_caches(cfg, [job], batch_size=batch_size, rows_per_block=rows_per_block,
                         threads_per_actor=threads_per_actor, max_total_bytes=max_total_bytes, keep=keep)[0]


def ensure_caches(cfg: Any, jobs: Sequence[CacheJob], *, batch_size: int = 32, rows_per_block: int | None = None,
                  threads_per_actor: int | None = None, max_total_bytes: float | None = None,
                  keep: Sequence[str] = ()) -> list[CacheRef]:
    """The verified caches of ``jobs`` (same storage), in order: those that exist are reused; the rest are built
    with one Ray Data job per row schema (:meth:`CacheJob.signature`; one per teacher class in a sweep), whose actors
    load each batch's teacher in turn — a job's fixed cost (actor start-up, planning; ~7 s on 2 CPUs) is paid once,
    not once per cache. ``max_total_bytes`` / ``keep``: as :func:`ensure_cache`, for all the jobs at once."""
    if not jobs:
        return []
    storage = jobs[0].storage
    refs: dict[str, CacheRef] = {}
    for job in jobs:
        if job.fingerprint not in refs:
            ref = find_cache(job.storage, job.fingerprint)
            if ref is not None:
                refs[job.fingerprint] = ref
    missing = list({j.fingerprint: j for j in jobs if j.fingerprint not in refs}.values())
    if not missing:
        return [refs[j.fingerprint] for j in jobs]
    # One builder per cache: another driver building one of these holds its lock; wait for it (sorted order, so
    # two drivers never wait for each other), then use what it built.
    locks = [cache_lock(storage, fp) for fp in sorted(j.fingerprint for j in missing)]
    try:
        for lock in locks:
            lock.acquire(wait=True, say=lambda m: log.warning("%s", m))
        remove_orphan_staging(storage, held={j.fingerprint for j in missing})
        return _ensure_locked(cfg, jobs, refs, batch_size=batch_size, rows_per_block=rows_per_block,
                              threads_per_actor=threads_per_actor, max_total_bytes=max_total_bytes, keep=keep)
    finally:
        for lock in locks:
            lock.release()


def _ensure_locked(cfg: Any, jobs: Sequence[CacheJob], refs: dict[str, CacheRef], *, batch_size: int,
                   rows_per_block: int | None, threads_per_actor: int | None, max_total_bytes: float | None,
                   keep: Sequence[str]) -> list[CacheRef]:
    storage = jobs[0].storage
    for job in jobs:  # again: a driver we waited for may have built some
        if job.fingerprint not in refs:
            ref = find_cache(job.storage, job.fingerprint)
            if ref is not None:
                refs[job.fingerprint] = ref
    missing = list({j.fingerprint: j for j in jobs if j.fingerprint not in refs}.values())
    protect = (*keep, *(j.fingerprint for j in jobs))
    if max_total_bytes is not None:  # make room first, so the total never passes the budget
        prune(storage, max_total_bytes - sum(j.est_bytes() for j in missing), keep=protect)
    by_signature: dict[tuple, list[CacheJob]] = {}
    for job in missing:
        by_signature.setdefault(job.signature(), []).append(job)
    if by_signature:
        from metakd_ray.raycluster import connect_ray

        connect_ray(cfg)
    for group in by_signature.values():
        refs.update(_build(cfg, group, batch_size=batch_size, rows_per_block=rows_per_block,
                           threads_per_actor=threads_per_actor))
    if max_total_bytes is not None:
        prune(storage, max_total_bytes, keep=protect)
    return [refs[j.fingerprint] for j in jobs]


def _build(cfg: Any, jobs: list[CacheJob], **job_args: Any) -> dict[str, CacheRef]:
    """One Ray Data job over the rows of ``jobs`` (same signature), written partitioned by cache, then each cache
    published with its manifest. The job's seconds are shared out by rows (``build_seconds``)."""
    storage, first = jobs[0].storage, jobs[0]
    staging = (CACHES, f".staging-{first.fingerprint}-{uuid.uuid4().hex[:8]}")
    teachers = tuple((j.teacher.root, tuple(j.teacher.parts)) for j in jobs)
    if len(jobs) == 1:
        table, partition = first.table, None
    else:
        table = pa.concat_tables([
            j.table.append_column(TEACHER_COL, pa.array([i] * j.num_examples, pa.int32()))
                   .append_column(CACHE_COL, pa.array([j.fingerprint] * j.num_examples, pa.string()))
            for i, j in enumerate(jobs)])
        partition = CACHE_COL
    refs: dict[str, CacheRef] = {}
    try:
        seconds = run_teacher_job(table, first.teacher, storage, staging, layers=first.layers,
                                  qk_layers=first.qk_layers, precision=first.precision, actors=cfg.ray.cache_actors,
                                  cpus_per_actor=cfg.ray.cpus_per_actor, compression=first.compression,
                                  teachers=teachers, partition_col=partition, compute=first.compute,
                                  gpus_per_actor=cfg.ray.gpus("cache"),
                                  resources_per_actor=dict(cfg.ray.cache_resources), **job_args)
        total_rows = table.num_rows
        shared = None if partition is None else {"caches": len(jobs), "rows": total_rows,
                                                 "seconds": round(seconds, 3)}
        for j in jobs:
            part = staging if partition is None else (*staging, f"{CACHE_COL}={j.fingerprint}")
            refs[j.fingerprint] = _finish(j, part, seconds * j.num_examples / total_rows, shared,
                                          cfg.ray.gpus("cache"))
    except CacheError:
        raise
    except Exception as e:  # the Ray Data job or the publishing failed: one line, nothing half-written counts
        raise CacheError(f"building {len(jobs)} cache(s) under {storage.uri(CACHES)} failed: {root_cause(e)}; "
                         "no cache was marked complete (rerun to build them again)") from e
    finally:
        try:
            storage.delete(*staging)
        except OSError:  # e.g. the disk that failed the build; the next build removes it (remove_orphan_staging)
            pass
    return refs

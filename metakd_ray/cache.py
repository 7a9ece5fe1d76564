"""Teacher-output cache: one cache per (teacher, domain, split), written by a Ray Data job, holds what the student
loss needs from the teacher, so distillation epochs read it instead of running the teacher (method doc §3; format in
``metakd_ray.cache_format``; reader ``metakd_ray.cache_reader.CachedTeacher``). ``ensure_cache`` builds one cache
with one job; ``ensure_caches`` builds many (a sweep wave's) with one job per teacher class, its actors loading each
batch's teacher in turn, so a job's fixed cost (~7 s on 2 CPUs) is paid once rather than once per cache.

    ref = ensure_cache(cfg, storage, "books-meta-r0.1-s0", "books", tokenised_train, (0, 2, 4, 6),
                       prototype_scores={id: t_i, ...})          # builds, or finds and verifies, the cache
    teacher = CachedTeacher(ref)                                   # a TeacherSource, like LiveTeacher
    distill(student, "meta_kd", teacher, train_loader, ...)        # the loop is unchanged

CLI (builds the cache one cell needs, from an exported teacher)::

    python -m metakd_ray.cache sweeps/smoke.yaml --teacher-dir runs/x/teacher/best --target books --rate 0.1 --seed 0

Layout: ``<storage root>/caches/<fingerprint>/part-*.parquet`` and ``manifest.json``, written last and atomically.
The fingerprint hashes the teacher's weights (sha256 of its weight files), its tokenizer (vocab and config), the
max length, the layer map, the domain and split, the sorted example ids, the token ids themselves, the prototype
scores and the format (precision, attention mode). Same fingerprint: nothing is recomputed (the manifest's
per-file sha256 and row counts are verified first; a truncated or altered file makes the cache rebuilt, never
used). Another fingerprint: a new cache beside the old one.

What is stored, per example (float16, only the real tokens; MiniLM-L6 teacher, 3-layer student, g = (0, 2, 4, 6),
max_length 128, Amazon reviews: mean 98.15 real tokens, 47 % truncated at 128):

- id, n_tokens, logits (float32), h_d (float16, meta teacher), prototype score (float32);
- teacher hidden states 1..6, i.e. the mapped layers 2, 4, 6 and their inputs 1, 3, 5 (the reader rebuilds each
  mapped layer's pre-softmax scores from its input with the teacher's query/key projections, and layer 0 from the
  embedding module): 6 x 98.15 x 384 x 2 B = 452 KB per example.

Disk budget of ``sweeps/scarcity.yaml`` (4 domains x 3 seeds x rates summing to 1.88 x 2 teachers = 73,094 cached
examples; measured figures and every design option in benchmarks/RESULTS.md):

=====================================================  =========  =========================================
design                                                 B/example  all 73k caches
=====================================================  =========  =========================================
float32, padded, hidden states + score maps (naive)    3.1 MB     230 GB
float16 unpadded, hidden states + score maps           1.09 MB    79 GB
float16 unpadded, hidden states + Q/K                  755 KB     55 GB
float16, layer inputs, scores rebuilt (this format)    453 KB     33.1 GB (30.8 GB as zstd Parquet)
int8 per-token scale, same layers (precision="int8")   229 KB     16.8 GB
=====================================================  =========  =========================================

No lossless-to-float16 design holds all 73k examples in 12 GB at once (that needs <= 164 KB per example, about
1.67 KB per real token: fewer than 2.2 float16 vectors of 384 per token, while the loss needs 6). What fits: each
cache serves one sweep cell (target, rate, seed, teacher), so the sweep builds them in waves that fit the budget
(``sweep_run.plan_waves``, with ``estimate_bytes``), and ``ensure_cache(s)(..., max_total_bytes=12e9)`` first
evicts the least recently used other caches to make room. An evicted cache is rebuilt on demand (fingerprinted), at
the cost of one teacher pass.

Pool layout: on 2 CPUs, ``ray.cache_actors=2 ray.cpus_per_actor=0.5`` (1 torch thread each) ran the teacher pass
6 % faster than 1 actor x 1 CPU with 2 threads, and as fast as a plain single-process loop (benchmarks/RESULTS.md).

Pitfalls handled (docs/ray-guide.md §3): the actor pool must leave a CPU for the read/write tasks (else Ray Data
deadlocks, ray#44687), so ``cache_actors * cpus_per_actor <= cluster CPUs - 1`` is checked first;
``SaveMode.OVERWRITE`` for the staging write; no Arrow tensor extension types (raw bytes cells).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from metakd_ray.cache_format import (
    ATTENTION_MODES,
    FORMAT_VERSION,
    PRECISIONS,
    encode_matrix,
    matrix_bytes,
    stored_layers,
)
from metakd_ray.storage import Storage

log = logging.getLogger(__name__)

CACHES = "caches"
MANIFEST = "manifest.json"
USED_MARK = ".last_used"
# How many times this process ran a cache-building Ray job (tests assert that a cache hit runs none).
JOB_RUNS = 0
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


# ----------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_json(obj: Any) -> str:
    return _sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


@dataclass(frozen=True)
class TeacherLocation:
    """An exported teacher (``encoder/``, ``heads.pt``, ``heads.json``) as a storage root and a relative path, so
    that any node can fetch it (``Storage(root).local_copy(*parts)``)."""

    root: str
    parts: tuple[str, ...] = ()

    def storage(self) -> Storage:
        return Storage(self.root)

    def describe(self) -> str:
        return posixpath.join(self.root, *self.parts)


def resolve_teacher(storage: Storage, teacher: str | os.PathLike) -> TeacherLocation:
    """``teacher``: a local directory of an exported teacher, a path relative to the storage root, or a teacher key
    (``teachers/<key>/model`` under the root)."""
    p = Path(teacher).expanduser()
    if p.is_dir() and (p / "heads.json").is_file():
        return TeacherLocation(str(p.resolve()))
    for parts in (tuple(str(teacher).strip("/").split("/")), ("teachers", str(teacher), "model")):
        if storage.is_file(*parts, "heads.json"):
            return TeacherLocation(storage.uri(), parts)
    raise CacheError(f"teacher {str(teacher)!r}: neither a local directory with heads.json nor "
                     f"{storage.uri(str(teacher))} nor {storage.uri('teachers', str(teacher), 'model')}")


def _walk(storage: Storage, *parts: str) -> list[str]:
    """Relative paths of every file under ``parts`` (sorted)."""
    base = storage.path(*parts)
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(posixpath.relpath(i.path, base) for i in storage.fs.get_file_info(sel)
                  if i.type == pafs.FileType.File)


def teacher_fingerprint(loc: TeacherLocation) -> dict[str, str]:
    """``{"weights": sha256 over the weight files and configs, "tokenizer": sha256 over the tokenizer files}``."""
    st = loc.storage()
    files = _walk(st, *loc.parts)
    weights = [f for f in files if f in ("heads.pt", "heads.json", "encoder/config.json")
               or (f.startswith("encoder/") and f.endswith(WEIGHT_SUFFIXES))]
    if "heads.pt" not in weights or not any(f.endswith(WEIGHT_SUFFIXES) and f.startswith("encoder/") for f in weights):
        raise CacheError(f"{loc.describe()}: no teacher weights (expected encoder/*.safetensors and heads.pt)")
    toks = [f for f in files if f.startswith("encoder/") and posixpath.basename(f) in TOKENIZER_FILES]
    digest = lambda names: _hash_json([[n, _sha256(st.read_bytes(*loc.parts, n))] for n in names])  # noqa: E731
    return {"weights": digest(weights), "tokenizer": digest(toks) if toks else ""}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A tokenizer object's vocabulary, class and lower-casing, hashed."""
    return _hash_json({"cls": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                       "lower": getattr(tokenizer, "do_lower_case", None)})


def cache_key(*, teacher: Mapping[str, str], tokenizer: str, max_length: int, layer_map: Sequence[int], domain: str,
              split: str, ids: Sequence[str], input_hash: str, prototype_hash: str | None, precision: str,
              attention: str) -> dict:
    """What the fingerprint hashes (kept verbatim in the manifest)."""
    return {"format": FORMAT_VERSION, "teacher_weights": teacher["weights"], "tokenizer": tokenizer,
            "max_length": int(max_length), "layer_map": [int(x) for x in layer_map], "domain": domain,
            "split": split, "ids": _hash_json(sorted(ids)), "num_examples": len(ids), "inputs": input_hash,
            "prototype_scores": prototype_hash, "precision": precision, "attention": attention}


def fingerprint(key: Mapping[str, Any]) -> str:
    return _hash_json(dict(key))[:32]


# ----------------------------------------------------------------------------------------------------------
# The input table (one row per example, sorted by length so batches carry little padding)
# ----------------------------------------------------------------------------------------------------------


def input_table(split_dataset: Any, prototype_scores: Mapping[str, float] | None = None) -> pa.Table:
    """``id, input_ids, [token_type_ids], domain_id, [prototype_score]`` from a tokenised ``datasets.Dataset`` (or
    anything with those columns: a ``pa.Table``, a dict of lists), longest first."""
    if hasattr(split_dataset, "flatten_indices"):  # datasets.Dataset (select/filter keep an indices mapping)
        import datasets

        quiet = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            table = split_dataset.flatten_indices().data.table
        finally:
            if quiet:
                datasets.enable_progress_bars()
    elif isinstance(split_dataset, pa.Table):
        table = split_dataset
    else:
        table = pa.table(dict(split_dataset))
    missing = [c for c in ("id", "input_ids", "domain_id") if c not in table.column_names]
    if missing:
        raise ValueError(f"the split needs columns id, input_ids and domain_id (tokenised, with ids); missing {missing}")
    cols = {"id": table["id"].cast(pa.string()), "input_ids": table["input_ids"].cast(pa.list_(pa.int32())),
            "domain_id": table["domain_id"].cast(pa.int32())}
    if "token_type_ids" in table.column_names:
        cols["token_type_ids"] = table["token_type_ids"].cast(pa.list_(pa.int8()))
    ids = cols["id"].to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError("example ids are not unique")
    if prototype_scores is not None:
        absent = [i for i in ids if i not in prototype_scores]
        if absent:
            raise ValueError(f"no prototype score for {len(absent)} examples, e.g. {absent[:3]}")
        cols["prototype_score"] = pa.array([float(prototype_scores[i]) for i in ids], pa.float32())
    out = pa.table(cols)
    lengths = pc.list_value_length(out["input_ids"]).to_numpy()
    return out.take(np.argsort(-lengths, kind="stable"))


def _input_hash(table: pa.Table) -> str:
    """sha256 of (id, token ids, token type ids, domain id) in id order."""
    order = np.argsort(np.asarray(table["id"].to_pylist(), dtype=object), kind="stable")
    t = table.select([c for c in ("id", "input_ids", "token_type_ids", "domain_id") if c in table.column_names])
    h = hashlib.sha256()
    for row in t.take(order).to_pylist():
        h.update(json.dumps(row, separators=(",", ":")).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The Ray Data job
# ----------------------------------------------------------------------------------------------------------


def check_actor_pool(actors: int, cpus_per_actor: float, cluster_cpus: float) -> None:
    """Raise unless the actor pool leaves at least one CPU for Ray Data's read/write tasks: Ray Data starts the
    pool's actors before any other task, so a pool holding every CPU waits forever (ray-project/ray#44687)."""
    if actors < 1 or cpus_per_actor <= 0:
        raise ValueError(f"ray.cache_actors={actors} and ray.cpus_per_actor={cpus_per_actor} must be positive")
    used = actors * cpus_per_actor
    if used > cluster_cpus - 1 + 1e-9:
        raise ValueError(
            f"ray.cache_actors * ray.cpus_per_actor = {actors} x {cpus_per_actor:g} = {used:g} CPUs, but the cluster "
            f"has {cluster_cpus:g}: the cache job needs the pool to leave at least 1 CPU free for Ray Data's "
            f"read/write tasks, or it deadlocks (Ray starts the actors first; ray-project/ray#44687). Use at most "
            f"{max(cluster_cpus - 1, 0):g} CPUs in all, e.g. ray.cache_actors=1 ray.cpus_per_actor=1 on 2 CPUs, "
            f"or ray.cache_actors=2 ray.cpus_per_actor=0.5")


class TeacherPass:
    """Ray Data callable class: loads the exported teacher once per actor, then turns a numpy batch of input rows
    into a ``pa.Table`` of cache rows (``metakd_ray.cache_format``)."""

    def __init__(self, teacher_root: str, teacher_parts: tuple[str, ...], layers: tuple[int, ...],
                 qk_layers: tuple[int, ...], precision: str, threads: int,
                 teachers: tuple[tuple[str, tuple[str, ...]], ...] | None = None):
        import torch

        torch.set_num_threads(max(1, int(threads)))
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

        self.model = None
        root, parts = self.teachers[i]
        with Storage(root).local_copy(*parts) as d:
            self.model = load_task_model(d).eval()
        # No attention maps are read here (scores are rebuilt from stored layer inputs, or Q/K are hooked), so the
        # fused kernel can replace the eager attention the training code needs.
        if hasattr(self.model.encoder, "set_attn_implementation"):
            self.model.encoder.set_attn_implementation("sdpa")
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
        with torch.inference_mode():
            if self.qk_layers:
                with _capture_query_key(self.model.encoder) as qk:
                    out = self.model(ids, mask, types, domain_ids=domain_ids)
            else:
                out = self.model(ids, mask, types, domain_ids=domain_ids)
        hs = out.encoder.hidden_states
        cols: dict[str, Any] = {
            "id": pa.array([str(x) for x in batch["id"]], pa.string()),
            "n_tokens": pa.array(lens, pa.int32()),
            "logits": pa.array([r.astype("<f4").tobytes() for r in out.logits.float().numpy()], pa.large_binary()),
        }
        if out.domain_hidden is not None:
            cols["domain_hidden"] = pa.array([r.astype("<f2").tobytes() for r in out.domain_hidden.float().numpy()],
                                             pa.large_binary())
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
        xs = x.float().numpy()
        return pa.array([encode_matrix(xs[i, :n], precision) for i, n in enumerate(lens)], pa.large_binary())
    flat = x.to(torch.float16)[real].contiguous().numpy()  # (sum of lens, d)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lens, dtype=np.int64) * x.shape[-1] * 2, out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(lens),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def init_ray(cfg: Any) -> None:
    """Start or join Ray as ``cfg.ray`` says (no-op if Ray is already up)."""
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")  # docs/ray-guide.md §3.3 #2
    import ray
    import ray.data

    if ray.is_initialized():
        return
    addr = cfg.ray.address
    if addr in ("", "auto") or "://" in addr or ":" in addr:
        ray.init(address=addr or None, logging_level="WARNING")
    else:  # "local"
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or None, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 300


def run_teacher_job(table: pa.Table, teacher: TeacherLocation, out_storage: Storage, out_parts: Sequence[str], *,
                    layers: tuple[int, ...], qk_layers: tuple[int, ...], precision: str, actors: int,
                    cpus_per_actor: float, threads_per_actor: int | None = None, batch_size: int = 32,
                    rows_per_block: int | None = None, compression: str = "zstd",
                    teachers: tuple[tuple[str, tuple[str, ...]], ...] | None = None,
                    partition_col: str | None = None) -> float:
    """The Ray Data pass: rows -> repartition -> actor pool running the teacher -> Parquet under ``out_parts``
    (overwritten). With ``teachers``, rows name theirs in ``TEACHER_COL`` and the files are written partitioned by
    ``partition_col`` (``<out_parts>/<col>=<value>/``). Returns the wall time in seconds."""
    global JOB_RUNS
    import ray
    import ray.data

    cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
    check_actor_pool(actors, cpus_per_actor, cluster_cpus)
    # torch threads per actor: the node's CPUs shared by the pool (the read/write tasks are light), e.g. 1 actor x 2
    # threads or 2 actors x 1 thread on 2 CPUs (benchmarks/precompute.py measured the latter faster).
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=cluster_cpus)
    threads = threads_per_actor or max(1, int(min(node_cpus, cluster_cpus) // actors))
    n = table.num_rows
    rows = rows_per_block or max(batch_size, min(4 * batch_size, math.ceil(n / (2 * actors))))
    t0 = time.perf_counter()
    JOB_RUNS += 1
    (ray.data.from_arrow(table)
        .repartition(target_num_rows_per_block=rows)
        .map_batches(TeacherPass,
                     fn_constructor_kwargs=dict(teacher_root=teacher.root, teacher_parts=tuple(teacher.parts),
                                                layers=layers, qk_layers=qk_layers, precision=precision,
                                                threads=threads, teachers=teachers),
                     compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                     batch_size=batch_size, batch_format="numpy", udf_modifying_row_count=False)
        .write_parquet(out_storage.path(*out_parts), filesystem=out_storage.fs, mode=ray.data.SaveMode.OVERWRITE,
                       compression=compression, partition_cols=[partition_col] if partition_col else None))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# Manifest, verification, publication
# ----------------------------------------------------------------------------------------------------------


def _file_entry(storage: Storage, *parts: str) -> dict:
    data = storage.read_bytes(*parts)
    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return {"name": parts[-1], "bytes": len(data), "sha256": _sha256(data), "rows": rows}


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
            got = _file_entry(storage, CACHES, fp, entry["name"])
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


def _touch(storage: Storage, fp: str) -> None:
    storage.write_bytes(str(time.time()).encode(), CACHES, fp, USED_MARK)


def _last_used(storage: Storage, fp: str) -> float:
    try:
        return float(storage.read_bytes(CACHES, fp, USED_MARK))
    except (OSError, ValueError):
        return 0.0


def cache_sizes(storage: Storage) -> dict[str, int]:
    """fingerprint -> bytes on disk of every cache directory (complete or not) under ``caches/``."""
    out = {}
    for fp in storage.listdir(CACHES):
        if fp.startswith("."):
            continue
        sel = pafs.FileSelector(storage.path(CACHES, fp), recursive=True, allow_not_found=True)
        out[fp] = sum(i.size or 0 for i in storage.fs.get_file_info(sel) if i.type == pafs.FileType.File)
    return out


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


def _publish(storage: Storage, staging: tuple[str, ...], fp: str) -> None:
    """Move the staged Parquet files into ``caches/<fp>/`` (replacing an incomplete or corrupt one)."""
    storage.delete(CACHES, fp)
    if storage.is_local:
        storage.fs.move(storage.path(*staging), storage.path(CACHES, fp))
    else:
        storage.fs.create_dir(storage.path(CACHES, fp), recursive=True)
        for name in storage.listdir(*staging):
            storage.fs.copy_file(storage.path(*staging, name), storage.path(CACHES, fp, name))
        storage.delete(*staging)


# ----------------------------------------------------------------------------------------------------------
# ensure_cache
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CacheJob:
    """One cache to find or build: everything its fingerprint is made of, and the input rows of its teacher pass."""

    storage: Storage
    fingerprint: str
    key: dict
    teacher: TeacherLocation
    table: pa.Table  # input_table(): id, input_ids, [token_type_ids], domain_id, [prototype_score]
    layers: tuple[int, ...]
    qk_layers: tuple[int, ...]
    precision: str
    attention: str
    compression: str
    has_prototype_scores: bool

    @property
    def num_examples(self) -> int:
        return self.table.num_rows

    def est_bytes(self) -> int:
        enc = json.loads(self.teacher.storage().read_bytes(*self.teacher.parts, "encoder", "config.json"))
        return estimate_bytes(pc.list_value_length(self.table["input_ids"]).to_numpy(),
                              len(self.layers) + 2 * len(self.qk_layers), int(enc["hidden_size"]), self.precision)

    def signature(self) -> tuple:
        """Jobs with the same signature write rows of the same schema, so one Ray Data job can build them all."""
        heads = json.loads(self.teacher.storage().read_bytes(*self.teacher.parts, "heads.json"))
        return (heads.get("cls"), self.has_prototype_scores, "token_type_ids" in self.table.column_names,
                self.layers, self.qk_layers, self.precision, self.compression)


def cache_job(cfg: Any, storage: Storage | None, teacher: str | os.PathLike, domain: str, split_dataset: Any,
              layer_map: Sequence[int], prototype_scores: Mapping[str, float] | None = None, *,
              split: str = "train", tokenizer: Any = None, max_length: int | None = None,
              precision: str = "float16", attention: str = "inputs", compression: str = "zstd") -> CacheJob:
    """The :class:`CacheJob` of ``teacher`` on ``split_dataset`` (arguments as :func:`ensure_cache`)."""
    storage = storage or Storage(cfg.storage.root)
    if precision not in PRECISIONS or attention not in ATTENTION_MODES:
        raise ValueError(f"precision={precision!r} (one of {PRECISIONS}), attention={attention!r} "
                         f"(one of {ATTENTION_MODES})")
    g = tuple(int(x) for x in layer_map)
    loc = resolve_teacher(storage, teacher)
    tfp = teacher_fingerprint(loc)
    table = input_table(split_dataset, prototype_scores)
    ids = table["id"].to_pylist()
    proto_hash = None if prototype_scores is None else _hash_json(sorted(
        (i, round(float(prototype_scores[i]), 7)) for i in ids))
    # the tokenizer saved with the teacher when there is one (so passing ``tokenizer`` or not gives the same key)
    tok_fp = tfp["tokenizer"] or (tokenizer_fingerprint(tokenizer) if tokenizer is not None else "")
    key = cache_key(teacher=tfp, tokenizer=tok_fp, max_length=max_length or cfg.data.max_length, layer_map=g,
                    domain=domain, split=split, ids=ids, input_hash=_input_hash(table), prototype_hash=proto_hash,
                    precision=precision, attention=attention)
    return CacheJob(storage, fingerprint(key), key, loc, table, stored_layers(g, attention),
                    tuple(g[1:]) if attention == "qk" else (), precision, attention, compression,
                    prototype_scores is not None)


def find_cache(job: CacheJob) -> CacheRef | None:
    """The job's cache when it exists and verifies (marked used), else None (a corrupt one is logged)."""
    if not job.storage.exists(CACHES, job.fingerprint):
        return None
    try:
        manifest = verify(job.fingerprint, job.storage)
    except CacheError as e:
        log.warning("%s; rebuilding it", e)
        return None
    _touch(job.storage, job.fingerprint)
    log.info("cache %s: hit (%d examples), nothing recomputed", job.storage.uri(CACHES, job.fingerprint),
             job.num_examples)
    return CacheRef(job.storage.uri(), job.fingerprint, manifest, built=False)


def _finish(job: CacheJob, staging: tuple[str, ...], seconds: float, shared: dict | None = None) -> CacheRef:
    """Check the staged files of ``job``, publish them and write the manifest (last)."""
    storage, fp = job.storage, job.fingerprint
    names = [n for n in storage.listdir(*staging) if n.endswith(".parquet")]
    files = [_file_entry(storage, *staging, n) for n in names]
    if sum(f["rows"] for f in files) != job.num_examples:
        raise CacheError(f"the cache job wrote {sum(f['rows'] for f in files)} rows for {job.num_examples} examples")
    _publish(storage, staging, fp)
    loc = job.teacher
    model_args = json.loads(loc.storage().read_bytes(*loc.parts, "heads.json"))
    enc_cfg = json.loads(loc.storage().read_bytes(*loc.parts, "encoder", "config.json"))
    hidden = int(enc_cfg["hidden_size"])
    total = sum(f["bytes"] for f in files)
    mean_tokens = float(np.mean(pc.list_value_length(job.table["input_ids"]).to_numpy()))
    n_mats = len(job.layers) + 2 * len(job.qk_layers)
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": fp, "key": job.key, "num_examples": job.num_examples,
        "teacher": {"root": loc.root, "parts": list(loc.parts), "class": model_args.get("cls"),
                    "num_labels": model_args.get("args", {}).get("num_labels"),
                    "num_layers": enc_cfg.get("num_hidden_layers"), "hidden_size": hidden,
                    "num_heads": enc_cfg.get("num_attention_heads")},
        "layer_map": list(job.key["layer_map"]), "stored_layers": list(job.layers), "qk_layers": list(job.qk_layers),
        "precision": job.precision, "attention": job.attention,
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
    _touch(storage, fp)
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
            ref = find_cache(job)
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
        import ray

        if not ray.is_initialized():
            init_ray(cfg)
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
                                  teachers=teachers, partition_col=partition, **job_args)
        total_rows = table.num_rows
        shared = None if partition is None else {"caches": len(jobs), "rows": total_rows,
                                                 "seconds": round(seconds, 3)}
        for j in jobs:
            part = staging if partition is None else (*staging, f"{CACHE_COL}={j.fingerprint}")
            refs[j.fingerprint] = _finish(j, part, seconds * j.num_examples / total_rows, shared)
    finally:
        storage.delete(*staging)
    return refs


def estimate_bytes(lengths: Sequence[int] | np.ndarray, matrices: int, hidden: int, precision: str = "float16") -> int:
    """Upper estimate of a cache's size on disk before it is built: ``matrices`` stored (t, hidden) matrices per
    example (``len(stored_layers) + 2 * len(qk_layers)``) at each example's real length, plus 1 KB per example for the
    small fields (logits, h_d, id, t_i, n_tokens). Parquet's zstd only makes the files smaller (0.93x measured)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return int(sum(matrices * matrix_bytes(int(t), hidden, precision) for t in lengths) + 1024 * len(lengths))


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def student_layer_map(cfg: Any, teacher_layers: int) -> tuple[int, ...]:
    """The layer map g the configured student will use with a ``teacher_layers``-layer teacher."""
    from metakd_ray.models import evenly_spaced_layers, layer_map

    s = cfg.model.student
    if s.layers:
        return layer_map(len(s.layers), teacher_layers, s.layers)
    if s.source == "teacher_layers":
        return layer_map(s.num_layers, teacher_layers, evenly_spaced_layers(s.num_layers, teacher_layers))
    return layer_map(s.num_layers, teacher_layers)


def read_prototype_scores(path: str | os.PathLike) -> dict[str, float]:
    """``prototype_scores.parquet`` (columns id, prototype_score) -> dict."""
    t = pq.read_table(path, columns=["id", "prototype_score"])
    return dict(zip(t["id"].to_pylist(), t["prototype_score"].to_pylist()))


def main(argv: list[str] | None = None) -> int:
    from metakd_ray import config as C
    from metakd_ray import data as D

    ap = argparse.ArgumentParser(prog="python -m metakd_ray.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--teacher-dir", required=True,
                    help="an exported teacher (encoder/, heads.pt, heads.json): a directory, a path under "
                         "storage.root, or a teacher key (teachers/<key>/model)")
    ap.add_argument("--target", help="target domain (default: the first of sweep.target_domains or data.domains)")
    ap.add_argument("--rate", type=float, default=None, help="sample rate (default: the first of sweep.sample_rates)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: the first of sweep.seeds)")
    ap.add_argument("--split", default="train", choices=("train", "dev", "test"))
    ap.add_argument("--prototype-scores", help="parquet with columns id, prototype_score (default: "
                    "prototype_scores.parquet beside the teacher's model/ folder, if there)")
    ap.add_argument("--precision", default="float16", choices=PRECISIONS)
    ap.add_argument("--attention", default="inputs", choices=ATTENTION_MODES)
    ap.add_argument("--max-total-gb", type=float, default=None, help="evict LRU caches beyond this total")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = C.load(args.config, args.overrides)
        target = args.target or (cfg.sweep.target_domains or cfg.data.domains)[0]
        if target not in cfg.data.domains:
            raise C.ConfigError([f"--target: {target!r} is not in data.domains ({', '.join(cfg.data.domains)})"])
        rate = D.check_rate(args.rate if args.rate is not None else cfg.sweep.sample_rates[0])
        seed = args.seed if args.seed is not None else cfg.sweep.seeds[0]
        storage = Storage(cfg.storage.root)
        loc = resolve_teacher(storage, args.teacher_dir)
    except (C.ConfigError, ValueError, CacheError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    with loc.storage().local_copy(*loc.parts) as tdir:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(tdir) / "encoder"))
        n_layers = json.loads((Path(tdir) / "encoder" / "config.json").read_text())["num_hidden_layers"]
        proto_path = args.prototype_scores
        if proto_path is None and loc.parts and loc.parts[-1] == "model" and \
                loc.storage().is_file(*loc.parts[:-1], "prototype_scores.parquet"):
            with loc.storage().local_copy(*loc.parts[:-1]) as kdir:
                protos = read_prototype_scores(Path(kdir) / "prototype_scores.parquet")
        else:
            protos = read_prototype_scores(proto_path) if proto_path else None
    splits = D.load_splits(cfg.data)
    ds = splits[args.split]
    if args.split == "train":
        only = (target,) if cfg.data.scarcity == "target" else None
        ds = D.subsample(ds, rate, seed, only_domains=only)
    idx = splits.domains.index(target)
    ds = ds.filter(lambda d: [x == idx for x in d], input_columns="domain_id", batched=True)
    tok = D.tokenize(ds, tokenizer, cfg.data.max_length)
    g = student_layer_map(cfg, n_layers)
    init_ray(cfg)
    ref = ensure_cache(cfg, storage, args.teacher_dir, target, tok, g, protos, split=args.split,
                       tokenizer=tokenizer, precision=args.precision, attention=args.attention,
                       max_total_bytes=args.max_total_gb * 1e9 if args.max_total_gb else None)
    m = ref.manifest
    print(json.dumps({"cache": ref.storage().uri(*ref.parts), "built": ref.built, "examples": ref.num_examples,
                      "layer_map": m["layer_map"], "stored_layers": m["stored_layers"],
                      "bytes": ref.total_bytes, "kb_per_example": round(ref.total_bytes / ref.num_examples / 1e3, 1),
                      "build_seconds": m["build_seconds"] if ref.built else 0.0}))
    return 0


def __getattr__(name: str) -> Any:  # CachedTeacher lives in cache_reader (it imports this module)
    if name == "CachedTeacher":
        from metakd_ray.cache_reader import CachedTeacher

        return CachedTeacher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())

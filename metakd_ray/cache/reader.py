"""Reading a teacher-output cache back as the student's :class:`~metakd_ray.distill.TeacherRecord`.

``CachedTeacher(ref)`` is a ``TeacherSource``: given a collated student batch (``ids``, ``input_ids``,
``attention_mask``, ``token_type_ids``), it returns the record a ``LiveTeacher`` would, aligned with the batch (same
order as ``batch["ids"]``, padded to the batch's length with zeros): logits, the hidden states ``g`` selects
(layer 0 recomputed from the teacher's embedding modules), the pre-softmax attention scores of the mapped layers
(rebuilt from the cached layer inputs with the teacher's query/key projections, or from cached Q/K), h_d and the
prototype scores (cached, else the batch's).

Differences from a live teacher, all by design: positions that are padding hold zeros (the losses mask them unless
``distill.include_padding`` is on, which a cache cannot reproduce); the teacher is always in eval mode (no
``distill.teacher_dropout``); values agree within float16 rounding of the cached states.

The whole cache is loaded into memory once per process (``load_cache``; caches are per target-domain split, at
most ~0.7 GB in float16; a process keeps only the cache it read last, ``KEEP_LOADED``) with every file's sha256
checked as it is read, so a reader never uses altered bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from metakd_ray.cache.format import decode_matrix
from metakd_ray.cache.store import CacheError, CacheRef
from metakd_ray.distill import TeacherRecord
from metakd_ray.runtime import release_memory
from metakd_ray.teacher.artefact import TeacherLocation, teacher_fingerprint


@dataclass
class LoadedCache:
    """A cache in memory: per example (row) its token count and start in the token-major matrices."""

    fingerprint: str
    manifest: dict
    index: dict[str, int]
    n_tokens: np.ndarray  # (n,) int64
    starts: np.ndarray  # (n,) int64 offset of each example's first token in ``matrices``
    logits: np.ndarray  # (n, c) float32
    domain_hidden: np.ndarray | None  # (n, dt) float16
    prototype_scores: np.ndarray | None  # (n,) float32
    matrices: dict[str, np.ndarray]  # "hidden_<L>" / "query_<L>" / "key_<L>" -> (sum of t, dt) float16

    @property
    def nbytes(self) -> int:
        arrays = [self.logits, self.n_tokens, self.starts, *self.matrices.values()]
        arrays += [a for a in (self.domain_hidden, self.prototype_scores) if a is not None]
        return sum(a.nbytes for a in arrays)


# Caches (and teacher parts) kept in this process: the most recent only. A reused Tune actor runs many trials in
# turn; keeping every cache it ever read would grow it by up to ~0.7 GB per cache (benchmarks/memory.py).
KEEP_LOADED = 1
_LOADED: dict[str, LoadedCache] = {}


def _keep_recent(store: dict, keep: int) -> None:
    """Drop the oldest entries of an insertion-ordered dict so that ``keep`` remain."""
    while len(store) > keep:
        store.pop(next(iter(store)))


def _matrix_column(name: str, col: pa.ChunkedArray, n_tokens: np.ndarray, width: int, precision: str) -> np.ndarray:
    """A column of per-example (t, width) cells -> one (sum t, width) float16 array, rows in table order."""
    if precision == "float16":
        arr = col.combine_chunks()
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
        expect = 2 * width * n_tokens
        if not np.array_equal(np.diff(offsets), expect):
            raise CacheError(f"column {name}: cell sizes do not match n_tokens x {width}")
        data = np.frombuffer(arr.buffers()[2], dtype="<f2")[offsets[0] // 2:offsets[-1] // 2]
        return data.reshape(-1, width)
    cells = col.to_pylist()
    return np.concatenate([decode_matrix(c, int(t), width, precision) for c, t in zip(cells, n_tokens)])


def _columns(table: pa.Table, names: list[str], width: int, precision: str) -> dict:
    """One file's fields as numpy arrays that own their memory (no view into Arrow buffers)."""
    n_tokens = table["n_tokens"].to_numpy().astype(np.int64)
    out: dict = {"id": table["id"].to_pylist(), "n_tokens": n_tokens,
                 "logits": np.stack([np.frombuffer(c, dtype="<f4") for c in table["logits"].to_pylist()])
                 if table.num_rows else np.zeros((0, 0), np.float32),
                 "domain_hidden": None, "prototype_score": None}
    if "domain_hidden" in table.column_names:
        out["domain_hidden"] = np.stack([np.frombuffer(c, dtype="<f2") for c in table["domain_hidden"].to_pylist()])
    if "prototype_score" in table.column_names:
        out["prototype_score"] = table["prototype_score"].to_numpy().astype(np.float32)
    for name in names:
        out[name] = np.array(_matrix_column(name, table[name], n_tokens, width, precision))  # a copy
    return out


def _fill(parts: list[dict], name: str) -> np.ndarray:
    """``np.concatenate`` of the parts' ``name`` arrays into one preallocated array, dropping each part's array as
    soon as it is copied."""
    shape0 = sum(len(part[name]) for part in parts)
    first = parts[0][name]
    out = np.empty((shape0, *first.shape[1:]), dtype=first.dtype)
    at = 0
    for part in parts:
        x = part.pop(name)
        out[at:at + len(x)] = x
        at += len(x)
        del x
    return out


def load_cache(ref: CacheRef, verify: bool = True) -> LoadedCache:
    """The cache ``ref`` in memory (once per process; later calls return the same object). ``verify`` checks each
    file's sha256 against the manifest as it is read."""
    if ref.fingerprint in _LOADED:
        _LOADED[ref.fingerprint] = _LOADED.pop(ref.fingerprint)  # now the most recent
        return _LOADED[ref.fingerprint]
    _keep_recent(_LOADED, KEEP_LOADED - 1)  # room first: never two big caches at once
    release_memory(collect=True)  # ... not even one that a finished trial's objects keep in a reference cycle
    m, storage = ref.manifest, ref.storage()
    width = int(m["teacher"]["hidden_size"])
    names = [f"hidden_{L}" for L in m["stored_layers"]]
    names += [f"{w}_{L}" for L in m.get("qk_layers", []) for w in ("query", "key")]
    # File by file: its bytes, then its table, then numpy copies of its columns; each file's Arrow memory is freed
    # before the next is read. Then one array per field, filled part by part (each part freed once copied), so the
    # process holds about one copy of the cache, not the bytes, the tables and the arrays at once.
    parts = []
    for entry in m["files"]:
        try:
            data = storage.read_bytes(*ref.parts, entry["name"])
        except OSError as e:
            raise CacheError(f"{storage.uri(*ref.parts, entry['name'])}: unreadable ({e}); call ensure_cache "
                             "again to rebuild the cache") from None
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CacheError(f"{storage.uri(*ref.parts, entry['name'])}: sha256 differs from the manifest; call "
                             "ensure_cache again to rebuild the cache")
        table = pq.read_table(pa.BufferReader(data))
        del data
        parts.append(_columns(table, names, width, m["precision"]))
        del table
        pa.default_memory_pool().release_unused()
    if not parts:
        raise CacheError(f"cache {ref.fingerprint}: its manifest lists no files; call ensure_cache again")
    ids = [i for part in parts for i in part["id"]]
    n_tokens = np.concatenate([part["n_tokens"] for part in parts])
    starts = np.concatenate([[0], np.cumsum(n_tokens)[:-1]]).astype(np.int64)
    fields = {}
    for name in ("logits", "domain_hidden", "prototype_score", *names):
        if parts[0].get(name) is None:
            fields[name] = None
            continue
        fields[name] = _fill(parts, name)
    logits, dh, proto = fields.pop("logits"), fields.pop("domain_hidden"), fields.pop("prototype_score")
    matrices = fields
    loaded = LoadedCache(ref.fingerprint, m, {i: r for r, i in enumerate(ids)}, n_tokens, starts, logits, dh, proto,
                         matrices)
    _LOADED[ref.fingerprint] = loaded
    return loaded


def unload(fingerprint: str | None = None) -> None:
    """Forget one loaded cache (or all): the next ``load_cache`` reads it again."""
    if fingerprint is None:
        _LOADED.clear()
    else:
        _LOADED.pop(fingerprint, None)


class _TeacherParts(nn.Module):
    """What the reader recomputes with: the teacher's embedding modules (``families.EmbeddingOutput``: layer 0 as
    the encoder forms it, e.g. ELECTRA's projection to the hidden width) and, per mapped layer, its query and key
    projections and their scale."""

    def __init__(self, location: TeacherLocation, layer_map: Sequence[int], with_qk: bool):
        super().__init__()
        from metakd_ray.models import load_task_model
        from metakd_ray.models.encoders import _self_attention_modules
        from metakd_ray.models.families import EmbeddingOutput

        with location.storage().local_copy(*location.parts) as d:
            model = load_task_model(d)
        enc = model.encoder
        self.embeddings = EmbeddingOutput(enc)
        self.heads = enc.config.num_attention_heads
        try:
            attn = _self_attention_modules(enc)
        except TypeError as e:  # DeBERTa-v2: scores with relative-position terms; its trials run the teacher live
            raise CacheError(f"the teacher at {location.describe()} cannot be read from a cache: {e}") from None
        self.query = nn.ModuleList(attn[g - 1].query for g in layer_map[1:]) if with_qk else nn.ModuleList()
        self.key = nn.ModuleList(attn[g - 1].key for g in layer_map[1:]) if with_qk else nn.ModuleList()
        self.scaling = [attn[g - 1].scaling for g in layer_map[1:]]
        self.eval()


_PARTS: dict[tuple, _TeacherParts] = {}


class CachedTeacher:
    """A ``TeacherSource`` reading the cache ``ref`` (see the module docstring). ``layer_map``: if given, must be
    the cache's. ``teacher_dir``: where the teacher is (default: the location recorded in the manifest); its
    weights must hash to the cache's teacher fingerprint."""

    kind = "cache"

    def __init__(self, ref: CacheRef, layer_map: Sequence[int] | None = None, *,
                 teacher_dir: str | None = None, verify: bool = True):
        m = ref.manifest
        self.ref, self.layer_map = ref, tuple(m["layer_map"])
        self.hidden_size = int(m["teacher"]["hidden_size"])
        self.domain_hidden_size = self.hidden_size if m["has_domain_hidden"] else None
        if layer_map is not None and tuple(layer_map) != self.layer_map:
            raise CacheError(f"the cache holds layer map {list(self.layer_map)}, the student needs "
                             f"{list(layer_map)}: build a cache for this layer map")
        self.attention = m["attention"]
        self.data = load_cache(ref, verify)
        loc = TeacherLocation(teacher_dir) if teacher_dir else TeacherLocation(m["teacher"]["root"],
                                                                               tuple(m["teacher"]["parts"]))
        key = (ref.fingerprint, loc)
        if key not in _PARTS:
            _keep_recent(_PARTS, KEEP_LOADED - 1)
            if verify and teacher_fingerprint(loc)["weights"] != m["key"]["teacher_weights"]:
                raise CacheError(f"the teacher at {loc.describe()} is not the one the cache {ref.fingerprint} "
                                 "was built from (weights differ)")
            _PARTS[key] = _TeacherParts(loc, self.layer_map, with_qk=self.attention == "inputs")
        self.parts = _PARTS[key]

    def _rows(self, ids: Sequence[str]) -> np.ndarray:
        index = self.data.index
        missing = [i for i in ids if i not in index]
        if missing:
            raise CacheError(f"{len(missing)} examples of the batch are not in cache {self.ref.fingerprint} "
                             f"(e.g. {missing[:3]}): it was built for another split or sample")
        return np.fromiter((index[i] for i in ids), dtype=np.int64, count=len(ids))

    @torch.no_grad()
    def __call__(self, batch: dict, needs_layers: bool = True) -> TeacherRecord:
        d = self.data
        mask = batch["attention_mask"]
        dev = mask.device  # records on the batch's device (a trial on a GPU)
        rows = self._rows(batch["ids"])
        logits = torch.from_numpy(d.logits[rows]).to(dev)
        domain_hidden = (torch.from_numpy(d.domain_hidden[rows]).to(dev, torch.float32)
                         if d.domain_hidden is not None else None)
        proto = (torch.from_numpy(d.prototype_scores[rows]).to(dev) if d.prototype_scores is not None
                 else batch.get("prototype_scores"))
        if not needs_layers:
            return TeacherRecord(logits, (), (), domain_hidden, proto)

        self.parts.to(dev)  # once per device: later calls find the parameters there
        b, t = mask.shape
        lens = d.n_tokens[rows]
        real = mask.sum(dim=1).cpu().numpy()
        if not np.array_equal(real, lens):
            bad = int(np.flatnonzero(real != lens)[0])
            raise CacheError(f"example {batch['ids'][bad]!r} has {int(real[bad])} tokens in the batch but "
                             f"{int(lens[bad])} in the cache: the student's tokenizer or max_length differs from the "
                             "cache's")
        dst = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]  # flat (b*t) positions of real tokens, in order
        src = np.concatenate([np.arange(s, s + n) for s, n in zip(d.starts[rows], lens)])
        width = next(iter(d.matrices.values())).shape[1] if d.matrices else 0
        maskf = mask.to(torch.float32)
        got: dict[int | str, Tensor] = {}

        def matrix(name: str) -> Tensor:
            if name not in got:
                out = torch.zeros(b * t, width, device=dev)
                out[dst] = torch.from_numpy(d.matrices[name][src]).to(dev, torch.float32)
                got[name] = out.view(b, t, width)
            return got[name]

        def hidden(layer: int) -> Tensor:
            if layer == 0:
                if 0 not in got:
                    emb = self.parts.embeddings(batch["input_ids"], mask, batch.get("token_type_ids"))
                    got[0] = emb * maskf.unsqueeze(-1)
                return got[0]
            return matrix(f"hidden_{layer}")

        hs = tuple(hidden(g) for g in self.layer_map)
        pair = (maskf.unsqueeze(2) * maskf.unsqueeze(1)).unsqueeze(1)  # (b, 1, t, t)
        heads = self.parts.heads
        scores = []
        for m, g in enumerate(self.layer_map[1:]):
            if self.attention == "qk":
                q, k = matrix(f"query_{g}"), matrix(f"key_{g}")
            else:
                x = hidden(g - 1)
                q, k = self.parts.query[m](x), self.parts.key[m](x)
            q = q.view(b, t, heads, -1).transpose(1, 2)
            k = k.view(b, t, heads, -1).transpose(1, 2)
            scores.append(torch.matmul(q, k.transpose(-1, -2)) * self.parts.scaling[m] * pair)
        return TeacherRecord(logits, hs, tuple(scores), domain_hidden, proto)

"""What a cache is made of: the input rows (one per example, longest first), and the key whose hash is the cache's
fingerprint — the teacher's weights and tokenizer, max length, layer map, domain and split, the example ids and token
ids, the prototype scores and the format. Same key, same cache."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metakd_ray.cache.format import ATTENTION_MODES, FORMAT_VERSION, PRECISIONS, matrix_bytes, stored_layers
from metakd_ray.cache.store import CacheError
from metakd_ray.runtime import stage_precision
from metakd_ray.storage import Storage, hash_json
from metakd_ray.teacher.artefact import TeacherLocation, resolve_teacher, teacher_fingerprint

def live_only(model_type: str | None) -> str | None:
    """Why a teacher encoder of ``model_type`` cannot be served from a cache (one line), or None when it can (also
    when the type is unknown or unsupported: loading the teacher says why). A cache rebuilds attention scores from
    the stored layer inputs with the query/key projections (``families.query_key_projections``): DeBERTa-v2's scores
    add relative-position terms, so its trials run the teacher live."""
    from metakd_ray.models.families import UnsupportedFamily, family_of

    try:
        family = family_of(model_type or "")
    except UnsupportedFamily:
        return None
    if family.scores == "dot":
        return None
    return (f"a {family.name} teacher's attention scores add relative-position terms that cannot be rebuilt from "
            "cached layer inputs")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A tokenizer object's vocabulary, class and lower-casing, hashed."""
    return hash_json({"cls": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                       "lower": getattr(tokenizer, "do_lower_case", None)})


def cache_key(*, teacher: Mapping[str, str], tokenizer: str, max_length: int, layer_map: Sequence[int], domain: str,
              split: str, ids: Sequence[str], input_hash: str, prototype_hash: str | None, precision: str,
              attention: str, compute: str) -> dict:
    """What the fingerprint hashes (kept verbatim in the manifest). ``precision``: how values are stored;
    ``compute``: the precision the teacher pass ran in (``compute.precision`` resolved for the cache's device)."""
    return {"format": FORMAT_VERSION, "teacher_weights": teacher["weights"], "tokenizer": tokenizer,
            "max_length": int(max_length), "layer_map": [int(x) for x in layer_map], "domain": domain,
            "split": split, "ids": hash_json(sorted(ids)), "num_examples": len(ids), "inputs": input_hash,
            "prototype_scores": prototype_hash, "precision": precision, "attention": attention, "compute": compute}


def fingerprint(key: Mapping[str, Any]) -> str:
    return hash_json(dict(key))[:32]


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
    compute: str = "fp32"  # the precision of the teacher pass

    @property
    def num_examples(self) -> int:
        return self.table.num_rows

    def est_bytes(self) -> int:
        from metakd_ray.models.families import config_value

        enc = self.teacher.read_json("encoder", "config.json")
        return estimate_bytes(pc.list_value_length(self.table["input_ids"]).to_numpy(),
                              len(self.layers) + 2 * len(self.qk_layers), int(config_value(enc, "hidden_size")),
                              self.precision)

    def signature(self) -> tuple:
        """Jobs with the same signature write rows of the same schema, so one Ray Data job can build them all."""
        heads = self.teacher.read_json("heads.json")
        return (heads.get("cls"), self.has_prototype_scores, "token_type_ids" in self.table.column_names,
                self.layers, self.qk_layers, self.precision, self.compression, self.compute)


def cache_job(cfg: Any, storage: Storage | None, teacher: str | os.PathLike, domain: str, split_dataset: Any,
              layer_map: Sequence[int], prototype_scores: Mapping[str, float] | None = None, *,
              split: str = "train", tokenizer: Any = None, max_length: int | None = None,
              precision: str = "float16", attention: str = "inputs", compression: str = "zstd") -> CacheJob:
    """The :class:`CacheJob` of ``teacher`` on ``split_dataset`` (arguments as :func:`ensure_cache`)."""
    storage = storage or Storage(cfg.storage.root)
    if precision not in PRECISIONS or attention not in ATTENTION_MODES:
        raise ValueError(f"precision={precision!r} (one of {PRECISIONS}), attention={attention!r} "
                         f"(one of {ATTENTION_MODES})")
    compute = stage_precision(cfg, "cache")
    if compute == "auto":
        raise ValueError("compute.precision=auto for a cache pass on GPUs cannot be resolved here; run it on the "
                         "cluster (the sweep asks a GPU) or set compute.precision")
    g = tuple(int(x) for x in layer_map)
    loc = resolve_teacher(storage, teacher)
    if why := live_only(loc.read_json("encoder", "config.json").get("model_type")):
        raise CacheError(f"no cache for the teacher at {loc.describe()}: {why}; run it live")
    tfp = teacher_fingerprint(loc)
    table = input_table(split_dataset, prototype_scores)
    ids = table["id"].to_pylist()
    proto_hash = None if prototype_scores is None else hash_json(sorted(
        (i, round(float(prototype_scores[i]), 7)) for i in ids))
    # the tokenizer saved with the teacher when there is one (so passing ``tokenizer`` or not gives the same key)
    tok_fp = tfp["tokenizer"] or (tokenizer_fingerprint(tokenizer) if tokenizer is not None else "")
    key = cache_key(teacher=tfp, tokenizer=tok_fp, max_length=max_length or cfg.data.max_length, layer_map=g,
                    domain=domain, split=split, ids=ids, input_hash=_input_hash(table), prototype_hash=proto_hash,
                    precision=precision, attention=attention, compute=compute)
    return CacheJob(storage, fingerprint(key), key, loc, table, stored_layers(g, attention),
                    tuple(g[1:]) if attention == "qk" else (), precision, attention, compression,
                    prototype_scores is not None, compute)

def estimate_bytes(lengths: Sequence[int] | np.ndarray, matrices: int, hidden: int, precision: str = "float16") -> int:
    """Upper estimate of a cache's size on disk before it is built: ``matrices`` stored (t, hidden) matrices per
    example (``len(stored_layers) + 2 * len(qk_layers)``) at each example's real length, plus 1 KB per example for the
    small fields (logits, h_d, id, t_i, n_tokens). Parquet's zstd only makes the files smaller (0.93x measured)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return int(sum(matrices * matrix_bytes(int(t), hidden, precision) for t in lengths) + 1024 * len(lengths))



"""The on-disk format of a teacher-output cache (``metakd_ray.cache``): which fields, which layers, how encoded,
and what a design costs in bytes per example.

One Parquet row per example; every tensor is a ``large_binary`` cell of raw little-endian bytes (no Arrow extension
types, so any Parquet reader can decode it with the manifest's ``fields``):

==================  ===============  ==========================================================================
column              encoding          content
==================  ===============  ==========================================================================
``id``              string            the example id
``n_tokens``        int32             t, the example's real (unpadded) token count
``logits``          float32 (c,)      teacher logits z^T (8 B for 2 classes: float16 would save 4 B, not worth
                                      the soft-CE error)
``domain_hidden``   float16 (dt,)     h_d^T(x), meta teacher only (768 B for dt = 384)
``prototype_score`` float32 scalar    t_i, only when the caller gave prototype scores
``hidden_<L>``      float16 (t, dt)   teacher ``hidden_states[L]`` on the real tokens only, for each L in
                    or int8 (t, dt)   :func:`stored_layers`; int8 = per-token absmax scale (t float32) then
                                      the int8 values, in one cell
``query_<L>``,      as ``hidden_``    (``attention="qk"`` only) the query/key projections of teacher layer L
``key_<L>``
==================  ===============  ==========================================================================

Not stored, rebuilt by the reader (``metakd_ray.cache.reader``):

- layer 0 (the embeddings' output): recomputed exactly from the student batch's ``input_ids`` with the teacher's
  embedding module (a lookup and a LayerNorm);
- attention scores: ``attention="inputs"`` (default) keeps the *input* of each mapped layer g(m), i.e.
  ``hidden_states[g(m) - 1]`` (t * dt numbers), and the reader applies the teacher's query/key projections and
  Q K^T / sqrt(d_head); ``attention="qk"`` keeps Q and K (2 * t * dt numbers, no projection in the reader).
  Storing the scores themselves would cost h * t * t numbers per layer: more than Q and K as soon as
  t > 2 * dt / h (64 tokens for MiniLM).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

FORMAT_VERSION = 1
Precision = Literal["float16", "int8"]
AttentionMode = Literal["inputs", "qk"]
PRECISIONS = ("float16", "int8")
ATTENTION_MODES = ("inputs", "qk")


def stored_layers(layer_map: Sequence[int], attention: AttentionMode = "inputs") -> tuple[int, ...]:
    """Teacher hidden-state indices the cache stores for layer map ``g`` (g[0] = 0, the embeddings, is rebuilt):
    the mapped layers g(m), m >= 1, and with ``attention="inputs"`` also each mapped layer's input g(m) - 1."""
    g = tuple(int(x) for x in layer_map)
    if not g or g[0] != 0 or any(b <= a for a, b in zip(g, g[1:])):
        raise ValueError(f"layer map {list(g)}: expected 0 first, then strictly increasing teacher layers")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTION_MODES}")
    want = set(g[1:])
    if attention == "inputs":
        want |= {x - 1 for x in g[1:]}
    return tuple(sorted(want - {0}))


# ----------------------------------------------------------------------------------------------------------
# Encoding one (t, d) tensor into a cell and back
# ----------------------------------------------------------------------------------------------------------


def encode_matrix(x: np.ndarray, precision: Precision) -> bytes:
    """(t, d) float32 -> the bytes of one cell."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if precision == "float16":
        return x.astype("<f2").tobytes()
    if precision == "int8":
        scale = np.abs(x).max(axis=-1) / 127.0  # (t,)
        safe = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
        return scale.astype("<f4").tobytes() + q.tobytes()
    raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")


def decode_matrix(cell: bytes | memoryview, t: int, d: int, precision: Precision) -> np.ndarray:
    """One cell -> (t, d) float16 (the reader keeps float16 in memory whatever the disk precision)."""
    if precision == "float16":
        out = np.frombuffer(cell, dtype="<f2")
        if out.size != t * d:
            raise ValueError(f"cell holds {out.size} float16 values, expected {t} x {d}")
        return out.reshape(t, d)
    if precision == "int8":
        if len(cell) != 4 * t + t * d:
            raise ValueError(f"int8 cell has {len(cell)} bytes, expected {4 * t + t * d}")
        scale = np.frombuffer(cell, dtype="<f4", count=t)
        q = np.frombuffer(cell, dtype=np.int8, offset=4 * t).reshape(t, d)
        return (q.astype(np.float32) * scale[:, None]).astype(np.float16)
    raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")


def matrix_bytes(t: int, d: int, precision: Precision) -> int:
    return 2 * t * d if precision == "float16" else 4 * t + t * d


# ----------------------------------------------------------------------------------------------------------
# Bytes per example of each design (the disk budget)
# ----------------------------------------------------------------------------------------------------------


def design_bytes(lengths: Sequence[int], layer_map: Sequence[int], hidden: int, heads: int, num_labels: int = 2,
                 domain_hidden: bool = True, max_length: int = 128, id_bytes: int = 24) -> dict[str, dict]:
    """Mean bytes per example of each storage design, per field, for the real token lengths ``lengths``
    (truncated to ``max_length``). Raw payload; Parquet adds a few per cent of page/offset overhead (and its
    compression takes a little off float16: see benchmarks/RESULTS.md for the measured figure)."""
    t = np.minimum(np.asarray(lengths, dtype=np.float64), max_length)
    mt, mt2 = float(t.mean()), float((t ** 2).mean())
    g = tuple(layer_map)
    n_map, n_att = len(g), len(g) - 1
    fixed = {"id": id_bytes, "n_tokens": 4, "logits": 4 * num_labels,
             "domain_hidden": 2 * hidden if domain_hidden else 0, "prototype_score": 4}
    fixed16 = dict(fixed, logits=2 * num_labels)

    def design(fields: dict[str, float], note: str) -> dict:
        return {"fields": {k: round(v, 1) for k, v in fields.items()}, "total": round(sum(fields.values()), 1),
                "note": note}

    L = max_length
    out = {
        "padded_fp32_hidden_scores": design(
            {**{k: 2 * v for k, v in fixed16.items()}, "hidden": 4.0 * n_map * L * hidden,
             "attention_scores": 4.0 * n_att * heads * L * L},
            f"float32, padded to {L}: g's {n_map} hidden states + {n_att} score maps (what a naive dump writes)"),
        "fp16_hidden_scores": design(
            {**fixed, "hidden": 2.0 * n_map * mt * hidden, "attention_scores": 2.0 * n_att * heads * mt2},
            "float16, unpadded: hidden states of g (incl. layer 0) + pre-softmax scores on real pairs"),
        "fp16_hidden_qk": design(
            {**fixed, "hidden": 2.0 * n_map * mt * hidden, "query_key": 2.0 * 2 * n_att * mt * hidden},
            "float16, unpadded: hidden states of g (incl. layer 0) + Q and K of the mapped layers"),
        "fp16_hidden_qk_emb_rebuilt": design(
            {**fixed, "hidden": 2.0 * (n_map - 1) * mt * hidden, "query_key": 2.0 * 2 * n_att * mt * hidden},
            "as above, layer 0 rebuilt from the teacher's embedding module (attention='qk')"),
    }
    for prec in PRECISIONS:
        n_layers = len(stored_layers(g, "inputs"))
        per_tok = matrix_bytes(1, hidden, prec)
        out[f"{prec}_layer_inputs"] = design(
            {**fixed, "hidden": float(n_layers * per_tok * mt)},
            f"{prec} unpadded: hidden states {list(stored_layers(g, 'inputs'))} (mapped layers and their inputs); "
            "layer 0 rebuilt; scores rebuilt with the teacher's query/key projections (attention='inputs')"
            + (" [default]" if prec == "float16" else "; int8 = per-token absmax scale"))
    for v in out.values():
        v["mean_tokens"] = round(mt, 2)
    return out

"""Paired bootstrap of the test-accuracy difference between two methods, from the trials' test-set predictions.

Each trial writes its predictions to ``<sweep dir>/trials/<trial_key>.predictions.parquet`` (columns ``id`` string,
``label`` int64, ``pred`` int64, ``probs`` list<float32>). Two cells are *paired* when they differ only in method:
same target domain, rate, seed and gamma2 (a key that one of the two methods does not have — gamma2 is an axis of
``meta_kd`` only — is left out of the match, so a baseline pairs with each gamma2 value of Meta-KD). Within a pair,
examples are matched by ``id``; per example, d = [a correct] - [b correct].

The bootstrap is stratified by paired cell: each replicate resamples every cell's examples with replacement, as many
as it has, then pools them, so every replicate keeps each cell's weight (seeds and domains are fixed design, only the
test examples are a sample). The accuracy difference of a replicate is sum(d) / examples over the pooled sample; the
95 % interval is the 2.5th and 97.5th percentiles of ``n`` replicates. Vectorised: one (n x m) index draw per cell
of m examples (in row blocks for large cells), never a Python loop over replicates or examples.

Only numpy, pandas and pyarrow are imported (never ray or torch).
"""

from __future__ import annotations

import io
import math
import sys
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from metakd_ray.results.load import ResultsError, open_sweep
from metakd_ray.results.tables import METHOD_ORDER
from metakd_ray.storage import Storage
from metakd_ray.sweep.records import TRIALS

PREDICTIONS_SUFFIX = ".predictions.parquet"  # as sweep.students writes it (not imported: it pulls in torch)
PAIR_KEYS = ("domain", "rate", "seed", "gamma2")
OURS = "meta/meta_kd"
# Elements of one block of drawn indices (replicates x examples): bounds memory at ~32 MB of int64 per block.
_BLOCK = 4_000_000


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------------------


def has_predictions(st: Storage) -> bool:
    """Whether any trial of the sweep at ``st`` wrote its predictions (older sweeps did not)."""
    return any(name.endswith(PREDICTIONS_SUFFIX) for name in st.listdir(TRIALS))


def read_predictions(st: Storage, trial_key: str) -> pd.DataFrame | None:
    """``id``, ``label``, ``pred`` of trial ``trial_key``'s predictions; None when it wrote none. ResultsError (one
    line) when the file is damaged: not Parquet, a column missing, an id twice."""
    parts = (TRIALS, f"{trial_key}{PREDICTIONS_SUFFIX}")
    if not trial_key or not st.is_file(*parts):
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        df = pq.read_table(io.BytesIO(st.read_bytes(*parts)), columns=["id", "label", "pred"]).to_pandas()
        df = pd.DataFrame({"id": df["id"].astype(str), "label": df["label"].astype(np.int64),
                           "pred": df["pred"].astype(np.int64)})
    # not Parquet or cut short (ArrowInvalid), a column missing, nulls in label/pred (cannot be int64): all damage
    except (pa.ArrowException, OSError, KeyError, ValueError, TypeError) as e:
        raise ResultsError(f"{st.uri(*parts)} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                           "remove it: the bootstrap leaves that trial's cell out") from None
    if df["id"].duplicated().any():
        raise ResultsError(f"{st.uri(*parts)} is damaged (id {df['id'][df['id'].duplicated()].iloc[0]!r} occurs "
                           "twice); remove it: the bootstrap leaves that trial's cell out")
    return df


class Predictions:
    """Reads each trial's predictions once; a damaged file is one warning line and counts as absent."""

    def __init__(self, st: Storage, warn: Callable[[str], None] = _warn):
        self.st, self.warn, self._seen = st, warn, {}

    def __call__(self, trial_key: str) -> pd.DataFrame | None:
        if trial_key not in self._seen:
            try:
                self._seen[trial_key] = read_predictions(self.st, trial_key)
            except ResultsError as e:
                self.warn(str(e))
                self._seen[trial_key] = None
        return self._seen[trial_key]


# ----------------------------------------------------------------------------------------------------------
# The bootstrap
# ----------------------------------------------------------------------------------------------------------


def stratified_bootstrap(diffs: Sequence[np.ndarray], *, n: int = 2000, seed: int = 0) -> np.ndarray:
    """(n,) pooled mean of d over stratified resamples: per cell (an array of d per example, in order), an (n x m)
    draw of indices in ``[0, m)`` with replacement from ``np.random.default_rng(seed)``, cells in order."""
    rng = np.random.default_rng(seed)
    total = sum(len(d) for d in diffs)
    sums = np.zeros(n)
    for d in diffs:
        d = np.asarray(d, dtype=np.int64)
        m = len(d)
        if m == 0:
            continue
        rows = max(1, _BLOCK // m)
        for start in range(0, n, rows):  # blocks of replicates: memory stays bounded for large cells
            idx = rng.integers(0, m, size=(min(rows, n - start), m))
            sums[start:start + len(idx)] += d[idx].sum(axis=1)
    return sums / total if total else np.full(n, math.nan)


def summarise(diffs: Sequence[np.ndarray], *, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """diff (observed a - b accuracy on the pooled paired examples), boot_mean, low and high (95 % percentile
    interval), n_cells and n_examples of per-cell arrays of d."""
    diffs = [np.asarray(d, dtype=np.int64) for d in diffs if len(d)]
    total = int(sum(len(d) for d in diffs))
    if not total:
        return {"diff": math.nan, "boot_mean": math.nan, "low": math.nan, "high": math.nan, "n_cells": 0,
                "n_examples": 0}
    boot = stratified_bootstrap(diffs, n=n, seed=seed)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(sum(int(d.sum()) for d in diffs) / total), "boot_mean": float(boot.mean()),
            "low": float(low), "high": float(high), "n_cells": len(diffs), "n_examples": total}


def pair_cells(cells_df: pd.DataFrame, method_a: str, method_b: str,
               by: Sequence[str] = PAIR_KEYS) -> pd.DataFrame:
    """The finished cells of ``method_a`` and ``method_b`` that differ only in method: one row per pair, the match
    keys plus ``trial_key_a`` and ``trial_key_b`` (the selected trials). A key in ``by`` that either method has on
    no cell (NaN everywhere: gamma2 outside meta_kd) is not matched on."""
    c = cells_df[(cells_df["status"] == "ok")] if "status" in cells_df else cells_df
    if "trial_key" not in c:
        return pd.DataFrame(columns=[*by, "trial_key_a", "trial_key_b"])
    a, b = c[c["method"] == method_a], c[c["method"] == method_b]
    keys = [k for k in by if k in c and a[k].notna().any() and b[k].notna().any()]
    if not keys:  # nothing says which cells correspond
        return pd.DataFrame(columns=[*by, "trial_key_a", "trial_key_b"])
    cols = ["trial_key", *keys]
    both = a[cols].merge(b[cols], on=keys, how="inner", suffixes=("_a", "_b"))
    both = both[(both["trial_key_a"].fillna("") != "") & (both["trial_key_b"].fillna("") != "")]
    return both.reset_index(drop=True)


def paired_diffs(pairs: pd.DataFrame, predictions: Callable[[str], pd.DataFrame | None]) -> list[np.ndarray]:
    """Per pair with predictions on both sides, d per example matched by id (ids on one side only are left out).
    ValueError when the two sides give one id different labels: they were not scored on the same test set."""
    out = []
    for _, p in pairs.iterrows():
        pa, pb = predictions(p["trial_key_a"]), predictions(p["trial_key_b"])
        if pa is None or pb is None:
            continue
        m = pa.merge(pb, on="id", suffixes=("_a", "_b"))
        if (m["label_a"] != m["label_b"]).any():
            bad = m[m["label_a"] != m["label_b"]]["id"].iloc[0]
            raise ValueError(f"trials {p['trial_key_a']} and {p['trial_key_b']} give example {bad!r} different "
                             "labels: their predictions are not of the same test set")
        correct_a = (m["pred_a"] == m["label_a"]).to_numpy(np.int64)
        correct_b = (m["pred_b"] == m["label_b"]).to_numpy(np.int64)
        out.append(correct_a - correct_b)
    return out


def paired_bootstrap(cells_df: pd.DataFrame, method_a: str, method_b: str, *, n: int = 2000, seed: int = 0,
                     by: Sequence[str] = PAIR_KEYS, storage: Any = None,
                     predictions: Callable[[str], pd.DataFrame | None] | None = None) -> dict[str, float]:
    """Accuracy of ``method_a`` minus ``method_b`` on the paired cells of ``cells_df`` (``results.cells``, with the
    selected trial's ``trial_key``): diff (observed, pooled over the paired examples), boot_mean, low and high
    (95 % percentile interval of ``n`` stratified replicates drawn from ``seed``), n_cells (pairs with predictions
    on both sides) and n_examples. Predictions are read from ``storage`` (default: the sweep in
    ``cells_df.attrs["sweep_dir"]``), or from ``predictions(trial_key)`` when given. No pair: NaN, 0, 0."""
    if predictions is None:
        st = open_sweep(storage if storage is not None else cells_df.attrs["sweep_dir"])
        predictions = Predictions(st)
    return summarise(paired_diffs(pair_cells(cells_df, method_a, method_b, by), predictions), n=n, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Meta-KD vs each baseline, for the report
# ----------------------------------------------------------------------------------------------------------


def versus_baselines(cells_df: pd.DataFrame, *, ours: str = OURS, baselines: Sequence[str] | None = None,
                     split: str | None = None, n: int = 2000, seed: int = 0, storage: Any = None,
                     predictions: Callable[[str], pd.DataFrame | None] | None = None) -> pd.DataFrame:
    """One row per baseline method (default: every other method with finished cells), ``ours`` minus it:
    baseline, [gamma2 — when ``ours`` has a gamma2 axis, a row per value], [``split`` — e.g. "rate", a row per
    value], diff, low, high, boot_mean, n_cells, n_examples. Rows without a single paired cell are left out."""
    if predictions is None:
        predictions = Predictions(open_sweep(storage if storage is not None else cells_df.attrs["sweep_dir"]))
    c = cells_df[cells_df["status"] == "ok"] if "status" in cells_df else cells_df
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    others = baselines if baselines is not None else sorted(
        (m for m in dict.fromkeys(c["method"]) if m != ours), key=lambda m: (order.get(m, len(order)), m))
    mine = c[c["method"] == ours]
    gammas = sorted(mine["gamma2"].dropna().unique()) if "gamma2" in mine else []
    splits = sorted(c[split].dropna().unique()) if split else [None]
    rows = []
    for base in others:
        for g in gammas or [None]:
            for value in splits:
                part = c[(c["method"] != ours) | (c["gamma2"] == g)] if g is not None else c
                part = part[part[split] == value] if split else part
                r = paired_bootstrap(part, ours, base, n=n, seed=seed, predictions=predictions)
                if r["n_cells"]:
                    rows.append({"baseline": base, **({"gamma2": g} if gammas else {}),
                                 **({split: value} if split else {}), **r})
    cols = ["baseline", *(["gamma2"] if gammas else []), *([split] if split else []), "diff", "low", "high",
            "boot_mean", "n_cells", "n_examples"]
    return pd.DataFrame(rows, columns=cols)


def bootstrap_markdown(table: pd.DataFrame, *, ours: str = OURS, n: int = 2000, seed: int = 0,
                       by_rate: pd.DataFrame | None = None) -> str:
    """``versus_baselines`` as markdown: differences in percentage points with their 95 % intervals."""

    def rows(t: pd.DataFrame, extra: Sequence[str]) -> list[str]:
        head = ["baseline", *extra, f"{ours} − baseline (pp)", "95 % interval", "cells", "examples"]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in t.iterrows():
            vals = [str(r["baseline"]), *(f"{r[e]:g}" for e in extra), f"{100 * r['diff']:+.2f}",
                    f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]", str(int(r["n_cells"])),
                    str(int(r["n_examples"]))]
            out.append("| " + " | ".join(vals) + " |")
        return out

    extra = ["gamma2"] if "gamma2" in table else []
    lines = [f"## {ours} vs each baseline: paired bootstrap", "",
             *rows(table, extra), "",
             "Test-accuracy difference pooled over the paired cells (same target domain, rate, seed and gamma2; the "
             "examples matched by id) and their 95 % percentile interval from "
             f"{n} stratified bootstrap replicates (examples resampled within each paired cell; seed {seed}). An "
             "interval that excludes 0 is a difference the test sets resolve; it says nothing of seed-to-seed "
             "variation beyond the seeds present."]
    if by_rate is not None and len(by_rate) and by_rate["rate"].nunique() > 1:
        lines += ["", "### By sample rate", "", *rows(by_rate, [*extra, "rate"])]
    return "\n".join(lines) + "\n"


def bootstrap_report(st: Storage, cells_df: pd.DataFrame, *, n: int = 2000, seed: int = 0,
                     warn: Callable[[str], None] = _warn) -> str | None:
    """The markdown of ``bootstrap.md`` for the sweep at ``st``; None when no trial wrote predictions (an older
    sweep) or no pair has predictions on both sides. A damaged predictions file, or a pair scored on different
    test sets, is one warning line."""
    if not has_predictions(st):
        return None
    predictions = Predictions(st, warn)
    try:
        table = versus_baselines(cells_df, n=n, seed=seed, predictions=predictions)
        by_rate = versus_baselines(cells_df, split="rate", n=n, seed=seed, predictions=predictions)
    except ValueError as e:
        warn(f"{st.uri()}: no bootstrap ({e})")
        return None
    if table.empty:
        return None
    return bootstrap_markdown(table, n=n, seed=seed, by_rate=by_rate)

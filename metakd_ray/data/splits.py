"""Splits: reader rows -> ``Splits`` (train/dev/test ``datasets.Dataset``) and seeded, nested subsamples.

Every split has the columns ``id`` (str, stable, unique), ``text``, ``text_pair`` ("" for single-text tasks),
``label`` (int), ``domain`` (str) and ``domain_id`` (int, index in ``cfg.data.domains``). Rows are grouped by
domain in ``cfg.data.domains`` order, and in reader order within a domain.

* Amazon: the reference code's split (EasyNLP ``generate_senti_data.py``): pool all 8000 reviews (books, dvd,
  electronics, kitchen; positive then negative), shuffle with ``RandomState(seed)`` (its
  ``df.sample(frac=1, random_state=seed)``), StratifiedKFold(10) on label -> first fold = test (800); the same on
  the rest -> first fold = dev (720); train = 6480. This reproduces the paper's per-domain counts exactly.
* MNLI: each genre's train -> stratified 90/10 train/dev; test = the genre's dev-matched pairs.
* Table: the configured files; a missing dev is a stratified ``dev_fraction`` of each domain's train.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from metakd_ray.config import AMAZON_DOMAINS, DataConfig
from metakd_ray.data.readers import (
    NLI_LABELS,
    SENTIMENT_LABELS,
    DataError,
    Row,
    data_root,
    label_vocabulary,
    read_amazon,
    read_mnli_hub,
    read_mnli_local,
    read_table,
)

SPLITS: tuple[str, ...] = ("train", "dev", "test")
FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "text": datasets.Value("string"),
    "text_pair": datasets.Value("string"),
    "label": datasets.Value("int64"),
    "domain": datasets.Value("string"),
    "domain_id": datasets.Value("int64"),
})
# The paper's per-domain (train, dev, test) sizes for Amazon (method doc §5).
PAPER_AMAZON_COUNTS: dict[str, tuple[int, int, int]] = {
    "books": (1631, 170, 199),
    "dvd": (1621, 194, 185),
    "electronics": (1615, 172, 213),
    "kitchen": (1613, 184, 203),
}


@dataclass(frozen=True)
class Splits:
    """train/dev/test of the configured domains, with the label and domain vocabularies."""

    data: datasets.DatasetDict
    label_names: tuple[str, ...]
    domains: tuple[str, ...]

    @property
    def domain_ids(self) -> dict[str, int]:
        """Domain name -> ``domain_id`` (its index in ``cfg.data.domains``)."""
        return {d: i for i, d in enumerate(self.domains)}

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __getitem__(self, split: str) -> datasets.Dataset:
        return self.data[split]


def column(ds: datasets.Dataset, name: str) -> list[Any]:
    """One column as a Python list, fast (``ds[name]`` is a lazy column that reads row by row when iterated)."""
    return list(ds.with_format(None)[name][:])


# ----------------------------------------------------------------------------------------------------------
# Split procedures (pure functions of labels and a seed; they return row indices)
# ----------------------------------------------------------------------------------------------------------


def reference_split(labels: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """The Amazon reference split of pooled rows: ``{"train", "dev", "test"}`` -> sorted row indices."""
    n = len(labels)
    # pandas' df.sample(frac=1, random_state=seed) is RandomState(seed).choice(n, n, replace=False), which is
    # RandomState(seed).permutation(n); the folds below see rows in that order, as in the reference code.
    perm = np.random.RandomState(seed).permutation(n)
    y = np.asarray(labels)[perm]
    rest, test = next(StratifiedKFold(n_splits=10, shuffle=True, random_state=seed).split(np.zeros(n), y))
    train, dev = next(StratifiedKFold(n_splits=10, shuffle=True, random_state=seed).split(np.zeros(len(rest)), y[rest]))
    return {"train": np.sort(perm[rest[train]]), "dev": np.sort(perm[rest[dev]]), "test": np.sort(perm[test])}


def holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted row indices, ``fraction`` held out, stratified on label when every class has at
    least two rows (otherwise a plain seeded split)."""
    idx = np.arange(len(labels))
    if len(idx) < 2:  # nothing to hold out; the caller reports the empty split
        return idx, idx[:0]
    try:
        kept, held = train_test_split(idx, test_size=fraction, stratify=list(labels), random_state=seed)
    except ValueError:  # a class with one row, or fewer held-out rows than classes
        kept, held = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(kept), np.sort(held)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _dataset(rows: Iterable[Row], domains: Sequence[str]) -> datasets.Dataset:
    """Rows of ``domains`` only, grouped by domain in that order (stable within a domain)."""
    order = {d: i for i, d in enumerate(domains)}
    kept = sorted((r for r in rows if r["domain"] in order), key=lambda r: order[r["domain"]])
    columns: dict[str, list[Any]] = {name: [r[name] for r in kept] for name in FEATURES if name != "domain_id"}
    columns["domain_id"] = [order[d] for d in columns["domain"]]
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def _check_domains(parts: dict[str, list[Row]], domains: Sequence[str], what: str) -> None:
    for split, rows in parts.items():
        present = {r["domain"] for r in rows}
        missing = [d for d in domains if d not in present]
        if missing:
            raise DataError(
                f"data.domains: {', '.join(missing)} has no rows in the {split} split of {what}; "
                f"domains found: {', '.join(sorted(present)) or 'none'}"
            )


def _amazon(cfg: DataConfig) -> tuple[dict[str, list[Row]], tuple[str, ...]]:
    # Always pool all four domains: the reference split is defined on the 8000 pooled reviews, so a subset of
    # domains gets the same per-domain splits as the full set.
    rows = read_amazon(data_root(cfg), AMAZON_DOMAINS)
    parts = reference_split([r["label"] for r in rows], cfg.split_seed)
    return {split: [rows[i] for i in idx] for split, idx in parts.items()}, SENTIMENT_LABELS


def _mnli(cfg: DataConfig) -> tuple[dict[str, list[Row]], tuple[str, ...]]:
    if cfg.mnli_source == "hub":
        train_rows, test_rows = read_mnli_hub(cfg.domains)
    else:
        train_rows, test_rows = read_mnli_local(data_root(cfg), cfg.domains)
    _check_domains({"train": train_rows, "test": test_rows}, cfg.domains, f"MNLI ({cfg.mnli_source})")
    train, dev = [], []
    for genre in cfg.domains:
        rows = [r for r in train_rows if r["domain"] == genre]
        kept, held = holdout([r["label"] for r in rows], 0.1, cfg.split_seed)
        train += [rows[i] for i in kept]
        dev += [rows[i] for i in held]
    return {"train": train, "dev": dev, "test": test_rows}, NLI_LABELS


def _table(cfg: DataConfig) -> tuple[dict[str, list[Row]], tuple[str, ...]]:
    raw = read_table(data_root(cfg), cfg.table)
    # One vocabulary over every split and domain, so a label has the same id everywhere.
    names, to_id = label_vocabulary(r["label"] for rows in raw.values() for r in rows)
    parts = {split: [{**r, "label": to_id[r["label"]]} for r in rows] for split, rows in raw.items()}
    if "dev" not in parts:
        train, dev = [], []
        for domain in cfg.domains:
            rows = [r for r in parts["train"] if r["domain"] == domain]
            if not rows:
                continue  # reported by _check_domains below
            kept, held = holdout([r["label"] for r in rows], cfg.table.dev_fraction, cfg.split_seed)
            train += [rows[i] for i in kept]
            dev += [rows[i] for i in held]
        parts = {"train": train, "dev": dev, "test": parts["test"]}
    _check_domains(parts, cfg.domains, f"the table ({cfg.table.train})")
    return parts, names


def load_splits(cfg: DataConfig) -> Splits:
    """Read the configured corpus and return its train/dev/test for ``cfg.domains`` (see the module docstring).
    Raises :class:`DataError` (one line: the path looked at and how to get the data) when data is missing."""
    reader = {"amazon": _amazon, "mnli": _mnli, "table": _table}[cfg.dataset]
    parts, label_names = reader(cfg)
    data = datasets.DatasetDict({split: _dataset(parts[split], cfg.domains) for split in SPLITS})
    return Splits(data=data, label_names=tuple(label_names), domains=tuple(cfg.domains))


# ----------------------------------------------------------------------------------------------------------
# Data scarcity
# ----------------------------------------------------------------------------------------------------------


def _rank_key(seed: int, example_id: str) -> bytes:
    # A content hash, not hash(): identical in every process and on every machine (PYTHONHASHSEED-proof).
    return hashlib.blake2b(f"{seed}:{example_id}".encode(), digest_size=16).digest()


def check_rate(rate: Any) -> float:
    """``rate`` as a float in (0, 1], else ValueError naming ``rate``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 < rate <= 1.0):
        raise ValueError(f"rate must be a number in (0, 1]; got {rate!r}")
    return float(rate)


def subsample_indices(domains: Sequence[str], labels: Sequence[int], ids: Sequence[str], rate: float, seed: int,
                      only_domains: Iterable[str] | None = None) -> list[int]:
    """Sorted row indices kept by :func:`subsample` (same arguments, as columns)."""
    rate = check_rate(rate)
    only = None if only_domains is None else set(only_domains)
    keep: list[int] = []
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, (d, y) in enumerate(zip(domains, labels)):
        if only is not None and d not in only:
            keep.append(i)
        else:
            groups[(d, y)].append(i)
    for members in groups.values():
        n = len(members)
        # round-half-up of rate*n, at least 1: monotone in rate, so the subsets are nested.
        k = min(n, max(1, math.floor(rate * n + 0.5)))
        keep += sorted(members, key=lambda i: (_rank_key(seed, ids[i]), i))[:k]
    return sorted(keep)


def subsample(split: datasets.Dataset, rate: float, seed: int,
              only_domains: Iterable[str] | None = None) -> datasets.Dataset:
    """A seeded fraction ``rate`` in (0, 1] of ``split`` (method doc §4), keeping row order.

    Within each (domain, label) group the rows are ranked by ``blake2b(f"{seed}:{id}")`` and the first
    ``max(1, round(rate * n))`` kept, so: stratified by label within each domain, at least one row per class
    present in a domain, nested in ``rate`` for a fixed seed, and identical across processes and machines.
    ``only_domains``: subsample those domains only and keep the others whole (``data.scarcity: target``).
    """
    rate = check_rate(rate)
    if rate == 1.0:
        return split
    keep = subsample_indices(column(split, "domain"), column(split, "label"), column(split, "id"), rate, seed,
                             only_domains)
    return split.select(keep)


# ----------------------------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------------------------


def label_counts(splits: Splits, rate: float | None = None, seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """``{domain: {split: {"n": int, "labels": {label_name: int}}}}``; with ``rate``, train is
    ``subsample(train, rate, seed)`` (dev and test unchanged)."""
    out: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in splits.domains}
    for split in SPLITS:
        ds = splits[split]
        if split == "train" and rate is not None:
            ds = subsample(ds, rate, seed)
        counts = Counter(zip(column(ds, "domain"), column(ds, "label")))
        for d in splits.domains:
            labels = {name: counts[(d, i)] for i, name in enumerate(splits.label_names)}
            out[d][split] = {"n": sum(labels.values()), "labels": labels}
    return out


def split_sizes(splits: Splits) -> dict[str, tuple[int, int, int]]:
    """Per domain (train, dev, test) sizes."""
    counts = label_counts(splits)
    return {d: tuple(counts[d][s]["n"] for s in SPLITS) for d in splits.domains}  # type: ignore[misc]


def paper_count_table(splits: Splits) -> tuple[str, int]:
    """(Markdown table of our per-domain train/dev/test sizes beside the paper's, total L1 difference)."""
    ours = split_sizes(splits)
    lines = ["| domain | train | dev | test | paper train/dev/test | L1 |", "|---|---|---|---|---|---|"]
    total = 0
    for d, sizes in ours.items():
        paper = PAPER_AMAZON_COUNTS.get(d)
        l1 = sum(abs(a - b) for a, b in zip(sizes, paper)) if paper else 0
        total += l1
        ref = "/".join(map(str, paper)) if paper else "-"
        lines.append(f"| {d} | {sizes[0]} | {sizes[1]} | {sizes[2]} | {ref} | {l1} |")
    n = [sum(s[i] for s in ours.values()) for i in range(3)]
    lines.append(f"| total | {n[0]} | {n[1]} | {n[2]} | | {total} |")
    return "\n".join(lines), total

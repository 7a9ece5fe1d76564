"""Which rows a cell's stages train and evaluate on, shared by the single-process path (``local.py``) and the Ray
stages (``teacher_job.py``), so every path sees exactly the same examples.

* The *training pool* of (rate, seed[, target]): every domain's training data, subsampled at ``rate`` (all domains
  with ``data.scarcity: all``; only the target with ``scarcity: target``). Prototype scores are computed over it.
* A teacher of ``kind`` trains on the pool's rows of :func:`teacher_domains`; a student on its target's rows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import datasets
import torch
from torch.utils.data import DataLoader

from metakd_ray import config as C
from metakd_ray import data as D


def teacher_domains(kind: str, target: str | None, domains: tuple[str, ...], exclude_target: bool) -> tuple[str, ...]:
    """Domains a teacher of ``kind`` trains on: the target alone (single), else all (minus the target for the
    no-in-domain-data variant)."""
    if kind == "single":
        if target is None:
            raise ValueError("teacher kind 'single' needs a target domain")
        return (target,)
    return tuple(d for d in domains if not (exclude_target and d == target))


def filter_domains(ds: datasets.Dataset, keep: tuple[str, ...], domains: tuple[str, ...]) -> datasets.Dataset:
    """The rows of ``ds`` whose domain is in ``keep``."""
    wanted = {domains.index(d) for d in keep}
    return ds.filter(lambda ids: [i in wanted for i in ids], input_columns="domain_id", batched=True)


def loader(ds: datasets.Dataset, collate: Callable, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def training_pool(cfg: C.Config, splits: D.Splits, target: str | None, rate: float, seed: int) -> datasets.Dataset:
    """Every domain's training rows, subsampled at ``rate`` with ``seed`` per ``data.scarcity`` (``target`` is only
    needed, and required, for ``scarcity: target``)."""
    only = None
    if cfg.data.scarcity == "target":
        if target is None:
            raise ValueError("data.scarcity: target needs a target domain to subsample")
        only = (target,)
    return D.subsample(splits["train"], rate, seed, only_domains=only)


def with_prototype_scores(ds: datasets.Dataset,
                          scores: Sequence[float] | Mapping[str, float] | None) -> datasets.Dataset:
    """``ds`` plus a ``prototype_score`` column: ``scores`` in row order (a sequence), looked up by ``id`` (a
    mapping; every row must have one), or zeros (None: splits not used for training keep batches uniform)."""
    if scores is None:
        values = [0.0] * len(ds)
    elif isinstance(scores, Mapping):
        ids = D.column(ds, "id")
        missing = [i for i in ids if i not in scores]
        if missing:
            raise ValueError(f"{len(missing)} rows have no prototype score (e.g. id {missing[0]!r}); the scores were "
                             "computed for a different training pool")
        values = [float(scores[i]) for i in ids]
    else:
        values = [float(s) for s in scores]
    return ds.add_column("prototype_score", values)


def tokenize_splits(cfg: C.Config, tokenizer: Any, **parts: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """``tokenize`` each named dataset at ``data.max_length``."""
    return {name: D.tokenize(ds, tokenizer, cfg.data.max_length) for name, ds in parts.items()}

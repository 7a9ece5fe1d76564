"""Batch order: which rows go together, epoch by epoch (``compute.group_by_length``).

A training epoch's order is a function of (seed, epoch) alone — shuffled with a generator seeded by both, so a
stage resumed at an epoch boundary sees exactly the order it would have seen, at any worker count. With
``group_by_length`` the shuffled order is cut into windows of ``window`` batches and each window sorted by length,
longest first (``transformers.trainer_pt_utils.get_length_grouped_indices``, what HF's ``group_by_length`` uses):
batches hold rows of similar length, so little of each batch is padding.

Under data parallelism the global order is dealt out by stride, as ``DistributedSampler`` does (rank r takes rows
r, r + w, ...; padded by repeating the first rows so every rank gets as many): with a per-rank batch of
``global_batch / w`` the global batch k is the same rows for 1 or w workers.

Evaluation takes rows longest first (:func:`by_length`); results do not depend on row order.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def lengths_of(ds) -> list[int]:
    """Token counts of a tokenised dataset's rows (its ``input_ids``)."""
    import pyarrow.compute as pc

    if hasattr(ds, "flatten_indices"):  # datasets.Dataset, possibly filtered (an indices mapping)
        col = ds.flatten_indices().data.table["input_ids"] if ds._indices is not None else ds.data.table["input_ids"]
        return pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(int).tolist()
    return [len(x) for x in ds["input_ids"]]


def by_length(lengths: Sequence[int]) -> list[int]:
    """Row indices, longest first (ties in row order)."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()


class EpochSampler(Sampler[int]):
    """The rows of one rank for an epoch (see the module docstring). ``batch_size`` is the *global* batch (the
    size of the length windows' unit); call :meth:`set_epoch` before each epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, group_by_length: bool = True,
                 window: int = 50, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.group, self.window = int(batch_size), int(seed), group_by_length, window
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.num_samples = -(-len(self.lengths) // num_replicas)  # ceil

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self) -> list[int]:
        """Every row of this epoch in global order (before it is dealt out to ranks)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.group or len(self.lengths) <= self.batch_size:
            return torch.randperm(len(self.lengths), generator=g).tolist()
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return list(get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=self.window,
                                               generator=g))

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        total = self.num_samples * self.num_replicas
        if total > len(order):
            order += order[:total - len(order)]
        return iter(order[self.rank:total:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples

"""Tokenisation and dynamic padding: ``datasets.Dataset`` rows -> model inputs.

Tokenising happens once per split (``Dataset.map``, cached as Arrow); padding happens per batch in the collator,
so a batch is only as long as its longest example.
"""

from __future__ import annotations

from typing import Any

import datasets
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

KEEP_COLUMNS = ("id", "label", "domain_id")


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """``text`` (and ``text_pair`` when any row has one) -> ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` if the tokenizer makes them), truncated to ``max_length``, unpadded. Keeps ``id``,
    ``label`` and ``domain_id``; drops the other columns."""
    pair = any(ds.with_format(None)["text_pair"][:])

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        return tokenizer(*args, truncation=True, max_length=max_length)

    drop = [c for c in ds.column_names if c not in KEEP_COLUMNS]
    return ds.map(encode, batched=True, remove_columns=drop, desc="tokenize")


# Per-example column -> batch key (plural: a batch holds one per example). ``label`` -> ``labels`` is the parent's.
BATCH_KEYS = {"domain_id": "domain_ids", "prototype_score": "prototype_scores", "id": "ids"}


class PaddingCollator(DataCollatorWithPadding):
    """``DataCollatorWithPadding`` that passes string fields (``id``) through as lists instead of failing to
    make tensors of them, and names per-example columns in the plural (``domain_id`` -> ``domain_ids``,
    ``prototype_score`` -> ``prototype_scores``, ``id`` -> ``ids``). As in the parent, ``label`` comes out as
    ``labels``."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        text_keys = [k for k, v in features[0].items() if isinstance(v, str)]
        passthrough = {k: [f[k] for f in features] for k in text_keys}
        batch = super().__call__([{k: v for k, v in f.items() if k not in passthrough} for f in features])
        batch.update(passthrough)
        return {BATCH_KEYS.get(k, k): v for k, v in batch.items()}


def collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> PaddingCollator:
    """A dynamic-padding collator (a ``transformers.DataCollatorWithPadding``) for :func:`tokenize`'s output."""
    return PaddingCollator(tokenizer=tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")

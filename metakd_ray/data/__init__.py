"""The data layer: corpora -> train/dev/test ``datasets.Dataset`` -> seeded subsamples -> token batches.

    splits = load_splits(cfg.data)                    # Splits: .data (DatasetDict), .label_names, .domains
    train = subsample(splits["train"], rate=0.05, seed=0)
    encoded = tokenize(train, tokenizer, cfg.data.max_length)
    loader = DataLoader(encoded, batch_size=32, collate_fn=collator(tokenizer))

CLI: ``python -m metakd_ray.data fetch amazon`` and ``python -m metakd_ray.data describe CONFIG``.

Names are imported from their modules on first use, so ``import metakd_ray.data`` (and a CLI error) does not
pay for importing ``datasets``, ``sklearn`` or ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "metakd_ray.data.readers": ("NLI_LABELS", "SENTIMENT_LABELS", "DataError", "Review", "data_root", "parse_reviews",
                                "read_amazon", "read_review_file"),
    "metakd_ray.data.splits": ("PAPER_AMAZON_COUNTS", "SPLITS", "Splits", "check_rate", "column", "holdout",
                               "label_counts", "load_splits", "paper_count_table", "reference_split", "split_sizes",
                               "subsample"),
    "metakd_ray.data.fetch": ("DEFAULT_URL", "fetch_amazon", "verify_amazon"),
    "metakd_ray.data.tokens": ("PaddingCollator", "collator", "tokenize"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below does the import
    from metakd_ray.data.fetch import DEFAULT_URL, fetch_amazon, verify_amazon  # noqa: F401
    from metakd_ray.data.readers import (  # noqa: F401
        NLI_LABELS, SENTIMENT_LABELS, DataError, Review, data_root, parse_reviews, read_amazon, read_review_file)
    from metakd_ray.data.splits import (  # noqa: F401
        PAPER_AMAZON_COUNTS, SPLITS, Splits, check_rate, column, holdout, label_counts, load_splits,
        paper_count_table, reference_split, split_sizes, subsample)
    from metakd_ray.data.tokens import PaddingCollator, collator, tokenize  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

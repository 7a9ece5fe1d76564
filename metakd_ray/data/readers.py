"""Readers: raw corpus files -> plain rows ``{id, text, text_pair, label, domain}``.

Three corpora (method doc §5):

* Amazon reviews (Blitzer et al. 2007): pseudo-XML ``positive.review`` / ``negative.review`` files, one folder per
  domain, in either the shared layout (``amazon-multi-domain-sentiment/<domain>/``, files wrapped in
  ``<reviews>``) or the authors' archive layout (``sorted_data_acl/<domain>/``, kitchen as
  ``kitchen_&_housewares``). The files are not valid XML, so they are parsed with regexes, never an XML parser.
* MNLI genres: TSV/JSONL with ``sentence1, sentence2, label, genre`` (local) or ``nyu-mll/multi_nli`` (hub).
* A generic CSV / JSONL / Parquet table with configurable columns (``data.table``).

Nothing here splits data; see :mod:`metakd_ray.data.splits`.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from metakd_ray.config import DataConfig, TableConfig
from metakd_ray.data.files import DataError, _read_text, _require_columns, read_bytes, read_records  # noqa: F401

SENTIMENT_LABELS: tuple[str, ...] = ("negative", "positive")
NLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")  # the Hugging Face multi_nli order
# Folder names a domain may have on disk (the authors' archive calls kitchen "kitchen_&_housewares").
DOMAIN_DIRS: dict[str, tuple[str, ...]] = {"kitchen": ("kitchen", "kitchen_&_housewares")}
AMAZON_LAYOUTS: tuple[str, ...] = ("amazon-multi-domain-sentiment", "sorted_data_acl")
MNLI_DIR = "mnli-genre-sample"
FETCH_AMAZON = "python -m metakd_ray.data fetch amazon"
REVIEWS_PER_FILE = 1000  # every labeled file of the corpus (positive.review, negative.review of each domain)

Row = dict[str, Any]  # {"id": str, "text": str, "text_pair": str, "label": int, "domain": str}


def data_root(cfg: DataConfig) -> Path:
    """Where corpora live: ``cfg.root`` if set, else ``$METAKD_DATA``, else a per-user cache directory
    (``$XDG_CACHE_HOME/metakd_ray/data`` or ``~/.cache/metakd_ray/data``)."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    if os.environ.get("METAKD_DATA"):
        return Path(os.environ["METAKD_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "metakd_ray" / "data"


# ----------------------------------------------------------------------------------------------------------
# Amazon reviews
# ----------------------------------------------------------------------------------------------------------

# A review runs to "</review>"; an unclosed one to the next "<review>", "</reviews>" or the end of the file.
_REVIEW = re.compile(r"<review>(.*?)(?:</review>|(?=<review>)|</reviews>|\Z)", re.DOTALL)
_FIELDS = ("unique_id", "title", "review_text")
_TAGS = "|".join(("unique_id", "asin", "product_name", "product_type", "helpful", "rating", "title", "date",
                  "reviewer", "reviewer_location", "review_text"))
# A field's body runs to its closing tag; if that is missing, to the next known opening tag or the review's end
# (never to an arbitrary "<", which review text contains).
_CLOSED = {f: re.compile(rf"<{f}>(.*?)</{f}>", re.DOTALL) for f in _FIELDS}
_OPEN = {f: re.compile(rf"<{f}>(.*?)(?=<(?:{_TAGS})>|\Z)", re.DOTALL) for f in _FIELDS}


@dataclass(frozen=True)
class Review:
    """One parsed review; ``title`` and ``review_text`` are HTML-unescaped and stripped."""

    unique_id: str
    title: str
    review_text: str

    @property
    def text(self) -> str:
        """The model input: title + " " + review text (method doc §5); either alone if the other is empty."""
        return " ".join(part for part in (self.title, self.review_text) if part)


def parse_reviews(raw: str) -> list[Review]:
    """Every ``<review>…</review>`` block of a ``.review`` file, in file order (with or without a ``<reviews>``
    wrapper). Lenient: raw ``&`` and stray ``<`` are kept as text, entities are unescaped."""
    out = []
    for block in _REVIEW.findall(raw):
        values = {}
        for name in _FIELDS:
            m = _CLOSED[name].search(block) or _OPEN[name].search(block)
            values[name] = html.unescape(m.group(1)).strip() if m else ""
        out.append(Review(**values))
    return out


def _read_review_text(path: Path) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_review_file(path: Path) -> list[Review]:
    """Parse one ``.review`` file (UTF-8; Latin-1 if it is not, so no byte is ever dropped). No check of the
    count: see :func:`read_labeled_review_file` for a labeled file of the corpus."""
    return parse_reviews(_read_review_text(path))


def check_labeled_reviews(path: Path | str, raw: str, reviews: list[Review]) -> None:
    """The one check of a labeled ``.review`` file of the corpus, shared by loading and ``fetch``: exactly
    :data:`REVIEWS_PER_FILE` reviews, each with text, and as many ``<review>`` openings as ``</review>`` closings
    (an unclosed block, an empty file or a file cut short would otherwise change the rows, and with them the
    reference split of every domain, without a word). Raises :class:`DataError` naming the file, what was found
    and what is expected; the caller adds how to fix it."""
    opened, closed = raw.count("<review>"), raw.count("</review>")
    empty = sum(not r.text for r in reviews)
    if len(reviews) != REVIEWS_PER_FILE or empty or opened != closed:
        raise DataError(f"{path}: {len(reviews)} reviews ({empty} without text; {opened} <review> and {closed} "
                        f"</review> tags); expected {REVIEWS_PER_FILE} reviews with text, each <review> closed "
                        "by </review>")


def read_labeled_review_file(path: Path) -> list[Review]:
    """Parse and check (:func:`check_labeled_reviews`) one labeled ``.review`` file of the corpus: read and parsed
    once."""
    raw = _read_review_text(path)
    reviews = parse_reviews(raw)
    check_labeled_reviews(path, raw, reviews)
    return reviews


def _domain_dir(base: Path, domain: str) -> Path | None:
    for name in DOMAIN_DIRS.get(domain, (domain,)):
        d = base / name
        if all((d / f"{label}.review").is_file() for label in SENTIMENT_LABELS):
            return d
    return None


def find_amazon_dir(root: Path, domains: Iterable[str]) -> Path:
    """The folder holding one sub-folder per domain: ``root/amazon-multi-domain-sentiment``,
    ``root/sorted_data_acl`` or ``root`` itself. Raises :class:`DataError` naming the paths and the fetch command."""
    domains = tuple(domains)
    candidates = [root / name for name in AMAZON_LAYOUTS] + [root]
    for base in candidates:
        if all(_domain_dir(base, d) is not None for d in domains):
            return base
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"Amazon reviews not found: no {{positive,negative}}.review for domains {', '.join(domains)} "
        f"under any of {looked}; get them with: {FETCH_AMAZON} --root {root}"
    )


def damaged_amazon_fix(root: Path, base: Path, folder: Path) -> str:
    """How to replace a damaged corpus: remove the folder holding it (the domain folder when the domains sit
    directly in the data root) and fetch it again."""
    gone = folder if Path(base) == Path(root) else base
    return f"the corpus is damaged: remove {gone} and get it again with: {FETCH_AMAZON} --root {root}"


def read_amazon(root: Path, domains: Iterable[str]) -> list[Row]:
    """All labeled reviews of ``domains``, in the reference code's pooling order: domains as given, within a
    domain positive then negative, each in file order. ids are ``<domain>/<label>/<index in file>``.

    Every file read is checked as ``fetch`` checks it (:func:`check_labeled_reviews`); a damaged one raises
    :class:`DataError` naming it and how to get the corpus again."""
    domains = tuple(domains)
    base = find_amazon_dir(root, domains)
    rows: list[Row] = []
    for domain in domains:
        folder = _domain_dir(base, domain)
        assert folder is not None
        # Positive first: the reference code (EasyNLP generate_senti_data.py) pools in this order, and the
        # reference split depends on row order.
        for label_name in ("positive", "negative"):
            try:
                reviews = read_labeled_review_file(folder / f"{label_name}.review")
            except DataError as e:
                raise DataError(f"{e}; {damaged_amazon_fix(root, base, folder)}") from None
            label = SENTIMENT_LABELS.index(label_name)
            for i, r in enumerate(reviews):
                rows.append({"id": f"{domain}/{label_name}/{i:04d}", "text": r.text, "text_pair": "",
                             "label": label, "domain": domain, "unique_id": r.unique_id})
    return rows


# ----------------------------------------------------------------------------------------------------------
# MNLI
# ----------------------------------------------------------------------------------------------------------

MNLI_COLUMNS = ("sentence1", "sentence2", "label", "genre")


def _nli_label(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip() in NLI_LABELS:
        return NLI_LABELS.index(value.strip())
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        if 0 <= int(value) < len(NLI_LABELS):
            return int(value)
    raise DataError(f"{where}: label {value!r} is not one of {', '.join(NLI_LABELS)} (or 0-2)")


def mnli_rows(records: list[dict], genres: Iterable[str], split: str, source: str) -> list[Row]:
    """MNLI records (``sentence1, sentence2, label, genre``) -> rows of the given genres; ids are
    ``<genre>/<split>/<row index in the file>``. Unlabeled pairs (gold label ``-`` / -1) are dropped."""
    wanted = set(genres)
    rows: list[Row] = []
    for i, r in enumerate(records):
        genre = str(r["genre"]).strip()
        if genre not in wanted or str(r["label"]).strip() in ("-", "-1", ""):
            continue
        rows.append({"id": f"{genre}/{split}/{i:06d}", "text": str(r["sentence1"]), "text_pair": str(r["sentence2"]),
                     "label": _nli_label(r["label"], f"{source} row {i + 1}"), "domain": genre})
    return rows


def _mnli_file(folder: Path, stem: str) -> Path | None:
    for ext in (".tsv", ".jsonl"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def read_mnli_local(root: Path, genres: Iterable[str]) -> tuple[list[Row], list[Row]]:
    """(train rows, test rows) from ``<root>/mnli-genre-sample/mnli_{train,val}.{tsv,jsonl}`` (or ``root`` itself)."""
    genres = tuple(genres)
    for folder in (root / MNLI_DIR, root):
        train, val = _mnli_file(folder, "mnli_train"), _mnli_file(folder, "mnli_val")
        if train and val:
            out = []
            for path, split in ((train, "train"), (val, "test")):
                records = read_records(path)
                _require_columns(path, records, MNLI_COLUMNS)
                out.append(mnli_rows(records, genres, split, str(path)))
            return out[0], out[1]
    raise DataError(
        f"MNLI not found: no mnli_train.tsv and mnli_val.tsv (or .jsonl) in {root / MNLI_DIR} or {root}; "
        f"place the files at {root / MNLI_DIR} or set data.mnli_source=hub"
    )


def read_mnli_hub(genres: Iterable[str], name: str = "nyu-mll/multi_nli") -> tuple[list[Row], list[Row]]:
    """(train rows, test rows) from the hub's MNLI: ``train`` and ``validation_matched`` (integer labels)."""
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as e:  # network, hub or cache errors all mean the same thing to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"could not load {name} from the Hugging Face hub ({type(e).__name__}: {first}); if offline, set "
            f"data.mnli_source=local and place mnli_train.tsv and mnli_val.tsv in <data root>/{MNLI_DIR}"
        ) from e
    out = []
    for split, ours in (("train", "train"), ("validation_matched", "test")):
        records = [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": r["label"], "genre": r["genre"]}
                   for r in dd[split]]
        out.append(mnli_rows(records, genres, ours, f"{name}:{split}"))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------
# Generic table
# ----------------------------------------------------------------------------------------------------------


def _table_path(root: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else root / p


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def read_table(root: Path, table: TableConfig) -> dict[str, list[dict[str, Any]]]:
    """Raw rows of each configured table split (``train``, ``dev`` if set, ``test``), labels not yet mapped:
    ``{split: [{"id", "text", "text_pair", "label" (raw), "domain"}]}``. ids are ``<split>/<row index>``."""
    out: dict[str, list[dict[str, Any]]] = {}
    columns = [table.text_column, table.label_column, table.domain_column] + (
        [table.text_pair_column] if table.text_pair_column else [])
    for split in ("train", "dev", "test"):
        name = getattr(table, split)
        if not name:
            continue
        path = _table_path(root, name)
        if not path.is_file():
            raise DataError(f"data.table.{split}: {path} does not exist; put the file there or fix data.table.{split}")
        records = read_records(path)
        if not records:
            raise DataError(f"data.table.{split}: {path} has no rows")
        _require_columns(path, records, columns, hint=" (data.table.text_column, label_column, domain_column"
                         + (", text_pair_column" if table.text_pair_column else "")
                         + "; set them to the file's column names)")
        rows = []
        for i, r in enumerate(records):
            label = r.get(table.label_column)
            if label is None or label == "" or (isinstance(label, float) and label != label):
                raise DataError(f"{path} row {i + 1}: empty {table.label_column!r}")
            if not isinstance(label, (str, int, float)):
                raise DataError(f"{path} row {i + 1}: {table.label_column!r} is a {type(label).__name__}; expected a "
                                "string or a number")
            rows.append({"id": f"{split}/{i:06d}", "text": _text(r.get(table.text_column)),
                         "text_pair": _text(r.get(table.text_pair_column)) if table.text_pair_column else "",
                         "label": label, "domain": _text(r.get(table.domain_column))})
        out[split] = rows
    return out


def _class_index(value: Any) -> int | None:
    """``value`` as a class index if it is a non-negative integer (int, integral float or digit string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value) if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def label_vocabulary(values: Iterable[Any]) -> tuple[tuple[str, ...], dict[Any, int]]:
    """(label names, raw value -> id). Integer labels (ints, integral floats, digit strings) are kept as ids,
    named ``"0".."max"``; otherwise ids follow the sorted unique string values. Either way a label has the same
    id in every domain and split."""
    values = set(values)
    ids = {v: _class_index(v) for v in values}
    if all(i is not None for i in ids.values()):
        return tuple(str(i) for i in range(max(ids.values()) + 1)), ids  # type: ignore[type-var,operator]
    names = tuple(sorted({str(v) for v in values}))
    return names, {v: names.index(str(v)) for v in values}

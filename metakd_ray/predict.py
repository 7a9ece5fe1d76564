"""Classify texts with an exported student (``metakd_ray.export``), using plain ``transformers`` only.

    python -m metakd_ray.predict MODEL_DIR --text "great book" [--text ...]
    python -m metakd_ray.predict MODEL_DIR --file reviews.jsonl [--text-pair-column hypothesis] [--batch-size 32]

prints one JSON line per input, in input order: ``{"id": ..., "label": name, "probabilities": {name: p, ...}}``
(``id`` only when the input row has one).

Inputs: ``--text`` (repeatable), or ``--file`` with one of
  * ``.txt``: one text per line (blank lines are skipped);
  * ``.jsonl``: one JSON object per line with a string ``text`` (and optionally ``text_pair``, ``id``);
  * ``.csv``: a header row with a ``text`` column (and optionally ``text_pair``, ``id``).
Text pairs (MNLI-style) go through the tokenizer's pair encoding. As in training (``data.tokenize``), a file is
read as pairs when any row has a non-empty ``text_pair`` (or the column ``--text-pair-column`` names); rows
without one are then encoded with an empty second segment.

Design: everything that can be wrong with the command line — MODEL_DIR not an export, an unreadable file, a
missing column — is checked *before* torch and transformers are imported, and reported as one line
``error: <file>: <problem>; expected <what>`` on stderr with exit status 2 (no traceback). The model is then
loaded as any user would (``AutoTokenizer`` and ``AutoModelForSequenceClassification``, both with
``trust_remote_code=True``)
and run in eval mode under ``torch.no_grad``, ``--batch-size`` inputs at a time, in input order, truncated at
the tokenizer's ``model_max_length`` (the export caps it at the training ``max_length``). With ``reference``
pooling the padding of a batch enters the pooled mean (as in training), so its probabilities can change slightly
with ``--batch-size``; ``mean`` pooling does not depend on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

EXPORT_MARKER = "metakd_export.json"
FILE_KINDS = (".jsonl", ".csv", ".txt")


class InputError(Exception):
    """Bad user input; ``str(e)`` is the whole one-line message after ``error: ``."""


@dataclass(frozen=True)
class Row:
    text: str
    text_pair: str | None = None
    id: Any = None


# ----------------------------------------------------------------------------------------------------------
# Checks and input reading (no torch, no transformers)
# ----------------------------------------------------------------------------------------------------------


def check_export(model_dir: str | Path) -> Path:
    """``model_dir`` if it looks like a folder ``export_student`` wrote, else :class:`InputError`."""
    d = Path(model_dir)
    expected = "a folder written by metakd_ray.export.export_student (config.json, metakd_export.json, ...)"
    if not d.is_dir():
        raise InputError(f"{d}: no such directory; expected {expected}")
    for name in ("config.json", EXPORT_MARKER):
        try:
            json.loads((d / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{d}: no {name}, not a metakd_ray export; expected {expected}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{d}: cannot read {name} ({_why(e)}); expected {expected}") from None
    return d


def _why(e: BaseException) -> str:
    return " ".join(str(getattr(e, "strerror", None) or e).split())


def _text_field(value: Any, where: str, name: str, path: Path, expected: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{path}: {where}: {name!r} is a {type(value).__name__}, not a string; expected {expected}")
    return value


def _rows_from_records(records: Iterator[tuple[str, dict[str, Any]]], path: Path, columns: set[str] | None,
                       pair_column: str | None, expected: str) -> list[Row]:
    pair_name = pair_column or "text_pair"
    raw: list[tuple[str, str, Any]] = []
    for where, rec in records:
        keys = columns if columns is not None else set(rec)
        if "text" not in keys:
            raise InputError(f"{path}: {where} has no 'text' field (fields: {', '.join(sorted(keys)) or 'none'}); "
                             f"expected {expected}")
        if pair_column and pair_column not in keys:
            raise InputError(f"{path}: {where} has no {pair_column!r} field (--text-pair-column); expected {expected}")
        if rec.get("text") is None:
            raise InputError(f"{path}: {where} has an empty 'text' field; expected {expected}")
        raw.append((_text_field(rec.get("text"), where, "text", path, expected),
                    _text_field(rec.get(pair_name), where, pair_name, path, expected), rec.get("id")))
    if not raw:
        raise InputError(f"{path}: no rows; expected {expected}")
    pairs = pair_column is not None or any(p for _, p, _ in raw)
    return [Row(t, p if pairs else None, i) for t, p, i in raw]


def read_file(path: str | Path, pair_column: str | None = None) -> list[Row]:
    """Rows of a ``.txt``, ``.jsonl`` or ``.csv`` file; :class:`InputError` for anything unusable."""
    p = Path(path)
    kind = p.suffix.lower()
    if kind not in FILE_KINDS:
        raise InputError(f"{p}: unknown file type {p.suffix or '(none)'!r}; expected a .jsonl, .csv or .txt file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read ({_why(e)}); expected a readable UTF-8 {kind} file") from None
    if kind == ".txt":
        if pair_column:
            raise InputError(f"{p}: --text-pair-column needs columns; expected a .jsonl or .csv file for pairs")
        rows = [Row(line) for line in text.splitlines() if line.strip()]
        if not rows:
            raise InputError(f"{p}: no texts; expected one text per line")
        return rows
    if kind == ".jsonl":
        expected = 'one JSON object per line with a string "text" (and optional "text_pair", "id")'

        def records() -> Iterator[tuple[str, dict[str, Any]]]:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{p}: line {n} is not JSON ({e.msg}); expected {expected}") from None
                if not isinstance(rec, dict):
                    raise InputError(f"{p}: line {n} is a JSON {type(rec).__name__}, not an object; "
                                     f"expected {expected}")
                yield f"line {n}", rec

        return _rows_from_records(records(), p, None, pair_column, expected)
    expected = "a CSV file with a header row naming a 'text' column (and optional 'text_pair', 'id')"
    try:
        reader = csv.DictReader(text.splitlines())
        header = set(reader.fieldnames or ())
        if "text" not in header or (pair_column and pair_column not in header):
            wanted = "'text'" if "text" not in header else repr(pair_column)
            raise InputError(f"{p}: no {wanted} column (columns: {', '.join(sorted(header)) or 'none'}); "
                             f"expected {expected}")
        recs = [(f"row {n}", rec) for n, rec in enumerate(reader, 2)]
    except csv.Error as e:
        raise InputError(f"{p}: not valid CSV ({_why(e)}); expected {expected}") from None
    return _rows_from_records(iter(recs), p, header, pair_column, expected)


# ----------------------------------------------------------------------------------------------------------
# Prediction (plain transformers)
# ----------------------------------------------------------------------------------------------------------


def load(model_dir: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) from an export, exactly as a user without metakd_ray loads it; model in eval mode."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # The tokenizer is a stock one, but AutoTokenizer first reads config.json, whose AutoConfig is custom code:
    # without the flag, transformers asks on stdin (printing the question to stdout) before falling back.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), trust_remote_code=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return tokenizer, model.to(device).eval()


def predict(tokenizer: Any, model: Any, rows: Sequence[Row], batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """One ``{"id"?, "label", "probabilities"}`` dict per row, in order, ``batch_size`` rows per forward pass."""
    import torch

    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pairs = [r.text_pair or "" for r in chunk] if any(r.text_pair is not None for r in chunk) else None
        enc = tokenizer([r.text for r in chunk], pairs, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
        for row, p in zip(chunk, probs):
            out: dict[str, Any] = {"id": row.id} if row.id is not None else {}
            out["label"] = names[max(range(len(p)), key=p.__getitem__)]
            out["probabilities"] = dict(zip(names, p))
            yield out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Output: one JSON line per input on stdout.")
    ap.add_argument("model_dir", metavar="MODEL_DIR", help="a folder written by metakd_ray.export.export_student")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--file", help="a .jsonl, .csv (column 'text') or .txt (one text per line) file")
    ap.add_argument("--text-pair-column", metavar="C", default=None,
                    help="column holding the second text of a pair (default: 'text_pair' when present)")
    ap.add_argument("--batch-size", type=int, default=32, metavar="N")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        model_dir = check_export(args.model_dir)
        rows = [Row(t) for t in args.text] if args.text else read_file(args.file, args.text_pair_column)
        if args.text and args.text_pair_column:
            raise InputError("--text-pair-column: only with --file; expected a .jsonl or .csv file for text pairs")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # stderr is for errors; stdout for the JSON lines
    try:
        tokenizer, model = load(model_dir, args.device)
    except Exception as e:  # any failure to load is the folder's fault here: one line, no traceback
        print(f"error: {model_dir}: cannot load the export ({type(e).__name__}: {_why(e)}); expected a folder "
              "written by metakd_ray.export.export_student", file=sys.stderr)
        return 2
    try:
        for out in predict(tokenizer, model, rows, args.batch_size):
            print(json.dumps(out, ensure_ascii=False), flush=True)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

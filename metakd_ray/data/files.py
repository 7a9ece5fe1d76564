"""Records from table files (CSV, TSV, JSON Lines, Parquet) and the error every data problem raises.

Each reader checks what it reads as it goes: a file that is not UTF-8, a line with more or fewer fields than the
header, a line that is not a JSON object, a file that is not Parquet, a row without a needed column — each raises
:class:`DataError` with one line naming the file (and line) and what is expected.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable


class DataError(ValueError):
    """Data is missing or malformed. The message is one line: what was looked at, and how to get it."""


def read_bytes(path: Path) -> bytes:
    """A data file's bytes; DataError (one line) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e


def _read_text(path: Path) -> str:
    """A text file's content (UTF-8, a byte-order mark dropped); DataError naming the line of the first byte that
    is not UTF-8."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte {data[e.start]:#04x}); expected a UTF-8 text file "
                        "(re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8)") from None


def _read_delimited(path: Path, tsv: bool) -> list[dict[str, Any]]:
    text = _read_text(path)
    if tsv:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
    kind = "tab-separated" if tsv else "comma-separated"
    rows = []
    try:
        for r in reader:
            if None in r or None in r.values():  # more or fewer fields than the header: a cut or broken line
                n = len(r) - 1 + len(r[None]) if None in r else sum(v is not None for v in r.values())
                raise DataError(f"{path} line {reader.line_num}: {n} fields, expected {len(reader.fieldnames or ())} "
                                f"like the header line ({kind}); fix or remove the line")
            rows.append(r)
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not valid {kind} text ({e}); fix the line") from None
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines(): U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno}); expected one JSON "
                            "object per line (JSON Lines)") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {n}: a JSON {type(record).__name__}, expected a JSON object "
                            "({\"column\": value, ...}) per line")
        rows.append(record)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        cause = " ".join(str(e).split())
        raise DataError(f"{path}: not a readable Parquet file ({cause}); expected a Parquet file (e.g. written by "
                        "pandas.DataFrame.to_parquet), or name the file .csv/.jsonl if that is what it holds") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a TSV, CSV, JSONL or Parquet file as dicts (by extension). TSV/CSV are read with
    ``QUOTE_NONE`` for TSV (MNLI text is pre-tokenised and quotes are text) and every cell as a string.
    A file that is not what its extension says (not UTF-8, a line with the wrong number of fields, a line that is
    not a JSON object, not Parquet) raises :class:`DataError` naming the file and, for text files, the line."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return _read_delimited(path, tsv=suffix == ".tsv")
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected .csv, .tsv, .jsonl or .parquet")


def _require_columns(path: Path | str, records: list[dict], columns: Iterable[str], hint: str = "") -> None:
    """Every record has every column of ``columns`` (JSON Lines records may differ from line to line)."""
    columns = list(columns)
    have = set(records[0]) if records else set()
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(sorted(have)) or 'no rows'}"
                        f"; expected {', '.join(columns)}{hint}")
    for i, r in enumerate(records):
        lacking = [c for c in columns if c not in r]
        if lacking:
            raise DataError(f"{path} row {i + 1}: missing column(s) {', '.join(lacking)}; expected every row to have "
                            f"{', '.join(columns)}")

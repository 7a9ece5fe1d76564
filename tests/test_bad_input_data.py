"""Damaged input is caught before compute, one line each: corpus files (Amazon .review, MNLI TSV/JSONL, the generic
table's CSV/JSONL/Parquet), a sweep's records (plan.json, costs.json, config.yaml, trial records) and an exported
teacher's weights.

Each case damages a copy in ``tmp_path`` (never the shared data) and calls the public entry point — ``load_splits``,
``load_results`` / ``report``, ``load_teacher``, a CLI's ``main(argv)`` in-process, or the CLI in a subprocess — then
checks: the error type or exit status 2, a one-line message naming the damaged file, no traceback, and nothing
created or changed under the data root / run dir / storage root."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from metakd_ray.config import AMAZON_DOMAINS, DataConfig, TableConfig
from metakd_ray.data import DataError, column, load_splits
from metakd_ray.data.fetch import verify_amazon
from metakd_ray.data.splits import PAPER_AMAZON_COUNTS
from metakd_ray.storage import Storage

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("METAKD_DATA") or REPO.parent / "shared" / "data").resolve()
AMAZON = "amazon-multi-domain-sentiment"
MNLI = "mnli-genre-sample"
FETCH = "python -m metakd_ray.data fetch amazon"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def _needs_shared_data(shared_data):
    """conftest's ``shared_data`` fails the tests loudly (never skips) when the real data is missing."""


# ----------------------------------------------------------------------------------------------------------
# What a case gives back, and the checks every case gets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    message: str  # the exception's text, or the CLI's stderr
    exit_code: int | None = None  # None: an exception was raised in-process


@dataclass
class Prepared:
    watched: Path  # data root / run dir / storage root: nothing may appear or change under it
    named: Path  # the damaged file the message must name
    act: Callable[[], Outcome]
    needles: tuple[str, ...] = ()  # further text the message must hold (what was found, what is expected, the fix)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def _raises(exc: type[BaseException], fn: Callable[[], object]) -> Callable[[], Outcome]:
    def act() -> Outcome:
        with pytest.raises(exc) as e:
            fn()
        return Outcome(str(e.value))
    return act


def _in_process(main: Callable[[list[str]], int], argv: list[str], capsys) -> Callable[[], Outcome]:
    def act() -> Outcome:
        capsys.readouterr()
        rc = main(argv)
        out = capsys.readouterr()
        assert out.out == "", out.out
        return Outcome(out.err, rc)
    return act


def _subprocess(module: str, *args: str) -> Callable[[], Outcome]:
    def act() -> Outcome:
        out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                             timeout=90, check=False, env={**os.environ, "METAKD_DATA": str(SHARED_DATA)})
        assert out.stdout == "", out.stdout
        return Outcome(out.stderr, out.returncode)
    return act


# ----------------------------------------------------------------------------------------------------------
# Amazon: a copy of the shared corpus with one file damaged
# ----------------------------------------------------------------------------------------------------------


def _amazon_copy(tmp: Path) -> Path:
    root = tmp / "data"
    shutil.copytree(SHARED_DATA / AMAZON, root / AMAZON)
    return root


def _amazon_case(tmp: Path, domain: str, label: str, damage: Callable[[bytes], bytes], *needles: str,
                 via_cli: bool = False) -> Prepared:
    root = _amazon_copy(tmp)
    path = root / AMAZON / domain / f"{label}.review"
    path.write_bytes(damage(path.read_bytes()))
    if via_cli:  # the data CLI end to end: python -m metakd_ray.data describe CONFIG
        cfg = tmp / "amazon.yaml"
        cfg.write_text(f"data:\n  root: {root}\n")
        act = _subprocess("metakd_ray.data", "describe", str(cfg))
    else:
        act = _raises(DataError, lambda: load_splits(DataConfig(root=str(root))))
    return Prepared(root, path, act, (*needles, "expected 1000 reviews", f"remove {root / AMAZON}", FETCH))


def _drop_first_closing(raw: bytes) -> bytes:  # still 1000 blocks with text: only the tag count shows it
    return raw.replace(b"</review>", b"", 1)


def _extra_unclosed(raw: bytes) -> bytes:
    return raw.replace(b"</reviews>", b"<review>\n<title>\nstray\n</title>\n</reviews>")


def _blank_first_review(raw: bytes) -> bytes:
    raw = re.sub(rb"<title>.*?</title>", b"<title></title>", raw, count=1, flags=re.DOTALL)
    return re.sub(rb"<review_text>.*?</review_text>", b"<review_text></review_text>", raw, count=1, flags=re.DOTALL)


def case_amazon_empty_file(tmp, capsys):
    return _amazon_case(tmp, "books", "positive", lambda raw: b"", "0 reviews")


def case_amazon_unclosed_review(tmp, capsys):
    return _amazon_case(tmp, "dvd", "positive", _drop_first_closing, "1000 <review> and 999 </review>")


def case_amazon_extra_unclosed_review(tmp, capsys):
    return _amazon_case(tmp, "kitchen", "negative", _extra_unclosed, "1001 reviews")


def case_amazon_cut_in_half(tmp, capsys):
    return _amazon_case(tmp, "electronics", "negative", lambda raw: raw[: len(raw) // 2], "</review> tags")


def case_amazon_review_without_text(tmp, capsys):
    return _amazon_case(tmp, "kitchen", "positive", _blank_first_review, "1000 reviews (1 without text")


def case_amazon_cut_in_half_cli(tmp, capsys):
    return _amazon_case(tmp, "books", "negative", lambda raw: raw[: len(raw) // 2], via_cli=True)


# ----------------------------------------------------------------------------------------------------------
# MNLI: a copy of the shared sample with one file damaged
# ----------------------------------------------------------------------------------------------------------


def _mnli_copy(tmp: Path) -> Path:
    root = tmp / "data"
    shutil.copytree(SHARED_DATA / MNLI, root / MNLI)
    return root


def _mnli_load(root: Path) -> Callable[[], Outcome]:
    return _raises(DataError, lambda: load_splits(DataConfig(dataset="mnli", root=str(root), domains=("fiction",))))


def case_mnli_tsv_not_utf8(tmp, capsys):
    root = _mnli_copy(tmp)
    path = root / MNLI / "mnli_train.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[100] = lines[100].replace(b" ", b" caf\xe9 ", 1)  # Latin-1, line 101 of the file
    path.write_bytes(b"\n".join(lines))
    return Prepared(root, path, _mnli_load(root), ("line 101: not UTF-8", "expected a UTF-8"))


def case_mnli_jsonl_broken_line(tmp, capsys):
    root = _mnli_copy(tmp)
    val = root / MNLI / "mnli_val.tsv"
    with open(val, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:40]
    val.unlink()
    lines = [json.dumps(r) for r in records]
    lines[4] = lines[4][: len(lines[4]) // 2]  # line 5 cut short
    path = root / MNLI / "mnli_val.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return Prepared(root, path, _mnli_load(root), ("line 5: not valid JSON", "one JSON object per line"))


def case_mnli_missing_column(tmp, capsys):
    root = _mnli_copy(tmp)
    path = root / MNLI / "mnli_val.tsv"
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"\tlabel\t", b"\tgold_label\t", 1))
    return Prepared(root, path, _mnli_load(root), ("missing column(s) label", "expected sentence1, sentence2, label"))


def case_mnli_tsv_line_cut_short(tmp, capsys):
    root = _mnli_copy(tmp)
    path = root / MNLI / "mnli_train.tsv"
    lines = path.read_bytes().split(b"\n")
    cut = lines[1000].split(b"\t")[0] + b"\t"  # line 1001: its first field and a tab, then nothing
    path.write_bytes(b"\n".join(lines[:1000] + [cut]))
    return Prepared(root, path, _mnli_load(root), ("line 1001: 2 fields, expected 4",))


# ----------------------------------------------------------------------------------------------------------
# The generic table (data.dataset=table)
# ----------------------------------------------------------------------------------------------------------


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"text number {i}" for i in range(n)], "label": ["bad", "good"] * (n // 2),
                         "domain": ["a"] * n})


def _table_case(tmp: Path, train_name: str, train_bytes: bytes, *needles: str) -> Prepared:
    root = tmp / "data"
    root.mkdir()
    _frame(20).to_csv(root / "test.csv", index=False)
    path = root / train_name
    path.write_bytes(train_bytes)
    table = TableConfig(train=train_name, test="test.csv")
    act = _raises(DataError, lambda: load_splits(DataConfig(dataset="table", root=str(root), domains=("a",),
                                                            table=table)))
    return Prepared(root, path, act, needles)


def case_table_csv_not_utf8(tmp, capsys):
    df = _frame(40)
    df.loc[2, "text"] = "café"
    return _table_case(tmp, "train.csv", df.to_csv(index=False).encode("latin-1"), "line 4: not UTF-8")


def case_table_jsonl_broken_line(tmp, capsys):
    lines = _frame(40).to_json(orient="records", lines=True).splitlines()
    lines[6] = '{"text": "cut short", "label": '
    return _table_case(tmp, "train.jsonl", ("\n".join(lines) + "\n").encode(), "line 7: not valid JSON")


def case_table_jsonl_not_an_object(tmp, capsys):
    lines = _frame(40).to_json(orient="records", lines=True).splitlines()
    lines[2] = '["text", "bad", "a"]'
    return _table_case(tmp, "train.jsonl", ("\n".join(lines) + "\n").encode(), "line 3: a JSON list",
                       "expected a JSON object")


def case_table_parquet_is_csv(tmp, capsys):
    return _table_case(tmp, "train.parquet", _frame(40).to_csv(index=False).encode(), "not a readable Parquet file",
                       "expected a Parquet file")


def case_table_parquet_cut_short(tmp, capsys):
    import io

    buf = io.BytesIO()
    _frame(40).to_parquet(buf)
    data = buf.getvalue()
    return _table_case(tmp, "train.parquet", data[: len(data) // 2], "not a readable Parquet file")


def case_table_missing_column(tmp, capsys):
    data = _frame(40).drop(columns=["domain"]).to_csv(index=False).encode()
    return _table_case(tmp, "train.csv", data, "missing column(s) domain", "data.table.text_column")


# ----------------------------------------------------------------------------------------------------------
# A sweep's records (results)
# ----------------------------------------------------------------------------------------------------------


def _sweep(tmp: Path) -> tuple[Path, str]:
    """<tmp>/runs/sweeps/demo as the sweep writes it (the record classes themselves): plan.json, costs.json,
    config.yaml and two trials' records; returns (the sweep dir, the first trial record's file name)."""
    from metakd_ray.sweep.plan import Cell, Plan
    from metakd_ray.sweep.records import TrialRecord, TrialStore, trial_key

    run = tmp / "runs" / "sweeps" / "demo"
    run.mkdir(parents=True)
    cells = (Cell("books", 1.0, "meta/meta_kd", 0), Cell("dvd", 1.0, "meta/meta_kd", 0))
    (run / "plan.json").write_text(json.dumps(Plan("demo", 1, cells).to_json()))
    (run / "costs.json").write_text(json.dumps({"teachers": {"t1": {"wall_s": 5.0, "cpu_s": 9.0, "gpu_s": 0.0,
                                                                     "cells": [c.id for c in cells]}}, "caches": {}}))
    (run / "config.yaml").write_text("name: demo\ndata:\n  dataset: amazon\n")
    store = TrialStore(Storage(str(run)))
    keys = []
    for slot, c in enumerate(cells):
        hp = {"stage1_lr": 5e-5}
        rec = TrialRecord(trial_key(c.id, slot, hp), c.id, slot, hp, trial_id=f"t{slot}", attempts=1,
                          start_time=1_800_000_000.0, updated=1_800_000_100.0)
        rec = rec.finished({"dev_acc": 0.8, "phase": "final", "epoch": -1, "test_acc": 0.7, "wall_s": 50.0,
                            "cpu_s": 90.0, "gpu_s": 0.0, "n_train": 16})
        store.write(rec)
        keys.append(f"{rec.key}.json")
    return run, min(keys)


def _results_case(tmp: Path, name: str, damage: Callable[[bytes], bytes], how: str, capsys,
                  *needles: str) -> Prepared:
    from metakd_ray import results as R
    from metakd_ray.results.__main__ import main
    from metakd_ray.results.load import ResultsError

    run, first_trial = _sweep(tmp)
    path = run / (name if name != "TRIAL" else f"trials/{first_trial}")
    path.write_bytes(damage(path.read_bytes()))
    act = {"load": _raises(ResultsError, lambda: R.load_results(run)),
           "report": _raises(ResultsError, lambda: R.report(run)),
           "cli": _in_process(main, [str(run)], capsys),
           "subprocess": _subprocess("metakd_ray.results", str(run))}[how]
    return Prepared(run, path, act, ("is damaged", "remove it and rerun the sweep", *needles))


def _half(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def case_results_plan_invalid_json(tmp, capsys):
    return _results_case(tmp, "plan.json", lambda raw: b"{not json", "cli", capsys, "not valid JSON")


def case_results_plan_truncated(tmp, capsys):
    return _results_case(tmp, "plan.json", _half, "load", capsys, "not valid JSON")


def case_results_plan_wrong_shape(tmp, capsys):
    plan = {"name": "demo", "trials_per_cell": 1, "cells": [{"rate": 1.0, "method": "meta/meta_kd", "seed": 0}]}
    return _results_case(tmp, "plan.json", lambda raw: json.dumps(plan).encode(), "load", capsys,
                         "not a plan: missing 'domain'")


def case_results_plan_not_an_object(tmp, capsys):
    return _results_case(tmp, "plan.json", lambda raw: b"[1, 2, 3]", "subprocess", capsys, "a JSON list")


def case_results_costs_wrong_shape(tmp, capsys):
    return _results_case(tmp, "costs.json", lambda raw: b'{"teachers": [1, 2]}', "cli", capsys,
                         "'teachers' is a list")


def case_results_costs_truncated(tmp, capsys):
    return _results_case(tmp, "costs.json", _half, "report", capsys, "not valid JSON")


def case_results_trial_record_truncated(tmp, capsys):
    return _results_case(tmp, "TRIAL", _half, "subprocess", capsys, "not valid JSON", "that trial runs again")


def case_results_trial_record_wrong_shape(tmp, capsys):
    def damage(raw: bytes) -> bytes:
        return json.dumps({**json.loads(raw), "final": "done"}).encode()
    return _results_case(tmp, "TRIAL", damage, "cli", capsys, "final is 'done'")


def case_results_config_yaml_invalid(tmp, capsys):
    return _results_case(tmp, "config.yaml", lambda raw: b"name: [demo\ndata: {", "load", capsys, "not valid YAML")


# ----------------------------------------------------------------------------------------------------------
# An exported teacher (teachers/<key>/model) with a damaged file
# ----------------------------------------------------------------------------------------------------------

TEACHER_KEY = "0123456789abcdef"


def _teacher_case(tmp: Path, rel: str, damage: Callable[[bytes], bytes], *needles: str) -> Prepared:
    from toy import toy_tokenizer

    from metakd_ray import models as M
    from metakd_ray.teacher.artefact import load_teacher

    root = tmp / "store"
    teacher_dir = root / "teachers" / TEACHER_KEY
    tok = toy_tokenizer()
    encoder = M.random_encoder(vocab_size=len(tok), num_layers=1, max_position=32, dropout=0.0, seed=0)
    M.ClassifierTeacher(encoder, num_labels=2, dropout=0.0).save_pretrained(teacher_dir / "model", tok)
    (teacher_dir / "manifest.json").write_text(json.dumps({"key": TEACHER_KEY}))
    path = teacher_dir / rel
    path.write_bytes(damage(path.read_bytes()))
    storage = Storage(str(root))
    act = _raises(M.ModelLoadError, lambda: load_teacher(storage, TEACHER_KEY))
    return Prepared(root, path, act, (f"remove {teacher_dir.resolve()} to retrain it", *needles))


def test_bad_input_checks_pass_intact_teacher(tmp_path):
    """The same toy export, undamaged, loads (the error path is only taken on a failure)."""
    from metakd_ray.teacher.artefact import load_teacher

    prepared = _teacher_case(tmp_path, "manifest.json", lambda raw: raw)
    model, tokenizer, manifest = load_teacher(Storage(str(prepared.watched)), TEACHER_KEY)
    assert manifest == {"key": TEACHER_KEY} and not model.training and len(tokenizer) > 10


def case_teacher_safetensors_truncated(tmp, capsys):
    return _teacher_case(tmp, "model/encoder/model.safetensors", _half, "damaged teacher file", "cut short")


def case_teacher_safetensors_garbage(tmp, capsys):
    return _teacher_case(tmp, "model/encoder/model.safetensors", lambda raw: b"not a safetensors file" * 10,
                         "damaged teacher file")


def case_teacher_manifest_invalid(tmp, capsys):
    return _teacher_case(tmp, "manifest.json", _half, "damaged teacher manifest")


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_names_file_nothing_written(case, tmp_path, capsys):
    prepared = CASES[case](tmp_path, capsys)
    before = _snapshot(prepared.watched)
    outcome = prepared.act()
    assert _snapshot(prepared.watched) == before, "files created or changed"
    message = outcome.message.strip()
    assert "Traceback" not in message
    lines = message.splitlines()
    assert len(lines) == 1, message
    if outcome.exit_code is not None:  # a CLI: exit status 2, "error: <message>" on stderr
        assert outcome.exit_code == 2 and lines[0].startswith("error: "), message
    assert str(prepared.named) in message or str(prepared.named.resolve()) in message, message
    for needle in prepared.needles:
        assert needle in message, (needle, message)


def test_bad_input_case_table_is_wide():
    assert len(CASES) >= 12
    assert sum(name.startswith(("amazon", "mnli", "table")) for name in CASES) >= 12


# ----------------------------------------------------------------------------------------------------------
# The checks pass the intact shared corpus, and the splits are those of before the checks
# ----------------------------------------------------------------------------------------------------------

# From the code before the checks (HEAD when they were added): per split, sha256 of the ids in order (first 16 hex
# digits) and the size — the checks must not change a single row.
AMAZON_SPLITS = {"train": ("a52f826ececdceed", 6480), "dev": ("71594b0f8ce88463", 720),
                 "test": ("56239ac230144bba", 800)}
MNLI_SPLITS = {"train": ("b584ce3565e91fde", 7038), "dev": ("0eaca6ca005a30f3", 783), "test": ("3b89c35e3d9e61e8", 1977)}


def _digest(ds) -> tuple[str, int]:
    ids = column(ds, "id")
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16], len(ids)


def test_bad_input_checks_pass_intact_shared_corpus():
    assert verify_amazon(SHARED_DATA / AMAZON) == 8000
    splits = load_splits(DataConfig(root=str(SHARED_DATA)))
    for domain in AMAZON_DOMAINS:
        sizes = tuple(column(splits[s], "domain").count(domain) for s in ("train", "dev", "test"))
        assert sizes == PAPER_AMAZON_COUNTS[domain]
    assert {s: _digest(splits[s]) for s in ("train", "dev", "test")} == AMAZON_SPLITS
    mnli = load_splits(DataConfig(dataset="mnli", root=str(SHARED_DATA), domains=("fiction", "travel")))
    assert {s: _digest(mnli[s]) for s in ("train", "dev", "test")} == MNLI_SPLITS

"""Shipping the students (metakd_ray/results/students.py): per domain the dev-best kept student of a method, copied
whole as a stock transformers folder, with students.csv. Selection on synthetic cells; the copy on CI's smoke run."""

from __future__ import annotations

import filecmp
import stat
from pathlib import Path

import pandas as pd
import pytest

from metakd_ray.results import cells, load_results
from metakd_ray.results.load import ResultsError
from metakd_ray.results.students import COLUMNS, best_students, export_students, main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "runs" / "smoke" / "sweeps" / "smoke"  # as tests/test_smoke_target.py: CI's smoke run writes it


def cell(domain, seed, dev, test, status="ok", student="s", method="meta/meta_kd", rate=1.0):
    return {"domain": domain, "method": method, "rate": rate, "seed": seed, "dev_acc": dev, "test_acc": test,
            "status": status, "student_dir": f"{student}-{domain}-{seed}" if student else None}


def test_the_dev_best_cell_per_domain_is_chosen_never_the_test_best():
    df = pd.DataFrame([
        cell("books", 0, 0.80, 0.95), cell("books", 1, 0.85, 0.70), cell("books", 2, 0.85, 0.71),  # tie: lower seed
        cell("dvd", 0, 0.90, 0.80, status="error"), cell("dvd", 1, 0.70, 0.72),
        cell("dvd", 2, 0.99, 0.99, student=None),  # kept no student
        cell("kitchen", 0, 0.99, 0.99, method="single/tinybert_kd"), cell("kitchen", 1, 0.99, 0.99, rate=0.1),
    ])
    best = best_students(df, "meta/meta_kd", 1.0)
    assert best["domain"].tolist() == ["books", "dvd"]
    assert best["seed"].tolist() == [1, 1]
    with pytest.raises(ResultsError, match="no finished single/tinybert_kd cell at rate 0.5"):
        best_students(df, "single/tinybert_kd", 0.5)


@pytest.fixture
def smoke():
    if not (SMOKE / "plan.json").is_file() or not (SMOKE / "students").is_dir():
        pytest.skip("no smoke run in runs/smoke (python -m metakd_ray.sweep sweeps/smoke.yaml; CI runs it first)")
    return SMOKE


def test_the_smoke_runs_meta_kd_student_is_copied_whole(smoke, tmp_path, capsys):
    out = tmp_path / "ship"
    assert main([str(smoke), str(out), "--rate", "0.25"]) == 0
    table = pd.read_csv(out / "students.csv")
    assert table.columns.tolist() == COLUMNS
    row = table.iloc[0]
    ref = cells(load_results(smoke)).set_index("method").loc["meta/meta_kd"]
    assert (row["domain"], row["seed"], row["source"]) == (ref["domain"], ref["seed"], ref["student_dir"])
    assert row["test_acc"] == pytest.approx(ref["test_acc"]) and row["n_params"] == ref["n_params"]
    dest = out / row["domain"]
    cmp = filecmp.dircmp(ref["student_dir"], dest)
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files), (cmp.left_only, cmp.right_only, cmp.diff_files)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert sorted(p.name for p in out.iterdir()) == ["books", "students.csv"]  # no temporary folder left
    assert "books: " in capsys.readouterr().out
    again = export_students(smoke, out, rate=0.25)  # a second export replaces the first
    assert again["source"].tolist() == table["source"].tolist()
    assert sorted(p.name for p in out.iterdir()) == ["books", "students.csv"]


def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no such directory" in err[0]
    assert not (tmp_path / "out").exists()

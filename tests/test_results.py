"""Results layer: per-trial DataFrame, cells, improvement rate, paper table, plots, CLI — on sweep directories
written with the sweep's own record classes (plan.json, trials/<key>.json, costs.json). A real sweep's records are
read in tests/test_sweep.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from metakd_ray import results as R
from metakd_ray.results.load import ResultsError
from metakd_ray.storage import Storage
from metakd_ray.sweep.plan import Cell, Plan
from metakd_ray.sweep.records import TrialRecord, TrialStore, trial_key

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE, OURS = "single/tinybert_kd", "meta/meta_kd"


# ----------------------------------------------------------------------------------------------------------
# Sweep directories in the layout the sweep driver and its trials write
# ----------------------------------------------------------------------------------------------------------


class Sweep:
    """Builds <root>/plan.json, trials/<key>.json (each trial's own record) and costs.json, as the sweep writes
    them (through the same record classes)."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = TrialStore(Storage(str(root)))
        self.n, self.plan = 0, []

    def cell(self, domain, rate, method, seed, gamma2=None) -> str:
        c = Cell(domain, rate, method, seed, gamma2)
        self.plan.append(c)
        return c.id

    def trial(self, cid, *, dev=None, test=None, error=None, cpu=10.0, start=None, hp=None, progress=2,
              teacher="", cache="") -> str:
        """A trial of cell ``cid``: ``test`` given = a final report; ``error`` = a failed attempt (both = a retry);
        neither = still running."""
        self.n += 1
        tid = f"abc_{self.n:05d}"
        hp = {"stage1_lr": 5e-5, "stage2_lr": 3e-5, "gamma2": 0.5, **(hp or {})}
        t0 = start if start is not None else 1_800_000_000 + self.n
        rec = TrialRecord(trial_key(cid, self.n, hp), cid, self.n, hp, trial_id=tid, attempts=1, start_time=t0,
                          updated=t0 + progress)
        if progress:
            rec = dataclasses.replace(rec, last={"phase": "stage1", "epoch": progress - 1, "dev_acc": (dev or 0.5) - 0.1})
        if error:
            rec = dataclasses.replace(rec.failed(error), updated=t0 + progress)
        if test is not None:
            rec = rec.finished({"dev_acc": dev, "phase": "final", "epoch": -1, "test_acc": test, "wall_s": cpu / 2,
                                "cpu_s": cpu, "gpu_s": 0.0, "n_train": 16, "teacher_key": teacher,
                                "cache_key": cache})
        self.store.write(rec)
        return tid

    def write(self, costs=None, trials_per_cell=2):
        plan = Plan("demo", trials_per_cell, tuple(self.plan))
        (self.root / "plan.json").write_text(json.dumps(plan.to_json()))
        if costs is not None:
            (self.root / "costs.json").write_text(json.dumps(costs))
        return self.root


@pytest.fixture
def sweep(tmp_path) -> Sweep:
    return Sweep(tmp_path / "sweeps" / "demo")


def test_one_row_per_trial_failed_cell_retry_and_pending(sweep):
    ok = sweep.cell("books", 1.0, OURS, 0)
    bad = sweep.cell("dvd", 1.0, OURS, 0)
    sweep.cell("kitchen", 1.0, OURS, 0)  # planned, never started
    sweep.trial(ok, dev=0.9, test=0.8)
    retried = sweep.trial(ok, dev=0.7, test=0.75, error="RuntimeError: worker died")  # failed once, then finished
    sweep.trial(bad, error="ValueError: nan loss")
    sweep.trial(bad, error="ValueError: nan loss")
    df = R.load_results(sweep.write())

    assert len(df) == 4 and df["trial_id"].is_unique
    by_id = df.set_index("trial_id")
    assert by_id.loc[retried, "status"] == "TERMINATED" and by_id.loc[retried, "error"] == ""
    assert by_id.loc[retried, "n_failures"] == 1
    assert (df[df["cell"] == bad]["status"] == "ERROR").all()
    assert (df[df["cell"] == bad]["error"] == "ValueError: nan loss").all()  # ANSI codes and traceback stripped
    assert {"hp_stage1_lr", "hp_gamma2", "teacher_cpu_s", "cache_cpu_s", "start_time"} <= set(df.columns)

    c = R.cells(df).set_index("domain")
    assert list(c.index) == ["books", "dvd", "kitchen"]  # plan order; the never-started cell is there
    assert c.loc["books", "status"] == "ok" and c.loc["books", "test_acc"] == 0.8 and c.loc["books", "n_failed"] == 0
    assert c.loc["dvd", "status"] == "failed" and c.loc["dvd", "error"] == "ValueError: nan loss"
    assert c.loc["dvd", "n_trials"] == 2 and c.loc["dvd", "n_failed"] == 2 and pd.isna(c.loc["dvd", "test_acc"])
    assert c.loc["kitchen", "status"] == "pending" and c.loc["kitchen", "n_trials"] == 0


def test_cell_status_with_running_and_failed_trials(sweep):
    running = sweep.cell("books", 1.0, OURS, 0)
    sweep.trial(running, error="ValueError: nan loss")
    sweep.trial(running, dev=0.6)                    # reported, no final yet: RUNNING
    failed = sweep.cell("dvd", 1.0, OURS, 0)
    for _ in range(2):
        sweep.trial(failed, error="RuntimeError: boom")
    df = R.load_results(sweep.write())
    assert df.set_index("trial_id")["status"].to_dict() == {
        "abc_00001": "ERROR", "abc_00002": "RUNNING", "abc_00003": "ERROR", "abc_00004": "ERROR"}
    assert df.set_index("trial_id").loc["abc_00002", "dev_acc"] == pytest.approx(0.5)  # the last report's
    c = R.cells(df).set_index("domain")
    assert c.loc["books", "status"] == "pending"     # a trial may still finish
    assert c.loc["dvd", "status"] == "failed" and c.loc["dvd", "error"] == "RuntimeError: boom"


def test_a_damaged_record_is_named_and_the_plan_gives_the_cells(sweep):
    ok = sweep.cell("books", 1.0, OURS, 0)
    sweep.trial(ok, dev=0.9, test=0.8)
    root = sweep.write(trials_per_cell=1)
    df = R.load_results(root)
    assert len(df) == 1 and df.loc[0, "domain"] == "books" and df.loc[0, "rate"] == 1.0 and df.loc[0, "seed"] == 0
    (root / "trials" / "broken.json").write_text("{not json")
    with pytest.raises(ResultsError, match="broken.json is damaged"):
        R.load_results(root)


def test_cell_selects_best_dev_then_earliest(sweep):
    a = sweep.cell("books", 0.1, OURS, 0)
    sweep.trial(a, dev=0.80, test=0.95)
    best = sweep.trial(a, dev=0.90, test=0.70)  # best dev wins even with the worse test accuracy
    sweep.trial(a, dev=0.95)                     # better dev but unfinished: not eligible
    b = sweep.cell("dvd", 0.1, OURS, 0)
    late = sweep.trial(b, dev=0.85, test=0.60, start=1_900_000_100)
    early = sweep.trial(b, dev=0.85, test=0.65, start=1_900_000_000)
    c = R.cells(R.load_results(sweep.write(trials_per_cell=3))).set_index("domain")
    assert c.loc["books", "trial_id"] == best and c.loc["books", "test_acc"] == 0.70
    assert c.loc["books", "status"] == "ok" and c.loc["books", "n_done"] == 2
    assert c.loc["dvd", "trial_id"] == early != late


def test_improvement_rate_by_hand(sweep, tmp_path):
    accs = {  # (domain, seed): (base, ours)
        ("books", 0): (0.80, 0.88), ("books", 1): (0.50, 0.60),  # +0.10, +0.20
        ("dvd", 0): (0.50, 0.45), ("dvd", 1): (0.60, 0.66),      # -0.10, +0.10
    }
    for (dom, seed), (b, o) in accs.items():
        sweep.trial(sweep.cell(dom, 0.1, BASE, seed), dev=0.5, test=b)
        sweep.trial(sweep.cell(dom, 0.1, OURS, seed), dev=0.5, test=o)
    out = R.scarcity_curve(R.load_results(sweep.write(trials_per_cell=1)), tmp_path / "s.png").set_index("domain")
    assert out.loc["books", "improvement"] == pytest.approx(0.15)
    assert out.loc["books", "improvement_std"] == pytest.approx(0.0707107, abs=1e-6)  # sample std of .1, .2
    assert out.loc["dvd", "improvement"] == pytest.approx(0.0)
    assert out.loc["dvd", "improvement_std"] == pytest.approx(0.1414214, abs=1e-6)
    # mean over domains per seed (0.0 and 0.15), then over seeds
    assert out.loc["mean", "improvement"] == pytest.approx(0.075)
    assert out.loc["mean", "improvement_std"] == pytest.approx(0.1060660, abs=1e-6)
    assert (out["n_seeds"] == 2).all() and (out["rate"] == 0.1).all()
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


def test_costs_split_and_sum_to_total(sweep):
    c1, c2, c3 = (sweep.cell(d, 1.0, OURS, 0) for d in ("books", "dvd", "kitchen"))
    sweep.trial(c1, dev=0.8, test=0.8, cpu=10.0)
    sweep.trial(c1, dev=0.7, test=0.7, cpu=20.0)
    sweep.trial(c2, dev=0.8, test=0.8, cpu=5.0)
    costs = {"teachers": {"t_meta": {"wall_s": 50.0, "cpu_s": 100.0, "gpu_s": 0.0, "cells": [c1, c2]},
                          "t_unused": {"wall_s": 1.0, "cpu_s": 7.0, "gpu_s": 0.0, "cells": [c3]}},  # c3: no trials
             "caches": {"k1": {"wall_s": 6.0, "cpu_s": 30.0, "gpu_s": 0.0, "cells": [c1]}}}
    df = R.load_results(sweep.write(costs))
    assert sorted(df["teacher_cpu_s"]) == [25.0, 25.0, 50.0]  # 100 / 2 cells, then / the cell's trials
    assert sorted(df["cache_cpu_s"]) == [0.0, 15.0, 15.0]
    total = R.total_cost(df)
    assert total["cpu_s"] == pytest.approx(35.0 + 100.0 + 7.0 + 30.0)
    assert (df["cpu_s"] + df["teacher_cpu_s"] + df["cache_cpu_s"]).sum() == pytest.approx(165.0)  # 7 s: no row
    c = R.cells(df).set_index("domain")
    assert c.loc["books", "cpu_s"] == 30.0 and c.loc["books", "teacher_cpu_s"] == 50.0


def amazon_table_sweep(sweep: Sweep) -> Path:
    for seed, bump in ((0, 0.0), (1, 0.02)):
        for dom, acc in zip(R.AMAZON_COLUMNS, (0.80, 0.82, 0.84, 0.86)):
            sweep.trial(sweep.cell(dom, 1.0, BASE, seed), dev=0.5, test=acc + bump)
            sweep.trial(sweep.cell(dom, 1.0, OURS, seed), dev=0.5, test=acc + 0.04 + bump)
            sweep.trial(sweep.cell(dom, 0.1, OURS, seed), dev=0.5, test=0.5)  # a smaller rate: not in the table
    return sweep.write(trials_per_cell=1)


def test_paper_table(sweep):
    md = R.paper_table(R.load_results(amazon_table_sweep(sweep)))
    lines = md.splitlines()
    assert lines[0] == "| method | books | dvd | electronics | kitchen | mean |"
    row = next(ln for ln in lines if ln.startswith(f"| {OURS}"))
    # books: seeds 0.84 and 0.86 -> 85.0 ± 1.4, beside the paper's 91.5; mean: 0.87 and 0.89 -> 88.0 ± 1.4 (89.4)
    assert "| 85.0 ± 1.4 (91.5) |" in row and row.endswith("| 88.0 ± 1.4 (89.4) |")
    assert "Meta-KD" in row
    assert any(ln.startswith(f"| {BASE} = single -> TinyBERT-KD | 81.0 ± 1.4 (83.4)") for ln in lines)
    assert any("BERT-base mix (paper only)" in ln and "(89.5)" in ln for ln in lines)
    assert "sample rate 1" in md and "MiniLM-L6" in md and "not BERT-base" in md
    # a subset of the domains: the paper's per-domain numbers stay, its mean (over all 4) is not shown
    c = R.cells(R.load_results(sweep.root))
    sub = R.paper_table(c[c["domain"] == "books"]).splitlines()
    assert sub[0] == "| method | books | mean |"
    assert next(ln for ln in sub if ln.startswith(f"| {OURS}")).endswith("| 85.0 ± 1.4 (91.5) | 85.0 ± 1.4 |")


def test_table_notes_from_config_and_a_non_local_filesystem(sweep, tmp_path):
    """config.yaml names the teacher and exclude_target; a Storage on a non-local pyarrow filesystem (as for
    s3:// or gs://) reads the sweep and receives the report."""
    import pyarrow.fs as pafs

    from metakd_ray.storage import Storage

    root = amazon_table_sweep(sweep)
    (root / "config.yaml").write_text("data: {dataset: amazon}\nmodel: {teacher: my/bert}\n"
                                      "teacher: {exclude_target: true}\n")
    remote = Storage("sweeps/demo", pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    assert not remote.is_local
    written = R.report(remote)
    md = (root / "report" / "table.md").read_text()
    assert written["table.md"] == "sweeps/demo/report/table.md"
    assert "`my/bert`" in md and "exclude_target" in md and "(91.5)" in md
    assert (root / "report" / "scarcity.png").read_bytes()[:8] == PNG_MAGIC


def test_paper_table_mnli_means():
    rows = [{"cell": f"{g}|1|{m}|0|-", "domain": g, "rate": 1.0, "method": m, "seed": 0, "gamma2": float("nan"),
             "status": "ok", "test_acc": 0.75, "n_trials": 1} for g in R.MNLI_COLUMNS for m in (BASE, OURS)]
    md = R.paper_table(pd.DataFrame(rows))
    assert md.splitlines()[0] == "| method | fiction | government | slate | telephone | travel | mean |"
    assert "75.0 (79.3)" in md and "75.0 (80.4)" in md and "— (84.4)" in md


def test_report_writes_files_and_gamma2_curve(sweep, tmp_path):
    for g2, acc in ((0.0, 0.80), (0.2, 0.86), (1.0, 0.82)):
        for seed in (0, 1):
            sweep.trial(sweep.cell("books", 1.0, OURS, seed, gamma2=g2), dev=0.5, test=acc + 0.01 * seed)
    written = R.report(sweep.write(trials_per_cell=1))
    assert set(written) == {"results.csv", "cells.csv", "per_seed.csv", "table.md", "scarcity.png", "gamma2.png"}
    seeds = pd.read_csv(written["per_seed.csv"])
    assert list(seeds.columns) == list(R.PER_SEED_COLUMNS) and len(seeds) == 6
    assert set(seeds["method"]) == {"meta_kd"} and set(seeds["teacher"]) == {"meta"}
    assert seeds.set_index(["gamma2", "seed"]).loc[(0.2, 1), "test_acc"] == pytest.approx(0.87)
    for name, p in written.items():
        assert Path(p).parent == sweep.root / "report" and Path(p).stat().st_size > 0
        if name.endswith(".png"):
            assert Path(p).read_bytes()[:8] == PNG_MAGIC
    assert len(pd.read_csv(written["results.csv"])) == 6
    curve = R.gamma2_curve(R.load_results(sweep.root)).set_index(["domain", "gamma2"])
    assert curve.loc[("books", 0.2), "acc"] == pytest.approx(0.865)
    assert curve.loc[("mean", 0.2), "acc"] == pytest.approx(0.865) and curve.loc[("books", 0.2), "n_seeds"] == 2
    assert "(γ2=0.2)" in Path(written["table.md"]).read_text()


def test_cli_formats_and_exit_codes(sweep, tmp_path, capsys):
    run = amazon_table_sweep(sweep)
    assert R.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| method |") and f"wrote {run / 'report' / 'table.md'}" in out

    (run / "tune").mkdir()
    assert R.main([str(run / "tune"), "--json"]) == 0  # the tune/ subdir works too
    cap = capsys.readouterr()
    records = json.loads(cap.out)
    assert len(records) == 24 and {"cell", "status", "test_acc", "n_trials"} <= set(records[0])
    assert "wrote" in cap.err

    assert R.main([str(run), "--csv"]) == 0
    assert len(pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))) == 24

    assert R.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no such directory" in err[0]
    (tmp_path / "empty").mkdir()
    assert R.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_module_entry_point_without_ray(sweep):
    """`python -m metakd_ray.results` works, and reading a sweep never imports ray."""
    run = amazon_table_sweep(sweep)
    code = ("import sys, runpy; sys.argv = ['x', sys.argv[1], '--csv'];\n"
            "try:\n    runpy.run_module('metakd_ray.results', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cell,") and "wrote" in r.stderr


def test_per_seed_rows_of_students_and_their_teachers():
    """docs/results/*.csv's format: a student row per finished cell (its dev-selected trial), a teacher row per
    teacher and target domain (the manifest's test accuracy on that domain); pending cells and teachers without a
    manifest give no row."""
    plan = Plan("demo", 1, (Cell("books", 0.5, BASE, 0, teacher_key="t-single"),
                            Cell("books", 0.5, OURS, 0, teacher_key="t-meta"),
                            Cell("dvd", 0.5, OURS, 0, teacher_key="t-meta"),
                            Cell("dvd", 0.5, "none/finetune", 0))).to_json()
    cell_df = pd.DataFrame([
        {"cell": c["cell"], "domain": c["domain"], "rate": 0.5, "method": c["method"], "seed": 0,
         "gamma2": float("nan"), "status": st, "dev_acc": dev, "test_acc": test, "n_trials": 1}
        for c, (st, dev, test) in zip(plan["cells"], [("ok", 0.8, 0.78), ("ok", 0.9, 0.88), ("ok", 0.85, 0.84),
                                                      ("pending", float("nan"), float("nan"))])])
    cell_df.attrs["plan"] = plan
    teachers = pd.DataFrame([{"teacher_key": "t-single", "kind": "single", "best_dev": 0.81, "test_acc_books": 0.79,
                              "test_acc_dvd": float("nan")},
                             {"teacher_key": "t-meta", "kind": "meta", "best_dev": 0.9, "test_acc_books": 0.91,
                              "test_acc_dvd": 0.87}])
    rows = R.per_seed(cell_df, teachers)
    got = {(r.teacher, r.method, r.domain): (r.dev_acc, r.test_acc) for r in rows.itertuples()}
    assert got == {("single", "tinybert_kd", "books"): (0.8, 0.78), ("meta", "meta_kd", "books"): (0.9, 0.88),
                   ("meta", "meta_kd", "dvd"): (0.85, 0.84), ("single", "teacher", "books"): (0.81, 0.79),
                   ("meta", "teacher", "books"): (0.9, 0.91), ("meta", "teacher", "dvd"): (0.9, 0.87)}
    assert (rows["sample_rate"] == 0.5).all() and (rows["seed"] == 0).all()
    assert rows["test_acc"].between(0, 1).all()

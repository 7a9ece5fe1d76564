"""Results extras: the paired bootstrap (``results.bootstrap``) against a naive loop reference and by its properties,
our teachers' manifests (``results.teachers``), table.md with teacher rows and the compression ratio, bootstrap.md in
the report, and a smoke run of ``benchmarks/latency.py``'s core on a tiny random BERT.

Sweep directories are built as in tests/test_results.py (its ``Sweep`` helper), under ``<root>/sweeps/demo`` so that
``<root>/teachers/<key>/manifest.json`` is where the teacher job writes it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_results import Sweep, amazon_table_sweep

from metakd_ray import results as R
from metakd_ray.results import bootstrap as B
from metakd_ray.results.teachers import load_teachers
from metakd_ray.sweep.plan import Cell, Plan

REPO = Path(__file__).resolve().parents[1]
BASE, OURS = "single/tinybert_kd", "meta/meta_kd"


# ----------------------------------------------------------------------------------------------------------
# Synthetic predictions
# ----------------------------------------------------------------------------------------------------------


def predictions(ids, labels, correct, rng) -> pd.DataFrame:
    """Predictions of a 2-class model: ``pred`` = label where ``correct``, else the other class; rows shuffled."""
    labels, correct = np.asarray(labels), np.asarray(correct, dtype=bool)
    df = pd.DataFrame({"id": list(ids), "label": labels, "pred": np.where(correct, labels, 1 - labels)})
    return df.iloc[rng.permutation(len(df))].reset_index(drop=True)


def synthetic(sizes=(7, 11, 5), acc_a=0.8, acc_b=0.6, seed=0, identical=False):
    """Cells of methods a and b (one per size; same domain/rate/seed keys) and their predictions by trial key.
    b has one extra example per cell that a lacks: pairing by id must drop it."""
    rng = np.random.default_rng(seed)
    rows, preds = [], {}
    for i, m in enumerate(sizes):
        ids = [f"d{i}/{j:03d}" for j in range(m)]
        labels = rng.integers(0, 2, m)
        ca = rng.random(m) < acc_a
        cb = ca if identical else rng.random(m) < acc_b
        for method, correct, extra in (("a", ca, False), ("b", cb, True)):
            key = f"{method}-{i}"
            p = predictions(ids, labels, correct, rng)
            if extra:
                p = pd.concat([p, pd.DataFrame({"id": [f"d{i}/extra"], "label": [0], "pred": [1]})])
            preds[key] = p
            rows.append({"cell": f"{i}|{method}", "domain": f"d{i}", "rate": 1.0, "method": method, "seed": 0,
                         "gamma2": math.nan, "status": "ok", "trial_key": key})
    return pd.DataFrame(rows), preds


def naive_bootstrap(cells_df, preds, n, seed):
    """The reference: pairs and d by plain loops and dicts; the same index draws (one (n, m) per cell, cells in
    a's order); every replicate's sum by a Python loop over replicates and examples; percentiles by hand."""
    rng = np.random.default_rng(seed)
    a_cells = [r for _, r in cells_df.iterrows() if r["method"] == "a"]
    b_cells = [r for _, r in cells_df.iterrows() if r["method"] == "b"]
    diffs = []
    for ra in a_cells:
        rb = next(r for r in b_cells if (r["domain"], r["rate"], r["seed"]) == (ra["domain"], ra["rate"], ra["seed"]))
        pa_, pb_ = preds[ra["trial_key"]], preds[rb["trial_key"]]
        b_by_id = {i: (lab, p) for i, lab, p in zip(pb_["id"], pb_["label"], pb_["pred"])}
        d = [int(p == lab) - int(b_by_id[i][1] == b_by_id[i][0])
             for i, lab, p in zip(pa_["id"], pa_["label"], pa_["pred"]) if i in b_by_id]
        diffs.append(d)
    total = sum(len(d) for d in diffs)
    sums = [0.0] * n
    for d in diffs:
        idx = rng.integers(0, len(d), size=(n, len(d)))
        for b in range(n):
            for j in range(len(d)):
                sums[b] += d[idx[b, j]]
    boot = sorted(s / total for s in sums)

    def pct(q):  # numpy's default (linear) percentile
        pos = q / 100 * (n - 1)
        lo = math.floor(pos)
        return boot[lo] + (boot[min(lo + 1, n - 1)] - boot[lo]) * (pos - lo)

    observed = sum(sum(d) for d in diffs) / total
    return {"diff": observed, "boot_mean": sum(boot) / n, "low": pct(2.5), "high": pct(97.5), "n_cells": len(diffs),
            "n_examples": total}


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------


def test_bootstrap_matches_a_naive_loop_and_is_reproducible():
    cells_df, preds = synthetic()
    got = B.paired_bootstrap(cells_df, "a", "b", n=300, seed=3, predictions=preds.get)
    want = naive_bootstrap(cells_df, preds, n=300, seed=3)
    assert got["n_cells"] == 3 and got["n_examples"] == 7 + 11 + 5  # the extra ids of b are not paired
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert B.paired_bootstrap(cells_df, "a", "b", n=300, seed=3, predictions=preds.get) == got  # same seed
    other = B.paired_bootstrap(cells_df, "a", "b", n=300, seed=4, predictions=preds.get)
    assert other["diff"] == got["diff"] and (other["low"], other["high"]) != (got["low"], got["high"])


def test_identical_predictions_give_zero_and_a_zero_interval():
    cells_df, preds = synthetic(identical=True)
    r = B.paired_bootstrap(cells_df, "a", "b", n=500, predictions=preds.get)
    assert (r["diff"], r["low"], r["high"], r["boot_mean"]) == (0.0, 0.0, 0.0, 0.0)


def test_a_known_difference_is_inside_the_interval_with_the_paired_standard_error():
    """Per cell, a is right on exactly 80 % and b on exactly 70 % of the examples (independently placed): the
    observed difference is 0.10 exactly, inside the interval, and the replicates' spread is the stratified
    standard error sqrt(sum_c m_c var_c) / N."""
    rng = np.random.default_rng(1)
    rows, preds, diffs = [], {}, []
    for i, m in enumerate((200, 300, 500)):
        ids, labels = [f"c{i}/{j}" for j in range(m)], rng.integers(0, 2, m)
        ca, cb = rng.permutation(m) < 0.8 * m, rng.permutation(m) < 0.7 * m
        diffs.append(ca.astype(int) - cb.astype(int))
        for method, correct in (("a", ca), ("b", cb)):
            preds[f"{method}{i}"] = predictions(ids, labels, correct, rng)
            rows.append({"domain": f"c{i}", "rate": 0.1, "seed": 0, "gamma2": math.nan, "method": method,
                         "status": "ok", "trial_key": f"{method}{i}"})
    r = B.paired_bootstrap(pd.DataFrame(rows), "a", "b", n=4000, seed=0, predictions=preds.get)
    assert r["diff"] == pytest.approx(0.10) and r["low"] < 0.10 < r["high"]
    se = math.sqrt(sum(len(d) * d.var() for d in diffs)) / sum(len(d) for d in diffs)
    boot = B.stratified_bootstrap(diffs, n=4000, seed=0)
    assert boot.std() == pytest.approx(se, rel=0.08)
    assert r["high"] - r["low"] == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_predictions_written_by_a_trial_are_read_back(tmp_path):
    from metakd_ray.storage import Storage
    from metakd_ray.sweep.students import PREDICTIONS_SUFFIX, write_predictions
    from metakd_ray.training import Predictions

    st = Storage(str(tmp_path))
    assert not B.has_predictions(st) and B.read_predictions(st, "k1") is None
    p = Predictions(ids=["books/positive/0001", "dvd/negative/0002"], labels=np.array([1, 0]),
                    preds=np.array([1, 1]), probs=np.array([[0.2, 0.8], [0.4, 0.6]], np.float32),
                    domain_ids=np.array([0, 1]))
    write_predictions(st, "k1", p)
    assert PREDICTIONS_SUFFIX == B.PREDICTIONS_SUFFIX and B.has_predictions(st)
    got = B.read_predictions(st, "k1")
    assert got.to_dict("list") == {"id": p.ids, "label": [1, 0], "pred": [1, 1]}


def test_versus_baselines_pairs_a_baseline_with_each_gamma2_and_skips_unpaired_methods():
    rng = np.random.default_rng(2)
    rows, preds = [], {}
    ids, labels = [f"x/{j}" for j in range(40)], rng.integers(0, 2, 40)
    for method, g2, acc in ((OURS, 0.2, 0.9), (OURS, 0.5, 0.7), (BASE, None, 0.6), ("mix/tinybert_kd", None, 0.6)):
        for seed in (0, 1):
            key = f"{method}-{g2}-{seed}"
            if method != "mix/tinybert_kd":  # mix: no predictions written (an older trial)
                preds[key] = predictions(ids, labels, rng.random(40) < acc, rng)
            rows.append({"domain": "books", "rate": 1.0, "seed": seed, "gamma2": np.nan if g2 is None else g2,
                         "method": method, "status": "ok", "trial_key": key})
    t = B.versus_baselines(pd.DataFrame(rows), n=200, predictions=preds.get)
    assert list(t.columns) == ["baseline", "gamma2", "diff", "low", "high", "boot_mean", "n_cells", "n_examples"]
    assert t[["baseline", "gamma2"]].values.tolist() == [[BASE, 0.2], [BASE, 0.5]]
    assert (t["n_cells"] == 2).all() and (t["n_examples"] == 80).all()
    assert t.loc[0, "diff"] > t.loc[1, "diff"]
    md = B.bootstrap_markdown(t, n=200)
    assert "| single/tinybert_kd | 0.2 |" in md and "95 % interval" in md


# ----------------------------------------------------------------------------------------------------------
# Sweeps with teachers, sizes and predictions
# ----------------------------------------------------------------------------------------------------------


class TeacherSweep(Sweep):
    """``Sweep`` whose cells name their teacher (plan.json ``teachers`` and each cell's ``teacher_key``, as
    ``make_plan`` writes them), whose final records carry ``n_params``/``teacher_params``, and whose trials can
    write predictions files."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.teachers: dict[str, dict] = {}

    def cell(self, domain, rate, method, seed, gamma2=None) -> str:
        kind = method.split("/")[0]
        cid = super().cell(domain, rate, method, seed, gamma2)
        if kind != "none":
            key = f"{kind}-{domain if kind == 'single' else 'all'}-{rate:g}-{seed}"
            self.plan[-1] = dataclasses.replace(self.plan[-1], teacher_key=key)
            self.teachers.setdefault(key, {"key": key, "kind": kind, "rate": rate, "seed": seed,
                                           "domains": [domain] if kind == "single" else list(R.AMAZON_COLUMNS)})
        return cid

    def finished(self, cid, *, test, n_params=None, teacher_params=None, preds=None, **kw) -> str:
        """A finished trial; its final record gets the sizes, and ``preds`` (a DataFrame) is written as its
        predictions file. Returns its trial key."""
        tid = self.trial(cid, dev=kw.pop("dev", 0.5), test=test, **kw)
        rec = next(r for r in self.store.records() if r.trial_id == tid)
        sizes = {k: v for k, v in (("n_params", n_params), ("teacher_params", teacher_params)) if v is not None}
        self.store.write(dataclasses.replace(rec, final={**rec.final, **sizes}))
        if preds is not None:
            table = pa.table({"id": pa.array(preds["id"].astype(str).tolist(), pa.string()),
                              "label": pa.array(preds["label"].tolist(), pa.int64()),
                              "pred": pa.array(preds["pred"].tolist(), pa.int64()),
                              "probs": pa.array([[0.5, 0.5]] * len(preds), pa.list_(pa.float32()))})
            pq.write_table(table, self.root / "trials" / f"{rec.key}{B.PREDICTIONS_SUFFIX}")
        return rec.key

    def write(self, costs=None, trials_per_cell=1):
        plan = Plan("demo", trials_per_cell, tuple(self.plan), tuple(self.teachers.values()))
        (self.root / "plan.json").write_text(json.dumps(plan.to_json()))
        return self.root


def manifest(root: Path, key: str, test: dict | str, best_dev=0.9) -> None:
    path = root / "teachers" / key / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(test if isinstance(test, str) else json.dumps({"key": key, "test_accuracy": test,
                                                                   "best_dev": best_dev, "best_epoch": 2}))


@pytest.fixture
def tsweep(tmp_path) -> TeacherSweep:
    return TeacherSweep(tmp_path / "sweeps" / "demo")


def test_teacher_manifests_missing_and_damaged_give_nan_rows_and_one_warning_each(tsweep, tmp_path):
    for dom in ("books", "dvd", "electronics"):
        tsweep.cell(dom, 1.0, BASE, 0)
    tsweep.cell("books", 1.0, OURS, 0)
    root = tsweep.write()
    manifest(tmp_path, "single-books-1-0", {"books": 0.85, "mean": 0.85})
    manifest(tmp_path, "single-dvd-1-0", '{"test_accuracy": {"dvd": 0.8')               # cut short
    manifest(tmp_path, "meta-all-1-0", {"books": "high", "mean": 0.9})                   # not a number
    # single-electronics-1-0: no manifest (not trained yet)
    warnings: list[str] = []
    t = load_teachers(root, warn=warnings.append).set_index("teacher_key")
    assert list(t.index) == ["single-books-1-0", "single-dvd-1-0", "single-electronics-1-0", "meta-all-1-0"]
    assert t.loc["single-books-1-0", "status"] == "ok" and t.loc["single-books-1-0", "test_acc_books"] == 0.85
    assert t.loc["single-books-1-0", "best_dev"] == 0.9 and t.loc["single-books-1-0", "kind"] == "single"
    assert t["status"].tolist() == ["ok", "damaged", "missing", "damaged"]
    assert t.loc[["single-dvd-1-0", "single-electronics-1-0", "meta-all-1-0"], "test_acc_mean"].isna().all()
    assert t.loc["meta-all-1-0", "domains"] == "books,dvd,electronics,kitchen"
    assert len(warnings) == 2 and all("\n" not in w and "manifest.json is damaged" in w for w in warnings)
    assert "single-dvd-1-0" in warnings[0] and "meta-all-1-0" in warnings[1]
    # a sweep directory outside a sweeps/ folder: no teachers found, no crash
    assert load_teachers(root, root=tmp_path / "elsewhere")["status"].eq("missing").all()


def test_table_shows_our_teachers_and_the_compression_ratio(tsweep, tmp_path, capsys):
    for seed, bump in ((0, 0.0), (1, 0.02)):
        for dom, acc in zip(R.AMAZON_COLUMNS, (0.80, 0.82, 0.84, 0.86)):
            tsweep.finished(tsweep.cell(dom, 1.0, BASE, seed), test=acc + bump, n_params=17_000_000,
                            teacher_params=22_700_000)
            tsweep.finished(tsweep.cell(dom, 1.0, OURS, seed), test=acc + 0.04 + bump, n_params=17_000_000,
                            teacher_params=23_500_000)
            manifest(tmp_path, f"single-{dom}-1-{seed}", {dom: acc + 0.06 + bump, "mean": acc + 0.06 + bump})
        manifest(tmp_path, f"meta-all-1-{seed}", {**dict(zip(R.AMAZON_COLUMNS, (0.9, 0.88, 0.86, 0.84))),
                                                  "mean": 0.87})
    manifest(tmp_path, "single-kitchen-1-1", "{damaged")
    root = tsweep.write()
    written = R.report(root)
    assert "teachers.csv" in written and "bootstrap.md" not in written  # no predictions: no bootstrap, no word
    assert capsys.readouterr().err.count("warning:") == 1  # the damaged manifest, once
    md = Path(written["table.md"]).read_text()
    single = next(ln for ln in md.splitlines() if ln.startswith("| single teacher (ours) = BERT-base single"))
    # books: 0.86 and 0.88 -> 87.0 ± 1.4 beside the paper's 87.9; kitchen: seed 1's manifest is damaged -> 92.0
    assert "| 87.0 ± 1.4 (87.9) |" in single and "| 92.0 (90.6) |" in single
    assert single.endswith("| 89.0 (87.9) |")  # the mean over seeds with every domain: seed 0 only
    meta = next(ln for ln in md.splitlines() if ln.startswith("| meta-teacher (ours) = meta-teacher"))
    assert meta == ("| meta-teacher (ours) = meta-teacher | 90.0 ± 0.0 (92.5) | 88.0 ± 0.0 (87.0) | 86.0 ± 0.0 (91.1) "
                    "| 84.0 ± 0.0 (89.2) | 87.0 ± 0.0 (89.9) |")
    assert "BERT-base mix (paper only)" in md and "Teacher rows marked (ours)" in md
    assert any(ln.startswith(f"| {OURS} = Meta-KD | 85.0 ± 1.4 (91.5)") for ln in md.splitlines())

    c = R.cells(R.load_results(root))  # the selected trials' n_params and teacher_params, from their records
    table = R.paper_table(c, load_teachers(root, warn=lambda _: None))
    assert table == md
    line = next(ln for ln in table.splitlines() if ln.startswith("Compression"))
    assert f"{BASE} 1.34× (22.7M / 17.0M)" in line and f"{OURS} 1.38× (23.5M / 17.0M)" in line and "7.5×" in line
    same = c.assign(teacher_params=22_700_000.0)
    assert "Compression (teacher parameters / student parameters): 1.34× (22.7M / 17.0M);" in R.paper_table(same)
    assert "Compression" not in R.paper_table(c.assign(n_params=np.nan))  # no sizes (older trials): no line
    assert "Compression" not in R.paper_table(c.drop(columns=["n_params", "teacher_params"]))


def test_report_writes_bootstrap_md_from_predictions_and_warns_on_a_damaged_file(tsweep, tmp_path, capsys):
    rng = np.random.default_rng(0)
    keys = {}
    for dom in ("books", "dvd"):
        ids, labels = [f"{dom}/{j}" for j in range(50)], rng.integers(0, 2, 50)
        for method, acc in ((BASE, 0.7), (OURS, 0.9), ("none/finetune", 0.6)):
            keys[(dom, method)] = tsweep.finished(tsweep.cell(dom, 1.0, method, 0), test=acc,
                                                  preds=predictions(ids, labels, rng.random(50) < acc, rng))
    tsweep.cell("kitchen", 1.0, OURS, 0)  # planned, never run
    root = tsweep.write()
    written = R.report(root)
    text = Path(written["bootstrap.md"]).read_text()
    assert text.startswith(f"## {OURS} vs each baseline: paired bootstrap")
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "baseline" not in ln]
    assert [r.split(" | ")[0] for r in rows] == ["| none/finetune", f"| {BASE}"]
    assert all(r.endswith("| 2 | 100 |") for r in rows)

    c = R.cells(R.load_results(root))
    direct = B.paired_bootstrap(c, OURS, BASE, n=2000, seed=0)
    assert f"{100 * direct['diff']:+.2f} | [{100 * direct['low']:+.2f}, {100 * direct['high']:+.2f}]" in rows[1]

    (root / "trials" / f"{keys[('dvd', BASE)]}{B.PREDICTIONS_SUFFIX}").write_bytes(b"PAR1 not parquet")
    capsys.readouterr()
    written = R.report(root)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "is damaged" in err[0]
    base_row = next(ln for ln in Path(written["bootstrap.md"]).read_text().splitlines() if ln.startswith(f"| {BASE}"))
    assert base_row.endswith("| 1 | 50 |")  # the damaged file's pair is left out


def test_older_sweeps_without_predictions_or_teachers_report_as_before(tmp_path):
    written = R.report(amazon_table_sweep(Sweep(tmp_path / "sweeps" / "demo")))
    assert set(written) == {"results.csv", "cells.csv", "per_seed.csv", "table.md", "scarcity.png"}
    md = Path(written["table.md"]).read_text()
    assert "(ours)" not in md and "Compression" not in md and "Teacher rows are the paper's." in md


def test_teacher_scores_follow_the_cells_teacher_keys():
    cells = (Cell("books", 1.0, OURS, 0, 0.2, teacher_key="m"), Cell("books", 1.0, OURS, 0, 0.5, teacher_key="m"),
             Cell("books", 1.0, "meta/tinybert_kd", 0, teacher_key="m"),
             Cell("dvd", 1.0, OURS, 0, 0.2, teacher_key="m"), Cell("dvd", 1.0, "none/finetune", 0))
    teachers = pd.DataFrame({"teacher_key": ["m"], "test_acc_books": [0.9], "test_acc_mean": [0.9]})
    s = R.teacher_scores(teachers, Plan("p", 1, cells).to_json())
    assert s[["kind", "domain", "teacher_key"]].values.tolist() == [["meta", "books", "m"], ["meta", "dvd", "m"]]
    assert s["test_acc"].iloc[0] == 0.9 and math.isnan(s["test_acc"].iloc[1])  # no test accuracy on dvd


# ----------------------------------------------------------------------------------------------------------
# benchmarks/latency.py
# ----------------------------------------------------------------------------------------------------------


def test_latency_benchmark_core_runs_on_a_tiny_model(tmp_path, monkeypatch):
    import torch
    from toy import toy_tokenizer

    from metakd_ray import config as C
    from metakd_ray import models as M

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # latency.py imports _env from there
    spec = importlib.util.spec_from_file_location("latency_bench", REPO / "benchmarks" / "latency.py")
    latency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(latency)
    tok = toy_tokenizer()
    encoder = M.random_encoder(vocab_size=len(tok), max_position=32, num_layers=2, seed=0)
    cfg = C.from_dict({}, ["model.student.num_layers=1", "data.max_length=16"])
    texts = ["good alpha1 beta2", "awful gamma3", "fine beta1 beta2 alpha0 bad", "bad"] * 3
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(1)
        res = latency.measure(cfg, encoder, tok, texts, repeats=5, budget_s=1e-9, batch_sizes=(1, 4), per_round=4,
                              max_length=16, workdir=tmp_path, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert time.perf_counter() - t0 < 30
    assert (res["teacher_layers"], res["student_layers"]) == (2, 1)
    assert res["compression"] == res["teacher_params"] / res["student_params"] > 1
    assert res["teacher_mb"] > res["student_mb"] > 0
    for key in ("b1_fp32", "b1_bf16", "b4_fp32", "b4_bf16"):
        assert res[f"speedup_{key}"] > 0 and res[f"student_throughput_{key}"] > 0
        assert len(res["settings"][key]["teacher"]["round_s"]) == 3  # the budget cut 5 repetitions to 3
    assert res["settings"]["b4_fp32"]["examples_per_round"] == 8  # two batches of 4 after the 4 single reviews
    assert "teacher" in latency.table(res) and not list(tmp_path.iterdir())  # the exports are cleaned up

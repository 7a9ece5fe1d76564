"""``metakd_ray.results.publish`` and ``results.paper``: the summary's tables, improvement rate and targets on
hand-made per-seed CSVs with known accuracies (2 domains, 2 seeds), and ``export`` on a copy of the smoke run (skipped
where there is none). Fast, no Ray."""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest

from metakd_ray.results import paper, publish
from metakd_ray.results import cells, load_results, load_teachers, per_seed
from metakd_ray.results.tables import PER_SEED_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SMOKE_ROOT = REPO / "runs" / "smoke"  # as tests/test_smoke_target.py: the README's main command writes it
SMOKE = SMOKE_ROOT / "sweeps" / "smoke"

# (teacher, method) -> {(domain, seed): test_acc}, at rate 1.0
AMAZON = {
    ("meta", "teacher"): {("books", 0): .90, ("books", 1): .92, ("dvd", 0): .86, ("dvd", 1): .88},
    ("mix", "teacher"): {("books", 0): .89, ("books", 1): .89, ("dvd", 0): .85, ("dvd", 1): .87},
    ("meta", "meta_kd"): {("books", 0): .88, ("books", 1): .90, ("dvd", 0): .84, ("dvd", 1): .86},
    ("single", "tinybert_kd"): {("books", 0): .87, ("books", 1): .89, ("dvd", 0): .83, ("dvd", 1): .85},
    ("meta", "tinybert_kd"): {("books", 0): .88, ("books", 1): .89, ("dvd", 0): .84, ("dvd", 1): .85},
}
# rate -> (teacher, method) -> {(domain, seed): test_acc}
SCARCITY = {
    0.01: {("meta", "meta_kd"): {("books", 0): .70, ("books", 1): .72, ("dvd", 0): .66, ("dvd", 1): .60},
           ("single", "tinybert_kd"): {("books", 0): .60, ("books", 1): .64, ("dvd", 0): .62, ("dvd", 1): .58}},
    0.1: {("meta", "meta_kd"): {("books", 0): .78, ("books", 1): .76, ("dvd", 0): .74, ("dvd", 1): .70},
          ("single", "tinybert_kd"): {("books", 0): .80, ("books", 1): .78, ("dvd", 0): .75, ("dvd", 1): .72}},
    1.0: {("meta", "meta_kd"): {("books", 0): .88, ("books", 1): .90, ("dvd", 0): .84, ("dvd", 1): .86},
          ("single", "tinybert_kd"): {("books", 0): .87, ("books", 1): .89, ("dvd", 0): .83, ("dvd", 1): .85}},
}


def _rows(by_key: dict, rate: float, gamma2: float = float("nan")) -> list[dict]:
    return [{"teacher": t, "method": m, "domain": d, "sample_rate": rate, "seed": s,
             "gamma2": float("nan") if m == "teacher" else gamma2, "dev_acc": acc, "test_acc": acc}
            for (t, m), accs in by_key.items() for (d, s), acc in accs.items()]


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(PER_SEED_COLUMNS))


def amazon() -> pd.DataFrame:
    return _frame(_rows(AMAZON, 1.0))


def scarcity() -> pd.DataFrame:
    return _frame([r for rate, keys in SCARCITY.items() for r in _rows(keys, rate)])


def _dmean(by_key: dict, key: tuple, seed: int) -> float:
    vals = [acc for (d, s), acc in by_key[key].items() if s == seed]
    return sum(vals) / len(vals)


def _naive_improvement(rate: float) -> tuple[float, float]:
    """By hand: per seed the domain mean of (ours - base) / base; then mean and sample std over seeds (fractions)."""
    keys = SCARCITY[rate]
    per_seed = []
    for seed in (0, 1):
        r = [(keys["meta", "meta_kd"][d, seed] - keys["single", "tinybert_kd"][d, seed])
             / keys["single", "tinybert_kd"][d, seed] for d in ("books", "dvd")]
        per_seed.append(sum(r) / len(r))
    return statistics.mean(per_seed), statistics.stdev(per_seed)


def _cells(md: str, label: str) -> list[str]:
    """The cells of the markdown table row whose first cell is ``label``."""
    for line in md.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if parts and parts[0] == label:
            return parts[1:]
    raise AssertionError(f"no row {label!r} in:\n{md}")


def test_amazon_table_cells_are_mean_and_std_over_seeds_beside_the_papers():
    md = "\n".join(paper.main_table(amazon(), "amazon"))
    # meta teacher: books .90/.92 -> 91.0 ± 1.4; dvd .86/.88 -> 87.0 ± 1.4; domain means per seed .88/.90 -> 89.0 ± 1.4
    assert _cells(md, "meta teacher") == ["91.0 ± 1.4 (92.5)", "87.0 ± 1.4 (87.0)", "— (91.1)", "— (89.2)",
                                         "89.0 ± 1.4 (89.9)"]
    # mix teacher books: .89/.89 -> no spread; mean per seed .87/.88 -> 87.5 ± 0.7
    assert _cells(md, "mix teacher")[0] == "89.0 ± 0.0 (89.9)"
    assert _cells(md, "mix teacher")[-1] == "87.5 ± 0.7 (89.5)"
    # a method the paper has no number for: "—"; the paper's teacher row without ours: "— (paper)"
    assert _cells(md, "single teacher")[0] == "— (87.9)"
    assert "mtl teacher" not in md and "none/finetune" not in md
    lines = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert lines == ["single teacher", "mix teacher", "meta teacher", "single/tinybert_kd", "meta/tinybert_kd",
                     "meta/meta_kd"]
    assert "over books, dvd only" in md
    one_seed = amazon()
    md1 = "\n".join(paper.main_table(one_seed[one_seed["seed"] == 0], "amazon"))
    assert _cells(md1, "meta/meta_kd")[0] == "88.0 (91.5)"  # one seed: no "±"


def test_mnli_table_has_paper_means_only():
    f = amazon().replace({"domain": {"books": "fiction", "dvd": "slate"}})
    md = "\n".join(paper.main_table(f, "mnli"))
    row = _cells(md, "meta/meta_kd")
    assert row[0] == "89.0 ± 1.4 (—)" and row[-1] == "87.0 ± 1.4 (80.4)" and len(row) == 6
    assert _cells(md, "meta/tinybert_kd")[-1] == "86.5 ± 0.7 (—)"


def test_improvement_rate_matches_a_naive_computation():
    imp = paper.improvement(scarcity())
    assert list(imp["rate"]) == [0.01, 0.1, 1.0]
    for rate in SCARCITY:
        mean, std = _naive_improvement(rate)
        row = imp[imp["rate"] == rate].iloc[0]
        assert row["improvement"] == pytest.approx(mean) and row["improvement_std"] == pytest.approx(std)
        assert row["n_seeds"] == 2
    md = "\n".join(paper.scarcity_table(scarcity()))
    mean, std = _naive_improvement(0.01)
    assert _cells(md, "improvement rate of meta/meta_kd over single/tinybert_kd (%)")[0] == \
        f"{100 * mean:.1f} ± {100 * std:.1f}"
    # meta_kd at 0.01: domain means per seed (.70+.66)/2=.68, (.72+.60)/2=.66 -> 67.0 ± 1.4
    assert _cells(md, "meta/meta_kd")[0] == "67.0 ± 1.4"
    assert _cells(md, "n seeds (improvement rate)") == ["2", "2", "2"]


def test_targets_values_and_met_or_missed():
    t = paper.targets({"amazon-table": amazon(), "scarcity": scarcity()}).set_index("target")

    def get(prefix: str) -> tuple[float, str]:
        (row,) = [r for name, r in t.iterrows() if name.startswith(prefix)]
        return row["value"], row["met"]

    def by_hand(a: tuple, b: tuple) -> float:
        return 100 * statistics.mean(_dmean(AMAZON, a, s) - _dmean(AMAZON, b, s) for s in (0, 1))

    value, met = get("a) Amazon")
    assert value == pytest.approx(by_hand(("meta", "teacher"), ("mix", "teacher"))) == pytest.approx(1.5)
    assert met == "yes"
    value, met = get("b) Amazon")
    assert value == pytest.approx(1.0) and met == "no"  # below the +1.5 target
    value, met = get("c) Amazon")
    assert value == pytest.approx(0.5) and met == "yes"
    value, met = get("d) Amazon")
    assert value == pytest.approx(-2.0) and met == "no"  # Meta-KD 87.0 vs meta teacher 89.0
    value, met = get("e) scarcity: Meta-KD improvement rate > 0 % at r=0.01")
    assert value == pytest.approx(100 * _naive_improvement(0.01)[0]) and value > 0 and met == "yes"
    value, met = get("e) scarcity: Meta-KD improvement rate > 0 % at r=0.1")
    assert value == pytest.approx(100 * _naive_improvement(0.1)[0]) and value < 0 and met == "no"
    assert not any("r=1" in name for name in t.index)  # only rates <= 0.1
    for name in ("fa) MNLI", "fb) MNLI", "fc) MNLI"):
        value, met = get(name)
        assert math.isnan(value) and met == "not run"


# MNLI, 3 genres, 1 seed: the paper's ordering there (single teacher < meta teacher, single/tinybert_kd < Meta-KD)
MNLI = {
    ("single", "teacher"): {("fiction", 0): .62, ("slate", 0): .58, ("travel", 0): .66},
    ("meta", "teacher"): {("fiction", 0): .66, ("slate", 0): .60, ("travel", 0): .65},
    ("single", "tinybert_kd"): {("fiction", 0): .55, ("slate", 0): .52, ("travel", 0): .61},
    ("meta", "tinybert_kd"): {("fiction", 0): .58, ("slate", 0): .57, ("travel", 0): .59},
    ("meta", "meta_kd"): {("fiction", 0): .57, ("slate", 0): .55, ("travel", 0): .60},
}


def test_mnli_targets_are_the_papers_ordering_of_its_mnli_means():
    t = paper.targets({"mnli-table": _frame(_rows(MNLI, 1.0))}).set_index("target")
    got = {name.split(")")[0]: (row["value"], row["met"]) for name, row in t.iterrows() if name.startswith("f")}
    assert list(got) == ["fa", "fb", "fc"]
    assert "fa) MNLI: meta teacher − single teacher ≥ 0 pp" in t.index  # the paper has no mix teacher on MNLI
    assert "fb) MNLI: Meta-KD − single/tinybert_kd ≥ 0 pp" in t.index  # its ordering, not Amazon's +1.5

    def by_hand(a: tuple, b: tuple) -> float:
        return 100 * (_dmean(MNLI, a, 0) - _dmean(MNLI, b, 0))

    assert got["fa"][0] == pytest.approx(by_hand(("meta", "teacher"), ("single", "teacher"))) == pytest.approx(5 / 3)
    assert got["fa"][1] == "yes"
    assert got["fb"][0] == pytest.approx(by_hand(("meta", "meta_kd"), ("single", "tinybert_kd"))) \
        == pytest.approx(4 / 3)
    assert got["fb"][1] == "yes"  # +1.3 < 1.5: Amazon's b would miss it
    assert got["fc"][0] == pytest.approx(-2 / 3) and got["fc"][1] == "no"
    assert set(t.loc[[n for n in t.index if not n.startswith("f")], "met"]) == {"not run"}


def test_targets_not_run_without_the_data():
    t = paper.targets({})
    assert set(t["met"]) == {"not run"} and len(t) == 8
    only_teachers = amazon()
    t = paper.targets({"amazon-table": only_teachers[only_teachers["method"] == "teacher"]}).set_index("target")
    assert t.filter(like="a) Amazon", axis=0)["met"].item() == "yes"
    assert t.filter(like="b) Amazon", axis=0)["met"].item() == "not run"


def _publish_dir(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    amazon().to_csv(d / "amazon-table.csv", index=False)
    scarcity().to_csv(d / "scarcity.csv", index=False)
    g = _frame(_rows({("meta", "meta_kd"): {("books", 0): .80, ("books", 1): .82, ("dvd", 0): .76,
                                            ("dvd", 1): .78}}, 1.0, 0.2)
               + _rows({("meta", "meta_kd"): {("books", 0): .70, ("books", 1): .70, ("dvd", 0): .70,
                                              ("dvd", 1): .70}}, 1.0, 1.0))
    g.to_csv(d / "gamma2.csv", index=False)
    pd.DataFrame({"stage": ["teachers", "caches", "trials", "total"], "items": [2, 2, 4, 8],
                  "wall_s": [3600.0, 1800.0, 7200.0, 12600.0], "cpu_s": [7200.0, 1800.0, 3600.0, 12600.0],
                  "gpu_s": [0.0, 0.0, 0.0, 0.0]}).to_csv(d / "scarcity-costs.csv", index=False)
    return d


def test_summarize_sections_sources_and_write(tmp_path, capsys):
    d = _publish_dir(tmp_path)
    md = publish.summarize(d)
    assert "From `amazon-table.csv`." in md and "From `scarcity.csv`." in md and "From `gamma2.csv`." in md
    assert "not run (no `mnli-table.csv`" in md
    assert "From `scarcity-costs.csv`." in md
    assert _cells(md, "scarcity")  # a costs row: preset, stage, items, hours
    costs = [ln for ln in md.splitlines() if ln.startswith("| scarcity | teachers")]
    assert costs == ["| scarcity | teachers | 2 | 1.00 | 2.00 | 0.00 |"]
    # gamma2 0.2: domain means per seed .78/.80 -> 79.0 ± 1.4; gamma2 1: 70.0 ± 0.0
    assert _cells(md, "0.2") == ["1", "79.0 ± 1.4", "2"] and _cells(md, "1") == ["1", "70.0 ± 0.0", "2"]
    assert "| b) Amazon: Meta-KD − single/tinybert_kd ≥ 1.5 pp | +1.0 | no |" in md
    assert "| fa) MNLI: meta teacher − single teacher ≥ 0 pp | — | not run |" in md
    assert "| d) Amazon: Meta-KD − meta teacher ≥ −1.0 pp (within 1.0 point of its teacher) | -2.0 | no |" in md
    rows = md[md.index("| target | our value | met |"):].splitlines()[2:]
    assert [r.split(" | ")[0][2:4] for r in rows if r] == ["a)", "b)", "c)", "d)", "e)", "e)", "fa", "fb", "fc"]
    out = tmp_path / "summary.md"
    assert publish.main(["summarize", str(d), "--write", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "summary.md"]  # no temporary left
    assert publish.main(["summarize", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_summarize_rejects_a_csv_without_the_columns(tmp_path, capsys):
    (tmp_path / "scarcity.csv").write_text("a,b\n1,2\n")
    assert publish.main(["summarize", str(tmp_path)]) == 2
    assert "missing column(s) teacher" in capsys.readouterr().err


@pytest.fixture
def smoke_copy(tmp_path) -> Path:
    if not (SMOKE / "plan.json").is_file():
        pytest.skip("no smoke run in runs/smoke (python -m metakd_ray.sweep sweeps/smoke.yaml; CI runs it first)")
    root = tmp_path / "store"  # <root>/sweeps/<name> and <root>/teachers/<key>/manifest.json, as the report reads
    shutil.copytree(SMOKE, root / "sweeps" / "smoke", ignore=shutil.ignore_patterns("students", "tune", "report"))
    for manifest in (SMOKE_ROOT / "teachers").glob("*/manifest.json"):
        (root / "teachers" / manifest.parent.name).mkdir(parents=True)
        shutil.copy(manifest, root / "teachers" / manifest.parent.name / "manifest.json")
    return root / "sweeps" / "smoke"


def test_export_of_the_smoke_run(smoke_copy, tmp_path, capsys):
    out = tmp_path / "docs" / "results"
    written = publish.export(smoke_copy, out)
    assert {"smoke.csv", "smoke-costs.csv", "smoke-bootstrap.md"} <= set(written)
    assert "smoke-gamma2.png" not in written  # gamma2 is not an axis of the smoke run
    assert "smoke-scarcity.png" not in written  # one sample rate: no curve
    assert (out / "smoke-bootstrap.md").read_text().startswith("## meta/meta_kd vs each baseline")
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # nothing else, no temporary left
    rows = pd.read_csv(out / "smoke.csv")
    assert list(rows.columns) == list(PER_SEED_COLUMNS)
    df = load_results(smoke_copy)
    ref = per_seed(cells(df), load_teachers(smoke_copy, plan=df.attrs.get("plan")))  # what per_seed.csv holds
    assert (rows["method"] == "teacher").any()  # the teachers' rows came with the manifests
    key = ["sample_rate", "domain", "teacher", "method", "seed"]
    pd.testing.assert_frame_equal(rows.sort_values(key, ignore_index=True), ref.sort_values(key, ignore_index=True),
                                  check_dtype=False)
    costs = pd.read_csv(out / "smoke-costs.csv")
    assert list(costs.columns) == ["stage", "items", "wall_s", "cpu_s", "gpu_s"]
    assert list(costs["stage"]) == ["teachers", "caches", "trials", "total"]
    for c in ("items", "wall_s", "cpu_s", "gpu_s"):
        assert costs[c].iloc[3] == pytest.approx(costs[c].iloc[:3].sum(), abs=0.15)
    assert costs["items"].iloc[2] == len(df)
    assert costs["wall_s"].iloc[2] == pytest.approx(df["wall_s"].sum(), abs=0.05)
    # the CLI, under another name, into the same folder: both sets there
    assert publish.main(["export", str(smoke_copy), str(out), "--name", "amazon-table"]) == 0
    assert capsys.readouterr().out.count("wrote ") == len(written)
    assert {p.name for p in out.iterdir()} == set(written) | {n.replace("smoke", "amazon-table") for n in written}


def test_export_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    not_a_sweep = tmp_path / "empty"
    not_a_sweep.mkdir()
    for bad in (tmp_path / "missing", not_a_sweep):
        assert publish.main(["export", str(bad), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()


def test_the_scarcity_figure_is_exported_only_for_a_sweep_with_both_methods_it_compares_at_two_rates():
    def rows(*keys, rates=(0.1, 1.0)):
        return pd.DataFrame([{"teacher": k.split("/")[0], "method": k.split("/")[1], "sample_rate": r}
                             for k in keys for r in rates])

    both = rows("meta/teacher", "single/tinybert_kd", "meta/meta_kd")
    alone = rows("meta/teacher", "meta/meta_kd")  # a gamma2 or ablation sweep: nothing to compare
    assert publish.figure_applies("scarcity.png", both)
    assert not publish.figure_applies("scarcity.png", alone)
    assert not publish.figure_applies("scarcity.png", rows("single/teacher", "single/tinybert_kd"))
    one_rate = rows("meta/teacher", "single/tinybert_kd", "meta/meta_kd", rates=(1.0,))  # a full-data table
    assert not publish.figure_applies("scarcity.png", one_rate)
    teachers_at_two = pd.concat([one_rate, rows("meta/teacher", rates=(0.1,))])  # the students at one rate only
    assert not publish.figure_applies("scarcity.png", teachers_at_two)
    assert publish.figure_applies("gamma2.png", alone) and publish.figure_applies("bootstrap.md", alone)

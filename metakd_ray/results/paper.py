"""Published per-seed results as the paper's tables: the Amazon and MNLI tables beside its numbers, the scarcity and
gamma2 curves as tables, the costs, and the reproduction's targets.

Pure functions of the per-seed rows that ``publish export`` writes (``tables.PER_SEED_COLUMNS``: teacher, method,
domain, sample_rate, seed, gamma2, dev_acc, test_acc; teacher rows have method ``teacher``) and of the cost rows; each
returns markdown lines or a DataFrame. ``publish summarize`` puts them together. No Ray, no torch.
"""

from __future__ import annotations

import math

import pandas as pd

from metakd_ray.results.load import COSTS
from metakd_ray.results.plots import gamma2_curve, scarcity_curve
from metakd_ray.results.tables import (AMAZON_COLUMNS, METHOD_ORDER, MNLI_COLUMNS, PAPER_AMAZON, PAPER_MNLI_MEAN,
                                       _fmt)

PRESETS = ("amazon-table", "scarcity", "mnli-table", "gamma2")
TEACHER_KINDS = ("single", "mix", "mtl", "meta")
METAKD, BASE, META_TINY = "meta/meta_kd", "single/tinybert_kd", "meta/tinybert_kd"


def _keyed(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``key``: "teacher:<kind>" for a teacher's row, else "<teacher>/<method>" (the cells' method)."""
    return rows.assign(key=[f"teacher:{t}" if m == "teacher" else f"{t}/{m}"
                            for t, m in zip(rows["teacher"], rows["method"])])


def _by_seed(rows: pd.DataFrame, domains: list[str] | None = None) -> pd.DataFrame:
    """seed × domain test accuracy (fractions; a gamma2 axis averaged), restricted to ``domains`` when given."""
    if rows.empty:
        return pd.DataFrame(columns=domains or [], dtype=float)
    wide = rows.pivot_table(index="seed", columns="domain", values="test_acc", aggfunc="mean")
    return wide.reindex(columns=domains) if domains is not None else wide


def _domain_mean(rows: pd.DataFrame, domains: list[str] | None = None) -> pd.Series:
    """Per seed: the mean over ``domains`` (seeds that have every one of them), else over the domains it has."""
    wide = _by_seed(rows, domains)
    return wide.dropna().mean(axis=1) if domains is not None else wide.mean(axis=1)


def _row_order(keys: set[str]) -> list[str]:
    """Our teachers (single, mix, mtl, meta), the student methods in METHOD_ORDER, then any other key, sorted."""
    fixed = [f"teacher:{k}" for k in TEACHER_KINDS] + list(METHOD_ORDER)
    return fixed + sorted(keys - set(fixed))


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; a "|" inside a cell is escaped."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def _label(key: str) -> str:
    return f"{key.split(':', 1)[1]} teacher" if key.startswith("teacher:") else key


def main_table(rows: pd.DataFrame, dataset: str) -> list[str]:
    """Markdown lines: our teachers then the student methods × the dataset's domains + mean, at sample rate 1.0;
    each cell "ours (paper)", ours = test accuracy in %, mean over seeds (± sample std with more than one seed); the
    mean column averages the domains the file has per seed (seeds with all of them), then over seeds; paper "—"
    where it has no number. A note follows when the file lacks some of the dataset's domains."""
    columns = list(AMAZON_COLUMNS if dataset == "amazon" else MNLI_COLUMNS)
    rows = _keyed(rows[rows["sample_rate"] == 1.0])
    present = [d for d in columns if d in set(rows["domain"])]
    keys, lines = set(rows["key"]), []
    for key in _row_order(keys):
        paper: list[float | None] = [None] * (len(columns) + 1)
        if dataset == "amazon" and key in PAPER_AMAZON:
            paper = list(PAPER_AMAZON[key][1])
        elif dataset == "mnli" and key in PAPER_MNLI_MEAN:
            paper[-1] = PAPER_MNLI_MEAN[key][1]
        if key not in keys and all(p is None for p in paper):
            continue
        g = rows[rows["key"] == key]
        wide = _by_seed(g, columns)
        ours = [_fmt(wide[d]) for d in columns] + [_fmt(_domain_mean(g, present))]
        lines.append([_label(key)] + [f"{o} ({'—' if p is None else f'{p:.1f}'})" for o, p in zip(ours, paper)])
    note = [] if len(present) in (0, len(columns)) else [
        "", f"Our mean is over {', '.join(present)} only; the paper's is over all {len(columns)} domains."]
    return md_table(["method", *columns, "mean"], lines) + note


def as_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-seed student rows as the finished cells the report's curve functions take (``plots``)."""
    s = rows[rows["method"] != "teacher"]
    return pd.DataFrame({"domain": s["domain"], "rate": s["sample_rate"].astype(float),
                         "method": s["teacher"] + "/" + s["method"], "seed": s["seed"],
                         "gamma2": s["gamma2"].astype(float), "test_acc": s["test_acc"].astype(float),
                         "status": "ok", "n_trials": 1})


def improvement(rows: pd.DataFrame) -> pd.DataFrame:
    """The improvement rate of Meta-KD (meta/meta_kd) over single/tinybert_kd per sample rate: for each seed, per
    domain (acc_MetaKD − acc_base) / acc_base on test accuracy, averaged over the domains where both cells exist;
    then mean and sample std (0 with one seed) over seeds — ``plots.scarcity_curve``'s ``domain == "mean"`` rows.
    Columns: rate, improvement, improvement_std (fractions), n_seeds."""
    curve = scarcity_curve(as_cells(rows), base=BASE, ours=METAKD)
    curve = curve[curve["domain"] == "mean"]
    return curve[["rate", "improvement", "improvement_std", "n_seeds"]].sort_values("rate", ignore_index=True)


def _pm(mean: float, std: float, n: int, scale: float = 100.0) -> str:
    return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if n > 1 else "")


def scarcity_table(rows: pd.DataFrame) -> list[str]:
    """Markdown lines: mean test accuracy (%) of each method per sample rate (domain mean per seed, then mean over
    seeds), and Meta-KD's improvement rate (:func:`improvement`) with its number of seeds."""
    rows = _keyed(rows)
    rates = sorted(rows["sample_rate"].unique())
    keys = set(rows["key"])
    body = []
    for key in [k for k in _row_order(keys) if k in keys]:
        g = rows[rows["key"] == key]
        body.append([_label(key)] + [_fmt(_domain_mean(g[g["sample_rate"] == r])) if (g["sample_rate"] == r).any()
                                     else "—" for r in rates])
    imp = improvement(rows).set_index("rate")
    body.append([f"improvement rate of {METAKD} over {BASE} (%)"] + [
        _pm(imp.at[r, "improvement"], imp.at[r, "improvement_std"], int(imp.at[r, "n_seeds"])) if r in imp.index
        else "—" for r in rates])
    body.append(["n seeds (improvement rate)"] + [str(int(imp.at[r, "n_seeds"])) if r in imp.index else "0"
                                                  for r in rates])
    return md_table(["method", *[f"r={r:g}" for r in rates]], body) + [
        "", f"Test accuracy (%): mean over domains per seed, then mean ± std over seeds. Improvement rate: per seed, "
            f"(acc_MetaKD − acc_base) / acc_base per domain (Meta-KD = {METAKD}, base = {BASE}), averaged over the "
            "domains with both; then mean ± std over seeds (in %)."]


def gamma2_table(rows: pd.DataFrame) -> list[str]:
    """Markdown lines: Meta-KD's test accuracy (%) per gamma2 value and sample rate (``plots.gamma2_curve``: mean
    over domains per seed, then mean ± std over seeds)."""
    curve = gamma2_curve(as_cells(rows), method=METAKD)
    curve = curve[curve["domain"] == "mean"].sort_values(["rate", "gamma2"])
    body = [[f"{g2:g}", f"{r:g}", _pm(a, s, int(n)), str(int(n))]
            for g2, r, a, s, n in zip(curve["gamma2"], curve["rate"], curve["acc"], curve["acc_std"],
                                      curve["n_seeds"])]
    return md_table(["gamma2", "sample rate", f"{METAKD} test accuracy (%)", "n seeds"], body)


def costs_md(frames: dict[str, pd.DataFrame]) -> list[str]:
    body = []
    for preset in PRESETS:
        f = frames.get(f"{preset}-costs")
        if f is None:
            continue
        for _, r in f.iterrows():
            body.append([preset, str(r["stage"]), str(int(r["items"]))] +
                        [f"{float(r[c]) / 3600:.2f}" for c in COSTS])
    return md_table(["preset", "stage", "items", "wall h", "CPU h", "GPU h"], body)


def _paired(rows: pd.DataFrame, a: str, b: str) -> float:
    """Mean over seeds of the domain-mean of (acc_a − acc_b) in percentage points, on the (domain, seed) pairs
    where both rows exist (``a``/``b`` are row keys: "teacher:meta", "meta/meta_kd", ...); NaN when none."""
    rows = _keyed(rows)
    ga, gb = rows[rows["key"] == a], rows[rows["key"] == b]
    diff = (_by_seed(ga).stack() - _by_seed(gb).stack()).dropna() if len(ga) and len(gb) else pd.Series()
    if diff.empty:
        return float("nan")
    return float(100 * diff.groupby(level="seed").mean().mean())


def targets(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The targets, from the per-seed frames ({preset: rows}); columns target, value, met ("yes", "no", "not run").

    Amazon and MNLI (``amazon-table`` / ``mnli-table`` rows at sample rate 1.0), values in percentage points as
    :func:`_paired` differences (means over seeds and domains): a) meta teacher − mix teacher ≥ 0; b) Meta-KD −
    single/tinybert_kd ≥ 1.5; c) Meta-KD − meta/tinybert_kd ≥ 0; d) Meta-KD − meta teacher ≥ −1.0 (a student above
    its teacher meets it). e) ``scarcity``: Meta-KD's :func:`improvement` rate (%) > 0 at each sample rate ≤ 0.1 (a
    row per rate present). f) MNLI, the paper's ordering of the methods there (it reports the means of the single
    and meta teachers, single/tinybert_kd and Meta-KD; no mix teacher): fa) meta teacher − single teacher ≥ 0;
    fb) Meta-KD − single/tinybert_kd ≥ 0; fc) Meta-KD − meta/tinybert_kd ≥ 0 (Amazon's c)."""
    out = []

    def add(target: str, value: float | None, ok) -> None:
        met = "not run" if value is None or math.isnan(value) else ("yes" if ok(value) else "no")
        out.append({"target": target, "value": float("nan") if value is None else value, "met": met})

    def table(preset: str, ds: str, specs: list[tuple[str, str, str, str, str, str]]) -> None:
        """One row per (label, what, a, b, least, note): a − b ≥ least pp on the preset's rate-1.0 rows."""
        f = frames.get(preset)
        rows = f[f["sample_rate"] == 1.0] if f is not None else None
        for label, what, a, b, least, note in specs:
            value = float("nan") if rows is None else _paired(rows, a, b)
            add(f"{label}) {ds}: {what} ≥ {least} pp{note}", value, lambda v: v >= float(least.replace("−", "-")))

    meta_t = "teacher:meta"
    table("amazon-table", "Amazon", [
        ("a", "meta teacher − mix teacher", meta_t, "teacher:mix", "0", ""),
        ("b", "Meta-KD − single/tinybert_kd", METAKD, BASE, "1.5", ""),
        ("c", "Meta-KD − meta/tinybert_kd", METAKD, META_TINY, "0", ""),
        ("d", "Meta-KD − meta teacher", METAKD, meta_t, "−1.0", " (within 1.0 point of its teacher)")])
    s = frames.get("scarcity")
    imp = improvement(s) if s is not None else pd.DataFrame(columns=["rate", "improvement"])
    imp = imp[imp["rate"] <= 0.1]
    if imp.empty:
        add("e) scarcity: Meta-KD improvement rate > 0 % at every rate ≤ 0.1", None, None)
    for r, v in zip(imp["rate"], imp["improvement"]):
        add(f"e) scarcity: Meta-KD improvement rate > 0 % at r={r:g}", 100 * float(v), lambda x: x > 0)
    # MNLI: the order of the paper's MNLI means (single teacher 81.9 < meta 84.4; single/tinybert_kd 79.3 < Meta-KD
    # 80.4; it has no mix teacher there) and Amazon's c
    table("mnli-table", "MNLI", [
        ("fa", "meta teacher − single teacher", meta_t, "teacher:single", "0", ""),
        ("fb", "Meta-KD − single/tinybert_kd", METAKD, BASE, "0", ""),
        ("fc", "Meta-KD − meta/tinybert_kd", METAKD, META_TINY, "0", "")])
    return pd.DataFrame(out, columns=["target", "value", "met"])

"""The paper's table (method doc §6) next to ours, as markdown: our students, our teachers (from their manifests,
``results.teachers``) and the compression ratio (teacher / student parameters, from the trials' final records)."""

from __future__ import annotations

import math

import pandas as pd

from metakd_ray.results.load import as_cells
from metakd_ray.results.teachers import teacher_scores

# ----------------------------------------------------------------------------------------------------------
# The paper's numbers (method doc §6): BERT-base teacher, TinyBERT 4L-312D student. Amazon per domain + mean;
# MNLI means only. Keys are our method names; teacher rows have no student method, so they are keyed by label.
# ----------------------------------------------------------------------------------------------------------

AMAZON_COLUMNS = ("books", "dvd", "electronics", "kitchen")
PAPER_AMAZON: dict[str, tuple[str, tuple[float, ...]]] = {
    # key: (the paper's row label, (books, dvd, electronics, kitchen, mean))
    "teacher:single": ("BERT-base single", (87.9, 83.8, 89.2, 90.6, 87.9)),
    "teacher:mix": ("BERT-base mix", (89.9, 85.9, 90.1, 92.1, 89.5)),
    "teacher:meta": ("meta-teacher", (92.5, 87.0, 91.1, 89.2, 89.9)),
    "single/tinybert_kd": ("single -> TinyBERT-KD", (83.4, 83.2, 89.2, 91.1, 86.7)),
    "meta/tinybert_kd": ("meta-teacher -> TinyBERT-KD", (89.9, 84.3, 87.3, 91.6, 88.3)),
    "meta/meta_kd": ("Meta-KD", (91.5, 86.5, 90.1, 89.7, 89.4)),
}
MNLI_COLUMNS = ("fiction", "government", "slate", "telephone", "travel")
PAPER_MNLI_MEAN: dict[str, tuple[str, float]] = {
    "teacher:single": ("BERT-base single", 81.9),
    "teacher:meta": ("meta-teacher", 84.4),
    "single/tinybert_kd": ("single -> TinyBERT-KD", 79.3),
    "meta/meta_kd": ("Meta-KD", 80.4),
}
METHOD_ORDER = ("none/finetune", "single/tinybert_kd", "mix/tinybert_kd", "mtl/tinybert_kd", "meta/tinybert_kd",
                "meta/meta_kd")
# Our teachers' rows, by teacher kind (the first part of a method name), in this order.
TEACHER_LABELS = {"single": "single teacher (ours)", "mix": "mix teacher (ours)", "mtl": "mtl teacher (ours)",
                  "meta": "meta-teacher (ours)"}
PAPER_COMPRESSION = 7.5  # BERT-base (110M) / TinyBERT 4L-312D (14.5M), method doc §6


def _fmt(values: pd.Series) -> str:
    v = 100 * values.dropna()
    if v.empty:
        return "—"
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,.0f}"


def compression_line(c: pd.DataFrame) -> str:
    """"Compression (teacher / student parameters): ..." from the finished cells' ``teacher_params`` and
    ``n_params`` (the trials' final records); "" when neither column has a value. One figure when every method's
    ratio is the same (to 0.01), else one per method."""
    if not {"n_params", "teacher_params"} <= set(c.columns):
        return ""
    sizes = c.assign(n_params=pd.to_numeric(c["n_params"], errors="coerce"),
                     teacher_params=pd.to_numeric(c["teacher_params"], errors="coerce"))
    sizes = sizes[(sizes["n_params"] > 0) & (sizes["teacher_params"] > 0)]
    if sizes.empty:
        return ""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    per = sizes.groupby("method")[["teacher_params", "n_params"]].median()
    per = per.loc[sorted(per.index, key=lambda m: (order.get(m, len(order)), m))]
    ratios = per["teacher_params"] / per["n_params"]

    def one(row: pd.Series) -> str:
        return (f"{row['teacher_params'] / row['n_params']:.2f}× ({_count(row['teacher_params'])} / "
                f"{_count(row['n_params'])})")

    if ratios.round(2).nunique() == 1:
        text = one(per.iloc[0])
    else:
        text = "; ".join(f"{m} {one(row)}" for m, row in per.iterrows())
    return (f"Compression (teacher parameters / student parameters): {text}; the paper's: {PAPER_COMPRESSION:g}× "
            "(BERT-base / TinyBERT 4L-312D).")


def paper_table(df: pd.DataFrame, teachers: pd.DataFrame | None = None) -> str:
    """Markdown: methods (rows) × target domains + mean (columns), our test accuracy in % as mean ± std over
    seeds at rate 1.0 (or the largest rate present), the paper's number in brackets where it has one (Amazon:
    per domain; MNLI: means only). The mean column averages the domains per seed (seeds with every column's
    domain only), then over seeds.

    ``teachers`` (``results.teachers.load_teachers``): our teachers as rows — per teacher kind, the test accuracy
    on each column's target domain of the teacher its cells distil from (cells at the table's rate, from the plan
    in ``df.attrs``), beside the paper's teacher rows; a paper teacher row with no teacher of ours stays "paper
    only". A note gives the compression ratio when the cells carry ``n_params`` and ``teacher_params``."""
    c = as_cells(df)
    cfg = c.attrs.get("config") or {}
    c = c[c["status"] == "ok"]
    compression = compression_line(c)
    domains = list(dict.fromkeys(c["domain"])) if len(c) else []
    dataset = (cfg.get("data") or {}).get("dataset")
    if dataset in (None, "amazon") and domains and set(domains) <= set(AMAZON_COLUMNS):
        dataset, domains = "amazon", [d for d in AMAZON_COLUMNS if d in domains]
    elif dataset in (None, "mnli") and domains and set(domains) <= set(MNLI_COLUMNS):
        dataset, domains = "mnli", [d for d in MNLI_COLUMNS if d in domains]
    else:
        dataset = "other"
    rate = 1.0 if (c["rate"] == 1.0).any() else (c["rate"].max() if len(c) else float("nan"))
    c = c[c["rate"] == rate]
    has_gamma2 = c["gamma2"].notna().any()

    full = domains == list(AMAZON_COLUMNS if dataset == "amazon" else MNLI_COLUMNS)

    def paper(key: str, col: int | None) -> str:
        if col is None and not full:  # the paper's mean is over every domain; ours would be over a subset
            return ""
        if dataset == "amazon" and key in PAPER_AMAZON:
            return f"{PAPER_AMAZON[key][1][col if col is not None else -1]:.1f}"
        if dataset == "mnli" and key in PAPER_MNLI_MEAN and col is None:
            return f"{PAPER_MNLI_MEAN[key][1]:.1f}"
        return ""

    def cell_text(ours: str, ref: str) -> str:
        return f"{ours} ({ref})" if ref else ours

    def row_of(label: str, key: str, scores: pd.DataFrame) -> str:
        """A row of ours: ``scores`` (seed, domain, test_acc) -> mean ± std per column, the paper's in brackets."""
        by_seed = scores.pivot_table(index="seed", columns="domain", values="test_acc", aggfunc="mean")
        row = [label]
        for i, d in enumerate(domains):
            row.append(cell_text(_fmt(by_seed[d]) if d in by_seed else "—", paper(key, i)))
        complete = by_seed.reindex(columns=domains).dropna()
        row.append(cell_text(_fmt(complete.mean(axis=1)) if domains else "—", paper(key, None)))
        return "| " + " | ".join(row) + " |"

    head = ["method", *domains, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    groups = c.groupby(["method", "gamma2"], dropna=False, sort=False) if len(c) else []
    keyed = sorted(groups, key=lambda kg: (order.get(kg[0][0], len(order)), kg[0][0],
                                           -1.0 if pd.isna(kg[0][1]) else kg[0][1]))
    for (method, g2), g in keyed:
        label = method if not has_gamma2 or pd.isna(g2) else f"{method} (γ2={g2:g})"
        label += f" = {PAPER_AMAZON[method][0]}" if method in PAPER_AMAZON else ""
        lines.append(row_of(label, method, g))

    ours = pd.DataFrame(columns=["kind", "domain", "seed", "test_acc"])
    if teachers is not None and domains:
        ours = teacher_scores(teachers, c.attrs.get("plan"))
        ours = ours[(ours["rate"] == rate) & ours["domain"].isin(domains) & ours["test_acc"].notna()]
    kinds = [k for k in TEACHER_LABELS if k in set(ours["kind"])]
    for kind in dict.fromkeys(["single", "mix", *kinds, "meta"]):
        key = f"teacher:{kind}"
        paper_label = (PAPER_AMAZON.get(key) or PAPER_MNLI_MEAN.get(key) or ("",))[0]
        if kind in kinds:
            label = TEACHER_LABELS[kind] + (f" = {paper_label}" if paper_label and dataset != "other" else "")
            lines.append(row_of(label, key, ours[ours["kind"] == kind]))
        elif dataset == "amazon" and key in PAPER_AMAZON:
            nums = PAPER_AMAZON[key][1]
            vals = [f"— ({nums[AMAZON_COLUMNS.index(d)]:.1f})" for d in domains] + [
                f"— ({nums[-1]:.1f})" if full else "—"]
            lines.append("| " + " | ".join([f"teacher: {paper_label} (paper only)", *vals]) + " |")
        elif dataset == "mnli" and key in PAPER_MNLI_MEAN:
            vals = ["—"] * len(domains) + [f"— ({PAPER_MNLI_MEAN[key][1]:.1f})" if full else "—"]
            lines.append("| " + " | ".join([f"teacher: {paper_label} (paper only)", *vals]) + " |")
    rate_txt = "no finished cells yet" if math.isnan(rate) else f"sample rate {rate:g}"
    teacher = (cfg.get("model") or {}).get("teacher", "default")
    teacher = "MiniLM-L6 (all-MiniLM-L6-v2), the default" if teacher == "default" else f"`{teacher}`"
    teacher_rows = ("Teacher rows marked (ours) are our teachers' test accuracy on the column's target domain (the "
                    "teacher each cell of that kind distils from, from its manifest), mean ± std over seeds; the "
                    "others are the paper's." if kinds else "Teacher rows are the paper's.")
    notes = [
        "",
        f"Test accuracy (%), mean ± std over seeds, {rate_txt}; the paper's number in brackets. "
        "Each cell's score is its dev-selected trial.",
        "",
        f"Ours use the configured teacher ({teacher}, not BERT-base) and a student built from "
        "it; the paper's numbers are for a BERT-base teacher and a TinyBERT 4L-312D student (Pan et al. 2021, §6 "
        "of the method doc)" + (", MNLI: means only" if dataset == "mnli" else "") + ". " + teacher_rows,
    ]
    if compression:
        notes += ["", compression]
    if (cfg.get("teacher") or {}).get("exclude_target"):
        notes += ["", "teacher.exclude_target: every teacher but `single` was trained without the target domain "
                      "(so ours have no test accuracy there: —); the paper's numbers in brackets are its in-domain "
                      "results, for reference only."]
    return "\n".join(lines + notes) + "\n"


PER_SEED_COLUMNS = ("teacher", "method", "domain", "sample_rate", "seed", "gamma2", "dev_acc", "test_acc")


def per_seed(cell_df: pd.DataFrame, teachers: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per finished cell (its dev-selected trial) and per teacher and target domain: ``teacher`` (the
    teacher kind, ``none`` without one), ``method`` (the student method, or ``teacher`` for a teacher's own row),
    ``domain``, ``sample_rate``, ``seed``, ``gamma2`` (NaN unless an axis), ``dev_acc``, ``test_acc`` (fractions in
    [0, 1]). A teacher row's dev_acc is the dev accuracy of its exported epoch (mean over its domains), its test_acc
    the one on the row's domain. The format of ``docs/results/*.csv`` (report: ``per_seed.csv``)."""
    c = as_cells(cell_df)
    c = c[c["status"] == "ok"]
    kinds = c["method"].str.split("/", n=1)
    rows = pd.DataFrame({"teacher": kinds.str[0], "method": kinds.str[1], "domain": c["domain"],
                         "sample_rate": c["rate"], "seed": c["seed"], "gamma2": c["gamma2"],
                         "dev_acc": c["dev_acc"], "test_acc": c["test_acc"]})
    if teachers is not None and len(teachers):
        scores = teacher_scores(teachers, c.attrs.get("plan")).dropna(subset=["test_acc"])
        dev = teachers.set_index("teacher_key")["best_dev"]
        rows = pd.concat([rows, pd.DataFrame({
            "teacher": scores["kind"], "method": "teacher", "domain": scores["domain"],
            "sample_rate": scores["rate"], "seed": scores["seed"], "gamma2": float("nan"),
            "dev_acc": scores["teacher_key"].map(dev).astype(float), "test_acc": scores["test_acc"]})])
    return rows.sort_values(["sample_rate", "domain", "teacher", "method", "seed"], kind="stable",
                            ignore_index=True)[list(PER_SEED_COLUMNS)]

"""The two-line headline a sweep ends with: what was compared, and what the numbers mean.

``headline(cells_df, teachers)`` reads the same DataFrames as the report (``results.cells``, ``results.load_teachers``)
and says, for the finished cells: each student method's mean test accuracy and each teacher kind's (on the cells'
target domains), Meta-KD's difference to each other method, and how many seeds and cells the means are over.
"""

from __future__ import annotations

import pandas as pd

from metakd_ray.results.teachers import teacher_scores

LABELS = {"none/finetune": "fine-tuned without teacher", "single/tinybert_kd": "single -> TinyBERT-KD",
          "mix/tinybert_kd": "mix -> TinyBERT-KD", "mtl/tinybert_kd": "mtl -> TinyBERT-KD",
          "meta/tinybert_kd": "meta-teacher -> TinyBERT-KD", "meta/meta_kd": "Meta-KD"}
TEACHER_LABELS = {"single": "single-domain", "mix": "mix", "mtl": "multi-task", "meta": "meta-teacher"}
OURS = "meta/meta_kd"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def headline(cells_df: pd.DataFrame, teachers: pd.DataFrame | None = None) -> list[str]:
    """Two lines (none when no cell finished): the comparison, then how to read it."""
    ok = cells_df[cells_df["status"] == "ok"]
    if ok.empty:
        return []
    means = ok.groupby("method", sort=False)["test_acc"].mean()
    order = [m for m in LABELS if m in means.index] + [m for m in means.index if m not in LABELS]
    students = ", ".join(f"{LABELS.get(m, m)} {_pct(means[m])}" for m in order)
    vs = ""
    if OURS in means.index and len(means) > 1:
        vs = " (Meta-KD " + ", ".join(f"{100 * (means[OURS] - means[m]):+.1f} pts vs {LABELS.get(m, m)}"
                                      for m in order if m != OURS) + ")"
    teach = ""
    if teachers is not None and len(teachers):
        scores = teacher_scores(teachers, cells_df.attrs.get("plan")).dropna(subset=["test_acc"])
        scores = scores[scores["domain"].isin(set(ok["domain"]))]
        if len(scores):
            t = scores.groupby("kind", sort=False)["test_acc"].mean()
            teach = "; teachers " + ", ".join(f"{TEACHER_LABELS.get(k, k)} {_pct(v)}" for k, v in t.items())
    domains = ", ".join(dict.fromkeys(ok["domain"]))
    rates = ", ".join(f"{r:g}" for r in sorted(set(ok["rate"])))
    seeds = ok["seed"].nunique()
    first = (f"[sweep] compared on {domains} at sample rate {rates}, test accuracy: students {students}{vs}"
             f"{teach}.")
    per = ok.groupby("method").size()
    n = f"{per.iloc[0]} cell(s)" if per.nunique() == 1 else f"{per.min()}-{per.max()} cells"
    second = (f"[sweep] each number is a method's mean over its {n} ({seeds} seed(s)) of the dev-selected "
              "student's accuracy on its target domain's held-out test split"
              + ("; with one seed a gap of 1-3 points can be noise" if seeds == 1 else "")
              + ": report/bootstrap.md gives paired intervals, report/table.md the paper's numbers.")
    return [first, second]

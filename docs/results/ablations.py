"""The ablations of docs/results.md beside the Amazon table: python docs/results/ablations.py [DIR]

Reads DIR/amazon-table.csv (default DIR: docs/results), every DIR/abl-*.csv (not its -costs.csv) and, when
DIR/gamma2.csv exists, its gamma2 = 0 rows (Meta-KD without L_TKD) as a variant and its gamma2 = 0.5 rows (Meta-KD
as the table runs it) as a baseline. Prints markdown: test accuracy (%) per domain and the mean for each run and
method, then per variant its effect against the baseline trained from the same meta-teacher, and the two quantities
of the missed targets, in points: Meta-KD - its meta-teacher (target d) and Meta-KD - the table's single ->
TinyBERT-KD (target b).

A variant is compared only with a baseline whose meta-teacher rows (dev and test accuracy per domain) are identical
to its own: the same teacher artefact. A teacher retrained on another machine differs slightly (bf16 kernels), and
a difference between students of two different teachers is not the ablation's effect. Means are over domains of the
per-domain means over seeds.
"""

import glob
import os
import sys

import numpy as np
import pandas as pd

D = sys.argv[1] if len(sys.argv) > 1 else "docs/results"
METHODS = ("single/tinybert_kd", "meta/tinybert_kd", "meta/meta_kd")


def per_domain(rows: pd.DataFrame) -> pd.Series:
    return 100 * rows.groupby("domain").test_acc.mean()


def of(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    return rows[(rows.teacher + "/" + rows.method) == key]


def meta_teacher(rows: pd.DataFrame) -> pd.DataFrame:
    t = rows[(rows.teacher == "meta") & (rows.method == "teacher")]
    return t.groupby("domain")[["dev_acc", "test_acc"]].mean().sort_index()


def same_teacher(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return not a.empty and a.index.equals(b.index) and np.allclose(a.values, b.values, rtol=0, atol=1e-12)


table = pd.read_csv(f"{D}/amazon-table.csv")
table = table[table.sample_rate == 1.0]
domains = sorted(table.domain.unique())
runs = {"amazon-table": table}  # every run whose students are printed
baselines = {"amazon-table": table}  # Meta-KD at the table's configuration
variants = {}
if os.path.exists(f"{D}/gamma2.csv"):
    g = pd.read_csv(f"{D}/gamma2.csv")
    g = g[g.sample_rate == 1.0]
    teachers = g[g.method == "teacher"]
    runs["gamma2 = 0.5 (the table's Meta-KD)"] = baselines["gamma2 = 0.5"] = pd.concat([g[g.gamma2 == 0.5], teachers])
    runs["gamma2 = 0 (no L_TKD)"] = variants["gamma2 = 0 (no L_TKD)"] = pd.concat([g[g.gamma2 == 0], teachers])
for f in sorted(f for f in glob.glob(f"{D}/abl-*.csv") if not f.endswith("-costs.csv")):
    name = os.path.basename(f)[:-4]
    runs[name] = variants[name] = pd.read_csv(f).query("sample_rate == 1.0")

print("| run | method | " + " | ".join(domains) + " | mean |")
print("|---|---|" + "---|" * (len(domains) + 1))
for name, rows in runs.items():
    t = meta_teacher(rows)
    if not t.empty:
        a = (100 * t.test_acc).reindex(domains)
        print(f"| {name} | meta teacher | " + " | ".join(f"{v:.1f}" for v in a) + f" | {a.mean():.1f} |")
    students = rows[rows.method != "teacher"]
    for key in METHODS:
        if not (r := of(students, key)).empty:
            a = per_domain(r).reindex(domains)
            print(f"| {name} | {key} | " + " | ".join(f"{v:.1f}" for v in a) + f" | {a.mean():.1f} |")
print("\nTest accuracy (%), sample rate 1.0, mean over seeds.\n")

single = per_domain(of(table[table.method != "teacher"], "single/tinybert_kd")).reindex(domains)
print("| variant | baseline (same meta-teacher) | Meta-KD | variant - baseline (pp) | d) Meta-KD - meta teacher "
      "(pp) | b) Meta-KD - single/tinybert_kd of amazon-table (pp) |")
print("|---|---|---|---|---|---|")
notes = []
for name, rows in {**{f"{k} (baseline)": v for k, v in baselines.items()}, **variants}.items():
    if (mk := of(rows[rows.method != "teacher"], "meta/meta_kd")).empty:
        continue
    m = per_domain(mk).reindex(domains)
    t = meta_teacher(rows)
    d = (m - 100 * t.test_acc.reindex(domains)).mean() if not t.empty else float("nan")
    base, effect = "—", "—"
    if name in variants:
        match = [b for b, brows in baselines.items() if same_teacher(meta_teacher(brows), t)]
        if match:
            base = match[-1]
            bm = per_domain(of(baselines[base][baselines[base].method != "teacher"], "meta/meta_kd")).reindex(domains)
            effect = f"{(m - bm).mean():+.1f}"
        else:
            notes.append(f"{name}: no baseline with its meta-teacher (retrained on another machine?); no effect shown")
    print(f"| {name} | {base} | {m.mean():.1f} | {effect} | {d:+.1f} | {(m - single).mean():+.1f} |")
print("\nMeans over domains of per-domain means over seeds. A variant's effect is against the baseline run from the "
      "same meta-teacher artefact (identical teacher rows); b uses the table's single-domain students.")
for n in notes:
    print(f"\nNote: {n}")
if "gamma2 = 0.5" in baselines:
    same = same_teacher(meta_teacher(baselines["gamma2 = 0.5"]), meta_teacher(table))
    half = of(baselines["gamma2 = 0.5"], "meta/meta_kd").set_index(["domain", "seed"]).test_acc
    ref = of(table, "meta/meta_kd").set_index(["domain", "seed"]).test_acc
    both = half.index.intersection(ref.index)
    print(f"\ngamma2.csv's gamma2 = 0.5 cells against amazon-table's Meta-KD (the same configuration; meta-teacher "
          f"{'the same artefact' if same else 'retrained, not identical'}): largest test difference "
          f"{100 * (half[both] - ref[both]).abs().max():.2f} pp over {len(both)} cells")

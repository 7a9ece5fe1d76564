"""The ablations of docs/results.md beside the Amazon table: python docs/results/ablations.py [DIR]

Reads DIR/amazon-table.csv (default DIR: docs/results), every DIR/abl-*.csv and, when DIR/gamma2.csv exists, its
gamma2 = 0 rows (Meta-KD without L_TKD). Prints markdown: test accuracy (%) per domain and the mean for each variant
and method, then per variant the two quantities of the missed targets, in points: Meta-KD - single -> TinyBERT-KD
(target b) and Meta-KD - its meta-teacher (target d). A method a variant did not rerun is taken from the table
(the same teachers, caches and seeds). Means are over domains of the per-domain means over seeds.
"""

import glob
import os
import sys

import pandas as pd

D = sys.argv[1] if len(sys.argv) > 1 else "docs/results"
METHODS = ("single/tinybert_kd", "meta/tinybert_kd", "meta/meta_kd")


def per_domain(rows: pd.DataFrame) -> pd.Series:
    return 100 * rows.groupby("domain").test_acc.mean()


def of(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    return rows[(rows.teacher + "/" + rows.method) == key]


table = pd.read_csv(f"{D}/amazon-table.csv")
table = table[table.sample_rate == 1.0]
meta_teacher = per_domain(table[(table.teacher == "meta") & (table.method == "teacher")])
domains = list(meta_teacher.index)
variants = {"amazon-table": table}
if os.path.exists(f"{D}/gamma2.csv"):
    g = pd.read_csv(f"{D}/gamma2.csv")
    variants["gamma2 = 0 (no L_TKD)"] = g[g.gamma2 == 0]
    half = of(g[g.gamma2 == 0.5], "meta/meta_kd").set_index(["domain", "seed"]).test_acc
    ref = of(table, "meta/meta_kd").set_index(["domain", "seed"]).test_acc
    both = half.index.intersection(ref.index)
    if len(both):
        print(f"gamma2.csv's gamma2 = 0.5 cells against amazon-table's Meta-KD (the same config): largest test "
              f"difference {100 * (half[both] - ref[both]).abs().max():.2f} pp over {len(both)} cells\n")
for f in sorted(glob.glob(f"{D}/abl-*.csv")):
    variants[os.path.basename(f)[:-4]] = pd.read_csv(f)

print("| variant | method | " + " | ".join(domains) + " | mean |")
print("|---|---|" + "---|" * (len(domains) + 1))
gaps = []
for name, rows in variants.items():
    rows = rows[(rows.method != "teacher") & (rows.sample_rate == 1.0)]
    for key in METHODS:
        if not (r := of(rows, key)).empty:
            a = per_domain(r).reindex(domains)
            print(f"| {name} | {key} | " + " | ".join(f"{v:.1f}" for v in a) + f" | {a.mean():.1f} |")
    if (mk := of(rows, "meta/meta_kd")).empty:
        continue
    m = per_domain(mk).reindex(domains)
    base = of(rows, "single/tinybert_kd")
    src = "" if not base.empty else " (single/tinybert_kd from amazon-table)"
    b = (m - per_domain(base if not base.empty else of(table, "single/tinybert_kd")).reindex(domains)).mean()
    gaps.append(f"| {name}{src} | {b:+.1f} | {(m - meta_teacher).mean():+.1f} |")
print("\nTest accuracy (%), sample rate 1.0, mean over seeds.\n")
print("| variant | b) Meta-KD - single/tinybert_kd (pp) | d) Meta-KD - meta teacher (pp) |")
print("|---|---|---|")
print("\n".join(gaps))

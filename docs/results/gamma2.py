"""Meta-KD per domain as gamma2 varies: python docs/results/gamma2.py [DIR]

Reads DIR/gamma2.csv (default DIR: docs/results) and prints markdown: Meta-KD's test accuracy (%) per gamma2 and
domain with the mean over domains, the same for dev accuracy (what a user tuning gamma2 would select on), and the
meta-teacher's test accuracy per domain (one artefact for every gamma2). Means over seeds where there are several.
"""

import sys

import pandas as pd

from metakd_ray.results.paper import md_table

D = sys.argv[1] if len(sys.argv) > 1 else "docs/results"
rows = pd.read_csv(f"{D}/gamma2.csv")
students = rows[rows.method == "meta_kd"]
for split in ("test", "dev"):
    t = 100 * students.pivot_table(index="gamma2", columns="domain", values=f"{split}_acc", aggfunc="mean")
    t["mean"] = t.mean(axis=1)
    print(f"Meta-KD {split} accuracy (%) per gamma2:\n")
    print("\n".join(md_table(["gamma2", *t.columns],
                             [[f"{g:g}", *(f"{v:.1f}" for v in r)] for g, r in zip(t.index, t.values)])), "\n")
teacher = 100 * rows[(rows.method == "teacher") & (rows.teacher == "meta")].groupby("domain").test_acc.mean()
print("Meta-teacher test accuracy (%): " + ", ".join(f"{d} {v:.1f}" for d, v in teacher.items())
      + f"; mean {teacher.mean():.1f}")

"""The scarcity curve as the preset runs it and with every model given its steps.

    python docs/results/scarcity_steps.py [DIR]

For DIR/scarcity.csv (the preset: fixed epochs) and, when any exists, DIR/scarcity-steps-r*.csv together (one run per
rate, every teacher and student with at least 50 optimisation steps: teacher.min_steps=50 distill.min_steps=50;
default DIR: docs/results): the summary's scarcity table (results.paper.scarcity_table: each teacher and student
method's mean test accuracy per rate, Meta-KD's improvement rate), then how many of the students stayed near chance
(test accuracy < 55 % on a balanced binary task) per method and rate.
"""

import glob
import os
import sys

import pandas as pd

from metakd_ray.results.paper import scarcity_table

D = sys.argv[1] if len(sys.argv) > 1 else "docs/results"
runs = {"scarcity.csv": [f"{D}/scarcity.csv"] if os.path.exists(f"{D}/scarcity.csv") else [],
        "scarcity-steps-r*.csv": sorted(p for p in glob.glob(f"{D}/scarcity-steps-r*.csv")
                                        if not p.endswith("-costs.csv"))}
for name, paths in runs.items():
    if not paths:
        continue
    rows = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    print(f"### {name}\n")
    print("\n".join(scarcity_table(rows)), "\n")
    s = rows[rows.method != "teacher"]
    s = s.assign(key=s.teacher + "/" + s.method, chance=s.test_acc < 0.55)
    counts = s.groupby(["key", "sample_rate"]).chance.agg(lambda c: f"{int(c.sum())}/{len(c)}").unstack()
    print("Students near chance (test accuracy < 55 %), of the cells run:\n")
    print("| method | " + " | ".join(f"r={r:g}" for r in counts.columns) + " |")
    print("|---|" + "---|" * len(counts.columns))
    for key, row in counts.iterrows():
        print(f"| {key} | " + " | ".join(str(v) for v in row) + " |")
    print()

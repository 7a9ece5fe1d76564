"""The scarcity curve as the preset runs it and with distill.min_steps: python docs/results/scarcity_steps.py [DIR]

For each of DIR/scarcity.csv, DIR/scarcity-steps.csv (students with distill.min_steps=50) and
DIR/scarcity-teacher-steps.csv (teachers too, teacher.min_steps=50) that exists (default DIR: docs/results): the
summary's scarcity table (results.paper.scarcity_table: each teacher and student method's mean test accuracy per rate,
Meta-KD's improvement rate), then how many of the students stayed near chance (test accuracy < 55 % on a balanced
binary task) per method and rate.
"""

import os
import sys

import pandas as pd

from metakd_ray.results.paper import scarcity_table

D = sys.argv[1] if len(sys.argv) > 1 else "docs/results"
for name in ("scarcity", "scarcity-steps", "scarcity-teacher-steps"):
    if not os.path.exists(path := f"{D}/{name}.csv"):
        continue
    rows = pd.read_csv(path)
    print(f"### {name}.csv\n")
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

"""Each distilled student's test accuracy minus its own teacher's, per domain (pp): python docs/results/gap.py [CSV]"""

import sys

import pandas as pd

df = pd.read_csv(sys.argv[1] if len(sys.argv) > 1 else "docs/results/amazon-table.csv")
df = df[df.sample_rate == 1.0]
t = df[df.method == "teacher"].set_index(["teacher", "domain", "seed"]).test_acc
s = df[(df.method != "teacher") & (df.teacher != "none")]
s = s.assign(gap=100 * (s.test_acc.values - t.loc[list(zip(s.teacher, s.domain, s.seed))].values))
print(s.pivot_table(index=["teacher", "method"], columns="domain", values="gap", margins=True,
                    margins_name="mean").round(1).to_string())

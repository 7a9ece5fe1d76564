"""The sweep's closing headline (``results.summary``): what was compared and how to read it, from the cells and
the teachers' manifests."""

from __future__ import annotations

import pandas as pd

from metakd_ray.results.summary import headline
from metakd_ray.sweep.plan import Cell, Plan


def _cells(rows, plan=None) -> pd.DataFrame:
    df = pd.DataFrame([{"cell": f"{d}|{r}|{m}|{s}|-", "domain": d, "rate": r, "method": m, "seed": s,
                        "status": st, "test_acc": acc} for d, r, m, s, st, acc in rows])
    df.attrs["plan"] = plan
    return df


def test_headline_compares_methods_and_teachers_in_two_lines():
    plan = Plan("demo", 1, (Cell("books", 0.25, "single/tinybert_kd", 0, teacher_key="ts"),
                            Cell("books", 0.25, "meta/meta_kd", 0, teacher_key="tm"))).to_json()
    df = _cells([("books", 0.25, "single/tinybert_kd", 0, "ok", 0.784), ("books", 0.25, "meta/meta_kd", 0, "ok", 0.804),
                 ("dvd", 0.25, "meta/meta_kd", 0, "pending", float("nan"))], plan)
    teachers = pd.DataFrame([{"teacher_key": "ts", "kind": "single", "best_dev": 0.8, "test_acc_books": 0.819},
                             {"teacher_key": "tm", "kind": "meta", "best_dev": 0.9, "test_acc_books": 0.889}])
    first, second = headline(df, teachers)
    assert first.startswith("[sweep] compared on books at sample rate 0.25")
    assert "single -> TinyBERT-KD 78.4 %" in first and "Meta-KD 80.4 %" in first
    assert "+2.0 pts vs single -> TinyBERT-KD" in first
    assert "single-domain 81.9 %" in first and "meta-teacher 88.9 %" in first
    assert "1 cell(s) (1 seed(s))" in second and "can be noise" in second


def test_headline_over_seeds_and_without_teachers():
    df = _cells([("books", 0.1, "meta/meta_kd", s, "ok", 0.8 + 0.01 * s) for s in range(3)]
                + [("books", 0.1, "single/tinybert_kd", s, "ok", 0.7) for s in range(3)])
    first, second = headline(df)
    assert "Meta-KD 81.0 %" in first and "+11.0 pts" in first and "teachers" not in first
    assert "3 cell(s) (3 seed(s))" in second and "noise" not in second
    assert headline(_cells([("books", 0.1, "meta/meta_kd", 0, "failed", float("nan"))])) == []

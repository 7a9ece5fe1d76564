"""End to end on the real Amazon data and the real pretrained MiniLM-L6 teacher, kept small: one cell, single
process (the reference the Ray stages distribute), a few hundred reviews at 32 tokens."""

from __future__ import annotations

import pytest

from metakd_ray import config as C
from metakd_ray.local import run_cell

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_meta_teacher_and_meta_kd_student_on_real_data(tmp_path, shared_data):
    cfg = C.from_dict({}, [f"data.root={shared_data}", "data.max_length=32", "teacher.epochs=2", "teacher.lr=1e-4",
                           "distill.stage1_epochs=1", "distill.stage2_epochs=1", "distill.stage2_lr=1e-4",
                           f"storage.root={tmp_path}"])
    history: list[dict] = []
    res = run_cell(cfg, "books", "meta/meta_kd", 0.05, 0, tmp_path / "cell", log=history.append)
    from metakd_ray import data as D

    pool = D.subsample(D.load_splits(cfg.data)["train"], 0.05, 0)  # 5 % of each (domain, label) group
    assert res["n_teacher_train"] == len(pool) and 300 < len(pool) < 340
    assert res["n_student_train"] == D.column(pool, "domain").count("books")
    teacher = [m for m in history if m["stage"] == "teacher-meta"]
    assert len(teacher) == 2 and teacher[1]["train_ce"] < teacher[0]["train_ce"]
    assert set(res["teacher_test"]) == {"books", "dvd", "electronics", "kitchen", "mean"}
    assert res["teacher_test"]["mean"] > 0.6  # the pretrained sentence encoder learns sentiment fast
    stage1 = [m for m in history if m["stage"] == "stage1"]
    assert {"train_emb", "train_hid", "train_att", "train_tkd"} <= set(stage1[0])
    assert 0.0 <= res["student_test"]["books"] <= 1.0
    assert res["params"]["teacher"]["params"] == 22_565_376 and res["params"]["student"]["layers"] == 3
    assert (tmp_path / "cell" / "teacher" / "best" / "heads.pt").is_file()

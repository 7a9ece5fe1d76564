"""Every teacher kind and every student method, end to end on a tiny random BERT and three toy domains."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from toy import DOMAINS, tiny_config, toy_splits, toy_tokenizer

from metakd_ray import config as C
from metakd_ray import models as M
from metakd_ray.local import run_cell


# Seeded results of each method on the toy task (tiny BERT, torch 2.13 CPU, compute.precision=fp32; re-pinned when
# epoch order became a function of (seed, epoch) grouped by length and the student's heads got their own seed): the teacher's test accuracy per domain,
# the student's on the target, and the last epoch's mean stage-2 (or fine-tuning) loss. Any change that moves these
# numbers changes what a cell computes (data, initialisation, an objective, the loop) and must say so.
PINNED = {
    "single/tinybert_kd": ({"beta": 0.875}, 0.5, 0.690917),
    "mix/tinybert_kd": ({"alpha": 1.0, "beta": 0.875, "gamma": 0.875}, 0.875, 0.674444),
    "mtl/tinybert_kd": ({"alpha": 0.75, "beta": 0.875, "gamma": 0.75}, 0.75, 0.668808),
    "meta/tinybert_kd": ({"alpha": 0.875, "beta": 0.875, "gamma": 0.875}, 0.875, 0.674339),
    "meta/meta_kd": ({"alpha": 0.875, "beta": 0.875, "gamma": 0.875}, 0.875, 0.674340),
    "none/finetune": (None, 0.625, 0.621389),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", C.VALID_METHODS)
def test_every_method_trains_end_to_end(tmp_path, method):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path)
    tokenizer = toy_tokenizer()
    encoder = M.random_encoder(vocab_size=len(tokenizer), max_position=32, dropout=0.0, seed=0)
    history = []
    res = run_cell(cfg, "beta", method, 1.0, 0, tmp_path / "cell", splits=toy_splits(), encoder=encoder,
                   tokenizer=tokenizer, log=history.append)
    kind, student = method.split("/")

    by_stage = defaultdict(list)
    for m in history:
        by_stage[m["stage"]].append(m)
    if kind != "none":
        t = by_stage[f"teacher-{kind}"]
        assert len(t) == 4
        assert t[-1]["train_loss"] < t[0]["train_loss"], t
        expected_domains = {"beta"} if kind == "single" else set(DOMAINS)
        assert set(res["teacher_test"]) == expected_domains | {"mean"}
        assert {d: a for d, a in res["teacher_test"].items() if d != "mean"} == PINNED[method][0]
        if kind == "meta":
            assert {"ce", "domain_ce"} <= {k[len("train_"):] for k in t[0] if k.startswith("train_")}
    if student != "finetune":
        s1 = by_stage["stage1"]
        assert len(s1) == 3 and s1[-1]["train_loss"] < s1[0]["train_loss"], s1
        terms = {k[len("train_"):] for k in s1[0] if k.startswith("train_")}
        assert {"emb", "hid", "att"} <= terms
        assert ("tkd" in terms) == (student == "meta_kd")
    last = by_stage["finetune" if student == "finetune" else "stage2"]
    assert len(last) == 3 and last[-1]["train_loss"] < last[0]["train_loss"], last
    assert "dev_acc_beta" in last[0]
    assert set(res["student_test"]) == {"beta", "mean"}
    assert res["student_test"]["beta"] == PINNED[method][1]
    assert last[-1]["train_loss"] == pytest.approx(PINNED[method][2], rel=1e-4)
    assert (tmp_path / "cell" / "student" / "best").is_dir() and (tmp_path / "cell" / "config.yaml").is_file()


@pytest.mark.timeout(300)
def test_rerun_resumes_from_checkpoints_without_retraining(tmp_path):
    cfg = tiny_config(tmp_path)
    tokenizer = toy_tokenizer()
    kw = dict(splits=toy_splits(), tokenizer=tokenizer)
    first: list[dict] = []
    r1 = run_cell(cfg, "beta", "meta/meta_kd", 1.0, 0, tmp_path / "cell",
                  encoder=M.random_encoder(vocab_size=len(tokenizer), max_position=32, dropout=0.0, seed=0),
                  log=first.append, **kw)
    second: list[dict] = []
    r2 = run_cell(cfg, "beta", "meta/meta_kd", 1.0, 0, tmp_path / "cell",
                  encoder=M.random_encoder(vocab_size=len(tokenizer), max_position=32, dropout=0.0, seed=0),
                  log=second.append, **kw)
    assert len(first) == 4 + 3 + 3 and second == []  # every stage was complete: nothing trained again
    assert r2["student_test"] == r1["student_test"] and r2["teacher_test"] == r1["teacher_test"]


def test_no_in_domain_teacher_scores_ignore_the_target_domain():
    """exclude_target: the teacher's rows are scored without the target domain's prototypes."""
    from metakd_ray.teacher import compute_prototype_scores

    g = torch.Generator().manual_seed(0)
    n, k, c = 60, 3, 2
    feats = torch.randn(n, 8, generator=g)
    labels = torch.arange(n) % c
    doms = (torch.arange(n) // c) % k
    tcfg = C.TeacherConfig()
    base = compute_prototype_scores(feats, labels, doms, k, c, tcfg, excluded_domain=1)
    moved = feats.clone()
    moved[doms == 1] += 5 * torch.randn(int((doms == 1).sum()), 8, generator=g)  # change only the target's data
    again = compute_prototype_scores(moved, labels, doms, k, c, tcfg, excluded_domain=1)
    assert torch.allclose(base[doms != 1], again[doms != 1])
    assert not torch.allclose(base[doms == 1], again[doms == 1])
    full = compute_prototype_scores(feats, labels, doms, k, c, tcfg)
    assert torch.allclose(base[doms == 1], full[doms == 1])  # the target's own rows: scored against all domains
    assert not torch.allclose(base[doms != 1], full[doms != 1])

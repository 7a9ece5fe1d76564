"""Every teacher kind and every student method, end to end on a tiny random BERT and three toy domains."""

from __future__ import annotations

import random
from collections import defaultdict

import datasets
import pytest
import torch

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.local import run_cell

DOMAINS = ("alpha", "beta", "gamma")
SHARED = ["good", "bad", "fine", "awful"]
WORDS = {d: [f"{d}{i}" for i in range(8)] for d in DOMAINS}


def toy_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SHARED, *[w for ws in WORDS.values() for w in ws]]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


def toy_splits(n_per_domain: int = 48) -> D.Splits:
    """Label 1 iff a positive word (good/fine) occurs; domain words are noise that differs per domain."""
    rng = random.Random(0)
    parts = defaultdict(list)
    for di, dom in enumerate(DOMAINS):
        for i in range(n_per_domain):
            label = i % 2
            cue = rng.choice(["good", "fine"] if label else ["bad", "awful"])
            words = [rng.choice(WORDS[dom]) for _ in range(rng.randint(2, 6))]
            words.insert(rng.randint(0, len(words)), cue)
            split = "test" if i % 6 == 0 else "dev" if i % 6 == 1 else "train"
            parts[split].append({"id": f"{dom}/{i:03d}", "text": " ".join(words), "text_pair": "", "label": label,
                                 "domain": dom, "domain_id": di})
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()})
    return D.Splits(data=dd, label_names=("negative", "positive"), domains=DOMAINS)


def tiny_config(tmp_path, **extra) -> C.Config:
    overrides = [
        "data.dataset=table", "data.table.train=x", "data.table.test=y", f"data.domains=[{', '.join(DOMAINS)}]",
        "data.max_length=16", "model.student.num_layers=1", "model.dropout=0.0",
        "teacher.epochs=4", "teacher.lr=0.003", "teacher.batch_size=8", "teacher.warmup=0.0",
        "distill.stage1_epochs=3", "distill.stage1_lr=0.003", "distill.stage2_epochs=3", "distill.stage2_lr=0.003",
        "distill.batch_size=8", "distill.warmup=0.0", f"storage.root={tmp_path}",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return C.from_dict({}, overrides)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", C.VALID_METHODS)
def test_every_method_trains_end_to_end(tmp_path, method):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path)
    tokenizer = toy_tokenizer(tmp_path)
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
        assert all(0.0 <= a <= 1.0 for a in res["teacher_test"].values())
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
    assert 0.0 <= res["student_test"]["beta"] <= 1.0
    assert (tmp_path / "cell" / "student" / "best").is_dir() and (tmp_path / "cell" / "config.yaml").is_file()


@pytest.mark.timeout(300)
def test_rerun_resumes_from_checkpoints_without_retraining(tmp_path):
    cfg = tiny_config(tmp_path)
    tokenizer = toy_tokenizer(tmp_path)
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

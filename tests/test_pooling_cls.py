"""``model.pooling: cls``: h(x) is BERT's pooled output, tanh(W h_[CLS] + b), starting from the checkpoint's pooler
weights, and a cls student exports with the Student's logits.

The reference is computed by hand from a tiny random BERT saved *with* its pooler (our encoders load without one and
read the pooler from the checkpoint file), and from transformers' own ``pooler_output``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from toy import NO_METAKD, tiny_config, toy_tokenizer

from metakd_ray import cell as CELL
from metakd_ray import models as M
from metakd_ray.export import export_student
from metakd_ray.losses import pooled_representation
from metakd_ray.models.encoders import _from_pretrained
from metakd_ray.models.heads import checkpoint_pooler

LABELS = ("negative", "positive")
TEXTS = ["good alpha1 beta2", "awful", "fine gamma3 gamma4 alpha0 beta1 bad", "zzz unknown good"]


def bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=32, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random BERT with a pooler (non-trivial pooler weights), saved as a checkpoint folder, and the model."""
    from transformers import BertModel

    tok = toy_tokenizer()
    torch.manual_seed(0)
    bert = BertModel(bert_config(len(tok)), add_pooling_layer=True).eval()
    with torch.no_grad():
        bert.pooler.dense.weight.normal_(0.0, 0.5)
        bert.pooler.dense.bias.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "bert"
    bert.save_pretrained(path)
    tok.save_pretrained(path)
    return path, bert, tok


def batch(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padded rows: cls pooling must ignore padding, unlike a mean
    return enc


def test_pooled_representation_cls_is_the_cls_vector():
    hidden = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(pooled_representation(hidden, mask, "cls"), hidden[:, 0], rtol=0, atol=0)


def test_cls_models_pool_with_the_checkpoints_pooler(checkpoint):
    path, bert, tok = checkpoint
    encoder = _from_pretrained(str(path))  # as load_encoder loads it: no pooler module
    assert getattr(encoder, "pooler", None) is None
    weight, bias = checkpoint_pooler(encoder)
    torch.testing.assert_close(weight, bert.pooler.dense.weight, rtol=0, atol=0)
    enc = batch(tok)
    with torch.no_grad():
        ref = bert(**enc)
        by_hand = torch.tanh(ref.last_hidden_state[:, 0] @ weight.T + bias)  # pooler(hidden[:, 0])
    torch.testing.assert_close(by_hand, ref.pooler_output)
    models = [M.Student(encoder, 2, teacher_hidden_size=48, pooling="cls"),
              M.ClassifierTeacher(encoder, 2, pooling="cls"), M.MTLTeacher(encoder, 2, 3, pooling="cls"),
              M.MetaTeacher(encoder, 2, 3, pooling="cls")]
    domain_ids = torch.zeros(len(TEXTS), dtype=torch.long)
    for model in models:
        model.eval()
        torch.testing.assert_close(model.pooler.dense.weight, weight, rtol=0, atol=0)
        with torch.no_grad():
            out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], domain_ids=domain_ids)
        torch.testing.assert_close(out.pooled, by_hand, rtol=1e-5, atol=1e-6)
    student = models[0]
    with torch.no_grad():
        logits = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits
    torch.testing.assert_close(logits, student.classifier(by_hand), rtol=1e-5, atol=1e-6)


def test_pooler_found_under_a_task_models_prefix(tmp_path, checkpoint):
    """A ``BertForSequenceClassification`` checkpoint keeps the pooler as ``bert.pooler.dense.*``."""
    from transformers import BertForSequenceClassification

    _, bert, tok = checkpoint
    model = BertForSequenceClassification(bert_config(len(tok)))
    model.bert.load_state_dict(bert.state_dict())
    model.save_pretrained(tmp_path / "task")
    weight, _ = checkpoint_pooler(_from_pretrained(str(tmp_path / "task")))
    torch.testing.assert_close(weight, bert.pooler.dense.weight, rtol=0, atol=0)


def test_without_a_checkpoint_pooler_other_heads_are_unchanged(tmp_path):
    """A random encoder has no checkpoint: BERT's initialiser. Mean students carry no pooler weights, and the other
    heads draw the same weights whatever the pooling (the pooler is built last)."""
    tok = toy_tokenizer()
    encoder = M.random_encoder(vocab_size=len(tok), max_position=32, seed=0)
    assert checkpoint_pooler(encoder) is None
    students = {p: CELL.build_student(tiny_config(tmp_path, f"model.pooling={p}"), encoder, tok, "finetune", 2, 3,
                                      None, seed=3) for p in ("mean", "cls")}
    mean, cls = (students[p].state_dict() for p in ("mean", "cls"))
    assert set(cls) - set(mean) == {"pooler.dense.weight", "pooler.dense.bias"} and set(mean) <= set(cls)
    for k in mean:
        torch.testing.assert_close(cls[k], mean[k], rtol=0, atol=0)
    assert 0.01 < float(cls["pooler.dense.weight"].std()) < 0.03  # normal(0, 0.02)


def test_cls_student_saves_and_loads_its_trained_pooler(tmp_path, checkpoint):
    path, _, tok = checkpoint
    student = M.Student(_from_pretrained(str(path)), 2, teacher_hidden_size=32, pooling="cls")
    with torch.no_grad():
        student.pooler.dense.weight.add_(1.0)  # "trained": no longer the checkpoint's
    student.save_pretrained(tmp_path / "saved", tok)
    again = M.Student.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again.pooler.dense.weight, student.pooler.dense.weight, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Export: plain transformers, in a process without metakd_ray
# ----------------------------------------------------------------------------------------------------------

LOADER = NO_METAKD + r'''
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
json.dump(dict(cls=type(model).__name__, input_ids=enc["input_ids"].tolist(), logits=logits.tolist()),
          open(out, "w"))
'''


@dataclass(frozen=True)
class FakeTeacher:
    """What ``build_student`` reads from a meta teacher source (so W_h, the domain head and W_d exist)."""

    kind: str = "live"
    layer_map: tuple[int, ...] = (0, 2)
    hidden_size: int = 48
    domain_hidden_size: int | None = 40


def test_cls_student_exports_with_identical_logits(tmp_path, checkpoint):
    from safetensors import safe_open

    path, _, tok = checkpoint
    cfg = tiny_config(tmp_path, "model.pooling=cls", "model.dropout=0.1")
    student = CELL.build_student(cfg, _from_pretrained(str(path)), tok, "meta_kd", 2, 3, FakeTeacher(), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # logits far from zero, and a pooler unlike the checkpoint's
        student.classifier.weight.copy_(torch.randn(student.classifier.weight.shape, generator=g) * 2.0)
        student.pooler.dense.weight.add_(torch.randn(student.pooler.dense.weight.shape, generator=g) * 0.3)
    student.eval()
    enc = batch(tok)
    with torch.no_grad():
        expected = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                           domain_ids=torch.zeros(len(TEXTS), dtype=torch.long)).logits
    out = export_student(student, tok, tmp_path / "export", LABELS, max_length=16)
    assert json.loads((out / "config.json").read_text())["metakd_pooling"] == "cls"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        torch.testing.assert_close(f.get_tensor("pooler.dense.weight"), student.pooler.dense.weight, rtol=0, atol=0)
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= keys
    assert all(k.startswith(("encoder.", "classifier.", "pooler.")) for k in keys), sorted(keys)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    (tmp_path / "loader.py").write_text(LOADER)
    run = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(out), json.dumps(TEXTS),
                          str(tmp_path / "out.json")], cwd=tmp_path,
                         env=env, capture_output=True, stdin=subprocess.DEVNULL, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["cls"] == "MetaKDStudentForSequenceClassification"
    assert got["input_ids"] == enc["input_ids"].tolist()
    diff = (torch.tensor(got["logits"]) - expected).abs().max().item()
    assert diff <= 1e-5, diff
    assert expected.abs().max() > 0.5  # non-trivial logits

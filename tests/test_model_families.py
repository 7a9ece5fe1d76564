"""Encoder families beyond BERT (metakd_ray.models.families): RoBERTa, ELECTRA, DistilBERT and DeBERTa-v2 as teachers
and students, next to BERT.

Every model is a tiny random encoder (hidden 32, 4 layers, 4 heads, the toy vocabulary) built from its family's
transformers Config class; nothing is downloaded. The toy WordPiece tokenizer (tests/toy.py) feeds every family: token
ids are only ids. Scores are checked three ways: against HF's own eager attention probabilities (softmax of ours with
the family's mask), against a naive recomputation from the previous layer's hidden states written here without the
adapters (BERT, ELECTRA, DistilBERT and DeBERTa-v2 with its relative-position terms), and teacher against a student
made of its first layers (the same scores, so teacher and student of a family form them the same way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import transformers as T
from toy import NO_METAKD, tiny_config, toy_splits, toy_tokenizer

from metakd_ray import cell as CELL
from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray import preflight
from metakd_ray.distill import LiveTeacher, student_loss
from metakd_ray.export import export_student
from metakd_ray.hf_student.modeling_metakd import no_pooler_kwargs
from metakd_ray.models import families as F

TOK = toy_tokenizer()
V = len(TOK)
SHAPE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# DeBERTa-v3's settings: relative attention with both position terms, log buckets, keys shared with content.
DEBERTA_V3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16,
                  share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)


def tiny_configs() -> dict[str, T.PretrainedConfig]:
    return {
        "bert": T.BertConfig(**SHAPE),
        "roberta": T.RobertaConfig(**SHAPE, pad_token_id=0),  # the toy tokenizer pads with 0
        "electra": T.ElectraConfig(**SHAPE, embedding_size=16),  # embeddings projected to the hidden width
        "distilbert": T.DistilBertConfig(vocab_size=V, dim=32, n_layers=4, n_heads=4, hidden_dim=37,
                                         max_position_embeddings=64, dropout=0.0, attention_dropout=0.0),
        "deberta-v2": T.DebertaV2Config(**SHAPE, **DEBERTA_V3),
    }


NAMES = tuple(tiny_configs())
LAYERS = {"bert": "encoder.layer", "roberta": "encoder.layer", "electra": "encoder.layer",
          "distilbert": "transformer.layer", "deberta-v2": "encoder.layer"}


def tiny(name: str, seed: int = 0, **changes) -> torch.nn.Module:
    config = tiny_configs()[name]
    for k, v in changes.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    return T.AutoModel.from_config(config, attn_implementation=F.family_of(config).attn_implementation,
                                   **no_pooler_kwargs(config)).eval()


def get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def inputs(b: int = 3, t: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, V, (b, t), generator=g)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, 5:] = 0  # padded rows
    attention_mask[2, 3:] = 0
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------
# Layers and scores
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_layer_list_and_score_shapes(name):
    encoder = tiny(name)
    assert F.family_of(encoder).model_types[0] == name
    layers = F.layer_list(encoder)
    assert layers is get(encoder, LAYERS[name]) and len(layers) == 4
    input_ids, mask = inputs()
    out = M.encode(encoder, input_ids, mask, torch.zeros_like(input_ids))
    assert len(out.hidden_states) == 5 and all(h.shape == (3, 9, 32) for h in out.hidden_states)
    assert len(out.attention_scores) == 4 and all(s.shape == (3, 4, 9, 9) for s in out.attention_scores)
    assert torch.equal(out.hidden_states[-1], out.last_hidden)
    assert encoder.config._attn_implementation == ("eager" if name == "deberta-v2" else "sdpa")


@pytest.mark.parametrize("name", NAMES)
def test_softmax_of_scores_is_the_models_own_attention(name):
    encoder = tiny(name)
    input_ids, mask = inputs()
    eager = tiny(name)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ours = M.encode(encoder, input_ids, mask).attention_scores
        hf = eager(input_ids=input_ids, attention_mask=mask, output_attentions=True).attentions
    low = torch.finfo(torch.float32).min
    if name == "deberta-v2":  # DeBERTa masks query rows too (pair mask)
        keep = (mask[:, None, :, None] * mask[:, None, None, :]).bool()  # (b, 1, t, t)
        probs = [torch.softmax(s.masked_fill(~keep, low), dim=-1) for s in ours]
    else:  # additive key mask
        probs = [torch.softmax(s + (1.0 - mask[:, None, None, :].float()) * low, dim=-1) for s in ours]
    for p, h in zip(probs, hf, strict=True):
        torch.testing.assert_close(p, h, atol=1e-5, rtol=0)


def naive_dot_scores(encoder, name: str, hidden_states) -> list[torch.Tensor]:
    """Q K^T / sqrt(d_head) from each layer's input, with the projections looked up by hand."""
    qk = ("attention.q_lin", "attention.k_lin") if name == "distilbert" else ("attention.self.query",
                                                                              "attention.self.key")
    out = []
    for i, layer in enumerate(get(encoder, LAYERS[name])):
        x = hidden_states[i]  # (b, t, d)
        q = get(layer, qk[0])(x).view(*x.shape[:2], 4, 8).transpose(1, 2)  # (b, h, t, dh)
        k = get(layer, qk[1])(x).view(*x.shape[:2], 4, 8).transpose(1, 2)
        out.append(q @ k.transpose(-1, -2) / 8 ** 0.5)
    return out


def naive_deberta_scores(encoder, hidden_states) -> list[torch.Tensor]:
    """DeBERTa's disentangled scores without log buckets or shared keys, written out: for query i and key j with
    delta = clamp(i - j + k, 0, 2k - 1), (q_i.k_j + q_i.Kr[delta] + k_j.Qr[delta]) / sqrt(3 d_head)."""
    rel = encoder.encoder.get_rel_embedding()  # (2k, d)
    span = rel.shape[0] // 2
    out = []
    for i, layer in enumerate(encoder.encoder.layer):
        attn, x = layer.attention.self, hidden_states[i]
        b, t, _ = x.shape

        def heads(y):
            return y.view(*y.shape[:-1], 4, 8).transpose(-3, -2)  # (..., h, n, dh)

        q, k = heads(attn.query_proj(x)), heads(attn.key_proj(x))  # (b, h, t, dh)
        kr, qr = heads(attn.pos_key_proj(rel)), heads(attn.pos_query_proj(rel))  # (h, 2k, dh)
        pos = torch.arange(t)
        delta = (pos[:, None] - pos[None, :] + span).clamp(0, 2 * span - 1)  # (t, t)
        c2c = q @ k.transpose(-1, -2)
        c2p = torch.einsum("bhid,hijd->bhij", q, kr[:, delta])
        p2c = torch.einsum("bhjd,hijd->bhij", k, qr[:, delta])
        out.append((c2c + c2p + p2c) / (3 * 8) ** 0.5)
    return out


@pytest.mark.parametrize("name", ["bert", "electra", "distilbert", "deberta-v2"])
def test_scores_equal_a_naive_recomputation(name):
    if name == "deberta-v2":  # plain relative positions (clamped at 8 < t): the formula above, exactly
        encoder = tiny(name, share_att_key=False, position_buckets=-1, max_relative_positions=8)
    else:
        encoder = tiny(name)
    input_ids, mask = inputs(t=12)
    with torch.no_grad():
        out = M.encode(encoder, input_ids, mask)
        naive = (naive_deberta_scores if name == "deberta-v2" else
                 lambda e, h: naive_dot_scores(e, name, h))(encoder, out.hidden_states)
    for ours, ref in zip(out.attention_scores, naive, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_deberta_scores_reach_the_position_projections():
    encoder = tiny("deberta-v2", share_att_key=False)
    out = M.encode(encoder, *inputs())
    sum(s.sum() for s in out.attention_scores).backward()
    attn = encoder.encoder.layer[0].attention.self
    for proj in (attn.query_proj, attn.key_proj, attn.pos_key_proj, attn.pos_query_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert encoder.encoder.rel_embeddings.weight.grad.abs().sum() > 0
    assert not attn.query_proj._forward_hooks and not attn.pos_dropout._forward_hooks  # hooks removed
    with pytest.raises(TypeError, match="live teacher"):  # the cache cannot rebuild these scores from Q and K
        F.query_key_projections(encoder)


@pytest.mark.parametrize("name", NAMES)
def test_layer_zero_from_the_embedding_modules_and_saved_shapes(name, tmp_path):
    """What a teacher cache needs besides Q/K: hidden_states[0] from the embeddings alone, and the shape fields of a
    saved config.json whatever the family calls them."""
    encoder = tiny(name)
    input_ids, mask = inputs()
    types = torch.zeros_like(input_ids)
    with torch.no_grad():
        torch.testing.assert_close(F.EmbeddingOutput(encoder)(input_ids, mask, types),
                                   M.encode(encoder, input_ids, mask, types).hidden_states[0], atol=0, rtol=0)
    encoder.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert [F.config_value(saved, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")] == [4, 32, 4]


# ----------------------------------------------------------------------------------------------------------
# Students
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_student_from_teacher_keeps_the_chosen_layers(name):
    teacher = tiny(name)
    student = M.student_from_teacher(teacher, layers=[2, 4])
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    assert M.kept_teacher_layers(student) == (2, 4) and teacher.config.num_hidden_layers == 4
    t_layers, s_layers = get(teacher, LAYERS[name]), get(student, LAYERS[name])
    assert len(s_layers) == 2
    for j, i in enumerate((2, 4)):
        ts, ss = t_layers[i - 1].state_dict(), s_layers[j].state_dict()
        assert ts.keys() == ss.keys() and all(torch.equal(ts[k], ss[k]) for k in ts)
    se, te = student.embeddings.state_dict(), teacher.embeddings.state_dict()
    assert all(torch.equal(se[k], te[k]) for k in te)
    with torch.no_grad():  # deep copies: the teacher is untouched
        next(s_layers[0].parameters()).add_(1.0)
    assert not torch.equal(next(s_layers[0].parameters()), next(t_layers[1].parameters()))
    # its saved config rebuilds the same 2-layer model
    again = T.AutoModel.from_config(T.AutoConfig.for_model(**student.config.to_dict()))
    assert len(get(again, LAYERS[name])) == 2


@pytest.mark.parametrize("name", NAMES)
def test_student_of_the_first_layers_reproduces_the_teachers_outputs(name):
    teacher = tiny(name)
    student = M.student_from_teacher(teacher, layers=[1, 2])
    input_ids, mask = inputs()
    with torch.no_grad():
        t, s = M.encode(teacher, input_ids, mask), M.encode(student, input_ids, mask)
    for m in range(3):
        torch.testing.assert_close(s.hidden_states[m], t.hidden_states[m], atol=1e-6, rtol=0)
    for m in range(2):
        torch.testing.assert_close(s.attention_scores[m], t.attention_scores[m], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["distilbert", "deberta-v2"])
def test_random_student_has_the_teachers_family(name):
    teacher = tiny(name)
    rnd = C.StudentConfig(source="random", num_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=20)
    student = M.build_student(C.ModelConfig(student=rnd), teacher, TOK)
    assert type(student) is type(teacher) and F.family_of(student) is F.family_of(teacher)
    d = M.describe_models(teacher, student)
    assert (d["student"]["layers"], d["student"]["hidden"], d["student"]["intermediate"]) == (2, 16, 20)
    M.check_attention_compatible(teacher, student)
    assert M.encode(student, *inputs()).attention_scores[1].shape == (3, 4, 9, 9)


def test_attention_compatibility_and_max_length_per_family():
    M.check_attention_compatible(tiny("bert"), tiny("roberta"))  # both Q K^T / sqrt(d_head)
    with pytest.raises(ValueError, match=r"teacher \(DeBERTa-v2\) forms disentangled scores and the student "
                                         r"\(BERT\) dot"):
        M.check_attention_compatible(tiny("deberta-v2"), tiny("bert"))
    M.check_max_length(tiny("roberta"), 63)  # positions 1..63 after the padding index 0
    with pytest.raises(ValueError, match="max_length=64 exceeds the encoder's 63"):
        M.check_max_length(tiny("roberta"), 64)
    M.check_max_length(tiny("distilbert"), 64)


@pytest.mark.parametrize("name", ["distilbert", "deberta-v2"])
def test_load_encoder_and_task_models_from_a_directory(name, tmp_path):
    tiny(name).save_pretrained(tmp_path / "enc")
    TOK.save_pretrained(tmp_path / "enc")
    encoder, tokenizer = M.load_encoder(str(tmp_path / "enc"), dropout=0.25)
    assert type(encoder) is type(tiny(name)) and len(tokenizer) == V
    assert all(getattr(encoder.config, k) == 0.25 for k in F.family_of(encoder).dropout)
    student = M.Student(M.student_from_teacher(encoder, layers=[3]), 2, teacher_hidden_size=32).eval()
    again = M.Student.from_pretrained(student.save_pretrained(tmp_path / "student")).eval()
    input_ids, mask = inputs()
    assert torch.equal(student(input_ids, mask).logits, again(input_ids, mask).logits)
    assert M.kept_teacher_layers(again.encoder) == (3,)


# ----------------------------------------------------------------------------------------------------------
# Training: one step of every method that distils hidden states and attention scores
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    rows = toy_splits()["train"].select([0, 1, 9, 17, 40, 80])
    ds = D.tokenize(rows, TOK, 32).add_column("prototype_score", [0.9, -0.4, 0.2, 0.7, -0.8, 0.0])
    b = D.collator(TOK)([ds[i] for i in range(len(ds))])
    assert (b["attention_mask"] == 0).any()
    return b


@pytest.mark.parametrize("name", NAMES)
def test_a_student_trains_one_step_with_each_layer_method(name, batch, tmp_path):
    cfg = tiny_config(tmp_path, "model.student.num_layers=2", "model.dropout=0.0")
    teacher_encoder = tiny(name, seed=1)
    meta_teacher = M.MetaTeacher(teacher_encoder, 2, 3, dropout=0.0).eval()
    live = LiveTeacher(meta_teacher, M.student_layer_map(cfg.model, 4))  # (0, 2, 4)
    for method in ("tinybert_kd", "meta_kd"):
        for objective in ("layers", "kd"):
            student = CELL.build_student(cfg, teacher_encoder, TOK, method, 2, 3, live, seed=0).train()
            assert F.family_of(student.encoder) is F.family_of(teacher_encoder)
            before = student_loss(method, objective, student, batch, live, cfg.distill)
            assert {"emb", "hid", "att"} <= set(before.terms) and before.terms["att"].sum() > 0
            assert ("tkd" in before.terms) is (method == "meta_kd")
            before.total.backward()
            attn = F.self_attention_modules(student.encoder)[0]
            query = getattr(attn, F.family_of(student.encoder).query)
            assert query.weight.grad is not None and query.weight.grad.abs().sum() > 0  # the attention term trains Q
            opt = torch.optim.SGD(student.parameters(), lr=1e-3)
            opt.step()
            with torch.no_grad():
                after = student_loss(method, objective, student, batch, live, cfg.distill)
            assert torch.isfinite(after.total) and after.total < before.total, (method, objective)


# ----------------------------------------------------------------------------------------------------------
# Export: plain transformers, in a process that never imports metakd_ray
# ----------------------------------------------------------------------------------------------------------

LOADER = NO_METAKD + r'''
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

results = []
for case in json.load(open(sys.argv[1])):
    tok = AutoTokenizer.from_pretrained(case["dir"])
    model = AutoModelForSequenceClassification.from_pretrained(case["dir"], trust_remote_code=True).eval()
    enc = tok(case["texts"], case["pairs"], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    results.append(dict(encoder=type(model.encoder).__name__, input_ids=enc["input_ids"].tolist(),
                        logits=logits.tolist()))
assert "metakd_ray" not in sys.modules, sorted(m for m in sys.modules if m.startswith("metakd_ray"))
json.dump(results, open(sys.argv[2], "w"))
'''

TEXTS = ["good alpha1 beta2", "awful gamma0 gamma1 gamma2 bad", "fine"]
PAIRS = ["bad beta3", "good", "alpha4 alpha5 awful fine"]  # segment ids 1: DistilBERT's export must drop them


@dataclass(frozen=True)
class FakeTeacher:
    """What ``cell.build_student`` reads from a meta teacher source (layer map for a 2-layer student)."""

    kind: str = "live"
    layer_map: tuple[int, ...] = (0, 2, 4)
    hidden_size: int = 32
    domain_hidden_size: int | None = 32


def test_every_family_exports_to_plain_transformers_with_the_students_logits(tmp_path):
    cfg = tiny_config(tmp_path, "model.student.num_layers=2", "model.dropout=0.1", "model.pooling=mean")
    cases, expected = [], []
    for i, name in enumerate(NAMES):
        student = CELL.build_student(cfg, tiny(name, seed=i), TOK, "meta_kd", 3, 3, FakeTeacher(), seed=i)
        assert student.W_h is not None and student.domain_head is not None  # training-only parts, left out
        with torch.no_grad():
            student.classifier.weight.mul_(30.0)
        path = export_student(student, TOK, tmp_path / name, ("a", "b", "c"), max_length=16)
        saved = json.loads((path / "config.json").read_text())
        assert saved["encoder_config"]["model_type"] == name
        enc = TOK(TEXTS, PAIRS, padding=True, truncation=True, max_length=16, return_tensors="pt")
        assert (enc["token_type_ids"] == 1).any() and (enc["attention_mask"] == 0).any()
        student.eval()
        with torch.no_grad():
            logits = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                             domain_ids=torch.zeros(len(TEXTS), dtype=torch.long)).logits
        assert logits.abs().max() > 0.5  # non-trivial logits
        cases.append(dict(dir=str(path), texts=TEXTS, pairs=PAIRS))
        expected.append(dict(encoder=type(student.encoder).__name__, input_ids=enc["input_ids"].tolist(),
                             logits=logits))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "loader.py").write_text(LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "cases.json"),
                          str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True,
                         stdin=subprocess.DEVNULL, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, exp, got in zip(NAMES, expected, json.loads((tmp_path / "out.json").read_text()), strict=True):
        assert got["encoder"] == exp["encoder"] and got["input_ids"] == exp["input_ids"], name
        diff = (torch.tensor(got["logits"]) - exp["logits"]).abs().max().item()
        assert diff <= 1e-5, (name, diff)


# ----------------------------------------------------------------------------------------------------------
# Unsupported families: one line listing the supported ones
# ----------------------------------------------------------------------------------------------------------

SUPPORTED = "allowed families: bert, roberta, electra, distilbert, deberta-v2 ("


def test_unsupported_family_fails_in_one_line(tmp_path):
    gpt2 = T.GPT2Model(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    for call in (lambda: F.family_of(gpt2), lambda: M.student_from_teacher(gpt2, layers=[1]),
                 lambda: M.encode(gpt2, *inputs())):
        with pytest.raises(F.UnsupportedFamily) as e:
            call()
        assert str(e.value).startswith("is a 'gpt2' model; " + SUPPORTED) and "\n" not in str(e.value)
    gpt2.save_pretrained(tmp_path / "gpt2")
    TOK.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(M.ModelLoadError) as e:
        M.load_encoder(str(tmp_path / "gpt2"))
    assert str(e.value) == f"model {str(tmp_path / 'gpt2')!r} is a 'gpt2' model; " + str(e.value).split("; ", 1)[1]
    assert SUPPORTED in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model_type", ["gpt2", "t5", "an-architecture-transformers-lacks"])
def test_validation_refuses_an_unsupported_teacher_in_one_line(model_type, tmp_path):
    d = tmp_path / model_type
    if model_type == "gpt2":
        T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4).save_pretrained(d)
    elif model_type == "t5":
        T.T5Config(vocab_size=V, d_model=32, num_layers=2, num_heads=4).save_pretrained(d)
    else:  # read from config.json: transformers could not even load this config
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32}))
    cfg = tiny_config(tmp_path, f"model.teacher={d}")
    errors = preflight.model_errors(cfg)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(f"model.teacher: {str(d)!r} is a {model_type!r} model; {SUPPORTED}"), errors


def test_validation_accepts_every_supported_family(tmp_path):
    for name in NAMES:
        tiny(name).save_pretrained(tmp_path / name)
        TOK.save_pretrained(tmp_path / name)
        cfg = tiny_config(tmp_path, f"model.teacher={tmp_path / name}", "model.student.num_layers=2",
                          "model.student.num_attention_heads=4")
        assert preflight.model_errors(cfg) == [], name

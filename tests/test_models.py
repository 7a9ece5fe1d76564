"""Encoders, distillation outputs and task models (metakd_ray.models).

Tiny random BERTs (vocab 99, hidden 32, 4 heads) everywhere except the few tests marked as loading the real
offline all-MiniLM-L6-v2 teacher (one module-scoped load).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from metakd_ray.config import ModelConfig, StudentConfig  # noqa: E402
from metakd_ray.models import (  # noqa: E402
    PAPER_SHAPES,
    ClassifierTeacher,
    MetaTeacher,
    ModelLoadError,
    MTLTeacher,
    Student,
    build_student,
    check_attention_compatible,
    check_max_length,
    compression_ratio,
    default_teacher_path,
    describe_models,
    encode,
    kept_teacher_layers,
    layer_map,
    load_encoder,
    load_task_model,
    param_count,
    random_encoder,
    resolve_model,
    student_from_teacher,
)
from metakd_ray.models.encoders import _self_attention_modules  # noqa: E402
from metakd_ray.losses import pooled_representation  # noqa: E402

B, T, K, C = 3, 7, 3, 2


@pytest.fixture(scope="module")
def minilm():
    encoder, tokenizer = load_encoder("default")
    return encoder.eval(), tokenizer


def tiny(num_layers=2, hidden=32, heads=4, seed=0):
    return random_encoder(hidden_size=hidden, num_layers=num_layers, num_heads=heads, seed=seed).eval()


def batch(seed=0, vocab=99):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 5:] = 0  # padded examples
    attention_mask[2, 3:] = 0
    domain_ids = torch.tensor([0, 2, 1])
    return input_ids, attention_mask, domain_ids


def assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- the real default teacher


def test_default_teacher_loads_offline_with_all_outputs(minilm):
    encoder, tokenizer = minilm
    assert default_teacher_path().is_dir() and resolve_model("default") == str(default_teacher_path())
    c = encoder.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (6, 384, 12)
    assert encoder.config._attn_implementation == "sdpa" and encoder.pooler is None
    enc = tokenizer(["a fine book", "the worst kettle I ever bought, it leaks"], padding=True, return_tensors="pt")
    t = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = encode(encoder, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert len(out.hidden_states) == 7 and len(out.attention_scores) == 6
    assert all(h.shape == (2, t, 384) for h in out.hidden_states)
    assert all(a.shape == (2, 12, t, t) for a in out.attention_scores)
    assert torch.equal(out.hidden_states[-1], out.last_hidden)


def _check_scores_match_attentions(encoder, input_ids, attention_mask):
    import copy

    eager = copy.deepcopy(encoder)  # our encoders run sdpa, which returns no attention maps: HF's eager ones are the
    eager.set_attn_implementation("eager")  # reference
    with torch.no_grad():
        ours = encode(encoder, input_ids, attention_mask)
        hf = eager(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (b, 1, 1, t)
    assert len(ours.attention_scores) == len(hf.attentions)
    for scores, probs in zip(ours.attention_scores, hf.attentions):
        torch.testing.assert_close(torch.softmax(scores + additive, dim=-1), probs, atol=1e-5, rtol=0)


def test_scores_are_pre_softmax_attention_tiny():
    input_ids, attention_mask, _ = batch()
    _check_scores_match_attentions(tiny(), input_ids, attention_mask)


def test_scores_are_pre_softmax_attention_minilm(minilm):
    encoder, tokenizer = minilm
    enc = tokenizer(["short", "a somewhat longer review of a blender"], padding=True, return_tensors="pt")
    _check_scores_match_attentions(encoder, enc["input_ids"], enc["attention_mask"])


def test_encode_removes_hooks_skips_scores_and_keeps_gradients():
    encoder = tiny()
    input_ids, attention_mask, _ = batch()
    out = encode(encoder, input_ids, attention_mask)
    attn = _self_attention_modules(encoder)
    assert all(not a.query._forward_hooks and not a.key._forward_hooks for a in attn)
    sum(s.sum() for s in out.attention_scores).backward()  # the attention loss must reach Q and K
    assert attn[0].query.weight.grad is not None and attn[0].query.weight.grad.abs().sum() > 0
    fast = encode(encoder, input_ids, attention_mask, with_attention_scores=False)
    assert fast.attention_scores is None and len(fast.hidden_states) == 3
    torch.testing.assert_close(fast.last_hidden, out.last_hidden)


# ---------------------------------------------------------------- students, layer map, sizes


def test_student_from_teacher_copies_chosen_layers_exactly():
    teacher = tiny(num_layers=6)
    student = student_from_teacher(teacher, num_layers=3)
    assert kept_teacher_layers(student) == (2, 4, 6) and student.config.num_hidden_layers == 3
    assert teacher.config.num_hidden_layers == 6
    assert_same_module(student.embeddings, teacher.embeddings)
    for j, i in enumerate((2, 4, 6)):
        assert_same_module(student.encoder.layer[j], teacher.encoder.layer[i - 1])
    with torch.no_grad():  # a deep copy: training the student leaves the teacher alone
        student.encoder.layer[0].attention.self.query.weight.add_(1.0)
        student.embeddings.word_embeddings.weight.add_(1.0)
    assert not torch.equal(student.encoder.layer[0].attention.self.query.weight,
                           teacher.encoder.layer[1].attention.self.query.weight)
    assert not torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert kept_teacher_layers(student_from_teacher(teacher, num_layers=2)) == (3, 6)
    assert kept_teacher_layers(student_from_teacher(teacher, layers=[1, 5])) == (1, 5)


def test_student_of_the_first_layers_reproduces_the_teacher():
    teacher = tiny(num_layers=4)
    student = student_from_teacher(teacher, layers=[1, 2])
    input_ids, attention_mask, _ = batch()
    with torch.no_grad():
        t_out, s_out = encode(teacher, input_ids, attention_mask), encode(student, input_ids, attention_mask)
    for m in range(3):
        torch.testing.assert_close(s_out.hidden_states[m], t_out.hidden_states[m], atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers", [[0, 2], [3, 2], [2, 2], [7], []])
def test_student_from_teacher_rejects_bad_layers(layers):
    with pytest.raises(ValueError, match="1-based|1..6"):
        student_from_teacher(tiny(num_layers=6), layers=layers or None, num_layers=0 if not layers else None)


def test_student_from_teacher_rejects_count_mismatch():
    with pytest.raises(ValueError, match="num_layers=3 but 2 teacher layers"):
        student_from_teacher(tiny(num_layers=6), num_layers=3, layers=[2, 4])


@pytest.mark.parametrize("m, n, expected", [(3, 6, (0, 2, 4, 6)), (2, 6, (0, 3, 6)), (6, 6, tuple(range(7))),
                                            (4, 12, (0, 3, 6, 9, 12)), (1, 6, (0, 6))])
def test_layer_map_paper_formula(m, n, expected):
    assert layer_map(m, n) == expected


def test_layer_map_kept_layers_and_errors():
    assert layer_map(3, 6, kept=[1, 3, 6]) == (0, 1, 3, 6)
    assert layer_map(4, 6, kept=[1, 2, 4, 6]) == (0, 1, 2, 4, 6)  # no divisibility needed with kept layers
    with pytest.raises(ValueError, match=r"N=6.*M=4"):
        layer_map(4, 6)
    with pytest.raises(ValueError, match="for a 2-layer student"):
        layer_map(2, 6, kept=[1, 3, 6])
    with pytest.raises(ValueError, match="1-based"):
        layer_map(2, 6, kept=[4, 2])


def test_random_encoders_tiny_and_paper_shapes():
    enc = tiny()
    c = enc.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings, c._attn_implementation) == (99, 32, 2, 4, 37, 64, "sdpa")
    assert_same_module(random_encoder(seed=3), random_encoder(seed=3))  # seeded
    out = encode(enc, *batch()[:2])
    assert out.last_hidden.shape == (B, T, 32) and out.attention_scores[1].shape == (B, 4, T, T)
    tinybert = random_encoder(**PAPER_SHAPES["tinybert-4l-312d"])
    # Embeddings 30522*312 + 512*312 + 2*312 + LN; per layer 4 attention linears, FFN 312<->1200, two LNs; no pooler.
    per_layer = 4 * (312 * 312 + 312) + 2 * 312 + (312 * 1200 + 1200) + (1200 * 312 + 312) + 2 * 312
    assert param_count(tinybert) == (30522 + 512 + 2) * 312 + 2 * 312 + 4 * per_layer == 14_252_592
    with pytest.raises(ValueError, match="not divisible"):
        random_encoder(hidden_size=30, num_heads=4)


def test_param_counts_compression_and_description():
    teacher = tiny(num_layers=6)
    student = student_from_teacher(teacher, num_layers=2)
    per_layer = param_count(teacher.encoder.layer[0])
    assert param_count(teacher) - param_count(student) == 4 * per_layer
    ratio = compression_ratio(teacher, student)
    assert ratio == param_count(teacher) / param_count(student) and ratio > 1
    d = describe_models(teacher, student)
    assert d["teacher"]["layers"] == 6 and d["student"]["layers"] == 2
    assert d["layer_map"] == (0, 3, 6) and d["compression_ratio"] == ratio


def test_build_student_dispatches_on_source(minilm, tmp_path):
    teacher, tokenizer = minilm
    s = build_student(ModelConfig(student=StudentConfig(num_layers=3)), teacher, tokenizer)
    assert kept_teacher_layers(s) == (2, 4, 6)
    s = build_student(ModelConfig(student=StudentConfig(num_layers=2, layers=(1, 6))), teacher, tokenizer)
    assert kept_teacher_layers(s) == (1, 6)
    rnd = StudentConfig(source="random", num_layers=2, hidden_size=48, num_attention_heads=12, intermediate_size=64)
    s = build_student(ModelConfig(student=rnd), teacher, tokenizer)
    assert (s.config.hidden_size, s.config.num_hidden_layers, s.config.vocab_size) == (48, 2, 30522)
    small = random_encoder(hidden_size=24, num_layers=1, num_heads=12, vocab_size=30522, max_position=512)
    small.save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(tmp_path / "small")
    s = build_student(ModelConfig(student=StudentConfig(source="pretrained", path=str(tmp_path / "small"))),
                      teacher, tokenizer)
    assert s.config.hidden_size == 24 and s.config._attn_implementation == "sdpa"


def test_load_errors_name_the_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_encoder(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model'.*local model directory.*HF_HUB_OFFLINE"):
        load_encoder("no-such-org/no-such-model")


def test_head_count_mismatch_and_max_length():
    check_attention_compatible(tiny(heads=4), tiny(heads=4))
    with pytest.raises(ValueError, match=r"teacher has 4 attention heads and the student 8.*disable the attention"):
        check_attention_compatible(tiny(heads=4), tiny(heads=8))
    check_max_length(tiny(), 64)
    with pytest.raises(ValueError, match="max_length=65 exceeds the encoder's 64"):
        check_max_length(tiny(), 65)


# ---------------------------------------------------------------- task models


def test_models_pool_with_the_configured_mode():
    input_ids, attention_mask, _ = batch()
    for mode in ("mean", "reference"):
        out = ClassifierTeacher(tiny(), C, pooling=mode).eval()(input_ids, attention_mask)
        torch.testing.assert_close(out.pooled, pooled_representation(out.encoder.last_hidden, attention_mask, mode))
    with pytest.raises(ValueError, match="pooling"):
        ClassifierTeacher(tiny(), C, pooling="max")


def test_teacher_and_student_forward_shapes():
    input_ids, attention_mask, domain_ids = batch()
    out = ClassifierTeacher(tiny(), C).eval()(input_ids, attention_mask)
    assert out.logits.shape == (B, C) and out.pooled.shape == (B, 32) and out.domain_hidden is None
    assert out.encoder.attention_scores is None  # skipped unless asked for
    out = MTLTeacher(tiny(), C, K).eval()(input_ids, attention_mask, domain_ids=domain_ids)
    assert out.logits.shape == (B, C) and out.domain_logits is None
    meta = MetaTeacher(tiny(hidden=48, heads=4), C, K).eval()
    t_out = meta(input_ids, attention_mask, domain_ids=domain_ids, with_attention_scores=True)
    assert t_out.logits.shape == (B, C) and t_out.domain_hidden.shape == (B, 48) and t_out.domain_logits.shape == (B, K)
    assert len(t_out.encoder.hidden_states) == 3 and t_out.encoder.attention_scores[0].shape == (B, 4, T, T)
    assert t_out.domain_hidden.abs().max() <= 1  # tanh
    student = Student(tiny(), C, teacher_hidden_size=48, teacher_domain_hidden_size=meta.domain_hidden_size,
                      num_domains=K).eval()
    s_out = student(input_ids, attention_mask, domain_ids=domain_ids, with_attention_scores=True)
    assert s_out.logits.shape == (B, C) and s_out.domain_hidden.shape == (B, 32) and s_out.domain_logits is None
    assert student.project_hidden(s_out.encoder.hidden_states[1]).shape == (B, T, 48)
    assert student.project_domain(s_out.domain_hidden).shape == (B, 48)
    plain = Student(tiny(), C, teacher_hidden_size=32)  # widths match: W_h still a learned map
    assert isinstance(plain.W_h, torch.nn.Linear) and plain.W_h.weight.requires_grad and plain.domain_head is None
    with pytest.raises(ValueError, match="no domain head"):
        plain.project_domain(s_out.domain_hidden)
    with pytest.raises(ValueError, match="needs domain_ids"):
        meta(input_ids, attention_mask)
    with pytest.raises(ValueError, match="needs num_domains"):
        Student(tiny(), C, teacher_hidden_size=32, teacher_domain_hidden_size=32)


def test_meta_teacher_domain_embedding_changes_only_domain_head():
    input_ids, attention_mask, domain_ids = batch()
    meta = MetaTeacher(tiny(), C, K).eval()
    a = meta(input_ids, attention_mask, domain_ids=domain_ids)
    b = meta(input_ids, attention_mask, domain_ids=(domain_ids + 1) % K)
    assert torch.equal(a.logits, b.logits) and not torch.allclose(a.domain_hidden, b.domain_hidden)


def test_mtl_teacher_uses_each_examples_own_domain_head():
    input_ids, attention_mask, domain_ids = batch()  # domains [0, 2, 1]
    mtl = MTLTeacher(tiny(), C, K).eval()
    with torch.no_grad():
        before = mtl(input_ids, attention_mask, domain_ids=domain_ids).logits
        mtl.classifiers[2].weight.add_(0.5)
        after = mtl(input_ids, attention_mask, domain_ids=domain_ids).logits
    changed = (before != after).any(dim=1).tolist()
    assert changed == [False, True, False]


def test_save_and_reload_gives_identical_outputs(tmp_path):
    input_ids, attention_mask, domain_ids = batch()
    meta = MetaTeacher(student_from_teacher(tiny(num_layers=4), num_layers=2), C, K, pooling="reference").eval()
    student = Student(tiny(), C, teacher_hidden_size=32, teacher_domain_hidden_size=32, num_domains=K).eval()
    for model in (meta, student, MTLTeacher(tiny(), C, K).eval(), ClassifierTeacher(tiny(), C).eval()):
        path = model.save_pretrained(tmp_path / type(model).__name__)
        again = type(model).from_pretrained(path).eval()
        assert again.init_args == model.init_args
        assert_same_module(again, model)
        with torch.no_grad():
            x, y = model(input_ids, attention_mask, domain_ids=domain_ids), again(input_ids, attention_mask,
                                                                                  domain_ids=domain_ids)
        assert torch.equal(x.logits, y.logits)
        if x.domain_hidden is not None:
            assert torch.equal(x.domain_hidden, y.domain_hidden)
    assert kept_teacher_layers(load_task_model(tmp_path / "MetaTeacher").encoder) == (2, 4)
    with pytest.raises(ValueError, match="holds a Student, not a MetaTeacher"):
        MetaTeacher.from_pretrained(tmp_path / "Student")

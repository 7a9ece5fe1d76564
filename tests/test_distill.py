"""Unit tests of metakd_ray.distill: which stages a student method runs (``stage_plan``) and the loss of one batch
under each objective (``student_loss``), checked against the loss functions of ``metakd_ray.losses`` called
directly on the same model outputs.

Models are tiny random BERTs (hidden 32, 2 layers) with dropout 0 in eval mode, so every value is deterministic.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from toy import toy_splits, toy_tokenizer

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import distill, losses, models, training
from metakd_ray.distill import LiveTeacher, Stage, stage_plan, student_loss

LAYER_MAP = (0, 1, 2)
PROTOTYPE_SCORES = [0.9, -0.4, 0.2, 0.7, -0.8, 0.0]

# ----------------------------------------------------------------------------------------------------------
# stage_plan
# ----------------------------------------------------------------------------------------------------------

DCFG = C.DistillConfig(stage1_lr=5e-4, stage1_epochs=7, stage2_lr=2e-4, stage2_epochs=4, warmup=0.2,
                       weight_decay=0.03, grad_norm=2.5)


def test_finetune_is_one_hard_ce_stage_with_stage2_settings():
    plan = stage_plan("finetune", DCFG)
    assert len(plan) == 1
    (stage,) = plan
    assert isinstance(stage, Stage)
    assert (stage.name, stage.objective, stage.select_on_dev) == ("finetune", "hard_ce", True)
    assert stage.config == training.StageConfig("finetune", epochs=4, lr=2e-4, weight_decay=0.03, warmup=0.2,
                                                grad_norm=2.5, schedule="linear")


@pytest.mark.parametrize("method", ["tinybert_kd", "meta_kd"])
def test_two_stage_plan(method):
    plan = stage_plan(method, DCFG)
    assert [(s.name, s.objective, s.select_on_dev) for s in plan] == [("stage1", "layers", False),
                                                                      ("stage2", "soft_ce", True)]
    s1, s2 = plan[0].config, plan[1].config
    assert s1 == training.StageConfig("stage1", epochs=7, lr=5e-4, weight_decay=0.03, warmup=0.0, grad_norm=2.5,
                                      schedule="constant")
    assert s2 == training.StageConfig("stage2", epochs=4, lr=2e-4, weight_decay=0.03, warmup=0.2, grad_norm=2.5,
                                      schedule="linear")


def test_default_config_is_two_stage():
    plan = stage_plan("meta_kd", C.DistillConfig())
    d = C.DistillConfig()
    assert [s.name for s in plan] == ["stage1", "stage2"]
    assert (plan[0].config.epochs, plan[0].config.lr) == (d.stage1_epochs, d.stage1_lr)
    assert (plan[1].config.epochs, plan[1].config.lr, plan[1].config.warmup) == (d.stage2_epochs, d.stage2_lr,
                                                                                 d.warmup)


@pytest.mark.parametrize("method", ["finetune", "tinybert_kd", "meta_kd"])
@pytest.mark.parametrize("stages", ["one", "two"])
def test_min_steps_reaches_every_stage(method, stages):
    plan = stage_plan(method, dataclasses.replace(DCFG, stages=stages, min_steps=40))
    assert plan and all(s.config.min_steps == 40 for s in plan)
    assert all(s.config.min_steps == 0 for s in stage_plan(method, dataclasses.replace(DCFG, stages=stages)))


@pytest.mark.parametrize("method", ["tinybert_kd", "meta_kd"])
def test_zero_stage1_epochs_drops_stage1(method):
    dcfg = C.DistillConfig(stage1_epochs=0, stage2_lr=2e-4, stage2_epochs=4)
    plan = stage_plan(method, dcfg)
    assert [(s.name, s.objective, s.select_on_dev) for s in plan] == [("stage2", "soft_ce", True)]
    assert (plan[0].config.epochs, plan[0].config.lr, plan[0].config.schedule) == (4, 2e-4, "linear")


@pytest.mark.parametrize("method", ["tinybert_kd", "meta_kd"])
def test_one_stage_plan_is_kd_with_stage1_settings(method):
    dcfg = C.DistillConfig(stages="one", stage1_lr=5e-4, stage1_epochs=7, stage2_lr=2e-4, stage2_epochs=4,
                           warmup=0.2)
    plan = stage_plan(method, dcfg)
    assert [(s.name, s.objective, s.select_on_dev) for s in plan] == [("one", "kd", True)]
    cfg = plan[0].config
    assert (cfg.name, cfg.epochs, cfg.lr, cfg.warmup, cfg.schedule) == ("one", 7, 5e-4, 0.2, "linear")


def test_finetune_ignores_stages_setting():
    plan = stage_plan("finetune", C.DistillConfig(stages="one", stage1_epochs=0))
    assert [(s.name, s.objective) for s in plan] == [("finetune", "hard_ce")]


@pytest.mark.parametrize("method", ["distil", "meta", "", "MetaKD"])
def test_unknown_method_raises(method):
    with pytest.raises(ValueError, match="student method"):
        stage_plan(method, DCFG)


# ----------------------------------------------------------------------------------------------------------
# student_loss
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    train = toy_splits()["train"]
    rows = train.select([0, 1, 9, 17, 40, 80])  # both labels, several domains, different lengths
    ds = D.tokenize(rows, tok, 32).add_column("prototype_score", PROTOTYPE_SCORES)
    b = D.collator(tok)([ds[i] for i in range(len(ds))])
    assert len(set(b["domain_ids"].tolist())) > 1 and len(set(b["labels"].tolist())) == 2
    assert (b["attention_mask"] == 0).any()  # padded rows: the masks matter
    return b


def _encoder(tok, seed):
    return models.random_encoder(vocab_size=len(tok), max_position=32, dropout=0.0, seed=seed)


@pytest.fixture(scope="module")
def meta_teacher(tok):
    return models.MetaTeacher(_encoder(tok, 1), 2, 3, dropout=0.0).eval()


@pytest.fixture(scope="module")
def classifier_teacher(tok):
    return models.ClassifierTeacher(_encoder(tok, 1), 2, dropout=0.0).eval()


def meta_student(tok):
    return models.Student(_encoder(tok, 0), num_labels=2, teacher_hidden_size=32, teacher_domain_hidden_size=32,
                          num_domains=3, dropout=0.0).eval()


def plain_student(tok):
    return models.Student(_encoder(tok, 0), num_labels=2, teacher_hidden_size=32, dropout=0.0).eval()


def forward(model, batch, scores=False):
    return model(**training.model_inputs(batch), domain_ids=batch["domain_ids"], with_attention_scores=scores)


def reference_layer_args(student, teacher, batch, dcfg, meta: bool) -> dict:
    """The stage-1 arguments worked out by hand from both models' outputs and the layer map."""
    s = forward(student, batch, scores=True)
    with torch.no_grad():
        t = forward(teacher, batch, scores=True)
    args = {
        "student_hidden_states": [student.project_hidden(h) for h in s.encoder.hidden_states],
        "teacher_hidden_states": [t.encoder.hidden_states[g] for g in LAYER_MAP],
        "student_attention_scores": list(s.encoder.attention_scores),
        "teacher_attention_scores": [t.encoder.attention_scores[g - 1] for g in LAYER_MAP[1:]],
        "attention_mask": batch["attention_mask"],
        "student_domain_hidden": student.project_domain(s.domain_hidden) if meta else None,
        "teacher_domain_hidden": t.domain_hidden if meta else None,
        "weights": losses.expertise_weights(t.logits, batch["labels"], batch["prototype_scores"]) if meta else None,
        "gamma2": dcfg.gamma2,
        "include_padding": dcfg.include_padding,
    }
    return args, s, t


def assert_terms_close(got: losses.LossTerms, ref: losses.LossTerms) -> None:
    assert set(got.terms) == set(ref.terms)
    torch.testing.assert_close(got.total, ref.total)
    for name in ref.terms:
        torch.testing.assert_close(got.terms[name], ref.terms[name])


DCFG_LOSS = C.DistillConfig(gamma2=0.7, temperature=2.0, scale_by_t2=True)


@pytest.mark.parametrize("method", ["finetune", "tinybert_kd", "meta_kd"])
def test_hard_ce_is_the_mean_label_cross_entropy(tok, batch, meta_teacher, method):
    student = meta_student(tok) if method == "meta_kd" else plain_student(tok)
    teacher = None if method == "finetune" else LiveTeacher(meta_teacher, LAYER_MAP)
    got = student_loss(method, "hard_ce", student, batch, teacher, DCFG_LOSS)
    logits = forward(student, batch).logits
    ce = losses.hard_cross_entropy(logits, batch["labels"])
    torch.testing.assert_close(got.total, ce.mean())
    assert set(got.terms) == {"ce"}
    torch.testing.assert_close(got.terms["ce"], ce)
    assert got.total.requires_grad


@pytest.mark.parametrize("method", ["tinybert_kd", "meta_kd"])
def test_soft_ce_is_the_stage2_objective(tok, batch, meta_teacher, method):
    student = meta_student(tok) if method == "meta_kd" else plain_student(tok)
    got = student_loss(method, "soft_ce", student, batch, LiveTeacher(meta_teacher, LAYER_MAP), DCFG_LOSS)
    s_logits = forward(student, batch).logits
    with torch.no_grad():
        t_logits = forward(meta_teacher, batch).logits
    ref = losses.stage2_objective(s_logits, t_logits, temperature=2.0, scale_by_t2=True)
    assert_terms_close(got, ref)
    assert got.weights is None  # stage 2 is unweighted, even for meta_kd
    # temperature and T^2 really reach the loss
    torch.testing.assert_close(got.total, 4.0 * losses.soft_cross_entropy(s_logits, t_logits, 2.0).mean())
    assert not torch.allclose(got.total, losses.soft_cross_entropy(s_logits, t_logits, 1.0).mean())


def test_layers_tinybert_kd_is_unweighted_stage1(tok, batch, meta_teacher):
    student = plain_student(tok)
    got = student_loss("tinybert_kd", "layers", student, batch, LiveTeacher(meta_teacher, LAYER_MAP), DCFG_LOSS)
    assert set(got.terms) == {"emb", "hid", "att"}
    assert got.weights is None
    args, _, _ = reference_layer_args(student, meta_teacher, batch, DCFG_LOSS, meta=False)
    assert_terms_close(got, losses.stage1_objective(**args))
    assert float(got.total.detach()) > 0


def test_layers_tinybert_kd_works_from_a_classifier_teacher(tok, batch, classifier_teacher):
    student = plain_student(tok)
    got = student_loss("tinybert_kd", "layers", student, batch, LiveTeacher(classifier_teacher, LAYER_MAP),
                       DCFG_LOSS)
    args, _, _ = reference_layer_args(student, classifier_teacher, batch, DCFG_LOSS, meta=False)
    assert_terms_close(got, losses.stage1_objective(**args))


def test_layers_meta_kd_adds_tkd_and_expertise_weights(tok, batch, meta_teacher):
    student = meta_student(tok)
    got = student_loss("meta_kd", "layers", student, batch, LiveTeacher(meta_teacher, LAYER_MAP), DCFG_LOSS)
    assert set(got.terms) == {"emb", "hid", "att", "tkd"}
    args, _, t = reference_layer_args(student, meta_teacher, batch, DCFG_LOSS, meta=True)
    expected_weights = losses.expertise_weights(t.logits, batch["labels"], batch["prototype_scores"])
    torch.testing.assert_close(got.weights, expected_weights)
    assert_terms_close(got, losses.stage1_objective(**args))
    # The weights and gamma2 matter: unweighted, or another gamma2, gives a different total.
    unweighted = losses.stage1_objective(**{**args, "weights": None})
    assert not torch.allclose(got.total, unweighted.total)
    other_gamma = student_loss("meta_kd", "layers", student, batch, LiveTeacher(meta_teacher, LAYER_MAP),
                               C.DistillConfig(gamma2=0.0, temperature=2.0, scale_by_t2=True))
    assert not torch.allclose(got.total, other_gamma.total)
    # distill.expertise_weights=false (the "without lambda" ablation): L_TKD stays, lambda is 1
    no_lambda = student_loss("meta_kd", "layers", student, batch, LiveTeacher(meta_teacher, LAYER_MAP),
                             dataclasses.replace(DCFG_LOSS, expertise_weights=False))
    assert set(no_lambda.terms) == {"emb", "hid", "att", "tkd"} and no_lambda.weights is None
    assert_terms_close(no_lambda, unweighted)


@pytest.mark.parametrize("method", ["tinybert_kd", "meta_kd"])
def test_kd_is_the_single_stage_objective(tok, batch, meta_teacher, method):
    meta = method == "meta_kd"
    student = meta_student(tok) if meta else plain_student(tok)
    got = student_loss(method, "kd", student, batch, LiveTeacher(meta_teacher, LAYER_MAP), DCFG_LOSS)
    args, s, t = reference_layer_args(student, meta_teacher, batch, DCFG_LOSS, meta=meta)
    ref = losses.single_stage_objective(**args, student_logits=s.logits, teacher_logits=t.logits,
                                        temperature=2.0, scale_by_t2=True)
    assert set(got.terms) == ({"emb", "hid", "att", "pred", "tkd"} if meta else {"emb", "hid", "att", "pred"})
    assert_terms_close(got, ref)


def test_distillation_does_not_train_the_teacher(tok, batch, meta_teacher):
    student = meta_student(tok)
    got = student_loss("meta_kd", "kd", student, batch, LiveTeacher(meta_teacher, LAYER_MAP), DCFG_LOSS)
    got.total.backward()
    assert all(p.grad is None for p in meta_teacher.parameters())
    assert student.W_d.weight.grad is not None and student.W_h.weight.grad is not None
    assert student.W_d.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", ["layers", "kd"])
def test_meta_kd_needs_a_teacher_with_a_domain_head(tok, batch, classifier_teacher, objective):
    with pytest.raises(ValueError, match="meta_kd"):
        student_loss("meta_kd", objective, meta_student(tok), batch, LiveTeacher(classifier_teacher, LAYER_MAP),
                     DCFG_LOSS)


def test_meta_kd_needs_prototype_scores(tok, batch, meta_teacher):
    no_scores = {k: v for k, v in batch.items() if k != "prototype_scores"}
    with pytest.raises(ValueError, match="meta_kd"):
        student_loss("meta_kd", "layers", meta_student(tok), no_scores, LiveTeacher(meta_teacher, LAYER_MAP),
                     DCFG_LOSS)


@pytest.mark.parametrize("method", ["tinybert_kd", "meta_kd"])
@pytest.mark.parametrize("objective", ["layers", "soft_ce", "kd"])
def test_kd_objectives_need_a_teacher(tok, batch, method, objective):
    with pytest.raises(ValueError, match="teacher"):
        student_loss(method, objective, meta_student(tok), batch, None, DCFG_LOSS)


def test_live_teacher_selects_the_mapped_layers(tok, batch):
    """A 4-layer teacher under the layer map (0, 2, 4): the record holds the embeddings and layers 2 and 4."""
    teacher = models.MetaTeacher(models.random_encoder(vocab_size=len(tok), num_layers=4, max_position=32,
                                                       dropout=0.0, seed=1), 2, 3, dropout=0.0).eval()
    live = LiveTeacher(teacher, (0, 2, 4))
    assert (live.kind, live.layer_map, live.hidden_size, live.domain_hidden_size) == ("live", (0, 2, 4), 32, 32)
    rec = live(batch)
    with torch.no_grad():
        out = forward(teacher, batch, scores=True)
    assert len(rec.hidden_states) == 3 and len(rec.attention_scores) == 2
    for got, g in zip(rec.hidden_states, (0, 2, 4)):
        torch.testing.assert_close(got, out.encoder.hidden_states[g])
    for got, g in zip(rec.attention_scores, (2, 4)):
        torch.testing.assert_close(got, out.encoder.attention_scores[g - 1])
    torch.testing.assert_close(rec.logits, out.logits)
    torch.testing.assert_close(rec.domain_hidden, out.domain_hidden)
    torch.testing.assert_close(rec.prototype_scores, batch["prototype_scores"])
    assert not teacher.training
    light = live(batch, needs_layers=False)
    assert light.hidden_states == () and light.attention_scores == ()
    torch.testing.assert_close(light.logits, out.logits)


def test_distill_rejects_a_kd_method_without_teacher(tok):
    with pytest.raises(ValueError, match="teacher"):
        distill.distill(plain_student(tok), "tinybert_kd", None, [], [], DCFG, domain_names=("alpha",))

"""Tests of metakd_ray.losses, three ways (TRL style):

1. against naive per-example references written with explicit Python loops in float64 on seeded inputs,
   with padded masks;
2. against properties (identical inputs give zero; limits reduce to known losses; ranges; invariances;
   per-instance weighting really is per instance);
3. pinned numbers worked out by hand. Any diff that moves a pinned number is changing the objective and must
   say so.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from metakd_ray import losses as L

F64 = torch.float64
HYPOTHESIS = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------------------------------------
# Seeded inputs
# ----------------------------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def padded_mask(lengths: list[int], t: int) -> torch.Tensor:
    """(b, t) right-padded mask with the given numbers of real tokens."""
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths], dtype=torch.long)


LENGTHS = [6, 4, 2, 1]  # full row, padded rows, a row whose only real token is [CLS]
B, T = len(LENGTHS), 6


# ----------------------------------------------------------------------------------------------------------
# Naive references: loops over Python floats
# ----------------------------------------------------------------------------------------------------------


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _cos(u, v):
    nu, nv = math.sqrt(_dot(u, u)), math.sqrt(_dot(v, v))
    return 0.0 if nu == 0 or nv == 0 else _dot(u, v) / (nu * nv)


def _vec_mean(vectors):
    return [sum(col) / len(vectors) for col in zip(*vectors)]


def naive_pool(hidden, mask, mode):
    out = []
    for row, m in zip(hidden.tolist(), mask.tolist()):
        if mode == "mean":
            picked = [row[j] for j in range(1, len(row)) if m[j]]
        else:
            picked = row[1:]
        out.append(_vec_mean(picked) if picked else [0.0] * len(row[0]))
    return torch.tensor(out, dtype=F64)


def naive_prototypes(features, labels, domains, k, c, mode):
    feats, ys, ds = features.tolist(), labels.tolist(), domains.tolist()
    protos = []
    for dk in range(k):
        per_class = []
        for m in range(c):
            members = [f for f, y, d in zip(feats, ys, ds) if d == dk and (mode == "domain" or y == m)]
            per_class.append(_vec_mean(members))
        protos.append(per_class)
    return torch.tensor(protos, dtype=F64)


def naive_scores(features, labels, domains, protos, alpha, mode):
    P = protos.tolist()
    k = len(P)
    out = []
    for h, y, d in zip(features.tolist(), labels.tolist(), domains.tolist()):
        own = _cos(P[d][y], h)
        if k == 1:
            out.append(own)
            continue
        others = [P[j][y] for j in range(k) if j != d]
        if mode == "paper":
            other = sum(_cos(p, h) for p in others) / (k - 1)
        else:
            other = _cos(_vec_mean(others), h)
        out.append(alpha * own + (1 - alpha) * other)
    return torch.tensor(out, dtype=F64)


def naive_ce(logits_row, y):
    return -(logits_row[y] - math.log(sum(math.exp(z) for z in logits_row)))


def naive_soft_ce(student_row, teacher_row, temperature):
    s = [z / temperature for z in student_row]
    t = [z / temperature for z in teacher_row]
    log_z_s = math.log(sum(math.exp(z) for z in s))
    z_t = sum(math.exp(z) for z in t)
    return -sum(math.exp(tz) / z_t * (sz - log_z_s) for sz, tz in zip(s, t))


def naive_hidden_mse(student, teacher, mask, include_padding):
    out = []
    for s_row, t_row, m in zip(student.tolist(), teacher.tolist(), mask.tolist()):
        total, count = 0.0, 0
        for j, (s_tok, t_tok) in enumerate(zip(s_row, t_row)):
            if include_padding or m[j]:
                for a, b in zip(s_tok, t_tok):
                    total += (a - b) ** 2
                    count += 1
        out.append(total / count if count else 0.0)
    return torch.tensor(out, dtype=F64)


def naive_attention_mse(student, teacher, mask, include_padding):
    out = []
    for s_b, t_b, m in zip(student.tolist(), teacher.tolist(), mask.tolist()):
        total, count = 0.0, 0
        for s_h, t_h in zip(s_b, t_b):
            for q in range(len(m)):
                for key in range(len(m)):
                    real = m[q] and m[key]
                    if real:
                        total += (s_h[q][key] - t_h[q][key]) ** 2
                    if real or include_padding:
                        count += 1
        out.append(total / count if count else 0.0)
    return torch.tensor(out, dtype=F64)


def naive_row_mse(student, teacher):
    return torch.tensor([sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)
                         for s, t in zip(student.tolist(), teacher.tolist())], dtype=F64)


def naive_expertise(teacher_logits, labels, scores):
    out = []
    for z, y, t in zip(teacher_logits.tolist(), labels.tolist(), scores.tolist()):
        p = math.exp(z[y]) / sum(math.exp(v) for v in z)
        out.append((1 + t) / (math.exp((p - 1) ** 2) + 1))
    return torch.tensor(out, dtype=F64)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# §1 Pooling, prototypes, prototype scores
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "reference"])
def test_pooled_representation_matches_loop(mode):
    g = gen(1)
    hidden, mask = randn(B, T, 5, g=g), padded_mask(LENGTHS, T)
    pooled = L.pooled_representation(hidden, mask, mode=mode)
    assert pooled.shape == (B, 5)
    close(pooled, naive_pool(hidden, mask, mode))


def test_pooled_mean_of_cls_only_row_is_zero_not_nan():
    hidden = torch.ones(2, 3, 4, requires_grad=True)
    pooled = L.pooled_representation(hidden, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    assert torch.equal(pooled, torch.zeros(2, 4))
    pooled.sum().backward()
    assert torch.isfinite(hidden.grad).all()


def test_pooling_modes_differ_exactly_as_specified():
    # tokens: [CLS]=50, 1, 3, pad=100; mask 1 1 1 0
    hidden = torch.tensor([[[50.0], [1.0], [3.0], [100.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert L.pooled_representation(hidden, mask, "mean").item() == 2.0  # (1 + 3) / 2: no CLS, no padding
    assert L.pooled_representation(hidden, mask, "reference").item() == pytest.approx(104 / 3)  # incl. padding


@pytest.mark.parametrize("mode", ["class", "domain"])
def test_class_prototypes_match_loop(mode):
    g = gen(2)
    k, c, n = 3, 2, 30
    features = randn(n, 4, g=g)
    labels = torch.arange(n) % c
    domains = (torch.arange(n) // c) % k
    protos = L.class_prototypes(features, labels, domains, k, c, mode=mode)
    assert protos.shape == (k, c, 4)
    close(protos, naive_prototypes(features, labels, domains, k, c, mode))


def test_class_prototypes_empty_cell_is_named():
    features = torch.randn(3, 4, generator=gen(3))
    labels, domains = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"domain 1, class 0"):
        L.class_prototypes(features, labels, domains, num_domains=2, num_classes=2)
    L.class_prototypes(features, labels, domains, 2, 2, mode="domain")  # one prototype per domain: fine


@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
def test_prototype_scores_match_loop(mode, alpha):
    g = gen(4)
    k, c, n = 4, 3, 20
    features, protos = randn(n, 5, g=g), randn(k, c, 5, g=g)
    labels = torch.randint(0, c, (n,), generator=g)
    domains = torch.randint(0, k, (n,), generator=g)
    scores = L.prototype_scores(features, labels, domains, protos, alpha=alpha, mode=mode)
    close(scores, naive_scores(features, labels, domains, protos, alpha, mode))


def test_paper_and_reference_scores_differ():
    g = gen(5)
    features, protos = randn(10, 5, g=g), randn(3, 2, 5, g=g)
    labels, domains = torch.arange(10) % 2, torch.arange(10) % 3
    paper = L.prototype_scores(features, labels, domains, protos, mode="paper")
    ref = L.prototype_scores(features, labels, domains, protos, mode="reference")
    assert not torch.allclose(paper, ref)


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_single_domain_score_is_cosine_to_own_prototype(mode):
    g = gen(6)
    features, protos = randn(8, 5, g=g), randn(1, 2, 5, g=g)
    labels, domains = torch.arange(8) % 2, torch.zeros(8, dtype=torch.long)
    scores = L.prototype_scores(features, labels, domains, protos, alpha=0.3, mode=mode)
    close(scores, F.cosine_similarity(features, protos[0, labels], dim=-1))


@pytest.mark.parametrize("k,alpha", [(1, 0.5), (3, 1.0)])
def test_prototype_scores_of_features_on_their_prototype_do_not_round_above_one(k, alpha):
    # float32 cosine of x and 3x exceeds 1 by one ulp for several percent of random x: the scores are clamped
    g = gen(7)
    protos = torch.randn(k, 2, 6, generator=g) * 10.0 ** torch.randint(-3, 4, (k, 2, 1), generator=g).float()
    labels, domains = torch.arange(2000) % 2, torch.arange(2000) % k
    features = 3 * protos[domains, labels]
    scores = L.prototype_scores(features, labels, domains, protos, alpha=alpha)
    assert scores.max().item() <= 1.0
    torch.testing.assert_close(scores, torch.ones(2000))


@HYPOTHESIS
@given(n=st.integers(1, 12), k=st.integers(1, 4), c=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       alpha=st.floats(0.0, 1.0), mode=st.sampled_from(["paper", "reference"]), data=st.data())
def test_prototype_scores_in_range_and_permutation_equivariant(n, k, c, seed, alpha, mode, data):
    g = gen(seed)
    features = torch.randn(n, 6, generator=g) * 10.0 ** torch.randint(-3, 4, (n, 1), generator=g).float()
    protos = torch.randn(k, c, 6, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    domains = torch.randint(0, k, (n,), generator=g)
    features[0] = 3 * protos[domains[0], labels[0]]  # cosine exactly 1 up to rounding
    scores = L.prototype_scores(features, labels, domains, protos, alpha=alpha, mode=mode)
    assert scores.shape == (n,)
    assert bool(((scores >= -1) & (scores <= 1)).all())
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    permuted = L.prototype_scores(features[perm], labels[perm], domains[perm], protos, alpha=alpha, mode=mode)
    torch.testing.assert_close(permuted, scores[perm])


# ----------------------------------------------------------------------------------------------------------
# §2 False domains, meta-teacher loss
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_uniform_false_domains_never_true_and_cover_the_others(k):
    g = gen(k)
    domains = torch.arange(4000) % k
    for _ in range(5):
        false = L.false_domain_labels(domains, k, generator=g)
        assert not bool((false == domains).any())
        assert bool(((false >= 0) & (false < k)).all())
    # every other domain is drawn for each true domain, in roughly equal shares (1 / (k - 1) each)
    for d in range(k):
        counts = torch.bincount(false[domains == d], minlength=k).double()
        assert counts[d] == 0
        shares = counts[torch.arange(k) != d] / counts.sum()
        assert bool(((shares - 1 / (k - 1)).abs() < 0.1).all())


def test_uniform_false_domains_need_two_domains_and_are_reproducible():
    with pytest.raises(ValueError, match="K = 1"):
        L.false_domain_labels(torch.zeros(4, dtype=torch.long), 1)
    domains = torch.arange(50) % 4
    assert torch.equal(L.false_domain_labels(domains, 4, gen(9)), L.false_domain_labels(domains, 4, gen(9)))


def test_permute_false_domains_is_a_permutation_that_may_keep_the_true_domain():
    domains = torch.arange(64) % 4
    false = L.false_domain_labels(domains, 4, generator=gen(10), mode="permute")
    assert torch.equal(false.sort().values, domains.sort().values)
    assert bool((false == domains).any())  # unlike "uniform", a permutation can hit the true domain
    assert not torch.equal(false, domains)


def test_meta_teacher_loss_matches_loop():
    g = gen(11)
    b, c, k, gamma1 = 6, 3, 4, 0.7
    logits, domain_logits = randn(b, c, g=g), randn(b, k, g=g)
    labels, domains = torch.randint(0, c, (b,), generator=g), torch.randint(0, k, (b,), generator=g)
    false = L.false_domain_labels(domains, k, generator=g)
    scores = torch.rand(b, generator=g, dtype=F64) * 2 - 1
    out = L.meta_teacher_loss(logits, labels, domain_logits, false, scores, gamma1=gamma1)
    per = [t * (naive_ce(z, y) + gamma1 * naive_ce(zd, f)) for z, y, zd, f, t in
           zip(logits.tolist(), labels.tolist(), domain_logits.tolist(), false.tolist(), scores.tolist())]
    close(out.total, torch.tensor(sum(per) / b, dtype=F64))
    close(out.terms["ce"], torch.tensor([naive_ce(z, y) for z, y in zip(logits.tolist(), labels.tolist())],
                                        dtype=F64))
    assert set(out.means()) == {"loss", "ce", "domain_ce", "weight"}


def test_meta_teacher_loss_does_not_train_the_prototype_scores():
    logits = torch.randn(4, 2, requires_grad=True)
    scores = torch.rand(4, requires_grad=True)
    out = L.meta_teacher_loss(logits, torch.tensor([0, 1, 0, 1]), torch.randn(4, 3), torch.tensor([1, 2, 0, 0]),
                              scores)
    out.total.backward()
    assert logits.grad is not None and scores.grad is None


# ----------------------------------------------------------------------------------------------------------
# §3 Distillation terms
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_padding", [False, True])
def test_hidden_mse_matches_loop(include_padding):
    g = gen(12)
    student, teacher, mask = randn(B, T, 7, g=g), randn(B, T, 7, g=g), padded_mask(LENGTHS, T)
    close(L.hidden_mse(student, teacher, mask, include_padding),
          naive_hidden_mse(student, teacher, mask, include_padding))
    close(L.embedding_mse(student, teacher, mask, include_padding),
          naive_hidden_mse(student, teacher, mask, include_padding))


def test_layerwise_hidden_mse_sums_layers():
    g = gen(13)
    mask = padded_mask(LENGTHS, T)
    students = [randn(B, T, 7, g=g) for _ in range(3)]
    teachers = [randn(B, T, 7, g=g) for _ in range(3)]
    expected = sum(naive_hidden_mse(s, t, mask, False) for s, t in zip(students, teachers))
    close(L.layerwise_hidden_mse(students, teachers, mask), expected)
    with pytest.raises(ValueError, match="layer map"):
        L.layerwise_hidden_mse(students, teachers[:2], mask)


@pytest.mark.parametrize("include_padding", [False, True])
def test_attention_mse_matches_loop(include_padding):
    g = gen(14)
    student, teacher, mask = randn(B, 3, T, T, g=g), randn(B, 3, T, T, g=g), padded_mask(LENGTHS, T)
    close(L.attention_mse(student, teacher, mask, include_padding),
          naive_attention_mse(student, teacher, mask, include_padding))


def test_attention_mse_ignores_any_fill_at_masked_positions():
    g = gen(15)
    student, teacher, mask = randn(B, 2, T, T, g=g), randn(B, 2, T, T, g=g), padded_mask(LENGTHS, T)
    key_pad = (mask == 0)[:, None, None, :]
    query_pad = (mask == 0)[:, None, :, None]
    filled_s = student.masked_fill(key_pad, float("-inf")).masked_fill(query_pad, 123.0)
    filled_t = teacher.masked_fill(key_pad, -10000.0).masked_fill(query_pad, -7.0)
    for include_padding in (False, True):
        got = L.attention_mse(filled_s, filled_t, mask, include_padding)
        assert torch.isfinite(got).all()
        close(got, L.attention_mse(student, teacher, mask, include_padding))


def test_layerwise_attention_mse_sums_layers():
    g = gen(16)
    mask = padded_mask(LENGTHS, T)
    students = [randn(B, 2, T, T, g=g) for _ in range(2)]
    teachers = [randn(B, 2, T, T, g=g) for _ in range(2)]
    expected = sum(naive_attention_mse(s, t, mask, False) for s, t in zip(students, teachers))
    close(L.layerwise_attention_mse(students, teachers, mask), expected)


def test_attention_head_mismatch_says_the_loss_cannot_apply():
    with pytest.raises(ValueError, match="cannot apply"):
        L.attention_mse(torch.zeros(2, 4, 3, 3), torch.zeros(2, 12, 3, 3), torch.ones(2, 3))


def test_default_terms_do_not_depend_on_the_batch_padding_length():
    """Why the defaults average over real entries: extra padding (from a longer neighbour) changes nothing."""
    g = gen(17)
    mask = padded_mask(LENGTHS, T)
    hs, ht, as_, at = randn(B, T, 4, g=g), randn(B, T, 4, g=g), randn(B, 2, T, T, g=g), randn(B, 2, T, T, g=g)
    wider_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.long)], dim=1)
    wide = lambda x, dims: F.pad(x, dims, value=5.0)  # noqa: E731
    hs_w, ht_w = wide(hs, (0, 0, 0, 3)), wide(ht, (0, 0, 0, 3))
    as_w, at_w = wide(as_, (0, 3, 0, 3)), wide(at, (0, 3, 0, 3))
    close(L.hidden_mse(hs_w, ht_w, wider_mask), L.hidden_mse(hs, ht, mask))
    close(L.attention_mse(as_w, at_w, wider_mask), L.attention_mse(as_, at, mask))
    assert not torch.allclose(L.attention_mse(as_w, at_w, wider_mask, include_padding=True),
                              L.attention_mse(as_, at, mask, include_padding=True))


@pytest.mark.parametrize("temperature,scale", [(1.0, False), (2.5, False), (2.5, True)])
def test_soft_cross_entropy_matches_loop(temperature, scale):
    g = gen(18)
    student, teacher = randn(5, 4, g=g), randn(5, 4, g=g)
    expected = torch.tensor([naive_soft_ce(s, t, temperature) for s, t in zip(student.tolist(), teacher.tolist())],
                            dtype=F64)
    if scale:
        expected = expected * temperature**2
    close(L.soft_cross_entropy(student, teacher, temperature, scale_by_t2=scale), expected)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_soft_cross_entropy_against_one_hot_teacher_is_hard_cross_entropy(dtype):
    g = gen(19)
    student = torch.randn(8, 5, generator=g).to(dtype)
    labels = torch.randint(0, 5, (8,), generator=g)
    one_hot_teacher = 1e4 * F.one_hot(labels, 5).to(dtype)  # softmax is exactly one-hot in float32 and float64
    torch.testing.assert_close(L.soft_cross_entropy(student, one_hot_teacher), L.hard_cross_entropy(student, labels),
                               rtol=0, atol=0)


def test_transferable_knowledge_mse_matches_loop():
    g = gen(20)
    s, t = randn(6, 9, g=g), randn(6, 9, g=g)
    close(L.transferable_knowledge_mse(s, t), naive_row_mse(s, t))


def test_identical_student_and_teacher_give_zero_for_every_mse():
    g = gen(21)
    mask = padded_mask(LENGTHS, T)
    h, a, dom = randn(B, T, 4, g=g), randn(B, 2, T, T, g=g), randn(B, 4, g=g)
    for include_padding in (False, True):
        assert torch.equal(L.hidden_mse(h, h.clone(), mask, include_padding), torch.zeros(B, dtype=F64))
        assert torch.equal(L.embedding_mse(h, h.clone(), mask, include_padding), torch.zeros(B, dtype=F64))
        assert torch.equal(L.layerwise_hidden_mse([h, h], [h.clone(), h.clone()], mask, include_padding),
                           torch.zeros(B, dtype=F64))
        assert torch.equal(L.attention_mse(a, a.clone(), mask, include_padding), torch.zeros(B, dtype=F64))
        assert torch.equal(L.layerwise_attention_mse([a], [a.clone()], mask, include_padding),
                           torch.zeros(B, dtype=F64))
    assert torch.equal(L.transferable_knowledge_mse(dom, dom.clone()), torch.zeros(B, dtype=F64))


# ----------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------


def test_expertise_weights_match_loop():
    g = gen(22)
    logits, labels = randn(7, 3, g=g), torch.randint(0, 3, (7,), generator=g)
    scores = torch.rand(7, generator=g, dtype=F64) * 2 - 1
    close(L.expertise_weights(logits, labels, scores), naive_expertise(logits, labels, scores))


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 50.0), b=st.integers(1, 16), c=st.integers(2, 6))
def test_expertise_weights_lie_in_their_range(seed, scale, b, c):
    g = gen(seed)
    logits = torch.randn(b, c, generator=g, dtype=F64) * scale
    labels = torch.randint(0, c, (b,), generator=g)
    scores = torch.rand(b, generator=g, dtype=F64) * 2 - 1
    weights = L.expertise_weights(logits, labels, scores)
    assert bool((weights >= (1 + scores) / (math.e + 1) - 1e-12).all())
    assert bool((weights <= (1 + scores) / 2 + 1e-12).all())


def test_expertise_weights_are_detached():
    logits = torch.randn(4, 3, requires_grad=True)
    scores = torch.rand(4, requires_grad=True)
    weights = L.expertise_weights(logits, torch.tensor([0, 1, 2, 0]), scores)
    assert not weights.requires_grad


def test_weighted_mean():
    g = gen(23)
    x, w = randn(9, g=g), torch.rand(9, generator=g, dtype=F64)
    close(L.weighted_mean(x, torch.ones(9, dtype=F64)), x.mean())
    close(L.weighted_mean(x), x.mean())
    close(L.weighted_mean(x, w), torch.tensor(sum(a * b for a, b in zip(x.tolist(), w.tolist())) / 9, dtype=F64))
    close(L.weighted_mean(x, w, normalize="weights"),
          torch.tensor(sum(a * b for a, b in zip(x.tolist(), w.tolist())) / sum(w.tolist()), dtype=F64))
    with pytest.raises(ValueError, match="per instance"):
        L.weighted_mean(x.view(3, 3))


# ----------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------


def distill_inputs(seed: int, requires_grad: bool = False, layers: int = 2, heads: int = 2, dt: int = 6):
    """Seeded student/teacher tensors for the objectives (student ones are leaves if ``requires_grad``)."""
    g = gen(seed)
    leaf = lambda *shape: randn(*shape, g=g).requires_grad_(requires_grad)  # noqa: E731
    return dict(
        student_hidden_states=[leaf(B, T, dt) for _ in range(layers + 1)],
        teacher_hidden_states=[randn(B, T, dt, g=g) for _ in range(layers + 1)],
        student_attention_scores=[leaf(B, heads, T, T) for _ in range(layers)],
        teacher_attention_scores=[randn(B, heads, T, T, g=g) for _ in range(layers)],
        attention_mask=padded_mask(LENGTHS, T),
        student_logits=leaf(B, 3),
        teacher_logits=randn(B, 3, g=g),
        student_domain_hidden=leaf(B, dt),
        teacher_domain_hidden=randn(B, dt, g=g),
    )


STAGE1_KEYS = ("student_hidden_states", "teacher_hidden_states", "student_attention_scores",
               "teacher_attention_scores", "attention_mask", "student_domain_hidden", "teacher_domain_hidden")


def naive_terms(x):
    """Per-instance emb, hid, att, tkd, pred by the loop references."""
    mask = x["attention_mask"]
    sh, th = x["student_hidden_states"], x["teacher_hidden_states"]
    return {
        "emb": naive_hidden_mse(sh[0].detach(), th[0], mask, False),
        "hid": sum(naive_hidden_mse(s.detach(), t, mask, False) for s, t in zip(sh[1:], th[1:])),
        "att": sum(naive_attention_mse(s.detach(), t, mask, False)
                   for s, t in zip(x["student_attention_scores"], x["teacher_attention_scores"])),
        "tkd": naive_row_mse(x["student_domain_hidden"].detach(), x["teacher_domain_hidden"]),
        "pred": torch.tensor([naive_soft_ce(s, t, 1.0) for s, t in
                              zip(x["student_logits"].tolist(), x["teacher_logits"].tolist())], dtype=F64),
    }


def test_stage1_objective_matches_loop():
    x = distill_inputs(24)
    w = torch.rand(B, generator=gen(0), dtype=F64)
    gamma2 = 0.3
    out = L.stage1_objective(**{k: x[k] for k in STAGE1_KEYS}, weights=w, gamma2=gamma2)
    n = naive_terms(x)
    per = n["emb"] + n["hid"] + n["att"] + gamma2 * n["tkd"]
    close(out.total, torch.tensor(sum(a * b for a, b in zip(w.tolist(), per.tolist())) / B, dtype=F64))
    assert set(out.terms) == {"emb", "hid", "att", "tkd"}
    for name in out.terms:
        close(out.terms[name], n[name])


def test_stage2_objective_matches_loop_and_is_unweighted_by_default():
    x = distill_inputs(25)
    out = L.stage2_objective(x["student_logits"], x["teacher_logits"])
    close(out.total, naive_terms(x)["pred"].mean())
    assert out.weights is None and set(out.terms) == {"pred"}
    w = torch.rand(B, generator=gen(1), dtype=F64)
    close(L.stage2_objective(x["student_logits"], x["teacher_logits"], weights=w).total,
          (w * naive_terms(x)["pred"]).mean())


def test_single_stage_objective_matches_loop():
    x = distill_inputs(26)
    w = torch.rand(B, generator=gen(2), dtype=F64)
    out = L.single_stage_objective(**x, weights=w, gamma2=0.5)
    n = naive_terms(x)
    per = n["emb"] + n["hid"] + n["att"] + n["pred"] + 0.5 * n["tkd"]
    close(out.total, (w * per).mean())
    assert set(out.means()) == {"loss", "emb", "hid", "att", "pred", "tkd", "weight"}


def test_tinybert_kd_is_unweighted_and_has_no_tkd_term():
    x = distill_inputs(27)
    x.pop("student_domain_hidden"), x.pop("teacher_domain_hidden")
    out = L.single_stage_objective(**x)  # weights None, no domain tensors
    n = naive_terms(x | {"student_domain_hidden": torch.zeros(B, 1), "teacher_domain_hidden": torch.zeros(B, 1)})
    close(out.total, (n["emb"] + n["hid"] + n["att"] + n["pred"]).mean())
    assert "tkd" not in out.terms
    with pytest.raises(ValueError, match="both"):
        L.stage1_objective(**{k: x[k] for k in STAGE1_KEYS if "domain" not in k},
                           student_domain_hidden=torch.zeros(B, 6))


def _averaged_first(x, weights, gamma2=0.5):
    """The EasyNLP defect: average each term over the batch, *then* multiply by the per-instance weights.

    mean_i w_i * (mean_b emb + mean_b hid + ...) = mean(w) * (a batch constant): lambda_i no longer belongs to
    instance i. Kept here only to show that the per-instance test below catches it.
    """
    terms = L.single_stage_objective(**x, weights=None, gamma2=gamma2).terms
    batch_scalar = sum((gamma2 if name == "tkd" else 1.0) * term.mean() for name, term in terms.items())
    return (weights * batch_scalar).mean()


def _student_grads(objective, weights, seed=28):
    x = distill_inputs(seed, requires_grad=True)
    objective(x, weights).backward()
    leaves = (x["student_hidden_states"] + x["student_attention_scores"]
              + [x["student_logits"], x["student_domain_hidden"]])
    return [leaf.grad.clone() for leaf in leaves]


def _paper(x, weights):
    return L.single_stage_objective(**x, weights=weights).total


def _changing_one_weight_touches_only_that_instance(objective) -> bool:
    weights = torch.tensor([0.9, 0.4, 0.7, 0.6], dtype=F64)
    changed = weights.clone()
    changed[1] = 0.1
    before, after = _student_grads(objective, weights), _student_grads(objective, changed)
    others = torch.arange(B) != 1
    for g_before, g_after in zip(before, after):
        if not torch.allclose(g_before[others], g_after[others], rtol=1e-12, atol=0):
            return False
        # the changed instance's gradient scales with its weight (0.1 / 0.4)
        if not torch.allclose(g_after[1], g_before[1] * 0.25, rtol=1e-12, atol=1e-15):
            return False
    return True


def test_changing_one_weight_changes_only_that_instances_gradient():
    assert _changing_one_weight_touches_only_that_instance(_paper)


def test_the_per_instance_test_catches_the_averaged_first_defect():
    assert not _changing_one_weight_touches_only_that_instance(_averaged_first)


def test_gradient_flows_through_the_student_but_not_the_weights():
    x = distill_inputs(29, requires_grad=True)
    teacher_logits = x["teacher_logits"].clone().requires_grad_(True)
    scores = torch.rand(B, dtype=F64, requires_grad=True)
    weights = L.expertise_weights(teacher_logits, torch.tensor([0, 1, 2, 0]), scores)
    raw_weights = torch.rand(B, dtype=F64, requires_grad=True)  # even weights that require grad are constants
    (L.single_stage_objective(**x, weights=weights).total
     + L.stage1_objective(**{k: x[k] for k in STAGE1_KEYS}, weights=raw_weights).total).backward()
    for leaf in (x["student_hidden_states"] + x["student_attention_scores"]
                 + [x["student_logits"], x["student_domain_hidden"]]):
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert teacher_logits.grad is None and scores.grad is None and raw_weights.grad is None


# ----------------------------------------------------------------------------------------------------------
# Pinned numbers, worked out by hand
# ----------------------------------------------------------------------------------------------------------


def test_pinned_values():
    # hidden: tokens (1,2), (3,4), pad (9,9) vs zeros; real: (1+4+9+16)/(2*2) = 7.5; all: (30+162)/(3*2) = 32
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert L.hidden_mse(student, torch.zeros_like(student), mask).item() == 7.5
    assert L.hidden_mse(student, torch.zeros_like(student), mask, include_padding=True).item() == 32.0
    # attention: 1 head, 2 real tokens of 3; scores all 2 vs 0: real 4 pairs * 4 / 4 = 4; all 16 / 9
    scores = torch.full((1, 1, 3, 3), 2.0)
    assert L.attention_mse(scores, torch.zeros_like(scores), mask).item() == 4.0
    assert L.attention_mse(scores, torch.zeros_like(scores), mask, include_padding=True).item() == pytest.approx(
        16 / 9)
    # expertise: teacher logits (0, 0) -> p_T(gold) = 1/2; t = 0 -> 1 / (exp(1/4) + 1)
    weight = L.expertise_weights(torch.zeros(1, 2), torch.tensor([1]), torch.zeros(1))
    assert weight.item() == pytest.approx(1 / (math.exp(0.25) + 1))
    # a sure, right teacher and a typical instance (t = 1): lambda = (1 + 1) / 2 = 1
    assert L.expertise_weights(torch.tensor([[1e4, 0.0]]), torch.tensor([0]), torch.ones(1)).item() == 1.0
    # soft CE of uniform student vs any teacher over 4 classes = log 4
    assert L.soft_cross_entropy(torch.zeros(1, 4), torch.randn(1, 4)).item() == pytest.approx(math.log(4))

"""Student-side losses (method doc §3): per-instance distillation terms, expertise weights, stage objectives.

Shapes and conventions: see the package docstring (``metakd_ray.losses``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metakd_ray.losses.base import LossTerms, _check_shape, fp32, weighted_mean

# ----------------------------------------------------------------------------------------------------------
# §3 Distillation terms, each (b,)
# ----------------------------------------------------------------------------------------------------------


@fp32
def hidden_mse(
    student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor, include_padding: bool = False
) -> Tensor:
    """Per-instance MSE(W_h H^S, H^T) -> (b,); the student states (b, t, dt) are already projected by W_h.

    Default: the squared error summed over the real tokens (mask 1, [CLS] and [SEP] included) and the dt
    features, divided by (real tokens * dt). Padding states are whatever the encoder computed there, so leaving
    them out keeps an example's loss independent of how much padding its batch happens to have.
    ``include_padding=True``: TinyBERT's / the reference code's mean over all t * dt entries.
    A row with no real token gives 0.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ: project the student with W_h first")
    if student_hidden.dim() != 3:
        raise ValueError(f"hidden states must be (b, t, d); got shape {tuple(student_hidden.shape)}")
    b, t, width = student_hidden.shape
    squared = (student_hidden - teacher_hidden).pow(2).sum(dim=-1)  # (b, t)
    if include_padding:
        return squared.sum(dim=1) / (t * width)
    _check_shape("attention_mask", attention_mask, (b, t))
    real = attention_mask.to(squared.dtype)  # (b, t)
    return (squared * real).sum(dim=1) / (real.sum(dim=1).clamp(min=1.0) * width)


@fp32
def embedding_mse(
    student_embeddings: Tensor, teacher_embeddings: Tensor, attention_mask: Tensor, include_padding: bool = False
) -> Tensor:
    """L_emb = MSE(W_h E^S, E^T) -> (b,): ``hidden_mse`` on layer 0 (the embedding output), same conventions."""
    return hidden_mse(student_embeddings, teacher_embeddings, attention_mask, include_padding)


@fp32
def layerwise_hidden_mse(
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    attention_mask: Tensor,
    include_padding: bool = False,
) -> Tensor:
    """L_hid = sum_m MSE(W_h H_m^S, H_{g(m)}^T) -> (b,): the SUM over the l mapped layers of ``hidden_mse``.

    Both lists hold l tensors (b, t, dt), paired in order: the student's projected layers and the teacher's
    layers already selected by the layer map g.
    """
    _check_layers(student_hidden_states, teacher_hidden_states, "hidden")
    return torch.stack([hidden_mse(s, t, attention_mask, include_padding)
                        for s, t in zip(student_hidden_states, teacher_hidden_states)]).sum(dim=0)


@fp32
def attention_mse(
    student_scores: Tensor, teacher_scores: Tensor, attention_mask: Tensor, include_padding: bool = False
) -> Tensor:
    """Per-instance MSE of pre-softmax attention scores (b, h, t, t) -> (b,).

    Entries whose query or key is padding are set to 0 in both (so any fill value there, even -inf, is ignored).
    Default: squared error summed over heads and real (query, key) pairs, divided by h * (real tokens)^2, i.e. the
    mean over heads of each head's MSE over its real entries; like ``hidden_mse`` it does not depend on the
    batch's padding length. ``include_padding=True``: the TinyBERT / reference-code convention, mean over all
    h * t * t entries with the masked ones counted as zeros. (TinyBERT zeroes only key-padding entries, via
    ``score <= -1e2``; both modes here also zero padding queries.)
    Different head counts raise ValueError: the attention loss cannot apply.
    """
    if student_scores.dim() != 4 or teacher_scores.dim() != 4:
        raise ValueError(f"attention scores must be (b, h, t, t); got {tuple(student_scores.shape)} and "
                         f"{tuple(teacher_scores.shape)}")
    if student_scores.shape[1] != teacher_scores.shape[1]:
        raise ValueError(f"the student has {student_scores.shape[1]} attention heads and the teacher "
                         f"{teacher_scores.shape[1]}: the attention loss L_att cannot apply (it compares head by "
                         "head); give the student as many heads as the teacher")
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"student scores {tuple(student_scores.shape)} and teacher scores "
                         f"{tuple(teacher_scores.shape)} differ")
    b, heads, t, _ = student_scores.shape
    _check_shape("attention_mask", attention_mask, (b, t))
    real = attention_mask.bool()
    pair = (real.unsqueeze(2) & real.unsqueeze(1)).unsqueeze(1)  # (b, 1, t, t): query and key both real
    zero = student_scores.new_zeros(())
    # where, not multiplication: a masked score may be -inf, and -inf * 0 is NaN.
    diff = torch.where(pair, student_scores, zero) - torch.where(pair, teacher_scores, zero)
    squared = diff.pow(2).sum(dim=(1, 2, 3))  # (b,)
    if include_padding:
        return squared / (heads * t * t)
    real_pairs = real.sum(dim=1).to(squared.dtype).pow(2).clamp(min=1.0)  # (b,)
    return squared / (heads * real_pairs)


@fp32
def layerwise_attention_mse(
    student_scores: Sequence[Tensor],
    teacher_scores: Sequence[Tensor],
    attention_mask: Tensor,
    include_padding: bool = False,
) -> Tensor:
    """L_att = sum_m MSE(A_m^S, A_{g(m)}^T) -> (b,): the SUM over the l mapped layers of ``attention_mse``."""
    _check_layers(student_scores, teacher_scores, "attention")
    return torch.stack([attention_mse(s, t, attention_mask, include_padding)
                        for s, t in zip(student_scores, teacher_scores)]).sum(dim=0)


def _check_layers(student: Sequence[Tensor], teacher: Sequence[Tensor], what: str) -> None:
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student {what} layers but {len(teacher)} teacher layers: "
                         "select the teacher's layers with the layer map first")
    if not student:
        raise ValueError(f"no {what} layers to distil")


@fp32
def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, scale_by_t2: bool = False
) -> Tensor:
    """L_pred = -sum_c softmax(z^T / T)_c * log_softmax(z^S / T)_c -> (b,), from logits (b, c).

    No T^2 factor by default (paper and reference code; T = 1 there anyway). ``scale_by_t2=True`` multiplies by
    T^2 (Hinton et al.), keeping gradient magnitudes comparable across temperatures. Note: the reference code
    takes ``.mean()`` over b * c entries, i.e. this value divided by c (a constant factor).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    teacher_probs = F.softmax(teacher_logits / temperature, dim=-1)  # (b, c)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)  # (b, c)
    loss = -(teacher_probs * student_log_probs).sum(dim=-1)  # (b,)
    return loss * temperature**2 if scale_by_t2 else loss


@fp32
def transferable_knowledge_mse(student_domain_hidden: Tensor, teacher_domain_hidden: Tensor) -> Tensor:
    """L_TKD = MSE(W_d h_d^S(x), h_d^T(x)) -> (b,): mean over dt of the squared error.

    student_domain_hidden (b, dt) is the student's domain-head output already projected by W_d.
    """
    if student_domain_hidden.shape != teacher_domain_hidden.shape or student_domain_hidden.dim() != 2:
        raise ValueError(f"domain hidden states must both be (b, dt); got {tuple(student_domain_hidden.shape)} "
                         f"and {tuple(teacher_domain_hidden.shape)} (project the student's with W_d first)")
    return (student_domain_hidden - teacher_domain_hidden).pow(2).mean(dim=-1)


@fp32
def expertise_weights(teacher_logits: Tensor, labels: Tensor, prototype_scores: Tensor) -> Tensor:
    """Domain-expertise weights lambda (b,): lambda_i = (1 + t_i) / (exp((p_T(y_i | x_i) - 1)^2) + 1).

    p_T is the teacher's softmax probability of the gold label (teacher_logits (b, c), labels (b,)); t (b,) the
    prototype scores. Since p_T in [0, 1], lambda_i lies in [(1 + t_i)/(e + 1), (1 + t_i)/2]: highest where the
    teacher is right and the instance typical. Returned detached (weights are not trained through).
    """
    b = teacher_logits.shape[0]
    _check_shape("labels", labels, (b,))
    _check_shape("prototype_scores", prototype_scores, (b,))
    with torch.no_grad():
        gold_prob = F.softmax(teacher_logits, dim=-1).gather(1, labels.long().unsqueeze(1)).squeeze(1)  # (b,)
        return (1.0 + prototype_scores) / (torch.exp((gold_prob - 1.0) ** 2) + 1.0)


# ----------------------------------------------------------------------------------------------------------
# §3 Objectives
# ----------------------------------------------------------------------------------------------------------


def _layer_terms(
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    student_attention_scores: Sequence[Tensor],
    teacher_attention_scores: Sequence[Tensor],
    attention_mask: Tensor,
    student_domain_hidden: Tensor | None,
    teacher_domain_hidden: Tensor | None,
    include_padding: bool,
) -> dict[str, Tensor]:
    """Per-instance emb / hid / att (/ tkd) terms, each (b,)."""
    if len(student_hidden_states) < 2:
        raise ValueError("hidden-state lists must hold the embedding output (index 0) and at least one layer")
    if len(student_attention_scores) != len(student_hidden_states) - 1:
        raise ValueError(f"{len(student_attention_scores)} attention layers for {len(student_hidden_states) - 1} "
                         "hidden layers: give one attention tensor per distilled layer")
    if (student_domain_hidden is None) != (teacher_domain_hidden is None):
        raise ValueError("give both student_domain_hidden and teacher_domain_hidden (L_TKD) or neither")
    terms = {
        "emb": embedding_mse(student_hidden_states[0], teacher_hidden_states[0], attention_mask, include_padding),
        "hid": layerwise_hidden_mse(student_hidden_states[1:], teacher_hidden_states[1:], attention_mask,
                                    include_padding),
        "att": layerwise_attention_mse(student_attention_scores, teacher_attention_scores, attention_mask,
                                       include_padding),
    }
    if student_domain_hidden is not None:
        terms["tkd"] = transferable_knowledge_mse(student_domain_hidden, teacher_domain_hidden)
    return terms


def _combine(terms: dict[str, Tensor], weights: Tensor | None, gamma2: float) -> LossTerms:
    """Sum the per-instance terms (gamma2 on tkd), then weight and average over the batch."""
    per_instance = sum(gamma2 * x if name == "tkd" else x for name, x in terms.items())  # (b,)
    weights = None if weights is None else weights.detach()
    return LossTerms(total=weighted_mean(per_instance, weights), terms=terms, weights=weights)


@fp32
def stage1_objective(
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    student_attention_scores: Sequence[Tensor],
    teacher_attention_scores: Sequence[Tensor],
    attention_mask: Tensor,
    student_domain_hidden: Tensor | None = None,
    teacher_domain_hidden: Tensor | None = None,
    weights: Tensor | None = None,
    gamma2: float = 0.5,
    include_padding: bool = False,
) -> LossTerms:
    """Stage 1 (reference code's ``stages: two``): mean_i w_i * (L_emb + L_hid + L_att + gamma2 * L_TKD)_i.

    student_hidden_states: l + 1 tensors (b, t, dt), W_h-projected; index 0 = embedding output, 1..l = layers.
    teacher_hidden_states: l + 1 tensors (b, t, dt): E^T, then H^T_{g(1)}, ..., H^T_{g(l)} (layer map applied).
    student/teacher_attention_scores: l tensors (b, h, t, t) each, pre-softmax, paired the same way.
    student_domain_hidden (b, dt), W_d-projected, and teacher_domain_hidden (b, dt): both None = no L_TKD term
        (TinyBERT-KD; gamma2 then has no effect).
    weights (b,): expertise weights lambda for Meta-KD, None (= 1) for TinyBERT-KD; treated as constants.
    Terms: ``emb``, ``hid``, ``att`` (, ``tkd``), each (b,).
    """
    terms = _layer_terms(student_hidden_states, teacher_hidden_states, student_attention_scores,
                         teacher_attention_scores, attention_mask, student_domain_hidden, teacher_domain_hidden,
                         include_padding)
    return _combine(terms, weights, gamma2)


@fp32
def stage2_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
) -> LossTerms:
    """Stage 2: mean_i w_i * L_pred,i, the soft cross-entropy of logits (b, c).

    The reference code's stage 2 is unweighted, hence ``weights=None`` by default; pass lambda to weight it.
    Terms: ``pred`` (b,).
    """
    terms = {"pred": soft_cross_entropy(student_logits, teacher_logits, temperature, scale_by_t2)}
    return _combine(terms, weights, gamma2=0.0)


@fp32
def single_stage_objective(
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    student_attention_scores: Sequence[Tensor],
    teacher_attention_scores: Sequence[Tensor],
    attention_mask: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_domain_hidden: Tensor | None = None,
    teacher_domain_hidden: Tensor | None = None,
    weights: Tensor | None = None,
    gamma2: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    include_padding: bool = False,
) -> LossTerms:
    """The paper's L_KD = mean_i lambda_i * (L_emb + L_hid + L_att + L_pred + gamma2 * L_TKD)_i (``stages: one``).

    Arguments as in ``stage1_objective`` and ``stage2_objective``. TinyBERT-KD in one stage: ``weights=None``
    and no domain tensors. Terms: ``emb``, ``hid``, ``att``, ``pred`` (, ``tkd``), each (b,).
    """
    terms = _layer_terms(student_hidden_states, teacher_hidden_states, student_attention_scores,
                         teacher_attention_scores, attention_mask, student_domain_hidden, teacher_domain_hidden,
                         include_padding)
    terms["pred"] = soft_cross_entropy(student_logits, teacher_logits, temperature, scale_by_t2)
    return _combine(terms, weights, gamma2)

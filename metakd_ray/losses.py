"""Every loss of Meta-KD as a pure function of tensors (method doc ../shared/docs/metakd-method.md §1–3).

Shape legend
    b  batch                      t  tokens (padded length; [CLS] at position 0, padding on the right)
    d  hidden width (student ds, teacher dt)
    h  attention heads            k  domains (K)          c  classes (M in the paper)
    n  examples (a whole training set)                    l  mapped layers

Conventions
- ``attention_mask`` is (b, t) with 1 for a real token and 0 for padding (any dtype).
- Every distillation term is computed *per instance*, shape (b,), and only then weighted and averaged
  (``weighted_mean``). The EasyNLP re-implementation averages each term over the batch first and multiplies the
  scalar by the weights, which turns the per-instance weight lambda_i into one batch constant; the tests show
  that defect (``_averaged_first`` in tests/test_losses.py).
- Per-instance weights (prototype scores t_i, expertise weights lambda_i) are constants: gradients never flow
  into them.
- Objectives return ``LossTerms``: the scalar to back-propagate and each named per-instance term, for logging.
- Defaults are the paper's formulas; the reference code's behaviour is a named option where the two differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossTerms",
    "pooled_representation",
    "class_prototypes",
    "prototype_scores",
    "false_domain_labels",
    "hard_cross_entropy",
    "meta_teacher_loss",
    "hidden_mse",
    "embedding_mse",
    "layerwise_hidden_mse",
    "attention_mse",
    "layerwise_attention_mse",
    "soft_cross_entropy",
    "transferable_knowledge_mse",
    "expertise_weights",
    "weighted_mean",
    "stage1_objective",
    "stage2_objective",
    "single_stage_objective",
]


@dataclass(frozen=True)
class LossTerms:
    """What every objective returns.

    ``total``: () the scalar to back-propagate.
    ``terms``: name -> (b,) per-instance value of each term, *unweighted* and *unscaled* (gamma not applied),
        e.g. ``{"ce": ..., "domain_ce": ...}`` or ``{"emb": ..., "hid": ..., "att": ..., "tkd": ..., "pred": ...}``.
    ``weights``: (b,) the per-instance weights applied (detached), or None for uniform weights.
    """

    total: Tensor
    terms: dict[str, Tensor]
    weights: Tensor | None = None

    def means(self) -> dict[str, float]:
        """Batch means for logging: ``loss`` (= total), one entry per term, and ``weight`` if weighted."""
        out = {"loss": float(self.total.detach())}
        out.update({name: float(term.detach().mean()) for name, term in self.terms.items()})
        if self.weights is not None:
            out["weight"] = float(self.weights.mean())
        return out


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def _check_shape(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _check_range(name: str, ids: Tensor, upper: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
        raise ValueError(f"{name} must lie in [0, {upper}); got values in [{int(ids.min())}, {int(ids.max())}]")


# ----------------------------------------------------------------------------------------------------------
# §1 Prototype scores
# ----------------------------------------------------------------------------------------------------------


def pooled_representation(
    hidden: Tensor, attention_mask: Tensor, mode: Literal["mean", "reference"] = "mean"
) -> Tensor:
    """h(x): pool token vectors (b, t, d) -> (b, d).

    ``mode="mean"`` (paper): masked mean over the real tokens *without* position 0 ([CLS]); [SEP] counts as a
    real token. A row whose only real token is [CLS] (or none) pools to zeros rather than NaN.
    ``mode="reference"``: the reference code's ``mean(hidden[:, 1:])`` over positions 1..t-1 *including padding*
    (the mask is ignored); t == 1 pools to zeros.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (b, t, d); got shape {tuple(hidden.shape)}")
    b, t, _ = hidden.shape
    if mode == "reference":
        return hidden[:, 1:].mean(dim=1) if t > 1 else hidden.new_zeros(b, hidden.shape[2])
    if mode != "mean":
        raise ValueError(f"unknown pooling mode {mode!r}; expected 'mean' or 'reference'")
    _check_shape("attention_mask", attention_mask, (b, t))
    not_cls = (torch.arange(t, device=hidden.device) > 0).to(hidden.dtype)  # (t,)
    weights = attention_mask.to(hidden.dtype) * not_cls  # (b, t)
    summed = (hidden * weights.unsqueeze(-1)).sum(dim=1)  # (b, d)
    count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # (b, 1); empty rows: summed is 0 -> zeros
    return summed / count


def class_prototypes(
    features: Tensor,
    labels: Tensor,
    domain_ids: Tensor,
    num_domains: int,
    num_classes: int,
    mode: Literal["class", "domain"] = "class",
) -> Tensor:
    """Prototypes p_m^(k) (k, c, d) from a whole training set's pooled features (n, d).

    ``mode="class"`` (paper): p_m^(k) = mean of the features of domain k with label m; an empty (domain, class)
    cell raises ValueError naming it.
    ``mode="domain"`` (reference code): one prototype per domain (mean over all its examples, class ignored),
    repeated for every class so that the result has the same (k, c, d) shape; an empty domain raises.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (n, d); got shape {tuple(features.shape)}")
    n, d = features.shape
    _check_shape("labels", labels, (n,))
    _check_shape("domain_ids", domain_ids, (n,))
    _check_range("labels", labels, num_classes)
    _check_range("domain_ids", domain_ids, num_domains)
    if mode == "class":
        cell = domain_ids.long() * num_classes + labels.long()  # (n,) flat (domain, class) index
        cells = num_domains * num_classes
    elif mode == "domain":
        cell = domain_ids.long()
        cells = num_domains
    else:
        raise ValueError(f"unknown prototype mode {mode!r}; expected 'class' or 'domain'")
    sums = features.new_zeros(cells, d).index_add(0, cell, features)  # (cells, d)
    counts = torch.bincount(cell, minlength=cells)  # (cells,)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        if mode == "class":
            where = ", ".join(f"(domain {i // num_classes}, class {i % num_classes})" for i in empty)
            raise ValueError(f"no training example for {where}: cannot build its class prototype "
                             "(use prototypes: domain, or more data)")
        raise ValueError(f"no training example for domain(s) {empty}: cannot build a domain prototype")
    means = sums / counts.unsqueeze(-1).to(features.dtype)
    if mode == "class":
        return means.view(num_domains, num_classes, d)
    return means.unsqueeze(1).expand(num_domains, num_classes, d).contiguous()


def prototype_scores(
    features: Tensor,
    labels: Tensor,
    domain_ids: Tensor,
    prototypes: Tensor,
    alpha: float = 0.5,
    mode: Literal["paper", "reference"] = "paper",
) -> Tensor:
    """Prototype scores t (n,) of pooled features (n, d) against prototypes (k, c, d).

    ``mode="paper"``:
        t_i = alpha * cos(p_{y_i}^(d_i), h_i) + (1 - alpha)/(K - 1) * sum_{k != d_i} cos(p_{y_i}^(k), h_i).
    ``mode="reference"`` (the reference code, with alpha = 0.5 there):
        t_i = alpha * cos(p_{y_i}^(d_i), h_i) + (1 - alpha) * cos(mean_{k != d_i} p_{y_i}^(k), h_i).
    K = 1 (a single domain, so no other domain): t_i = cos(p_{y_i}^(d_i), h_i) in both modes, whatever alpha.
    Each t_i depends only on example i and the given prototypes, so reordering the examples reorders t the same
    way. t is clamped to [-1, 1] against rounding; a zero feature or prototype has cosine 0.
    """
    if features.dim() != 2 or prototypes.dim() != 3:
        raise ValueError(f"features must be (n, d) and prototypes (k, c, d); got {tuple(features.shape)} "
                         f"and {tuple(prototypes.shape)}")
    n, d = features.shape
    k, c, pd = prototypes.shape
    if pd != d:
        raise ValueError(f"features have width {d} but prototypes {pd}")
    _check_shape("labels", labels, (n,))
    _check_shape("domain_ids", domain_ids, (n,))
    _check_range("labels", labels, c)
    _check_range("domain_ids", domain_ids, k)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}")
    if mode not in ("paper", "reference"):
        raise ValueError(f"unknown prototype score mode {mode!r}; expected 'paper' or 'reference'")
    own_class = prototypes[:, labels.long(), :].transpose(0, 1)  # (n, k, d): p_{y_i}^(k) for every k
    cos_all = F.cosine_similarity(features.unsqueeze(1), own_class, dim=-1)  # (n, k)
    own = cos_all.gather(1, domain_ids.long().unsqueeze(1)).squeeze(1)  # (n,)
    if k == 1:
        return own.clamp(-1.0, 1.0)
    is_other = 1.0 - F.one_hot(domain_ids.long(), k).to(features.dtype)  # (n, k)
    if mode == "paper":
        other = (cos_all * is_other).sum(dim=1) / (k - 1)  # (n,) mean cosine to the other domains' prototypes
    else:
        other_mean = (own_class * is_other.unsqueeze(-1)).sum(dim=1) / (k - 1)  # (n, d) mean other prototype
        other = F.cosine_similarity(features, other_mean, dim=-1)  # (n,)
    return (alpha * own + (1.0 - alpha) * other).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# §2 Meta-teacher
# ----------------------------------------------------------------------------------------------------------


def false_domain_labels(
    domain_ids: Tensor,
    num_domains: int,
    generator: torch.Generator | None = None,
    mode: Literal["uniform", "permute"] = "uniform",
) -> Tensor:
    """False domain labels z (b,) for the domain-corruption loss.

    ``mode="uniform"`` (paper): z_i drawn uniformly from the K - 1 domains other than d_i (never d_i); K = 1
    raises ValueError (there is no false domain).
    ``mode="permute"`` (reference code): a random permutation of the batch's domain ids, so z_i may equal d_i.
    ``generator`` makes the draw reproducible; the result is on ``domain_ids``' device.
    """
    if domain_ids.dim() != 1:
        raise ValueError(f"domain_ids must be (b,); got shape {tuple(domain_ids.shape)}")
    _check_range("domain_ids", domain_ids, num_domains)
    gen_device = generator.device if generator is not None else domain_ids.device
    if mode == "permute":
        order = torch.randperm(domain_ids.shape[0], generator=generator, device=gen_device)
        return domain_ids[order.to(domain_ids.device)]
    if mode != "uniform":
        raise ValueError(f"unknown false-domain mode {mode!r}; expected 'uniform' or 'permute'")
    if num_domains < 2:
        raise ValueError("false_domain: uniform needs at least 2 domains (there is no false domain when K = 1)")
    # d + U{1..K-1} mod K is uniform over the K - 1 other domains.
    offset = torch.randint(1, num_domains, domain_ids.shape, generator=generator, device=gen_device)
    return (domain_ids + offset.to(domain_ids.device)) % num_domains


def hard_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-instance cross-entropy CE(logits (b, c), labels (b,)) -> (b,); used by every fine-tuned model."""
    return F.cross_entropy(logits, labels.long(), reduction="none")


def meta_teacher_loss(
    logits: Tensor,
    labels: Tensor,
    domain_logits: Tensor,
    false_domains: Tensor,
    prototype_scores: Tensor,
    gamma1: float = 0.5,
) -> LossTerms:
    """L_MT = mean_i t_i * [CE(f(x_i), y_i) + gamma1 * CE(domain_logits_i, z_i)].

    logits (b, c), labels (b,), domain_logits (b, k), false_domains z (b,), prototype_scores t (b,).
    Terms: ``ce`` and ``domain_ce`` (b,), unweighted; ``weights`` = t (detached). As in the paper and the
    reference code t weights the loss as is (a negative t_i would push its example's loss up).
    """
    b = logits.shape[0]
    _check_shape("labels", labels, (b,))
    _check_shape("domain_logits", domain_logits, (b, domain_logits.shape[-1]))
    _check_shape("false_domains", false_domains, (b,))
    _check_shape("prototype_scores", prototype_scores, (b,))
    ce = hard_cross_entropy(logits, labels)  # (b,)
    domain_ce = hard_cross_entropy(domain_logits, false_domains)  # (b,)
    weights = prototype_scores.detach()
    total = weighted_mean(ce + gamma1 * domain_ce, weights)
    return LossTerms(total=total, terms={"ce": ce, "domain_ce": domain_ce}, weights=weights)


# ----------------------------------------------------------------------------------------------------------
# §3 Distillation terms, each (b,)
# ----------------------------------------------------------------------------------------------------------


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


def embedding_mse(
    student_embeddings: Tensor, teacher_embeddings: Tensor, attention_mask: Tensor, include_padding: bool = False
) -> Tensor:
    """L_emb = MSE(W_h E^S, E^T) -> (b,): ``hidden_mse`` on layer 0 (the embedding output), same conventions."""
    return hidden_mse(student_embeddings, teacher_embeddings, attention_mask, include_padding)


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


def transferable_knowledge_mse(student_domain_hidden: Tensor, teacher_domain_hidden: Tensor) -> Tensor:
    """L_TKD = MSE(W_d h_d^S(x), h_d^T(x)) -> (b,): mean over dt of the squared error.

    student_domain_hidden (b, dt) is the student's domain-head output already projected by W_d.
    """
    if student_domain_hidden.shape != teacher_domain_hidden.shape or student_domain_hidden.dim() != 2:
        raise ValueError(f"domain hidden states must both be (b, dt); got {tuple(student_domain_hidden.shape)} "
                         f"and {tuple(teacher_domain_hidden.shape)} (project the student's with W_d first)")
    return (student_domain_hidden - teacher_domain_hidden).pow(2).mean(dim=-1)


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


def weighted_mean(
    per_instance: Tensor, weights: Tensor | None = None, normalize: Literal["batch", "weights"] = "batch"
) -> Tensor:
    """Scalar mean_i w_i * x_i of per-instance values x (b,) and weights w (b,) (None = all ones).

    ``normalize="batch"`` (paper: mean_i lambda_i * ...): divide by b, so the weights' overall scale matters and
    uniform weights 1 give the plain mean. ``normalize="weights"``: divide by sum_i w_i instead (a weighted
    average; the weight sum must be positive).
    """
    if per_instance.dim() != 1:
        raise ValueError(f"per_instance must be (b,): compute each term per instance before weighting; "
                         f"got shape {tuple(per_instance.shape)}")
    if weights is None:
        return per_instance.mean()
    _check_shape("weights", weights, tuple(per_instance.shape))
    if normalize == "batch":
        return (weights * per_instance).mean()
    if normalize == "weights":
        weight_sum = weights.sum()
        if float(weight_sum) <= 0:
            raise ValueError(f"normalize='weights' needs a positive weight sum; got {float(weight_sum)}")
        return (weights * per_instance).sum() / weight_sum
    raise ValueError(f"unknown normalize {normalize!r}; expected 'batch' or 'weights'")


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

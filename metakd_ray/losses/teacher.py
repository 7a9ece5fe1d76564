"""Teacher-side losses (method doc §1–2): prototypes, prototype scores, false domain labels, L_MT.

Shapes and conventions: see the package docstring (``metakd_ray.losses``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from metakd_ray.losses.base import LossTerms, _check_range, _check_shape, fp32, weighted_mean

# ----------------------------------------------------------------------------------------------------------
# §1 Prototype scores
# ----------------------------------------------------------------------------------------------------------


@fp32
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


@fp32
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


@fp32
def hard_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-instance cross-entropy CE(logits (b, c), labels (b,)) -> (b,); used by every fine-tuned model."""
    return F.cross_entropy(logits, labels.long(), reduction="none")


@fp32
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


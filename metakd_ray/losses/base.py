"""Shared pieces of the losses: ``LossTerms``, shape/range checks, pooling h(x) and the weighted batch mean.

Shapes and conventions: see the package docstring (``metakd_ray.losses``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


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


def _to_fp32(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def fp32(fn: F) -> F:
    """Run a loss in fp32 whatever autocast is on: its fp16/bf16 tensor arguments (also inside lists and tuples)
    are cast to float32 (float64 stays float64) and autocast is off inside, so softmax, log-softmax, MSE and cross-entropy never run in
    bf16/fp16 (``compute.precision``). A no-op for fp32 inputs outside autocast."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


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
# Pooling and weighting
# ----------------------------------------------------------------------------------------------------------


POOLING_MODES = ("mean", "reference", "cls")


@fp32
def pooled_representation(
    hidden: Tensor, attention_mask: Tensor, mode: Literal["mean", "reference", "cls"] = "mean"
) -> Tensor:
    """h(x): pool token vectors (b, t, d) -> (b, d).

    ``mode="mean"`` (paper): masked mean over the real tokens *without* position 0 ([CLS]); [SEP] counts as a
    real token. A row whose only real token is [CLS] (or none) pools to zeros rather than NaN.
    ``mode="reference"``: the reference code's ``mean(hidden[:, 1:])`` over positions 1..t-1 *including padding*
    (the mask is ignored); t == 1 pools to zeros.
    ``mode="cls"``: the [CLS] vector ``hidden[:, 0]`` (the mask is ignored), i.e. the input of BERT's pooler. The task
    models (``models.heads``) apply their pooler (dense + tanh, the checkpoint's weights when it has them) on it,
    so their h(x) is BERT's pooled output, the paper's; the prototype pass (``teacher.model.pooled_features``),
    which has no pooler, uses the [CLS] vector as it is.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (b, t, d); got shape {tuple(hidden.shape)}")
    b, t, _ = hidden.shape
    if mode == "reference":
        return hidden[:, 1:].mean(dim=1) if t > 1 else hidden.new_zeros(b, hidden.shape[2])
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {', '.join(map(repr, POOLING_MODES))}")
    _check_shape("attention_mask", attention_mask, (b, t))
    not_cls = (torch.arange(t, device=hidden.device) > 0).to(hidden.dtype)  # (t,)
    weights = attention_mask.to(hidden.dtype) * not_cls  # (b, t)
    summed = (hidden * weights.unsqueeze(-1)).sum(dim=1)  # (b, d)
    count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # (b, 1); empty rows: summed is 0 -> zeros
    return summed / count


@fp32
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


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

from metakd_ray.losses.base import POOLING_MODES, LossTerms, fp32, pooled_representation, weighted_mean
from metakd_ray.losses.student import (
    attention_mse,
    embedding_mse,
    expertise_weights,
    hidden_mse,
    layerwise_attention_mse,
    layerwise_hidden_mse,
    single_stage_objective,
    soft_cross_entropy,
    stage1_objective,
    stage2_objective,
    transferable_knowledge_mse,
)
from metakd_ray.losses.teacher import (
    class_prototypes,
    false_domain_labels,
    hard_cross_entropy,
    meta_teacher_loss,
    prototype_scores,
)

__all__ = [
    "LossTerms",
    "fp32",
    "pooled_representation",
    "POOLING_MODES",
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

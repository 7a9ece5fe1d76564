"""A Meta-KD student as a plain Hugging Face sequence classifier (custom code, loaded with ``trust_remote_code``).

This file is copied verbatim into every folder ``metakd_ray.export.export_student`` writes, next to
``config.json`` (whose ``auto_map`` points ``AutoConfig`` and ``AutoModelForSequenceClassification`` here),
``model.safetensors`` and the tokenizer files. It imports only ``torch`` and ``transformers``: whoever loads an
export needs neither ``metakd_ray`` nor anything else from the training project::

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path)

Design. The model is exactly the trained student's *inference* path and nothing else:

* ``encoder``: the student's encoder, of any family transformers builds with ``AutoModel`` (BERT/MiniLM, RoBERTa,
  ELECTRA, DistilBERT, DeBERTa-v2 are the ones metakd_ray trains), without a pooler. ``config.encoder_config`` is
  the encoder's own configuration as a dict carrying its ``model_type``; its weights are the encoder's
  (``encoder.*`` in ``model.safetensors``). ``token_type_ids`` reach it only if its forward takes them (DistilBERT's
  does not).
* pooling h(x) (``metakd_pool``, a copy of ``metakd_ray.losses.pooled_representation``), computed in float32:
  ``"mean"`` (paper) is the masked mean over the real tokens without position 0 ([CLS]; [SEP] counts), zeros for
  a row with no such token; ``"reference"`` (the reference code) is the plain mean over positions 1..t-1
  *including padding*, so its result depends on how far a batch is padded (as it did in training); ``"cls"`` is
  the [CLS] vector (position 0) followed by ``pooler`` (dense + tanh, BERT's pooler; the student's trained
  weights, ``pooler.*`` in ``model.safetensors``), which only a ``"cls"`` model has.
* ``dropout`` (inactive in eval mode) and ``classifier``: the student's classifier, giving the logits.

The student's training-only parts (``W_h``, the domain head and ``W_d``) are not part of the export. With
``"mean"``/``"reference"`` pooling the encoder's own pooler is not used, which is why a stock
``*ForSequenceClassification`` cannot hold such a student (a BERT ``"cls"`` student has exactly
``BertForSequenceClassification``'s shape; benchmarks/RESULTS.md "Pooling" says why it is not the default). With
``labels`` the forward also returns the usual loss (``config.problem_type`` as in
``BertForSequenceClassification``), so an export can be fine-tuned further with the ``Trainer``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

POOLING_MODES = ("mean", "reference", "cls")


class MetaKDStudentConfig(PretrainedConfig):
    """``encoder_config`` (the student encoder's config as a dict, with its ``model_type``), ``metakd_pooling``
    (``"mean"``, ``"reference"`` or ``"cls"``), ``classifier_dropout`` and the usual ``id2label``/``label2id``."""

    model_type = "metakd_student"

    def __init__(self, encoder_config: dict | None = None, metakd_pooling: str = "mean",
                 classifier_dropout: float | None = None, **kwargs: Any) -> None:
        if metakd_pooling not in POOLING_MODES:
            raise ValueError(f"metakd_pooling={metakd_pooling!r}; expected one of {POOLING_MODES}")
        super().__init__(**kwargs)
        self.encoder_config = dict(encoder_config or {"model_type": "bert"})
        self.metakd_pooling = metakd_pooling
        self.classifier_dropout = classifier_dropout

    def encoder_settings(self) -> PretrainedConfig:
        """The encoder's configuration as its own config class (``BertConfig``, ``DebertaV2Config``, ...)."""
        settings = dict(self.encoder_config)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


def no_pooler_kwargs(config: PretrainedConfig) -> dict:
    """``{"add_pooling_layer": False}`` for the ``AutoModel`` classes that have a pooler (BERT, RoBERTa), else {}."""
    model_cls = MODEL_MAPPING.get(type(config), None)
    if model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def accepts_token_type_ids(encoder: nn.Module) -> bool:
    """Whether ``encoder``'s forward takes ``token_type_ids`` (DistilBERT's has no segment embeddings)."""
    return "token_type_ids" in inspect.signature(type(encoder).forward).parameters


def metakd_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """h(x): token vectors (b, t, d) -> (b, d) in float32, as the student pooled them in training (for ``"cls"``
    the [CLS] vector, which the model's ``pooler`` then maps)."""
    hidden = hidden.float()
    b, t, d = hidden.shape
    if mode == "reference":
        return hidden[:, 1:].mean(dim=1) if t > 1 else hidden.new_zeros(b, d)
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    not_cls = (torch.arange(t, device=hidden.device) > 0).to(hidden.dtype)  # (t,)
    weights = attention_mask.to(hidden.dtype) * not_cls  # (b, t)
    summed = (hidden * weights.unsqueeze(-1)).sum(dim=1)  # (b, d)
    count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # (b, 1); empty rows: summed is 0 -> zeros
    return summed / count


class MetaKDClsPooler(nn.Module):
    """BERT's pooler: tanh(dense(h_[CLS])), (b, d) -> (b, d) (``metakd_ray.models.heads.ClsPooler``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


class MetaKDStudentForSequenceClassification(PreTrainedModel):
    """Encoder -> Meta-KD pooling (-> [CLS] pooler) -> dropout -> linear classifier (the student's inference path)."""

    config_class = MetaKDStudentConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MetaKDStudentConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        encoder_config = config.encoder_settings()
        self.encoder = AutoModel.from_config(encoder_config, **no_pooler_kwargs(encoder_config))
        p = config.classifier_dropout if config.classifier_dropout is not None else 0.1
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.pooler = MetaKDClsPooler(encoder_config.hidden_size) if config.metakd_pooling == "cls" else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput | tuple[torch.Tensor, ...]:
        if attention_mask is None:  # no padding: every position is a real token
            ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if token_type_ids is not None and accepts_token_type_ids(self.encoder):
            kwargs["token_type_ids"] = token_type_ids
        outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        pooled = metakd_pool(outputs.last_hidden_state, attention_mask, self.config.metakd_pooling)  # (b, d)
        if self.pooler is not None:
            pooled = self.pooler(pooled.to(self.pooler.dense.weight.dtype))  # (b, d)
        logits = self.classifier(self.dropout(pooled.to(self.classifier.weight.dtype)))  # (b, c)
        loss = self._loss(logits, labels) if labels is not None else None
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``BertForSequenceClassification``'s loss choice: regression, single- or multi-label classification."""
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1) if self.num_labels == 1 else logits, labels.float())
        if self.config.problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


__all__ = ["MetaKDClsPooler", "MetaKDStudentConfig", "MetaKDStudentForSequenceClassification", "metakd_pool"]

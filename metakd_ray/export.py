"""Export a trained :class:`~metakd_ray.models.Student` as a folder plain Hugging Face ``transformers`` loads.

``save_pretrained`` (``models/heads.py``) writes the training format: ``encoder/`` plus ``heads.pt``/``heads.json``,
loadable only through ``metakd_ray``. :func:`export_student` writes what a user ships instead::

    <directory>/
      config.json            MetaKDStudentConfig: encoder_config (the encoder's own config, with its model_type:
                             bert, roberta, electra, distilbert, deberta-v2, ...), metakd_pooling,
                             classifier_dropout, id2label/label2id,
                             auto_map -> modeling_metakd.{MetaKDStudentConfig, MetaKDStudentForSequenceClassification}
      modeling_metakd.py     copied from metakd_ray/hf_student/ (imports only torch and transformers)
      model.safetensors      encoder (as ``encoder.*``) and classifier weights
      tokenizer.json, tokenizer_config.json, ...   the tokenizer (model_max_length capped, see below)
      metakd_export.json     label names, pooling, parameter count, max_length, source metadata, versions

and anyone loads it with ``AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)``
and ``AutoTokenizer.from_pretrained(directory)``, or ``pipeline("text-classification", model=directory,
trust_remote_code=True)``; ``python -m metakd_ray.predict`` is a small CLI on top of exactly that.

Design:

* Custom code through transformers' documented convention: the two classes are registered with
  ``register_for_auto_class``, so ``save_pretrained`` copies ``modeling_metakd.py`` into the folder and writes
  ``auto_map`` into ``config.json``. The export is then checked for both.
* Every encoder family metakd_ray trains (``models/families.py``) exports the same way: the modeling file builds
  the encoder with ``AutoModel.from_config`` from ``encoder_config``. Format 2; format 1 (``bert.*`` weights, a
  flat BertConfig) was BERT-only, and its folders keep loading with the modeling file they carry.
* Only the student's inference path is exported: encoder -> pooling (``Student.pooling``; for ``cls`` also
  ``Student.pooler``, as ``pooler.*``) -> dropout -> ``Student.classifier`` (``Student.forward``'s logits). ``W_h``,
  the domain head and ``W_d`` only serve the distillation losses and are left out; an encoder's own pooler, if any,
  is unused by the student (a ``cls`` student has its own, trained) and left out too.
  Weights are copied with strict ``load_state_dict``, so a missing or extra tensor fails the export.
* The tokenizer's ``model_max_length`` is capped at ``max_length`` (the training ``data.max_length`` when the
  caller passes it) and at what the encoder's position embeddings take (``families.max_tokens``), so
  ``truncation=True`` yields inputs the model can take and that look like the ones it was trained on.
* Atomic (``training.atomic_export``): everything is written to a temporary folder beside ``directory`` and
  renamed into place; an older export is replaced only once the new one is complete, and a failure leaves no
  partial folder behind.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from metakd_ray.hf_student.modeling_metakd import (
    POOLING_MODES,
    MetaKDStudentConfig,
    MetaKDStudentForSequenceClassification,
)
from metakd_ray.models import families
from metakd_ray.training import atomic_export

EXPORT_FORMAT = 2
METADATA_FILE = "metakd_export.json"
MODELING_FILE = "modeling_metakd.py"
AUTO_MAP = {
    "AutoConfig": "modeling_metakd.MetaKDStudentConfig",
    "AutoModelForSequenceClassification": "modeling_metakd.MetaKDStudentForSequenceClassification",
}
# Encoder config entries that describe the encoder as a checkpoint or a task model rather than its shape; the
# export's own config holds the task's.
_DROP_CONFIG_KEYS = ("architectures", "auto_map", "transformers_version", "_name_or_path", "id2label", "label2id",
                     "num_labels", "problem_type", "dtype", "torch_dtype", "_commit_hash")


def _check_labels(label_names: Sequence[str], num_labels: int) -> tuple[str, ...]:
    names = tuple(label_names) if not isinstance(label_names, str) else (label_names,)
    if len(names) != num_labels:
        raise ValueError(f"{len(names)} label names {list(names)} for a student with {num_labels} outputs; "
                         "pass one name per class, in label-id order")
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"label names must be distinct non-empty strings; got {list(names)}")
    return names


def _encoder_of(student: nn.Module) -> nn.Module:
    encoder = student.encoder
    encoder = encoder.module if hasattr(encoder, "module") else encoder  # unwrap DistributedDataParallel
    try:
        families.family_of(encoder)
    except families.UnsupportedFamily as e:
        raise TypeError(f"export_student: this student's encoder (a {type(encoder).__name__}) {e}") from None
    return encoder


def build_hf_model(student: nn.Module, label_names: Sequence[str]) -> MetaKDStudentForSequenceClassification:
    """The ``transformers`` model holding ``student``'s inference path (CPU, eval mode, weights copied)."""
    from metakd_ray.models import Student

    student = student.module if hasattr(student, "module") else student  # unwrap DistributedDataParallel
    if not isinstance(student, Student):
        raise TypeError(f"export_student exports a metakd_ray.models.Student, not a {type(student).__name__}")
    encoder = _encoder_of(student)
    classifier: nn.Linear = student.classifier
    names = _check_labels(label_names, classifier.out_features)
    pooling = student.pooling
    if pooling not in POOLING_MODES:
        raise ValueError(f"student pooling {pooling!r}; expected one of {POOLING_MODES}")
    settings = {k: v for k, v in encoder.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    config = MetaKDStudentConfig(
        encoder_config=json.loads(json.dumps(settings)), metakd_pooling=pooling,
        classifier_dropout=float(student.dropout.p),
        id2label={i: n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
        architectures=[MetaKDStudentForSequenceClassification.__name__])
    model = MetaKDStudentForSequenceClassification(config)
    encoder_state = {k: v.detach().cpu() for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
    model.encoder.load_state_dict(encoder_state, strict=True)
    model.classifier.load_state_dict({k: v.detach().cpu() for k, v in classifier.state_dict().items()}, strict=True)
    if model.pooler is not None:  # cls pooling: the student's [CLS] pooler
        model.pooler.load_state_dict({k: v.detach().cpu() for k, v in student.pooler.state_dict().items()},
                                     strict=True)
    dtype = next((v.dtype for v in encoder_state.values() if v.is_floating_point()), torch.float32)
    return model.to(dtype).eval()  # the encoder's weight dtype (float32 for every student trained here)


def _cap_tokenizer_length(directory: Path, limit: int) -> int:
    """Cap ``model_max_length`` in the saved ``tokenizer_config.json`` at ``limit``; returns the value in effect."""
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    current = cfg.get("model_max_length")
    value = limit if not isinstance(current, (int, float)) or current > limit else int(current)
    cfg["model_max_length"] = value
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return value


def _check_written(directory: Path) -> None:
    """Fail the export (before it replaces anything) unless transformers wrote the custom-code convention."""
    cfg = json.loads((directory / "config.json").read_text())
    missing = {k: v for k, v in AUTO_MAP.items() if cfg.get("auto_map", {}).get(k) != v}
    if missing or not (directory / MODELING_FILE).is_file():
        raise RuntimeError(f"export in {directory} lacks the custom-code files: auto_map {cfg.get('auto_map')!r} "
                           f"(expected {AUTO_MAP}), {MODELING_FILE} present: {(directory / MODELING_FILE).is_file()}")
    if not (directory / "model.safetensors").is_file():
        raise RuntimeError(f"export in {directory} has no model.safetensors")


def export_student(student: nn.Module, tokenizer: Any, directory: str | Path, label_names: Sequence[str], *,
                   extra_metadata: Mapping[str, Any] | None = None, max_length: int | None = None) -> Path:
    """Write ``student`` (a ``models.Student``) and ``tokenizer`` to ``directory`` as a Hugging Face folder with
    custom code (see the module docstring); returns ``directory`` as a Path.

    ``label_names``: one per class in label-id order, e.g. ``("negative", "positive")`` (``Splits.label_names``);
    they become ``config.id2label``/``label2id``. ``extra_metadata``: JSON-serialisable facts about the run
    (target domain, method, rate, seed, test accuracy, ...) stored as ``source`` in ``metakd_export.json``.
    ``max_length``: the training ``data.max_length``, to cap the tokenizer's ``model_max_length`` at.
    The student itself is not changed (not even its train/eval mode).
    """
    model = build_hf_model(student, label_names)
    source = json.loads(json.dumps(dict(extra_metadata or {}), default=str))  # fail here, not half-way through
    limit = families.max_tokens(model.encoder.config)
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length}; expected at least 2 ([CLS] and [SEP])")
        limit = min(limit, int(max_length))
    MetaKDStudentConfig.register_for_auto_class()
    MetaKDStudentForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

    def write(tmp: Path) -> None:
        import transformers
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in training logs
        try:
            model.save_pretrained(tmp)  # config.json (with auto_map), model.safetensors, modeling_metakd.py
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        effective = _cap_tokenizer_length(tmp, limit)
        _check_written(tmp)
        meta = {
            "format": EXPORT_FORMAT,
            "label_names": [model.config.id2label[i] for i in range(model.config.num_labels)],
            "pooling": model.config.metakd_pooling,
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_length": effective,
            "source": source,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_export(write, Path(directory))

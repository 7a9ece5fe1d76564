"""Task models: an encoder plus heads, for every teacher kind and for the student (method doc §2, §3).

Shape legend: ``b`` batch, ``t`` tokens, ``d`` hidden, ``k`` domains, ``c`` classes.

Each model keeps its constructor arguments (except the encoder) in ``init_args`` so that ``save_pretrained``
writes ``encoder/`` (HF format), ``heads.pt`` (every non-encoder weight) and ``heads.json`` (class and arguments),
and ``from_pretrained`` / ``load_task_model`` rebuild it exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metakd_ray.losses import POOLING_MODES, pooled_representation
from metakd_ray.models.encoders import EncoderOutput, _from_pretrained, encode

HEADS_FORMAT = 1


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling {pooling!r}; expected 'mean' (paper), 'reference' (reference code) or 'cls' "
                         "(BERT's pooler on [CLS])")
    return pooling


def _linear(d_in: int, d_out: int) -> nn.Linear:
    # BERT's initialiser (normal, std 0.02, zero bias) as HF uses for its classification heads.
    layer = nn.Linear(d_in, d_out)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


def _embedding(n: int, d: int) -> nn.Embedding:
    emb = nn.Embedding(n, d)
    nn.init.normal_(emb.weight, std=0.02)
    return emb


# ----------------------------------------------------------------------------------------------------------
# The [CLS] pooler (``pooling: cls``)
# ----------------------------------------------------------------------------------------------------------

_POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


def _weight_files(name: str) -> list[Path]:
    """The weight files of checkpoint ``name`` (a folder, or a hub id: only what the local cache holds, never a
    download); none for an encoder built in memory (``name`` empty)."""
    if not name:
        return []
    local = Path(name).expanduser()
    if local.is_dir():
        return sorted(local.glob("*.safetensors")) + [p for p in (local / "pytorch_model.bin",) if p.is_file()]
    from huggingface_hub import try_to_load_from_cache

    found = (try_to_load_from_cache(name, f) for f in ("model.safetensors", "pytorch_model.bin"))
    return [Path(f) for f in found if isinstance(f, str)]


def _pooler_names(keys: Any) -> list[str] | None:
    """The checkpoint's names of ``_POOLER_KEYS``, under any model prefix (``bert.``, ``roberta.``), or None."""
    found: dict[str, str] = {}
    for key in keys:
        for want in _POOLER_KEYS:
            if key == want or key.endswith("." + want):
                found.setdefault(want, key)
    return [found[w] for w in _POOLER_KEYS] if len(found) == len(_POOLER_KEYS) else None


def checkpoint_pooler(encoder: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(weight (d, d), bias (d,)) of the pooler in the checkpoint ``encoder`` was loaded from (``config._name_or_path``;
    a student cut from teacher layers keeps the teacher's), or None: an encoder built in memory (``random``), a family
    without a pooler (ELECTRA, DistilBERT, DeBERTa), a folder saved without one (``save_task_model``'s ``encoder/``,
    whose trained pooler is in ``heads.pt``), or a pooler of another width. Our encoders load without their pooler
    (``encoders._from_pretrained``), so it is read here from the file."""
    config = getattr(encoder, "module", encoder).config
    d = config.hidden_size
    for path in _weight_files(getattr(config, "_name_or_path", "") or ""):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                names = _pooler_names(f.keys())
                tensors = [f.get_tensor(n) for n in names] if names else None
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            names = _pooler_names(state)
            tensors = [state[n] for n in names] if names else None
        if tensors is not None:
            weight, bias = tensors
            return (weight, bias) if tuple(weight.shape) == (d, d) and tuple(bias.shape) == (d,) else None
    return None


class ClsPooler(nn.Module):
    """BERT's pooler, tanh(W h_[CLS] + b): the [CLS] vector (b, d) -> the pooled output (b, d), the paper's h(x).
    Starts from the checkpoint's pooler weights when it has them (all-MiniLM-L6-v2 does), else from BERT's
    initialiser; trained with the rest of the model."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        d = getattr(encoder, "module", encoder).config.hidden_size
        self.dense = _linear(d, d)
        pretrained = checkpoint_pooler(encoder)
        if pretrained is not None:
            with torch.no_grad():
                self.dense.weight.copy_(pretrained[0])
                self.dense.bias.copy_(pretrained[1])

    def forward(self, cls_hidden: Tensor) -> Tensor:  # (b, d) -> (b, d)
        return torch.tanh(self.dense(cls_hidden))


def _pooler(encoder: nn.Module, pooling: str) -> nn.Module:
    """What follows ``pooled_representation``: the [CLS] pooler for ``cls``, nothing (no weights) otherwise. Built
    last in each model, so the other heads draw the same initial weights whatever the pooling."""
    return ClsPooler(encoder) if pooling == "cls" else nn.Identity()


@dataclass(frozen=True)
class TeacherOutput:
    logits: Tensor  # (b, c)
    encoder: EncoderOutput
    pooled: Tensor  # (b, d)
    domain_hidden: Tensor | None = None  # (b, d) h_d(x), meta teacher only
    domain_logits: Tensor | None = None  # (b, k), meta teacher only


@dataclass(frozen=True)
class StudentOutput:
    logits: Tensor  # (b, c)
    encoder: EncoderOutput
    pooled: Tensor  # (b, d_s)
    domain_hidden: Tensor | None = None  # (b, d_s) the student's own h_d(x), when it has a domain head
    domain_logits: Tensor | None = None  # always None: the student has no domain classifier


class DomainHead(nn.Module):
    """h_d(x) = tanh(W (h(x) + E_D(d)) + b): pooled features plus a learned domain embedding (method doc §2)."""

    def __init__(self, hidden_size: int, num_domains: int):
        super().__init__()
        self.domain_embedding = _embedding(num_domains, hidden_size)  # E_D (k, d)
        self.dense = _linear(hidden_size, hidden_size)

    def forward(self, pooled: Tensor, domain_ids: Tensor) -> Tensor:  # (b, d), (b,) -> (b, d)
        return torch.tanh(self.dense(pooled + self.domain_embedding(domain_ids)))


def _need_domains(domain_ids: Tensor | None, who: str) -> Tensor:
    if domain_ids is None:
        raise ValueError(f"{who}.forward needs domain_ids (b,)")
    return domain_ids


class ClassifierTeacher(nn.Module):
    """Teacher kinds ``single`` and ``mix``: encoder + classifier on the pooled output."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        self.init_args = dict(num_labels=num_labels, pooling=pooling, dropout=dropout)
        self.encoder, self.pooling = encoder, _check_pooling(pooling)
        self.domain_hidden_size = None  # no domain head
        self.dropout = nn.Dropout(dropout)
        self.classifier = _linear(encoder.config.hidden_size, num_labels)
        self.pooler = _pooler(encoder, pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                domain_ids: Tensor | None = None, *, with_attention_scores: bool = False) -> TeacherOutput:
        enc = encode(self.encoder, input_ids, attention_mask, token_type_ids,
                     with_attention_scores=with_attention_scores)
        pooled = self.pooler(pooled_representation(enc.last_hidden, attention_mask, self.pooling))  # (b, d)
        return TeacherOutput(self.classifier(self.dropout(pooled)), enc, pooled)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        return save_task_model(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ClassifierTeacher":
        return load_task_model(directory, expect=cls)


class MTLTeacher(nn.Module):
    """Teacher kind ``mtl``: shared encoder, one classifier per domain; each example uses its own domain's head."""

    def __init__(self, encoder: nn.Module, num_labels: int, num_domains: int, pooling: str = "mean",
                 dropout: float = 0.1):
        super().__init__()
        self.init_args = dict(num_labels=num_labels, num_domains=num_domains, pooling=pooling, dropout=dropout)
        self.encoder, self.pooling = encoder, _check_pooling(pooling)
        self.domain_hidden_size = None  # no domain head
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(_linear(encoder.config.hidden_size, num_labels) for _ in range(num_domains))
        self.pooler = _pooler(encoder, pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                domain_ids: Tensor | None = None, *, with_attention_scores: bool = False) -> TeacherOutput:
        domain_ids = _need_domains(domain_ids, "MTLTeacher")
        enc = encode(self.encoder, input_ids, attention_mask, token_type_ids,
                     with_attention_scores=with_attention_scores)
        pooled = self.pooler(pooled_representation(enc.last_hidden, attention_mask, self.pooling))  # (b, d)
        x = self.dropout(pooled)
        # Every head on every example, then pick: all heads stay in the graph (DDP needs no unused parameters).
        all_logits = torch.stack([head(x) for head in self.classifiers], dim=1)  # (b, k, c)
        logits = all_logits[torch.arange(x.size(0), device=x.device), domain_ids]  # (b, c)
        return TeacherOutput(logits, enc, pooled)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        return save_task_model(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MTLTeacher":
        return load_task_model(directory, expect=cls)


class MetaTeacher(nn.Module):
    """Meta-teacher: classifier on the pooled output, plus a domain head h_d and a K-way domain classifier on it
    (trained against false domain labels by the domain-corruption loss)."""

    def __init__(self, encoder: nn.Module, num_labels: int, num_domains: int, pooling: str = "mean",
                 dropout: float = 0.1):
        super().__init__()
        self.init_args = dict(num_labels=num_labels, num_domains=num_domains, pooling=pooling, dropout=dropout)
        d = encoder.config.hidden_size
        self.encoder, self.pooling = encoder, _check_pooling(pooling)
        self.domain_hidden_size = d
        self.dropout = nn.Dropout(dropout)
        self.classifier = _linear(d, num_labels)
        self.domain_head = DomainHead(d, num_domains)
        self.domain_classifier = _linear(d, num_domains)
        self.pooler = _pooler(encoder, pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                domain_ids: Tensor | None = None, *, with_attention_scores: bool = False) -> TeacherOutput:
        domain_ids = _need_domains(domain_ids, "MetaTeacher")
        enc = encode(self.encoder, input_ids, attention_mask, token_type_ids,
                     with_attention_scores=with_attention_scores)
        pooled = self.pooler(pooled_representation(enc.last_hidden, attention_mask, self.pooling))  # h_T(x) (b, d)
        logits = self.classifier(self.dropout(pooled))  # (b, c)
        domain_hidden = self.domain_head(pooled, domain_ids)  # h_d(x) (b, d)
        domain_logits = self.domain_classifier(self.dropout(domain_hidden))  # (b, k)
        return TeacherOutput(logits, enc, pooled, domain_hidden, domain_logits)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        return save_task_model(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MetaTeacher":
        return load_task_model(directory, expect=cls)


class Student(nn.Module):
    """Student: classifier on the pooled output; ``W_h`` projects student hidden states to the teacher's width
    (always learned, even when widths match, as in the paper). With ``teacher_domain_hidden_size``, the student has
    its own domain head h_d^S (teacher's form, student width) and ``W_d`` projecting it to the teacher's h_d width
    for L_TKD. It has no domain classifier: nothing trains one."""

    def __init__(self, encoder: nn.Module, num_labels: int, teacher_hidden_size: int,
                 teacher_domain_hidden_size: int | None = None, num_domains: int | None = None,
                 pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if teacher_domain_hidden_size is not None and not num_domains:
            raise ValueError("a student with a domain head (teacher_domain_hidden_size given) needs num_domains")
        self.init_args = dict(num_labels=num_labels, teacher_hidden_size=teacher_hidden_size,
                              teacher_domain_hidden_size=teacher_domain_hidden_size, num_domains=num_domains,
                              pooling=pooling, dropout=dropout)
        d = encoder.config.hidden_size
        self.encoder, self.pooling = encoder, _check_pooling(pooling)
        self.dropout = nn.Dropout(dropout)
        self.classifier = _linear(d, num_labels)
        self.W_h = _linear(d, teacher_hidden_size)
        self.domain_head = DomainHead(d, num_domains) if teacher_domain_hidden_size is not None else None
        self.W_d = _linear(d, teacher_domain_hidden_size) if teacher_domain_hidden_size is not None else None
        self.pooler = _pooler(encoder, pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                domain_ids: Tensor | None = None, *, with_attention_scores: bool = False) -> StudentOutput:
        enc = encode(self.encoder, input_ids, attention_mask, token_type_ids,
                     with_attention_scores=with_attention_scores)
        pooled = self.pooler(pooled_representation(enc.last_hidden, attention_mask, self.pooling))  # (b, d_s)
        logits = self.classifier(self.dropout(pooled))  # (b, c)
        domain_hidden = None
        if self.domain_head is not None:
            domain_hidden = self.domain_head(pooled, _need_domains(domain_ids, "Student (with a domain head)"))
        return StudentOutput(logits, enc, pooled, domain_hidden)

    def project_hidden(self, h: Tensor) -> Tensor:
        """W_h: (..., d_s) -> (..., d_t), for embeddings and hidden states."""
        return self.W_h(h)

    def project_domain(self, h_d: Tensor) -> Tensor:
        """W_d: (b, d_s) -> (b, d_t_domain), the student's h_d^S mapped onto the teacher's h_d^T."""
        if self.W_d is None:
            raise ValueError("this student has no domain head; build it with teacher_domain_hidden_size")
        return self.W_d(h_d)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        return save_task_model(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Student":
        return load_task_model(directory, expect=cls)


TASK_MODELS: dict[str, type[nn.Module]] = {c.__name__: c for c in (ClassifierTeacher, MTLTeacher, MetaTeacher, Student)}


def save_task_model(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``encoder/`` (HF ``save_pretrained``, plus the tokenizer if given), ``heads.pt`` and ``heads.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out / "encoder")
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "encoder")
    heads = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    torch.save(heads, out / "heads.pt")
    meta = dict(format=HEADS_FORMAT, cls=type(model).__name__, args=model.init_args)
    (out / "heads.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_task_model(directory: str | Path, expect: type[nn.Module] | None = None) -> nn.Module:
    """Rebuild a model written by ``save_task_model`` (any class in ``TASK_MODELS``), weights exact."""
    src = Path(directory)
    meta_path = src / "heads.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{src}: no heads.json; not a directory written by save_pretrained")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != HEADS_FORMAT or meta.get("cls") not in TASK_MODELS:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r} or class {meta.get('cls')!r}")
    cls = TASK_MODELS[meta["cls"]]
    if expect is not None and cls is not expect:
        raise ValueError(f"{src} holds a {cls.__name__}, not a {expect.__name__}")
    model = cls(_from_pretrained(str(src / "encoder")), **meta["args"])
    heads = torch.load(src / "heads.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ValueError(f"{src}/heads.pt does not match {cls.__name__}: missing {missing}, unexpected {unexpected}")
    return model

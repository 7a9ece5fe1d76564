"""Encoder families: where each Hugging Face encoder keeps its transformer layers and how its pre-softmax attention
scores are formed. ``encoders.py`` builds students and runs encoders through these adapters; nothing else in the
package needs to know which family an encoder belongs to.

Supported families (``config.model_type`` in brackets):

* BERT (``bert``, ``ernie``; MiniLM checkpoints such as all-MiniLM-L6-v2 are ``bert``), RoBERTa (``roberta``,
  ``xlm-roberta``, ``camembert``) and ELECTRA (``electra``): layers ``encoder.layer``, self-attention
  ``layer.attention.self`` with ``query``/``key`` projections.
* DistilBERT (``distilbert``): layers ``transformer.layer``, self-attention ``layer.attention`` with ``q_lin``/``k_lin``
  projections; no segment embeddings, so ``token_type_ids`` are not passed to it (its tokenizer makes none).
* DeBERTa-v2 (``deberta-v2``; DeBERTa-v3 checkpoints are ``deberta-v2`` too): layers ``encoder.layer``,
  self-attention ``layer.attention.self`` (``DisentangledSelfAttention``) with ``query_proj``/``key_proj``. Runs with
  eager attention (transformers has no sdpa path for it).

What "attention scores" means, per family (shape (b, h, t, t), pre-softmax, before the padding mask, as TinyBERT
distils them):

* ``dot`` (BERT, RoBERTa, ELECTRA, DistilBERT): Q K^T / sqrt(d_head), with Q and K the outputs of the layer's
  query/key projections, recorded by forward hooks (the encoders run sdpa, which returns no attention maps).
* ``disentangled`` (DeBERTa-v2): the whole score DeBERTa's softmax consumes, content-to-content plus the relative
  position terms it is configured with: (Q_c K_c^T + c2p + p2c) with every term divided by sqrt(d_head * s),
  s = 1 + [c2p] + [p2c]. Q_c/K_c are the recorded ``query_proj``/``key_proj`` outputs and the relative-position
  embeddings are the ones the layer used (recorded after its ``pos_dropout``); c2p and p2c are recomputed with the
  layer's own ``disentangled_attention_bias``. softmax(scores masked with DeBERTa's pair mask) equals its attentions.

Teacher and student are compared score for score, so the attention loss needs both to form scores the same way
(``check_attention_compatible``): a student made from a teacher (its layers, or ``random`` with the teacher's
config) is always of the teacher's family.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    """How one family of Hugging Face encoders is laid out (attribute paths are dotted, from the ``AutoModel``)."""

    name: str  # as messages print it
    model_types: tuple[str, ...]  # config.model_type values of this family
    layers: str  # encoder -> its nn.ModuleList of transformer layers
    attention: str  # layer -> its self-attention module
    query: str  # self-attention -> query projection (nn.Linear)
    key: str  # self-attention -> key projection (nn.Linear)
    scores: Literal["dot", "disentangled"]  # how pre-softmax scores are formed (module docstring)
    intermediate: str = "intermediate_size"  # config field of the feed-forward width
    dropout: tuple[str, str] = ("hidden_dropout_prob", "attention_probs_dropout_prob")  # config: hidden, attention
    attn_implementation: str = "sdpa"  # PyTorch's fused attention where transformers has it
    segments: bool = True  # has segment (token type) embeddings
    positions_after_padding: bool = False  # RoBERTa: position ids start at pad_token_id + 1


_BERT_LIKE = dict(layers="encoder.layer", attention="attention.self", query="query", key="key", scores="dot")
FAMILIES: tuple[Family, ...] = (
    Family("BERT", ("bert", "ernie"), **_BERT_LIKE),
    Family("RoBERTa", ("roberta", "xlm-roberta", "camembert"), **_BERT_LIKE, positions_after_padding=True),
    Family("ELECTRA", ("electra",), **_BERT_LIKE),
    Family("DistilBERT", ("distilbert",), layers="transformer.layer", attention="attention", query="q_lin",
           key="k_lin", scores="dot", intermediate="hidden_dim", dropout=("dropout", "attention_dropout"),
           segments=False),
    Family("DeBERTa-v2", ("deberta-v2",), layers="encoder.layer", attention="attention.self", query="query_proj",
           key="key_proj", scores="disentangled", attn_implementation="eager"),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    """The supported families as one phrase, the first entries being model types: for error messages."""
    aliases = ", ".join(f"{t} ({f.name})" for f in FAMILIES for t in f.model_types[1:])
    return (f"{', '.join(f.model_types[0] for f in FAMILIES)} (BERT incl. MiniLM, RoBERTa, ELECTRA, DistilBERT, "
            f"DeBERTa-v2/v3 encoders; also {aliases})")


class UnsupportedFamily(ValueError):
    """An encoder whose ``model_type`` is not in ``FAMILIES``; the message is one line listing the supported ones."""


def family_of(encoder_or_config: Any) -> Family:
    """The family of an encoder, a config, or a ``model_type`` string; raises :class:`UnsupportedFamily`."""
    obj = encoder_or_config
    obj = obj.module if hasattr(obj, "module") else obj  # DistributedDataParallel
    config = getattr(obj, "config", obj)
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in _BY_TYPE:
        raise UnsupportedFamily(f"is a {model_type!r} model; allowed families: {supported()}")
    return _BY_TYPE[model_type]


def unsupported_family(model: Any) -> str | None:
    """Why ``model`` (an encoder, a config or a ``model_type``) is of no supported family, in one line starting
    "is a ..."; None if it is supported, or if ``model`` is None (not known yet)."""
    if model is None:
        return None
    try:
        family_of(model)
    except UnsupportedFamily as e:
        return str(e)
    return None


def local_model_type(path: str) -> str | None:
    """``model_type`` of ``<path>/config.json`` for a local model directory; None for a hub id, or a config.json
    that cannot be read (loading the config then says why)."""
    config_json = Path(path) / "config.json"
    try:
        model_type = json.loads(config_json.read_text()).get("model_type") if config_json.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def layer_list(encoder: nn.Module) -> nn.ModuleList:
    """The transformer layers of ``encoder``, in order."""
    family = family_of(encoder)
    layers = _get(encoder, family.layers)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(encoder).__name__}.{family.layers} is not a layer list ({family.name} layout expected)")
    return layers


def set_layers(encoder: nn.Module, layers: list[nn.Module]) -> None:
    """Replace ``encoder``'s transformer layers (a student keeping a subset of its teacher's) and the layer count in
    its config and modules."""
    family = family_of(encoder)
    parent_path, _, name = family.layers.rpartition(".")
    parent = _get(encoder, parent_path)
    setattr(parent, name, nn.ModuleList(layers))
    if hasattr(parent, "n_layers"):  # DistilBERT's Transformer keeps its own count
        parent.n_layers = len(layers)
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():  # cache index; only decoders use it, but keep it truthful
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    encoder.config.num_hidden_layers = len(layers)  # attribute_map: DistilBERT's n_layers


def max_tokens(config: Any) -> int:
    """The longest input (in tokens) the position embeddings of an encoder with ``config`` can take."""
    limit = int(config.max_position_embeddings)
    if family_of(config).positions_after_padding:  # positions pad_token_id + 1 .. pad_token_id + t
        limit -= int(config.pad_token_id) + 1
    return limit


def random_like(config: Any, *, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                vocab_size: int) -> nn.Module:
    """A randomly initialised encoder of ``config``'s family and settings (activation, norms, positions, dropout,
    relative attention) with the given shape; no pooler."""
    from transformers import AutoModel

    from metakd_ray.hf_student.modeling_metakd import no_pooler_kwargs

    family = family_of(config)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    cfg = copy.deepcopy(config)
    for key, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_layers),
                       ("num_attention_heads", num_heads), (family.intermediate, intermediate_size),
                       ("vocab_size", vocab_size)):
        setattr(cfg, key, value)
    cfg.__dict__.pop("metakd_teacher_layers", None)  # the teacher's record, not this encoder's
    if hasattr(cfg, "embedding_size") and getattr(config, "embedding_size", None) == config.hidden_size:
        cfg.embedding_size = hidden_size  # ELECTRA/DeBERTa: no projection unless the teacher had one
    cfg.architectures, cfg._name_or_path = None, ""
    return AutoModel.from_config(cfg, attn_implementation=family.attn_implementation, dtype=torch.float32,
                                 **no_pooler_kwargs(cfg))


def config_value(config_json: dict, name: str) -> Any:
    """Field ``name`` (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ...) of an encoder's saved
    ``config.json`` (a dict), through its config class's attribute map: DistilBERT saves ``n_layers``, ``dim``,
    ``n_heads``."""
    from transformers import CONFIG_MAPPING

    model_type = config_json.get("model_type")
    family_of(model_type)
    return config_json[CONFIG_MAPPING[model_type].attribute_map.get(name, name)]


class EmbeddingOutput(nn.Module):
    """``hidden_states[0]`` of an encoder (b, t, d) from its embedding modules alone: what the teacher cache rebuilds
    layer 0 with. ELECTRA projects its embeddings to the hidden width; DeBERTa-v2 zeroes padded positions;
    DistilBERT has no segment embeddings."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.family = family_of(encoder)
        self.embeddings = encoder.embeddings
        self.project = getattr(encoder, "embeddings_project", None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        if self.family.scores == "disentangled":
            return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)
        if not self.family.segments:
            return self.embeddings(input_ids)
        out = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self.project(out) if self.project is not None else out


def encoder_kwargs(encoder: nn.Module, token_type_ids: Tensor | None) -> dict:
    """``token_type_ids`` as a keyword for ``encoder``'s forward, or nothing for an encoder without segment
    embeddings (DistilBERT; the exported model decides the same from its encoder's forward signature)."""
    return {"token_type_ids": token_type_ids} if token_type_ids is not None and family_of(encoder).segments else {}


# ----------------------------------------------------------------------------------------------------------
# Attention scores
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryKey:
    """One layer's query and key projections and the scale of Q K^T (``dot`` families)."""

    query: nn.Linear
    key: nn.Linear
    scaling: float


def self_attention_modules(encoder: nn.Module) -> list[nn.Module]:
    """Each layer's self-attention module, in layer order."""
    family = family_of(encoder)
    return [_get(layer, family.attention) for layer in layer_list(encoder)]


def query_key_projections(encoder: nn.Module) -> list[QueryKey]:
    """Each layer's query/key projections and scale: what a ``dot`` family's scores are built from (the teacher
    cache rebuilds scores with them). DeBERTa-v2's scores also need relative positions: refused here."""
    family = family_of(encoder)
    if family.scores != "dot":
        raise TypeError(f"{family.name} attention scores are not Q K^T / sqrt(d_head) alone (relative-position terms); "
                        "they cannot be rebuilt from the query/key projections: use the live teacher")
    heads = encoder.config.num_attention_heads
    out = []
    for attn in self_attention_modules(encoder):
        query, key = getattr(attn, family.query), getattr(attn, family.key)
        out.append(QueryKey(query, key, float(getattr(attn, "scaling", (query.out_features // heads) ** -0.5))))
    return out


@contextlib.contextmanager
def record_attention_inputs(encoder: nn.Module) -> Iterator[dict[tuple[int, str], Tensor]]:
    """Forward hooks recording, per layer ``i`` (0-based), what its scores are built from: ``(i, "query")`` and
    ``(i, "key")``, the projections' outputs (b, t, h*dh), and for DeBERTa-v2 with relative attention ``(i, "rel")``,
    the relative-position embeddings the layer used (after its dropout). Hooks are removed on exit.

    The first call of a projection in a forward is the one kept: DeBERTa-v2 with ``share_att_key`` calls the same
    projections again on the relative-position embeddings."""
    family = family_of(encoder)
    captured: dict[tuple[int, str], Tensor] = {}
    handles = []

    def hook(idx: int, which: str):
        def record(_module, _inputs, output):
            captured.setdefault((idx, which), output)
        return record

    try:
        for i, attn in enumerate(self_attention_modules(encoder)):
            handles.append(getattr(attn, family.query).register_forward_hook(hook(i, "query")))
            handles.append(getattr(attn, family.key).register_forward_hook(hook(i, "key")))
            if family.scores == "disentangled" and getattr(attn, "relative_attention", False):
                handles.append(attn.pos_dropout.register_forward_hook(hook(i, "rel")))
        yield captured
    finally:
        for h in handles:
            h.remove()


def attention_scores(encoder: nn.Module, recorded: dict[tuple[int, str], Tensor], b: int, t: int) -> tuple[Tensor, ...]:
    """Every layer's pre-softmax scores (b, h, t, t) from what :func:`record_attention_inputs` recorded during one
    forward over a (b, t) batch (module docstring: how each family forms them). Call it after the hooks are gone."""
    family = family_of(encoder)
    heads = encoder.config.num_attention_heads
    if family.scores == "dot":
        scores = []
        for i, qk in enumerate(query_key_projections(encoder)):
            q = recorded[(i, "query")].view(b, t, heads, -1).transpose(1, 2)  # (b, h, t, dh)
            k = recorded[(i, "key")].view(b, t, heads, -1).transpose(1, 2)  # (b, h, t, dh)
            scores.append(torch.matmul(q, k.transpose(-1, -2)) * qk.scaling)  # (b, h, t, t)
        return tuple(scores)
    return tuple(_disentangled_scores(attn, recorded, i, b, t, heads)
                 for i, attn in enumerate(self_attention_modules(encoder)))


def _disentangled_scores(attn: nn.Module, recorded: dict, i: int, b: int, t: int, heads: int) -> Tensor:
    """DeBERTa-v2's ``DisentangledSelfAttention`` scores before masking, as its forward forms them."""
    q = recorded[(i, "query")].view(b, t, heads, -1).transpose(1, 2).reshape(b * heads, t, -1)  # (b*h, t, dh)
    k = recorded[(i, "key")].view(b, t, heads, -1).transpose(1, 2).reshape(b * heads, t, -1)  # (b*h, t, dh)
    pos = attn.pos_att_type
    scale_factor = 1 + ("c2p" in pos) + ("p2c" in pos)
    scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float) * scale_factor).to(q.device, q.dtype)  # as HF does
    scores = torch.bmm(q, k.transpose(-1, -2) / scale)  # (b*h, t, t), content to content
    if attn.relative_attention:  # + content-to-position and position-to-content, with the layer's own code
        scores = scores + attn.disentangled_attention_bias(q, k, None, recorded[(i, "rel")], scale_factor)
    return scores.view(b, heads, t, t)


def check_same_scores(teacher_encoder: nn.Module, student_encoder: nn.Module) -> None:
    """Raise unless teacher and student form attention scores the same way (``dot`` or ``disentangled``)."""
    ft, fs = family_of(teacher_encoder), family_of(student_encoder)
    if ft.scores != fs.scores:
        raise ValueError(f"the attention loss compares scores formed the same way, but the teacher ({ft.name}) forms "
                         f"{ft.scores} scores and the student ({fs.name}) {fs.scores} ones; choose a student of a "
                         "family with the teacher's kind of scores or disable the attention term")

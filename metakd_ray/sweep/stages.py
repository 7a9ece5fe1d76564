"""The artefact stages of a sweep: its teachers (Ray Train) and its caches (Ray Data), with their costs.

Costs (``costs.json``): per teacher and per cache its wall/CPU/GPU seconds and the cells it serves; the results
layer shares them out over those cells' trials.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from metakd_ray import config as C
from metakd_ray.storage import Storage
from metakd_ray.sweep.plan import Cell, Plan, live_teacher_reason


EVENTS = {  # how the teacher job's events read in the log
    "prototype_scores": "prototype scores of {rows} training examples",
    "train": "training ({workers} Ray Train workers; 0 = in this process)",
    "exported": "exported: best dev {best_dev:.4f}, test {test_mean:.4f}",
    "waiting": "{message}",
}


def show(event: dict) -> None:
    """One ``[teacher] <key>: ...`` line per event of the teacher job."""
    rest = {k: v for k, v in event.items() if k not in ("teacher", "event")}
    template = EVENTS.get(str(event.get("event")))
    try:
        text = template.format(**rest) if template else None
    except (KeyError, ValueError):
        text = None
    text = text or " ".join([str(event.get("event", ""))] + [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                           for k, v in rest.items()])
    print(f"[teacher] {event.get('teacher', '')}: {text}", flush=True)


def build_teachers(cfg: C.Config, p: Plan, storage: Storage, log: Callable[[dict], None] = show) -> dict:
    """Every teacher the plan's cells need (Ray Train; one that exists already is reused, its recorded cost kept);
    returns the costs ``{"teachers": {key: {wall_s, cpu_s, gpu_s, cells}}, "caches": {}}``."""
    from metakd_ray.teacher.artefact import teacher_specs_for
    from metakd_ray.teacher.job import ensure_teacher

    costs: dict = {"teachers": {}, "caches": {}}
    gpu = cfg.ray.gpus("teacher")
    specs = {t.key: t for t in teacher_specs_for(cfg)}
    users: dict[str, list[str]] = {}
    for c in p.cells:
        if c.teacher_key:
            users.setdefault(c.teacher_key, []).append(c.id)
    for n, (key, cells_using) in enumerate(users.items(), 1):
        print(f"[sweep] teacher {n}/{len(users)}: {key}", flush=True)
        m = ensure_teacher(cfg, specs[key], storage, log=log).manifest
        wall = float(m.get("seconds", {}).get("total", 0.0))
        costs["teachers"][key] = {"wall_s": wall, "cpu_s": float(m.get("cpu_seconds", 0.0)),
                                  "gpu_s": wall * gpu * max(cfg.ray.train_workers, 1), "cells": cells_using}
    return costs


@dataclass
class CacheGroup:
    """The cells served by one cache: same teacher, target domain, rate and seed (so the same training rows)."""

    teacher_key: str
    domain: str
    cells: list[Cell]
    data: Any  # the target's tokenised training set, with prototype scores
    scores: dict[str, float] | None  # t_i by id, stored in the cache for a meta teacher
    layer_map: tuple[int, ...]
    est_bytes: int


def cache_groups(cfg: C.Config, cells: tuple[Cell, ...], storage: Storage) -> dict[tuple, CacheGroup]:
    """The caches ``cells`` need, by cache group, with their estimated sizes; none when the trials must run the
    teacher live (``plan.live_teacher_reason``: the distillation options, or a DeBERTa-v2 teacher), said in one line.
    Their teachers must exist (:func:`build_teachers`)."""
    from metakd_ray import cell as CELL
    from metakd_ray import data as D
    from metakd_ray import models as M
    from metakd_ray.cache import estimate_bytes, stored_layers
    from metakd_ray.models.families import config_value
    from metakd_ray.teacher.artefact import (MODEL_DIR, TEACHERS, finished_teacher, prototype_parts,
                                             read_prototype_scores)

    by_group: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.cache_group:
            by_group.setdefault(c.cache_group, []).append(c)
    if not by_group:
        return {}
    encoders = {key: storage.read_json(TEACHERS, key, MODEL_DIR, "encoder", "config.json")
                for key in dict.fromkeys(key for key, *_ in by_group)}
    why = live_teacher_reason(cfg, [enc.get("model_type") for enc in encoders.values()])
    if why:
        print(f"[sweep] no caches, trials run the teacher live: {why}", flush=True)
        return {}
    splits = D.load_splits(cfg.data)
    _, tokenizer = M.load_encoder(cfg.model.teacher)
    groups = {}
    for (key, domain, rate, seed), group in by_group.items():
        scores = read_prototype_scores(storage, *prototype_parts(key))
        data = CELL.student_data(cfg, splits, tokenizer, domain, rate, seed, scores)
        enc = encoders[key]  # DistilBERT's config.json says n_layers and dim
        g = M.student_layer_map(cfg.model, int(config_value(enc, "num_hidden_layers")))
        est = estimate_bytes([len(x) for x in data.train["input_ids"]], len(stored_layers(g)),
                             int(config_value(enc, "hidden_size")))
        meta = finished_teacher(storage, key).manifest["spec"]["kind"] == "meta"
        groups[(key, domain, rate, seed)] = CacheGroup(key, domain, group, data.train, scores if meta else None, g,
                                                       est)
    return groups


def build_caches(cfg: C.Config, groups: list[CacheGroup], storage: Storage, costs: dict, budget: float | None,
                 label: str) -> list[Cell]:
    """The caches of ``groups`` (verified ones reused; the rest built by one Ray Data job per teacher class, see
    ``cache.ensure_caches``); returns the groups' cells with their ``cache_key`` and adds the costs to
    ``costs["caches"]``: per cache its wall/CPU/GPU seconds (its share of the job, by rows) and the cells using it.
    Older caches are evicted (least recently used first, never one of ``groups``) to keep ``caches/`` within
    ``budget``."""
    from metakd_ray.cache import cache_job, ensure_caches

    if not groups:
        return []
    jobs = [cache_job(cfg, storage, g.teacher_key, g.domain, g.data, g.layer_map, prototype_scores=g.scores)
            for g in groups]
    print(f"[sweep] caches ({label}): {len(jobs)} ({sum(j.num_examples for j in jobs)} examples)", flush=True)
    refs = ensure_caches(cfg, jobs, max_total_bytes=budget)
    out = []
    for g, ref in zip(groups, refs):
        out += [dataclasses.replace(c, cache_key=ref.fingerprint) for c in g.cells]
        seconds = float(ref.manifest.get("build_seconds", 0.0))
        entry = costs["caches"].setdefault(ref.fingerprint, {
            "wall_s": seconds, "cpu_s": seconds * cfg.ray.cache_actors * cfg.ray.cpus_per_actor,
            "gpu_s": seconds * cfg.ray.cache_actors * cfg.ray.gpus("cache"),
            "cells": []})
        entry["cells"] += [c.id for c in g.cells]
    built = sum(r.built for r in refs)
    print(f"[sweep] caches ({label}): {built} built, {len(refs) - built} reused", flush=True)
    return out


def cache_budget(cfg: C.Config) -> float | None:
    """``storage.cache_max_gb`` in bytes, None when 0 (no budget)."""
    return cfg.storage.cache_max_gb * 1e9 if cfg.storage.cache_max_gb > 0 else None


def build_artefacts(cfg: C.Config, p: Plan, storage: Storage) -> tuple[Plan, dict]:
    """Every teacher, then every cache in one wave whatever the budget (benchmarks): the plan with its cells'
    cache keys, and the costs."""
    costs = build_teachers(cfg, p, storage)
    cells = build_caches(cfg, list(cache_groups(cfg, p.cells, storage).values()), storage, costs, cache_budget(cfg),
                         "all cells")
    return p.with_cells(cells), costs

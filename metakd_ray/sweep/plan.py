"""The plan of a sweep: typed, frozen, written to ``sweeps/<name>/plan.json`` and read back (by a resumed run and by
``metakd_ray.results``). No Ray and no torch here: the results layer reads plans on a laptop.

A :class:`Cell` is one point of the grid — target domain × sample rate × method × seed (× gamma2) — plus the
artefacts that serve it once known: its teacher's key and its cache's fingerprint. A :class:`Wave` is a run of
consecutive cells whose caches fit the disk budget together; each wave is one Tune experiment (``tune``,
``tune-2``, ...). :func:`make_plan` builds the plan from a config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Sequence

# Only when ``calibration.json`` is missing: the rough per-example seconds used before it existed (fp32, any padding;
# benchmarks/student_depth.py and the smoke runs).
FALLBACK_SECONDS_PER_EXAMPLE = {"teacher_epoch": 0.16, "cache": 0.03, "student_epoch": 0.06}
CALIBRATION_FILE = "calibration.json"
PLAN_FILE = "plan.json"


def calibration() -> dict:
    """The per-example seconds of the cost estimate: ``metakd_ray/sweep/calibration.json``, written by
    ``python benchmarks/precision.py`` (wall seconds of a 2-CPU machine per example and epoch, MiniLM-L6 teacher,
    3-layer student, max_length 128, batch 32; per precision, for grouped (``seconds_per_example``) and random
    (``seconds_per_example_random``) batches). Without the file: :data:`FALLBACK_SECONDS_PER_EXAMPLE` for every
    precision, with a note in ``source``."""
    try:
        text = resources.files("metakd_ray.sweep").joinpath(CALIBRATION_FILE).read_text()
    except (FileNotFoundError, OSError):
        table = {"fp32": dict(FALLBACK_SECONDS_PER_EXAMPLE)}
        return {"source": "built-in rough constants (no calibration.json: run python benchmarks/precision.py)",
                "measured": None, "seconds_per_example": table, "seconds_per_example_random": table}
    return json.loads(text)


def _per_example(cal: Mapping[str, Any], compute: str | None, grouped: bool) -> dict[str, float]:
    """The calibration's figures for a stage computing as ``compute`` (``"bf16 on cpu"``; ``auto``, i.e. a GPU's
    bf16 or fp16, and fp16 take the bf16 figures; fp32 the fp32 ones) with grouped or random batches."""
    tables = cal.get("seconds_per_example" if grouped else "seconds_per_example_random") or cal["seconds_per_example"]
    return tables.get(_precision_key(compute)) or tables["fp32"]


def _precision_key(compute: str | None) -> str:
    """The calibration's key for a stage computing as ``compute``: ``fp32``, else ``bf16``."""
    return "fp32" if (compute or "fp32").split()[0] == "fp32" else "bf16"


@dataclass(frozen=True)
class Cell:
    """One cell of the grid. ``gamma2`` is the gamma2 axis value (None when gamma2 is not an axis, or the method
    is not meta_kd); ``teacher_key`` is "" for a method without a teacher; ``cache_key`` is the fingerprint of the
    cache serving the cell once built ("" while unknown, or when its trials run the teacher live)."""

    domain: str
    rate: float
    method: str
    seed: int
    gamma2: float | None = None
    teacher_key: str = ""
    cache_key: str = ""

    @property
    def id(self) -> str:
        """A readable unique name, e.g. ``books|0.1|meta/meta_kd|0|-`` — a name only: never parsed back."""
        g = "-" if self.gamma2 is None else f"{self.gamma2:g}"
        return f"{self.domain}|{self.rate:g}|{self.method}|{self.seed}|{g}"

    @property
    def teacher_kind(self) -> str:
        return self.method.split("/")[0]

    @property
    def student_method(self) -> str:
        return self.method.split("/")[1]

    @property
    def cache_group(self) -> tuple[str, str, float, int] | None:
        """Cells with the same teacher, target, rate and seed train on the same rows: one cache serves them."""
        return (self.teacher_key, self.domain, self.rate, self.seed) if self.teacher_key else None

    def to_json(self) -> dict[str, Any]:
        return {"cell": self.id, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Cell:
        g = d.get("gamma2")
        return cls(domain=str(d["domain"]), rate=float(d["rate"]), method=str(d["method"]), seed=int(d["seed"]),
                   gamma2=None if g is None else float(g), teacher_key=str(d.get("teacher_key") or ""),
                   cache_key=str(d.get("cache_key") or ""))


@dataclass(frozen=True)
class Wave:
    experiment: str  # the Tune experiment directory under sweeps/<name>/
    cells: tuple[str, ...]  # cell ids, plan order
    done: bool = False


@dataclass(frozen=True)
class Plan:
    name: str
    trials_per_cell: int
    cells: tuple[Cell, ...]
    teachers: tuple[dict, ...] = ()  # {key, kind, domains, rate, seed} per distinct teacher, for display
    waves: tuple[Wave, ...] = ()
    estimate: dict | None = None  # CPU-seconds per stage at 2-CPU speed (see calibration())
    compute: dict | None = None  # per stage (teacher, cache, trial): "<precision> on <device type>"
    live_teacher: str | None = None  # why the trials run their teachers live, without caches (live_teacher_reason)

    @property
    def trials(self) -> int:
        return len(self.cells) * self.trials_per_cell

    @property
    def caches(self) -> list[dict]:
        """One entry per distinct cache the cells need: teacher, domain, rate, seed (none when the teachers run
        live, ``live_teacher``)."""
        if self.live_teacher:
            return []
        groups = dict.fromkeys(c.cache_group for c in self.cells if c.cache_group)
        return [{"teacher": t, "domain": d, "rate": r, "seed": s} for t, d, r, s in groups]

    def cell(self, cell_id: str) -> Cell:
        return next(c for c in self.cells if c.id == cell_id)

    def with_cells(self, cells: Sequence[Cell]) -> Plan:
        """This plan with some cells replaced (matched by id), e.g. once their caches are known."""
        new = {c.id: c for c in cells}
        return dataclasses.replace(self, cells=tuple(new.get(c.id, c) for c in self.cells))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "trials_per_cell": self.trials_per_cell, "trials": self.trials,
                "cells": [c.to_json() for c in self.cells], "teachers": [dict(t) for t in self.teachers],
                "caches": self.caches, "waves": [dataclasses.asdict(w) for w in self.waves],
                "estimate": self.estimate, "compute": self.compute, "live_teacher": self.live_teacher}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Plan:
        waves = tuple(Wave(str(w["experiment"]), tuple(w["cells"]), bool(w.get("done"))) for w in d.get("waves") or ())
        return cls(name=str(d.get("name", "")), trials_per_cell=int(d.get("trials_per_cell") or 0),
                   cells=tuple(Cell.from_json(c) for c in d.get("cells") or ()),
                   teachers=tuple(d.get("teachers") or ()), waves=waves, estimate=d.get("estimate"),
                   compute=d.get("compute"), live_teacher=d.get("live_teacher") or None)


def plan_cells(cfg: Any) -> tuple[Cell, ...]:
    """Every cell of the grid, in a stable order: target domain × rate × method × seed (× gamma2; the gamma2 axis
    collapses for methods other than meta_kd); a rate runs the seeds ``sweep.seeds_at`` gives it."""
    targets = cfg.sweep.target_domains or cfg.data.domains
    gammas: tuple[float | None, ...] = cfg.sweep.gamma2 or (None,)
    cells: dict[str, Cell] = {}
    for domain, rate, method, seed, g in itertools.product(targets, cfg.sweep.sample_rates, cfg.sweep.methods,
                                                             cfg.sweep.seeds, gammas):
        if seed in cfg.sweep.seeds_at(rate):  # sweep.seeds_per_rate
            c = Cell(domain, float(rate), method, int(seed), g if method.endswith("/meta_kd") else None)
            cells.setdefault(c.id, c)
    return tuple(cells.values())


def make_plan(cfg: Any, domain_sizes: Mapping[str, int] | None = None,
              eval_sizes: Mapping[str, Mapping[str, int]] | None = None) -> Plan:
    """The plan of ``cfg``: its cells with their teachers' keys, the distinct teachers, and — given the training
    examples per domain (and the dev and test examples, ``{"dev": {domain: n}, "test": ...}``) — an estimated cost
    in CPU-seconds at this machine's speed. Waves come later (:func:`plan_waves`, once the caches' sizes are
    known)."""
    from metakd_ray.runtime import stage_precisions
    from metakd_ray.teacher.artefact import teacher_spec  # the teachers' identity (imports the data layer)

    cells, teachers = [], {}
    for c in plan_cells(cfg):
        if c.teacher_kind != "none":
            spec = teacher_spec(cfg, c.teacher_kind, c.domain, c.rate, c.seed)
            teachers.setdefault(spec.key, spec)
            c = dataclasses.replace(c, teacher_key=spec.key)
        cells.append(c)
    shown = tuple({"key": k, "kind": s.kind, "domains": list(s.domains), "rate": s.rate, "seed": s.seed}
                  for k, s in teachers.items())
    live = live_teacher_reason(cfg) if teachers else None
    p = Plan(cfg.name, cfg.sweep.trials_per_cell, tuple(cells), shown, compute=stage_precisions(cfg),
             live_teacher=live)
    if domain_sizes:
        p = dataclasses.replace(p, estimate=estimate_cost(cfg, p, domain_sizes, eval_sizes))
    return p


def live_teacher_reason(cfg: Any, model_types: Sequence[str | None] | None = None) -> str | None:
    """Why the sweep's cells get no caches and their trials run the teacher live (one line), or None when caches
    serve them. ``model_types``: the teachers' encoder types (the sweep reads its exported teachers'); default
    ``model.teacher``'s, from its config (None if it cannot be read here: caches are assumed, the run decides)."""
    from metakd_ray.cache.job import live_only

    if cfg.distill.teacher_dropout or cfg.distill.include_padding:
        return ("distill.teacher_dropout / include_padding: a cache holds the eval-mode teacher on real tokens "
                "only")
    for model_type in (_teacher_model_type(cfg.model.teacher),) if model_types is None else model_types:
        if why := live_only(model_type):
            return f"model.teacher {cfg.model.teacher!r}: {why}"
    return None


def _teacher_model_type(name: str) -> str | None:
    """``model_type`` of model ``name`` (``default``, a directory or a hub id in the local Hugging Face cache) from
    its config alone; None when it cannot be read here."""
    from metakd_ray.models.encoders import resolve_model
    from metakd_ray.models.families import local_model_type

    try:
        resolved = resolve_model(name)
        if os.path.isdir(resolved):
            return local_model_type(resolved)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolved, local_files_only=True).model_type
    except Exception:  # noqa: BLE001 - not installed, not cached, unreadable: preflight and loading say why
        return None


def estimate_cost(cfg: Any, p: Plan, domain_sizes: Mapping[str, int],
                  eval_sizes: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any]:
    """Seconds of a 2-CPU machine per stage (the plan's "CPU-seconds at 2-CPU speed"): examples x epochs x the
    :func:`calibration` figures of the precision each stage computes in (``p.compute``) and of grouped or random
    batches (``compute.group_by_length``). A student trial: stage-1 epochs at the stage-1 figure and stage-2 epochs
    at the stage-2 figure (``distill.stages: one``: stage-1 epochs only; ``finetune``: stage-2 epochs only), each
    raised as ``distill.min_steps`` raises it for the cell's training split. Given ``eval_sizes``, each trial's
    evaluations too: the target's dev split after every epoch of the stage selected on dev (stage 2, ``one`` or
    ``finetune``) and its test split once, at the calibrated ``eval`` figure (under ``min_steps`` a small split's
    many short epochs each score the whole dev split). Plus the measured fixed seconds per teacher run and per
    trial (``overhead_seconds``, from the smoke sweep)."""
    cal = calibration()
    grouped = bool(cfg.compute.group_by_length)
    compute = p.compute or {}
    sec = {stage: _per_example(cal, compute.get(stage), grouped) for stage in ("teacher", "cache", "trial")}
    n = domain_sizes
    def t_epochs(t: Mapping[str, Any]) -> int:  # teacher.min_steps raises a small pool's epochs (batches per worker)
        pool = sum(n[dom] for dom in t["domains"]) * t["rate"]
        batches = max(math.ceil(pool / max(cfg.teacher.batch_size, 1)), 1)
        return max(cfg.teacher.epochs, math.ceil(cfg.teacher.min_steps / batches))

    t_cost = sum(sum(n[d] for d in t["domains"]) * t["rate"] * t_epochs(t) for t in p.teachers)
    c_cost = sum(n[c["domain"]] * c["rate"] for c in p.caches)
    s = sec["trial"]
    s1, s2 = s.get("student_stage1_epoch", s["student_epoch"]), s.get("student_stage2_epoch", s["student_epoch"])
    d = cfg.distill

    def epochs(e: int, c: Cell) -> int:  # distill.min_steps raises a small split's epochs
        batches = max(math.ceil(n[c.domain] * c.rate / d.batch_size), 1)
        return max(e, math.ceil(d.min_steps / batches))

    def per_example(c: Cell) -> float:  # seconds per training example of one trial of cell c
        if c.student_method == "finetune":
            return epochs(d.stage2_epochs, c) * s2
        if d.stages == "one":
            return epochs(d.stage1_epochs, c) * s1
        return epochs(d.stage1_epochs, c) * s1 * (d.stage1_epochs > 0) + epochs(d.stage2_epochs, c) * s2

    def evaluated(c: Cell) -> float:  # examples scored by one trial of cell c: dev after each selected epoch, test
        if not eval_sizes:
            return 0.0
        e = epochs(d.stage1_epochs if d.stages == "one" and c.student_method != "finetune" else d.stage2_epochs, c)
        return e * eval_sizes["dev"][c.domain] + eval_sizes["test"][c.domain]

    s_cost = sum(n[c.domain] * c.rate * per_example(c) + evaluated(c) * s["eval"] for c in p.cells) \
        * p.trials_per_cell
    t_cost *= sec["teacher"]["teacher_epoch"]
    c_cost *= sec["cache"]["cache"]
    # fixed seconds per teacher run and per trial (start-up, loading, evaluation, export), measured on the smoke sweep
    over = cal.get("overhead_seconds") or {}

    def overhead(stage: str, what: str) -> float:
        return float((over.get(_precision_key(compute.get(stage))) or {}).get(what, 0.0))

    t_cost += len(p.teachers) * overhead("teacher", "teacher_run")
    s_cost += p.trials * overhead("trial", "trial")
    return {"teacher_cpu_s": round(t_cost), "cache_cpu_s": round(c_cost), "trial_cpu_s": round(s_cost),
            "total_cpu_s": round(t_cost + c_cost + s_cost),
            "calibration": f"{cal.get('source')}, measured {cal.get('measured') or 'never'}"}


def experiment_name(wave: int) -> str:
    """The Tune experiment of wave ``wave`` (1-based) under ``sweeps/<name>/``: ``tune``, ``tune-2``, ..."""
    return "tune" if wave == 1 else f"tune-{wave}"


def plan_waves(cells: Sequence[Cell], cache_bytes: Mapping[tuple, int], budget: float | None) -> tuple[Wave, ...]:
    """Consecutive cells (plan order) in waves whose caches' estimated bytes (``cache_bytes`` by cache group) sum
    to at most ``budget``; a cache larger than the budget alone gets a wave of its own. Cells without a cache join
    the wave they fall in."""
    waves: list[list[str]] = [[]]
    used, seen = 0, set()
    for c in cells:
        k = c.cache_group
        if k is not None and k in cache_bytes and k not in seen:
            size = cache_bytes[k]
            if budget is not None and used and used + size > budget:
                waves.append([])
                used = 0
            used += size
            seen.add(k)
        waves[-1].append(c.id)
    return tuple(Wave(experiment_name(n), tuple(w)) for n, w in enumerate(waves, 1))


def format_compute(compute: Mapping[str, str] | None) -> str:
    """``teacher bf16 on cpu, cache bf16 on cpu, trial bf16 on cpu`` (``auto`` where a GPU must say)."""
    if not compute:
        return "unknown"
    text = ", ".join(f"{stage} {how}" for stage, how in compute.items())
    return text + (" (auto: resolved on a GPU of the cluster when the sweep runs)" if "auto on" in text else "")


def format_plan(p: Plan) -> str:
    lines = [f"sweep {p.name}: {len(p.cells)} cells x {p.trials_per_cell} trials = {p.trials} trials; "
             f"{len(p.teachers)} teachers, {len(p.caches)} caches"]
    if p.live_teacher:
        lines.append(f"  no caches, trials run the teacher live: {p.live_teacher}")
    lines += [f"  teacher {t['key']}: {t['kind']} on {', '.join(t['domains'])}, rate {t['rate']:g}, seed {t['seed']}"
              for t in p.teachers]
    lines += [f"  cell {c.id}" for c in p.cells]
    if p.compute:
        lines.append(f"precision: {format_compute(p.compute)}")
    if p.estimate:
        e = p.estimate
        lines.append(f"estimated cost: {e['total_cpu_s'] / 3600:.2f} CPU-hours at 2-CPU speed (teachers "
                     f"{e['teacher_cpu_s'] / 3600:.1f}, caches {e['cache_cpu_s'] / 3600:.1f}, trials "
                     f"{e['trial_cpu_s'] / 3600:.1f}; calibration: {e.get('calibration', 'unknown')})")
    return "\n".join(lines)


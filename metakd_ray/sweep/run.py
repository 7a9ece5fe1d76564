"""Running a planned sweep: teachers → (per wave) caches → Tune trials → report (see :mod:`metakd_ray.sweep`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any, Sequence

from metakd_ray import config as C
from metakd_ray import logs
from metakd_ray.storage import Storage
from metakd_ray.sweep import signals
from metakd_ray.sweep.plan import PLAN_FILE, Cell, Plan, format_compute, make_plan, plan_waves
from metakd_ray.sweep.records import ERROR, OK, TrialStore

METRIC, MODE = "dev_acc", "max"
MAX_LISTED = 12  # the closing summary lists each cell's score and student up to this many cells


class SweepConflict(ValueError):
    """A sweep of this name exists under the storage root with a different configuration."""


def trial_resources(cfg: C.Config) -> dict[str, float]:
    """What one trial holds, as ``tune.with_resources`` spells it: ``ray.trial_cpus`` CPUs, with ``ray.use_gpu``
    ``ray.trial_gpus`` of a GPU (a fraction shares a GPU between trials; its GPU-seconds count that fraction), and
    the custom resources of ``ray.trial_resources`` (e.g. ``{"trial_node": 0.001}``: only the trial worker type)."""
    return {k.lower() if k in ("CPU", "GPU") else k: v for k, v in cfg.ray.requests("trial").items()}


def run_trials(cfg: C.Config, cells: list[Cell], storage: Storage, experiment: str = "tune") -> Any:
    """The Tune stage of ``cells``: one experiment ``sweeps/<name>/<experiment>``, restored when it exists (finished
    trials are kept, unfinished ones resume from their last epoch, failed ones stay failed). Trials that Tune saw
    fail without their own error record (a worker killed, say) get one from Tune's public result."""
    from metakd_ray.tracking import tune_callbacks

    trackers = tune_callbacks(cfg, storage)  # first, before EtaCallback is imported: see tracking.tune_callbacks
    from ray import tune

    from metakd_ray.runtime import stage_precision
    from metakd_ray.sweep.attempts import RecordFailedAttempts, record_tune_errors
    from metakd_ray.sweep.progress import EtaCallback
    from metakd_ray.sweep.search import GridOfStudiesSearcher
    from metakd_ray.sweep.trial import run_trial

    trainable = tune.with_resources(run_trial, trial_resources(cfg))
    exp_root = storage.uri("sweeps", cfg.name)
    exp_path = storage.uri("sweeps", cfg.name, experiment)
    total = len(cells) * cfg.sweep.trials_per_cell
    if tune.Tuner.can_restore(exp_path):
        print(f"[sweep] resuming the trials of {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        defaults = {name: getattr(cfg.distill, name) for name in C.TUNABLE}
        searcher = GridOfStudiesSearcher([c.to_json() for c in cells], cfg.sweep.tune, defaults,
                                         cfg.sweep.trials_per_cell, METRIC, MODE,
                                         gamma2_is_axis=bool(cfg.sweep.gamma2), seed=cfg.seed)
        tuner = tune.Tuner(
            trainable,
            param_space={"storage_root": storage.uri(), "sweep": cfg.name, "experiment": experiment,
                         "precision": stage_precision(cfg, "trial")},
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, num_samples=total,
                                        max_concurrent_trials=cfg.ray.max_concurrent_trials or None,
                                        reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=experiment, storage_path=exp_root, verbose=2 if logs.verbose() else 0,
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                                      callbacks=[EtaCallback(total), RecordFailedAttempts(storage.uri(), cfg.name),
                                                 *trackers]),
        )
    grid = tuner.fit()
    record_tune_errors(grid, TrialStore(storage.sub("sweeps", cfg.name)))
    return grid


def check_same_sweep(cfg: C.Config, storage: Storage) -> None:
    """Re-running a sweep resumes it; a *changed* config under the same name would mix results, so refuse. Only
    ``ray`` and ``storage`` settings (where and how it runs) may change between runs. A sweep that has produced
    nothing yet (no plan, no trial: its first run stopped before the trials) may change freely."""
    if not storage.is_file("sweeps", cfg.name, "config.yaml"):
        return
    if not storage.is_file("sweeps", cfg.name, PLAN_FILE) and not storage.listdir("sweeps", cfg.name, "trials"):
        return
    import yaml

    try:
        old = yaml.safe_load(storage.read_bytes("sweeps", cfg.name, "config.yaml"))
    except yaml.YAMLError as e:
        raise SweepConflict(f"{storage.uri('sweeps', cfg.name, 'config.yaml')} is damaged ({type(e).__name__}); "
                            "restore it or give the sweep another name (name=...)") from None
    if not isinstance(old, dict):
        raise SweepConflict(f"{storage.uri('sweeps', cfg.name, 'config.yaml')} is damaged (not a mapping); restore "
                            "it or give the sweep another name (name=...)")
    try:  # a field added since (with its default) is no change
        old = C.to_dict(C.from_dict(old))
    except (C.ConfigError, TypeError, ValueError):
        pass  # compared as written: the differences are named below
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
    overrides = []
    if "://" not in cfg.storage.root:
        overrides.append(f"storage.root={os.path.abspath(os.path.expanduser(cfg.storage.root))}")
    if cfg.data.root and "://" not in cfg.data.root:
        overrides.append(f"data.root={os.path.abspath(os.path.expanduser(cfg.data.root))}")
    if os.environ.get("METAKD_DATA") and "://" not in os.environ["METAKD_DATA"]:
        os.environ["METAKD_DATA"] = os.path.abspath(os.path.expanduser(os.environ["METAKD_DATA"]))
    return C.with_overrides(cfg, overrides)


def _read_json(storage: Storage, *parts: str) -> Any:
    """A JSON file of the sweep, None if absent; a damaged one raises ``SweepConflict`` naming it (one line)."""
    if not storage.is_file(*parts):
        return None
    try:
        out = storage.read_json(*parts)
    except ValueError as e:
        raise SweepConflict(f"{storage.uri(*parts)} is damaged ({type(e).__name__}: {str(e)[:120]}); remove it and "
                            "rerun (the trials' own records are kept)") from None
    if not isinstance(out, dict):
        raise SweepConflict(f"{storage.uri(*parts)} is damaged (not a JSON object); remove it and rerun (the trials' "
                            "own records are kept)")
    return out


_STARTED = 0.0  # when ``run`` began (its closing line gives the run's wall time)


def run(cfg: C.Config) -> int:
    """The whole sweep, guarded: the checks of :mod:`metakd_ray.preflight` first (nothing is written when they
    fail), then the sweep's lock (a second driver on the same sweep is refused, naming the first), then
    :func:`run_locked`. Ctrl-C or SIGTERM at any stage stops it within seconds, exit 128 + the signal (130 for
    Ctrl-C): every finished artefact, trial record and unfinished trial's state is kept for the rerun. Returns the
    exit status; one ``error:`` line per problem on stderr for what the user must fix (2)."""
    from metakd_ray import preflight
    from metakd_ray.cache.store import CacheError
    from metakd_ray.locks import LockHeld, sweep_lock
    from metakd_ray.raycluster import (UnsatisfiableResources, check_resources, connect_ray, local_shape,
                                       starts_local)
    from metakd_ray.results.load import ResultsError
    from metakd_ray.training import CheckpointError

    global _STARTED
    _STARTED = time.time()
    cfg = absolute_paths(cfg)
    storage = Storage(cfg.storage.root)
    with signals.interrupts() as got:
        try:
            preflight.check(cfg, cluster=True)
            check_same_sweep(cfg, storage)
            if starts_local(cfg):  # an embedded Ray: its one node is this machine, known before it starts
                check_resources(cfg, ([local_shape(cfg)], None))
            connect_ray(cfg)
            signals.rearm_sigterm()
            check_resources(cfg)  # a request no node can ever hold fails here, with the numbers
            lock = sweep_lock(storage, cfg.name).acquire(wait=False)  # the first file this run writes
            try:
                return run_locked(cfg, storage)
            finally:
                lock.release()
        except KeyboardInterrupt:
            signum = got.get("signum", signal.SIGINT)
            signals.stop_ray()
            print(f"[sweep] interrupted ({signal.Signals(signum).name}); rerun the same command to resume",
                  file=sys.stderr, flush=True)
            return 128 + int(signum)
        except preflight.PreflightError as e:
            for line in e.errors:
                print(f"error: {line}", file=sys.stderr)
            return 2
        except (LockHeld, SweepConflict, UnsatisfiableResources) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (CacheError, CheckpointError, ResultsError) as e:  # nothing half-written counts as done
            print(f"error: {e}", file=sys.stderr)
            return 1


def run_locked(cfg: C.Config, storage: Storage) -> int:
    """The whole sweep, under its lock; returns the exit status.

    Teachers first (Ray Train), then the cells in *waves*: a wave's caches (Ray Data) are built, then its trials run
    (one Tune experiment per wave). One wave holds as many consecutive cells as their caches' estimated size allows
    under ``storage.cache_max_gb`` (all of them when everything fits, the usual case), so the caches on disk never
    pass the budget and no trial has to run its teacher live because its cache was evicted. The partition is fixed
    by the first run (``plan.json``); a rerun skips the waves that finished."""
    import datasets

    from metakd_ray.runtime import release_memory
    from metakd_ray.sweep.stages import build_caches, build_teachers, cache_budget, cache_groups

    datasets.disable_progress_bars()
    sweep = ("sweeps", cfg.name)
    resolve_gpu_precision(cfg)
    p = make_plan(cfg)
    print(f"[sweep] precision: {format_compute(p.compute)}", flush=True)
    storage.write_bytes(C.to_yaml(cfg).encode(), *sweep, "config.yaml")
    costs = build_teachers(cfg, p, storage)
    release_memory(collect=True)  # the driver's share of the teacher stage (inputs, Train's results) back to the OS
    groups = cache_groups(cfg, p.cells, storage)
    budget = cache_budget(cfg)
    prev = Plan.from_json(_read_json(storage, *sweep, PLAN_FILE) or {})
    prev_costs = _read_json(storage, *sweep, "costs.json") or {}
    waves = prev.waves or plan_waves(p.cells, {k: g.est_bytes for k, g in groups.items()}, budget)
    p = dataclasses.replace(p, waves=waves)
    if len(waves) > 1:
        est = sum(g.est_bytes for g in groups.values()) / 1e9
        print(f"[sweep] the caches ({est:.1f} GB estimated) exceed storage.cache_max_gb={cfg.storage.cache_max_gb:g}: "
              f"{len(waves)} waves of caches then trials", flush=True)
    old_cells = {c.id: c for c in prev.cells}
    for n, wave in enumerate(waves, 1):
        label = f"wave {n}/{len(waves)}" if len(waves) > 1 else "all cells"
        if wave.done:  # finished in an earlier run: its caches may be gone, its results are not
            done = [old_cells[cid] for cid in wave.cells if cid in old_cells]
            p = p.with_cells(done)
            for c in done:
                if c.cache_key in prev_costs.get("caches", {}):
                    costs["caches"][c.cache_key] = prev_costs["caches"][c.cache_key]
            print(f"[sweep] {label}: finished in an earlier run ({len(wave.cells)} cells)", flush=True)
            continue
        in_wave = set(wave.cells)
        wave_groups = [g for g in groups.values() if g.cells[0].id in in_wave]
        p = p.with_cells(build_caches(cfg, wave_groups, storage, costs, budget, label))
        release_memory(collect=True)  # ... and of the cache pass (its input tables), before the trials
        storage.write_json(p.to_json(), *sweep, PLAN_FILE)
        storage.write_json(costs, *sweep, "costs.json")
        if len(waves) > 1:
            print(f"[sweep] {label}: {len(wave.cells)} cells", flush=True)
        run_trials(cfg, [p.cell(cid) for cid in wave.cells], storage, experiment=wave.experiment)
        open_cells = unfinished_cells(TrialStore(storage.sub(*sweep)), wave.cells, cfg.sweep.trials_per_cell)
        if open_cells:  # Tune returned with trials not ended: the wave is not done; a rerun resumes them
            print(f"[sweep] {label}: {len(open_cells)} cells have trials that did not end "
                  f"({', '.join(open_cells[:3])}{', ...' if len(open_cells) > 3 else ''}); rerun the same command "
                  "to resume them", file=sys.stderr, flush=True)
            report(storage.uri(*sweep))
            return 1
        if cfg.storage.keep_students == "selected":  # every trial of the wave's cells has ended
            from metakd_ray.sweep.students import prune_unselected

            prune_unselected(storage.uri(*sweep), wave.cells)
        p = dataclasses.replace(p, waves=tuple(dataclasses.replace(w, done=True) if w is wave else w
                                               for w in p.waves))
        storage.write_json(p.to_json(), *sweep, PLAN_FILE)
    dropped = TrialStore(storage.sub(*sweep)).drop_unfinished_states()  # failed or orphaned: nothing resumes them
    if dropped:
        print(f"[sweep] removed {len(dropped)} training states of failed or superseded trials", flush=True)
    return report(storage.uri(*sweep))


def unfinished_cells(store: TrialStore, cell_ids: Sequence[str], trials_per_cell: int) -> list[str]:
    """The cells of ``cell_ids`` with fewer than ``trials_per_cell`` trials that ended (finished, or failed for
    good), from the sweep's own trial records."""
    ended: dict[str, int] = {}
    for rec in store.records():
        if rec.status in (OK, ERROR):
            ended[rec.cell] = ended.get(rec.cell, 0) + 1
    return [cid for cid in cell_ids if ended.get(cid, 0) < trials_per_cell]


def resolve_gpu_precision(cfg: C.Config) -> None:
    """``compute.precision=auto`` with GPU stages and no GPU in this process: ask one of the cluster's GPUs whether it
    has bf16 and record the answer in ``$METAKD_GPU_BF16`` (``runtime.cuda_has_bf16``), so that every stage's
    precision — part of the teachers' and caches' identities — is known before the plan is made."""
    from metakd_ray import runtime

    gpus = [cfg.ray.gpus(s) for s in runtime.STAGES if cfg.ray.gpus(s) > 0]
    if not gpus or cfg.compute.precision != "auto" or runtime.cuda_has_bf16() is not None:
        return
    from metakd_ray.raycluster import probe_gpu_bf16

    bf16 = probe_gpu_bf16(min(min(gpus), 1.0))
    os.environ[runtime.GPU_BF16_ENV] = "1" if bf16 else "0"
    print(f"[sweep] the cluster's GPUs {'support' if bf16 else 'do not support'} bf16", flush=True)


def report(sweep_dir: str) -> int:
    """Write the report, print where, and say how the cells ended; 1 if any failed."""
    from metakd_ray.results import cells, load_results, load_teachers
    from metakd_ray.results import report as write_report
    from metakd_ray.results.summary import headline

    paths = write_report(sweep_dir)
    print("[sweep] report:")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    summary = cells(load_results(sweep_dir))
    failed = summary[summary["status"] == "failed"]
    pending = summary[summary["status"] == "pending"]
    for _, row in failed.iterrows():
        print(f"[sweep] cell {row['cell']} failed: {row['error']}", flush=True)
    ok = summary[summary["status"] == "ok"]
    if 0 < len(ok) <= MAX_LISTED:
        for _, row in ok.iterrows():
            print(f"[sweep] cell {row['cell']}: test {row['test_acc']:.3f}"
                  + (f", student {row['student_dir']}" if row.get("student_dir") else ""), flush=True)
    elif len(ok):
        where = paths.get("cells.csv", "report/cells.csv")
        print(f"[sweep] each cell's accuracy and student folder (student_dir): {where}", flush=True)
    for line in headline(summary, load_teachers(sweep_dir, plan=summary.attrs.get("plan"))):
        print(line, flush=True)
    for _, row in pending.iterrows():
        print(f"[sweep] cell {row['cell']} did not finish ({int(row['n_trials'])} of its trials started); rerun "
              "the same command to resume it", flush=True)
    print(f"[sweep] {int((summary['status'] == 'ok').sum())}/{len(summary)} cells ok, {len(failed)} failed"
          + (f", {len(pending)} not finished" if len(pending) else ""), flush=True)
    if _STARTED:
        print(f"[sweep] this run took {(time.time() - _STARTED) / 60:.1f} min", flush=True)
    return 1 if len(failed) or len(pending) else 0

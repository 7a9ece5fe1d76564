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
            param_space={"cfg": C.to_dict(cfg)},
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, num_samples=total,
                                        max_concurrent_trials=cfg.ray.max_concurrent_trials or None,
                                        reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name="tune", storage_path=exp_root, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[EtaCallback(total)]),
        )
    return tuner.fit()


def run(cfg: C.Config) -> int:
    """The whole sweep; returns the exit status."""
    from metakd_ray.raycluster import connect_ray

    storage = Storage(cfg.storage.root)
    p = plan(cfg)
    storage.write_json(p, "sweeps", cfg.name, "plan.json")
    storage.write_bytes(C.to_yaml(cfg).encode(), "sweeps", cfg.name, "config.yaml")
    connect_ray(cfg)
    costs = build_artefacts(cfg, p, storage)
    storage.write_json(costs, "sweeps", cfg.name, "costs.json")
    run_trials(cfg, p["cells"], storage)
    from metakd_ray.results import report

    paths = report(storage.uri("sweeps", cfg.name))
    print("[sweep] report:")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


def build_artefacts(cfg: C.Config, p: dict, storage: Storage) -> dict:
    """Teachers then caches for every cell that needs them; fills each cell's ``teacher_key``/``cache_key`` and
    returns the costs (``costs.json``): per teacher and per cache, its wall/CPU/GPU seconds and the cells using it."""
    raise NotImplementedError  # wired to the teacher and cache stages below

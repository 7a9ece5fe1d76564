"""Results of a sweep, read from storage with no running Ray: a DataFrame per trial, one row per cell, the
data-scarcity curve, the paper's table and the gamma2 curve — built from the project's own records (``plan.json``,
each trial's record under ``trials/``, ``costs.json``, ``config.yaml``), never from Ray Tune's files.

A sweep directory (``<storage.root>/sweeps/<name>/``) holds::

    config.yaml                the resolved config of the sweep (dataset, teacher, exclude_target for the table)
    plan.json                  the plan: cells (cell id, domain, rate, method, seed, gamma2, teacher_key,
                               cache_key), trials_per_cell, teachers, caches, waves [{experiment, cells, done}]
    trials/<key>.json          each trial's own record (metakd_ray.sweep.records): status, errors, last and final
                               report; <key>.pt its training state while unfinished
    trials/<key>.predictions.parquet
                               its test-set predictions (id, label, pred, probs), when the trial wrote them
    costs.json                 {"teachers": {key: {wall_s, cpu_s, gpu_s, cells}}, "caches": {...}}
    tune/, tune-2/, ...        the Ray Tune experiments (one per wave of cells); not read here
    report/                    written by report(): results.csv, cells.csv, scarcity.png, table.md, gamma2.png,
                               teachers.csv (each teacher's manifest: ``<storage.root>/teachers/<key>/``),
                               bootstrap.md (Meta-KD vs each baseline, paired bootstrap over the predictions)

Only pandas, pyarrow and matplotlib are imported (never ray or torch), so this runs on a laptop against a copy of
the sweep directory, or straight against ``s3://`` / ``gs://``::

    python -m metakd_ray.results runs/sweeps/scarcity [--json | --csv]
"""

from metakd_ray.results.bootstrap import paired_bootstrap, versus_baselines
from metakd_ray.results.load import CELL_KEYS, COSTS, SHARED_COSTS, cells, load_results, total_cost
from metakd_ray.results.plots import gamma2_curve, scarcity_curve
from metakd_ray.results.report import main, report
from metakd_ray.results.tables import (AMAZON_COLUMNS, METHOD_ORDER, MNLI_COLUMNS, PAPER_AMAZON, PAPER_MNLI_MEAN,
                                       PER_SEED_COLUMNS, paper_table, per_seed)
from metakd_ray.results.teachers import load_teachers, teacher_scores

__all__ = ["CELL_KEYS", "COSTS", "SHARED_COSTS", "cells", "load_results", "total_cost", "gamma2_curve",
           "scarcity_curve", "main", "report", "AMAZON_COLUMNS", "METHOD_ORDER", "MNLI_COLUMNS", "PAPER_AMAZON",
           "PAPER_MNLI_MEAN", "PER_SEED_COLUMNS", "paper_table", "per_seed", "paired_bootstrap", "versus_baselines", "load_teachers",
           "teacher_scores"]

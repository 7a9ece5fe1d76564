"""The sweep service: ``python -m metakd_ray.sweep CONFIG [key=value ...] [--dry-run [--json]]``.

Runs the whole pipeline idempotently on whatever Ray it finds — a running cluster (``ray job submit``, or
``RAY_ADDRESS`` / ``ray.address``) or else an embedded local Ray:

1. teachers (Ray Train), one per distinct :class:`~metakd_ray.teacher.TeacherSpec` the cells need, each with its
   prototype scores — skipped when its manifest exists;
2. teacher-output caches (Ray Data), one per (teacher, target domain, training subset) — skipped when a verified
   cache with the same fingerprint exists;
3. student trials (Ray Tune + Optuna): the axes (target domain × sample rate × method × seed [× gamma2]) form a grid
   of cells; inside each cell an Optuna study tunes the student on the target domain's dev accuracy
   (:mod:`metakd_ray.sweep.search`); the cell's score is the test accuracy of its dev-best trial;
4. the report (:mod:`metakd_ray.results`): a DataFrame, the scarcity curve PNG and the paper table.

Everything lives under ``<storage.root>/``: ``teachers/``, ``caches/`` and ``sweeps/<name>/`` (``plan.json``,
``config.yaml``, ``costs.json``, each trial's own record and state in ``trials/``, the Tune experiment in ``tune/``,
the report in ``report/``). Re-running the same command after an interruption restores the Tune experiment:
finished trials are not run again.

Modules: ``plan`` (typed plan, no Ray) · ``records`` (each trial's own record, no Ray) · ``search`` (a grid of
Optuna studies) · ``trial`` (the Tune trainable) · ``stages`` (teachers and caches) · ``progress`` (ETA) · ``run``
(the driver) · ``__main__`` (the CLI).
"""

from metakd_ray.sweep.plan import Cell, Plan, Wave, make_plan, plan_cells, plan_waves

__all__ = ["Cell", "Plan", "Wave", "make_plan", "plan_cells", "plan_waves"]

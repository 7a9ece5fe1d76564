"""How the sweep's grid and Optuna combine: one Optuna study per grid cell, inside one Ray Tune run.

Ray Tune cannot mix ``tune.grid_search`` with a model-based searcher (``OptunaSearch`` raises), and a single study
over the axes would let TPE *sample* domains and rates instead of covering them. So :class:`GridOfStudiesSearcher`
(ray-guide §4.2, pattern A) holds one ``OptunaSearch`` per cell — a cell is one (target domain, sample rate, method,
seed[, gamma2]) — and hands out trials round-robin over the cells that still have budget, each trial's config being
``{**cell axes, "hp": the cell's study's suggestion}``. Results and completions go back to the trial's own study, so
every cell is tuned on its own target-domain dev accuracy (comparable across the cell's trials, whatever the tuned
loss weights). One Tuner and one experiment directory hold the whole sweep; ``save``/``restore`` pickle the whole
searcher (every study) with ``ray.cloudpickle``, so ``Tuner.restore`` continues exactly where a killed sweep stopped.

The first trial of every cell runs the config's own hyper-parameters (enqueued as Optuna's first point), so a sweep
with ``trials_per_cell: 1`` reproduces the configured recipe and more trials can only find something better on dev.
A scheduler such as ASHA would compare trials across cells, so none is used.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from ray import cloudpickle
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from metakd_ray.config import TUNABLE  # the hyper-parameters a sweep may tune, with their search ranges


def applicable(name: str, method: str, gamma2_is_axis: bool) -> bool:
    """Whether hyper-parameter ``name`` means anything for ``method`` (``teacher_kind/student_method``)."""
    student = method.split("/")[1]
    if name in ("stage1_lr", "temperature"):
        return student != "finetune"
    if name == "gamma2":
        return student == "meta_kd" and not gamma2_is_axis
    return True


def hp_space(trial: Any, names: tuple[str, ...], method: str, gamma2_is_axis: bool) -> None:
    """Optuna define-by-run space of one cell (module level, so studies pickle)."""
    for name in names:
        if applicable(name, method, gamma2_is_axis):
            lo, hi, log = TUNABLE[name]
            trial.suggest_float(name, lo, hi, log=log)


class GridOfStudiesSearcher(Searcher):
    """One ``OptunaSearch`` per grid cell; ``samples_per_cell`` trials each, handed out round-robin.

    ``cells``: one dict per cell with at least ``"cell"`` (its id) and ``"method"``; every key becomes part of the
    trial config. ``defaults``: the configured value of each tunable hyper-parameter (the first point of each
    study). ``names``: which hyper-parameters to tune.
    """

    def __init__(self, cells: list[dict], names: tuple[str, ...], defaults: dict[str, float], samples_per_cell: int,
                 metric: str, mode: str, gamma2_is_axis: bool = False, seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        unknown = [n for n in names if n not in TUNABLE]
        if unknown:
            raise ValueError(f"cannot tune {unknown}; tunable: {', '.join(TUNABLE)}")
        self.cells = list(cells)
        self.names = tuple(names)
        self.defaults = dict(defaults)
        self.samples_per_cell = samples_per_cell
        self.gamma2_is_axis = gamma2_is_axis
        self.seed = seed
        self.studies: dict[str, OptunaSearch] = {}
        self.issued: dict[str, int] = {c["cell"]: 0 for c in self.cells}
        self.trial_cell: dict[str, str] = {}
        self._next = 0

    @property
    def total_trials(self) -> int:
        return len(self.cells) * self.samples_per_cell

    def _study(self, index: int) -> OptunaSearch:
        cell = self.cells[index]
        if cell["cell"] not in self.studies:
            method = cell["method"]
            names = tuple(n for n in self.names if applicable(n, method, self.gamma2_is_axis))
            first = {n: self.defaults[n] for n in names if n in self.defaults}
            self.studies[cell["cell"]] = OptunaSearch(
                space=functools.partial(hp_space, names=names, method=method, gamma2_is_axis=self.gamma2_is_axis),
                metric=self.metric, mode=self.mode, seed=self.seed * 100_003 + index,  # distinct per cell
                points_to_evaluate=[first] if first else None)
        return self.studies[cell["cell"]]

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict | None:
        n = len(self.cells)
        for step in range(n):
            i = (self._next + step) % n
            cell = self.cells[i]
            if self.issued[cell["cell"]] < self.samples_per_cell:
                self._next = (i + 1) % n
                self.issued[cell["cell"]] += 1
                self.trial_cell[trial_id] = cell["cell"]
                with warnings.catch_warnings():  # the configured first point may lie outside the search range
                    warnings.filterwarnings("ignore", message="Fixed parameter", category=UserWarning)
                    hp = self._study(i).suggest(trial_id) or {}
                # slot: this trial's index in its cell; with the cell and hp it names the trial's saved state
                return {**cell, "hp": hp, "slot": self.issued[cell["cell"]] - 1}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        cell = self.trial_cell.get(trial_id)
        if cell is not None and self.metric in result:
            # A trial resumed from its saved state reports again the epochs it had run after that state; training
            # is deterministic, so the value is the same and Optuna keeping the first report loses nothing.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The reported value is ignored", category=UserWarning)
                self.studies[cell].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cell = self.trial_cell.get(trial_id)
        if cell is not None:
            self.studies[cell].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(cloudpickle.load(f))


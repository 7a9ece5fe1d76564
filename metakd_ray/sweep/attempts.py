"""Failed trial attempts that could not record themselves, recorded from what Ray Tune saw.

A trial writes its own error line when its code raises (``sweep/trial.py``). When its process or its node dies
(SIGKILL, the OOM killer, a node removed) it cannot: :class:`RecordFailedAttempts` writes the line from Tune's error
when Tune retries the trial (``sweep.max_failures``), and :func:`record_tune_errors` from the ``ResultGrid`` for a
trial that failed for good. Both only touch a record still marked running, so a trial's own line is never replaced.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ray.tune import Callback

from metakd_ray.storage import Storage
from metakd_ray.sweep.records import RUNNING, TrialStore, error_line, trial_key


def record_error(store: TrialStore, config: Mapping[str, Any] | None, error: BaseException | None) -> bool:
    """Add ``error``'s line to the record of the trial of ``config`` when that record is still running (its attempt
    died without writing one); True when written."""
    config = config or {}
    if error is None or "cell" not in config:
        return False
    rec = store.read(trial_key(config["cell"], config.get("slot", 0), config.get("hp")))
    if rec is None or rec.status != RUNNING:
        return False
    store.write(rec.failed(error_line(error)))
    return True


def record_tune_errors(grid: Any, store: TrialStore) -> None:
    """A trial that died for good without writing its own error record gets one from Tune's public result
    (``ResultGrid``: each result's ``config`` and ``error``)."""
    for result in grid:
        record_error(store, result.config, result.error)


def tune_error(trial: Any) -> BaseException:
    """The error Tune recorded for ``trial``'s last failure: its public copies in the experiment's storage, else the
    trial's local pickle (written at once; the storage copy follows with the next sync), else a plain line saying
    the attempt was lost."""
    import ray.cloudpickle

    for get in (trial.get_pickled_error, trial.get_error):
        try:
            err = get()
        except (OSError, ValueError, EOFError):
            err = None
        if err is not None:
            return err if isinstance(err, BaseException) else RuntimeError(str(err))
    path = getattr(trial, "pickled_error_file", None)
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            return ray.cloudpickle.load(f)
    return RuntimeError("the attempt ended without an error of its own (its process or node was lost)")


class RecordFailedAttempts(Callback):
    """On each retry Tune makes (``on_trial_recover``), the failed attempt's error line in the trial's record, so
    a trial that finished after its node was lost still says why it took two attempts. Holds the storage URI and
    sweep name only: Tune pickles its callbacks with the experiment."""

    def __init__(self, storage_uri: str, sweep: str):
        self.storage_uri, self.sweep = storage_uri, sweep

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        store = TrialStore(Storage(self.storage_uri).sub("sweeps", self.sweep))
        record_error(store, getattr(trial, "config", None), tune_error(trial))

"""Progress of a sweep's trials, as a Ray Tune callback."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from ray.tune import Callback

ENDED = ("TERMINATED", "ERROR")


class EtaCallback(Callback):
    """Prints one line per finished (or failed) trial: the sweep's progress and an ETA from this run's pace so far.

    The pace counts only trials that ended in this run: a restored sweep's earlier trials took time this run did not
    spend. Tune calls the hook before it updates the trial's status, so the trial itself is counted as ended."""

    def __init__(self, total: int, clock: Callable[[], float] = time.time,
                 out: Callable[[str], Any] = functools.partial(print, flush=True)):
        self.total, self.clock, self.out = total, clock, out
        self.seen, self.t0 = 0, clock()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.seen += 1
        done = sum(t.status in ENDED for t in trials) + (trial.status not in ENDED)
        elapsed = self.clock() - self.t0
        eta = elapsed / self.seen * max(self.total - done, 0)
        self.out(f"[sweep] {done}/{self.total} trials finished; {elapsed / 60:.1f} min in this run; "
                 f"ETA {eta / 60:.1f} min")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.on_trial_complete(iteration, trials, trial, **info)

"""Progress of a sweep's trials, as a Ray Tune callback."""

from __future__ import annotations

import time
from typing import Any, Callable

from ray.tune import Callback

ENDED = ("TERMINATED", "ERROR")


class EtaCallback(Callback):
    """Prints one line per finished (or failed) trial: the sweep's progress and an ETA from this run's pace so far,
    then the trial's cell, slot and scores when it has them. While trials run, at most one line per ``every_s``
    says where the running trials are (stage, epoch, best dev accuracy so far).

    The pace counts only trials that ended in this run: a restored sweep's earlier trials took time this run did not
    spend. Tune calls the hook before it updates the trial's status, so the trial itself is counted as ended.
    ``Tuner.restore`` brings back the callback pickled when the sweep first started (its run config), so the clock
    restarts in ``setup``, which Tune calls at the start of every run."""

    def __init__(self, total: int, clock: Callable[[], float] = time.time,
                 out: Callable[[str], Any] | None = None, every_s: float = 30.0):
        self.total, self.clock, self.out, self.every_s = total, clock, out or _say, every_s
        self.setup()

    def setup(self, **info: Any) -> None:
        self.seen, self.t0 = 0, self.clock()
        self.last_status = self.t0
        self.latest: dict[str, dict] = {}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.seen += 1
        done = sum(t.status in ENDED for t in trials) + (trial.status not in ENDED)
        elapsed = self.clock() - self.t0
        eta = elapsed / self.seen * max(self.total - done, 0)
        self.latest.pop(_name(trial), None)
        self.out(f"[sweep] {done}/{self.total} trials finished; {elapsed / 60:.1f} min in this run; "
                 f"ETA {eta / 60:.1f} min{_describe(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.on_trial_complete(iteration, trials, trial, **info)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("phase") == "final":
            return
        self.latest[_name(trial)] = {"label": _label(trial), **result}
        now = self.clock()
        if now - self.last_status < self.every_s:
            return
        self.last_status = now
        running = "; ".join(f"{r['label']} {r.get('phase', '?')} epoch {int(r.get('epoch', 0)) + 1} "
                            f"dev {_dev(r)}" for r in self.latest.values())
        self.out(f"[sweep] running: {running}")


def _say(line: str) -> None:
    """``print`` looked up when called: Ray replaces the driver's ``print`` after ``ray.init`` (its tqdm_ray
    support), and a callback holding the original could then no longer be pickled into the Tuner."""
    print(line, flush=True)


def _dev(result: dict) -> str:
    """The best dev accuracy so far, or "—" before the dev-selected stage has scored one (the trial reports 0.0 for
    Tune's metric then: a first stage that distils layers is not evaluated)."""
    dev = float(result.get("dev_acc") or 0.0)
    return f"{dev:.3f}" if dev > 0 else "—"


def _name(trial: Any) -> str:
    return str(getattr(trial, "trial_id", id(trial)))


def _label(trial: Any) -> str:
    config = getattr(trial, "config", None) or {}
    return f"{config.get('cell', _name(trial))} #{config.get('slot', 0)}"


def _describe(trial: Any) -> str:
    """``" — <cell> #<slot>: dev 0.812, test 0.800"`` from the trial's config and last result ("" without)."""
    config = getattr(trial, "config", None) or {}
    result = getattr(trial, "last_result", None) or {}
    if "cell" not in config:
        return ""
    scores = ", ".join(f"{k.split('_')[0]} {float(result[k]):.3f}" for k in ("dev_acc", "test_acc")
                       if isinstance(result.get(k), (int, float)))
    state = "failed" if getattr(trial, "status", "") == "ERROR" or not scores else scores
    return f" — {_label(trial)}: {state}"

"""Tests of the sweep's ETA line (``metakd_ray.sweep.progress.EtaCallback``), a Ray Tune callback.

Interface: ``EtaCallback(total, clock=time.time, out=print)``; ``on_trial_complete`` and ``on_trial_error`` each
print one line ``"[sweep] {done}/{total} trials finished; {elapsed:.1f} min in this run; ETA {eta:.1f} min"``.
``done`` counts the trials whose status is TERMINATED or ERROR, plus the reported trial if its status is not yet
updated (Tune calls the hook first); the pace comes from this run only: elapsed since construction divided by the
completions this callback has seen, times the trials left. Trials are stand-ins with a ``status``; the clock is
fake, so nothing here waits.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

LINE = re.compile(r"^\[sweep\] (\d+)/(\d+) trials finished; (-?\d+\.\d) min in this run; ETA (-?\d+\.\d) min"
                  r"( — .*)?$")


def eta_callback_class():
    # Imported here, not at module level: a missing module fails these tests one by one instead of stopping
    # collection of the whole run.
    from metakd_ray.sweep.progress import EtaCallback

    return EtaCallback


class FakeClock:
    def __init__(self, t: float = 1_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def trial(status: str) -> SimpleNamespace:
    return SimpleNamespace(status=status)


def make(total: int, start: float = 1_000.0):
    clock, lines = FakeClock(start), []
    cb = eta_callback_class()(total, clock=clock, out=lines.append)
    return cb, clock, lines


def parse(line: str) -> tuple[int, int, float, float]:
    m = LINE.match(line)
    assert m, f"unexpected line format: {line!r}"
    return int(m[1]), int(m[2]), float(m[3]), float(m[4])


def test_is_a_tune_callback():
    from ray.tune import Callback

    assert issubclass(eta_callback_class(), Callback)


def test_first_completion_of_a_fresh_sweep():
    cb, clock, lines = make(total=4)
    current = trial("RUNNING")  # Tune calls the hook before it marks the trial TERMINATED
    trials = [current, trial("RUNNING"), trial("PENDING"), trial("PENDING")]
    clock.t += 90.0
    cb.on_trial_complete(iteration=1, trials=trials, trial=current)
    # 1 done in 1.5 min -> 3 left at 1.5 min each
    assert lines == ["[sweep] 1/4 trials finished; 1.5 min in this run; ETA 4.5 min"]


def test_restored_sweep_paces_from_this_run_only():
    """5 of 10 finished before a restore: the first completion after 60 s gives 60 s per trial, 4 left."""
    cb, clock, lines = make(total=10)
    current = trial("RUNNING")
    trials = [trial("TERMINATED") for _ in range(5)] + [current] + [trial("PENDING") for _ in range(4)]
    clock.t += 60.0
    cb.on_trial_complete(iteration=7, trials=trials, trial=current)
    assert lines == ["[sweep] 6/10 trials finished; 1.0 min in this run; ETA 4.0 min"]

    # Tune has marked the first one TERMINATED by the next completion; 2 completions in 120 s, 3 left.
    current.status = "TERMINATED"
    nxt = trials[6]
    nxt.status = "RUNNING"
    clock.t += 60.0
    cb.on_trial_complete(iteration=9, trials=trials, trial=nxt)
    assert lines[1] == "[sweep] 7/10 trials finished; 2.0 min in this run; ETA 3.0 min"
    assert len(lines) == 2


def test_a_trial_already_marked_finished_is_counted_once():
    cb, clock, lines = make(total=4)
    current = trial("TERMINATED")
    trials = [trial("TERMINATED"), current, trial("PENDING"), trial("PENDING")]
    clock.t += 120.0
    cb.on_trial_complete(iteration=3, trials=trials, trial=current)
    # 2 done; this callback has seen 1 completion in 2 min; 2 left
    assert lines == ["[sweep] 2/4 trials finished; 2.0 min in this run; ETA 4.0 min"]


def test_errors_count_as_finished():
    cb, clock, lines = make(total=6)
    failed = trial("RUNNING")
    trials = [trial("ERROR"), trial("TERMINATED"), failed, trial("PENDING"), trial("PENDING"), trial("PENDING")]
    clock.t += 30.0
    cb.on_trial_error(iteration=2, trials=trials, trial=failed)
    # ERROR + TERMINATED + the failing one = 3 done; 1 completion (the error) in 0.5 min; 3 left
    assert lines == ["[sweep] 3/6 trials finished; 0.5 min in this run; ETA 1.5 min"]

    failed.status = "ERROR"
    ok = trials[3]
    ok.status = "RUNNING"
    clock.t += 30.0
    cb.on_trial_complete(iteration=4, trials=trials, trial=ok)
    # 4 done; 2 completions (one error, one success) in 1.0 min; 2 left
    assert lines[1] == "[sweep] 4/6 trials finished; 1.0 min in this run; ETA 1.0 min"


def test_pending_and_running_trials_are_not_done():
    cb, clock, lines = make(total=5)
    current = trial("RUNNING")
    trials = [current, trial("RUNNING"), trial("PAUSED"), trial("PENDING"), trial("PENDING")]
    clock.t += 60.0
    cb.on_trial_complete(iteration=1, trials=trials, trial=current)
    done, total, elapsed, eta = parse(lines[0])
    assert (done, total, elapsed, eta) == (1, 5, 1.0, 4.0)


def test_last_trial_gives_zero_eta():
    cb, clock, lines = make(total=3)
    current = trial("RUNNING")
    trials = [trial("TERMINATED"), trial("ERROR"), current]
    clock.t += 240.0
    cb.on_trial_complete(iteration=5, trials=trials, trial=current)
    assert lines == ["[sweep] 3/3 trials finished; 4.0 min in this run; ETA 0.0 min"]


@pytest.mark.parametrize("hook", ["on_trial_complete", "on_trial_error"])
def test_eta_is_never_negative(hook):
    """More trials finished than ``total`` (e.g. a restored experiment holding extra trials): ETA 0, not < 0."""
    cb, clock, lines = make(total=3)
    current = trial("RUNNING")
    trials = [trial("TERMINATED") for _ in range(4)] + [current]
    clock.t += 60.0
    getattr(cb, hook)(iteration=1, trials=trials, trial=current)
    done, total, elapsed, eta = parse(lines[0])
    assert (done, total, elapsed) == (5, 3, 1.0)
    assert eta == 0.0
    assert "ETA -" not in lines[0]


def test_clock_starts_at_construction():
    clock, lines = FakeClock(5_000.0), []
    cb = eta_callback_class()(2, clock=clock, out=lines.append)
    clock.t = 5_000.0 + 6.0  # 0.1 min after construction (not since the epoch)
    current = trial("RUNNING")
    cb.on_trial_complete(iteration=1, trials=[current, trial("PENDING")], trial=current)
    assert lines == ["[sweep] 1/2 trials finished; 0.1 min in this run; ETA 0.1 min"]



def test_a_finished_trial_names_its_cell_and_scores():
    cb, clock, lines = make(total=2)
    current = SimpleNamespace(status="RUNNING", trial_id="t1", config={"cell": "books|0.1|meta/meta_kd|0|-", "slot": 1},
                              last_result={"dev_acc": 0.8125, "test_acc": 0.79, "phase": "final"})
    clock.t += 60.0
    cb.on_trial_complete(iteration=1, trials=[current, trial("PENDING")], trial=current)
    assert lines == ["[sweep] 1/2 trials finished; 1.0 min in this run; ETA 1.0 min — "
                     "books|0.1|meta/meta_kd|0|- #1: dev 0.812, test 0.790"]
    failed = SimpleNamespace(status="RUNNING", trial_id="t2", config={"cell": "c", "slot": 0}, last_result={})
    cb.on_trial_error(iteration=2, trials=[current, failed], trial=failed)
    assert lines[1].endswith(" — c #0: failed")


def test_running_trials_at_most_one_line_per_interval():
    cb, clock, lines = make(total=2)
    t = SimpleNamespace(status="RUNNING", trial_id="t1", config={"cell": "c", "slot": 0})
    for epoch in range(10):  # ten reports 5 s apart: one status line at 30 s, one at 60 s
        clock.t += 6.0
        cb.on_trial_result(iteration=epoch, trials=[t], trial=t,
                           result={"phase": "stage2", "epoch": epoch, "dev_acc": 0.5 + epoch / 100})
    assert lines == ["[sweep] running: c #0 stage2 epoch 5 dev 0.540",
                     "[sweep] running: c #0 stage2 epoch 10 dev 0.590"]


def test_a_running_trial_without_a_dev_score_yet_shows_none():
    """Stage 1 (layer distillation) is not evaluated and reports dev_acc 0.0 for Tune's metric: not a score."""
    cb, clock, lines = make(total=1)
    t = SimpleNamespace(status="RUNNING", trial_id="t1", config={"cell": "c", "slot": 0})
    clock.t += 31.0
    cb.on_trial_result(iteration=0, trials=[t], trial=t, result={"phase": "stage1", "epoch": 0, "dev_acc": 0.0})
    assert lines == ["[sweep] running: c #0 stage1 epoch 1 dev —"]


def test_a_callback_restored_from_its_pickle_paces_from_the_new_run():
    """``Tuner.restore`` unpickles the callback made when the sweep first started; Tune calls ``setup`` at the start
    of every run, and the clock restarts there: an hour-old start time must not enter this run's pace."""
    from ray import cloudpickle

    cb, clock, lines = make(total=4)
    clock.t += 3_600.0  # the first run, then a restart an hour later
    cb = cloudpickle.loads(cloudpickle.dumps(cb))
    cb.clock, cb.out = clock, lines.append
    cb.setup(stop=None, num_samples=4, total_num_samples=4)
    current = trial("RUNNING")
    clock.t += 60.0
    cb.on_trial_complete(iteration=1, trials=[trial("TERMINATED"), current, trial("PENDING"), trial("PENDING")],
                         trial=current)
    assert lines == ["[sweep] 2/4 trials finished; 1.0 min in this run; ETA 2.0 min"]

"""A failed attempt that could not write its own error line (process or node killed) gets Tune's, once; a trial's
own line is never replaced (``sweep/attempts.py``). The retry end to end: test_reliability.py's SIGKILL test."""

from __future__ import annotations

import pickle

from metakd_ray.storage import Storage
from metakd_ray.sweep.attempts import RecordFailedAttempts, record_error, tune_error
from metakd_ray.sweep.records import ERROR, TrialRecord, TrialStore, trial_key

CONFIG = {"cell": "books|0.1|meta/meta_kd|0|-", "slot": 0, "hp": {"stage1_lr": 1e-4}}


class FakeTrial:
    """What the callback reads of a Tune trial: its config, Tune's stored errors, the local pickle."""

    def __init__(self, config, stored=None, pickled_file=None):
        self.config, self.stored, self.pickled_error_file = config, stored, pickled_file

    def get_pickled_error(self):
        return self.stored

    def get_error(self):
        return None


def store_with(tmp_path, **changes) -> TrialStore:
    store = TrialStore(Storage(str(tmp_path)).sub("sweeps", "s"))
    key = trial_key(CONFIG["cell"], CONFIG["slot"], CONFIG["hp"])
    rec = TrialRecord(key, CONFIG["cell"], 0, CONFIG["hp"]).started("t1", "tune")
    store.write(rec.failed("ValueError: its own line") if changes.get("own_error") else rec)
    return store


def test_a_running_record_gets_the_error_line_once_and_an_own_line_is_kept(tmp_path):
    store = store_with(tmp_path)
    key = trial_key(CONFIG["cell"], CONFIG["slot"], CONFIG["hp"])
    assert record_error(store, CONFIG, RuntimeError("The actor died unexpectedly\nsecond line"))
    rec = store.read(key)
    assert rec.status == ERROR and rec.errors == ("RuntimeError: The actor died unexpectedly",)
    assert not record_error(store, CONFIG, RuntimeError("again"))  # no longer running: nothing added
    assert store.read(key).errors == ("RuntimeError: The actor died unexpectedly",)

    own = store_with(tmp_path / "own", own_error=True)
    assert not record_error(own, CONFIG, RuntimeError("Tune's view"))
    assert own.read(key).errors == ("ValueError: its own line",)
    assert not record_error(store, {"no": "cell"}, RuntimeError("x")) and not record_error(store, CONFIG, None)


def test_the_callback_takes_tunes_stored_error_then_the_local_pickle_then_a_plain_line(tmp_path):
    assert str(tune_error(FakeTrial(CONFIG, stored=KeyError("stored")))) == "'stored'"
    path = tmp_path / "error.pkl"
    path.write_bytes(pickle.dumps(OSError("node lost")))
    assert str(tune_error(FakeTrial(CONFIG, pickled_file=str(path)))) == "node lost"
    assert "process or node was lost" in str(tune_error(FakeTrial(CONFIG)))

    store = store_with(tmp_path / "cb")
    cb = pickle.loads(pickle.dumps(RecordFailedAttempts(str(tmp_path / "cb"), "s")))  # Tune pickles its callbacks
    cb.on_trial_recover(0, [], FakeTrial(CONFIG, pickled_file=str(path)))
    assert store.read(trial_key(CONFIG["cell"], 0, CONFIG["hp"])).errors == ("OSError: node lost",)

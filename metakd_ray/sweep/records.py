"""Each trial's own record, written by the trial itself: what results and resume are built from (never Ray Tune's
internal files). No Ray and no torch here.

Under ``sweeps/<name>/trials/``, per trial, keyed by what the trial *is* — its cell, slot (its index in the cell) and
hyper-parameters — not by Tune's trial id (a trial started after Tune's last snapshot is suggested again under a new
id by a restored searcher; it must find its own record and state):

    <key>.json   the record (JSON, rewritten atomically): cell, slot, hp, experiment, trial_id, status
                 ("running" | "ok" | "error"), attempts, errors (one line per failed attempt), start_time, updated,
                 last (phase, epoch, dev_acc of the last report), final (the final report once the trial is done)
    <key>.pt     the full training state of an unfinished trial, overwritten after every epoch; deleted when the
                 trial finishes (see ``sweep/trial.py`` for why this is not a Tune checkpoint)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from metakd_ray.storage import Storage, hash_json

TRIALS = "trials"
STUDENTS = "students"  # students/<key>/: the trial's exported student (sweep/students.py)
STUDENT_DONE = "metakd_export.json"  # written last into an export (metakd_ray.export.METADATA_FILE)
RUNNING, OK, ERROR = "running", "ok", "error"


def trial_key(cell_id: str, slot: int, hp: Mapping[str, Any] | None) -> str:
    """The content key of a trial: its cell, its slot in the cell and its hyper-parameters."""
    return hash_json({"cell": cell_id, "slot": int(slot), "hp": dict(hp or {})})[:20]


@dataclass(frozen=True)
class TrialRecord:
    key: str
    cell: str
    slot: int
    hp: dict
    experiment: str = "tune"
    trial_id: str = ""
    status: str = RUNNING
    attempts: int = 0
    errors: tuple[str, ...] = ()
    start_time: float | None = None
    updated: float | None = None
    last: dict = field(default_factory=dict)
    final: dict | None = None

    @property
    def error(self) -> str:
        """The last failed attempt's exception line ("" if none failed)."""
        return self.errors[-1] if self.errors else ""

    def started(self, trial_id: str, experiment: str) -> TrialRecord:
        now = time.time()
        return dataclasses.replace(self, trial_id=trial_id, experiment=experiment, status=RUNNING,
                                   attempts=self.attempts + 1, start_time=self.start_time or now, updated=now)

    def reported(self, phase: str, epoch: int, dev_acc: float) -> TrialRecord:
        return dataclasses.replace(self, last={"phase": phase, "epoch": epoch, "dev_acc": dev_acc},
                                   updated=time.time())

    def failed(self, error: str) -> TrialRecord:
        return dataclasses.replace(self, status=ERROR, errors=(*self.errors, error), updated=time.time())

    def finished(self, final: dict) -> TrialRecord:
        return dataclasses.replace(self, status=OK, final=dict(final), updated=time.time(),
                                   last={"phase": final.get("phase"), "epoch": final.get("epoch"),
                                         "dev_acc": final.get("dev_acc")})

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "errors": list(self.errors)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrialRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, "errors": tuple(d.get("errors") or ())})


def error_line(e: BaseException) -> str:
    """One line for a failed attempt: ``Type: first line of the message``."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class TrialStore:
    """The records and training states of one sweep's trials: ``trials/`` under ``sweep_dir`` (a storage rooted at
    ``<storage root>/sweeps/<name>``)."""

    def __init__(self, sweep_dir: Storage):
        self.storage = sweep_dir

    def _parts(self, key: str, suffix: str) -> tuple[str, ...]:
        return (TRIALS, f"{key}{suffix}")

    def read(self, key: str) -> TrialRecord | None:
        parts = self._parts(key, ".json")
        return TrialRecord.from_json(self.storage.read_json(*parts)) if self.storage.is_file(*parts) else None

    def write(self, record: TrialRecord) -> None:
        self.storage.write_json(record.to_json(), *self._parts(record.key, ".json"))

    def records(self) -> list[TrialRecord]:
        """Every trial's record, in key order; a record that cannot be read is skipped."""
        out = []
        for name in self.storage.listdir(TRIALS):
            if name.endswith(".json"):
                try:
                    out.append(TrialRecord.from_json(self.storage.read_json(TRIALS, name)))
                except (ValueError, TypeError, KeyError, OSError):
                    continue
        return out

    # -- training states (bytes; the trial serialises them) --------------------------------------------------
    def read_state(self, key: str) -> bytes | None:
        parts = self._parts(key, ".pt")
        return self.storage.read_bytes(*parts) if self.storage.is_file(*parts) else None

    def write_state(self, key: str, data: bytes) -> None:
        self.storage.write_bytes(data, *self._parts(key, ".pt"))

    def drop_state(self, key: str) -> None:
        self.storage.delete(*self._parts(key, ".pt"))

    def drop_unfinished_states(self) -> list[str]:
        """Delete the training states left (failed trials, or trials a restored searcher never suggested again);
        call only when no trial of the sweep runs. Records stay."""
        gone = [n for n in self.storage.listdir(TRIALS) if n.endswith(".pt")]
        for n in gone:
            self.storage.delete(TRIALS, n)
        return gone

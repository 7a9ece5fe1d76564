"""A sweep's results as DataFrames, built from the project's own records — ``plan.json`` (the cells), each trial's
record in ``trials/`` (status, errors, last and final report; written by the trial itself, see
``metakd_ray.sweep.records``), ``costs.json`` (teachers and caches) and ``config.yaml``. Ray Tune's files are never
read: a Ray upgrade cannot change what results say, and deleting ``tune/`` loses nothing.

Only pandas and pyarrow are imported (never ray or torch), so this runs on a laptop against a copy of the sweep
directory, or straight against ``s3://`` / ``gs://`` through :class:`metakd_ray.storage.Storage`.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pandas as pd
import yaml

from metakd_ray.storage import Storage
from metakd_ray.sweep.plan import PLAN_FILE, Plan
from metakd_ray.sweep.records import ERROR, OK, STUDENT_DONE, STUDENTS, TRIALS, TrialRecord

CELL_KEYS = ("cell", "domain", "rate", "method", "seed", "gamma2")
COSTS = ("wall_s", "cpu_s", "gpu_s")
SHARED_COSTS = tuple(f"{kind}_{c}" for kind in ("teacher", "cache") for c in COSTS)
# Tune's names for a trial's state, kept as the DataFrame's vocabulary.
STATUS = {OK: "TERMINATED", ERROR: "ERROR"}
RERUN = "python -m metakd_ray.sweep CONFIG"


class ResultsError(ValueError):
    """A sweep's record (plan.json, costs.json, config.yaml, a trial's record) is damaged. The message is one line:
    the file, what is wrong with it and what to do."""


def open_sweep(path: Any) -> Storage:
    """Storage rooted at a sweep directory: ``path`` is the sweep dir, one of its ``tune*/`` experiment subdirs, or
    a :class:`Storage` rooted at either."""
    st = path if isinstance(path, Storage) else Storage(str(path))
    if not st.is_file(PLAN_FILE) and posixpath.basename(st.base).startswith("tune"):
        parent = st.uri().rstrip("/").rsplit("/", 1)[0]
        return Storage(parent) if "://" in st.uri() or st.is_local else Storage(posixpath.dirname(st.base), st.fs)
    return st


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing {e}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _damaged(st: Storage, parts: tuple[str, ...], why: str, fix: str) -> ResultsError:
    return ResultsError(f"{st.uri(*parts)} is damaged ({why}); {fix}")


def _rewrite(name: str) -> str:
    return f"remove it and rerun the sweep ({RERUN}) to write {name} again"


_REDO_TRIAL = f"remove it and rerun the sweep ({RERUN}): that trial runs again"


def _read_json(st: Storage, *parts: str, fix: str) -> Any:
    """The JSON at ``parts``, or None if there is no such file; :class:`ResultsError` if it does not parse."""
    if not st.is_file(*parts):
        return None
    data = st.read_bytes(*parts)
    if not data.strip():
        raise _damaged(st, parts, "empty", fix)
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError (invalid or cut short), UnicodeDecodeError
        raise _damaged(st, parts, f"not valid JSON: {' '.join(str(e).split())}", fix) from None


def _numeric(v: Any) -> bool:
    """A number, or a string holding one (a numpy scalar written with ``default=str``)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return isinstance(v, str)


def _read_plan(st: Storage) -> tuple[dict | None, Plan]:
    """plan.json as a dict (None if absent) and as a :class:`Plan`; ResultsError if it does not have the plan's
    shape."""
    fix = _rewrite(PLAN_FILE)
    plan_json = _read_json(st, PLAN_FILE, fix=fix)
    if plan_json is not None and not isinstance(plan_json, dict):
        raise _damaged(st, (PLAN_FILE,), f"a JSON {type(plan_json).__name__}, not the plan's object", fix)
    try:
        plan = Plan.from_json(plan_json or {})
        for c in plan.cells:
            c.to_json()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise _damaged(st, (PLAN_FILE,), f"not a plan: {_one_line(e)}", fix) from None
    return plan_json, plan


def _read_costs(st: Storage) -> dict:
    """costs.json ({} if absent); ResultsError unless it is {"teachers": {key: entry}, "caches": {key: entry}} with
    numeric costs and a list of cells per entry."""
    fix = _rewrite("costs.json")
    costs = _read_json(st, "costs.json", fix=fix)
    if costs is None:
        return {}
    if not isinstance(costs, dict):
        raise _damaged(st, ("costs.json",), f"a JSON {type(costs).__name__}, expected an object", fix)
    for section in ("teachers", "caches"):
        entries = costs.get(section)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise _damaged(st, ("costs.json",), f"{section!r} is a {type(entries).__name__}, expected an object", fix)
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise _damaged(st, ("costs.json",), f"{section}.{key} is a {type(entry).__name__}, expected an object",
                               fix)
            bad = [c for c in COSTS if entry.get(c) is not None and not _numeric(entry[c])]
            if bad or not isinstance(entry.get("cells") or [], list):
                what = f"{bad[0]} is not a number" if bad else "cells is not a list"
                raise _damaged(st, ("costs.json",), f"{section}.{key}: {what}", fix)
    return costs


# What each field of a trial record must be (records are written by the trial itself; anything else is damage).
_NUMBER_OR_NONE, _DICT_OR_NONE = (int, float, type(None)), (dict, type(None))
_RECORD_TYPES: dict[str, Any] = {"key": str, "cell": str, "slot": int, "hp": _DICT_OR_NONE, "experiment": str,
                                 "trial_id": str, "status": str, "attempts": int, "last": _DICT_OR_NONE,
                                 "final": _DICT_OR_NONE, "start_time": _NUMBER_OR_NONE, "updated": _NUMBER_OR_NONE}
_REPORTED = ("dev_acc", "test_acc", "wall_s", "cpu_s", "gpu_s", "n_train", "epoch")


def _read_records(st: Storage) -> list[TrialRecord]:
    """Every trial's record under ``trials/``, in key order; ResultsError naming the first one that is damaged
    (``TrialStore.records`` skips those, which would make a trial vanish from the results without a word)."""
    out = []
    for name in st.listdir(TRIALS):
        if not name.endswith(".json"):
            continue
        parts = (TRIALS, name)
        d = _read_json(st, *parts, fix=_REDO_TRIAL)
        if d is None:  # gone between listing and reading (a trial rewriting it elsewhere): not damage
            continue
        if not isinstance(d, dict):
            raise _damaged(st, parts, f"a JSON {type(d).__name__}, expected a trial record object", _REDO_TRIAL)
        try:
            rec = TrialRecord.from_json(d)
        except (TypeError, ValueError) as e:
            raise _damaged(st, parts, f"not a trial record: {_one_line(e)}", _REDO_TRIAL) from None
        for field, kind in _RECORD_TYPES.items():
            value = getattr(rec, field)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise _damaged(st, parts, f"{field} is {value!r}, not what a trial writes", _REDO_TRIAL)
        if not all(isinstance(e, str) for e in rec.errors):
            raise _damaged(st, parts, "errors is not a list of strings", _REDO_TRIAL)
        for section in ("last", "final"):
            report = getattr(rec, section) or {}
            bad = [k for k in _REPORTED if report.get(k) is not None and not _numeric(report[k])]
            if bad:
                raise _damaged(st, parts, f"{section}.{bad[0]} is {report[bad[0]]!r}, not a number", _REDO_TRIAL)
        out.append(rec)
    return out


def _read_config(st: Storage) -> dict | None:
    if not st.is_file("config.yaml"):
        return None
    try:
        cfg = yaml.safe_load(st.read_bytes("config.yaml"))
    except yaml.YAMLError as e:
        raise _damaged(st, ("config.yaml",), f"not valid YAML: {' '.join(str(e).split())}",
                       _rewrite("config.yaml")) from None
    if isinstance(cfg, dict) and not isinstance(cfg.get("data") or {}, dict):
        raise _damaged(st, ("config.yaml",), "its data section is not a mapping", _rewrite("config.yaml"))
    return cfg if isinstance(cfg, dict) else None


def _trial_row(rec: Any, plan_cell: dict) -> dict:
    final = rec.final or {}
    last = rec.last or {}
    status = STATUS.get(rec.status, "RUNNING")
    wall = final.get("wall_s")
    if wall is None and rec.start_time is not None and rec.updated is not None:
        wall = rec.updated - rec.start_time  # a trial that never finished still used its CPU
    row = {
        **{k: plan_cell.get(k) for k in CELL_KEYS}, "cell": rec.cell,
        "trial_id": rec.trial_id or rec.key, "trial_key": rec.key, "slot": rec.slot, "experiment": rec.experiment,
        "status": status, "error": rec.error if status == "ERROR" else "", "n_failures": len(rec.errors),
        "phase": last.get("phase") or "", "epoch": last.get("epoch"),
        "dev_acc": final.get("dev_acc", last.get("dev_acc")), "test_acc": final.get("test_acc"),
        "n_train": final.get("n_train"), "wall_s": wall, "cpu_s": final.get("cpu_s"), "gpu_s": final.get("gpu_s"),
        "teacher_key": final.get("teacher_key") or "", "cache_key": final.get("cache_key") or "",
        "teacher_source": final.get("teacher_source") or "", "start_time": rec.start_time,
        "n_params": final.get("n_params"), "teacher_params": final.get("teacher_params"),
        "student_dir": final.get("student_dir") or "", "student_bytes": final.get("student_bytes"),
        "node_id": final.get("node_id") or "",
    }
    for k, v in (rec.hp or {}).items():
        row[f"hp_{k}"] = v
    return row


def _split_shared_costs(df: pd.DataFrame, costs: dict) -> tuple[pd.DataFrame, dict]:
    """Each teacher's and cache's cost split evenly over the cells that use them (those with trials here),
    then evenly over each cell's trials; what cannot be placed on a row is returned as ``unattributed``."""
    for c in SHARED_COSTS:
        df[c] = 0.0
    unattributed = {c: 0.0 for c in SHARED_COSTS}
    trials_per_cell = df.groupby("cell").size() if len(df) else pd.Series(dtype=int)
    for kind, section in (("teacher", "teachers"), ("cache", "caches")):
        for entry in (costs.get(section) or {}).values():
            cells = [c for c in dict.fromkeys(entry.get("cells") or []) if c in trials_per_cell.index]
            for c in COSTS:
                total = float(entry.get(c) or 0.0)
                if not cells:
                    unattributed[f"{kind}_{c}"] += total
                    continue
                for cell in cells:
                    df.loc[df["cell"] == cell, f"{kind}_{c}"] += total / len(cells) / trials_per_cell[cell]
    return df, unattributed


def load_results(path: Any) -> pd.DataFrame:
    """One row per trial of the sweep at ``path`` (the sweep dir or one of its ``tune*/`` subdirs; a URI works).

    Columns: the cell keys (cell, domain, rate, method, seed, gamma2 — from the plan), trial_id (Tune's id of its
    latest attempt), trial_key (its content key), slot, experiment, status (TERMINATED = a final report, ERROR =
    its last attempt failed, RUNNING = started, not ended), error (the exception line of the last failed attempt of
    an ERROR trial, else ""), n_failures (failed attempts, a later success included), phase, epoch, dev_acc,
    test_acc (NaN until the final report), n_train, wall_s, cpu_s, gpu_s, teacher_key, cache_key, teacher_source
    (cache / live / ""), start_time (UTC), n_params (the exported student's parameters), teacher_params,
    student_dir (the URI of the trial's exported student; "" when it was not kept, see ``storage.keep_students``),
    student_bytes (its size on storage), node_id (the hex id of the Ray node the finished trial ran on; "" before
    its final report), the shared costs teacher_{wall,cpu,gpu}_s and cache_{wall,cpu,gpu}_s, and hp_<name> per
    hyper-parameter. ``df.attrs``: ``plan`` (plan.json as a dict, or None), ``config`` (config.yaml
    as a dict, or None), ``costs``, ``unattributed`` (shared cost on no row) and ``sweep_dir``.

    A damaged plan.json, costs.json, config.yaml or trial record (not valid JSON/YAML, cut short, not the shape the
    sweep writes) raises :class:`ResultsError`: one line naming the file and what to do.
    """
    st = open_sweep(path)
    plan_json, plan = _read_plan(st)
    costs = _read_costs(st)
    cfg = _read_config(st)
    by_id = {c.id: c.to_json() for c in plan.cells}
    rows = [_trial_row(rec, by_id.get(rec.cell, {})) for rec in _read_records(st)]
    kept = {k for k in st.listdir(STUDENTS) if st.is_file(STUDENTS, k, STUDENT_DONE)} if rows else set()
    for row in rows:  # a student removed since (storage.keep_students: selected) has no folder any more
        if row["student_dir"] and row["trial_key"] not in kept:
            row["student_dir"] = ""
    df = pd.DataFrame(rows, columns=list(rows[0]) if rows else [*CELL_KEYS, "trial_id", "status", "error"])
    for c in ("dev_acc", "test_acc", "wall_s", "cpu_s", "gpu_s", "rate", "gamma2", "n_params", "teacher_params",
              "student_bytes"):
        if c not in df:
            df[c] = float("nan")
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["start_time"] = pd.to_datetime(pd.to_numeric(df.get("start_time", pd.Series(index=df.index, dtype=float)),
                                                    errors="coerce"), unit="s", utc=True)
    df, unattributed = _split_shared_costs(df, costs)
    df = df.sort_values(["cell", "start_time", "trial_id"], na_position="last", kind="stable").reset_index(drop=True)
    df.attrs.update(plan=plan_json, config=cfg, costs=costs, unattributed=unattributed, sweep_dir=st.uri())
    return df


def total_cost(df: pd.DataFrame) -> dict[str, float]:
    """The sweep's total wall/cpu/gpu seconds: trials + their shares of teachers and caches + unattributed."""
    un = df.attrs.get("unattributed") or {}
    return {c: float(df[c].sum(skipna=True) + sum(df[f"{k}_{c}"].sum() + un.get(f"{k}_{c}", 0.0)
                                                 for k in ("teacher", "cache"))) for c in COSTS}


def cells(df: pd.DataFrame, plan: dict | None = None) -> pd.DataFrame:
    """One row per planned cell (plan.json order; a cell with no trial yet still appears).

    The selected trial is the finished trial (final report) with the best dev_acc, ties to the earliest
    started; its test_acc is the cell's score. status: "ok" (a finished trial), "failed" (none finished and none
    still to come: ``error`` lists its trials' errors), "pending" (otherwise). Costs are summed over the cell's trials.
    gamma2 is the axis value (NaN when gamma2 is not an axis). The selected trial's ``trial_key``,
    ``student_dir`` (the cell's model: a stock transformers folder), ``n_params``, ``teacher_params`` and
    ``student_bytes`` are the cell's.
    """
    p = Plan.from_json(plan if plan is not None else (df.attrs.get("plan") or {}))
    planned = [c.to_json() for c in p.cells]
    known = {c["cell"] for c in planned}
    for cid, g in df.groupby("cell", sort=False):  # trials of cells the plan does not list (an older plan)
        if cid not in known:
            planned.append({k: g.iloc[0][k] for k in CELL_KEYS})
            known.add(cid)
    hp_cols = [c for c in df.columns if c.startswith("hp_")]
    rows = []
    for pc in planned:
        g = df[df["cell"] == pc["cell"]]
        done = g[(g["status"] == "TERMINATED") & g["test_acc"].notna()]
        failed = g[g["status"] == "ERROR"]
        best = (done.sort_values(["dev_acc", "start_time", "trial_id"], ascending=[False, True, True],
                                 na_position="last").iloc[0] if len(done) else None)
        # Still to come: trials started and not ended, and planned trials not started yet.
        to_come = int((g["status"] == "RUNNING").sum()) + max(0, p.trials_per_cell - len(g))
        status = "ok" if best is not None else ("failed" if len(g) and not to_come else "pending")
        errors = list(dict.fromkeys(e for e in failed["error"] if e))
        if status == "failed" and not errors:
            errors = ["no trial reached its final report"]
        gamma2 = pc.get("gamma2")
        rows.append({**{k: pc.get(k) for k in CELL_KEYS},
                     "gamma2": float("nan") if gamma2 is None or pd.isna(gamma2) else float(gamma2),
                     "status": status,
                     "test_acc": best["test_acc"] if best is not None else float("nan"),
                     "dev_acc": best["dev_acc"] if best is not None else float("nan"),
                     "trial_id": best["trial_id"] if best is not None else "",
                     **{c: (best.get(c, "") if best is not None else "") for c in ("trial_key", "student_dir")},
                     **{c: (best.get(c, float("nan")) if best is not None else float("nan"))
                        for c in ("n_params", "teacher_params", "student_bytes")},
                     "n_trials": len(g), "n_done": len(done), "n_failed": len(failed),
                     "error": "; ".join(errors),
                     **{c: float(g[c].sum(skipna=True)) for c in (*COSTS, *SHARED_COSTS) if c in g},
                     **{c: (best[c] if best is not None else float("nan")) for c in hp_cols}})
    out = pd.DataFrame(rows, columns=list(rows[0]) if rows else [*CELL_KEYS, "status", "test_acc", "n_trials"])
    out.attrs.update(df.attrs)
    for c in ("rate", "test_acc", "dev_acc", "gamma2", "n_params", "teacher_params", "student_bytes"):
        if c in out:
            out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    return out


def as_cells(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` if it is already one row per cell, else :func:`cells` of it."""
    return df if "n_trials" in df.columns else cells(df)


def sample_std(s: pd.Series) -> float:
    """Spread over seeds: sample std (ddof=1); 0.0 with a single seed."""
    return float(s.std(ddof=1)) if s.count() > 1 else 0.0

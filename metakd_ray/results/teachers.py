"""Our teachers' accuracies: every teacher a sweep's plan lists, read from its manifest
``<storage root>/teachers/<key>/manifest.json`` (written last by ``metakd_ray.teacher.job``, so its presence means the
teacher is complete). The sweep directory is ``<storage root>/sweeps/<name>/``, so the storage root is two levels up.

A teacher whose manifest is missing (not trained yet, or the sweep directory was copied without the storage root)
gets a row of NaN with status ``missing``; a damaged manifest (not JSON, not an object, a non-numeric accuracy) gets
status ``damaged`` and one ``warning:`` line on stderr. Neither stops a report.

Only pandas and pyarrow are imported (never ray or torch).
"""

from __future__ import annotations

import json
import math
import posixpath
import sys
from typing import Any, Callable

import pandas as pd

from metakd_ray.results.load import _read_plan, open_sweep
from metakd_ray.storage import Storage
from metakd_ray.sweep.plan import Plan

TEACHERS, MANIFEST = "teachers", "manifest.json"  # teacher.artefact's layout (not imported: it pulls in torch)
TEACHER_COLUMNS = ("teacher_key", "kind", "domains", "rate", "seed", "status", "best_dev", "best_epoch")
SCORE_COLUMNS = ("kind", "domain", "rate", "seed", "teacher_key", "test_acc")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def storage_root(sweep: Storage) -> Storage | None:
    """The storage root above the sweep directory ``sweep`` (``<root>/sweeps/<name>``); None when the sweep
    directory is not inside a ``sweeps/`` folder (a copy somewhere else: pass the root explicitly)."""
    base = sweep.base.rstrip("/")
    if posixpath.basename(posixpath.dirname(base)) != "sweeps":
        return None
    if "://" in sweep.uri() or sweep.is_local:
        return Storage(sweep.uri().rstrip("/").rsplit("/", 2)[0])
    return Storage(posixpath.dirname(posixpath.dirname(base)), sweep.fs)


def _number(v: Any) -> float:
    """``v`` as a float; ValueError unless it is a number (bool excluded) or None (-> NaN)."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{v!r} is not a number")
    return float(v)


def _read_manifest(root: Storage, key: str) -> tuple[str, dict[str, float], float, float, str]:
    """(status, test accuracy by domain incl. "mean", best_dev, best_epoch, why damaged) of teacher ``key``."""
    nothing: dict[str, float] = {}
    if not root.is_file(TEACHERS, key, MANIFEST):
        return "missing", nothing, math.nan, math.nan, ""
    try:
        manifest = json.loads(root.read_bytes(TEACHERS, key, MANIFEST))
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not the manifest's object")
        test = manifest.get("test_accuracy")
        if not isinstance(test, dict):
            raise ValueError(f"test_accuracy is {test!r}, not an object of accuracies")
        accs = {str(d): _number(v) for d, v in test.items()}
        return "ok", accs, _number(manifest.get("best_dev")), _number(manifest.get("best_epoch")), ""
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return "damaged", nothing, math.nan, math.nan, " ".join(str(e).split())


def load_teachers(path: Any, *, plan: dict | None = None, root: Any = None,
                  warn: Callable[[str], None] = _warn) -> pd.DataFrame:
    """One row per teacher in the plan of the sweep at ``path`` (a sweep dir, its ``tune*/`` subdir, a URI or a
    Storage), plan order.

    Columns: teacher_key, kind, domains (comma-joined, the plan's), rate, seed, status (ok / missing / damaged),
    best_dev (dev accuracy of the exported epoch), best_epoch, ``test_acc_<domain>`` per domain any teacher lists
    and ``test_acc_mean`` (the manifest's test accuracy; NaN unless status is ok). ``plan``: plan.json as a dict
    (default: read from ``path``). ``root``: the storage root holding ``teachers/`` (default: two levels above
    the sweep directory). ``df.attrs["root"]``: the root's URI, or "" when there is none.
    """
    st = open_sweep(path)
    if plan is None:
        plan = _read_plan(st)[0] or {}
    p = Plan.from_json(plan)
    top = (root if isinstance(root, Storage) else Storage(str(root))) if root is not None else storage_root(st)
    rows, domains = [], []
    for t in p.teachers:
        key = str(t.get("key") or "")
        t_domains = [str(d) for d in (t.get("domains") or [])]
        status, accs, best_dev, best_epoch, why = ("missing", {}, math.nan, math.nan, "")
        if key and top is not None:
            status, accs, best_dev, best_epoch, why = _read_manifest(top, key)
        if status == "damaged":
            warn(f"{top.uri(TEACHERS, key, MANIFEST)} is damaged ({why}); its teacher's accuracies show as —")
        domains += [d for d in dict.fromkeys((*t_domains, *accs)) if d != "mean" and d not in domains]
        rows.append({"teacher_key": key, "kind": str(t.get("kind") or ""), "domains": ",".join(t_domains),
                     "rate": t.get("rate"), "seed": t.get("seed"), "status": status, "best_dev": best_dev,
                     "best_epoch": best_epoch, **{f"test_acc_{d}": v for d, v in accs.items()}})
    columns = [*TEACHER_COLUMNS, *(f"test_acc_{d}" for d in domains), "test_acc_mean"]
    df = pd.DataFrame(rows, columns=columns)
    for c in ("rate", "best_dev", "best_epoch", *columns[len(TEACHER_COLUMNS):]):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df.attrs["root"] = top.uri() if top is not None else ""
    return df


def teacher_scores(teachers: pd.DataFrame, plan: dict | None) -> pd.DataFrame:
    """Each teacher's test accuracy on the target domain of the cells that distil from it: one row per (teacher
    kind, target domain, rate, seed, teacher_key) of the plan's cells. test_acc is NaN when the teacher's manifest
    is missing or damaged, or has no test accuracy on that domain (a teacher trained without the target,
    ``teacher.exclude_target``)."""
    cells = Plan.from_json(plan or {}).cells
    by_key = teachers.set_index("teacher_key") if len(teachers) else None
    rows = {}
    for c in cells:
        if not c.teacher_key:
            continue
        col = f"test_acc_{c.domain}"
        acc = math.nan
        if by_key is not None and c.teacher_key in by_key.index and col in by_key.columns:
            acc = float(by_key.loc[c.teacher_key, col])
        rows.setdefault((c.teacher_kind, c.domain, c.rate, c.seed, c.teacher_key), acc)
    out = pd.DataFrame([(*k, v) for k, v in rows.items()], columns=list(SCORE_COLUMNS))
    out["test_acc"] = out["test_acc"].astype(float)
    out["rate"] = out["rate"].astype(float)
    return out

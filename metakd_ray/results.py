"""Results of a sweep, read from storage with no running Ray: a DataFrame per trial, one row per cell, the
data-scarcity curve, the paper's table and the gamma2 curve.

A sweep directory (``<storage.root>/sweeps/<name>/``) holds::

    tune/                      the Ray Tune experiment (tune-2/, tune-3/, ...: one per further wave of cells when
                               the caches exceed storage.cache_max_gb; read as one)
      experiment_state-*.json  Tune's snapshot: trial_data = [[trial JSON, runtime JSON], ...] (status, error file)
      <trial id>/params.json   the trial config: domain, rate, method, seed, gamma2, cell, hp{...}
      <trial id>/result.json   JSON lines, one per tune.report; the last of a finished trial has phase "final"
      <trial id>/error.txt     "Failure # n" blocks, one per failed attempt (it stays after a successful retry)
    config.yaml                the resolved config of the sweep (dataset, teacher, exclude_target for the table)
    plan.json                  {"cells": [{cell, domain, rate, method, seed, gamma2, teacher_key, cache_key}, ...],
                                "trials_per_cell": n, "waves": [{experiment, cells, done}, ...]}
    trial_states/<trial id>.pt the training state each trial resumes from (small once the trial is finished)
    costs.json                 {"teachers": {key: {wall_s, cpu_s, gpu_s, cells}}, "caches": {...}}
    report/                    written by report(): results.csv, cells.csv, scarcity.png, table.md, gamma2.png

Only pandas, pyarrow and matplotlib are imported (never ray), so this runs on a laptop against a copy of the
sweep directory, or straight against ``s3://`` / ``gs://`` through :class:`metakd_ray.storage.Storage`::

    python -m metakd_ray.results runs/scarcity/sweeps/scarcity [--json | --csv]
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from metakd_ray.storage import Storage

CELL_KEYS = ("cell", "domain", "rate", "method", "seed", "gamma2")
COSTS = ("wall_s", "cpu_s", "gpu_s")
SHARED_COSTS = tuple(f"{kind}_{c}" for kind in ("teacher", "cache") for c in COSTS)
FINAL = "final"

# ----------------------------------------------------------------------------------------------------------
# The paper's numbers (method doc §6): BERT-base teacher, TinyBERT 4L-312D student. Amazon per domain + mean;
# MNLI means only. Keys are our method names; teacher rows have no student method, so they are keyed by label.
# ----------------------------------------------------------------------------------------------------------

AMAZON_COLUMNS = ("books", "dvd", "electronics", "kitchen")
PAPER_AMAZON: dict[str, tuple[str, tuple[float, ...]]] = {
    # key: (the paper's row label, (books, dvd, electronics, kitchen, mean))
    "teacher:single": ("BERT-base single", (87.9, 83.8, 89.2, 90.6, 87.9)),
    "teacher:mix": ("BERT-base mix", (89.9, 85.9, 90.1, 92.1, 89.5)),
    "teacher:meta": ("meta-teacher", (92.5, 87.0, 91.1, 89.2, 89.9)),
    "single/tinybert_kd": ("single -> TinyBERT-KD", (83.4, 83.2, 89.2, 91.1, 86.7)),
    "meta/tinybert_kd": ("meta-teacher -> TinyBERT-KD", (89.9, 84.3, 87.3, 91.6, 88.3)),
    "meta/meta_kd": ("Meta-KD", (91.5, 86.5, 90.1, 89.7, 89.4)),
}
MNLI_COLUMNS = ("fiction", "government", "slate", "telephone", "travel")
PAPER_MNLI_MEAN: dict[str, tuple[str, float]] = {
    "teacher:single": ("BERT-base single", 81.9),
    "teacher:meta": ("meta-teacher", 84.4),
    "single/tinybert_kd": ("single -> TinyBERT-KD", 79.3),
    "meta/meta_kd": ("Meta-KD", 80.4),
}
METHOD_ORDER = ("none/finetune", "single/tinybert_kd", "mix/tinybert_kd", "mtl/tinybert_kd", "meta/tinybert_kd",
                "meta/meta_kd")


# ----------------------------------------------------------------------------------------------------------
# Reading one experiment
# ----------------------------------------------------------------------------------------------------------


def _open(path: Any) -> tuple[Storage, str]:
    """(storage rooted at the sweep dir, name of the Tune experiment subdir). ``path`` is the sweep dir, its
    ``tune/`` subdir, or a :class:`Storage` rooted at either."""
    st = path if isinstance(path, Storage) else Storage(str(path))
    names = st.listdir()
    if "tune" in names:
        return st, "tune"
    if any(n.startswith("experiment_state-") for n in names) or posixpath.basename(st.base) == "tune":
        name = posixpath.basename(st.base)
        if st.is_local or "://" in st.uri():
            return Storage(st.uri().rstrip("/").rsplit("/", 1)[0]), name
        return Storage(posixpath.dirname(st.base), st.fs), name
    return st, "tune"


def _experiments(st: Storage, tune: str) -> list[str]:
    """The Tune experiments of a sweep dir: ``tune``, then ``tune-2``, ``tune-3``, ... (one per wave of cells, when
    the caches did not fit the disk budget at once); just ``tune`` when that is what was asked for."""
    if tune != "tune" or not st.exists("tune"):
        return [tune]
    waves = [n for n in st.listdir() if re.fullmatch(r"tune-\d+", n)]
    return ["tune", *sorted(waves, key=lambda n: int(n.split("-")[1]))]


def _read_json(st: Storage, *parts: str) -> Any:
    return st.read_json(*parts) if st.is_file(*parts) else None


def _json_lines(text: str) -> list[dict]:
    """Tune appends to result.json while a trial runs: skip a half-written last line instead of failing."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _tune_state(st: Storage, tune: str) -> dict[str, dict]:
    """trial dir name -> {trial_id, status, config, start_time, num_failures} from the newest
    experiment_state-*.json (a restored experiment leaves one per session; the newest supersedes the rest)."""
    states = sorted(n for n in st.listdir(tune) if n.startswith("experiment_state-") and n.endswith(".json"))
    if not states:
        return {}
    raw = st.read_json(tune, states[-1])
    out: dict[str, dict] = {}
    for entry in raw.get("trial_data", []):
        trial, runtime = (list(entry) + [{}])[:2] if isinstance(entry, (list, tuple)) else (entry, {})
        trial = json.loads(trial) if isinstance(trial, str) else trial
        runtime = json.loads(runtime) if isinstance(runtime, str) else (runtime or {})
        tid = trial.get("trial_id")
        out[trial.get("relative_logdir") or tid] = {
            "trial_id": tid, "status": trial.get("status"), "config": trial.get("config") or {},
            "start_time": runtime.get("start_time"), "num_failures": runtime.get("num_failures", 0)}
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_error_line(text: str) -> str:
    """The exception line ("RuntimeError: boom") of the LAST failure in a Tune error.txt, or ""."""
    text = _ANSI.sub("", text or "")
    blocks = re.split(r"^Failure # \d+.*$", text, flags=re.M)
    lines = [ln for ln in blocks[-1].splitlines() if ln.strip()]
    if not lines:
        return ""
    # The exception line is the first unindented line after the last traceback frame ("  File ...", then its
    # indented source and caret lines); a chained exception's own traceback comes later, so "last" is right.
    frames = [i for i, ln in enumerate(lines) if ln.lstrip().startswith('File "')]
    i = frames[-1] + 1 if frames else 0
    while i < len(lines) and (lines[i][:1].isspace() or (not frames and lines[i].startswith("ray::"))):
        i += 1
    return lines[i].strip() if i < len(lines) else lines[-1].strip()


def _trial_row(st: Storage, tune: str, name: str, state: dict | None) -> dict:
    has_dir = st.exists(tune, name)
    params = (_read_json(st, tune, name, "params.json") if has_dir else None) or (state or {}).get("config") or {}
    reports = _json_lines(st.read_bytes(tune, name, "result.json").decode()) if has_dir and st.is_file(
        tune, name, "result.json") else []
    error_txt = st.read_bytes(tune, name, "error.txt").decode(errors="replace") if has_dir and st.is_file(
        tune, name, "error.txt") else ""
    last = reports[-1] if reports else {}
    final = next((r for r in reversed(reports) if r.get("phase") == FINAL), None)

    status = (state or {}).get("status")
    if final is not None:
        status = "TERMINATED"  # the trial's own final report beats a stale snapshot or an error after it
    elif not status:
        status = "ERROR" if error_txt else "RUNNING" if reports else "PENDING"
    n_failures = (state or {}).get("num_failures") or len(re.findall(r"^Failure # \d+", error_txt, flags=re.M))
    error = ""
    if status == "ERROR":
        error = first_error_line(error_txt) or "error (no error.txt in the trial directory)"

    start = (state or {}).get("start_time")
    if not isinstance(start, (int, float)) or not math.isfinite(start):
        start = reports[0].get("timestamp") if reports else None
    src = final or {}
    row = {
        **{k: params.get(k) for k in CELL_KEYS},
        "trial_id": (state or {}).get("trial_id") or last.get("trial_id") or name,
        "status": status, "error": error, "n_failures": int(n_failures or 0),
        "phase": last.get("phase", ""), "epoch": last.get("epoch"),
        "dev_acc": (final or last).get("dev_acc"), "test_acc": src.get("test_acc"), "n_train": src.get("n_train"),
        # A trial that never reached its final report still used the CPU: Tune's own clock is its wall time.
        "wall_s": src.get("wall_s", last.get("time_total_s")), "cpu_s": src.get("cpu_s"), "gpu_s": src.get("gpu_s"),
        "teacher_key": src.get("teacher_key") or "", "cache_key": src.get("cache_key") or "",
        "teacher_source": src.get("teacher_source") or "",
        "start_time": start,
    }
    for k, v in (params.get("hp") or {}).items():
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
    """One row per trial of the sweep at ``path`` (the sweep dir or its ``tune/`` subdir; a URI works).

    Columns: the cell keys (cell, domain, rate, method, seed, gamma2), trial_id, status (Tune's TERMINATED /
    ERROR / RUNNING / PENDING; a final report means TERMINATED even after a failed attempt), error (the exception
    line of the last failure of an ERROR trial, else ""), n_failures, phase, epoch, dev_acc, test_acc (NaN until
    the final report), n_train, wall_s, cpu_s, gpu_s, teacher_key, cache_key, teacher_source (cache / live / ""),
    start_time (UTC), the shared costs
    teacher_{wall,cpu,gpu}_s and cache_{wall,cpu,gpu}_s, and hp_<name> per hyper-parameter.
    ``df.attrs`` holds ``plan`` (plan.json or None), ``config`` (config.yaml as a dict, or None), ``costs`` and
    ``unattributed`` (shared cost on no row).
    """
    st, tune = _open(path)
    rows = []
    for exp in _experiments(st, tune):
        state = _tune_state(st, exp)
        names = [n for n in st.listdir(exp) if st.is_file(exp, n, "params.json") or n in state]
        names += [n for n in state if n not in names]
        rows += [_trial_row(st, exp, n, state.get(n)) for n in names]
    df = pd.DataFrame(rows, columns=list(rows[0]) if rows else [*CELL_KEYS, "trial_id", "status", "error"])
    for c in ("dev_acc", "test_acc", "wall_s", "cpu_s", "gpu_s", "rate", "gamma2"):
        if c not in df:
            df[c] = float("nan")
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["start_time"] = pd.to_datetime(pd.to_numeric(df.get("start_time", pd.Series(index=df.index, dtype=float)),
                                                    errors="coerce"), unit="s", utc=True)
    costs = _read_json(st, "costs.json") or {}
    df, unattributed = _split_shared_costs(df, costs)
    df = df.sort_values(["cell", "start_time", "trial_id"], na_position="last", kind="stable").reset_index(drop=True)
    cfg = yaml.safe_load(st.read_bytes("config.yaml")) if st.is_file("config.yaml") else None
    df.attrs.update(plan=_read_json(st, "plan.json"), config=cfg if isinstance(cfg, dict) else None, costs=costs,
                    unattributed=unattributed, sweep_dir=st.uri())
    return df


def total_cost(df: pd.DataFrame) -> dict[str, float]:
    """The sweep's total wall/cpu/gpu seconds: trials + their shares of teachers and caches + unattributed."""
    un = df.attrs.get("unattributed") or {}
    return {c: float(df[c].sum(skipna=True) + sum(df[f"{k}_{c}"].sum() + un.get(f"{k}_{c}", 0.0)
                                                 for k in ("teacher", "cache"))) for c in COSTS}


# ----------------------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------------------


def _gamma2_from_cell_id(cell: str) -> float:
    """The gamma2 axis value in a cell id "domain|rate|method|seed|gamma2" ("-" = not an axis)."""
    parts = str(cell).split("|")
    try:
        return float(parts[4]) if len(parts) >= 5 and parts[4] not in ("", "-") else float("nan")
    except ValueError:
        return float("nan")


def cells(df: pd.DataFrame, plan: dict | None = None) -> pd.DataFrame:
    """One row per planned cell (plan.json order; a cell with no trial yet still appears).

    The selected trial is the finished trial (final report) with the best dev_acc, ties to the earliest
    started; its test_acc is the cell's score. status: "ok" (a finished trial), "failed" (none finished and none
    still to come: ``error`` lists its trials' errors), "pending" (otherwise). Costs are summed over the cell's trials.
    gamma2 is the axis value (NaN when gamma2 is not an axis).
    """
    plan = plan if plan is not None else df.attrs.get("plan")
    planned = list((plan or {}).get("cells") or [])
    per_cell = int((plan or {}).get("trials_per_cell") or 0)
    known = {p["cell"] for p in planned}
    for cid, g in df.groupby("cell", sort=False):
        if cid not in known:
            first = g.iloc[0]
            planned.append({**{k: first[k] for k in CELL_KEYS}, "gamma2": _gamma2_from_cell_id(cid)})
            known.add(cid)
    hp_cols = [c for c in df.columns if c.startswith("hp_")]
    rows = []
    for p in planned:
        g = df[df["cell"] == p["cell"]]
        done = g[(g["status"] == "TERMINATED") & g["test_acc"].notna()]
        failed = g[g["status"] == "ERROR"]
        best = (done.sort_values(["dev_acc", "start_time", "trial_id"], ascending=[False, True, True],
                                 na_position="last").iloc[0] if len(done) else None)
        # Still to come: trials Tune has not ended yet, and planned trials it has not created yet.
        to_come = int(g["status"].isin(["RUNNING", "PENDING", "PAUSED"]).sum()) + max(0, per_cell - len(g))
        status = "ok" if best is not None else ("failed" if len(g) and not to_come else "pending")
        errors = list(dict.fromkeys(e for e in failed["error"] if e))
        if status == "failed" and not errors:  # e.g. every trial stopped by a scheduler before its final report
            errors = ["no trial reached its final report"]
        gamma2 = p.get("gamma2")
        row = {**{k: p.get(k) for k in CELL_KEYS},
               "gamma2": float("nan") if gamma2 is None else float(gamma2),
               "status": status,
               "test_acc": best["test_acc"] if best is not None else float("nan"),
               "dev_acc": best["dev_acc"] if best is not None else float("nan"),
               "trial_id": best["trial_id"] if best is not None else "",
               "n_trials": len(g), "n_done": len(done), "n_failed": len(failed),
               "error": "; ".join(errors),
               **{c: float(g[c].sum(skipna=True)) for c in (*COSTS, *SHARED_COSTS) if c in g},
               **{c: (best[c] if best is not None else float("nan")) for c in hp_cols}}
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(rows[0]) if rows else [*CELL_KEYS, "status", "test_acc", "n_trials"])
    out.attrs.update(df.attrs)
    for c in ("rate", "test_acc", "dev_acc", "gamma2"):
        if c in out:
            out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    return out


def _as_cells(df: pd.DataFrame) -> pd.DataFrame:
    return df if "n_trials" in df.columns else cells(df)


def _sample_std(s: pd.Series) -> float:
    """Spread over seeds: sample std (ddof=1); 0.0 with a single seed."""
    return float(s.std(ddof=1)) if s.count() > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot global state, no display needed)
# ----------------------------------------------------------------------------------------------------------


def _write(dest: Any, data: bytes) -> str:
    """Write ``data`` to ``dest``: a local path, a URI, or (internally) a (Storage, relative path) pair."""
    if isinstance(dest, tuple):
        st, name = dest
        st.write_bytes(data, name)
        return st.uri(name)
    out = str(dest)
    if "://" in out:
        root, name = out.rsplit("/", 1)
        Storage(root).write_bytes(data, name)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(data)
    return out


def _save_png(fig, out_png: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return _write(out_png, buf.getvalue())


def _line_plot(curves: pd.DataFrame, x: str, y: str, err: str, xlabel: str, ylabel: str, title: str, out_png: Any,
               xscale: tuple = ("linear",), empty_note: str = "") -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for dom, g in curves.groupby("domain", sort=False):
        g = g.sort_values(x)
        mean = dom == "mean"
        ax.errorbar(g[x], g[y], yerr=g[err], label=str(dom), marker="o", capsize=3,
                    linewidth=2.5 if mean else 1.2, color="black" if mean else None, zorder=3 if mean else 2)
    if y == "improvement":
        ax.axhline(0.0, color="grey", linewidth=0.8)
    if curves.empty:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale(xscale[0], **dict(xscale[1:]))
        ax.legend(fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save_png(fig, out_png)


def scarcity_curve(df: pd.DataFrame, out_png: Any = None, base: str = "single/tinybert_kd",
                   ours: str = "meta/meta_kd") -> pd.DataFrame:
    """Improvement rate (acc_ours - acc_base) / acc_base per domain and sample rate (paper Fig. 3).

    Computed per seed on the cells' test_acc (both cells "ok"), then mean and sample std over seeds. The
    ``domain == "mean"`` rows average the domains' rates per seed first, then over seeds. With a gamma2 axis, a
    method's cells are averaged over it. Columns: domain, rate, improvement, improvement_std, n_seeds, acc_base,
    acc_ours (means over seeds). Writes the plot to ``out_png`` when given.
    """
    c = _as_cells(df)
    c = c[(c["status"] == "ok") & c["method"].isin([base, ours])]
    cols = ["domain", "rate", "improvement", "improvement_std", "n_seeds", "acc_base", "acc_ours"]
    wide = c.pivot_table(index=["domain", "rate", "seed"], columns="method", values="test_acc", aggfunc="mean")
    if base in wide and ours in wide:
        wide = wide[[base, ours]].dropna().rename(columns={base: "acc_base", ours: "acc_ours"}).reset_index()
        wide["improvement"] = (wide["acc_ours"] - wide["acc_base"]) / wide["acc_base"]
    else:
        wide = pd.DataFrame(columns=["domain", "rate", "seed", "acc_base", "acc_ours", "improvement"])
    mean = wide.groupby(["rate", "seed"], as_index=False)[["acc_base", "acc_ours", "improvement"]].mean()
    mean["domain"] = "mean"
    per_seed = pd.concat([wide, mean], ignore_index=True) if len(wide) else wide
    rows = []
    for (dom, rate), g in per_seed.groupby(["domain", "rate"], sort=False):
        rows.append({"domain": dom, "rate": float(rate), "improvement": float(g["improvement"].mean()),
                     "improvement_std": _sample_std(g["improvement"]), "n_seeds": int(g["seed"].nunique()),
                     "acc_base": float(g["acc_base"].mean()), "acc_ours": float(g["acc_ours"].mean())})
    out = pd.DataFrame(rows, columns=cols)
    if out_png is not None:
        plot = out.assign(improvement=100 * out["improvement"], improvement_std=100 * out["improvement_std"])
        _line_plot(plot, "rate", "improvement", "improvement_std", "sample rate (log scale)",
                   f"improvement rate of {ours} over {base} (%)", "Data scarcity (mean ± std over seeds)", out_png,
                   xscale=("log",), empty_note=f"no finished ({base}, {ours}) cell pairs yet")
    return out


def gamma2_curve(df: pd.DataFrame, out_png: Any = None, method: str = "meta/meta_kd") -> pd.DataFrame:
    """Test accuracy against the gamma2 axis (paper Fig. 4), per domain and averaged over domains; mean and
    sample std over seeds, at each sample rate present (the plot uses the largest). Columns: domain, rate,
    gamma2, acc, acc_std, n_seeds."""
    c = _as_cells(df)
    c = c[(c["status"] == "ok") & (c["method"] == method) & c["gamma2"].notna()]
    cols = ["domain", "rate", "gamma2", "acc", "acc_std", "n_seeds"]
    mean = c.groupby(["rate", "gamma2", "seed"], as_index=False)["test_acc"].mean().assign(domain="mean")
    per_seed = pd.concat([c[["domain", "rate", "gamma2", "seed", "test_acc"]], mean], ignore_index=True) \
        if len(c) else c
    rows = [{"domain": d, "rate": float(r), "gamma2": float(g2), "acc": float(g["test_acc"].mean()),
             "acc_std": _sample_std(g["test_acc"]), "n_seeds": int(g["seed"].nunique())}
            for (d, r, g2), g in per_seed.groupby(["domain", "rate", "gamma2"], sort=False)]
    out = pd.DataFrame(rows, columns=cols)
    if out_png is not None:
        top = out[out["rate"] == out["rate"].max()] if len(out) else out
        plot = top.assign(acc=100 * top["acc"], acc_std=100 * top["acc_std"])
        rate = f" at rate {top['rate'].iloc[0]:g}" if len(top) else ""
        _line_plot(plot, "gamma2", "acc", "acc_std", "gamma2 (weight of the transferable-knowledge loss)",
                   "test accuracy (%)", f"{method}: accuracy vs gamma2{rate}", out_png,
                   xscale=("symlog", ("linthresh", 0.1)), empty_note="no finished gamma2 cells yet")
    return out


# ----------------------------------------------------------------------------------------------------------
# The paper's table
# ----------------------------------------------------------------------------------------------------------


def _fmt(values: pd.Series) -> str:
    v = 100 * values.dropna()
    if v.empty:
        return "—"
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def paper_table(df: pd.DataFrame) -> str:
    """Markdown: methods (rows) × target domains + mean (columns), our test accuracy in % as mean ± std over
    seeds at rate 1.0 (or the largest rate present), the paper's number in brackets where it has one (Amazon:
    per domain; MNLI: means only). The paper's teacher rows are listed for reference. The mean column averages
    the domains per seed (seeds with every column's domain only), then over seeds."""
    c = _as_cells(df)
    cfg = c.attrs.get("config") or {}
    c = c[c["status"] == "ok"]
    domains = list(dict.fromkeys(c["domain"])) if len(c) else []
    dataset = (cfg.get("data") or {}).get("dataset")
    if dataset in (None, "amazon") and domains and set(domains) <= set(AMAZON_COLUMNS):
        dataset, domains = "amazon", [d for d in AMAZON_COLUMNS if d in domains]
    elif dataset in (None, "mnli") and domains and set(domains) <= set(MNLI_COLUMNS):
        dataset, domains = "mnli", [d for d in MNLI_COLUMNS if d in domains]
    else:
        dataset = "other"
    rate = 1.0 if (c["rate"] == 1.0).any() else (c["rate"].max() if len(c) else float("nan"))
    c = c[c["rate"] == rate]
    has_gamma2 = c["gamma2"].notna().any()

    full = domains == list(AMAZON_COLUMNS if dataset == "amazon" else MNLI_COLUMNS)

    def paper(key: str, col: int | None) -> str:
        if col is None and not full:  # the paper's mean is over every domain; ours would be over a subset
            return ""
        if dataset == "amazon" and key in PAPER_AMAZON:
            return f"{PAPER_AMAZON[key][1][col if col is not None else -1]:.1f}"
        if dataset == "mnli" and key in PAPER_MNLI_MEAN and col is None:
            return f"{PAPER_MNLI_MEAN[key][1]:.1f}"
        return ""

    def cell_text(ours: str, ref: str) -> str:
        return f"{ours} ({ref})" if ref else ours

    head = ["method", *domains, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    groups = c.groupby(["method", "gamma2"], dropna=False, sort=False) if len(c) else []
    keyed = sorted(groups, key=lambda kg: (order.get(kg[0][0], len(order)), kg[0][0],
                                           -1.0 if pd.isna(kg[0][1]) else kg[0][1]))
    for (method, g2), g in keyed:
        label = method if not has_gamma2 or pd.isna(g2) else f"{method} (γ2={g2:g})"
        label += f" = {PAPER_AMAZON[method][0]}" if method in PAPER_AMAZON else ""
        by_seed = g.pivot_table(index="seed", columns="domain", values="test_acc", aggfunc="mean")
        row = [label]
        for i, d in enumerate(domains):
            row.append(cell_text(_fmt(by_seed[d]) if d in by_seed else "—", paper(method, i)))
        complete = by_seed.reindex(columns=domains).dropna()
        row.append(cell_text(_fmt(complete.mean(axis=1)) if domains else "—", paper(method, None)))
        lines.append("| " + " | ".join(row) + " |")
    if dataset in ("amazon", "mnli"):
        for key in ("teacher:single", "teacher:mix", "teacher:meta"):
            if dataset == "amazon" and key in PAPER_AMAZON:
                label, nums = PAPER_AMAZON[key]
                vals = [f"— ({nums[AMAZON_COLUMNS.index(d)]:.1f})" for d in domains] + [
                    f"— ({nums[-1]:.1f})" if full else "—"]
            elif dataset == "mnli" and key in PAPER_MNLI_MEAN:
                label, num = PAPER_MNLI_MEAN[key]
                vals = ["—"] * len(domains) + [f"— ({num:.1f})" if full else "—"]
            else:
                continue
            lines.append("| " + " | ".join([f"teacher: {label} (paper only)", *vals]) + " |")
    rate_txt = "no finished cells yet" if math.isnan(rate) else f"sample rate {rate:g}"
    teacher = (cfg.get("model") or {}).get("teacher", "default")
    teacher = "MiniLM-L6 (all-MiniLM-L6-v2), the default" if teacher == "default" else f"`{teacher}`"
    notes = [
        "",
        f"Test accuracy (%), mean ± std over seeds, {rate_txt}; the paper's number in brackets. "
        "Each cell's score is its dev-selected trial.",
        "",
        f"Ours use the configured teacher ({teacher}, not BERT-base) and a student built from "
        "it; the paper's numbers are for a BERT-base teacher and a TinyBERT 4L-312D student (Pan et al. 2021, §6 "
        "of the method doc)" + (", MNLI: means only" if dataset == "mnli" else "") + ". Teacher rows are the paper's.",
    ]
    if (cfg.get("teacher") or {}).get("exclude_target"):
        notes += ["", "teacher.exclude_target: every teacher but `single` was trained without the target domain; "
                      "the paper's numbers in brackets are its in-domain results, for reference only."]
    return "\n".join(lines + notes) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Report and CLI
# ----------------------------------------------------------------------------------------------------------


def report(path: Any, out_dir: Any = None) -> dict[str, str]:
    """Write results.csv, cells.csv, scarcity.png, table.md (and gamma2.png when gamma2 is an axis) into
    ``out_dir`` (default ``<sweep_dir>/report/``; a local path or a URI); return {file name: path or URI}."""
    return _report(path, out_dir)[0]


def _report(path: Any, out_dir: Any) -> tuple[dict[str, str], pd.DataFrame]:
    st, _ = _open(path)
    df = load_results(st)
    if df.empty and not df.attrs.get("plan"):
        raise FileNotFoundError(f"{st.uri()}: no trials and no plan.json (not a sweep directory?)")
    cell_df = cells(df)
    out = Storage(str(out_dir)) if out_dir is not None else None

    def dest(name: str) -> tuple[Storage, str]:
        return (out, name) if out is not None else (st, f"report/{name}")

    written = {
        "results.csv": _write(dest("results.csv"), df.to_csv(index=False).encode()),
        "cells.csv": _write(dest("cells.csv"), cell_df.to_csv(index=False).encode()),
        "table.md": _write(dest("table.md"), paper_table(cell_df).encode()),
    }
    scarcity_curve(cell_df, dest("scarcity.png"))
    names = ["scarcity.png"]
    if cell_df["gamma2"].notna().any():
        gamma2_curve(cell_df, dest("gamma2.png"))
        names.append("gamma2.png")
    for name in names:
        where, rel = dest(name)
        written[name] = where.uri(rel)
    return written, cell_df


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m metakd_ray.results",
                                 description="Report on a sweep directory (no Ray needed).")
    ap.add_argument("run_dir", help="the sweep directory (<storage.root>/sweeps/<name>) or its tune/ subdir")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the cells as JSON records")
    fmt.add_argument("--csv", action="store_true", help="print the cells as CSV")
    args = ap.parse_args(argv)
    run_dir = args.run_dir
    if "://" not in run_dir and not Path(run_dir).is_dir():
        print(f"error: {run_dir}: no such directory", file=sys.stderr)
        return 2
    try:
        written, cell_df = _report(run_dir, None)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(cell_df.to_json(orient="records", indent=1))
    elif args.csv:
        sys.stdout.write(cell_df.to_csv(index=False))
    else:
        sys.stdout.write(paper_table(cell_df))
    # With --json/--csv stdout is data; the paths go to stderr so a pipe gets clean JSON/CSV.
    dest = sys.stderr if (args.json or args.csv) else sys.stdout
    for name, p in written.items():
        print(f"wrote {p}", file=dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The report of a sweep: ``results.csv``, ``cells.csv``, ``table.md`` (students and our teachers beside the paper's
numbers), ``scarcity.png``, and when they apply ``gamma2.png`` (gamma2 is an axis), ``teachers.csv`` (the plan lists
teachers) and ``bootstrap.md`` (the trials wrote test-set predictions); and the ``python -m metakd_ray.results``
CLI."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd

from metakd_ray.results.bootstrap import bootstrap_report
from metakd_ray.results.load import ResultsError, cells, load_results, open_sweep
from metakd_ray.results.plots import gamma2_curve, scarcity_curve, write
from metakd_ray.results.tables import paper_table, per_seed
from metakd_ray.results.teachers import load_teachers
from metakd_ray.storage import Storage


def report(path: Any, out_dir: Any = None) -> dict[str, str]:
    """Write results.csv, cells.csv, per_seed.csv (``tables.per_seed``), scarcity.png, table.md (and gamma2.png when gamma2 is an axis, teachers.csv
    when the plan lists teachers, bootstrap.md when trials wrote predictions) into ``out_dir`` (default
    ``<sweep_dir>/report/``; a local path or a URI); return {file name: path or URI}."""
    return _report(path, out_dir)[0]


def _report(path: Any, out_dir: Any) -> tuple[dict[str, str], pd.DataFrame, str]:
    st = open_sweep(path)
    df = load_results(st)
    if df.empty and not df.attrs.get("plan"):
        raise FileNotFoundError(f"{st.uri()}: no trials and no plan.json (not a sweep directory?)")
    cell_df = cells(df)
    out = Storage(str(out_dir)) if out_dir is not None else None

    def dest(name: str) -> tuple[Storage, str]:
        return (out, name) if out is not None else (st, f"report/{name}")

    teachers = load_teachers(st, plan=df.attrs.get("plan") or {})
    table = paper_table(cell_df, teachers)
    written = {
        "results.csv": write(dest("results.csv"), df.to_csv(index=False).encode()),
        "cells.csv": write(dest("cells.csv"), cell_df.to_csv(index=False).encode()),
        "table.md": write(dest("table.md"), table.encode()),
    }
    written["per_seed.csv"] = write(dest("per_seed.csv"), per_seed(cell_df, teachers).to_csv(index=False).encode())
    if len(teachers):
        written["teachers.csv"] = write(dest("teachers.csv"), teachers.to_csv(index=False).encode())
    boot = bootstrap_report(st, cell_df)
    if boot is not None:
        written["bootstrap.md"] = write(dest("bootstrap.md"), boot.encode())
    scarcity_curve(cell_df, dest("scarcity.png"))
    names = ["scarcity.png"]
    if cell_df["gamma2"].notna().any():
        gamma2_curve(cell_df, dest("gamma2.png"))
        names.append("gamma2.png")
    for name in names:
        where, rel = dest(name)
        written[name] = where.uri(rel)
    return written, cell_df, table


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
        written, cell_df, table = _report(run_dir, None)
    except (FileNotFoundError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(cell_df.to_json(orient="records", indent=1))
    elif args.csv:
        sys.stdout.write(cell_df.to_csv(index=False))
    else:
        sys.stdout.write(table)
    # With --json/--csv stdout is data; the paths go to stderr so a pipe gets clean JSON/CSV.
    dest = sys.stderr if (args.json or args.csv) else sys.stdout
    for name, p in written.items():
        print(f"wrote {p}", file=dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Publishing sweeps' results (e.g. into ``docs/results/``) and summarizing the published files as markdown.

``python -m metakd_ray.results.publish export RUN_DIR OUT_DIR [--name NAME]`` writes ``<NAME>.csv`` (one row per cell
and seed: ``tables.per_seed``, the report's ``per_seed.csv``), ``<NAME>-costs.csv`` (stage, items, wall_s, cpu_s,
gpu_s per stage: teachers, caches, trials, total) and the figures that apply (``<NAME>-scarcity.png`` when the sweep
has both methods the curve compares at two rates or more, ``<NAME>-gamma2.png``, ``<NAME>-bootstrap.md``), all made
by ``results.report``.
Every file goes to a temporary name in OUT_DIR first and is renamed at the end: a failure leaves nothing behind.

``python -m metakd_ray.results.publish summarize DIR [--write FILE]`` reads whichever of ``amazon-table.csv``,
``scarcity.csv``, ``mnli-table.csv``, ``gamma2.csv`` (and their ``-costs.csv``) DIR holds and prints markdown: the
Amazon and MNLI tables beside the paper's numbers, the scarcity curve, the gamma2 curve, the costs and the targets
(each built by ``results.paper``).

No Ray, no torch: pandas (and matplotlib for the figures, through ``results.report``).
"""

from __future__ import annotations

import math
import os
import posixpath
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from metakd_ray.results.load import COSTS, ResultsError, load_results, open_sweep
from metakd_ray.results.paper import PRESETS, costs_md, gamma2_table, main_table, md_table, scarcity_table, targets
from metakd_ray.results.plots import SCARCITY_BASE, SCARCITY_OURS
from metakd_ray.results.report import report
from metakd_ray.results.tables import PER_SEED_COLUMNS

COST_COLUMNS = ("stage", "items", *COSTS)
FIGURES = ("scarcity.png", "gamma2.png", "bootstrap.md")
SORT_KEYS = ["sample_rate", "domain", "teacher", "method", "gamma2", "seed"]


class PublishError(ValueError):
    """Bad input for publish (no such directory, not a sweep, a CSV without the per-seed columns): one line."""


def _atomic_write(files: dict[Path, Any]) -> None:
    """Write each {destination: bytes or source Path} to a temporary name beside it, then rename them all; on any
    failure remove the temporaries and re-raise (a destination already there is left as it was)."""
    temps: list[tuple[Path, Path]] = []
    try:
        for dest, data in files.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
            temps.append((tmp, dest))
            with open(tmp, "xb") as f:
                if isinstance(data, Path):
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, f)
                else:
                    f.write(data)
        for tmp, dest in temps:
            os.replace(tmp, dest)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def costs_table(df: pd.DataFrame) -> pd.DataFrame:
    """Stage costs of a sweep from ``load_results``'s frame: ``teachers`` and ``caches`` from costs.json
    (``df.attrs["costs"]``, items = its entries), ``trials`` summed over the trial rows (items = trials; their own
    wall_s, cpu_s, gpu_s, not the shares of teachers and caches), and ``total`` = their sum; seconds rounded to 0.1."""
    costs = df.attrs.get("costs") or {}
    rows = []
    for stage in ("teachers", "caches"):
        entries = (costs.get(stage) or {}).values()
        rows.append({"stage": stage, "items": len(entries),
                     **{c: sum(float(e.get(c) or 0.0) for e in entries) for c in COSTS}})
    rows.append({"stage": "trials", "items": len(df), **{c: float(df[c].sum(skipna=True)) for c in COSTS}})
    out = pd.DataFrame(rows, columns=list(COST_COLUMNS))
    total = {"stage": "total", "items": int(out["items"].sum()), **{c: float(out[c].sum()) for c in COSTS}}
    out = pd.concat([out, pd.DataFrame([total])], ignore_index=True)
    out[list(COSTS)] = out[list(COSTS)].round(1)
    return out


def _sweep_name(df: pd.DataFrame, run_dir: str) -> str:
    name = (df.attrs.get("config") or {}).get("name")
    return str(name) if name else posixpath.basename(str(df.attrs.get("sweep_dir") or run_dir).rstrip("/"))


def export(run_dir: Any, out_dir: Any, name: str | None = None) -> dict[str, Path]:
    """Export the sweep at ``run_dir`` into ``out_dir`` as ``<name>.csv``, ``<name>-costs.csv`` and the figures that
    apply (module docstring); ``name`` defaults to the sweep's (config.yaml's ``name``, else the directory's). Returns
    {file name: path}. :class:`PublishError` / :class:`ResultsError` when ``run_dir`` is not a sweep: nothing
    written."""
    run_dir = str(run_dir)
    if "://" not in run_dir and not Path(run_dir).is_dir():
        raise PublishError(f"{run_dir}: no such directory")
    df = load_results(open_sweep(run_dir))
    if df.empty and not df.attrs.get("plan"):
        raise PublishError(f"{run_dir}: no trials and no plan.json (not a sweep directory?)")
    name = name or _sweep_name(df, run_dir)
    if not name or "/" in name or name.startswith("."):
        raise PublishError(f"{name!r}: not a usable file name (--name)")
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="metakd-publish-") as tmp:
        try:
            written = report(run_dir, tmp)
        except FileNotFoundError as e:
            raise PublishError(str(e)) from None
        rows = pd.read_csv(Path(tmp) / "per_seed.csv")
        rows = rows.sort_values(SORT_KEYS, kind="stable", na_position="first", ignore_index=True)
        files: dict[Path, Any] = {
            out / f"{name}.csv": rows[list(PER_SEED_COLUMNS)].to_csv(index=False).encode(),
            out / f"{name}-costs.csv": costs_table(df).to_csv(index=False).encode(),
        }
        for fig in FIGURES:
            if fig in written and figure_applies(fig, rows):
                stem, ext = fig.rsplit(".", 1)
                files[out / f"{name}-{stem}.{ext}"] = Path(tmp) / fig
        _atomic_write(files)
    return {p.name: p for p in files}


def figure_applies(fig: str, rows: pd.DataFrame) -> bool:
    """Whether the report's figure ``fig`` says something about a sweep with these per-seed ``rows``: the scarcity
    curve needs students of both of its methods (a gamma2 or ablation sweep of Meta-KD alone has none to compare;
    its report still draws the empty placeholder a running sweep shows) at two sample rates or more (a full-data
    table or a one-rate run is one point per domain: its table and bootstrap say it). Every other figure is written
    only when it applies already."""
    if fig != "scarcity.png":
        return True
    keys = rows["teacher"].astype(str) + "/" + rows["method"].astype(str)
    students = rows[keys.isin([SCARCITY_BASE, SCARCITY_OURS])]
    return set(keys) >= {SCARCITY_BASE, SCARCITY_OURS} and students["sample_rate"].nunique() >= 2


def read_frames(directory: Any) -> dict[str, pd.DataFrame]:
    """{preset: its per-seed rows} and {"<preset>-costs": its cost rows} for each of :data:`PRESETS` whose CSV is in
    ``directory``; :class:`PublishError` for a CSV without the expected columns."""
    d = Path(directory)
    if not d.is_dir():
        raise PublishError(f"{directory}: no such directory")
    frames = {}
    for preset in PRESETS:
        for key, cols in ((preset, PER_SEED_COLUMNS), (f"{preset}-costs", COST_COLUMNS)):
            path = d / f"{key}.csv"
            if not path.is_file():
                continue
            try:
                f = pd.read_csv(path)
            except (ValueError, pd.errors.ParserError) as e:
                raise PublishError(f"{path}: not a CSV ({' '.join(str(e).split())})") from None
            missing = [c for c in cols if c not in f.columns]
            if missing:
                raise PublishError(f"{path}: missing column(s) {', '.join(missing)}")
            frames[key] = f
    return frames


def summarize(directory: Any) -> str:
    """The markdown summary of the published CSVs in ``directory`` (module docstring)."""
    frames = read_frames(directory)
    d = Path(directory)
    parts = [f"# Results summary ({d})", ""]

    def section(title: str, preset: str, build) -> None:
        parts.extend([f"## {title}", ""])
        if preset not in frames:
            parts.extend([f"not run (no `{preset}.csv` in {d})", ""])
            return
        parts.extend([f"From `{preset}.csv`.", "", *build(frames[preset]), ""])

    section("Amazon table", "amazon-table", lambda f: main_table(f, "amazon") + [
        "", "Test accuracy (%) at sample rate 1.0, mean ± std over seeds; the paper's number (method doc §6) in "
            "brackets, — where it has none."])
    section("MNLI table", "mnli-table", lambda f: main_table(f, "mnli") + [
        "", "Test accuracy (%) at sample rate 1.0, mean ± std over seeds; the paper's mean in brackets (it gives "
            "MNLI means only)."])
    section("Scarcity", "scarcity", scarcity_table)
    section("gamma2", "gamma2", gamma2_table)
    parts += ["## Costs", ""]
    have = [f"`{p}-costs.csv`" for p in PRESETS if f"{p}-costs" in frames]
    parts += ([f"From {', '.join(have)}.", "", *costs_md(frames), ""] if have else ["not run (no -costs.csv)", ""])
    t = targets(frames)
    parts += ["## Targets", "", "From " + ", ".join(f"`{p}.csv`" for p in PRESETS if p in frames) + "; values in "
              "percentage points (scarcity: the improvement rate in %), means over seeds and domains."
              if any(p in frames for p in PRESETS) else "No per-seed CSV found.", ""]
    parts += md_table(["target", "our value", "met"], [
        [r.target, "—" if math.isnan(r.value) else f"{r.value:+.1f}", r.met] for r in t.itertuples()])
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m metakd_ray.results.publish",
                                 description="Publish sweeps' results and summarize them (no Ray needed).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write <NAME>.csv, <NAME>-costs.csv and the figures into OUT_DIR")
    ex.add_argument("run_dir", help="the sweep directory (<storage.root>/sweeps/<name>)")
    ex.add_argument("out_dir", help="where to write (e.g. docs/results)")
    ex.add_argument("--name", help="the files' stem (default: the sweep's name)")
    sm = sub.add_parser("summarize", help="markdown summary of the published CSVs in DIR")
    sm.add_argument("dir")
    sm.add_argument("--write", metavar="FILE", help="also write the markdown to FILE (atomically)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            for p in export(args.run_dir, args.out_dir, args.name).values():
                print(f"wrote {p}")
        else:
            text = summarize(args.dir)
            if args.write:
                _atomic_write({Path(args.write): text.encode()})
            sys.stdout.write(text)
    except (PublishError, ResultsError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

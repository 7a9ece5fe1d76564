"""Publishing sweeps' results (e.g. into ``docs/results/``) and summarizing the published files as markdown.

``python -m metakd_ray.results.publish export RUN_DIR OUT_DIR [--name NAME]`` writes ``<NAME>.csv`` (one row per cell
and seed: ``tables.per_seed``, the report's ``per_seed.csv``), ``<NAME>-costs.csv`` (stage, items, wall_s, cpu_s,
gpu_s per stage: teachers, caches, trials, total) and the figures that apply (``<NAME>-scarcity.png``,
``<NAME>-gamma2.png``, ``<NAME>-bootstrap.md``), all made by ``results.report``. Every file goes to a temporary name in
OUT_DIR first and is renamed at the end: a failure leaves nothing behind.

``python -m metakd_ray.results.publish summarize DIR [--write FILE]`` reads whichever of ``amazon-table.csv``,
``scarcity.csv``, ``mnli-table.csv``, ``gamma2.csv`` (and their ``-costs.csv``) DIR holds and prints markdown: the
Amazon and MNLI tables beside the paper's numbers, the scarcity curve, the gamma2 curve, the costs and the targets.

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
from metakd_ray.results.plots import gamma2_curve, scarcity_curve
from metakd_ray.results.report import report
from metakd_ray.results.tables import (AMAZON_COLUMNS, METHOD_ORDER, MNLI_COLUMNS, PAPER_AMAZON, PAPER_MNLI_MEAN,
                                       PER_SEED_COLUMNS, _fmt)

PRESETS = ("amazon-table", "scarcity", "mnli-table", "gamma2")
COST_COLUMNS = ("stage", "items", *COSTS)
FIGURES = ("scarcity.png", "gamma2.png", "bootstrap.md")
TEACHER_KINDS = ("single", "mix", "mtl", "meta")
METAKD, BASE, META_TINY = "meta/meta_kd", "single/tinybert_kd", "meta/tinybert_kd"
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
            if fig in written:
                stem, ext = fig.rsplit(".", 1)
                files[out / f"{name}-{stem}.{ext}"] = Path(tmp) / fig
        _atomic_write(files)
    return {p.name: p for p in files}


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


def _keyed(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``key``: "teacher:<kind>" for a teacher's row, else "<teacher>/<method>" (the cells' method)."""
    return rows.assign(key=[f"teacher:{t}" if m == "teacher" else f"{t}/{m}"
                            for t, m in zip(rows["teacher"], rows["method"])])


def _by_seed(rows: pd.DataFrame, domains: list[str] | None = None) -> pd.DataFrame:
    """seed × domain test accuracy (fractions; a gamma2 axis averaged), restricted to ``domains`` when given."""
    if rows.empty:
        return pd.DataFrame(columns=domains or [], dtype=float)
    wide = rows.pivot_table(index="seed", columns="domain", values="test_acc", aggfunc="mean")
    return wide.reindex(columns=domains) if domains is not None else wide


def _domain_mean(rows: pd.DataFrame, domains: list[str] | None = None) -> pd.Series:
    """Per seed: the mean over ``domains`` (seeds that have every one of them), else over the domains it has."""
    wide = _by_seed(rows, domains)
    return wide.dropna().mean(axis=1) if domains is not None else wide.mean(axis=1)


def _row_order(keys: set[str]) -> list[str]:
    """Our teachers (single, mix, mtl, meta), the student methods in METHOD_ORDER, then any other key, sorted."""
    fixed = [f"teacher:{k}" for k in TEACHER_KINDS] + list(METHOD_ORDER)
    return fixed + sorted(keys - set(fixed))


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; a "|" inside a cell is escaped."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def _label(key: str) -> str:
    return f"{key.split(':', 1)[1]} teacher" if key.startswith("teacher:") else key


def main_table(rows: pd.DataFrame, dataset: str) -> list[str]:
    """Markdown lines: our teachers then the student methods × the dataset's domains + mean, at sample rate 1.0;
    each cell "ours (paper)", ours = test accuracy in %, mean over seeds (± sample std with more than one seed); the
    mean column averages the domains the file has per seed (seeds with all of them), then over seeds; paper "—"
    where it has no number. A note follows when the file lacks some of the dataset's domains."""
    columns = list(AMAZON_COLUMNS if dataset == "amazon" else MNLI_COLUMNS)
    rows = _keyed(rows[rows["sample_rate"] == 1.0])
    present = [d for d in columns if d in set(rows["domain"])]
    keys, lines = set(rows["key"]), []
    for key in _row_order(keys):
        paper: list[float | None] = [None] * (len(columns) + 1)
        if dataset == "amazon" and key in PAPER_AMAZON:
            paper = list(PAPER_AMAZON[key][1])
        elif dataset == "mnli" and key in PAPER_MNLI_MEAN:
            paper[-1] = PAPER_MNLI_MEAN[key][1]
        if key not in keys and all(p is None for p in paper):
            continue
        g = rows[rows["key"] == key]
        wide = _by_seed(g, columns)
        ours = [_fmt(wide[d]) for d in columns] + [_fmt(_domain_mean(g, present))]
        lines.append([_label(key)] + [f"{o} ({'—' if p is None else f'{p:.1f}'})" for o, p in zip(ours, paper)])
    note = [] if len(present) in (0, len(columns)) else [
        "", f"Our mean is over {', '.join(present)} only; the paper's is over all {len(columns)} domains."]
    return _md(["method", *columns, "mean"], lines) + note


def as_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-seed student rows as the finished cells the report's curve functions take (``plots``)."""
    s = rows[rows["method"] != "teacher"]
    return pd.DataFrame({"domain": s["domain"], "rate": s["sample_rate"].astype(float),
                         "method": s["teacher"] + "/" + s["method"], "seed": s["seed"],
                         "gamma2": s["gamma2"].astype(float), "test_acc": s["test_acc"].astype(float),
                         "status": "ok", "n_trials": 1})


def improvement(rows: pd.DataFrame) -> pd.DataFrame:
    """The improvement rate of Meta-KD (meta/meta_kd) over single/tinybert_kd per sample rate: for each seed, per
    domain (acc_MetaKD − acc_base) / acc_base on test accuracy, averaged over the domains where both cells exist;
    then mean and sample std (0 with one seed) over seeds — ``plots.scarcity_curve``'s ``domain == "mean"`` rows.
    Columns: rate, improvement, improvement_std (fractions), n_seeds."""
    curve = scarcity_curve(as_cells(rows), base=BASE, ours=METAKD)
    curve = curve[curve["domain"] == "mean"]
    return curve[["rate", "improvement", "improvement_std", "n_seeds"]].sort_values("rate", ignore_index=True)


def _pm(mean: float, std: float, n: int, scale: float = 100.0) -> str:
    return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if n > 1 else "")


def scarcity_table(rows: pd.DataFrame) -> list[str]:
    """Markdown lines: mean test accuracy (%) of each method per sample rate (domain mean per seed, then mean over
    seeds), and Meta-KD's improvement rate (:func:`improvement`) with its number of seeds."""
    rows = _keyed(rows)
    rates = sorted(rows["sample_rate"].unique())
    keys = set(rows["key"])
    body = []
    for key in [k for k in _row_order(keys) if k in keys]:
        g = rows[rows["key"] == key]
        body.append([_label(key)] + [_fmt(_domain_mean(g[g["sample_rate"] == r])) if (g["sample_rate"] == r).any()
                                     else "—" for r in rates])
    imp = improvement(rows).set_index("rate")
    body.append([f"improvement rate of {METAKD} over {BASE} (%)"] + [
        _pm(imp.at[r, "improvement"], imp.at[r, "improvement_std"], int(imp.at[r, "n_seeds"])) if r in imp.index
        else "—" for r in rates])
    body.append(["n seeds (improvement rate)"] + [str(int(imp.at[r, "n_seeds"])) if r in imp.index else "0"
                                                  for r in rates])
    return _md(["method", *[f"r={r:g}" for r in rates]], body) + [
        "", f"Test accuracy (%): mean over domains per seed, then mean ± std over seeds. Improvement rate: per seed, "
            f"(acc_MetaKD − acc_base) / acc_base per domain (Meta-KD = {METAKD}, base = {BASE}), averaged over the "
            "domains with both; then mean ± std over seeds (in %)."]


def gamma2_table(rows: pd.DataFrame) -> list[str]:
    """Markdown lines: Meta-KD's test accuracy (%) per gamma2 value and sample rate (``plots.gamma2_curve``: mean
    over domains per seed, then mean ± std over seeds)."""
    curve = gamma2_curve(as_cells(rows), method=METAKD)
    curve = curve[curve["domain"] == "mean"].sort_values(["rate", "gamma2"])
    body = [[f"{g2:g}", f"{r:g}", _pm(a, s, int(n)), str(int(n))]
            for g2, r, a, s, n in zip(curve["gamma2"], curve["rate"], curve["acc"], curve["acc_std"],
                                      curve["n_seeds"])]
    return _md(["gamma2", "sample rate", f"{METAKD} test accuracy (%)", "n seeds"], body)


def costs_md(frames: dict[str, pd.DataFrame]) -> list[str]:
    body = []
    for preset in PRESETS:
        f = frames.get(f"{preset}-costs")
        if f is None:
            continue
        for _, r in f.iterrows():
            body.append([preset, str(r["stage"]), str(int(r["items"]))] +
                        [f"{float(r[c]) / 3600:.2f}" for c in COSTS])
    return _md(["preset", "stage", "items", "wall h", "CPU h", "GPU h"], body)


def _paired(rows: pd.DataFrame, a: str, b: str) -> float:
    """Mean over seeds of the domain-mean of (acc_a − acc_b) in percentage points, on the (domain, seed) pairs
    where both rows exist (``a``/``b`` are row keys: "teacher:meta", "meta/meta_kd", ...); NaN when none."""
    rows = _keyed(rows)
    ga, gb = rows[rows["key"] == a], rows[rows["key"] == b]
    diff = (_by_seed(ga).stack() - _by_seed(gb).stack()).dropna() if len(ga) and len(gb) else pd.Series()
    if diff.empty:
        return float("nan")
    return float(100 * diff.groupby(level="seed").mean().mean())


def targets(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The targets, from the per-seed frames ({preset: rows}); columns target, value, met ("yes", "no", "not run").

    Amazon and MNLI (``amazon-table`` / ``mnli-table`` rows at sample rate 1.0), values in percentage points as
    :func:`_paired` differences (means over seeds and domains): a) meta teacher − mix teacher ≥ 0; b) Meta-KD −
    single/tinybert_kd ≥ 1.5; c) Meta-KD − meta/tinybert_kd ≥ 0; d) Meta-KD − meta teacher ≥ −1.0 (a student above
    its teacher meets it). e) ``scarcity``:
    Meta-KD's :func:`improvement` rate (%) > 0 at each sample rate ≤ 0.1 (a row per rate present)."""
    out = []

    def add(target: str, value: float | None, ok) -> None:
        met = "not run" if value is None or math.isnan(value) else ("yes" if ok(value) else "no")
        out.append({"target": target, "value": float("nan") if value is None else value, "met": met})

    def table(preset: str, ds: str, letters: str, tag: str) -> None:
        f = frames.get(preset)
        rows = f[f["sample_rate"] == 1.0] if f is not None else None

        def diff(a: str, b: str) -> float:
            return float("nan") if rows is None else _paired(rows, a, b)

        specs = {"a": (f"{ds}: meta teacher − mix teacher ≥ 0 pp", diff("teacher:meta", "teacher:mix"),
                       lambda v: v >= 0),
                 "b": (f"{ds}: Meta-KD − single/tinybert_kd ≥ 1.5 pp", diff(METAKD, BASE), lambda v: v >= 1.5),
                 "c": (f"{ds}: Meta-KD − meta/tinybert_kd ≥ 0 pp", diff(METAKD, META_TINY), lambda v: v >= 0),
                 "d": (f"{ds}: Meta-KD − meta teacher ≥ −1.0 pp (within 1.0 point of its teacher)",
                       diff(METAKD, "teacher:meta"), lambda v: v >= -1.0)}
        for letter in letters:
            text, value, ok = specs[letter]
            add(f"{tag}{letter}) {text}", value, ok)

    table("amazon-table", "Amazon", "abcd", "")
    s = frames.get("scarcity")
    imp = improvement(s) if s is not None else pd.DataFrame(columns=["rate", "improvement"])
    imp = imp[imp["rate"] <= 0.1]
    if imp.empty:
        add("e) scarcity: Meta-KD improvement rate > 0 % at every rate ≤ 0.1", None, None)
    for r, v in zip(imp["rate"], imp["improvement"]):
        add(f"e) scarcity: Meta-KD improvement rate > 0 % at r={r:g}", 100 * float(v), lambda x: x > 0)
    table("mnli-table", "MNLI", "abc", "f")
    return pd.DataFrame(out, columns=["target", "value", "met"])


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
    parts += _md(["target", "our value", "met"], [
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

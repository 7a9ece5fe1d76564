"""``python -m metakd_ray.results.students RUN_DIR OUT_DIR [--method meta/meta_kd] [--rate 1.0]``: the students a
user ships — for each target domain, the kept student of ``--method``'s dev-best cell at ``--rate`` (over seeds;
selected on dev accuracy, never on test) copied to ``OUT_DIR/<domain>/``: a stock ``transformers`` folder
(``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``, or
``python -m metakd_ray.predict``), plus ``OUT_DIR/students.csv`` (domain, method, rate, seed, dev_acc, test_acc,
n_params, teacher_params, student_mb, source). Each folder is copied to a temporary name and renamed when complete
(replacing an earlier copy). Errors: one ``error:`` line, exit 2."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from metakd_ray.results.load import ResultsError, cells, load_results

COLUMNS = ["domain", "method", "rate", "seed", "dev_acc", "test_acc", "n_params", "teacher_params", "student_mb",
           "source"]


def best_students(df: pd.DataFrame, method: str, rate: float) -> pd.DataFrame:
    """One row per domain: the finished cell of ``method`` at ``rate`` with the highest dev accuracy (ties: the
    lowest seed) that kept a student (``student_dir``)."""
    c = df[(df["method"] == method) & (df["rate"].astype(float) == float(rate)) & (df["status"] == "ok")]
    c = c[c["student_dir"].notna() & (c["student_dir"].astype(str) != "")]
    if c.empty:
        raise ResultsError(f"no finished {method} cell at rate {rate:g} kept a student (storage.keep_students: none?)")
    c = c.sort_values(["domain", "dev_acc", "seed"], ascending=[True, False, True])
    return c.groupby("domain", sort=True).head(1).reset_index(drop=True)


def _copy(source: str, dest: Path) -> None:
    """``source`` (a local folder or a URI) to ``dest``, whole or not at all."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if "://" in source:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(source)
            pafs.copy_files(path, str(tmp / "m"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            shutil.copytree(source, tmp / "m")
        if dest.exists():
            shutil.rmtree(dest)
        (tmp / "m").chmod(0o755)  # mkdtemp's 0700 is for the temporary name only
        (tmp / "m").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_students(run_dir: str, out_dir: str | Path, method: str = "meta/meta_kd", rate: float = 1.0) -> pd.DataFrame:
    """Copy each domain's best ``method`` student of the sweep at ``run_dir`` into ``out_dir``; return (and write
    as ``students.csv``) the table of :data:`COLUMNS`."""
    best = best_students(cells(load_results(run_dir)), method, rate)
    out = Path(out_dir)
    rows = []
    for r in best.itertuples():
        dest = out / str(r.domain)
        _copy(str(r.student_dir), dest)
        size = sum(f.stat().st_size for f in dest.rglob("*.safetensors"))
        rows.append({"domain": r.domain, "method": method, "rate": float(rate), "seed": int(r.seed),
                     "dev_acc": r.dev_acc, "test_acc": r.test_acc, "n_params": r.n_params,
                     "teacher_params": r.teacher_params, "student_mb": round(size / 1e6, 1),
                     "source": str(r.student_dir)})
    table = pd.DataFrame(rows, columns=COLUMNS)
    tmp = out / ".students.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "students.csv")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.results.students", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="the sweep directory (<storage.root>/sweeps/<name>)")
    ap.add_argument("out_dir", help="where each domain's student folder goes")
    ap.add_argument("--method", default="meta/meta_kd", help="the student method (default: meta/meta_kd)")
    ap.add_argument("--rate", type=float, default=1.0, help="the sample rate (default: 1.0)")
    args = ap.parse_args(argv)
    if "://" not in args.run_dir and not Path(args.run_dir).is_dir():
        print(f"error: {args.run_dir}: no such directory", file=sys.stderr)
        return 2
    try:
        table = export_students(args.run_dir, args.out_dir, args.method, args.rate)
    except (FileNotFoundError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in table.itertuples():
        print(f"{r.domain}: {Path(args.out_dir) / r.domain} (seed {r.seed}, dev {100 * r.dev_acc:.1f} %, test "
              f"{100 * r.test_acc:.1f} %, {r.n_params / 1e6:.1f}M parameters, {r.student_mb} MB)")
    print(f"wrote {Path(args.out_dir) / 'students.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

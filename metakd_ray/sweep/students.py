"""What a finished trial keeps besides its record, and the pruning of students no cell selected.

Under ``sweeps/<name>/`` (the sweep's storage), per trial key (``sweep/records.py``)::

    students/<key>/                  the trial's dev-best student as a stock ``transformers`` folder
                                     (``metakd_ray.export``: config.json with auto_map, model.safetensors,
                                     modeling_metakd.py, tokenizer files, metakd_export.json with the cell,
                                     method, rate, seed, accuracies)
    trials/<key>.predictions.parquet its test-set predictions: id (string), label, pred (int64), probs
                                     (list<float32>), in test-loader order
    trials/<key>.config.yaml         its resolved config (the sweep's config + its cell + its tuned values)

All three are written before the trial's final record, so a trial whose record is final has them (the student
unless ``storage.keep_students`` is ``none``). The student folder is written whole or not at all: on a local root
``export_student`` renames a finished temporary folder into place; on object storage it is exported locally, then
uploaded, and ``metakd_export.json`` — the file that says an export is complete — is uploaded last.

``storage.keep_students``: ``selected`` (default) removes, once a cell's trials have all ended, the students of the
trials the cell did not select (``results.cells``: best dev accuracy); ``all`` keeps every one; ``none`` exports
none. Each student's size on storage is in its trial's final report (``student_bytes``).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from metakd_ray.storage import Storage
from metakd_ray.sweep.records import STUDENT_DONE as COMPLETE_FILE
from metakd_ray.sweep.records import STUDENTS, TRIALS
from metakd_ray.training import Predictions

PREDICTIONS_SUFFIX = ".predictions.parquet"
CONFIG_SUFFIX = ".config.yaml"


def predictions_table(p: Predictions) -> pa.Table:
    """The predictions file's table: id, label, pred, probs."""
    return pa.table({"id": pa.array(p.ids, pa.string()), "label": pa.array(p.labels, pa.int64()),
                     "pred": pa.array(p.preds, pa.int64()),
                     "probs": pa.array(list(p.probs), pa.list_(pa.float32()))})


def write_predictions(sweep: Storage, key: str, p: Predictions) -> None:
    buf = io.BytesIO()
    pq.write_table(predictions_table(p), buf)
    sweep.write_bytes(buf.getvalue(), TRIALS, f"{key}{PREDICTIONS_SUFFIX}")


def write_config(sweep: Storage, key: str, resolved: Mapping[str, Any]) -> None:
    sweep.write_bytes(yaml.safe_dump(dict(resolved), sort_keys=False).encode(), TRIALS, f"{key}{CONFIG_SUFFIX}")


def export_to(sweep: Storage, key: str, student: Any, tokenizer: Any, label_names: Sequence[str], *,
              max_length: int, metadata: Mapping[str, Any]) -> tuple[str, int]:
    """Export ``student`` to ``students/<key>/``; returns (its URI, its bytes on storage)."""
    from metakd_ray.export import export_student

    if sweep.is_local:
        export_student(student, tokenizer, sweep.local_path(STUDENTS, key), label_names,
                       extra_metadata=metadata, max_length=max_length)
    else:
        with tempfile.TemporaryDirectory(prefix="metakd-student-") as tmp:
            folder = export_student(student, tokenizer, Path(tmp) / key, label_names, extra_metadata=metadata,
                                    max_length=max_length)
            done = (folder / COMPLETE_FILE).read_bytes()
            (folder / COMPLETE_FILE).unlink()
            sweep.upload_dir(folder, STUDENTS, key)
            sweep.write_bytes(done, STUDENTS, key, COMPLETE_FILE)
    return sweep.uri(STUDENTS, key), sweep.tree_size(STUDENTS, key)


def has_student(sweep: Storage, key: str) -> bool:
    return sweep.is_file(STUDENTS, key, COMPLETE_FILE)


def prune(sweep: Storage, keep: Iterable[str], cells_done: Iterable[str], trial_cells: Mapping[str, str]) -> list[str]:
    """Remove the students of the trials of ``cells_done`` whose key is not in ``keep``; returns their keys.
    ``trial_cells``: trial key -> cell id."""
    keep, done = set(keep), set(cells_done)
    gone = [k for k in sweep.listdir(STUDENTS)
            if not k.startswith(".") and trial_cells.get(k) in done and k not in keep]
    for k in gone:
        sweep.delete(STUDENTS, k)
    return gone


def prune_unselected(sweep_dir: str, cell_ids: Iterable[str]) -> list[str]:
    """``keep_students: selected``: remove the students of the trials the ``cell_ids`` did not select (call when
    those cells' trials have all ended)."""
    from metakd_ray.results import cells, load_results

    df = load_results(sweep_dir)
    if not len(df):
        return []
    selected = cells(df)
    keep = {k for k in selected.get("trial_key", []) if isinstance(k, str) and k}
    return prune(Storage(sweep_dir), keep, cell_ids, dict(zip(df["trial_key"], df["cell"])))

"""Memory of one trial's work in one process: load a rate-1.0 cache, then train a student from it.

    python benchmarks/trial_memory.py

Builds (embedded Ray, one actor) the cache of the MiniLM meta-teacher (untrained heads) on books at rate 1.0 (1,631
reviews, ``sweeps/scarcity.yaml``'s data at max_length 128), then in this process: ``CachedTeacher`` (the whole cache
in memory), a TinyBERT-KD student and ``cell.train_student`` for 1 + 1 epochs in the resolved precision. Prints the
process's RSS after each step and its peak (``ru_maxrss``); writes benchmarks/results/trial_memory.json. About
3 minutes on 2 CPUs. Measured before and after the loading and heap fixes: benchmarks/RESULTS.md (Memory).
"""

from __future__ import annotations

import json
import resource
import tempfile
from pathlib import Path

from _env import REPO

import ray  # noqa: E402  (its bundled psutil)
import psutil  # noqa: E402

from metakd_ray import cell as CELL  # noqa: E402
from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.cache import CachedTeacher, ensure_cache  # noqa: E402
from metakd_ray.runtime import runtime_for  # noqa: E402
from metakd_ray.storage import Storage  # noqa: E402


def main() -> int:
    proc, marks = psutil.Process(), {}

    def mark(tag: str) -> None:
        marks[tag] = proc.memory_info().rss / 2**30
        print(f"{tag:<34} RSS {marks[tag]:.2f} GiB", flush=True)

    cfg = C.load(REPO / "sweeps/scarcity.yaml", ["ray.cache_actors=1", "ray.cpus_per_actor=1",
                                                  "distill.stage1_epochs=1", "distill.stage2_epochs=1"])
    splits = D.load_splits(cfg.data)
    enc, tok = M.load_encoder(cfg.model.teacher)
    tmp = Path(tempfile.mkdtemp(prefix="trial-memory-"))
    M.MetaTeacher(enc, splits.num_labels, len(splits.domains)).save_pretrained(tmp / "teacher", tok)
    data = CELL.student_data(cfg, splits, tok, "books", 1.0, 0, None)
    g = M.student_layer_map(cfg.model, enc.config.num_hidden_layers)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ref = ensure_cache(cfg, Storage(str(tmp / "store")), tmp / "teacher", "books", data.train, g, None)
    ray.shutdown()
    mark("before loading the cache")
    source = CachedTeacher(ref, g)
    mark("cache loaded")
    student = CELL.build_student(cfg, enc, tok, "tinybert_kd", splits.num_labels, len(splits.domains), source, seed=0)
    runtime = runtime_for(cfg.compute.precision)
    CELL.train_student(cfg, data, student, "tinybert_kd", source, tokenizer=tok, domains=splits.domains, seed=0,
                       runtime=runtime)
    mark("after training (1 + 1 epochs)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"command": "python benchmarks/trial_memory.py", "examples": ref.num_examples,
              "cache_array_gib": source.data.nbytes / 2**30, "rss_gib": marks, "peak_rss_gib": peak,
              "load_added_gib": marks["cache loaded"] - marks["before loading the cache"],
              "train_kept_gib": marks["after training (1 + 1 epochs)"] - marks["cache loaded"],
              "precision": runtime.precision}
    out = REPO / "benchmarks" / "results" / "trial_memory.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"cache of {ref.num_examples} examples ({result['cache_array_gib']:.2f} GiB of arrays): loading added "
          f"{result['load_added_gib']:.2f} GiB, training kept {result['train_kept_gib']:.2f} GiB, peak RSS "
          f"{peak:.2f} GiB; wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

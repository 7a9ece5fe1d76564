"""Building a sweep wave's caches: one Ray Data job per cache vs one job for all of them (``cache.ensure_caches``).

    python benchmarks/cache_wave.py [--teachers 4] [--rate 0.1] [--domains books dvd]

A sweep's caches are small (one cell's training data: 16-1,631 Amazon reviews), so a job's fixed cost (planning,
actor start-up, model load: ~7 s on 2 CPUs, ``results/precompute.json``) weighs on each of them. Here: ``--teachers``
exported MiniLM-L6 meta-teachers (the real encoder, heads seeded differently, so each has its own fingerprint) x the
domains' training data at ``--rate`` = the caches of one wave; both ways run twice, interleaved, into fresh storage,
on the recommended pool (2 actors x 0.5 CPU). ``ratio = per-cache seconds / one-job seconds`` (best of each); the
caches' contents are the same either way (same fingerprints; tests/test_cache.py checks the outputs). Writes
benchmarks/results/cache_wave.json; the last line is the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _env import REPO  # noqa: E402,F401  (sets the environment first)

import torch  # noqa: E402

from metakd_ray import cache as K  # noqa: E402
from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.storage import Storage  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--domains", nargs="+", default=["books", "dvd"])
    args = ap.parse_args(argv)
    import ray

    t_start, load_start = time.perf_counter(), os.getloadavg()
    cfg = C.from_dict({}, ["ray.cache_actors=2", "ray.cpus_per_actor=0.5", "model.student.num_layers=3"])
    splits = D.load_splits(cfg.data)
    enc, tokenizer = M.load_encoder("default", dropout=0.0)
    gmap = M.student_layer_map(cfg.model, enc.config.num_hidden_layers)
    domains = splits.domains
    data = {}
    for d in args.domains:
        pool = D.subsample(splits["train"].filter(lambda x, i=domains.index(d): x == i, input_columns="domain_id"),
                           args.rate, seed=0)
        data[d] = D.tokenize(pool, tokenizer, cfg.data.max_length)
    times: dict[str, list[float]] = {"per_cache": [], "one_job": []}
    with tempfile.TemporaryDirectory(prefix="cache-wave-bench-") as tmp:
        dirs = []
        for k in range(args.teachers):
            torch.manual_seed(k)
            teacher = M.MetaTeacher(enc, 2, len(domains), dropout=0.0)
            dirs.append(Path(tmp) / f"teacher{k}")
            teacher.save_pretrained(dirs[-1], tokenizer)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 object_store_memory=1 << 30)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for rep in range(2):
            for way in ("per_cache", "one_job"):
                store = Storage(str(Path(tmp) / f"{way}{rep}"))
                jobs = [K.cache_job(cfg, store, t, d, data[d], gmap) for t in dirs for d in args.domains]
                t0 = time.perf_counter()
                if way == "per_cache":
                    refs = [K.ensure_caches(cfg, [j])[0] for j in jobs]
                else:
                    refs = K.ensure_caches(cfg, jobs)
                times[way].append(time.perf_counter() - t0)
                assert all(r.built for r in refs) and len({r.fingerprint for r in refs}) == len(jobs)
                print(f"{way}: {len(jobs)} caches in {times[way][-1]:.1f}s", flush=True)
        ray.shutdown()
    n_caches = args.teachers * len(args.domains)
    examples = sum(len(data[d]) for d in args.domains) * args.teachers
    ratio = min(times["per_cache"]) / min(times["one_job"])
    out = {
        "ratio": ratio, "target": None, "timings": times, "caches": n_caches, "examples": examples,
        "examples_per_cache": {d: len(data[d]) for d in args.domains}, "teachers": args.teachers, "rate": args.rate,
        "pool": "2 actors x 0.5 CPU",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "ray": ray.__version__, "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "total_seconds": time.perf_counter() - t_start, "command": " ".join(["python", *sys.argv]),
    }
    dest = REPO / "benchmarks" / "results" / "cache_wave.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"ratio={ratio:.2f} (one job per cache {min(times['per_cache']):.1f}s / one job for all "
          f"{min(times['one_job']):.1f}s; {n_caches} caches, {examples} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

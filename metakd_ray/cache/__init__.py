"""Teacher-output cache: one cache per (teacher, domain, split), written by a Ray Data job, holds what the student
loss needs from the teacher, so distillation epochs read it instead of running the teacher (method doc §3; format in
``cache/format.py``; reader ``cache/reader.py``: ``CachedTeacher``). ``ensure_cache`` builds one cache
with one job; ``ensure_caches`` builds many (a sweep wave's) with one job per teacher class, its actors loading each
batch's teacher in turn, so a job's fixed cost (~7 s on 2 CPUs) is paid once rather than once per cache.

    ref = ensure_cache(cfg, storage, "books-meta-r0.1-s0", "books", tokenised_train, (0, 2, 4, 6),
                       prototype_scores={id: t_i, ...})          # builds, or finds and verifies, the cache
    teacher = CachedTeacher(ref)                                   # a TeacherSource, like LiveTeacher
    distill(student, "meta_kd", teacher, train_loader, ...)        # the loop is unchanged

CLI (builds the cache one cell needs, from an exported teacher)::

    python -m metakd_ray.cache sweeps/smoke.yaml --teacher-dir runs/x/teacher/best --target books --rate 0.1 --seed 0

Layout: ``<storage root>/caches/<fingerprint>/part-*.parquet`` and ``manifest.json``, written last and atomically.
The fingerprint hashes the teacher's weights (sha256 of its weight files), its tokenizer (vocab and config), the
max length, the layer map, the domain and split, the sorted example ids, the token ids themselves, the prototype
scores and the format (precision, attention mode). Same fingerprint: nothing is recomputed (the manifest's
per-file sha256 and row counts are verified first; a truncated or altered file makes the cache rebuilt, never
used). Another fingerprint: a new cache beside the old one.

What is stored, per example (float16, only the real tokens; MiniLM-L6 teacher, 3-layer student, g = (0, 2, 4, 6),
max_length 128, Amazon reviews: mean 98.15 real tokens, 47 % truncated at 128):

- id, n_tokens, logits (float32), h_d (float16, meta teacher), prototype score (float32);
- teacher hidden states 1..6, i.e. the mapped layers 2, 4, 6 and their inputs 1, 3, 5 (the reader rebuilds each
  mapped layer's pre-softmax scores from its input with the teacher's query/key projections, and layer 0 from the
  embedding module): 6 x 98.15 x 384 x 2 B = 452 KB per example.

Disk budget of ``sweeps/scarcity.yaml`` (4 domains x 3 seeds x rates summing to 1.88 x 2 teachers = 73,094 cached
examples; measured figures and every design option in benchmarks/RESULTS.md):

=====================================================  =========  =========================================
design                                                 B/example  all 73k caches
=====================================================  =========  =========================================
float32, padded, hidden states + score maps (naive)    3.1 MB     230 GB
float16 unpadded, hidden states + score maps           1.09 MB    79 GB
float16 unpadded, hidden states + Q/K                  755 KB     55 GB
float16, layer inputs, scores rebuilt (this format)    453 KB     33.1 GB (30.8 GB as zstd Parquet)
int8 per-token scale, same layers (precision="int8")   229 KB     16.8 GB
=====================================================  =========  =========================================

No lossless-to-float16 design holds all 73k examples in 12 GB at once (that needs <= 164 KB per example, about
1.67 KB per real token: fewer than 2.2 float16 vectors of 384 per token, while the loss needs 6). What fits: each
cache serves one sweep cell (target, rate, seed, teacher), so the sweep builds them in waves that fit the budget
(``sweep.plan.plan_waves``, with ``estimate_bytes``), and ``ensure_cache(s)(..., max_total_bytes=12e9)`` first
evicts the least recently used other caches to make room. An evicted cache is rebuilt on demand (fingerprinted), at
the cost of one teacher pass.

Pool layout: on 2 CPUs, ``ray.cache_actors=2 ray.cpus_per_actor=0.5`` (1 torch thread each) ran the teacher pass
6 % faster than 1 actor x 1 CPU with 2 threads, and as fast as a plain single-process loop (benchmarks/RESULTS.md).

Pitfalls handled (docs/ray-guide.md §3): the actor pool must leave a CPU for the read/write tasks (else Ray Data
deadlocks, ray#44687), so ``cache_actors * cpus_per_actor <= cluster CPUs - 1`` is checked first;
``SaveMode.OVERWRITE`` for the staging write; no Arrow tensor extension types (raw bytes cells).
"""

from metakd_ray.cache.build import check_actor_pool, ensure_cache, ensure_caches, run_teacher_job
from metakd_ray.cache.format import ATTENTION_MODES, FORMAT_VERSION, PRECISIONS, stored_layers
from metakd_ray.cache.job import CacheJob, cache_job, estimate_bytes, input_table
from metakd_ray.cache.reader import CachedTeacher, load_cache, unload
from metakd_ray.cache.store import CACHES, MANIFEST, CacheError, CacheRef, cache_sizes, find_cache, prune, verify

__all__ = [
    "check_actor_pool", "ensure_cache", "ensure_caches", "run_teacher_job", "ATTENTION_MODES", "FORMAT_VERSION",
    "PRECISIONS", "stored_layers", "CacheJob", "cache_job", "estimate_bytes", "input_table", "CachedTeacher",
    "load_cache", "unload", "CACHES", "MANIFEST", "CacheError", "CacheRef", "cache_sizes", "find_cache", "prune",
    "verify",
]

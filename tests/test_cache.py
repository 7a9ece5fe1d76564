"""The Ray Data teacher-output cache: round trip against the live teacher, fingerprint hits and misses, corruption
detection, and the same distillation trajectory from the cache as from the live teacher."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from toy import DOMAINS, tiny_config, toy_splits, toy_tokenizer

from metakd_ray import cache as K
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.cache import build as KB
from metakd_ray.cache import store as KS
from metakd_ray.cache.format import decode_matrix, design_bytes, encode_matrix, stored_layers
from metakd_ray.cache.reader import CachedTeacher, load_cache, unload
from metakd_ray.distill import LiveTeacher, distill
from metakd_ray.storage import Storage

GMAP = (0, 2, 4)  # a 2-layer student of a 4-layer teacher
TARGET = "beta"


# ----------------------------------------------------------------------------------------------------------
# Without Ray
# ----------------------------------------------------------------------------------------------------------


def test_stored_layers_and_budget():
    assert stored_layers((0, 2, 4, 6)) == (1, 2, 3, 4, 5, 6)
    assert stored_layers((0, 2, 4, 6), "qk") == (2, 4, 6)
    assert stored_layers((0, 1, 2, 3)) == (1, 2, 3)  # the input of layer 1 is layer 0: rebuilt, not stored
    with pytest.raises(ValueError):
        stored_layers((1, 2))
    d = design_bytes([98] * 10, (0, 2, 4, 6), hidden=384, heads=12)
    assert d["float16_layer_inputs"]["fields"]["hidden"] == 6 * 98 * 384 * 2
    assert d["int8_layer_inputs"]["fields"]["hidden"] == 6 * 98 * (384 + 4)
    assert d["float16_layer_inputs"]["total"] < d["fp16_hidden_qk"]["total"] < d["fp16_hidden_scores"]["total"]


def test_int8_and_float16_cells_round_trip():
    x = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32) * np.linspace(0.1, 10, 16)
    x16 = decode_matrix(encode_matrix(x, "float16"), 7, 16, "float16").astype(np.float32)
    np.testing.assert_allclose(x16, x, rtol=1e-3, atol=1e-3)
    x8 = decode_matrix(encode_matrix(x, "int8"), 7, 16, "int8").astype(np.float32)
    assert np.abs(x8 - x).max() <= np.abs(x).max() / 127 + 1e-3


def test_actor_pool_must_leave_a_cpu():
    K.check_actor_pool(1, 1.0, 2)
    K.check_actor_pool(2, 0.5, 2)
    with pytest.raises(ValueError, match="deadlock"):
        K.check_actor_pool(2, 1.0, 2)
    with pytest.raises(ValueError, match="deadlock"):
        K.check_actor_pool(1, 1.5, 2)


def test_prune_evicts_least_recently_used_caches(tmp_path):
    st = Storage(str(tmp_path))
    for k, fp in enumerate(("a" * 32, "b" * 32, "c" * 32)):
        st.write_bytes(b"x" * 1000, K.CACHES, fp, "part-0.parquet")
        st.write_bytes(str(100.0 + k).encode(), K.CACHES, fp, KS.USED_MARK)  # a used first, c last
    assert sum(K.cache_sizes(st).values()) > 3000
    evicted = K.prune(st, max_total_bytes=2100, keep=("a" * 32,))
    assert evicted == ["b" * 32] and set(st.listdir(K.CACHES)) == {"a" * 32, "c" * 32}


# ----------------------------------------------------------------------------------------------------------
# With Ray: one cache built for the module, then hits, corruption, a new max_length
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    cfg: object
    storage: Storage
    teacher_dir: Path
    teacher: torch.nn.Module
    tokenizer: object
    train: object  # tokenised target-domain training split (datasets.Dataset) with prototype_score
    protos: dict
    ref: K.CacheRef


def _tokenised(tokenizer, max_length):
    splits = toy_splits()
    idx = DOMAINS.index(TARGET)
    ds = splits["train"].filter(lambda d: [x == idx for x in d], input_columns="domain_id", batched=True)
    return D.tokenize(ds, tokenizer, max_length)


def _files(storage: Storage, ref: K.CacheRef) -> dict[str, float]:
    d = storage.local_path(*ref.parts)
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.name != KS.USED_MARK}


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(tmp, "ray.cache_actors=1", "ray.cpus_per_actor=1")
    tokenizer = toy_tokenizer(tmp)
    encoder = M.random_encoder(vocab_size=len(tokenizer), num_layers=4, max_position=32, dropout=0.0, seed=0)
    teacher = M.MetaTeacher(encoder, num_labels=2, num_domains=len(DOMAINS), dropout=0.0).eval()
    teacher.save_pretrained(tmp / "teacher", tokenizer)
    train = _tokenised(tokenizer, 16)
    protos = {i: 0.5 + 0.01 * k for k, i in enumerate(train["id"])}
    train = train.add_column("prototype_score", [protos[i] for i in train["id"]])
    storage = Storage(str(tmp / "store"))
    with counted_jobs() as jobs:
        ref = K.ensure_cache(cfg, storage, tmp / "teacher", TARGET, train, GMAP, protos, rows_per_block=8)
    assert ref.built and len(jobs) == 1
    return Setup(cfg, storage, tmp / "teacher", teacher, tokenizer, train, protos, ref)


@contextlib.contextmanager
def counted_jobs():
    """Counts the Ray Data jobs run inside the block (``cache.build.run_teacher_job`` calls)."""
    calls: list[int] = []
    real = KB.run_teacher_job

    def run(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with mock.patch.object(KB, "run_teacher_job", run):
        yield calls


def _ensure(s: Setup, train=None, **kw) -> K.CacheRef:
    return K.ensure_cache(s.cfg, s.storage, s.teacher_dir, TARGET, s.train if train is None else train, GMAP,
                          s.protos, rows_per_block=8, **kw)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 2e-3) -> None:
    """Agreement within float16 rounding, relative to the tensor's scale."""
    scale = a.abs().max().clamp(min=1e-6)
    err = (a - b).abs().max()
    assert err <= rel * scale, f"{what}: max error {float(err):.3g} vs scale {float(scale):.3g}"


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_cache_round_trips_to_the_live_teacher(setup):
    s = setup
    m = s.ref.manifest
    assert m["stored_layers"] == [1, 2, 3, 4] and m["num_examples"] == len(s.train)
    assert {f["rows"] for f in m["files"]} and sum(f["rows"] for f in m["files"]) == len(s.train)
    live, cached = LiveTeacher(s.teacher, GMAP), CachedTeacher(s.ref, GMAP)
    loader = DataLoader(s.train, batch_size=8, shuffle=True, collate_fn=D.collator(s.tokenizer),
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    for batch in loader:
        a, b = live(batch), cached(batch)
        mask = batch["attention_mask"].bool()
        pair = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(1).expand(-1, a.attention_scores[0].shape[1], -1, -1)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
        _close(a.domain_hidden, b.domain_hidden, "h_d")
        torch.testing.assert_close(b.prototype_scores, batch["prototype_scores"])
        assert len(b.hidden_states) == len(GMAP) and len(b.attention_scores) == len(GMAP) - 1
        for g, x, y in zip(GMAP, a.hidden_states, b.hidden_states):
            assert x.shape == y.shape
            _close(x[mask], y[mask], f"hidden state {g}", rel=1e-6 if g == 0 else 2e-3)
            assert not y[~mask].any(), "padding must be zeros"
        for g, x, y in zip(GMAP[1:], a.attention_scores, b.attention_scores):
            assert x.shape == y.shape
            _close(x[pair], y[pair], f"attention scores of layer {g}")
            assert not y[~pair].any()
        small = cached(batch, needs_layers=False)
        assert small.hidden_states == () and torch.equal(small.logits, b.logits)
        seen += len(batch["ids"])
    assert seen == len(s.train)


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_same_fingerprint_skips_the_job(setup):
    s = setup
    before = _files(s.storage, s.ref)
    with counted_jobs() as jobs:
        again = _ensure(s)
        assert again.fingerprint == s.ref.fingerprint and not again.built
        assert not jobs, "a cache hit must not run the Ray job"
        assert _files(s.storage, again) == before, "a cache hit must not rewrite any file"
        # the same split in another order, as another Dataset object: still the same cache
        shuffled = s.train.shuffle(seed=1)
        assert _ensure(s, train=shuffled).fingerprint == s.ref.fingerprint and not jobs


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_corrupt_files_are_detected_and_rebuilt(setup):
    s = setup
    ref = s.ref
    for damage in ("truncate", "flip"):  # Ray names the files anew on each build: take the current ones
        name = ref.manifest["files"][-1]["name"]
        path = s.storage.local_path(*ref.parts, name)
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        else:
            mid = len(data) // 2
            path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8]) + data[mid + 8:])
        with pytest.raises(K.CacheError, match="corrupt"):
            K.verify(ref)
        unload(ref.fingerprint)
        with pytest.raises(K.CacheError):
            load_cache(ref)  # a reader never uses the altered bytes
        with counted_jobs() as jobs:
            rebuilt = _ensure(s)
        assert rebuilt.built and len(jobs) == 1, damage
        assert rebuilt.fingerprint == s.ref.fingerprint
        K.verify(rebuilt)
        unload(ref.fingerprint)
        assert len(load_cache(rebuilt).index) == len(s.train)
        ref = rebuilt
    # a directory without a manifest (an interrupted publish) is never used either
    s.storage.delete(*ref.parts, K.MANIFEST)
    s.ref = _ensure(s)
    assert s.ref.built


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_other_max_length_makes_a_new_cache_beside_the_old(setup):
    s = setup
    short = _tokenised(s.tokenizer, 8)
    assert max(len(x) for x in short["input_ids"]) == 8 < max(len(x) for x in s.train["input_ids"])
    cfg8 = tiny_config(s.storage.local_path().parent, "ray.cache_actors=1", "ray.cpus_per_actor=1",
                       "data.max_length=8")
    ref8 = K.ensure_cache(cfg8, s.storage, s.teacher_dir, TARGET, short, GMAP, s.protos, rows_per_block=8)
    assert ref8.built and ref8.fingerprint != s.ref.fingerprint
    assert set(s.storage.listdir(K.CACHES)) >= {ref8.fingerprint, s.ref.fingerprint}
    K.verify(s.ref)
    K.verify(ref8)
    # a batch tokenised at max_length 16 does not silently read the max_length-8 cache
    batch = D.collator(s.tokenizer)([s.train[i] for i in range(len(s.train))])
    with pytest.raises(K.CacheError, match="tokens in the batch"):
        CachedTeacher(ref8)(batch)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_distilling_from_the_cache_follows_the_live_trajectory(setup):
    s = setup
    enc = s.teacher.encoder
    dcfg = dataclasses.replace(s.cfg.distill, stage1_epochs=2, stage2_epochs=2, stage1_lr=1e-3, stage2_lr=1e-3)
    torch.manual_seed(0)
    student0 = M.Student(M.student_from_teacher(enc, layers=[2, 4]), 2, teacher_hidden_size=32,
                         teacher_domain_hidden_size=32, num_domains=len(DOMAINS), dropout=0.0)
    dev = s.train.select(range(8))
    histories = []
    for source in (LiveTeacher(s.teacher, GMAP), CachedTeacher(s.ref, GMAP)):
        student = copy.deepcopy(student0)
        train = DataLoader(s.train, batch_size=8, shuffle=True, collate_fn=D.collator(s.tokenizer),
                           generator=torch.Generator().manual_seed(0))
        dev_loader = DataLoader(dev, batch_size=8, collate_fn=D.collator(s.tokenizer))
        log: list[dict] = []
        distill(student, "meta_kd", source, train, dev_loader, dcfg, domain_names=DOMAINS, seed=0, log=log.append)
        histories.append(log)
    live, cached = histories
    assert [m["stage"] for m in live] == [m["stage"] for m in cached] == ["stage1"] * 2 + ["stage2"] * 2
    for a, b in zip(live, cached):
        for key in [k for k in a if k.startswith("train_")]:
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), (a["stage"], a.get("epoch"), key)
    assert live[-1]["train_loss"] != live[0]["train_loss"]


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_encode_cells_matches_per_example_encoding(precision):
    x = torch.randn(5, 9, 12)
    lens = np.array([9, 1, 4, 9, 7])
    real = torch.arange(9)[None, :] < torch.from_numpy(lens)[:, None]
    got = KB.encode_cells(x, real, lens, precision).to_pylist()
    assert got == [encode_matrix(x[i, :n].numpy(), precision) for i, n in enumerate(lens)]


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_estimate_bounds_the_cache_on_disk(setup):
    m = setup.ref.manifest
    lengths = [len(x) for x in setup.train["input_ids"]]
    est = K.estimate_bytes(lengths, len(m["stored_layers"]), m["teacher"]["hidden_size"])
    on_disk = sum(f["bytes"] for f in m["files"])
    assert on_disk <= est <= 3 * on_disk


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_one_job_per_teacher_class_builds_several_caches(setup, tmp_path):
    s = setup
    tok = s.tokenizer

    def enc(seed):
        return M.random_encoder(vocab_size=len(tok), num_layers=4, max_position=32, dropout=0.0, seed=seed)

    meta2 = M.MetaTeacher(enc(1), num_labels=2, num_domains=len(DOMAINS), dropout=0.0).eval()
    single = M.ClassifierTeacher(enc(2), num_labels=2, dropout=0.0).eval()
    meta2.save_pretrained(tmp_path / "meta2", tok)
    single.save_pretrained(tmp_path / "single", tok)
    store = Storage(str(tmp_path / "store"))
    jobs = [K.cache_job(s.cfg, store, s.teacher_dir, TARGET, s.train, GMAP, s.protos),
            K.cache_job(s.cfg, store, tmp_path / "meta2", TARGET, s.train, GMAP, s.protos),
            K.cache_job(s.cfg, store, tmp_path / "single", TARGET, s.train, GMAP)]
    with counted_jobs() as ray_jobs:
        refs = K.ensure_caches(s.cfg, jobs, rows_per_block=8)
    assert len(ray_jobs) == 2  # the two meta teachers share one job, the classifier teacher has its own
    assert all(r.built for r in refs) and len({r.fingerprint for r in refs}) == 3
    assert refs[1].manifest["shared_job"]["caches"] == 2 and "shared_job" not in refs[2].manifest
    assert [r.manifest["has_domain_hidden"] for r in refs] == [True, True, False]
    # the module's cache, built alone, has the same fingerprint: the key does not depend on how it was built
    assert refs[0].fingerprint == s.ref.fingerprint
    # each cache holds its own teacher's outputs
    batch = next(iter(DataLoader(s.train, batch_size=16, collate_fn=D.collator(tok))))
    mask = batch["attention_mask"].bool()
    for ref, model in zip(refs, (s.teacher, meta2, single)):
        unload(ref.fingerprint)
        a, b = LiveTeacher(model, GMAP)(batch), CachedTeacher(ref, GMAP)(batch)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
        for g, x, y in zip(GMAP, a.hidden_states, b.hidden_states):
            _close(x[mask], y[mask], f"hidden state {g}")
    # a process (a reused trial actor) keeps only the cache it read last, not every one it ever read
    from metakd_ray.cache import reader

    assert list(reader._LOADED) == [refs[-1].fingerprint] and len(reader._PARTS) == 1
    unload()
    # all three found again: no job
    with counted_jobs() as ray_jobs:
        again = K.ensure_caches(s.cfg, jobs, rows_per_block=8)
    assert not ray_jobs and not any(r.built for r in again)

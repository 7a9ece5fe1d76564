"""The teacher stage on Ray Train: teacher identity, a local-mode run and its artefacts, 2 workers against 1, and a
killed run that resumes from its checkpoint. Tiny random BERT and toy data (tests/toy.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
import toy
from toy import DOMAINS, FailAtEpoch, KillAtEpoch, ToyInputs, tiny_config

from metakd_ray import cell as cells
from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray.storage import Storage
from metakd_ray.teacher import MANIFEST, load_teacher, teacher_logits, teacher_spec, teacher_specs_for
from metakd_ray.teacher.artefact import teacher_identity
from metakd_ray.teacher.job import ensure_teacher
from metakd_ray.teacher.model import teacher_stage
from metakd_ray.training import accuracy_by_domain

# Ray workers cannot import tests/toy.py (tests/ is not a package): ship its factories by value.
ray.cloudpickle.register_pickle_by_value(toy)

N_DEV_PER_DOMAIN = 8  # toy_splits(48): 1/6 of each domain


class RecordingStorage(Storage):
    """A Storage that records the order of its writes (files and uploaded directories)."""

    def __init__(self, root):
        super().__init__(str(root))
        self.writes: list[str] = []

    def write_bytes(self, data, *parts):
        self.writes.append("/".join(parts))
        super().write_bytes(data, *parts)

    def upload_dir(self, local_dir, *parts):
        self.writes.append("/".join(parts))
        super().upload_dir(local_dir, *parts)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` -> (mtime_ns, size)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")
            if p.is_file()}


def no_inputs(cfg):
    raise AssertionError("a finished teacher must not load data or models again")


def test_spec_keys_share_teachers_only_when_the_training_set_allows(tmp_path):
    cfg = tiny_config(tmp_path)
    meta = teacher_spec(cfg, "meta", "alpha", 0.5, 0)
    assert {teacher_spec(cfg, "meta", t, 0.5, 0) for t in DOMAINS} == {meta}  # scarcity=all: one for every target
    assert meta.target is None and meta.domains == DOMAINS and meta.key.startswith("meta-all-r0.5-s0-")
    single = {teacher_spec(cfg, "single", t, 0.5, 0).key for t in DOMAINS}
    assert len(single) == 3 and teacher_spec(cfg, "single", "beta", 0.5, 0).domains == ("beta",)
    scarce = tiny_config(tmp_path, "data.scarcity=target")
    assert len({teacher_spec(scarce, "meta", t, 0.5, 0).key for t in DOMAINS}) == 3
    excl = teacher_spec(tiny_config(tmp_path, "teacher.exclude_target=true"), "meta", "beta", 0.5, 0)
    assert excl.domains == ("alpha", "gamma") and excl.key.startswith("meta-without-beta-")
    # Anything that changes the teacher changes the key; where and how fast it runs does not.
    for change in ("teacher.lr=0.001", "teacher.gamma1=0.2", "model.dropout=0.1", "data.max_length=32",
                   "teacher.min_steps=40"):
        assert teacher_spec(tiny_config(tmp_path, change), "meta", None, 0.5, 0).key != meta.key, change
    assert teacher_spec(cfg, "meta", None, 0.2, 0).key != meta.key != teacher_spec(cfg, "meta", None, 0.5, 1).key
    moved = tiny_config(tmp_path / "elsewhere", "ray.train_workers=2", "data.root=/somewhere")
    assert teacher_spec(moved, "meta", None, 0.5, 0).key == meta.key
    with pytest.raises(ValueError, match="depends on the target"):
        teacher_spec(cfg, "single", None, 0.5, 0)

    sweep = tiny_config(tmp_path, "sweep.methods=[single/tinybert_kd, meta/meta_kd, mix/tinybert_kd, none/finetune]",
                        "sweep.sample_rates=[0.5, 1.0]")
    specs = teacher_specs_for(sweep)
    assert len(specs) == len(set(specs)) == 2 * (3 + 1 + 1)  # per rate: 3 single, 1 meta, 1 mix
    assert teacher_specs_for(tiny_config(tmp_path, "sweep.methods=[none/finetune]")) == []


def test_teacher_min_steps_raises_a_small_pools_epochs_and_keeps_older_keys(tmp_path):
    """``teacher.min_steps``: at least that many optimisation steps, the epochs raised; 0 (the default) leaves the
    teacher's identity as it was before the option existed, so teachers already trained keep their keys."""
    cfg = tiny_config(tmp_path, "ray.train_workers=0")
    assert "min_steps" not in teacher_identity(cfg, "meta", DOMAINS, None, 0.5, 0)["teacher"]
    raised = tiny_config(tmp_path, "ray.train_workers=0", "teacher.min_steps=40")
    assert teacher_identity(raised, "meta", DOMAINS, None, 0.5, 0)["teacher"]["min_steps"] == 40
    spec = teacher_spec(raised, "meta", None, 0.5, 0)
    art = ensure_teacher(raised, spec, Storage(str(tmp_path / "store")), inputs=ToyInputs())
    # 48 pool rows at batch 8: 6 steps per epoch; 4 epochs are 24 steps, 40 steps need ceil(40 / 6) = 7 epochs
    assert [h["epoch"] for h in art.manifest["history"]] == list(range(7))
    plain = tiny_config(tmp_path, "ray.train_workers=0", "teacher.min_steps=24")  # 4 epochs reach it already
    assert teacher_stage(plain.teacher, "meta").epochs_for(6) == 4


@pytest.fixture(scope="module")
def local_meta(tmp_path_factory):
    """A meta teacher made in local mode (train_workers=0): artefacts, progress events and the write order."""
    root = tmp_path_factory.mktemp("local")
    cfg = tiny_config(root, "ray.train_workers=0")
    spec = teacher_spec(cfg, "meta", None, 0.5, 0)
    storage = RecordingStorage(root)
    events: list[dict] = []
    art = ensure_teacher(cfg, spec, storage, inputs=ToyInputs(), log=events.append)
    return cfg, spec, storage, art, events


@pytest.mark.timeout(120)
def test_local_mode_exports_a_complete_teacher_and_a_rerun_does_nothing(local_meta):
    cfg, spec, storage, art, events = local_meta
    root = storage.local_path("teachers", spec.key)
    assert art.path == str(root) and {e["event"] for e in events} == {"prototype_scores", "train", "exported"}
    assert storage.writes[-1] == f"teachers/{spec.key}/{MANIFEST}"  # the manifest is written last
    assert not (root / "train").exists()  # checkpoints are removed once the teacher is exported

    # Prototype scores: one per row of the training pool (rate 0.5 of every domain), in [-1, 1].
    splits = toy.toy_splits()
    pool = cells.training_pool(cfg, splits, None, 0.5, 0)
    table = pq.read_table(root / "prototype_scores.parquet")
    assert table.schema.field("id").type == "string" and table.schema.field("prototype_score").type == "float"
    assert table.column("id").to_pylist() == D.column(pool, "id") and len(pool) == 48
    assert all(-1.0 <= s <= 1.0 for s in table.column("prototype_score").to_pylist())

    m = art.manifest
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2, 3] and m["resumed_at_epoch"] == 0
    assert m["best_dev"] == max(m["dev_accuracy"]) == m["dev_accuracy"][m["best_epoch"]]
    assert set(m["test_accuracy"]) == set(DOMAINS) | {"mean"} and m["n_pool"] == 48 and m["n_train"] == 48
    assert m["spec"]["kind"] == "meta" and m["spec"]["target"] is None and len(m["fingerprint"]) == 64
    assert m["seconds"]["total"] > 0 and m["cpu_seconds"] >= m["seconds"]["total"]
    assert C.load(root / "config.yaml") == cfg

    # The exported model is the dev-best teacher: same test accuracy when loaded back.
    model, tokenizer, manifest = load_teacher(storage, spec.key)
    test = cells.tokenize_splits(cfg, tokenizer, test=splits["test"])["test"]
    acc = accuracy_by_domain(model, cells.eval_loader(test, D.collator(tokenizer)), DOMAINS, teacher_logits)
    assert acc == pytest.approx(manifest["test_accuracy"])

    before, again = tree(root), []
    art2 = ensure_teacher(cfg, spec, storage, inputs=no_inputs, log=again.append)
    assert again == [] and tree(root) == before and art2.manifest == art.manifest


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_two_workers_match_one(ray_session, tmp_path):
    """Same data, seed and global batch: DDP's average of two half-batch gradients is the full batch's mean-loss
    gradient up to float summation order, and with dropout 0 and kind ``mix`` (no sampling in the loss) nothing
    else differs. So dev accuracy must agree within one dev example per domain at every epoch (1/8), and the
    teachers' test logits within 1e-4 (measured here: identical dev accuracies, logits within 4e-7)."""
    one = tiny_config(tmp_path / "one", "ray.train_workers=0")
    two = tiny_config(tmp_path / "two", "ray.train_workers=2", "ray.cpus_per_worker=1")
    spec = teacher_spec(one, "mix", None, 1.0, 0)
    assert teacher_spec(two, "mix", None, 1.0, 0) == spec
    arts = [ensure_teacher(cfg, spec, Storage(cfg.storage.root), inputs=ToyInputs()) for cfg in (one, two)]
    h1, h2 = (a.manifest["history"] for a in arts)
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [12, 24, 36, 48]  # 96 rows / global batch 8
    for e1, e2 in zip(h1, h2):
        for d in (*DOMAINS, "mean"):
            assert abs(e1[f"dev_acc_{d}"] - e2[f"dev_acc_{d}"]) <= 1 / N_DEV_PER_DOMAIN + 1e-9, (e1, e2)
    assert arts[1].manifest["ray"]["train_workers"] == 2

    logits = []
    for cfg in (one, two):
        model, tokenizer, _ = load_teacher(Storage(cfg.storage.root), spec.key)
        test = cells.tokenize_splits(cfg, tokenizer, test=toy.toy_splits()["test"])["test"]
        batch = D.collator(tokenizer)([test[i] for i in range(len(test))])
        with torch.no_grad():
            logits.append(teacher_logits(model, batch))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_killed_run_resumes_from_its_checkpoint(ray_session, tmp_path, local_meta):
    cfg = tiny_config(tmp_path, "ray.train_workers=1", "ray.train_max_failures=0")  # no retry: the failure surfaces
    spec = teacher_spec(cfg, "meta", None, 0.5, 0)
    storage = Storage(cfg.storage.root)
    with pytest.raises(ray.train.TrainingFailedError, match="injected failure in epoch 2"):
        ensure_teacher(cfg, spec, storage, inputs=ToyInputs(), epoch_hook=FailAtEpoch(2))
    run = storage.local_path("teachers", spec.key, "train")
    assert not storage.exists("teachers", spec.key, MANIFEST)
    assert sorted(p.name for p in run.glob("checkpoint_epoch=*")) == ["checkpoint_epoch=0001"]  # num_to_keep=1

    art = ensure_teacher(cfg, spec, storage, inputs=ToyInputs())  # same spec: same run name and storage path
    m = art.manifest
    assert m["resumed_at_epoch"] == 2  # epochs 0-1 came from the checkpoint, 2-3 were trained now
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2, 3]  # each epoch exactly once
    assert [h["step"] for h in m["history"]] == [6, 12, 18, 24]  # the step count carried over (48 rows / 8)
    # The resumed run continued exactly: it matches the uninterrupted local-mode run of the same teacher (same
    # data order, RNG state restored), up to float noise between processes.
    uninterrupted = local_meta[3].manifest
    assert m["dev_accuracy"] == uninterrupted["dev_accuracy"]
    for a, b in zip(m["history"], uninterrupted["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.timeout(240)
def test_fault_sigkilled_train_worker_resumes_from_its_checkpoint(ray_session, tmp_path, local_meta):
    """A Ray Train worker SIGKILLed during epoch 2: Ray Train restarts the worker group (train_max_failures=1) from
    the epoch-1 checkpoint, and the exported teacher matches the uninterrupted run."""
    cfg = tiny_config(tmp_path, "ray.train_workers=1", "ray.train_max_failures=1")
    spec = teacher_spec(cfg, "meta", None, 0.5, 0)
    marker = tmp_path / "killed.pid"
    art = ensure_teacher(cfg, spec, Storage(cfg.storage.root), inputs=ToyInputs(),
                         epoch_hook=KillAtEpoch(2, str(marker)))
    assert marker.exists()  # the worker was killed
    m = art.manifest
    # the newest checkpoint Ray Train had registered when the worker died: epoch 1's, or epoch 0's when the kill came
    # before the controller processed epoch 1's report; either way no epoch is lost or counted twice
    assert m["resumed_at_epoch"] in (1, 2)
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2, 3]
    assert m["dev_accuracy"] == local_meta[3].manifest["dev_accuracy"]

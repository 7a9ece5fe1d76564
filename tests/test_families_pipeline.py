"""Encoder families beyond BERT through the teacher-output cache and the sweep's cache decision.

A cache built from tiny random DistilBERT (no segment embeddings, ``n_layers``/``dim``/``n_heads`` in its
config.json) and ELECTRA (embeddings 16 wide, projected to the hidden width 32) teachers gives the records the live
teacher gives; the layer map (0, 1, 4) makes the reader rebuild layer 1's scores from the layer 0 it recomputes from
the embedding modules. A DeBERTa-v2 teacher gets no cache: the plan, the sweep's cache stage and the cache job say
it runs live.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from test_cache import TARGET, _close, _tokenised, counted_jobs
from torch.utils.data import DataLoader
from toy import DOMAINS, tiny_config, toy_tokenizer

from metakd_ray import cache as K
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.cache.reader import CachedTeacher, _TeacherParts, unload
from metakd_ray.distill import LiveTeacher
from metakd_ray.hf_student.modeling_metakd import no_pooler_kwargs
from metakd_ray.models import families as F
from metakd_ray.storage import Storage
from metakd_ray.sweep import stages
from metakd_ray.sweep.plan import format_plan, live_teacher_reason, make_plan
from metakd_ray.teacher.artefact import MODEL_DIR, TEACHERS, TeacherLocation

GMAP = (0, 1, 4)  # layer 1's scores come from the rebuilt layer 0; layer 4's from the cached layer 3
TOK = toy_tokenizer()
SHAPE = dict(vocab_size=len(TOK), hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_encoder(name: str, seed: int = 0) -> torch.nn.Module:
    config = {
        "distilbert": lambda: T.DistilBertConfig(vocab_size=len(TOK), dim=32, n_layers=4, n_heads=4, hidden_dim=37,
                                                 max_position_embeddings=32, dropout=0.0, attention_dropout=0.0),
        "electra": lambda: T.ElectraConfig(**SHAPE, embedding_size=16),
        "deberta-v2": lambda: T.DebertaV2Config(**SHAPE, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                position_buckets=8, max_relative_positions=16, share_att_key=True,
                                                norm_rel_ebd="layer_norm", position_biased_input=False,
                                                type_vocab_size=0),
    }[name]()
    torch.manual_seed(seed)
    return T.AutoModel.from_config(config, attn_implementation=F.family_of(config).attn_implementation,
                                   **no_pooler_kwargs(config)).eval()


def save_teacher(name: str, directory, seed: int = 0) -> torch.nn.Module:
    teacher = M.MetaTeacher(tiny_encoder(name, seed), num_labels=2, num_domains=len(DOMAINS), dropout=0.0).eval()
    teacher.save_pretrained(directory, TOK)
    return teacher


# ----------------------------------------------------------------------------------------------------------
# DistilBERT and ELECTRA teachers: cache pass + reader == live teacher
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_cache_of_distilbert_and_electra_teachers_gives_the_live_records(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "ray.cache_actors=1", "ray.cpus_per_actor=1")
    teachers = {name: save_teacher(name, tmp_path / name, seed) for seed, name in enumerate(("distilbert", "electra"))}
    saved = json.loads((tmp_path / "distilbert" / "encoder" / "config.json").read_text())
    assert "num_hidden_layers" not in saved and saved["n_layers"] == 4  # what the cache code must read through
    train = _tokenised(TOK, 16)
    protos = {i: 0.5 + 0.01 * k for k, i in enumerate(train["id"])}
    train = train.add_column("prototype_score", [protos[i] for i in train["id"]])
    storage = Storage(str(tmp_path / "store"))
    jobs = [K.cache_job(cfg, storage, tmp_path / name, TARGET, train, GMAP, protos) for name in teachers]
    with counted_jobs() as ray_jobs:
        refs = K.ensure_caches(cfg, jobs, rows_per_block=8)
    assert len(ray_jobs) == 1 and all(r.built for r in refs)  # both meta teachers: one Ray Data job
    batches = list(DataLoader(train, batch_size=8, collate_fn=D.collator(TOK)))
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padded rows are compared too
    for (name, model), ref in zip(teachers.items(), refs):
        m = ref.manifest["teacher"]
        assert (m["num_layers"], m["hidden_size"], m["num_heads"]) == (4, 32, 4), name
        assert ref.manifest["stored_layers"] == [1, 3, 4]
        unload(ref.fingerprint)
        live, cached = LiveTeacher(model, GMAP), CachedTeacher(ref, GMAP)
        for batch in batches:
            a, b = live(batch), cached(batch)
            mask = batch["attention_mask"].bool()
            pair = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(1).expand(-1, 4, -1, -1)
            torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
            _close(a.domain_hidden, b.domain_hidden, f"{name} h_d")
            for g, x, y in zip(GMAP, a.hidden_states, b.hidden_states, strict=True):
                assert x.shape == y.shape == (*mask.shape, 32), (name, g)
                _close(x[mask], y[mask], f"{name} hidden state {g}", rel=1e-6 if g == 0 else 2e-3)
                assert not y[~mask].any(), "padding must be zeros"
            for g, x, y in zip(GMAP[1:], a.attention_scores, b.attention_scores, strict=True):
                assert x.shape == y.shape
                _close(x[pair], y[pair], f"{name} attention scores of layer {g}")
                assert not y[~pair].any()
    unload()


# ----------------------------------------------------------------------------------------------------------
# DeBERTa-v2 teachers: no cache, the trials run them live
# ----------------------------------------------------------------------------------------------------------


def test_a_deberta_teacher_runs_live_in_plan_sweep_and_cache_job(tmp_path, capsys):
    save_teacher("deberta-v2", tmp_path / "deberta")
    TOK.save_pretrained(tmp_path / "deberta" / "encoder")
    cfg = tiny_config(tmp_path, f"model.teacher={tmp_path / 'deberta' / 'encoder'}")
    # the decision: live for DeBERTa-v2, caches for the families whose scores are Q K^T / sqrt(d_head)
    why = live_teacher_reason(cfg)
    assert why and "DeBERTa-v2" in why and "\n" not in why
    assert live_teacher_reason(cfg, ["bert", "roberta", "electra", "distilbert"]) is None
    assert "DeBERTa-v2" in live_teacher_reason(cfg, ["bert", "deberta-v2"])
    # the plan (and so the dry run) shows it: no caches, and why
    p = make_plan(cfg)
    assert p.cells and all(c.teacher_key for c in p.cells)
    assert p.live_teacher == why and p.caches == [] and p.to_json()["live_teacher"] == why
    text = format_plan(p)
    assert ", 0 caches" in text and f"no caches, trials run the teacher live: {why}" in text
    assert make_plan(tiny_config(tmp_path)).live_teacher is None  # the default MiniLM (BERT) teacher: cached
    # the sweep's cache stage: its exported teachers are DeBERTa-v2, so no cache groups and one line saying why
    storage = Storage(str(tmp_path / "store"))
    encoder_json = json.loads((tmp_path / "deberta" / "encoder" / "config.json").read_text())
    for key in {c.teacher_key for c in p.cells}:
        storage.write_json(encoder_json, TEACHERS, key, MODEL_DIR, "encoder", "config.json")
    capsys.readouterr()
    assert stages.cache_groups(cfg, p.cells, storage) == {}  # decided before any data is read (there is none)
    lines = [x for x in capsys.readouterr().out.splitlines() if "live" in x]
    assert lines == [f"[sweep] no caches, trials run the teacher live: {why}"]
    # a cache job for it fails in one line, and so does a reader asked for its parts
    with pytest.raises(K.CacheError, match="DeBERTa-v2 teacher's attention scores add relative-position terms"):
        K.cache_job(cfg, storage, tmp_path / "deberta", TARGET, None, (0, 2, 4))
    with pytest.raises(K.CacheError, match="cannot be read from a cache: .*live teacher"):
        _TeacherParts(TeacherLocation(str(tmp_path / "deberta")), (0, 2, 4), with_qk=False)

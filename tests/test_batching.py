"""Batch order (``data/batching.py``): each epoch's order is a function of (seed, epoch) — so a resumed stage sees
the order it would have seen — grouped by length it cuts padding, and dealt out to ranks it gives the same global
batches as one worker. Evaluation runs rows longest first and still returns features in row order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy import tiny_config, toy_splits, toy_tokenizer

from metakd_ray import cell
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.data.batching import EpochSampler, by_length, lengths_of
from metakd_ray.teacher.model import pooled_features

LENGTHS = [int(x) for x in np.random.default_rng(0).integers(5, 128, size=500)]


def padded_tokens(order, lengths, batch):
    return sum(max(lengths[i] for i in order[k:k + batch]) * len(order[k:k + batch])
               for k in range(0, len(order), batch))


@pytest.mark.parametrize("group", [True, False])
def test_an_epoch_is_a_permutation_fixed_by_seed_and_epoch(group):
    s = EpochSampler(LENGTHS, 32, seed=3, group_by_length=group, window=4)
    s.set_epoch(2)
    first = list(s)
    assert sorted(first) == list(range(len(LENGTHS)))
    again = EpochSampler(LENGTHS, 32, seed=3, group_by_length=group, window=4)  # a resumed run: a new sampler
    again.set_epoch(2)
    assert list(again) == first
    s.set_epoch(3)
    assert list(s) != first
    other = EpochSampler(LENGTHS, 32, seed=4, group_by_length=group, window=4)
    other.set_epoch(2)
    assert list(other) != first


def test_grouping_by_length_cuts_padding():
    real = sum(LENGTHS)
    rand = EpochSampler(LENGTHS, 32, seed=0, group_by_length=False)
    grouped = EpochSampler(LENGTHS, 32, seed=0, group_by_length=True, window=50)
    assert padded_tokens(list(grouped), LENGTHS, 32) < 0.75 * padded_tokens(list(rand), LENGTHS, 32)
    assert padded_tokens(list(grouped), LENGTHS, 32) >= real


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_share_out_the_global_batches(world):
    one = EpochSampler(LENGTHS, 32, seed=1, window=4)
    one.set_epoch(1)
    shards = []
    for rank in range(world):
        s = EpochSampler(LENGTHS, 32, seed=1, window=4, num_replicas=world, rank=rank)
        s.set_epoch(1)
        shards.append(list(s))
    assert len({len(x) for x in shards}) == 1
    order = list(one)
    per = 32 // world
    for k in range(len(LENGTHS) // 32):  # global batch k: the same rows, whatever the world size
        rows = {i for sh in shards for i in sh[k * per:(k + 1) * per]}
        assert rows == set(order[k * 32:(k + 1) * 32])


def test_eval_runs_longest_first_and_features_come_back_in_row_order(tmp_path):
    tok = toy_tokenizer()
    cfg = tiny_config(tmp_path)
    ds = cell.tokenize_splits(cfg, tok, x=toy_splits()["train"])["x"]
    loader = cell.eval_loader(ds, D.collator(tok))
    lens = lengths_of(ds)
    assert list(loader.sampler) == by_length(lens)
    assert [lens[i] for i in loader.sampler] == sorted(lens, reverse=True)
    enc = M.random_encoder(vocab_size=len(tok), max_position=32, dropout=0.0, seed=0)
    sorted_feats = pooled_features(enc, loader)
    plain = torch.utils.data.DataLoader(ds, batch_size=7, collate_fn=D.collator(tok))
    torch.testing.assert_close(sorted_feats, pooled_features(enc, plain), rtol=1e-4, atol=1e-5)


def test_training_loader_follows_the_compute_options(tmp_path):
    tok = toy_tokenizer()
    ds = cell.tokenize_splits(tiny_config(tmp_path), tok, x=toy_splits()["train"])["x"]
    on = cell.loader(ds, D.collator(tok), 8, 0, tiny_config(tmp_path).compute)
    off = cell.loader(ds, D.collator(tok), 8, 0, tiny_config(tmp_path, "compute.group_by_length=false").compute)
    assert on.sampler.group and not off.sampler.group
    assert sum(len(b["labels"]) for b in on) == len(ds)

"""Global batches: reproducible from (seed, epoch), no duplicate text, deferred not lost; collate pads per batch."""

import numpy as np
import pytest
import torch

from mnr.batching import Collator, GlobalBatchSampler, make_loader


def _ids_with_duplicates(n=200, seed=0):
    rng = np.random.default_rng(seed)
    # anchors drawn from a small pool so many examples share an anchor (like SNLI premises)
    anchors = rng.integers(0, 60, size=n)
    positives = np.arange(1000, 1000 + n)
    negatives = np.arange(5000, 5000 + n)
    negatives[::7] = 5000  # a negative text shared by many examples
    return np.stack([anchors, positives, negatives], axis=1)


def test_no_text_twice_in_a_global_batch():
    ids = _ids_with_duplicates()
    sampler = GlobalBatchSampler(ids, batch_size=8, world_size=2, seed=3)
    batches = sampler.global_batches(0)
    assert len(batches)
    for b in batches:
        texts = ids[b].reshape(-1)
        assert len(texts) == len(set(texts.tolist())) == 16 * 3


def test_examples_are_used_at_most_once_and_deferred_ones_come_first_in_the_next_batch():
    ids = _ids_with_duplicates()
    sampler = GlobalBatchSampler(ids, batch_size=8, seed=0)
    batches = sampler.global_batches(0)
    used = np.concatenate(batches)
    assert len(used) == len(set(used.tolist()))
    assert len(ids) - len(used) < 8 * 3  # only a small remainder waits for the next epoch's reshuffle
    # replay the first batch: examples scanned before it filled but clashing were deferred ...
    order = np.random.default_rng([0, 0]).permutation(len(ids)).tolist()
    last = order.index(int(batches[0][-1]))
    deferred = [i for i in order[:last] if i not in batches[0]]
    assert deferred, "this seed should produce a clash in the first batch"
    # ... and open the next batch (they never clash with each other here: distinct anchors)
    assert batches[1][: len(deferred)].tolist() == deferred


def test_order_is_a_function_of_seed_and_epoch():
    ids = _ids_with_duplicates()
    a = GlobalBatchSampler(ids, batch_size=4, seed=7)
    b = GlobalBatchSampler(ids, batch_size=4, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a.global_batches(1), b.global_batches(1)))
    assert not np.array_equal(a.global_batches(0)[0], a.global_batches(1)[0])
    assert not np.array_equal(a.global_batches(0)[0], GlobalBatchSampler(ids, batch_size=4, seed=8).global_batches(0)[0])
    # resuming at step k yields exactly the remaining batches
    assert [x.tolist() for x in a.local_batches(0, start_step=3)] == [x.tolist() for x in a.global_batches(0)[3:]]


def test_ranks_get_disjoint_equal_slices_of_each_global_batch():
    ids = _ids_with_duplicates()
    r0 = GlobalBatchSampler(ids, batch_size=5, world_size=2, rank=0, seed=2)
    r1 = GlobalBatchSampler(ids, batch_size=5, world_size=2, rank=1, seed=2)
    b0, b1 = r0.local_batches(0), r1.local_batches(0)
    assert len(b0) == len(b1) > 0
    for x, y, g in zip(b0, b1, r0.global_batches(0)):
        assert len(x) == len(y) == 5
        assert np.array_equal(np.concatenate([x, y]), g)


def test_too_little_data_for_one_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(np.arange(6).reshape(3, 2), batch_size=4)


def test_collate_pads_to_the_longest_in_role_major_order():
    token_ids = [[101, 5, 102], [101, 6, 7, 8, 102], [101, 102], [101, 9, 102]]
    text_ids = np.array([[0, 1], [2, 3]])
    out = Collator(token_ids, text_ids, pad_token_id=0)([0, 1])
    assert out["input_ids"].shape == (4, 5)  # [anchor0, anchor1, positive0, positive1], longest = 5
    assert out["input_ids"][0].tolist() == [101, 5, 102, 0, 0]
    assert out["input_ids"][1].tolist() == [101, 102, 0, 0, 0]
    assert out["input_ids"][2].tolist() == [101, 6, 7, 8, 102]
    assert out["attention_mask"].sum(1).tolist() == [3, 2, 5, 3]
    assert out["example_indices"].tolist() == [0, 1]


def test_loader_yields_this_ranks_batches():
    ids = np.arange(40).reshape(20, 2)
    token_ids = [[1, 2, 3]] * 40
    sampler = GlobalBatchSampler(ids, batch_size=4, world_size=2, rank=1, seed=0)
    loader = make_loader(sampler, Collator(token_ids, ids, 0), epoch=0, start_step=1)
    got = [b["example_indices"].tolist() for b in loader]
    assert got == [b.tolist() for b in sampler.local_batches(0, 1)]
    assert all(isinstance(b["input_ids"], torch.Tensor) for b in loader)


def test_data_that_cannot_fill_one_duplicate_free_batch_is_an_error_naming_the_clashes():
    ids = np.tile([[0, 1]], (40, 1))  # 40 copies of one pair: never two in one batch
    sampler = GlobalBatchSampler(ids, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="cannot fill one global batch of 8 without a text twice.*40 of them share"):
        sampler.steps_in_epoch(0)


def test_a_large_epoch_is_built_in_flat_arrays_with_every_property():
    rng = np.random.default_rng(0)
    n = 200_000
    ids = np.stack([rng.integers(0, n // 3, n), np.arange(n, 2 * n)], axis=1).astype(np.int32)  # anchors repeat
    lengths = rng.integers(3, 60, n)
    sampler = GlobalBatchSampler(ids, batch_size=32, world_size=2, seed=1, lengths=lengths, length_grouping=8)
    batches = sampler.global_batches(0)
    assert isinstance(batches, np.ndarray) and batches.shape[1] == 64
    flat = batches.reshape(-1)
    assert len(np.unique(flat)) == len(flat) > n - 10 * 64  # each used once, few left for the next epoch
    texts = np.sort(ids[batches].reshape(len(batches), -1), axis=1)
    assert not (texts[:, 1:] == texts[:, :-1]).any()  # no text twice in any global batch
    again = GlobalBatchSampler(ids, batch_size=32, world_size=2, seed=1, lengths=lengths, length_grouping=8)
    assert np.array_equal(again.global_batches(0), batches)


@pytest.mark.parametrize("grouping", [0, 8])
def test_the_fast_path_for_clean_runs_gives_the_same_batches_as_the_plain_fill(monkeypatch, grouping):
    rng = np.random.default_rng(5)
    n = 20_000
    ids = np.stack([rng.integers(0, 3000, n), np.arange(n, 2 * n), rng.integers(2 * n, 2 * n + 20000, n)], axis=1)
    make = lambda: GlobalBatchSampler(ids, 16, 2, 0, seed=4, lengths=rng.integers(1, 9, n) * 0 + ids[:, 0] % 7,
                                      length_grouping=grouping).global_batches(1)
    fast = make()
    monkeypatch.setattr(GlobalBatchSampler, "BULK_BATCHES", 0)
    assert np.array_equal(make(), fast)

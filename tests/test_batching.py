"""Global batches: reproducible from (seed, epoch), no duplicate text, deferred not lost; collate pads per batch.

The second half checks sharding from the processes' side (the loaders they iterate): what makes N processes x B
train like one process x N*B: the same examples in the same order, disjoint shares, equal step counts (no process
waits forever in a collective at the end of an epoch) and no text twice in the global batch.
"""

import numpy as np
import pytest
import torch

from conftest import token_texts
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


class _KeepsTheFirstWrite(np.ndarray):
    """Scratch whose repeated-index writes keep the first value written: numpy leaves that choice open."""

    def __setitem__(self, index, values):
        super().__setitem__(index[::-1], np.asarray(values)[::-1])


def test_first_use_is_each_texts_earliest_position_whichever_repeated_write_numpy_keeps():
    from mnr.batching import _first_use

    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = rng.integers(-1, 30, size=(40, 3))
        texts = [int(t) for t in rows.reshape(-1)]
        first = {t: texts.index(t) for t in texts}
        expected = [all(t == -1 or first[t] == 3 * i + j for j, t in enumerate(row))
                    for i, row in enumerate(rows.tolist())]
        for scratch in (np.zeros(32, dtype=np.int32), np.zeros(32, dtype=np.int32).view(_KeepsTheFirstWrite)):
            assert _first_use(rows, scratch).tolist() == expected


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
    out = Collator(token_texts(token_ids), text_ids, pad_token_id=0)([0, 1])
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
    loader = make_loader(sampler, Collator(token_texts(token_ids), ids, 0), epoch=0, start_step=1)
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


# ---- sharding over processes ----------------------------------------------------------------------


def text_ids(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) text ids with many shared anchors and one negative shared by every 5th example (like SNLI)."""
    rng = np.random.default_rng(seed)
    anchors = rng.integers(0, n // 3, size=n)
    positives = np.arange(10_000, 10_000 + n)
    negatives = np.arange(20_000, 20_000 + n)
    negatives[::5] = 20_000
    return np.stack([anchors, positives, negatives], axis=1)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [97, 250])
def test_processes_see_disjoint_equal_batches_without_repeated_text(world, n):
    ids = text_ids(n)
    tokens = [[t % 50 + 5] for t in range(30_000)]  # one token per text id: the collate is cheap
    collator = Collator(token_texts(tokens), ids, pad_token_id=0)
    for epoch in range(3):
        loaders = [list(make_loader(GlobalBatchSampler(ids, 3, world, rank, seed=1), collator, epoch))
                   for rank in range(world)]
        assert len({len(batches) for batches in loaders}) == 1 and len(loaders[0]) > 0  # same number of steps
        seen: set[int] = set()
        for step in zip(*loaders):
            examples = [b["example_indices"].numpy() for b in step]
            assert {len(e) for e in examples} == {3}  # equal-size batches on every process
            everyone = np.concatenate(examples)
            assert len(set(everyone.tolist())) == len(everyone)  # disjoint shares
            assert seen.isdisjoint(everyone.tolist())  # no example twice in an epoch
            seen.update(everyone.tolist())
            texts = ids[everyone].reshape(-1)
            assert len(set(texts.tolist())) == len(texts)  # no text twice in the global batch


def test_n_processes_of_b_get_exactly_the_batches_of_one_process_of_n_times_b():
    """Why a 2-process run can match a 1-process run weight for weight: same global batches, same order."""
    ids = text_ids(300)
    single = GlobalBatchSampler(ids, 8, 1, 0, seed=3)
    shards = [GlobalBatchSampler(ids, 4, 2, rank, seed=3) for rank in range(2)]
    for epoch in range(2):
        assert len(single.local_batches(epoch)) == len(shards[0].local_batches(epoch))
        for whole, *parts in zip(single.local_batches(epoch), *(s.local_batches(epoch) for s in shards)):
            assert np.array_equal(whole, np.concatenate(parts))


def test_resume_mid_epoch_gives_every_process_the_remaining_batches():
    ids = text_ids(200)
    for rank in range(2):
        sampler = GlobalBatchSampler(ids, 4, 2, rank, seed=0)
        full = sampler.local_batches(1)
        rest = sampler.local_batches(1, start_step=5)
        assert len(rest) == len(full) - 5
        assert all(np.array_equal(a, b) for a, b in zip(full[5:], rest))


def test_counting_the_steps_of_several_epochs_builds_each_epoch_once_and_keeps_the_first(monkeypatch):
    ids = _ids_with_duplicates()
    sampler = GlobalBatchSampler(ids, batch_size=8, world_size=2, seed=3)
    fresh = GlobalBatchSampler(ids, batch_size=8, world_size=2, seed=3)
    built = []
    real = GlobalBatchSampler._batches
    monkeypatch.setattr(GlobalBatchSampler, "_batches", lambda self, *a: built.append(1) or real(self, *a))
    total = sampler.total_steps(3)
    assert len(built) == 3
    assert total == sum(len(fresh.global_batches(e)) for e in range(3))
    assert sampler.steps_in_epoch(0) == len(fresh.global_batches(0))  # counted, not rebuilt
    assert (sampler.local_batches(0) == fresh.local_batches(0)).all()  # the first epoch to train, still kept
    assert len(built) == 3 + 4  # only `fresh` built anything more (epochs 0, 1, 2, then 0 again)

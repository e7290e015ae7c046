"""Sharding of the global batch over processes, seen from the processes' side (the loaders they iterate).

tests/test_batching.py checks the sampler's own bookkeeping; these tests check what makes N processes x B
train like one process x N*B: the same examples in the same order, disjoint shares, equal step counts (no
process waits forever in a collective at the end of an epoch) and no text twice in the global batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from mnr.batching import Collator, GlobalBatchSampler, make_loader


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
    collator = Collator(tokens, ids, pad_token_id=0)
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

"""Sharded evaluation and mining give every process the same number of batches (a process with none left computes
a copy and drops it), with the rows of one process; checked with a fake world of threads."""

import threading

import pytest
import torch

import mnr.distributed as distributed
import mnr.mine as mine
from mnr.evaluate import sharded


def run_world(monkeypatch, world: int, work):
    """work() on `world` threads, each seeing its own rank; all_gather_rows joins them as the collective does."""
    local, barrier = threading.local(), threading.Barrier(world)
    slots: list = [None] * world
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: local.rank)

    def all_gather_rows(tensor):
        slots[local.rank] = tensor
        barrier.wait()
        out = [t for t in slots if t is not None]
        barrier.wait()
        return out

    monkeypatch.setattr(distributed, "all_gather_rows", all_gather_rows)
    results: list = [None] * world

    def member(r):
        local.rank = r
        results[r] = work()

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("world,n_batches", [(3, 7), (4, 2), (2, 5), (3, 6)])
def test_every_process_computes_as_many_batches_and_gets_the_single_process_rows(monkeypatch, world, n_batches):
    batches = [list(range(3 * b, 3 * b + (3 if b < n_batches - 1 else 2))) for b in range(n_batches)]
    counts: dict[int, int] = {}

    def compute(mine_):
        counts[distributed.rank()] = len(mine_)
        return torch.cat([torch.tensor(idx, dtype=torch.float32)[:, None] * 10 for idx in mine_]) if mine_ else None

    alone = sharded(batches, compute)
    results = run_world(monkeypatch, world, lambda: sharded(batches, compute))
    assert set(counts.values()) == {-(-n_batches // world)}
    assert all(torch.equal(r, alone) for r in results)


def test_mining_searches_as_many_query_chunks_on_every_process(monkeypatch):
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    monkeypatch.setattr(mine, "QUERY_CHUNK", 2)  # 5 chunks over 3 processes
    import mnr.retrieval as retrieval

    real, calls = retrieval.top_k, {}

    def counting(*args, **kwargs):
        r = distributed.rank()
        calls[r] = calls.get(r, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(retrieval, "top_k", counting)
    alone = mine.search(queries, docs, 4)
    calls.clear()
    results = run_world(monkeypatch, 3, lambda: mine.search(queries, docs, 4))
    assert calls == {0: 2, 1: 2, 2: 2}
    assert all(torch.equal(s, alone[0]) and torch.equal(i, alone[1]) for s, i in results)

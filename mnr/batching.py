"""Global batches: seeded order, no text twice in a global batch, sharded over processes, resumable.

The order of epoch e is a pure function of (seed, epoch); a position in training is (epoch, step), so a
resumed run rebuilds the same batches and skips the consumed ones by index (nothing is re-read).
"""

from __future__ import annotations

import numpy as np
import torch


def _first_use(candidate_rows: np.ndarray, first_seen: np.ndarray) -> np.ndarray:
    """(k, roles) text ids of candidates in order -> (k,) whether each candidate's texts all appear there for the
    first time (no earlier candidate, taken or not, used any of them). first_seen is scratch, text id -> position."""
    texts = candidate_rows.reshape(-1)
    pos = np.arange(len(texts))
    first_seen[texts[::-1]] = pos[::-1]  # repeated index: the last write (earliest position) wins
    return (first_seen[texts] == pos).reshape(len(candidate_rows), -1).all(axis=1)


class GlobalBatchSampler:
    """Builds global batches of `batch_size * world_size` examples and hands out this process's slice.

    No text (anchor, positive or negative) appears twice in one global batch: a duplicate would be a false
    negative for some anchor.  Each batch is filled from a candidate list: the examples deferred so far (in
    order; up to `DEFERRED_WINDOW` global batches' worth of them) followed by fresh examples of the shuffled
    order.  A candidate is taken when none of its texts occurred in an earlier candidate of that list (taken
    or not: this makes the fill one vectorised pass), until the batch is full; candidates passed over before
    that point are deferred to the front of the next batch, so they land in later batches instead of being
    lost.  Examples left over at the end of an epoch (fewer than one global batch, or only mutually clashing
    ones) wait for the next epoch's reshuffle: every process always gets equally many, equally sized batches
    (no hang at epoch end).  An epoch that cannot fill a single batch is an error naming the clashes.

    Length grouping (length_grouping = k > 1, needs `lengths`): the shuffled order is cut into windows of
    k global batches, each window sorted by example length, and the finished batches are shuffled.  Which
    examples share a window stays random and the no-duplicate rule is unchanged; batches hold texts of
    similar length, so they pad less.  k = 0 or 1 keeps the plain shuffled order.

    Everything is held in flat integer arrays (the text ids are read, never copied into Python objects).
    """

    DEFERRED_WINDOW = 4
    BULK_BATCHES = 512  # 0: the candidate-list fill for every batch (same batches, slower)

    def __init__(self, text_ids: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 lengths: np.ndarray | None = None, length_grouping: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: batch_size={batch_size}, world_size={world_size}, rank={rank}")
        self.text_ids = text_ids if isinstance(text_ids, np.ndarray) else np.asarray(text_ids)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch_size = batch_size * world_size
        self.length_grouping = length_grouping
        self.lengths = None if lengths is None else np.asarray(lengths)
        if length_grouping > 1 and (self.lengths is None or len(self.lengths) != len(self.text_ids)):
            raise ValueError(f"length_grouping={length_grouping} needs one length per example")
        if len(self.text_ids) < self.global_batch_size:
            raise ValueError(f"the training data has {len(self.text_ids)} usable examples, fewer than one global "
                             f"batch of {self.global_batch_size} (batch size {batch_size} x {world_size} "
                             f"processes): lower --batch-size or add data")
        self._cache: tuple[int, np.ndarray] | None = None

    def global_batches(self, epoch: int) -> np.ndarray:
        """(steps, global batch size) example indices of an epoch, a pure function of (seed, epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n, size = len(self.text_ids), self.global_batch_size
        order = self._order(rng)
        index = order.dtype
        grouped = self.length_grouping > 1
        rows = np.asarray(self.text_ids)  # a mapped store stays mapped: rows are gathered per candidate list
        first_seen = np.zeros(int(rows.max()) + 1, dtype=np.int32)  # scratch: text -> first position in a list
        batches = np.empty((n // size, size), dtype=index)
        deferred = np.empty(0, dtype=index)
        max_deferred = self.DEFERRED_WINDOW * size
        n_batches, next_fresh = 0, 0
        run = 1  # clean batches to try in one go: grows while runs succeed
        while n_batches < len(batches):
            if len(deferred) == 0 and self.BULK_BATCHES:
                # fast path, same result: with nothing deferred, a run of fresh batches that hold no text twice
                # is taken as it stands (the fill below would take exactly these); stop at the first clash
                k = min(run, (n - next_fresh) // size, len(batches) - n_batches)
                block = order[next_fresh:next_fresh + k * size].reshape(k, size)
                texts = np.sort(rows[block].reshape(k, -1), axis=1)
                clash = (texts[:, 1:] == texts[:, :-1]).any(axis=1)
                clean = int(np.argmax(clash)) if clash.any() else k
                batches[n_batches:n_batches + clean] = block[:clean]
                n_batches, next_fresh = n_batches + clean, next_fresh + clean * size
                run = min(2 * run, self.BULK_BATCHES) if clean == k else max(1, clean)
                if clean == k:
                    continue
            head, rest = deferred[:max_deferred], deferred[max_deferred:]
            take = size
            if len(head) == 0 and next_fresh >= n:
                break
            while True:  # widen the fresh part until the batch fills or the epoch runs out
                cands = np.concatenate([head, order[next_fresh:next_fresh + take]])
                ok = _first_use(rows[cands], first_seen)
                filled = np.cumsum(ok)
                if filled[-1] >= size or next_fresh + take >= n:
                    break
                take *= 2
            if filled[-1] < size:
                break  # what is left cannot fill a batch without a duplicate
            cut = int(np.searchsorted(filled, size)) + 1  # candidates up to the size-th taken one
            batches[n_batches] = cands[:cut][ok[:cut]]
            n_batches += 1
            passed = cands[:cut][~ok[:cut]]
            deferred = np.concatenate([passed, head[cut:], rest])  # head[cut:] is empty when the cut is past it
            next_fresh += max(0, cut - len(head))
        batches = batches[:n_batches]
        if n_batches == 0:
            raise ValueError(self._cannot_fill())
        if grouped:  # else every window would run short to long
            batches = batches[rng.permutation(n_batches)]
        self._cache = (epoch, batches)
        return batches

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's shuffled example order; with length grouping, stable-sorted by length inside each window of
        k global batches."""
        n = len(self.text_ids)
        index = np.int32 if n < 2**31 else np.int64  # example indices: half the memory below 2^31 examples
        order = rng.permutation(n).astype(index)
        if self.length_grouping > 1:
            window = self.length_grouping * self.global_batch_size
            order = order[np.lexsort((self.lengths[order], np.arange(n) // window))]
        return order

    def _cannot_fill(self) -> str:
        texts, counts = np.unique(np.asarray(self.text_ids), return_counts=True)
        shared = texts[counts > 1]
        clashing = int(np.isin(np.asarray(self.text_ids), shared).any(axis=1).sum())
        return (f"the {len(self.text_ids)} training examples cannot fill one global batch of "
                f"{self.global_batch_size} without a text twice (a false negative): {clashing} of them share a "
                f"text with another example ({len(texts)} distinct texts); lower --batch-size or add varied data")

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.global_batches(epoch))

    def local_batches(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """(steps, batch size) this process's slice of each global batch of the epoch, from `start_step` on."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return self.global_batches(epoch)[start_step:, lo:hi]


def example_lengths(token_ids: list[list[int]], text_ids: np.ndarray) -> np.ndarray:
    """(n_examples,) token length of each example's longest text: what its batch is padded to."""
    text_lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    return text_lengths[np.asarray(text_ids)].max(axis=1)


class Collator:
    """Example indices -> one padded tensor over [anchors; positives; negatives] (padded to the longest).

    `token_ids[t]` are the ids of text t: a list of lists, or a store's mapped `TokenTexts` (then the rows
    are gathered straight from the mapped flat array, no per-text object made)."""

    def __init__(self, token_ids, text_ids: np.ndarray, pad_token_id: int):
        self.token_ids = token_ids
        self.text_ids = text_ids if isinstance(text_ids, np.ndarray) else np.asarray(text_ids)
        self.pad_token_id = pad_token_id

    def __call__(self, example_indices) -> dict[str, torch.Tensor]:
        example_indices = np.asarray(example_indices, dtype=np.int64)
        rows = np.asarray(self.text_ids[example_indices]).T.reshape(-1)  # role-major: all anchors, then positives, ...
        offsets = getattr(self.token_ids, "offsets", None)
        if offsets is not None:
            starts = np.asarray(offsets[rows])
            lengths = np.asarray(offsets[rows + 1]) - starts
            mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
            flat = np.asarray(self.token_ids.tokens[np.where(mask, starts[:, None] + np.arange(mask.shape[1]), 0)])
            input_ids = np.where(mask, flat, self.pad_token_id).astype(np.int64)
        else:
            seqs = [self.token_ids[t] for t in rows]
            lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
            mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
            input_ids = np.full(mask.shape, self.pad_token_id, dtype=np.int64)
            input_ids[mask] = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                "example_indices": torch.from_numpy(example_indices)}


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Rows:
    """The rows of a 2-D index array as lists, made one at a time (the DataLoader's batch sampler)."""

    def __init__(self, batches: np.ndarray):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return (row.tolist() for row in self.batches)


def make_loader(sampler: GlobalBatchSampler, collator: Collator, epoch: int, start_step: int = 0,
                num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over this process's batches of one epoch (collation can run in worker processes)."""
    return torch.utils.data.DataLoader(
        _Indices(len(sampler.text_ids)), batch_sampler=_Rows(sampler.local_batches(epoch, start_step)),
        collate_fn=collator, num_workers=num_workers, pin_memory=pin_memory,
        # its own generator: creating the iterator must not draw from the global RNG, which drives dropout and
        # is saved/restored on resume (a resumed run creates its loader at a different point in that stream)
        generator=torch.Generator().manual_seed(sampler.seed))

"""Global batches: seeded order, no text twice in a global batch, sharded over processes, resumable.

The order of epoch e is a pure function of (seed, epoch); a position in training is (epoch, step), so a
resumed run rebuilds the same batches and skips the consumed ones by index (nothing is re-read).
"""

from __future__ import annotations

import numpy as np
import torch


class GlobalBatchSampler:
    """Builds global batches of `batch_size * world_size` examples and hands out this process's slice.

    No text (anchor, positive or negative) appears twice in one global batch: a duplicate would be a false
    negative for some anchor.  An example that would repeat a text is deferred to the front of the next
    batch, so skipped examples land in later batches instead of being lost.  Examples left over at the end
    of an epoch (fewer than one global batch, or only mutually clashing ones) wait for the next epoch's
    reshuffle: every process always gets equally many, equally sized batches (no hang at epoch end).

    Length grouping (length_grouping = k > 1, needs `lengths`): the shuffled order is cut into windows of
    k global batches, each window sorted by example length, and the finished batches are shuffled.  Which
    examples share a window stays random and the no-duplicate rule is unchanged; batches hold texts of
    similar length, so they pad less.  k = 0 or 1 keeps the plain shuffled order.
    """

    def __init__(self, text_ids: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 lengths: np.ndarray | None = None, length_grouping: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: batch_size={batch_size}, world_size={world_size}, rank={rank}")
        self.text_ids = np.asarray(text_ids)
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
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of an epoch, each an array of example indices (deterministic in seed, epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.text_ids))
        rows = self.text_ids.tolist()
        size = self.global_batch_size
        grouped = self.length_grouping > 1
        if grouped:
            window = self.length_grouping * size
            order = np.concatenate([w[np.argsort(self.lengths[w], kind="stable")]
                                    for w in np.split(order, range(window, len(order), window))])
        batches: list[np.ndarray] = []
        deferred: list[int] = []  # examples that clashed with an earlier batch, in order: they go first
        next_fresh = 0
        while True:
            batch: list[int] = []
            seen: set[int] = set()
            still_deferred: list[int] = []
            for idx in deferred:
                if len(batch) < size and seen.isdisjoint(rows[idx]):
                    batch.append(idx)
                    seen.update(rows[idx])
                else:
                    still_deferred.append(idx)
            while len(batch) < size and next_fresh < len(order):
                idx = int(order[next_fresh])
                next_fresh += 1
                if seen.isdisjoint(rows[idx]):
                    batch.append(idx)
                    seen.update(rows[idx])
                else:
                    still_deferred.append(idx)
            deferred = still_deferred
            if len(batch) < size:
                break  # what is left cannot fill a batch without a duplicate
            batches.append(np.asarray(batch, dtype=np.int64))
        if grouped:  # else every window would run short to long
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.global_batches(epoch))

    def local_batches(self, epoch: int, start_step: int = 0) -> list[np.ndarray]:
        """This process's slice of each global batch of the epoch, from `start_step` on."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [batch[lo:hi] for batch in self.global_batches(epoch)[start_step:]]


def example_lengths(token_ids: list[list[int]], text_ids: np.ndarray) -> np.ndarray:
    """(n_examples,) token length of each example's longest text: what its batch is padded to."""
    text_lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    return text_lengths[np.asarray(text_ids)].max(axis=1)


class Collator:
    """Example indices -> one padded tensor over [anchors; positives; negatives] (padded to the longest)."""

    def __init__(self, token_ids: list[list[int]], text_ids: np.ndarray, pad_token_id: int):
        self.token_ids = token_ids
        self.text_ids = np.asarray(text_ids)
        self.pad_token_id = pad_token_id

    def __call__(self, example_indices) -> dict[str, torch.Tensor]:
        example_indices = np.asarray(example_indices, dtype=np.int64)
        rows = self.text_ids[example_indices].T.reshape(-1)  # role-major: all anchors, then positives, ...
        seqs = [self.token_ids[t] for t in rows]
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, seq in enumerate(seqs):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "example_indices": torch.from_numpy(example_indices)}


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make_loader(sampler: GlobalBatchSampler, collator: Collator, epoch: int, start_step: int = 0,
                num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over this process's batches of one epoch (collation can run in worker processes)."""
    return torch.utils.data.DataLoader(
        _Indices(len(sampler.text_ids)), batch_sampler=[b.tolist() for b in sampler.local_batches(epoch, start_step)],
        collate_fn=collator, num_workers=num_workers, pin_memory=pin_memory,
        # its own generator: creating the iterator must not draw from the global RNG, which drives dropout and
        # is saved/restored on resume (a resumed run creates its loader at a different point in that stream)
        generator=torch.Generator().manual_seed(sampler.seed))

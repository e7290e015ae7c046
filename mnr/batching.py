"""Global batches: seeded order, no text twice in a global batch, sharded over processes, resumable.

The order of epoch e is a pure function of (seed, epoch); a position in training is (epoch, step), so a
resumed run rebuilds the same batches and skips the consumed ones by index (nothing is re-read).
With several sources, every global batch is drawn from one source (`SOURCE_SAMPLING` says which source
each step takes); the k negatives of an example are chosen per epoch by the Collator.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mnr.backbone import pad_tokens
from mnr.config import parse_sampling
from mnr.data import NO_TEXT

SOURCE_SAMPLING = ("proportional", "round-robin", "temperature:T")


def _first_use(candidate_rows: np.ndarray, first_seen: np.ndarray) -> np.ndarray:
    """(k, roles) text ids of candidates in order -> (k,) whether each candidate's texts all appear there for the
    first time (no earlier candidate, taken or not, used any of them). first_seen is scratch, text id -> position;
    its last slot takes the empty negative slots (-1), which never clash."""
    texts = candidate_rows.reshape(-1)
    empty = texts == NO_TEXT
    texts = np.where(empty, len(first_seen) - 1, texts)
    pos = np.arange(len(texts), dtype=first_seen.dtype)
    # numpy leaves open which of the repeated writes to a text's slot stays: written last to first (numpy keeps
    # the last one today, the earliest position), then every slot lowered until no earlier position is left
    first_seen[texts[::-1]] = pos[::-1]
    while True:
        seen = first_seen[texts]
        earlier = pos < seen
        if not earlier.any():
            break
        first_seen[texts[earlier]] = pos[earlier]
    return ((seen == pos) | empty).reshape(len(candidate_rows), -1).all(axis=1)


def steps_per_source(batches: np.ndarray, weights: np.ndarray, rule: str) -> np.ndarray:
    """How many of an epoch's sum(batches) steps each source takes: in proportion to weight x batches
    (proportional), to (weight x batches)^(1/T) (temperature:T) or to the weight alone (round-robin); rounded by
    largest remainder.  A source given more steps than it has batches is cycled (reshuffled), one given fewer
    uses a fresh random part of its examples each epoch."""
    kind, temperature = parse_sampling(rule)
    share = weights * (1.0 if kind == "round-robin" else batches.astype(float))
    share = share ** (1.0 / temperature)
    total = int(batches.sum())
    exact = share / share.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[:total - counts.sum()]] += 1
    return counts


def interleave(counts: np.ndarray, rule: str, rng: np.random.Generator) -> np.ndarray:
    """(steps,) the source of each step: evenly spread in turn (round-robin), else a seeded shuffle."""
    if parse_sampling(rule)[0] == "round-robin":
        slots = np.concatenate([(np.arange(c) + 0.5) / c for c in counts]) if counts.sum() else np.empty(0)
        ids = np.repeat(np.arange(len(counts)), counts)
        return ids[np.lexsort((ids, slots))]
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


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

    Sources (`sources`, the source of each example, and more than one source): each source's examples are
    batched on their own (the same fill, seeded by (seed, epoch, source)), and the epoch's steps are shared out
    by `sampling` and `weights` (see steps_per_source) and interleaved (see interleave): every global batch,
    all processes at the same step, holds one source's examples.  `batch_sources(epoch)` names each step's.

    Empty negative slots (-1) never clash.  Everything is held in flat integer arrays (the text ids are read,
    never copied into Python objects).
    """

    DEFERRED_WINDOW = 4
    BULK_BATCHES = 512  # 0: the candidate-list fill for every batch (same batches, slower)

    def __init__(self, text_ids: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 lengths: np.ndarray | None = None, length_grouping: int = 0, sources: np.ndarray | None = None,
                 weights=None, sampling: str = "proportional", source_names: list[str] | None = None):
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
        self._steps: dict[int, int] = {}  # epoch -> its number of global batches
        self._max_text: int | None = None
        self._schedules: dict[int, np.ndarray] = {}  # epoch -> source of each step (per-source batches only)
        self._set_sources(sources, weights, sampling, source_names)

    def _set_sources(self, sources, weights, sampling: str, names) -> None:
        self.sampling = sampling
        parse_sampling(sampling)
        sources = None if sources is None else np.asarray(sources)
        n_sources = 0 if sources is None or not len(sources) else int(sources.max()) + 1
        self.source_names = list(names) if names else [str(s) for s in range(n_sources)]
        self.by_source = None if n_sources < 2 else [np.flatnonzero(sources == s) for s in range(n_sources)]
        self.weights = np.ones(max(n_sources, 1)) if weights is None else np.asarray(weights, dtype=float)
        if self.by_source is None:
            return
        if len(self.weights) != n_sources or not (self.weights > 0).all():
            raise ValueError(f"source weights {self.weights.tolist()} are invalid: one positive weight per source "
                             f"({n_sources})")
        for name, index in zip(self.source_names, self.by_source):
            if len(index) < self.global_batch_size:
                raise ValueError(f"source {name} has {len(index)} usable examples, fewer than one global batch of "
                                 f"{self.global_batch_size}: lower --batch-size, drop it or pass --mix-sources")

    def global_batches(self, epoch: int) -> np.ndarray:
        """(steps, global batch size) example indices of an epoch, a pure function of (seed, epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.by_source is None:
            batches = self._batches(np.random.default_rng([self.seed, epoch]), None)
        else:
            batches = self._per_source(epoch)
        self._cache = (epoch, batches)
        return batches

    def _per_source(self, epoch: int) -> np.ndarray:
        """One source per global batch: each source's own batches, cycled or cut to its share, interleaved."""
        first = [self._batches(np.random.default_rng([self.seed, epoch, 1 + s, 0]), index)
                 for s, index in enumerate(self.by_source)]
        counts = steps_per_source(np.array([len(b) for b in first]), self.weights, self.sampling)
        schedule = interleave(counts, self.sampling, np.random.default_rng([self.seed, epoch, 0]))
        batches = np.empty((len(schedule), self.global_batch_size), dtype=first[0].dtype)
        for s, index in enumerate(self.by_source):
            pool, cycle = [first[s]], 0
            while sum(map(len, pool)) < counts[s]:  # more steps than batches: the source again, reshuffled
                cycle += 1
                pool.append(self._batches(np.random.default_rng([self.seed, epoch, 1 + s, cycle]), index))
            batches[schedule == s] = np.concatenate(pool)[:counts[s]]
        self._schedules[epoch] = schedule.astype(np.int16)
        return batches

    def batch_sources(self, epoch: int) -> np.ndarray | None:
        """(steps,) the source index of each global batch of the epoch; None when batches mix sources."""
        if self.by_source is None:
            return None
        if epoch not in self._schedules:
            self.global_batches(epoch)
        return self._schedules[epoch]

    def steps_by_source(self, epoch: int, step_in_epoch: int) -> dict[str, int] | None:
        """Steps each source gave from the start of training to (epoch, step_in_epoch); None if mixed."""
        if self.by_source is None:
            return None
        n = len(self.by_source)
        counts = sum((np.bincount(self.batch_sources(e), minlength=n) for e in range(epoch)), np.zeros(n, np.int64))
        counts = counts + np.bincount(self.batch_sources(epoch)[:step_in_epoch], minlength=n)
        return {name: int(c) for name, c in zip(self.source_names, counts)}

    def _batches(self, rng: np.random.Generator, subset: np.ndarray | None) -> np.ndarray:
        """The duplicate-free global batches of one shuffled pass over `subset` (None: every example)."""
        batches = self._fill(self._order(rng, subset))
        if len(batches) == 0:
            raise ValueError(self._cannot_fill(subset))
        if self.length_grouping > 1:  # else every window would run short to long
            batches = batches[rng.permutation(len(batches))]
        return batches

    def _fill(self, order: np.ndarray) -> np.ndarray:
        """Global batches taken in `order` (the candidate-list fill described in the class docstring)."""
        n, size = len(order), self.global_batch_size
        index = order.dtype
        rows = np.asarray(self.text_ids)  # a mapped store stays mapped: rows are gathered per candidate list
        if self._max_text is None:
            self._max_text = int(rows.max())
        first_seen = np.zeros(self._max_text + 2, dtype=np.int32)  # scratch: text -> first position in a list
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
                clash = ((texts[:, 1:] == texts[:, :-1]) & (texts[:, 1:] != NO_TEXT)).any(axis=1)
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
        return batches[:n_batches]

    def _order(self, rng: np.random.Generator, subset: np.ndarray | None = None) -> np.ndarray:
        """The shuffled example order (of `subset`, or of all examples); with length grouping, stable-sorted by
        length inside each window of k global batches."""
        n = len(self.text_ids) if subset is None else len(subset)
        index = np.int32 if len(self.text_ids) < 2**31 else np.int64  # half the memory below 2^31 examples
        order = rng.permutation(n).astype(index)
        if subset is not None:
            order = subset[order].astype(index)
        if self.length_grouping > 1:
            window = self.length_grouping * self.global_batch_size
            order = order[np.lexsort((self.lengths[order], np.arange(n) // window))]
        return order

    def _cannot_fill(self, subset: np.ndarray | None = None) -> str:
        rows = np.asarray(self.text_ids) if subset is None else np.asarray(self.text_ids)[subset]
        texts, counts = np.unique(rows[rows != NO_TEXT], return_counts=True)
        shared = texts[counts > 1]
        clashing = int(np.isin(rows, shared).any(axis=1).sum())
        return (f"the {len(rows)} training examples cannot fill one global batch of "
                f"{self.global_batch_size} without a text twice (a false negative): {clashing} of them share a "
                f"text with another example ({len(texts)} distinct texts); lower --batch-size or add varied data")

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._steps:
            self._steps[epoch] = len(self.global_batches(epoch))
        return self._steps[epoch]

    def total_steps(self, epochs: int) -> int:
        """Steps in `epochs` epochs.  Epoch 0 is counted last, so the batches kept (one epoch's) are the first to
        train: every epoch is built once here, none twice before training starts."""
        return sum(self.steps_in_epoch(e) for e in [*range(1, epochs), 0])

    def local_batches(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """(steps, batch size) this process's slice of each global batch of the epoch, from `start_step` on."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return self.global_batches(epoch)[start_step:, lo:hi]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a counter -> a well-mixed random key."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def choose_negatives(rows: np.ndarray, example_indices: np.ndarray, k: int, seed: int, epoch: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(B, 2 + K) text ids (-1: empty slot) -> (B, 2 + k) ids and (B, k) which negative slots are real.

    An example with more than k negatives gets k of them drawn by a key hashed from (seed, epoch, example,
    slot): a pure function of (seed, epoch), different each epoch.  An example with fewer than k uses what it
    has: its empty slots hold its positive's text id and are masked out of the loss (the collator leaves them
    out of the forward: `_without_empty_slots`).  With exactly k negatives everywhere the rows pass through unchanged."""
    negatives = rows[:, 2:]
    valid = negatives != NO_TEXT
    if negatives.shape[1] > k or not valid.all():
        with np.errstate(over="ignore"):
            pair = np.array([seed % 2**64, epoch % 2**64], dtype=np.uint64)
            base = _mix64(pair * np.uint64(0x9E3779B1)).sum(dtype=np.uint64)
            slot = example_indices.astype(np.uint64)[:, None] * np.uint64(negatives.shape[1]) + np.arange(
                negatives.shape[1], dtype=np.uint64)
            keys = _mix64(slot ^ _mix64(base))
        keys[~valid] = np.iinfo(np.uint64).max  # real negatives first
        pick = np.argsort(keys, axis=1, kind="stable")[:, :k]
        negatives, valid = np.take_along_axis(negatives, pick, 1), np.take_along_axis(valid, pick, 1)
    if negatives.shape[1] < k:
        pad = k - negatives.shape[1]
        negatives = np.pad(negatives, ((0, 0), (0, pad)), constant_values=NO_TEXT)
        valid = np.pad(valid, ((0, 0), (0, pad)))
    negatives = np.where(valid, negatives, rows[:, 1:2])
    return np.concatenate([rows[:, :2], negatives], axis=1), valid


class Collator:
    """Example indices -> one padded tensor over [anchors; positives; negatives] (padded to the longest).

    `token_ids` is a store's mapped `TokenTexts` (text t is `tokens[offsets[t]:offsets[t + 1]]`): the rows are
    gathered straight from the mapped flat array, no per-text object made, and padded with `pad_token_id` on
    `padding_side` (the run's TokenPolicy says both; mnr.backbone.pad_tokens, as the evaluators pad).
    negatives_per_query k (None: every column of text_ids as it stands): each example gets k negatives,
    chosen per epoch (`for_epoch`, see choose_negatives); with `masked`, the batch also carries
    "negative_mask" (B, k), False where an example had fewer than k (set it when any example of the data
    has fewer: every process must then pass a mask, or the gathers would not match).
    An empty slot is not embedded: the batch then also carries "row_index" ((2 + k) * B,), which row of
    input_ids each role-major row is (an empty slot names its positive's row), and the encoder's output is
    indexed with it before the loss; without empty slots in the batch there is no row_index.
    `left_out` ((n_sources, 2) ints: the query's and the document's prompt tokens the pooling leaves out, per
    source; `sources` the source of each example, None: one source): the batch also carries "prompt_lengths"
    (rows,), each row's (include_prompt: false)."""

    def __init__(self, token_ids, text_ids: np.ndarray, pad_token_id: int, negatives_per_query: int | None = None,
                 masked: bool = False, seed: int = 0, padding_side: str = "right", left_out=None,
                 sources: np.ndarray | None = None):
        self.token_ids = token_ids
        self.text_ids = text_ids if isinstance(text_ids, np.ndarray) else np.asarray(text_ids)
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.k, self.masked, self.seed, self.epoch = negatives_per_query, masked, seed, 0
        self.left_out = None if left_out is None else np.asarray(left_out, dtype=np.int64).reshape(-1, 2)
        # False: every slot is embedded, so every process's batch has (2 + k) * B rows (sharded parameters need
        # the same forwards on every process: GradCache's chunks, the length buckets)
        self.compact = True
        self.sources = None if sources is None else np.asarray(sources, dtype=np.int64)

    def for_epoch(self, epoch: int) -> "Collator":
        """This collator drawing the negatives of `epoch`."""
        out = copy.copy(self)
        out.epoch = epoch
        return out

    def __call__(self, example_indices) -> dict[str, torch.Tensor]:
        example_indices = np.asarray(example_indices, dtype=np.int64)
        chosen = np.asarray(self.text_ids[example_indices])
        valid = None
        if self.k is not None:
            chosen, valid = choose_negatives(chosen, example_indices, self.k, self.seed, self.epoch)
        rows = chosen.T.reshape(-1)  # role-major: all anchors, then positives, then 1st negatives ...
        row_index, kept = None, slice(None)
        if self.compact and valid is not None and not valid.all():  # empty slots: embed their positive once
            kept, row_index = _without_empty_slots(valid)
            rows = rows[kept]
        offsets = self.token_ids.offsets
        starts = np.asarray(offsets[rows])
        input_ids, mask = pad_tokens(self.token_ids.tokens, starts, np.asarray(offsets[rows + 1]) - starts,
                                     self.pad_token_id, self.padding_side)
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                 "example_indices": torch.from_numpy(example_indices)}
        if self.masked:
            batch["negative_mask"] = torch.from_numpy(valid)
        if row_index is not None:
            batch["row_index"] = torch.from_numpy(row_index)
        if self.left_out is not None:
            batch["prompt_lengths"] = torch.from_numpy(self._prompt_lengths(example_indices, chosen.shape[1])[kept])
        return batch

    def _prompt_lengths(self, example_indices: np.ndarray, n_roles: int) -> np.ndarray:
        """((n_roles * B,) role-major) the prompt tokens each row's pooling leaves out: its source's query
        prompt's for an anchor, its document prompt's for a positive or negative."""
        source = np.zeros(len(example_indices), np.int64) if self.sources is None else self.sources[example_indices]
        per_role = self.left_out[source]  # (B, 2): query, document
        return np.concatenate([per_role[:, 0]] + [per_role[:, 1]] * (n_roles - 1))


def _without_empty_slots(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which role-major rows of a batch ((2 + k) * B,) are kept when the empty negative slots ((B, k) `valid`
    False) are left out, and for every original row its position among those kept: an empty slot of example b
    points at the row of b's positive (B + b), which is what the slot held."""
    b = valid.shape[0]
    keep = np.concatenate([np.ones(2 * b, dtype=bool), valid.T.reshape(-1)])
    position = np.cumsum(keep) - 1
    positive = b + np.arange(len(keep)) % b
    return keep, np.where(keep, position, positive).astype(np.int64)


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


def make_loader(sampler: GlobalBatchSampler, collator: Collator, epoch: int, start_step: int = 0
                ) -> torch.utils.data.DataLoader:
    """A DataLoader over this process's batches of one epoch, collated in this process."""
    return torch.utils.data.DataLoader(
        _Indices(len(sampler.text_ids)), batch_sampler=_Rows(sampler.local_batches(epoch, start_step)),
        collate_fn=collator.for_epoch(epoch),
        # its own generator: creating the iterator must not draw from the global RNG, which drives dropout and
        # is saved/restored on resume (a resumed run creates its loader at a different point in that stream)
        generator=torch.Generator().manual_seed(sampler.seed))

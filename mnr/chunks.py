"""Token-budget mini-batches for GradCache: chunk a step's rows by tokens instead of by a fixed row count.

A chunk is a run of consecutive rows (rows stay in order, so the cached embeddings line up with the loss) whose
cost is at most `budget` tokens: rows x longest row when padded, the sum of lengths when unpadded.  A row over
the budget alone gets its own chunk.  The lengths come from the collator's CPU mask: no host sync in the step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from mnr.gradcache import cached_loss_and_backward


def token_budget_chunks(lengths: Sequence[int] | np.ndarray | torch.Tensor, budget: int,
                        padded: bool = True) -> list[np.ndarray]:
    """Row indices of each chunk, in order, covering every row once; greedy: a chunk grows while it fits."""
    if budget < 1:
        raise ValueError(f"budget={budget} is invalid: a token budget is at least 1")
    lengths = np.asarray(lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths, dtype=np.int64)
    chunks, start, longest, total = [], 0, 0, 0
    for i, n in enumerate(lengths.tolist()):
        cost = (i - start + 1) * max(longest, n) if padded else total + n
        if i > start and cost > budget:
            chunks.append(np.arange(start, i))
            start, longest, total = i, 0, 0
        longest, total = max(longest, n), total + n
    if len(lengths):
        chunks.append(np.arange(start, len(lengths)))
    return chunks


def chunk_sizes(chunks: list[np.ndarray]) -> list[int]:
    """Rows per chunk: what `Tensor.split` takes for consecutive chunks."""
    return [len(c) for c in chunks]


def cached_loss_and_backward_by_tokens(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                       budget: int, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                                       backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                                       no_sync: Callable[[torch.nn.Module], object] | None = None,
                                       padded: bool = True, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """GradCache over token-budget chunks: `cached_loss_and_backward` with the chunks' row counts as its split
    sizes (Tensor.split takes a list).  `lengths`: the rows' token counts when known on the host (the collator's
    mask), else read from attention_mask (one host sync)."""
    lengths = attention_mask.sum(dim=1) if lengths is None else lengths
    sizes = chunk_sizes(token_budget_chunks(lengths, budget, padded))
    return cached_loss_and_backward(model, input_ids, attention_mask, sizes, loss_fn, backward, no_sync)

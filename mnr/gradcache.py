"""GradCache (cached MNR): batches larger than memory at the gradient of the full-batch loss.

1. embed the batch in chunks of M rows without a graph (remembering each chunk's RNG state);
2. compute the loss on the detached embeddings and its gradient w.r.t. those embeddings;
3. re-embed chunk by chunk with a graph, under the same RNG state (so dropout matches), and
   backpropagate the cached embedding gradient: d(loss)/d(theta) = sum_chunks (dL/de) . (de/dtheta).
Peak activation memory is that of one chunk, not of the batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch


class RandState:
    """Snapshot of the CPU (and current CUDA device's) RNG; `with state:` replays from it."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def __enter__(self) -> "RandState":
        self._saved = RandState.__new__(RandState)
        self._saved.cpu, self._saved.cuda = torch.get_rng_state(), (
            torch.cuda.get_rng_state() if self.cuda is not None else None)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        return self

    def __exit__(self, *exc) -> None:
        # Leave the RNG where the replayed forward left it: the second pass continues as the first did.
        return None


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns no row of this chunk needs (the batch was padded to its longest row overall)."""
    length = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :length], attention_mask[:, :length]


def cached_loss_and_backward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mini_batch_size: int,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[torch.nn.Module], object] | None = None,
) -> torch.Tensor:
    """Accumulate into the parameters' .grad the gradient of loss_fn(model(rows)) and return the loss.

    loss_fn maps all rows' embeddings (n, d) to the scalar loss (it may gather across processes).
    no_sync(model) (DDP's, via Accelerate) wraps all chunks' backward but the last, so gradients are
    all-reduced once per step.
    """
    chunks = [(_trim(ids, mask)) for ids, mask in zip(input_ids.split(mini_batch_size), attention_mask.split(mini_batch_size))]
    states, reps = [], []
    with torch.no_grad():
        for ids, mask in chunks:
            states.append(RandState())
            reps.append(model(ids, mask))
    reps_t = torch.cat(reps).detach().requires_grad_()
    loss = loss_fn(reps_t)
    loss.backward()  # only the loss graph: d(loss)/d(embeddings), collectives of the gather included
    grads = reps_t.grad.split(mini_batch_size)
    for i, ((ids, mask), state, grad) in enumerate(zip(chunks, states, grads)):
        sync_ctx = no_sync(model) if (no_sync is not None and i < len(chunks) - 1) else nullcontext()
        with sync_ctx, state:
            emb = model(ids, mask)
            backward((emb * grad).sum())  # surrogate whose gradient is the cached d(loss)/d(emb) chain-ruled
    return loss.detach()

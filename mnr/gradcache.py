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

from mnr.model import trim_padding


class RandState:
    """Snapshot of the CPU (and current CUDA device's) RNG; `with state:` replays from it."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def __enter__(self) -> "RandState":
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        return self

    def __exit__(self, *exc) -> None:
        # Leave the RNG where the replayed forward left it: the second pass continues as the first did.
        return None


def cached_loss_and_backward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mini_batch_size: int,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[torch.nn.Module], object] | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Accumulate into the parameters' .grad the gradient of loss_fn(model(rows)) and return the loss.

    loss_fn maps all rows' embeddings (n, d) to the scalar loss (train_step: the objective bound to the step's rows
    and gather; it may gather across processes).
    no_sync(model) (DDP's, via Accelerate) wraps all chunks' backward but the last, so gradients are
    all-reduced once per step.  prompt_lengths (n,): the model's third argument, split with the rows.
    """
    ids_chunks = input_ids.split(mini_batch_size)  # mini_batch_size: rows per chunk, or a list of them
    lengths = [None] * len(ids_chunks) if prompt_lengths is None else prompt_lengths.split(mini_batch_size)
    chunks = [(*trim_padding(ids, mask), pl) for ids, mask, pl in zip(ids_chunks, attention_mask.split(mini_batch_size),
                                                                     lengths)]
    # Step 1, embed without a graph: each chunk's embeddings, remembering its RNG state for the replay.
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandState())
            reps.append(_forward(model, *chunk))
    # Step 2, build the cache: the loss on the detached embeddings and its gradient w.r.t. them.
    reps_t = torch.cat(reps).detach().requires_grad_()
    loss = loss_fn(reps_t)
    loss.backward()  # only the loss graph: d(loss)/d(embeddings), collectives of the gather included
    grads = reps_t.grad.split(mini_batch_size)
    # Step 3, forward-backward chunk by chunk: replay each chunk with a graph under its RNG state and
    # backpropagate the cached gradient into the parameters.
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        sync_ctx = no_sync(model) if (no_sync is not None and i < len(chunks) - 1) else nullcontext()
        with sync_ctx, state:
            emb = _forward(model, *chunk)
            backward((emb * grad).sum())  # surrogate whose gradient is the cached d(loss)/d(emb) chain-ruled
    return loss.detach()


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
             prompt_lengths: torch.Tensor | None) -> torch.Tensor:
    return model(ids, mask) if prompt_lengths is None else model(ids, mask, prompt_lengths)

"""Multiple Negatives Ranking (in-batch negatives InfoNCE) as pure tensor math.

scale = 1 / temperature.  Every function maps embeddings to a scalar; none sees a model, a
tokenizer or (except through the injected `gather`) a process group.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from mnr.matryoshka import cut

Gather = Callable[[torch.Tensor], torch.Tensor]


def no_gather(t: torch.Tensor) -> torch.Tensor:
    """The gather of a single process (or of a loss that scores against this process's candidates only)."""
    return t


def ranking_loss(queries: torch.Tensor, candidates: torch.Tensor, scale: float, label_offset: int = 0,
                 candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each query against all candidates; query i's positive is candidate offset + i.

    queries: (B, d), candidates: (M, d), both L2-normalised, M >= offset + B.
    candidate_mask: (M,) bool, False for a candidate that takes no part (an empty negative slot).
    """
    logits = scale * queries @ candidates.T  # (B, M): cosine similarity of every query with every candidate
    if candidate_mask is not None:
        logits = logits.masked_fill(~candidate_mask, float("-inf"))
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset  # (B,)
    return F.cross_entropy(logits, labels)


def mnr_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    negative_mask: torch.Tensor | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
    gather: Gather = no_gather,
    rank: int = 0,
    dims: Sequence[int] | None = None,
    dim_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """MNR loss of this process's anchors against the candidates of every process.

    anchors, positives: (B, d) raw (un-normalised) embeddings of this process; negatives: one (B, d) tensor,
        or k of them (the 1st, 2nd ... negative of every anchor): every negative is a candidate of every query.
    negative_mask: (B, k) bool, False for a negative slot that is empty (its embedding takes no part);
        None: all are real.  Passed by every process or by none (it is gathered).
    gather: concatenates a (B, d) tensor from all N processes into (N*B, d) keeping gradients
        (identity when single-process); positives and negatives are gathered separately so the
        candidate matrix is [positives of all processes; negatives of all processes].
    rank: this process's index; its positives sit at rows rank*B ... rank*B + B - 1.
    symmetric: also rank each positive against the anchors of all processes, averaging both losses.
    dims (Matryoshka): the loss is sum_k dim_weights[k] * MNR of the first dims[k] coordinates, each
        truncation re-normalised, all scored against the same gathered candidates (weights default to 1).
        None: the full embedding only.
    """
    local_batch = anchors.shape[0]
    offset = rank * local_batch
    # Gather the raw embeddings once; normalising rows after the gather equals normalising before it, and
    # lets every Matryoshka truncation reuse the same gathered candidates.
    all_positives = gather(positives)  # (N*B, d)
    if all_positives.shape[0] < 2:
        raise ValueError(f"MNR needs at least 2 pairs per (global) batch to have a negative, got {all_positives.shape[0]}")
    if isinstance(negatives, (list, tuple)):
        negatives = torch.cat(list(negatives), dim=0) if negatives else None  # (k*B, d), slot-major
    all_negatives = gather(negatives) if negatives is not None else None  # (N*k*B, d)
    mask = None
    if negative_mask is not None and all_negatives is not None:  # slot-major like negatives, then gathered
        real = gather(negative_mask.T.reshape(-1).to(anchors.dtype)) > 0.5
        mask = torch.cat([real.new_ones(all_positives.shape[0]), real])
    all_anchors = gather(anchors) if symmetric else None  # (N*B, d)
    dims = list(dims) if dims else [anchors.shape[-1]]
    weights = list(dim_weights) if dim_weights else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"dim_weights has {len(weights)} values for {len(dims)} dims")
    loss = anchors.new_zeros(())
    for dim, weight in zip(dims, weights):
        candidates = cut(all_positives, dim)  # (N*B, dim)
        if all_negatives is not None:
            candidates = torch.cat([candidates, cut(all_negatives, dim)], dim=0)  # ((1+k)*N*B, dim)
        at_dim = ranking_loss(cut(anchors, dim), candidates, scale, offset, mask)
        if symmetric:
            at_dim = (at_dim + ranking_loss(cut(positives, dim), cut(all_anchors, dim), scale, offset)) / 2
        loss = loss + weight * at_dim
    return loss


def split_roles(embeddings: torch.Tensor, n_roles: int) -> list[torch.Tensor]:
    """Split the embeddings of one forward over [anchors; positives; negatives] into per-role (B, d) blocks."""
    if embeddings.shape[0] % n_roles:
        raise ValueError(f"{embeddings.shape[0]} embeddings cannot be split into {n_roles} equal roles")
    return list(embeddings.chunk(n_roles, dim=0))

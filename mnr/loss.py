"""Multiple Negatives Ranking (in-batch negatives InfoNCE) as pure tensor math.

scale = 1 / temperature.  Every function maps embeddings to a scalar; none sees a model, a
tokenizer or (except through the injected `gather`) a process group.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def ranking_loss(queries: torch.Tensor, candidates: torch.Tensor, scale: float, label_offset: int = 0) -> torch.Tensor:
    """Cross-entropy of each query against all candidates; query i's positive is candidate offset + i.

    queries: (B, d), candidates: (M, d), both L2-normalised, M >= offset + B.
    """
    logits = scale * queries @ candidates.T  # (B, M): cosine similarity of every query with every candidate
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset  # (B,)
    return F.cross_entropy(logits, labels)


def mnr_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    scale: float = 20.0,
    symmetric: bool = False,
    gather: Gather = _identity,
    rank: int = 0,
) -> torch.Tensor:
    """MNR loss of this process's anchors against the candidates of every process.

    anchors, positives, negatives: (B, d) raw (un-normalised) embeddings of this process.
    gather: concatenates a (B, d) tensor from all N processes into (N*B, d) keeping gradients
        (identity when single-process); each column is gathered separately so the candidate
        matrix is [positives of all processes; negatives of all processes].
    rank: this process's index; its positives sit at rows rank*B ... rank*B + B - 1.
    symmetric: also rank each positive against the anchors of all processes, averaging both losses.
    """
    local_batch = anchors.shape[0]
    offset = rank * local_batch
    anchors = F.normalize(anchors, dim=-1)
    positives = F.normalize(positives, dim=-1)
    all_positives = gather(positives)  # (N*B, d)
    if all_positives.shape[0] < 2:
        raise ValueError(f"MNR needs at least 2 pairs per (global) batch to have a negative, got {all_positives.shape[0]}")
    candidates = all_positives
    if negatives is not None:
        candidates = torch.cat([all_positives, gather(F.normalize(negatives, dim=-1))], dim=0)  # (2*N*B, d)
    loss = ranking_loss(anchors, candidates, scale, offset)
    if symmetric:
        all_anchors = gather(anchors)  # (N*B, d)
        loss = (loss + ranking_loss(positives, all_anchors, scale, offset)) / 2
    return loss


def split_roles(embeddings: torch.Tensor, n_roles: int) -> list[torch.Tensor]:
    """Split the embeddings of one forward over [anchors; positives; negatives] into per-role (B, d) blocks."""
    if embeddings.shape[0] % n_roles:
        raise ValueError(f"{embeddings.shape[0]} embeddings cannot be split into {n_roles} equal roles")
    return list(embeddings.chunk(n_roles, dim=0))

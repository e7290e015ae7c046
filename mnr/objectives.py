"""The training objective: what maps the embeddings of one global step to the loss, chosen by the config.

`objective_from_config(cfg)` picks and configures it; `train_step` (plain and GradCache) calls it, the model card
shows `describe()` and the run identity takes `identity()`.  The math stays in mnr/loss.py: an objective only
splits one forward's embeddings into roles and passes them, with the injected gather, to its loss function.
A new objective is a subclass with `loss`, `describe` and `identity`, and a branch in `objective_from_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from mnr.decoder import as_float32, float32_math
from mnr.loss import Gather, mnr_loss, no_gather, split_roles


@dataclass(frozen=True)
class Rows:
    """How one forward's embeddings are laid out: `n_roles` blocks of B rows (anchors, positives, negatives);
    `row_index` (when empty negative slots were not embedded) gives every slot its row, an empty one its
    positive's; `negative_mask` (B, k) is False for an empty negative slot."""

    n_roles: int
    row_index: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    @classmethod
    def of_batch(cls, batch: Mapping, n_roles: int, device: torch.device | str | None = None) -> "Rows":
        """The layout of a collated batch (its `row_index` and `negative_mask`, when present), on `device`."""
        index, mask = (None if batch.get(key) is None else batch[key].to(device)
                       for key in ("row_index", "negative_mask"))
        return cls(n_roles, index, mask)


class Objective:
    """Embeddings of this process's rows -> the loss of the global step (the gather joins the processes)."""

    card_name: str = ""  # the model card's "loss" setting

    def __call__(self, embeddings: torch.Tensor, rows: Rows, gather: Gather = no_gather,
                 rank: int = 0) -> torch.Tensor:
        """embeddings: (n, d), the forward over the rows of `rows`; gather and rank as in `mnr_loss`.  The
        similarities, the gathered candidates and the loss are float32 whatever the embeddings' dtype and under
        an outer autocast (bf16 mixed precision): autocast is off in here."""
        if rows.row_index is not None:  # empty negative slots were not embedded: they take their positive's row
            embeddings = embeddings[rows.row_index]
        with float32_math(embeddings.device.type):
            roles = split_roles(as_float32(embeddings), rows.n_roles)
            return self.loss(roles[0], roles[1], roles[2:], rows.negative_mask, gather, rank)

    def loss(self, anchors: torch.Tensor, positives: torch.Tensor, negatives: Sequence[torch.Tensor],
             negative_mask: torch.Tensor | None, gather: Gather, rank: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The model card's settings rows of the loss, name -> value, "loss" first."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """The run identity's entries of the loss (flat, JSON values): a resume with other values is refused."""
        raise NotImplementedError


@dataclass(frozen=True)
class MNR(Objective):
    """Multiple Negatives Ranking: `scale` = 1/temperature, `symmetric` also ranks positives against anchors,
    `dims`/`dim_weights` the Matryoshka sizes and their weights (empty: the full embedding, weight 1 each)."""

    scale: float = 20.0
    symmetric: bool = False
    dims: tuple[int, ...] = ()
    dim_weights: tuple[float, ...] = ()
    # the config values it was chosen by, as given (config field -> value): the run identity compares them as
    # they were written (e.g. "384, 128"); empty for one built in code, whose identity spells its own values
    given: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def card_name(self) -> str:
        return "MultipleNegativesRankingLoss" + (" (symmetric)" if self.symmetric else "")

    def loss(self, anchors, positives, negatives, negative_mask, gather, rank):
        return mnr_loss(anchors, positives, negatives or None, negative_mask=negative_mask, scale=self.scale,
                        symmetric=self.symmetric, gather=gather, rank=rank, dims=self.dims or None,
                        dim_weights=self.dim_weights or None)

    def describe(self) -> dict[str, Any]:
        rows: dict[str, Any] = {"loss": self.card_name, "scale": self.scale}
        if self.dims:
            weights = self.dim_weights or (1.0,) * len(self.dims)
            dims = self.given.get("matryoshka_dims") or ",".join(map(str, self.dims))
            rows["Matryoshka dims (weights)"] = f"{dims} ({', '.join(map(str, weights))})"
        return rows

    def identity(self) -> dict[str, Any]:
        own = {"scale": self.scale, "symmetric": self.symmetric, "matryoshka_dims": ",".join(map(str, self.dims)),
               "matryoshka_weights": ",".join(map(str, self.dim_weights))}
        return {**own, **{k: v for k, v in self.given.items() if k in own}}


# the TrainConfig fields that choose and configure the objective
OBJECTIVE_FIELDS = ("scale", "symmetric", "matryoshka_dims", "matryoshka_weights")


def objective_from_config(cfg) -> Objective:
    """The objective a TrainConfig asks for (today MNR, with its scale, symmetry and Matryoshka sizes)."""
    return MNR(scale=cfg.scale, symmetric=cfg.symmetric, dims=tuple(cfg.dims),
               dim_weights=tuple(cfg.dim_weights),
               given={name: getattr(cfg, name) for name in OBJECTIVE_FIELDS})

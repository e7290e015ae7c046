"""Matryoshka embeddings outside the loss: which sizes a model was trained at (recorded in its export) and which
sizes the evaluators report.

The loss (mnr/loss.py `mnr_loss(dims=...)`) trains the first d coordinates of the embedding to work alone;
here: the export records those sizes as `mnr_matryoshka_dims` in config_sentence_transformers.json (and the model
card shows `SentenceTransformer(path, truncate_dim=d)`), and `--eval-dims` names the sizes every evaluator scores,
each on the truncated and re-normalised embeddings.  Metric keys: `<evaluator>/<metric>` for the full embedding
(as without Matryoshka), `<evaluator>@<d>/<metric>` for the first d coordinates, e.g. `stsb_validation@128/spearman`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mnr.config import DimsError

DIMS_KEY = "mnr_matryoshka_dims"
ST_CONFIG = "config_sentence_transformers.json"


def truncated_dims(dims: tuple[int, ...], width: int, flag: str = "--eval-dims") -> tuple[int, ...]:
    """The sizes below the model's width (the full size is always reported, under the plain keys), largest first;
    raises DimsError for a size beyond the width."""
    too_big = [d for d in dims if d > width]
    if too_big:
        raise DimsError(f"{flag} {','.join(map(str, dims))}: {too_big[0]} exceeds the model's {width} dimensions")
    return tuple(sorted({d for d in dims if d < width}, reverse=True))


def label(name: str, dim: int | None) -> str:
    """The evaluator part of a metric key: its name for the full embedding, name@d for the first d coordinates."""
    return name if dim is None else f"{name}@{dim}"


def cut(embeddings: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The first `dim` coordinates (all when None), re-normalised to unit length."""
    return F.normalize(embeddings if dim is None else embeddings[:, :dim], dim=-1)


def record_dims(model_dir: str | Path, dims: tuple[int, ...]) -> None:
    """Write the trained sizes into an exported model's config_sentence_transformers.json (no-op without dims)."""
    if not dims:
        return
    path = Path(model_dir) / ST_CONFIG
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config[DIMS_KEY] = list(dims)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def trained_dims(model_dir: str | Path) -> tuple[int, ...]:
    """The sizes a model directory says it was trained at (empty: none recorded, or not a local directory)."""
    path = Path(model_dir) / ST_CONFIG
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(DIMS_KEY) or []
        return tuple(int(d) for d in value)
    except (OSError, ValueError, TypeError, AttributeError):
        return ()

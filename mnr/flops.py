"""Model FLOPs of a training step and MFU, from the model's shape and the real (non-pad) tokens.

    forward  = 2 * N * tokens + 4 * layers * attention width * sum_i len_i**2
    training = 3 * forward (forward + backward), + 1 forward more under GradCache (its no-grad pass)

N counts the non-embedding parameters (the embedding lookups do no matmul); the attention term is per text
(QK^T and AV of each segment), causal or not.  Padding counts as waste: a padded forward does more work than
these FLOPs, so MFU on real tokens rewards unpadding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# dense bf16 peak of one chip, by a name torch.cuda.get_device_name contains (SXM parts)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a model."""

    layers: int
    attention_width: int  # query heads x head size (= hidden for BERT)
    non_embedding_params: int


def model_shape(config, model: torch.nn.Module | None = None) -> Shape:
    """The Shape of a transformers config; N from the config for the BERT and Llama families, else counted on
    `model` (parameters outside the embeddings and the pooler)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kind = getattr(config, "model_type", "")
    if kind in BERT_LIKE or kind in LLAMA_LIKE:
        n = non_embedding_params(config)
    elif model is not None:
        n = count_non_embedding_params(model)
    else:
        raise ValueError(f"model_type={kind!r}: its parameters are counted from the config for "
                         f"{', '.join(BERT_LIKE + LLAMA_LIKE)} only; pass the model")
    return Shape(config.num_hidden_layers, heads * head_dim, n)


def non_embedding_params(config) -> int:
    """Parameters of the transformer blocks (and final norm), from the config: all but the embeddings and pooler."""
    h, i, layers, kind = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.model_type
    if kind in BERT_LIKE:  # q, k, v, o with biases; two LayerNorms; MLP with biases
        return layers * (4 * h * h + 4 * h + 2 * h + 2 * h * i + i + h + 2 * h)
    if kind not in LLAMA_LIKE:
        raise ValueError(f"model_type={kind!r} has no parameter count from its config (known: "
                         f"{', '.join(BERT_LIKE + LLAMA_LIKE)})")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    qkv_bias = kind == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = kind in ("llama", "qwen3") and bool(getattr(config, "attention_bias", False))
    attention = 2 * h * heads * d + 2 * h * kv * d + qkv_bias * (heads + 2 * kv) * d + o_bias * h
    mlp = 3 * h * i + bool(getattr(config, "mlp_bias", False)) * (2 * i + h)
    qk_norm = 2 * d if kind == "qwen3" else 0
    return layers * (attention + mlp + 2 * h + qk_norm) + h  # + the final norm


def count_non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the embedding modules (`embeddings.*`, `embed_tokens.*`) and the pooler."""
    skip = ("embeddings.", "embed_tokens.", "pooler.")
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(skip))


def forward_flops(shape: Shape, lengths: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """FLOPs of one forward over texts of these real lengths."""
    lengths = np.asarray(lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths, dtype=np.float64)
    return 2.0 * shape.non_embedding_params * lengths.sum() + 4.0 * shape.layers * shape.attention_width * (
        lengths ** 2).sum()


def step_flops(shape: Shape, lengths: Sequence[int] | np.ndarray | torch.Tensor, gradcache: bool = False) -> float:
    """FLOPs of one training step (forward + backward = 3 forwards; GradCache adds its no-grad forward)."""
    return (4.0 if gradcache else 3.0) * forward_flops(shape, lengths)


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU named like torch.cuda.get_device_name(); None for a CPU or an unknown chip."""
    return next((peak for key, peak in PEAK_FLOPS.items() if device_name and key in device_name), None)


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, 0..1; None where the peak is unknown (not reported)."""
    return None if not peak else flops_per_s / peak

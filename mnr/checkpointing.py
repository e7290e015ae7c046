"""Gradient (activation) checkpointing of the transformer: recompute each layer's activations in the backward.

Non-reentrant (`use_reentrant=False`) only: it gives the same gradient as no checkpointing, works under DDP
with frozen parameters (LoRA; the reentrant form marks parameters "ready twice" there), and restores the RNG
state for the recompute, so dropout masks match and GradCache's replay stays exact.
"""

from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(transformer: nn.Module, lora: bool = False) -> None:
    """Checkpoint every layer of `transformer` (a transformers model, or a peft model around one).  With a LoRA
    adapter the embeddings' output requires grad, so that a checkpointed layer whose inputs otherwise need no
    gradient still backpropagates into its adapter.  ValueError naming the model class where the model has no
    checkpointing."""
    base = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(base).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.x names it so
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(base.config, "use_cache", False):
        base.config.use_cache = False  # a KV cache is of no use to an embedder, and checkpointing refuses one
    if lora:
        base.enable_input_require_grads()


def is_checkpointing(transformer: nn.Module) -> bool:
    base = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
    flag = getattr(base, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))

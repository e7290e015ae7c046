"""LoRA adapters (peft) on the transformer: only the adapter trains; the export is the merged base.

Invariants:
- `merged_state_dict` leaves the training model untouched and gives the base's own key names, so that
  `AutoModel.from_pretrained` of the export (no peft installed) computes W + scale * B @ A, the very weights
  the adapter model computes with (dropout aside, which evaluation turns off);
- `save_adapter` writes the adapter alone, loadable with `PeftModel.from_pretrained(base, path)` and
  sentence-transformers' `model.load_adapter(path)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

INSTALL = "LoRA needs peft: pip install 'mnr[lora]' (or pip install peft)"


class LoraError(ValueError):
    """An adapter setting or folder cannot be used; the message names it."""


def _peft():
    try:
        import peft
    except ImportError:
        raise LoraError(INSTALL) from None
    return peft


def available() -> bool:
    """Whether peft imports (LoRA can run)."""
    try:
        _peft()
    except LoraError:
        return False
    return True


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16  # rank of the update B @ A
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: str | tuple[str, ...] = "all-linear"  # peft's "all-linear", or module names (q_proj, ...)

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and self.r > 0):
            raise LoraError(f"lora_r={self.r!r} must be a positive integer")
        if not self.alpha > 0:
            raise LoraError(f"lora_alpha={self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"lora_dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, str):
            names = tuple(n.strip() for n in self.target_modules.split(",") if n.strip())
            if not names:
                raise LoraError(f"lora_target_modules={self.target_modules!r} names no module")
            object.__setattr__(self, "target_modules", names[0] if names == ("all-linear",) else names)

    def peft_config(self):
        peft = _peft()
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target,
                               bias="none", task_type="FEATURE_EXTRACTION")

    def describe(self) -> dict:
        """For the model card and the run identity."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.target_modules if isinstance(self.target_modules, str)
                else ",".join(self.target_modules)}


def apply_lora(transformer: nn.Module, settings: LoraSettings) -> nn.Module:
    """`transformer` wrapped in a fresh LoRA adapter (B = 0: the same outputs at step 0); only the adapter's
    parameters require grad.  Call forward as on the transformer."""
    peft = _peft()
    try:
        return peft.get_peft_model(transformer, settings.peft_config())
    except ValueError as err:  # e.g. a target module name the model does not have
        raise LoraError(f"lora_target_modules={settings.describe()['target_modules']!r}: "
                        f"{str(err).strip().splitlines()[0]}") from None


def load_adapter(transformer: nn.Module, adapter_dir: str | Path, trainable: bool = True) -> nn.Module:
    """`transformer` wrapped in the adapter saved at `adapter_dir` (by `save_adapter` or peft); `trainable`:
    its parameters train on (only they do)."""
    peft = _peft()
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise LoraError(f"adapter={str(adapter_dir)!r} is not an adapter folder (no adapter_config.json)")
    try:
        return peft.PeftModel.from_pretrained(transformer, str(adapter_dir), is_trainable=trainable)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise LoraError(f"adapter={str(adapter_dir)!r} does not fit this model: "
                        f"{str(err).strip().splitlines()[0]}") from None


def is_lora(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters), counted in elements."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_line(model: nn.Module) -> str:
    """The log line: how many parameters train."""
    trainable, total = trainable_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base's state dict (its own key names, no peft prefixes) with every adapted weight replaced by
    W + scale * B @ A (computed in float32, stored in W's dtype).  The model itself is not changed; the tensors
    not adapted are the model's own (detached, not copied): cast them (`mnr.decoder.cast_state_dict`), never
    change them in place."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if getattr(module, "merged", False):
                raise LoraError(f"{name}: the adapter is already merged into the weights")
            if any(module.use_dora.get(a, False) for a in module.active_adapters):
                raise LoraError(f"{name}: DoRA adapters are not merged by mnr")
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters if a in module.lora_A)
            merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
        state = {}
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            state[key] = merged.get(key, value).detach()  # no copy: an export must not double the memory
    if missing := set(merged) - set(state):
        raise LoraError(f"merged weights without a base key: {sorted(missing)[:3]}")
    return state


def merge_gathered(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`merged_state_dict` from a full state dict of the peft model (its own keys: what a sharded model's
    collective gather gives, whose parameters are shards): base key names, every adapted weight
    W + scale * B @ A in float32, stored in W's dtype; the adapter's tensors left out."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    out = {key.removeprefix(prefix).replace(".base_layer.", "."): value for key, value in state.items()
           if ".lora_" not in key}
    with torch.no_grad():
        for name, module in model.get_base_model().named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if any(module.use_dora.get(a, False) for a in module.active_adapters):
                raise LoraError(f"{name}: DoRA adapters are not merged by mnr")
            weight = out[f"{name}.weight"]
            delta = torch.zeros(weight.shape, dtype=torch.float32)
            for a in (a for a in module.active_adapters if a in module.lora_A):
                down = state[f"{prefix}{name}.lora_A.{a}.weight"].float()
                up = state[f"{prefix}{name}.lora_B.{a}.weight"].float()
                step = (up @ down) * module.scaling[a]
                delta += step.T if getattr(module, "fan_in_fan_out", False) else step
            out[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out


def base_module(model: nn.Module) -> nn.Module:
    """The transformer under the adapter (the model itself when it has none): its config and save_pretrained
    write the export (pass it `state_dict=merged_state_dict(model)`)."""
    return model.get_base_model() if is_lora(model) else model


def save_adapter(model: nn.Module, path: str | Path, base_model: str | None = None) -> None:
    """The adapter alone: adapter_config.json + adapter_model.safetensors.  base_model: the hub id or path
    written as base_model_name_or_path (default: the one the base was loaded from)."""
    if not is_lora(model):
        raise LoraError("save_adapter: the model has no LoRA adapter")
    config = model.peft_config[model.active_adapter]
    if base_model is not None:
        config.base_model_name_or_path = base_model
    model.save_pretrained(str(path), safe_serialization=True)


def save_transformer(model: nn.Module, path: str | Path, dtype: str | None = None) -> None:
    """The export's transformers files (config.json + safetensors): the merged weights under an adapter, else
    the model's own, in `dtype` ('float32' / 'bfloat16'; None: as they are), the config saying that dtype, so
    that `AutoModel.from_pretrained(path)` loads them as written."""
    from mnr.decoder import cast_state_dict, write_config_dtype

    base = base_module(model)
    state = cast_state_dict(merged_state_dict(model) if is_lora(model) else base.state_dict(), dtype)
    base.save_pretrained(str(path), state_dict=state, safe_serialization=True)
    write_config_dtype(path, dtype)

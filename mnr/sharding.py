"""Sharded parameters (FSDP2): the sharding plan of Accelerate's FSDP2 plugin, and the collective pieces a
sharded step, export and checkpoint need.

Invariants:
- `shard_model` makes the same `fully_shard` calls, in the same order and with the same arguments, as
  Accelerate's `fsdp2_prepare_model` with `TRANSFORMER_BASED_WRAP`: one unit per transformer layer (the
  `_no_split_modules` classes), the input embedding (when untied), the tail (final norm, output embedding) with
  `reshard_after_forward=False`, then the root with PyTorch's default. It runs on any backend (gloo on the CPU).
- Every function here that takes a sharded module is collective: every process calls it, in the same order.
- Parameter and state-dict names are the unsharded module's (FSDP2 adds no prefix).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from mnr import atomic, distributed

SHARDING_FILE = "sharding.json"  # world size and format of a sharded checkpoint; written last
CPU_SWITCH = "MNR_FSDP_CPU"  # =1: shard per layer on the CPU (gloo) as Accelerate's plugin does on GPUs


class ShardingError(RuntimeError):
    """A sharded launch, export or checkpoint cannot go on; the message names the value and what to do."""


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def cpu_sharding_requested(env: Mapping[str, str] = os.environ) -> bool:
    """The hidden switch: MNR_FSDP_CPU=1 shards the model with `shard_model` under a gloo (DDP-style) launch."""
    return _true(env.get(CPU_SWITCH))


def plan_from_env(env: Mapping[str, str] = os.environ) -> dict:
    """`shard_model` keyword arguments from the FSDP_* variables `accelerate launch` sets from an FSDP config
    (fsdp_reshard_after_forward, fsdp_transformer_layer_cls_to_wrap), with the plugin's defaults."""
    classes = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    return {"reshard_after_forward": _true(env.get("FSDP_RESHARD_AFTER_FORWARD", "true")),
            "layer_classes": classes or None}


def layer_class_names(module: nn.Module) -> list[str]:
    """The transformer layer classes to shard one by one: `module._no_split_modules`, else that of the first
    submodule that has one (the transformer inside an embedder or a PEFT wrapper)."""
    for sub in module.modules():
        names = getattr(sub, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def _final_norm(module: nn.Module) -> nn.Module | None:
    """The last direct child named *Norm* of the base model (`module.<base_model_prefix>`, else module), as
    Accelerate finds the final norm."""
    prefix = getattr(module, "base_model_prefix", "")
    base = getattr(module, prefix, None) if prefix else module
    if not isinstance(base, nn.Module):
        return None
    found = None
    for _, child in base.named_children():
        if "Norm" in type(child).__name__:
            found = child
    return found


def shard_model(module: nn.Module, reshard_after_forward: bool = True, layer_classes: Iterable[str] | None = None,
                mp_policy=None) -> nn.Module:
    """Shard `module` in place over the default process group, as Accelerate's FSDP2 plugin does; returns it.

    layer_classes: class names of the transformer layers (None: `layer_class_names(module)`); a name no
    submodule has is an error, as in Accelerate. mp_policy: a MixedPrecisionPolicy (None: full precision;
    `mixed_precision_policy` gives the one of Accelerate's --mixed_precision).
    Parameters keep their names; each becomes a DTensor sharded on dim 0 over all processes."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(module, FSDPModule):
        return module
    if mp_policy is not None:  # fp32 master weights (one dtype per unit); the policy casts for compute
        for p in module.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
    names = list(layer_classes) if layer_classes is not None else layer_class_names(module)
    classes = {type(m) for m in module.modules() if type(m).__name__ in names}
    missing = set(names) - {c.__name__ for c in classes}
    if missing:
        raise ShardingError(f"layer class {sorted(missing)[0]!r} is not in the model; its layers are "
                            f"{sorted({type(m).__name__ for m in module.modules()})[:8]}...")
    kwargs = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    # one unit per layer, bottom up (Accelerate visits the children bottom up and skips the root)
    for sub in _bottom_up(module)[:-1]:
        layer = getattr(sub, "_checkpoint_wrapped_module", sub)  # activation checkpointing wraps layers first
        if isinstance(layer, tuple(classes)) and not isinstance(sub, FSDPModule):
            fully_shard(sub, **kwargs)
    inputs = getattr(module, "get_input_embeddings", lambda: None)()
    outputs = getattr(module, "get_output_embeddings", lambda: None)()
    tied = getattr(inputs, "weight", None) is not None and getattr(inputs, "weight", None) is getattr(outputs, "weight", None)
    if not tied and inputs is not None and not isinstance(inputs, FSDPModule):
        fully_shard(inputs, **kwargs)
    # the tail runs at the end of the forward and the start of the backward: kept unsharded in between
    tail = [m for m in ((_final_norm(module), inputs, outputs) if tied else (_final_norm(module), outputs))
            if m is not None and not isinstance(m, FSDPModule)]
    if tail:
        fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}  # PyTorch's default: False for the root
    fully_shard(module, **root)
    return module


def mixed_precision_policy(mixed_precision: str):
    """The MixedPrecisionPolicy Accelerate's FSDP2 plugin uses for --mixed_precision (no, fp16, bf16, fp8):
    parameters, gradient reduction and outputs in that dtype; None for no."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise ShardingError(f"mixed_precision={mixed_precision!r}: expected one of {sorted(dtypes)}")
    dtype = dtypes[mixed_precision]
    return None if dtype is None else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)


def _bottom_up(module: nn.Module) -> list[nn.Module]:
    """Every submodule, the root last, in Accelerate's order: the reverse of a depth-first walk that visits
    each module's children last-first."""
    stack, order = [module], []
    while stack:
        current = stack.pop()
        stack.extend(current.children())
        order.append(current)
    return order[::-1]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective. The whole, unsharded state dict as CPU tensors on the main process; {} on every other process.
    An unsharded module gives its own state dict (detached CPU copies) on every process."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Collective. Scale the gradients so that their global norm (over all shards, as of the unsharded
    model) is at most max_norm; returns that norm before clipping as a plain tensor, equal on every process.
    Gradients may be DTensors (one mesh or several) and plain tensors together."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[nn.Parameter]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if not groups:
        return torch.tensor(0.0)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # a partial norm is all-reduced
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    for mesh, group in groups.items():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total if mesh is None else DTensor.from_local(total, mesh))
    return total


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Collective. Names of the parameters that hold NaN or inf in any process's shard; the same list on every
    process (one all-reduce of one flag per parameter)."""
    names, flags = [], []
    for name, p in module.named_parameters():
        local = _local(p.detach())
        names.append(name)
        flags.append(~torch.isfinite(local).all() if local.numel() else torch.tensor(False, device=local.device))
    if not flags:
        return []
    return [n for n, bad in zip(names, distributed.any_true(torch.stack(flags))) if bad]


@contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Backward passes inside keep their gradients unsharded on this process, without a reduce-scatter; the
    first backward outside reduces the sum of all of them. An unsharded module: nothing to do.
    Memory: the whole unsharded gradient stays on every process until then."""
    if not is_sharded(module):
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# ---- sharded checkpoints ------------------------------------------------------------------------------------


def save_sharded(module: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | os.PathLike) -> Path:
    """Collective. Each process writes its shard of the model (and optimizer) state with torch distributed
    checkpoint into `<path>.tmp`; after all have written, the main process writes SHARDING_FILE (the world
    size), fsyncs and renames the directory to `path`, replacing an older one (mnr.atomic). A failure on any
    process removes the temporary and leaves `path` as it was. Returns `path`."""
    import torch.distributed.checkpoint as dcp

    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")

    def fresh() -> None:
        atomic.remove(tmp)
        tmp.mkdir(parents=True)

    def complete() -> None:
        meta = {"world_size": distributed.world_size(), "format": "torch.distributed.checkpoint",
                "optimizer": optimizer is not None}
        (tmp / SHARDING_FILE).write_text(json.dumps(meta))
        atomic.fsync_tree(tmp)
        atomic.replace(tmp, final)

    try:
        distributed.run_on_main(fresh)  # a sync point: tmp exists, empty, before anyone writes
        dcp.save(_state(module, optimizer), checkpoint_id=str(tmp))  # raises on every process if one fails
        distributed.run_on_main(complete)  # a sync point: nobody reads `path` before it is complete
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        if distributed.is_main():
            atomic.remove(tmp)
        if atomic.is_write_failure(err):
            raise atomic.write_error(final, err) from err
        raise
    return final


def load_sharded(module: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | os.PathLike,
                 reshard: bool = False) -> None:
    """Collective. Restore what `save_sharded` wrote into `module` (sharded by `shard_model`) and `optimizer`.
    Refused, before any collective, when the checkpoint is incomplete, or was saved by another number of
    processes (the message names both) unless reshard=True: then torch distributed checkpoint reads each
    process's new shard from the old ones (model and AdamW state; proven for 2 processes -> 1)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = sharding_meta(path)
    if meta["world_size"] != distributed.world_size() and not reshard:
        raise ShardingError(f"{path} was saved by {meta['world_size']} processes and this run has "
                            f"{distributed.world_size()}: resume it with {meta['world_size']} processes")
    if optimizer is not None and not meta.get("optimizer"):
        raise ShardingError(f"{path} holds no optimizer state")
    state = _state(module, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer if optimizer is not None else (), model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))


def sharding_meta(path: str | os.PathLike) -> dict:
    """SHARDING_FILE of a sharded checkpoint: {"world_size", "format", "optimizer"}; ShardingError when absent."""
    file = Path(path) / SHARDING_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ShardingError(f"{path} is no complete sharded checkpoint ({SHARDING_FILE}: {err})") from None


def _state(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": sharded model state[, "optim": sharded optimizer state]}, keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(module)}
    model_state, optim_state = get_state_dict(module, optimizer)
    return {"model": model_state, "optim": optim_state}


# ---- launch checks ------------------------------------------------------------------------------------------


def fsdp_launch_problem(state_or_env=None, has_gpu: bool | None = None) -> str | None:
    """One line saying why a requested FSDP launch cannot shard here, or None (not requested, or fine).

    state_or_env: an Accelerate (Partial/Accelerator)State, or a mapping of environment variables (default:
    os.environ). FSDP counts as requested by ACCELERATE_USE_FSDP (what `--use_fsdp` and a `distributed_type:
    FSDP` config set) or by the state's FSDP plugin. Accelerate's FSDP plugin needs a GPU-like device: on a
    CPU-only machine it forms no process group and every launched process would train its own model."""
    env = state_or_env if isinstance(state_or_env, Mapping) or state_or_env is None else None
    env = os.environ if env is None else env
    state = None if isinstance(state_or_env, Mapping) or state_or_env is None else state_or_env
    requested = _true(env.get("ACCELERATE_USE_FSDP")) or (
        state is not None and (getattr(state, "fsdp_plugin", None) is not None or "FSDP" in str(state.distributed_type)))
    if not requested:
        return None
    launched = int(env.get("WORLD_SIZE", "1"))
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    outcome = f"the {launched} launched processes would train {launched} separate models" if launched > 1 \
        else "nothing would be sharded"
    if not has_gpu:
        return (f"FSDP was requested (ACCELERATE_USE_FSDP) but this machine has no GPU: Accelerate's FSDP plugin "
                f"forms no process group without one, so {outcome}; launch FSDP on GPUs, or on the CPU use "
                f"accelerate_configs/cpu_2proc.yaml (DDP)")
    if state is not None and state.num_processes < launched:
        return (f"FSDP was requested but Accelerate set up {state.num_processes} of the {launched} launched "
                f"processes ({state.distributed_type}), so {outcome}; check the accelerate config")
    return None

"""All collective code of the project lives here.

Without an initialised process group every helper degrades to the single-process answer
(rank 0, world size 1, identity gather), so the loss and its tests need no process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mnr.collective import together


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over processes.

    Gradient argument (why this gives exactly the single-process gradient under DDP):
    process r computes L_r = mean CE over its B local anchors, scored against the gathered
    candidates of all N processes.  The single-process loss over the N*B batch is
    L = (1/N) * sum_r L_r.  A candidate embedding c produced on process s is used by every L_r,
    so dL/dc = (1/N) * sum_r dL_r/dc.  Backward here all-reduces (sums) the gradient of the
    gathered tensor and keeps this process's slice, i.e. each process gets sum_r dL_r/dc for its
    own candidates; its parameter gradient is then d(sum_r L_r)/dtheta through its own forward.
    DDP averages parameter gradients over processes (divides by N), which yields
    (1/N) * d(sum_r L_r)/dtheta = dL/dtheta: no stray factor of N.  Keeping only the local slice
    without the all-reduce would drop the cross-process terms instead.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.local_size = tensor.shape[0]
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every process) from all processes along dim 0.

    Keeps the autograd graph (unlike `accelerator.gather`, which is for metrics only).
    Returns the input unchanged when single-process.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_object(obj):
    """Gather a picklable object from every process (metrics, checks); a one-item list when single-process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def is_main() -> bool:
    """The one "am I the main process" check (global rank 0): printing, files, trackers happen there only."""
    return rank() == 0


def launched_world_size() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 under plain `python`), before any group exists."""
    import os

    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not a whole number (the launcher sets it)") from None


def launched_rank() -> int:
    """This process's rank as the launcher set it (RANK; 0 under plain `python`), also before any group exists:
    who reports an error that stopped the run before (or after) the process group was set up."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:  # reported by launched_world_size's check or the launcher; never a traceback here
        return 0


def run_on_main(fn, share: bool = False):
    """fn() on the main process only; its exception, if any, is raised on every process (a sync point; one that
    does not pickle as a RuntimeError with its message, see `collective.together`).

    Work done on the main process alone (output dir, export) must not leave the other processes waiting in a
    collective when it fails: they would block, or die with a transport traceback when the main one exits.
    share=True: every process returns the main process's result (it must pickle), for work all of them need
    but one should do (e.g. hashing the training data once, not once per process); else the main process's
    result stays on it (the others get None)."""
    kept = []

    def on_main():
        kept.append(fn() if is_main() else None)
        return kept[0] if share else None  # only a shared result has to pickle

    shared = together(all_gather_object, on_main)[0]
    return shared if share else kept[0]


def shutdown() -> None:
    """Leave the process group without a collective (after an error every process reports and exits).
    Unreachable objects (a failed run's DDP model and its pending work) are collected first, while the
    interpreter is whole."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def any_true(flags: torch.Tensor) -> list[bool]:
    """Element-wise OR of a 1-d tensor of 0/1 flags over all processes; one small all-reduce and one host sync.

    Every process must call it with the same number of flags; all get the same answer, so decisions that
    change the control flow (skip a step, stop the run) are taken together and no process waits alone."""
    flags = flags.detach().float()
    if is_distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(v) for v in flags.tolist()]


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (for logging: the loss of the whole global batch)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def all_gather_rows(tensor: torch.Tensor | None) -> list[torch.Tensor]:
    """Every process's `tensor` (same trailing shape and dtype, any number of rows), in rank order, on the CPU.

    A process with nothing to add passes None (it gets the others' rows all the same).  No autograd: for
    evaluation.  Rows are padded to the longest process's count for the collective; under NCCL the exchange
    goes through this process's GPU, under gloo through the CPU.
    """
    if not is_distributed():
        return [tensor.cpu()] if tensor is not None else []
    meta = all_gather_object(None if tensor is None else (tensor.shape[0], tuple(tensor.shape[1:]), tensor.dtype))
    known = [m for m in meta if m is not None]
    if not known:
        return []
    _, trailing, dtype = known[0]
    counts = [0 if m is None else m[0] for m in meta]
    via = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((max(counts), *trailing), dtype=dtype, device=via)
    if tensor is not None:
        padded[: tensor.shape[0]] = tensor.to(via)
    chunks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(chunks, padded)
    return [chunk[:n].cpu() for chunk, n in zip(chunks, counts)]

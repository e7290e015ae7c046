"""Deferred step checks: a non-finite step is skipped on the device, and its flags reach the host once per
logging interval instead of once per step.

`StepFlags.guard` computes the step's flag on the device (non-finite loss or gradient norm, OR-ed over processes by
the injected `reduce_max`, an all-reduce that does not wait for the host) and hands it to a fused AdamW as
`found_inf`: the fused kernel then leaves the parameters, both moments and the step count untouched, as under
GradScaler.  `StepFlags.read` (at a log, save or eval step) returns how many steps were skipped since the last
read, the first of them and whether any process asked to stop, with one host sync.
"""

from __future__ import annotations

from typing import Callable

import torch


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _inner(optimizer):
    """The torch optimizer under Accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class StepFlags:
    """Device-side count of skipped steps (and the first one) since the last `read`."""

    def __init__(self, device: torch.device | str, reduce_max: Callable[[torch.Tensor], torch.Tensor] = _same):
        self.reduce_max = reduce_max  # in place or returning: the OR of a 0/1 float flag over all processes
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def guard(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor | None,
              step: int) -> torch.Tensor:
        """Flag global step `step` (0/1 float, on the device) and make the next `optimizer.step()` skip it when 1."""
        inner = _inner(optimizer)
        if not inner.defaults.get("fused"):
            raise ValueError(f"{type(inner).__name__}(fused={inner.defaults.get('fused')}) cannot skip a step on the "
                             f"device: build it with fused=True")
        norm = torch.zeros((), device=loss.device) if grad_norm is None else torch.as_tensor(grad_norm)
        flag = (~torch.isfinite(loss.detach().float()) | ~torch.isfinite(norm.float())).float()
        flag = self.reduce_max(flag)
        inner.found_inf, inner.grad_scale = flag, None  # read by the fused kernel: skip the update when 1
        self.first = torch.where((self.first < 0) & (flag > 0), torch.full_like(self.first, step), self.first)
        self.skipped = self.skipped + flag.long()
        return flag

    def read(self, stop: bool = False) -> tuple[int, int | None, bool]:
        """(steps skipped since the last read, the first of them or None, whether any process asked to stop: its
        `stop`, e.g. a signal received); one host sync; resets the counts.  Every process calls it together."""
        stop_any = self.reduce_max(torch.tensor(float(stop), device=self.skipped.device))
        skipped, first, stop_any = torch.stack([self.skipped, self.first, (stop_any > 0).long()]).tolist()
        self.skipped, self.first = torch.zeros_like(self.skipped), torch.full_like(self.first, -1)
        return skipped, (None if first < 0 else first), bool(stop_any)

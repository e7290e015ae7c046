"""A CUDA-free host-sync counter for tests: `with count_syncs() as syncs: ...` records every call, on any tensor,
of the methods that wait for a device tensor's value (item, tolist, numpy, cpu, bool/int/float/index conversion).
On CPU none of them is a real sync, but each would be one on a GPU; calls from inside torch's C++ are not seen."""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@dataclass
class Syncs:
    calls: list[str] = field(default_factory=list)  # method names, in call order
    where: list[str] = field(default_factory=list)  # "file:line" of the caller of each

    def __len__(self) -> int:
        return len(self.calls)


@contextmanager
def count_syncs():
    """Patch torch.Tensor's syncing methods for the block; yields the Syncs that record their calls."""
    syncs = Syncs()
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}
    busy = [False]  # a patched method that calls another counts once

    def counting(name, original):
        def method(self, *args, **kwargs):
            if not busy[0]:
                frame = traceback.extract_stack(limit=2)[0]
                syncs.calls.append(name)
                syncs.where.append(f"{frame.filename}:{frame.lineno}")
            busy[0], outer = True, busy[0]
            try:
                return original(self, *args, **kwargs)
            finally:
                busy[0] = outer
        return method

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield syncs
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)

"""Work whose failure on any process stops every process together, with the collective injected.

Free of torch (the token store uses it as well as mnr.distributed): `gather(obj)` is any collective that every
process calls with a picklable object and that returns all of them in rank order.
"""

from __future__ import annotations

import pickle
from typing import Callable, TypeVar

T = TypeVar("T")
Gather = Callable[[object], list]


def together(gather: Gather, fn: Callable[[], T]) -> list[T]:
    """fn() on this process, then one gather: every process gets every process's result in rank order, or the first
    failure of any process is raised on all of them (no process is left waiting in a collective).  The results
    must pickle; an error that does not is raised as a RuntimeError with its type and message."""
    try:
        out, error = fn(), None
    except Exception as err:  # raised below, on every process
        out, error = None, picklable(err)
    gathered = gather((out, error))
    for _, err in gathered:
        if err is not None:
            raise err
    return [o for o, _ in gathered]


def picklable(err: Exception) -> Exception:
    """`err`, or its message in a RuntimeError when it cannot travel to the other processes (an exception that
    fails to pickle would stop this process short of the collective, and leave the others waiting in it)."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - any failure to pickle or unpickle
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err

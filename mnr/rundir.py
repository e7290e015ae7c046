"""The output directory of a run: the guard against writing into what belongs to something else, the lock that
keeps a second run out, and moving an earlier run's checkpoints aside on --overwrite-output-dir.

Rules (main process; docs/reliability.md, "Output dirs"):
- never the model's own directory (its weights and README would be overwritten), whatever the flags;
- a non-empty dir is written into only when it holds this run (`mnr_run.json` with the same run identity) and
  `--resume` is given, or with `--overwrite-output-dir`: then the earlier run's checkpoints, best/ and
  metrics.jsonl move to `superseded-<time>/`, where `--resume auto` never looks;
- one run at a time: `.mnr.lock` holds an exclusive flock (released by the kernel when its process dies, so a
  stale lock is taken over without guessing) and names the holder for the message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from mnr.checkpoint import identity_changes, list_checkpoints, newest_intact_checkpoint

logger = logging.getLogger(__name__)

RUN_MARKER = "mnr_run.json"  # the run identity, config and world size of the run that writes this dir
LOCK_FILE = ".mnr.lock"
_RUN_OUTPUTS = ("best", "metrics.jsonl")  # with checkpoint-*: what --resume auto and the logs would pick up
_HELD: list["RunLock"] = []


class OutputDirError(RuntimeError):
    """The output dir cannot be used for this run; the message says why and what to pass."""


def saved_identity(out: Path) -> dict | None:
    """The run identity recorded in an output dir: its mnr_run.json, or (that file damaged or missing) its
    newest intact checkpoint's; None when it holds no mnr run."""
    try:
        data = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("run_identity"), dict):
            return data["run_identity"]
    except (OSError, ValueError):
        pass
    found = newest_intact_checkpoint(out) if list_checkpoints(out) else None
    return found[1].run_identity if found else None


def write_marker(out: Path, identity: dict, config: dict, world_size: int) -> None:
    """mnr_run.json, written atomically (a kill mid-write leaves the previous one)."""
    tmp = out / (RUN_MARKER + ".tmp")
    tmp.write_text(json.dumps({"run_identity": identity, "config": config, "world_size": world_size}, indent=2))
    os.replace(tmp, out / RUN_MARKER)


def check_output_dir(out: Path, model_path: str, identity: dict, resume: str, overwrite: bool) -> None:
    """Refuse an output dir this run must not write into (see the module docstring); moves an earlier run's
    checkpoints aside when --overwrite-output-dir allows it."""
    model = Path(model_path).resolve()
    if model.is_dir() and out.is_dir() and (out.resolve() == model or out.resolve() in model.parents):
        raise OutputDirError(f"output_dir={str(out)!r} is or contains the model being trained ({model_path}); choose "
                             f"another output dir (the base model would be overwritten or moved aside)")
    contents = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if not contents:
        return
    saved = saved_identity(out)
    changes = identity_changes(saved, identity) if saved is not None else None
    if resume and changes == []:
        if resume == "auto" and not list_checkpoints(out) and (out / "model.safetensors").is_file():
            raise OutputDirError(f"output_dir={str(out)!r} holds this run, finished, and no checkpoint to resume; "
                                 f"pass --overwrite-output-dir to train it again")
        return
    if overwrite:
        move_aside(out)
        return
    if changes is None:
        what = "files that are not an mnr run (a model, other data?)"
    else:
        finished = not list_checkpoints(out) and (out / "model.safetensors").is_file()
        what = (f"another run ({'; '.join(changes)})" if changes else "this run, finished" if finished
                else "this run (pass --resume auto to continue it)")
    raise OutputDirError(f"output_dir={str(out)!r} is not empty: it holds {what}; pass --overwrite-output-dir "
                         f"to write into it (earlier checkpoints are moved aside), or choose another output dir")


def move_aside(out: Path) -> None:
    """Move an earlier run's checkpoints, best/ and metrics.jsonl into superseded-<time>/, and say which."""
    moving = [p for p in list_checkpoints(out) + [out / name for name in _RUN_OUTPUTS] if p.exists()]
    moving += [p for p in out.glob("checkpoint-*.tmp")]
    if not moving:
        return
    aside = out / time.strftime("superseded-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for p in moving:
        os.replace(p, aside / p.name)
    logger.warning("--overwrite-output-dir: moved the earlier run's %s to %s (never resumed from there)",
                   ", ".join(p.name for p in moving), aside)


def open_output_dir(out: Path, model_path: str, identity: dict, resume: str, overwrite: bool) -> None:
    """Create, lock and check the output dir (main process); on refusal nothing of it is left behind."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir={str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        had_lock_file = (out / LOCK_FILE).exists()
        lock = RunLock(out)
        lock.acquire()
    except OSError as err:
        raise OutputDirError(f"output_dir={str(out)!r} is not writable ({err.strerror or err})") from None
    try:
        check_output_dir(out, model_path, identity, resume, overwrite)
    except BaseException:
        if not had_lock_file:
            lock.path.unlink(missing_ok=True)
        lock.release()
        raise


def release_locks() -> None:
    """Release every run lock this process holds (at the end of a run, however it ended)."""
    while _HELD:
        _HELD.pop().release()


class RunLock:
    """An exclusive flock on <output_dir>/.mnr.lock for the life of the run (main process)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise OutputDirError(f"output_dir={str(self.path.parent)!r} is in use by another mnr run ({holder}); "
                                 f"wait for it to end or choose another output dir") from None
        except OSError as err:  # a filesystem without locks (some network mounts): train, but say so
            logger.warning("cannot lock %s (%s): nothing keeps a second run out of this output dir", self.path,
                           err.strerror or err)
        os.ftruncate(fd, 0)  # a stale record of a dead holder is replaced
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}".encode(), 0)
        self.fd = fd
        _HELD.append(self)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking it would race a new holder)
            self.fd = None
            if self in _HELD:
                _HELD.remove(self)

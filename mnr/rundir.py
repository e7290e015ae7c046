"""The output directory of a run: the guard against writing into what belongs to something else, the lock that
keeps a second run out, and moving an earlier run aside on --overwrite-output-dir.

Rules (main process; docs/reliability.md, "Output dirs"):
- never the model's own directory (its weights and README would be overwritten), whatever the flags;
- a non-empty dir is written into only when it holds this run (`mnr_run.json` with the same run identity) and
  `--resume` is given, or with `--overwrite-output-dir`: then the earlier run's files (an mnr run's: all of them,
  its final model and mnr_run.json included, but this run's inputs; another dir's: checkpoints, best/,
  metrics.jsonl) move to `superseded-<time>/`, where `--resume auto` never looks;
- "finished" is what mnr_run.json says, written True only after the final export: model files under a marker
  that does not say so are not a finished run;
- one run at a time: `.mnr.lock` holds an exclusive flock (released by the kernel when its process dies, so a
  stale lock is taken over without guessing), names the holder for the message, and is removed on release;
- a run that ends before writing anything but mnr_run.json leaves nothing (the dir too, when it made it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from mnr.atomic import ExclusiveLock, atomic_file
from mnr.checkpoint import identity_changes, list_checkpoints, newest_intact_checkpoint

logger = logging.getLogger(__name__)

RUN_MARKER = "mnr_run.json"  # the run identity, config and world size of the run that writes this dir
LOCK_FILE = ".mnr.lock"
_RUN_OUTPUTS = ("best", "metrics.jsonl")  # with checkpoint-*: what --resume auto and the logs would pick up
DATA_SUFFIXES = tuple(f"{s}{z}" for s in (".tsv", ".csv", ".jsonl", ".json", ".parquet", ".txt") for z in ("", ".gz"))
_HELD: list["RunLock"] = []
_WRITTEN: set[Path] = set()  # the output dirs whose mnr_run.json this process wrote


class OutputDirError(RuntimeError):
    """The output dir cannot be used for this run; the message says why and what to pass."""


def saved_identity(out: Path) -> dict | None:
    """The run identity recorded in an output dir: its mnr_run.json, or (that file damaged or missing) its
    newest intact checkpoint's; None when it holds no mnr run."""
    data = _read_marker(out)
    if isinstance(data.get("run_identity"), dict):
        return data["run_identity"]
    found = newest_intact_checkpoint(out) if list_checkpoints(out) else None
    return found[1].run_identity if found else None


def _read_marker(out: Path) -> dict:
    """mnr_run.json's content; {} when missing or damaged."""
    try:
        data = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(out: Path, identity: dict, config: dict, world_size: int, finished: bool = False) -> None:
    """mnr_run.json, written atomically (a kill mid-write leaves the previous one). `finished` is True only once
    the final model is exported: until then the dir holds this run, unfinished, whatever model files it has."""
    with atomic_file(out / RUN_MARKER) as tmp:
        tmp.write_text(json.dumps({"run_identity": identity, "config": config, "world_size": world_size,
                                   "finished": finished}, indent=2))
    _WRITTEN.add(out.resolve())


def mark_finished(out: Path) -> None:
    """Record in mnr_run.json that the run's final model is exported (main process)."""
    data = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    write_marker(out, data["run_identity"], data.get("config", {}), data.get("world_size", 0), finished=True)


def is_finished(out: Path) -> bool:
    """Whether the dir holds a finished run: its mnr_run.json says so (one written without the field: it has a
    model.safetensors and no checkpoint)."""
    finished = _read_marker(out).get("finished")
    if isinstance(finished, bool):
        return finished
    return not list_checkpoints(out) and (out / "model.safetensors").is_file()


def missing_files(identity: dict) -> list[str]:
    """The local data files the run names (--train-data, --eval-data: a name with a data file's suffix) that are
    not there: a resume of such a run fails on them, not on its changed content hash."""
    specs = [s.strip() for key in ("train_data", "eval_data") for s in str(identity.get(key) or "").split(",")]
    paths = [s if os.path.exists(s) else s.rsplit("*", 1)[0].strip() for s in specs if s]
    return [p for p in paths if p.lower().endswith(DATA_SUFFIXES) and not os.path.exists(p)]


def check_output_dir(out: Path, model_path: str, identity: dict, resume: str, overwrite: bool,
                     keep: tuple[str, ...] = ()) -> None:
    """Refuse an output dir this run must not write into (see the module docstring); moves an earlier run's
    files aside when --overwrite-output-dir allows it (never `keep`: this run's inputs)."""
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
        if resume == "auto" and not list_checkpoints(out) and is_finished(out):
            raise OutputDirError(f"output_dir={str(out)!r} holds this run, finished, and no checkpoint to resume; "
                                 f"pass --overwrite-output-dir to train it again")
        return
    missing = missing_files(identity) if changes else []
    if missing:
        raise OutputDirError(f"{missing[0]}: no such file (moved or deleted?); output_dir={str(out)!r} holds a run "
                             f"of it: put the file back to resume that run")
    if overwrite:
        move_aside(out, everything=saved is not None, keep=keep)
        return
    if changes is None:
        what = "files that are not an mnr run (a model, other data?)"
    else:
        what = (f"another run ({'; '.join(changes)})" if changes else "this run, finished" if is_finished(out)
                else "this run (pass --resume auto to continue it)")
    raise OutputDirError(f"output_dir={str(out)!r} is not empty: it holds {what}; pass --overwrite-output-dir "
                         f"to write into it (earlier checkpoints are moved aside), or choose another output dir")


def move_aside(out: Path, everything: bool = False, keep: tuple[str, ...] = ()) -> None:
    """Move an earlier run's files into superseded-<time>/, and say which: its checkpoints, best/ and
    metrics.jsonl; with `everything` (the dir holds an mnr run) all of the dir, its final model and mnr_run.json
    included, but the lock, earlier superseded-* dirs and the paths in `keep` (this run's inputs, left in place)."""
    kept = [Path(k).resolve() for k in keep if k]

    def is_input(p: Path) -> bool:
        return any(k == p.resolve() or p.resolve() in k.parents for k in kept)

    moving = [p for p in list_checkpoints(out) + [out / name for name in _RUN_OUTPUTS] if p.exists()]
    moving += sorted(out.glob("checkpoint-*.tmp"))
    if everything:
        moving += sorted(p for p in out.iterdir() if p not in moving and p.name != LOCK_FILE
                         and not p.name.startswith("superseded-"))
    inputs = [p for p in moving if is_input(p)]
    moving = [p for p in moving if p not in inputs]
    if inputs:
        logger.warning("--overwrite-output-dir: %s, an input of this run, stays in %s", ", ".join(p.name for p in inputs),
                       out)
    if not moving:
        return
    stamp = time.strftime("superseded-%Y%m%d-%H%M%S", time.gmtime())
    aside = next(out / name for n in range(1, 1000) if not (out / (name := stamp + (f"-{n}" if n > 1 else ""))).exists())
    aside.mkdir()
    for p in moving:
        os.replace(p, aside / p.name)
    logger.warning("--overwrite-output-dir: moved the earlier run's %s to %s (never resumed from there)",
                   ", ".join(p.name for p in moving), aside)


def open_output_dir(out: Path, model_path: str, identity: dict, resume: str, overwrite: bool,
                    keep: tuple[str, ...] = ()) -> None:
    """Create, lock and check the output dir (main process); on refusal nothing of it is left behind."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir={str(out)!r} exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out, created)
        lock.acquire()
    except OSError as err:
        raise OutputDirError(f"output_dir={str(out)!r} is not writable ({err.strerror or err})") from None
    try:
        check_output_dir(out, model_path, identity, resume, overwrite, keep)
    except BaseException:
        lock.release()
        raise


def release_locks() -> None:
    """Release every run lock this process holds (at the end of a run, however it ended). An output dir left
    holding nothing but the mnr_run.json this process wrote (a run that failed or stopped before its first
    checkpoint, metrics record or model) is emptied, and removed when this run created it."""
    while _HELD:
        _HELD.pop().release()


class RunLock:
    """An exclusive lock on <output_dir>/.mnr.lock for the life of the run (main process); the file names the
    holder for the message, and is removed on release."""

    def __init__(self, out: Path, created: bool = False):
        self.out, self.created = out, created  # created: this run made the output dir
        self.lock = ExclusiveLock(out / LOCK_FILE)

    @property
    def path(self) -> Path:
        return self.lock.path

    def acquire(self) -> None:
        try:
            self.lock.acquire(blocking=False)
        except BlockingIOError:
            holder = self.lock.holder() or "unknown process"
            raise OutputDirError(f"output_dir={str(self.out)!r} is in use by another mnr run ({holder}); "
                                 f"wait for it to end or choose another output dir") from None
        fd = self.lock.fd
        os.ftruncate(fd, 0)  # a stale record of a dead holder is replaced
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}".encode(), 0)
        _HELD.append(self)

    def release(self) -> None:
        if not self.lock.is_locked:
            return
        if self in _HELD:
            _HELD.remove(self)
        marker = self.out / RUN_MARKER
        rest = [p for p in self.out.iterdir() if p.name != LOCK_FILE] if self.out.is_dir() else []
        if (rest == [marker] and self.out.resolve() in _WRITTEN and not is_finished(self.out)) or not rest:
            marker.unlink(missing_ok=True)
            self.lock.release()
            if self.created:
                try:
                    self.out.rmdir()
                except OSError:  # something appeared meanwhile: keep it
                    pass
            return
        self.lock.release()

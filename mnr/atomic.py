"""Writes that are whole or absent, write errors in one line, and lock files that go when released (no torch).

- `atomic_dir(path)` / `atomic_file(path)`: build in a temporary sibling, fsync, rename into place; on any failure
  (a full disk, a kill signal raised as an exception) the temporary is removed and `path` is left as it was.
- `staged_into(folder)`: files built in a temporary dir inside `folder`, moved in one rename each once all are
  written (for the final export, whose files share the output dir with the checkpoints).
- Every write failure (OSError, SafetensorError, torch.save's RuntimeError) becomes a `WriteError`:
  "cannot write <path>: disk full (<reason>)".
- `ExclusiveLock`: a flock on a file that is removed on release; a waiter that got the lock on a removed file
  takes it again on the new one, so two holders never coexist.
- `same_file` / `own_input`: an output that is one of the inputs (by device and inode: links included).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteError(OSError):
    """A save could not be written; str() is the one-line message naming the path and the reason."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(code or errno.EIO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


_TORCH_WRITE = ("inline_container.cc", "PytorchStreamWriter", "file write failed")  # torch.save's RuntimeErrors


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` is what a write of files raises on a full or unwritable disk: an OSError, safetensors'
    SafetensorError, or torch.save's RuntimeError from its stream writer."""
    if isinstance(err, OSError):
        return True
    if type(err).__name__ == "SafetensorError":
        return True
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in _TORCH_WRITE)


def write_error(path: str | os.PathLike, err: BaseException) -> WriteError:
    """The one-line error of a failed write of `path` (see is_write_failure)."""
    if isinstance(err, WriteError):
        return err
    code = err.errno if isinstance(err, OSError) else None
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    reason = err.strerror if isinstance(err, OSError) and err.strerror else text
    full = code in _FULL or any(m in text for m in ("No space left", "StorageFull", "QuotaExceeded", "os error 28"))
    if not full and code is None:  # torch's messages do not say why: a disk with nothing left does
        full = _free_bytes(Path(path)) < (1 << 20)
    if any(mark in text for mark in _TORCH_WRITE):  # its text is an internal assertion
        reason = "No space left on device" if full else f"torch.save: {text}"
    kind = ("disk full" if full else "not writable" if code in _READ_ONLY or "PermissionDenied" in text
            else "write failed")
    return WriteError(f"cannot write {path}: {kind} ({reason})", errno.ENOSPC if full else code)


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return 1 << 62


def fsync_tree(root: Path) -> None:
    for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root if root.is_dir() else root.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _cleaned_on_failure(tmp: Path, target: Path) -> Iterator[None]:
    """Remove `tmp` on any exception; a write error becomes a WriteError naming `target`."""
    try:
        yield
    except BaseException as err:
        remove(tmp)
        if is_write_failure(err):
            raise write_error(target, err) from None
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty `<path>.tmp` (a left-over one is removed) to fill; when the block ends normally its files
    are fsynced and it is renamed to `path`, replacing what was there. On any exception the temporary is removed,
    `path` is untouched, and a write error is raised as a `WriteError` naming `path`."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    with _cleaned_on_failure(tmp, final):
        remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        fsync_tree(tmp)
        replace(tmp, final)


def replace(src: Path, dst: Path) -> None:
    """Rename src to dst, replacing a directory there too (moved to a trash sibling first, then removed)."""
    if dst.is_dir() and not dst.is_symlink():
        trash = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync_dir(dst.parent)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields `<path>.tmp-<random>` to write; renamed to `path` when the block ends normally (see atomic_dir)."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    with _cleaned_on_failure(tmp, final):
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)


STAGE = "export.tmp"  # the temporary dir of `staged_into`


@contextmanager
def staged_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty `<folder>/export.tmp/` to fill; when the block ends normally its entries are fsynced and
    moved into `folder` (one rename each, replacing entries of the same name), after all were written. On any
    exception nothing in `folder` has changed but the temporary, which is removed."""
    out = Path(folder)
    tmp = out / STAGE
    with _cleaned_on_failure(tmp, out):
        remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        fsync_tree(tmp)
        for entry in sorted(tmp.iterdir()):
            replace(entry, out / entry.name)
    tmp.rmdir()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (the same device and inode: a hard or symbolic link counts)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def own_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> str | None:
    """The first input that is `output` itself (see same_file); None when none is."""
    return next((str(i) for i in inputs if same_file(output, i)), None)


class ExclusiveLock:
    """An exclusive flock on `path`, created on acquire and removed on release (no stale lock files).

    The file is removed while the lock is held; a process that was waiting on it then holds a lock on a file
    no longer there, sees that (its inode is not the path's), and locks the path afresh. On a filesystem without
    locks (some network mounts) it warns and goes on unlocked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None

    @property
    def is_locked(self) -> bool:
        return self.fd is not None

    def acquire(self, blocking: bool = True) -> None:
        """Raises BlockingIOError when not blocking and another process holds it (its fd is then closed)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise
            except OSError as err:
                if err.errno == errno.EINTR:
                    os.close(fd)
                    continue
                logger.warning("cannot lock %s (%s): nothing keeps a second process out", self.path,
                               err.strerror or err)
            except BaseException:
                os.close(fd)
                raise
            if _same_inode(fd, self.path):
                self.fd = fd
                return
            os.close(fd)  # locked a file its holder removed: lock the path's new file

    def holder(self) -> str:
        """What the lock file says (RunLock writes its holder there)."""
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while held: no one else can be holding this file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_inode(fd: int, path: Path) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)

"""Atomic file writes (a file appears under its final name complete, or not at all), and the lock that
keeps a folder to one writer (`FolderLock`).

Everything peering writes (pictures, GIFs, the report, the run summary, checkpoints, downloads) goes
through `atomic_path`: the data is written to a hidden temp file in the same folder, then renamed over the
final name. An error or Ctrl+C half-way leaves the old file (or none), never a truncated one, and the temp
file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from peering.errors import FolderLockedError

LOCK_FILE = ".peering.lock"
"""The lock file `FolderLock` keeps in a folder (it stays there; only the OS lock on it comes and goes)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, rename it over ``path``.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), [p.name for p in target.parent.iterdir()]
    ('done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, fsync: bool = False
) -> Path:
    """Write a file through ``write(file)`` atomically; with ``fsync``, also flush it to the disk first.

    >>> import tempfile
    >>> atomic_write(Path(tempfile.mkdtemp()) / "b.bin", lambda f: f.write(b"xy")).read_bytes()
    b'xy'
    """
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        write(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to a temp file beside ``path``, then rename it into place.

    Paths are written as POSIX strings and tensors as lists; NaN and infinities are refused.

    >>> import tempfile
    >>> write_json_atomic(Path(tempfile.mkdtemp()) / "x.json", {"a": 1}).read_text()
    '{\\n  "a": 1\\n}\\n'
    """
    encoded = (json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n").encode("utf-8")

    def write(f: IO[bytes]) -> None:
        f.write(encoded)

    return atomic_write(path, write)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    tolist = getattr(value, "tolist", None)  # tensors and arrays, without importing torch here
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")



class FolderLock:
    """An exclusive lock on a folder, so that one process at a time writes into it.

    The lock is the operating system's (``flock`` on Linux and macOS, ``msvcrt.locking`` on Windows) on
    ``<folder>/.peering.lock``: it is released when the holder exits, however it exits (a SIGKILL
    included), so a crashed run never leaves a stale lock. The holder writes its PID and host name into the
    file, which a refused process reads to say who holds it. The file itself stays (removing it would let
    two processes lock two different files of the same name). Locks on network file systems are as good
    as the file system's own.

    Raises:
        FolderLockedError: on `acquire` (or ``with``), when another process holds the lock; its message
            names the holder's PID and host.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with FolderLock(folder, "explain-dataset") as lock:
    ...     lock.held
    True
    >>> FolderLock(folder).held
    False
    """

    def __init__(self, folder: str | os.PathLike[str], holder: str = "a run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.holder = holder
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock now or raise `FolderLockedError` (never waits)."""
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd)
        except OSError:
            os.close(fd)
            raise
        if not locked:
            pid, host = _holder_of(fd)
            os.close(fd)
            who = f"process {pid}" if pid is not None else "another process"
            where = f" on {host}" if host and host != socket.gethostname() else ""
            raise FolderLockedError(
                f"{self.folder} is in use by {who}{where} (its lock {self.path}): one run writes into a "
                "folder at a time; wait for it to finish or stop it, or use another output folder",
                pid,
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n{self.holder}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the lock go (the file stays); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        _unlock(fd)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK}


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` without waiting: True when locked, False when another process holds it."""
    try:
        if sys.platform == "win32":
            import msvcrt

            os.lseek(fd, 1 << 20, os.SEEK_SET)  # a byte far past the PID, so the PID stays readable
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in _BUSY:
            return False
        raise
    return True


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        if sys.platform == "win32":
            import msvcrt

            os.lseek(fd, 1 << 20, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)


def _holder_of(fd: int) -> tuple[int | None, str | None]:
    """The PID and host the holder wrote into the lock file (None when it has not written them yet)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        lines = os.read(fd, 4096).decode(errors="replace").splitlines()
    except OSError:
        return None, None
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
    return pid, (lines[1].strip() if len(lines) > 1 else None)

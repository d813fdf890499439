"""Atomic file writes: nothing a user has on disk is ever half-written."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_tmp(folder: Path) -> int:
    """Delete leftovers of interrupted atomic writes under ``folder``; return how many."""
    n = 0
    if folder.is_dir():
        for p in folder.rglob(f".*{TMP_SUFFIX}"):
            p.unlink(missing_ok=True)
            n += 1
    return n


class LockedError(OSError):
    """Another process holds a lock this one needs."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the duration; if another process
    holds it, raise :class:`LockedError` naming that process. The lock dies with its process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise LockedError(
                f"{what} is being written by {holder} (lock {path}); wait for it to end or "
                "stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            (
                f"pid {os.getpid()} on {socket.gethostname()} "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            ).encode(),
            0,
        )
        yield
    finally:
        os.close(fd)


def complete_lines(path: str | os.PathLike) -> int:
    """The number of complete (newline-ended) lines of an append-only file; a torn last line (a
    write cut short) is cut off first, so that appending goes on from a whole line."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        os.truncate(path, end)
    return data[:end].count(b"\n")

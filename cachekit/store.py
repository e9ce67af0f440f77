"""Durable file primitives: atomic publish, writer locks, array checksums.

A published file is only ever created by writing `X.tmp`, fsync-ing it, `os.replace`-ing it onto
`X` and fsync-ing the directory, so a kill at any moment leaves either the old file or the new
one, never a torn one. (A SIGKILL'd h5py writer can leave a file HDF5 refuses to open.)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from .errors import CacheInUseError, CachekitError


def fsync_dir(path: Path):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def unique_tmp_path(path: Path) -> Path:
    """A temporary name no other writer uses: for files that several processes (torchrun ranks, shards on
    several hosts, which may share a pid) may publish at once."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")


def publish(tmp: Path, final: Path):
    """fsync `tmp`, atomically rename it onto `final`, fsync the directory."""
    fd = os.open(str(tmp), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json_atomic(path: Path, obj):
    tmp = unique_tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    publish(tmp, path)


@contextlib.contextmanager
def os_errors(what: str, where: str = "--out location"):
    """Turn disk-full / permission / read-only errors into one-line CachekitErrors; `where` names what the
    user can change (an --out location by default)."""
    no_space = CachekitError(f"no space left while writing {what}; fix: free disk space or choose "
                             f"another {where}, then rerun the same command to resume")
    try:
        yield
    except RuntimeError as exc:
        # h5py reports a failed flush on close as RuntimeError("... errno = 28 ...")
        if "errno = 28" in str(exc) or "No space left" in str(exc):
            raise no_space from None
        raise
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            raise CachekitError(f"cannot write {what}: a path component is a file, not a folder "
                                f"({exc.filename or what}); fix: choose another {where}") from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CachekitError(f"cannot write {what}: {exc.strerror}; fix: choose a writable "
                                f"{where}") from None
        raise


def check_space(directory: Path, nbytes: int, what: str):
    """Refuse up front a write that cannot fit: HDF5 failing part-way through a file is messy."""
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise CachekitError(f"no space left for {what}: it needs about {nbytes / 2**20:.1f} MiB, "
                            f"{free / 2**20:.1f} MiB are free; fix: free disk space or choose another "
                            "location, then rerun the same command to resume")


class WriterLock:
    """An exclusive, non-blocking advisory lock on `<target>.lock` held while a command writes.

    The lock file records the holder's PID so a second writer can say who holds it. The kernel
    drops flock locks when a process dies, so a SIGKILL never leaves a stale lock behind.
    """

    def __init__(self, target: Path, wait: float = 0.0, kind: str = "cache", where: str = "--out location"):
        self.path = Path(str(target) + ".lock")
        self.kind = kind  # what the target is, for the message: cache, results folder, results file
        self.where = where  # what to change when the lock file cannot be written (see os_errors)
        self.fd = None
        self.wait = wait  # seconds to keep retrying (short critical sections, e.g. storing a result)

    def __enter__(self):
        with os_errors(str(self.path), self.where):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CacheInUseError(f"{self.kind} {str(self.path)[:-5]} is in use by PID {holder}; fix: wait for "
                                      "that command to finish (or stop it) and rerun") from None
        try:
            with os_errors(str(self.path), self.where):
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc):
        # The lock file stays: unlinking it would let two writers lock two different inodes.
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass  # the PID is only a hint; unlocking matters
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class ArrayHasher:
    """sha256 over an array's C-order bytes, fed in row blocks (so huge datasets stream)."""

    def __init__(self):
        self.h = hashlib.sha256()

    def update(self, block: np.ndarray):
        self.h.update(np.ascontiguousarray(block).tobytes())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def array_sha256(a: np.ndarray) -> str:
    h = ArrayHasher()
    h.update(a)
    return h.hexdigest()

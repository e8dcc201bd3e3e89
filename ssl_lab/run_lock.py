"""One process per run directory: `<run_dir>/run.lock`, taken before the run writes anything, released on exit.

The lock is an exclusive `flock` on the file, so the kernel drops it when its process dies however it dies
(kill -9 included); the file's text (pid, host, start time; not the command line, which may hold a secret)
only names the holder for the message a second process prints. A file left behind by a dead holder is taken over
with a warning. `filelock` is not used here because it truncates the file on every attempt, which would erase the
holder's name before anyone read it.
DDP ranks other than 0 (and torchrun's other processes) run inside rank 0's claim and take no lock.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from ssl_lab import run_log
from ssl_lab.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode("utf-8", "replace")
    try:
        holder = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


class RunLock:
    """The held lock of one run directory; `release()` (idempotent) removes the file and closes it."""

    def __init__(self, path: Path, fd: int, created_dirs: list[Path]) -> None:
        self.path, self._fd, self._created = path, fd, created_dirs

    def release(self, remove_created_dirs: bool = False) -> None:
        """Give the directory back. `remove_created_dirs`: the run was refused before writing, so the folders this
        lock created for its file go too, if nothing else was put in them."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding the flock: no one can take a file that is going away
        os.close(self._fd)
        self._fd = None
        if remove_created_dirs:
            for folder in self._created:  # innermost first
                with contextlib.suppress(OSError):  # not empty: someone else wrote there; leave it
                    folder.rmdir()


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Take the run directory for this process, or raise ConfigError naming the process that holds it."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise ConfigError(f"{run_dir} is in use by {_describe(holder)}: one run directory takes one process. "
                              f"Wait for it to end, or pass another run_dir (or run_name).") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder released (and removed) the file between our open and our flock: try again
    stale = _read_holder(fd)
    if stale:
        log.warning("%s: taking over the lock left by %s, which is no longer running", run_dir, _describe(stale))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, _holder_text().encode())
    os.fsync(fd)
    return RunLock(path, fd, created)


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[RunLock | None]:
    """Hold `run_dir` for the block (rank 0 only). A block that fails before the run wrote any file of its own
    leaves no lock and no folder behind."""
    if rank_zero_only.rank != 0:
        yield None
        return
    lock = acquire(run_dir)
    log_file = run_log.attach(Path(run_dir))  # held in memory until the run writes its config (ssl_lab.run_log)
    try:
        yield lock
    except BaseException as err:
        run_log.detach(log_file, err)
        only_lock = [p.name for p in Path(run_dir).iterdir()] == [LOCK_NAME]
        lock.release(remove_created_dirs=only_lock)
        raise
    run_log.detach(log_file)
    lock.release()

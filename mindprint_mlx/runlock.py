"""An advisory lock on a run directory, held for the life of a run (or `--resume`).

`run_dir/.lock` holds the holder's pid, host, start time and command line. The lock itself
is an exclusive `flock` on that file, which the kernel drops when the holder exits in any
way (even SIGKILL), so a lock whose process is gone is never mistaken for a live one: the
next run takes it over and says whose it was. A second run while the holder lives refuses,
naming it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import MindprintError

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; the pid check decides
    fcntl = None


class RunLocked(MindprintError):
    """Another live process holds the run directory."""


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(
        started, (int, float)) else "an unknown time"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}"


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunLock:
    path: Path
    fd: int
    info: dict

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            # Remove the file only while it is still ours (same inode), then unlock.
            with_ours = os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            with_ours = False
        if with_ours:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: str | os.PathLike, note: Callable[[str], None] | None = None) -> RunLock:
    """Lock `run_dir` (created if missing) for this process, or raise `RunLocked` naming the
    holder. A lock left by a process that is gone is taken over; `note` is told whose."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                holder = _read(path)
                raise RunLocked(f"{d} is in use by another mindprint run ({_describe(holder)}); "
                                "wait for it to finish or stop it first") from None
        # The file may have been removed by its previous holder between our open and flock:
        # then we hold a lock on a file nobody else can see; try again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read(path)
        if fcntl is None and previous.get("pid") and previous.get("host") == socket.gethostname() \
                and _pid_alive(int(previous["pid"])) and int(previous["pid"]) != os.getpid():
            os.close(fd)
            raise RunLocked(f"{d} is in use by another mindprint run ({_describe(previous)})")
        if previous and note is not None:
            note(f"note: took over the lock of {d} from {_describe(previous)}: that process is gone")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "argv": list(sys.argv)}
        data = (json.dumps(info, sort_keys=True) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return RunLock(path, fd, info)
    raise RunLocked(f"{d}: could not take the run lock ({path} keeps changing)")

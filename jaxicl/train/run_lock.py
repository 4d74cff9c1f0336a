"""One run at a time per output directory: out_dir/.lock names the host and process writing there (and, on Linux, when
that process started).

Two processes training into one out_dir (a rerun started while a forgotten one still runs) interleaved their
metrics.jsonl rows and checkpoints with no error. A lock whose process has ended (a killed run) is taken over; one
held on another host cannot be checked, and is refused with how to clear it. A lock naming this very process that
this process does not hold is stale too: a killed run's pid, given to its rerun (a container restarted with the same
hostname starts its pids from 1 again), and so is one whose pid now belongs to a process that started at another time
(the pid was given to an unrelated process after the run was killed). Taking over a stale lock happens under an flock
on out_dir/.lock.takeover, so of two processes that both found the lock stale only one takes it.
"""

import contextlib
import fcntl
import json
import os
import socket

from jaxicl import outputs
from jaxicl.validation import ConfigError

LOCK_FILE = ".lock"
_HELD: set[str] = set()  # the real paths of the locks this process holds


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _start_time(pid: int) -> int | None:
    """When process pid started (clock ticks since boot: /proc/<pid>/stat's 22nd field); None where unknown (not
    Linux, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # fields from the 3rd, after "pid (command)"
    except (OSError, IndexError, ValueError):
        return None


def _holder(path: str) -> dict | None:
    """The lock's {"host", "pid", "started"}, or None where it is gone, unreadable, or names a process of this host
    that ended, a pid now another process's (another start time), or this process where it does not hold the lock."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except (FileNotFoundError, ValueError):  # removed meanwhile, or not a lock this module wrote
        return None
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        started = holder.get("started")
        if (not _running(pid) or pid == os.getpid() and os.path.realpath(path) not in _HELD
                or started is not None and _start_time(pid) not in (None, started)):
            return None
    return holder


def _remove_if_stale(path: str) -> dict | None:
    """Removes the lock at path where its holder has ended, reading it again under the takeover flock (a process that
    found it stale earlier must not remove the lock another process took meanwhile); the live holder, or None."""
    with open(f"{path}.takeover", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        holder = _holder(path)
        if holder is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return holder


@contextlib.contextmanager
def exclusive(out_dir: str | None):
    """Holds out_dir/.lock for the block (the primary process of a multi-host run takes it for all); ConfigError
    where another running process holds it. Nothing for out_dir None."""
    if not out_dir or not outputs.is_primary():
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
    written = f"{path}.{mine['pid']}"  # the lock appears whole (a hard link), never empty to another process
    with open(written, "w") as f:
        json.dump(mine, f)
    try:
        while True:
            try:
                os.link(written, path)
                break
            except FileExistsError:
                holder = _holder(path) or _remove_if_stale(path)  # the guard only where it looked stale
                if holder is not None:
                    raise ConfigError(f"out_dir: {out_dir} is being written by another run (process "
                                      f"{holder.get('pid')} on {holder.get('host')}); wait for it, stop it, or use "
                                      f"another out_dir (if that run is no longer running, delete {path})") from None
    finally:
        os.remove(written)
    held = os.path.realpath(path)
    _HELD.add(held)
    try:
        yield
    finally:
        if _holder(path) == mine:
            os.remove(path)
        _HELD.discard(held)

"""A process's exit as the kernel reports it before the process is reaped.

A SIGKILLed process is in ``do_exit`` (``PF_EXITING``) for as long as the kernel takes to tear
down its address space and files: seconds for a GPU worker with tens of GB of pinned host
memory. Its sockets close early in that; its GPU memory is freed only at the end. The agent
uses this to report a death early (agent/lifeline.py); a trainer sharing a GPU with such a
process uses it to wait for that memory instead of failing to allocate (trainer/gpu_release.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PF_EXITING = 0x4
"""task flag: the process is in do_exit (include/linux/sched.h)."""

_REAPABLE = ("Z", "X")
"""states of a process whose teardown is over (zombie, dead): only the reap is left."""


@dataclass(frozen=True, kw_only=True)
class _Stat:
    """The fields of ``/proc/PID/stat`` this module reads."""

    state: str
    flags: int
    exit_status: int | None
    """``waitpid``-form status (field 52); None on a kernel whose stat line is too short."""

    @property
    def exiting(self) -> bool:
        """In ``do_exit`` or past it (a zombie)."""
        return self.state in _REAPABLE or bool(self.flags & PF_EXITING)

    @property
    def tearing_down(self) -> bool:
        """In ``do_exit`` and not yet a zombie: memory is still being released."""
        return self.state not in _REAPABLE and bool(self.flags & PF_EXITING)


def _parse_stat(stat: str) -> _Stat | None:
    """``/proc/PID/stat`` text -> its state, flags and exit status; None when too short.
    Fields after the command (which may hold spaces or parentheses) start at field 3: the
    state; field 9 the flags; field 52 the exit status in ``waitpid`` form."""
    fields = stat[stat.rindex(")") + 2:].split()
    if len(fields) < 7:
        return None
    return _Stat(state=fields[0], flags=int(fields[6]), exit_status=int(fields[49]) if len(fields) >= 50 else None)


def _read_stat(pid: int, proc_root: str) -> _Stat | None:
    """The parsed ``/proc/PID/stat`` of ``pid``; None when it cannot be read (gone and reaped)."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return _parse_stat(text)


def dying_returncode(pid: int, *, proc_root: str = "/proc") -> int | None:
    """The subprocess-style return code (negative: killed by that signal) of ``pid`` if the
    kernel has begun its exit, else None (alive, or gone and already reaped)."""
    return _returncode(_read_stat(pid, proc_root))


def is_tearing_down(pid: int, *, proc_root: str = "/proc") -> bool:
    """True while ``pid`` is in ``do_exit`` and not yet a zombie: its memory (host, and the
    GPU memory its driver files hold) is still being released."""
    stat = _read_stat(pid, proc_root)
    return stat is not None and stat.tearing_down


def parse_exit(stat: str) -> int | None:
    """``/proc/PID/stat`` text -> the return code if the process is exiting, else None."""
    return _returncode(_parse_stat(stat))


def _returncode(stat: _Stat | None) -> int | None:
    if stat is None or stat.exit_status is None or not stat.exiting:
        return None
    status = stat.exit_status
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None

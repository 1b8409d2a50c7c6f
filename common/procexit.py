"""A process's exit as the kernel reports it before the process is reaped.

A SIGKILLed process is in ``do_exit`` (``PF_EXITING``) for as long as the kernel takes to tear
down its address space and files: seconds for a GPU worker with tens of GB of pinned host
memory. Its sockets close early in that; its GPU memory is freed only at the end. The agent
uses this to report a death early (agent/lifeline.py); a trainer sharing a GPU with such a
process uses it to wait for that memory instead of failing to allocate (trainer/gpu_release.py).
"""

from __future__ import annotations

import os

PF_EXITING = 0x4
"""task flag: the process is in do_exit (include/linux/sched.h)."""


def dying_returncode(pid: int, *, proc_root: str = "/proc") -> int | None:
    """The subprocess-style return code (negative: killed by that signal) of ``pid`` if the
    kernel has begun its exit, else None (alive, or gone and already reaped)."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return parse_exit(stat)


def is_tearing_down(pid: int, *, proc_root: str = "/proc") -> bool:
    """True while ``pid`` is in ``do_exit`` and not yet a zombie: its memory (host, and the
    GPU memory its driver files hold) is still being released."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return len(fields) > 6 and fields[0] not in ("Z", "X") and bool(int(fields[6]) & PF_EXITING)


def parse_exit(stat: str) -> int | None:
    """``/proc/PID/stat`` text -> the return code if the process is exiting, else None.
    Fields after the command (which may hold spaces or parentheses) start at field 3: the
    state; field 9 the flags; field 52 the exit status in ``waitpid`` form."""
    fields = stat[stat.rindex(")") + 2:].split()
    if len(fields) < 50:
        return None
    state, flags, status = fields[0], int(fields[6]), int(fields[49])
    if state not in ("Z", "X") and not flags & PF_EXITING:
        return None
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None

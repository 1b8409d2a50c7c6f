"""Both readers of a process's exit (common/procexit.py) parse one /proc/PID/stat the same way:
state (field 3), flags with PF_EXITING (field 9), exit status (field 52)."""

from __future__ import annotations

import pytest

from common.procexit import PF_EXITING, dying_returncode, is_tearing_down, parse_exit

pytestmark = pytest.mark.timeout(30)


def stat_line(state: str, flags: int, status: int, *, fields: int = 51) -> str:
    """A stat line whose command holds spaces and parentheses, with ``fields`` fields after it."""
    rest = [state] + ["0"] * 5 + [str(flags)] + ["0"] * 42 + [str(status)] + ["0"]
    return "123 (python3 (x) y) " + " ".join(rest[:fields])


@pytest.fixture
def proc(tmp_path):
    """A fake /proc: ``proc(pid, text)`` writes ``pid``'s stat."""
    def write(pid: int, text: str) -> str:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(text)
        return str(tmp_path)
    return write


@pytest.mark.parametrize("state,flags,status,tearing,code", [
    ("S", 0x400000, 0, False, None),          # alive
    ("R", 0x400000 | PF_EXITING, 9, True, -9),  # in do_exit after SIGKILL: memory still going
    ("D", PF_EXITING, 0, True, 0),            # in do_exit, exit code 0
    ("Z", PF_EXITING, 9, False, -9),          # zombie: teardown over, not reaped
    ("Z", 0x0, 3 << 8, False, 3),             # zombie after exit(3)
    ("X", 0x0, 3 << 8, False, 3),             # dead
])
def test_state_and_flags_read_the_same_by_both(proc, state, flags, status, tearing, code):
    root = proc(42, stat_line(state, flags, status))
    assert is_tearing_down(42, proc_root=root) is tearing
    assert dying_returncode(42, proc_root=root) == code
    assert parse_exit(stat_line(state, flags, status)) == code


def test_a_short_stat_line_has_flags_but_no_exit_status(proc):
    """An old kernel's line (no field 52): teardown is still seen; the return code is not."""
    root = proc(7, stat_line("R", PF_EXITING, 9, fields=20))
    assert is_tearing_down(7, proc_root=root)
    assert dying_returncode(7, proc_root=root) is None


def test_a_line_without_flags_is_neither(proc):
    root = proc(8, stat_line("R", PF_EXITING, 9, fields=3))
    assert not is_tearing_down(8, proc_root=root)
    assert dying_returncode(8, proc_root=root) is None


def test_no_stat_file_is_neither(tmp_path):
    assert not is_tearing_down(99, proc_root=str(tmp_path))
    assert dying_returncode(99, proc_root=str(tmp_path)) is None

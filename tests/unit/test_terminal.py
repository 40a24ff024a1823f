"""The CLI's terminal (kvmc/terminal.py) on a real pty: raw while attached, restored on every
way out, the window size sent at start and on SIGWINCH."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
import time
from collections.abc import Iterator

import pytest

from kvmc.terminal import HostTerminal, TerminalSignal, make_raw, window_size


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    yield master, slave
    os.close(master)
    os.close(slave)


def test_make_raw_is_cfmakeraw() -> None:
    cooked = [termios.ICRNL | termios.IXON, termios.OPOST | termios.ONLCR, termios.CS7 | termios.PARENB,
              termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN, 0, 0, [0] * 32]
    iflag, oflag, cflag, lflag, _, _, cc = make_raw(cooked)
    assert iflag & (termios.ICRNL | termios.IXON) == 0 and oflag & termios.OPOST == 0
    assert lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN) == 0
    assert cflag & termios.CSIZE == termios.CS8 and not cflag & termios.PARENB
    assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)


def test_raw_while_attached_and_restored_on_an_error(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    sizes: list[tuple[int, int]] = []
    term = HostTerminal(slave, slave)
    assert term.size() == window_size(slave) == (30, 100)
    with pytest.raises(RuntimeError):
        with term.session(lambda rows, cols: sizes.append((rows, cols)), raw=True):
            assert termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
            assert sizes == [(30, 100)]  # the size now, at the start of the session
            raise RuntimeError("the VM was killed")
    assert termios.tcgetattr(slave) == before


def test_sigwinch_resizes_and_sigterm_restores_the_terminal(pty: tuple[int, int]) -> None:
    master, slave = pty
    before = termios.tcgetattr(slave)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGWINCH)
    sizes: list[tuple[int, int]] = []
    with pytest.raises(TerminalSignal) as ended:
        with HostTerminal(slave, slave).session(lambda rows, cols: sizes.append((rows, cols)), raw=True):
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
            os.kill(os.getpid(), signal.SIGWINCH)  # what the kernel sends the terminal's foreground
            deadline = time.monotonic() + 5
            while (50, 132) not in sizes and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert ended.value.code == 128 + signal.SIGTERM
    assert sizes == [(30, 100), (50, 132)]
    assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signal.SIGTERM) is handlers[0] and signal.getsignal(signal.SIGWINCH) is handlers[1]


def test_no_raw_mode_without_stdin_or_a_terminal(pty: tuple[int, int], tmp_path) -> None:  # noqa: ANN001
    _, slave = pty
    before = termios.tcgetattr(slave)
    with HostTerminal(slave, slave).session(lambda r, c: None, raw=False):
        assert termios.tcgetattr(slave) == before  # -t without -i: the terminal stays cooked
    with open(tmp_path / "f", "wb") as f, HostTerminal(f.fileno(), f.fileno()).session(lambda r, c: None, raw=True):
        pass  # not a terminal: nothing to do, nothing raised

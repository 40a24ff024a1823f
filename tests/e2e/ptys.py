"""A program on a real pseudo-terminal, driven as a person at a terminal drives it.

:class:`Terminal` starts a command (the kvmc CLI, the docker CLI) as the session leader of a
fresh pty whose window size the test sets, then types into it, reads what it shows, resizes it
(the kernel sends the program SIGWINCH, as a terminal emulator's resize does) and reads its
termios settings (``stty -g``) to check that raw mode was restored.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence


class Terminal:
    """One command on its own pty. Use as a context manager (kills it if still running)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.settings_before = self.settings()
        self.output = bytearray()

        def controlling_terminal() -> None:  # in the child, after setsid (start_new_session)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(list(argv), stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env={**env, "TERM": "xterm"}, start_new_session=True,
                                     preexec_fn=controlling_terminal, close_fds=True)

    def settings(self) -> list:
        """The terminal's termios settings (what ``stty -g`` prints), as seen from the slave."""
        return termios.tcgetattr(self.slave)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read(self, timeout: float) -> bool:
        if not select.select([self.master], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every slave holder is gone
            return False
        self.output += data
        return bool(data)

    def expect(self, pattern: bytes | str, timeout: float = 60.0, since: int = 0) -> re.Match[bytes]:
        """Wait until the output (from offset ``since``) matches ``pattern`` (a regex)."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(bytes(self.output), since)
            if found:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {regex.pattern!r} within {timeout:g}s; the terminal shows:\n"
                                     f"{bytes(self.output).decode(errors='replace')}")
            if not self._read(min(remaining, 0.5)) and self.proc.poll() is not None:
                while self._read(0.1):
                    pass
                found = regex.search(bytes(self.output), since)
                if found:
                    return found
                raise AssertionError(f"the command exited ({self.proc.returncode}) before {regex.pattern!r}; "
                                     f"the terminal shows:\n{bytes(self.output).decode(errors='replace')}")

    def resize_and_expect(self, rows: int, cols: int, timeout: float = 60.0) -> None:
        """Resize, then ask the shell for its size until it says the new one: the resize
        travels apart from the keys (the docker CLI posts it on a request of its own after
        SIGWINCH, as kvmc's CLI sends a frame), so a ``stty size`` typed at once may run first."""
        self.resize(rows, cols)
        deadline = time.monotonic() + timeout
        pattern = rb"\b%d %d\r\n" % (rows, cols)
        while True:
            mark = self.mark()
            self.send(b"stty size\r")
            try:
                self.expect(pattern, timeout=min(5.0, max(0.1, deadline - time.monotonic())), since=mark)
                return
            except AssertionError:
                if time.monotonic() >= deadline or self.proc.poll() is not None:
                    raise

    def mark(self) -> int:
        """An offset for ``expect(since=...)``: only output from now on."""
        return len(self.output)

    def wait(self, timeout: float = 60.0) -> int:
        """The command's exit code (reading its last output meanwhile)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout:g}s; the terminal shows:\n"
                                     f"{bytes(self.output).decode(errors='replace')}")
            self._read(0.2)
        while self._read(0.05):
            pass
        return self.proc.returncode

    def text(self) -> str:
        return bytes(self.output).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The CLI's terminal while a TTY process is attached: raw mode and window size.

The CLI's half of ``-t`` (the engine's half is kvmc.runtime.Console): while attached with
stdin, the caller's terminal is in raw mode, so every key (^C, ^D, arrows) goes to the guest's
terminal as a byte and its line discipline does what a local terminal would; the window size
follows the caller's (SIGWINCH here -> RESIZE -> TIOCSWINSZ in the guest -> SIGWINCH there).

Raw mode is restored on every way out of the session: the process's exit, its VM killed, a
failed start (the relay raises), detach keys, and SIGTERM/SIGHUP/SIGQUIT to the CLI (turned
into an exception so the ``finally`` runs; docker does not proxy signals to a TTY either).
Only SIGKILL leaves the terminal raw (``stty sane`` or ``reset`` repairs it).
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys
import termios
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_RESTORE_ON = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class TerminalSignal(SystemExit):
    """A signal that ended the CLI while its terminal was raw: exits 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal on ``fd``, or None if it is not one (or says 0x0)."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def make_raw(attrs: list) -> list:
    """cfmakeraw: no echo, no line editing, no signals from keys, no output processing."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
               | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class HostTerminal:
    """The CLI's stdin/stdout as a kvmc.runtime.Console."""

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd

    def size(self) -> tuple[int, int] | None:
        return window_size(self.stdout_fd) or window_size(self.stdin_fd)

    @contextmanager
    def raw(self) -> Iterator[None]:
        """stdin's terminal in raw mode (if it is one), restored however the block ends."""
        if not is_terminal(self.stdin_fd):
            yield
            return
        saved = termios.tcgetattr(self.stdin_fd)
        previous: dict[int, object] = {}

        def on_signal(signum: int, _frame: object) -> None:
            raise TerminalSignal(signum)

        try:
            if threading.current_thread() is threading.main_thread():
                previous = {sig: signal.signal(sig, on_signal) for sig in _RESTORE_ON}
            termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, make_raw(saved))
            yield
        finally:
            try:
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal is gone (hung up): nothing to restore
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

    @contextmanager
    def session(self, resize: Callable[[int, int], None], raw: bool) -> Iterator[None]:
        """Follow this terminal's size (now and on SIGWINCH) and, with ``raw``, make it raw."""
        def send_size() -> None:
            size = self.size()
            if size:
                resize(*size)

        def on_winch(_signum: int, _frame: object) -> None:
            # Not in the handler itself: it runs in the main thread, which may hold the
            # connection's send lock; a thread waits for it instead.
            threading.Thread(target=send_size, daemon=True).start()

        previous = None
        if is_terminal(self.stdout_fd) and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGWINCH, on_winch)
        try:
            with self.raw() if raw else _nothing():
                send_size()
                yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGWINCH, previous)
            sys.stdout.flush()


@contextmanager
def _nothing() -> Iterator[None]:
    yield

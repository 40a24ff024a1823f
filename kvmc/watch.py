"""Wake wait loops when a container's record changes: one inotify instance per process.

Why: the loops that wait for another process's write to a container's record (docker's
``wait``, which ``docker run --rm`` waits on, a start waiting for its process, a stop waiting
for the exit) polled every 0.05-0.1 s, and lost half of that on average after each change: on
a pooled ``docker run --rm`` of ~0.3 s the wait alone added ~0.05 s. inotify wakes them at the
write. Records are written by a rename into the container's directory (IN_MOVED_TO there) and
removed with the directory (IN_DELETE on the state root: the directory's own IN_DELETE_SELF
comes only once nobody holds it, and a monitor keeps its log in it open until it exits).

Why one instance for the process, read by one thread, and not one per wait: closing an inotify
instance waits for an RCU grace period (~8 ms measured), which would sit on every wait's return.
Why ctypes by hand and not a library: the small wrappers load libc through
``ctypes.util.find_library``, which runs ``ldconfig`` (0.2 s) in every process that waits once,
``kvmc run -d`` included; the running process's own libc is there already (``CDLL(None)``).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

IN_MOVED_TO = 0x80
IN_DELETE = 0x200
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class _Inotify:
    """The process's inotify instance and the thread that reads it: a change counter for each
    container directory someone waits on."""

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._check(self._libc.inotify_init1(IN_CLOEXEC))
        self.cond = threading.Condition()
        self.roots: dict[int, Path] = {}
        """Watched state roots (removals), by watch descriptor."""
        self.dirs: dict[int, Path] = {}
        """Watched container directories (record writes), by watch descriptor."""
        self.changes: dict[Path, int] = {}
        """Per container directory waited on, how many changes were seen."""
        self.users: dict[Path, int] = {}
        threading.Thread(target=self._read, name="kvmc-watch", daemon=True).start()

    @staticmethod
    def _check(rc: int) -> int:
        if rc < 0:
            import ctypes

            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return rc

    def _add(self, path: Path, mask: int) -> int:
        return self._check(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except InterruptedError:
                continue
            except OSError:
                return
            events = []
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = os.fsdecode(data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0"))
                offset += _EVENT.size + length
                events.append((wd, mask, name))
            with self.cond:
                for wd, mask, name in events:
                    if mask & IN_IGNORED:  # the watched directory is gone, and its watch with it
                        self.dirs.pop(wd, None)
                        self.roots.pop(wd, None)
                        continue
                    directory = self.roots[wd] / name if wd in self.roots else self.dirs.get(wd)
                    if directory in self.users:
                        self.changes[directory] += 1
                self.cond.notify_all()

    def register(self, directory: Path) -> int:
        """Count changes of ``directory`` (a container's, under its state root) from now on:
        the count now."""
        with self.cond:
            if directory.parent not in self.roots.values():
                self.roots[self._add(directory.parent, IN_DELETE | IN_ONLYDIR)] = directory.parent
            self.users[directory] = self.users.get(directory, 0) + 1
            self.changes.setdefault(directory, 0)
            if directory not in self.dirs.values():
                try:
                    self.dirs[self._add(directory, IN_MOVED_TO | IN_ONLYDIR)] = directory
                except OSError:  # removed already: the caller's next look finds it so
                    pass
            return self.changes[directory]

    def unregister(self, directory: Path) -> None:
        with self.cond:
            self.users[directory] -= 1
            if self.users[directory]:
                return
            del self.users[directory]
            del self.changes[directory]
            for wd in [wd for wd, d in self.dirs.items() if d == directory]:
                del self.dirs[wd]
                self._libc.inotify_rm_watch(self.fd, wd)  # asynchronous; fails harmlessly if gone

    def wait(self, directory: Path, seen: int, timeout_s: float) -> int:
        """Until the change count of ``directory`` differs from ``seen`` (or the timeout): the
        count now."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.changes.get(directory, 0) == seen and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            return self.changes.get(directory, 0)


_instance: _Inotify | None = None
_instance_pid = 0
_instance_lock = threading.Lock()


def _watcher() -> _Inotify:
    global _instance, _instance_pid
    with _instance_lock:
        if _instance is None or _instance_pid != os.getpid():  # a forked child has no reader thread
            _instance, _instance_pid = _Inotify(), os.getpid()
        return _instance


@contextmanager
def record_changes(directory: Path) -> Iterator[Callable[[float], bool]]:
    """``changed(timeout_s)``: return True once the record in the container directory ``directory``
    has been written, or the directory removed, since the previous call (or since this began:
    no change after the caller's first look is missed), else False after ``timeout_s``. The timeout
    still bounds each sleep, for what writes nothing (a monitor that died)."""
    try:
        watcher = _watcher()
        seen = watcher.register(directory)
    except OSError:  # no state root yet, or no inotify here: sleep as before
        yield lambda timeout_s: time.sleep(timeout_s) or False
        return

    def changed(timeout_s: float) -> bool:
        nonlocal seen
        before, seen = seen, watcher.wait(directory, seen, timeout_s)
        return seen != before

    try:
        yield changed
    finally:
        watcher.unregister(directory)

"""Running out of disk space: one error kind (:class:`kvmc.errors.DiskFull`, unavailable),
said the same way wherever it happens.

ENOSPC (or EDQUOT) can come from any write kvmc or its helpers make, so it is not caught at
each call site but where kvmc's work meets the outside, at three depths:

* the service layer (:func:`disk_full_errors`, on every service class): an OSError with
  ENOSPC, or a tool's, libvirt's or QEMU's failure that says "No space left on device", leaves
  as DiskFull naming the file system and what was being written;
* the per-container monitor (kvmc/monitor.py), which records the same sentence when a start
  fails for want of space;
* a VM that QEMU paused because a disk write found no space (QEMU's default ``werror=enospc``):
  :func:`check_vm_disk` turns a boot that would wait for ever into DiskFull, and the monitor
  resumes the VM once there is space again.

Every step that writes cleans up after itself on any exception (temp files, staging
directories, half-made containers, pool members and volumes), so a DiskFull leaves nothing.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from kvmc.errors import DiskFull, KvmcError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")
"""strerror(ENOSPC) and strerror(EDQUOT): how tools (run with LC_ALL=C), libvirt and QEMU say it."""
HINT = ("free space there (kvmc rm, kvmc rmi, kvmc volume rm, kvmc pool rm, kvmc system prune) "
        "and try again")
RESUME_FREE = 16 << 20
"""A VM paused on a full disk is resumed once its file system has this much free (or 5% of it)."""

T = TypeVar("T")


def is_no_space(exc: BaseException) -> bool:
    """An OSError for a full disk, or one of kvmc's errors whose cause says so."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return True
    return isinstance(exc, KvmcError) and says_no_space(str(exc))


def says_no_space(text: str) -> bool:
    return any(phrase in text for phrase in NO_SPACE_TEXT)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    path = _existing(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """What is left on ``path``'s file system, as df says it (blocks reserved for root and
    ext4's own reserve not counted: QEMU does not run as root)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def disk_full(path: Path | str, cause: str | None = None) -> DiskFull:
    """The DiskFull for a write under ``path``: which file system, how much is free."""
    where = Path(path)
    try:
        fs, free = mount_point(where), _size(free_bytes(where))
        place = f"the file system at {fs} ({free} free)"
    except OSError:
        place = "its file system"
    message = f"the disk is full: no space left for {where} on {place}"
    if cause and cause.strip() not in NO_SPACE_TEXT:
        cause = cause.strip()
        message += f" ({cause if len(cause) <= 300 else cause[:150] + ' ... ' + cause[-140:]})"
    return DiskFull(message, hint=HINT)


def to_disk_full(exc: BaseException, default: Path) -> DiskFull | None:
    """The DiskFull that ``exc`` stands for, or None if it is about something else."""
    if isinstance(exc, DiskFull) or not is_no_space(exc):
        return None
    if isinstance(exc, OSError):
        return disk_full(exc.filename or default, None)
    return disk_full(default, str(exc))


def disk_full_errors(data_dir: Callable[[Any], Path]) -> Callable[[type[T]], type[T]]:
    """Class decorator for a service: every public method's ENOSPC leaves as DiskFull (about
    ``data_dir(self)`` when the error names no file). Generators only read: left alone."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except (OSError, KvmcError) as exc:
                mapped = to_disk_full(exc, data_dir(self))
                if mapped is None:
                    raise
                raise mapped from exc

        return call

    def decorate(cls: type[T]) -> type[T]:
        for name, member in list(vars(cls).items()):
            if name.startswith("_") or not inspect.isfunction(member) or inspect.isgeneratorfunction(member):
                continue
            setattr(cls, name, wrap(member))
        return cls

    return decorate


def tool_error(output: str, *paths: Path) -> DiskFull | None:
    """A failed tool's DiskFull, if its output says the disk is full or a file system it
    writes to has (next to) nothing left; else None."""
    for path in paths:
        try:
            if says_no_space(output) or free_bytes(path) < 1 << 20:
                return disk_full(path, output.strip().splitlines()[-1] if output.strip() else None)
        except OSError:
            continue
    return None


TOOL_ENV = {"LC_ALL": "C"}
"""Tools speak English, so that "No space left on device" can be recognised."""


def resume_threshold(path: Path) -> int:
    """Free bytes wanted on ``path``'s file system before a VM paused on it is resumed."""
    st = os.statvfs(_existing(path))
    return min(RESUME_FREE, st.f_blocks * st.f_frsize // 20)


def check_vm_disk(hv: Any, domain: str, where: Path) -> None:
    """Raise DiskFull if QEMU paused ``domain`` on a disk write that found no space (a boot
    waiting for the guest would otherwise wait until its timeout)."""
    if hv.state_reason(domain) == ("paused", "ioerror"):
        raise disk_full(where, f"QEMU paused VM {domain}: a write to its disk found no space")

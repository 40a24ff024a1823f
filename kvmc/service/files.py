"""Copying files in and out of a container (``docker cp``), as tar streams.

Why through the guest: a container's root filesystem is an ext4 image under a qcow2 overlay
that only its VM may write while it runs, and parsing guest-written ext4 on the host as root
is what kvmc refuses to do. So a copy runs the image's own ``tar`` and ``stat`` in the VM
(busybox, Debian and Alpine images have them): as an exec in a running container, or, for a
created or stopped one (gitlab-ci-local copies its scripts into created containers, volumes
included), in the container's own VM booted for that one process (VMLife.run_offline), under
the container's lock so no start races it. That costs a VM boot per call (~1.5 s under TCG).
"""

from __future__ import annotations

import posixpath
import stat as stat_mod
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from kvmc.space import disk_full_errors
from kvmc.agent import GuestOutput, guest_text
from kvmc.errors import Conflict, GuestError, NotFound, UsageError
from kvmc.process import ProcessOptions

if TYPE_CHECKING:
    from kvmc.service.containers import ContainerService

_STAT_FORMAT = "%s|%f|%Y|%N"
"""size | raw mode (hex) | mtime | quoted name, with '-> target' for a symlink (busybox and GNU stat)."""


@dataclass
class PathStat:
    """What docker's ``X-Docker-Container-Path-Stat`` header carries."""

    name: str
    size: int
    mode: int
    """st_mode as the guest's stat gives it (kvmc/api turns it into Go's os.FileMode)."""
    mtime: int
    link_target: str = ""

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)


@disk_full_errors(lambda self: self.containers.engine.config.data_dir)
class FileService:
    """stat, copy out and copy in, through execs in the running VM."""

    def __init__(self, containers: ContainerService) -> None:
        self.containers = containers

    def _exec(self, ref: str, args: list[str], stdin: BinaryIO | None, stdout: BinaryIO) -> tuple[int, str]:
        """Run ``args`` as root in the container: an exec if it runs, else in its VM booted for it;
        (exit code, its stderr: the guest's words, escaped and cut short)."""
        err = GuestOutput(4096)
        record = self.containers.get(ref)
        if not record.is_live:
            engine = self.containers.engine
            with engine.state.locked(record.id):
                current = engine.observe(engine.state.load(record.id) or record)
                if not current.is_live:
                    engine.wait_powered_off(current)  # an exited guest may still be powering off
                    code = engine.life.run_offline(current, args, stdin, stdout, err)  # type: ignore[arg-type]
                    return code, guest_text(err.getvalue().strip(), 500)
        code = self.containers.exec(record.id, ProcessOptions(command=args, interactive=stdin is not None, user="0"),
                                    stdin, stdout, err)  # type: ignore[arg-type]
        return code, guest_text(err.getvalue().strip(), 500)

    def stat(self, ref: str, path: str) -> PathStat:
        """The path's stat inside the container (NotFound when it does not exist)."""
        record = self.containers.get(ref)
        out = GuestOutput(64 * 1024)
        code, err = self._exec(record.id, ["stat", "-c", _STAT_FORMAT, "--", path], None, out)  # type: ignore[arg-type]
        if code != 0:
            if code == 127 or "not found" in err and "No such file" not in err:
                raise UsageError(f"cannot stat {path} in {record.name}: the image has no stat command (its "
                                 f"stderr: {err})")
            raise NotFound(f"Could not find the file {path} in container {record.name}")
        text = out.getvalue().decode(errors="replace").strip()
        try:  # the guest's stat wrote this: anything may be in it
            size, mode, mtime, name = text.split("|", 3)
            target = ""
            if " -> " in name:
                name, target = name.split(" -> ", 1)
            return PathStat(posixpath.basename(path.rstrip("/")) or "/", int(size), int(mode, 16), int(mtime),
                            target.strip("'\"`’‘"))
        except ValueError:
            raise GuestError(f"the stat command of container {record.name} printed what kvmc cannot read: "
                             f"{guest_text(text.encode(), 200)!r}") from None

    def copy_out(self, ref: str, path: str, out: BinaryIO) -> PathStat:
        """Write a tar of ``path`` (named by its base name, as docker does) to ``out``."""
        found = self.stat(ref, path)
        parent, base = posixpath.split(path.rstrip("/") or "/")
        args = ["tar", "-C", parent or "/", "-cf", "-", base] if base else ["tar", "-C", "/", "-cf", "-", "."]
        code, err = self._exec(ref, args, None, out)
        if code != 0:
            raise Conflict(f"cannot copy {path} out of the container: tar exited {code} (its stderr: {err})")
        return found

    def copy_in(self, ref: str, directory: str, tar: BinaryIO) -> None:
        """Extract the tar stream ``tar`` into ``directory`` (which must exist): one ``tar -x``,
        so a stopped container pays one VM boot, not two."""
        code, err = self._exec(ref, ["tar", "-C", directory, "-xf", "-"], tar, GuestOutput(0))  # type: ignore[arg-type]
        if code != 0:
            if "No such file" in err or "can't change directory" in err or "Cannot change" in err:
                raise NotFound(f"Could not find the file {directory} in container {ref}")
            if "Not a directory" in err:
                raise UsageError(f"extraction point is not a directory: {directory}")
            raise Conflict(f"cannot copy into {directory}: tar exited {code} (its stderr: {err})")

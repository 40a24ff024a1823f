"""What a container mounts: ``-v``, ``--tmpfs`` and ``--read-only``, parsed and turned into
the devices of its VM and the agent's ``mount=`` items.

Three kinds, each the cheapest way a VM can have it:

- ``volume``: a named volume (kvmc/volumes.py), an ext4 disk image attached as one more
  virtio-blk disk and mounted by the agent. Block I/O is the fast path under emulation.
- ``volume`` of driver kvmc-dir: a host directory too (``shared_dir``), shared as a bind is.
- ``bind``: a host directory shared through virtiofs (libvirt starts ``virtiofsd``). It needs
  the guest's RAM to be shared memory and non-legacy virtio-mmio, and QEMU cannot save a VM
  with a vhost-user device: such containers always boot cold.
- ``tmpfs``: guest RAM, mounted by the agent; nothing on the host.

The agent finds a volume's disk by its virtio serial (``@volN``), not by its /dev/vdX name:
the kernel's enumeration order of virtio-mmio devices is not the order of the domain XML.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmc.errors import UsageError

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# docker's defaults for --tmpfs; size is a share of guest RAM (the kernel's default: half).
TMPFS_DEFAULT_OPTIONS = "nosuid,nodev,noexec"


@dataclass(frozen=True)
class Mount:
    """One mount of a container: ``kind`` is volume | bind | tmpfs."""

    kind: str
    target: str
    source: str = ""
    """The volume name, the host directory, or empty for tmpfs."""
    readonly: bool = False
    options: str = ""
    """tmpfs options (size=64m,mode=1777,...), docker's syntax."""
    shared_dir: str = ""
    """For a kvmc-dir volume: its host directory, shared by virtiofs like a bind (the mount
    stays a ``volume``: it is counted as the volume's user, and removed with it)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_disk(self) -> bool:
        """A volume disk: one more virtio-blk device."""
        return self.kind == "volume" and not self.shared_dir

    @property
    def share_source(self) -> str:
        """The host directory virtiofs shares for this mount (empty when it is no share)."""
        return self.source if self.kind == "bind" else self.shared_dir

    @property
    def needs_cold_boot(self) -> bool:
        """Volumes and host directories are extra devices: a pooled VM was saved without them."""
        return self.kind in ("volume", "bind")


def _target(path: str, spec: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f'invalid mount "{spec}": the container path "{path}" must be absolute')
    normal = "/" + "/".join(p for p in path.split("/") if p and p != ".")
    if normal == "/" or ".." in normal.split("/"):
        raise UsageError(f'invalid mount "{spec}": cannot mount over "{path}"')
    return normal


def parse_volume(spec: str) -> Mount:
    """docker's ``-v NAME:/path[:ro|rw]`` (named volume) or ``-v /host/dir:/path[:ro|rw]``."""
    parts = spec.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts.pop()
        if mode not in ("ro", "rw"):
            raise UsageError(f'invalid mount "{spec}": mode must be ro or rw, not "{mode}"')
    if len(parts) == 1:
        raise UsageError(f'invalid mount "{spec}": kvmc has no anonymous volumes; '
                         "give a name (-v NAME:/path) or a host directory (-v /dir:/path)")
    if len(parts) != 2 or not parts[0]:
        raise UsageError(f'invalid mount "{spec}": expected NAME:/path or /host/dir:/path, then :ro or :rw')
    source, target = parts
    target = _target(target, spec)
    if source.startswith("/"):
        host = Path(source)
        if not host.is_dir():
            raise UsageError(f'invalid mount "{spec}": host directory {source} does not exist'
                             if not host.exists() else
                             f'invalid mount "{spec}": {source} is not a directory (virtiofs shares directories)')
        return Mount(kind="bind", source=str(host.resolve()), target=target, readonly=mode == "ro")
    if not VOLUME_NAME.match(source):
        raise UsageError(f'invalid volume name "{source}": use letters, digits and _.- '
                         "(a host directory must be an absolute path)")
    return Mount(kind="volume", source=source, target=target, readonly=mode == "ro")


def parse_tmpfs(spec: str) -> Mount:
    """docker's ``--tmpfs /path[:opt,opt]``."""
    target, _, options = spec.partition(":")
    target = _target(target, spec)
    if any(c in options for c in ": "):
        raise UsageError(f'invalid --tmpfs "{spec}": options are comma-separated, e.g. size=64m,mode=1777')
    return Mount(kind="tmpfs", target=target, options=options)


def check_targets(mounts: list[Mount]) -> None:
    seen = set()
    for mount in mounts:
        if mount.target in seen:
            raise UsageError(f"duplicate mount point: {mount.target}")
        seen.add(mount.target)


def volume_serial(index: int) -> str:
    """The virtio-blk serial of a container's ``index``-th volume disk (at most 20 bytes)."""
    return f"vol{index}"


def share_tag(index: int) -> str:
    """The virtiofs tag of a container's ``index``-th host directory."""
    return f"share{index}"


def agent_mount_items(mounts: list[Mount]) -> list[str]:
    """The agent's ``mount=FSTYPE:SOURCE:OPTIONS:TARGET`` items, in the order given.

    Volume and share numbering follows the order of the mounts of each kind, the same order
    :func:`kvmc.domain.container_vm` attaches their devices in.
    """
    items = []
    volumes = shares = 0
    for mount in mounts:
        ro = "ro" if mount.readonly else "rw"
        if mount.is_disk:
            volumes += 1
            items.append(f"ext4:@{volume_serial(volumes)}:{ro},noatime:{mount.target}")
        elif mount.share_source:
            shares += 1
            items.append(f"virtiofs:{share_tag(shares)}:{ro}:{mount.target}")
        else:
            options = ",".join(o for o in (TMPFS_DEFAULT_OPTIONS, mount.options) if o)
            items.append(f"tmpfs:tmpfs:{options}:{mount.target}")
    return items

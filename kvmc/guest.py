"""Where the guest kernel, initramfs and agent built by ``images/build.sh`` are, and their digests.

The digests matter beyond bookkeeping: they key the accel probe cache (and, later, pool
members), so a rebuilt guest is never mistaken for the one a cached fact was measured on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvmc.errors import GuestError

BUILD_HINT = 'build it with "make guest" (images/build.sh DIR)'


VM_SHAPE = "s3"
"""Bumped whenever kvmc/domain.py or templates/domain.xml.j2 change a VM's CPU or devices in a way
a saved VM cannot be restored (or a template cloned) across: libvirt refuses a restore whose CPU
or devices differ, so pool members and templates of the old shape must turn stale (s2: qemu64
with ARAT under TCG, a virtio-serial controller with 2 ports; s3: kvmc's kernel boots
without ACPI, its virtio-mmio devices on the command line)."""


@dataclass(frozen=True)
class GuestArtefacts:
    """The kernel and initramfs every kvmc VM boots, as recorded in guest.json."""

    kernel: Path
    initramfs: Path
    kernel_sha256: str
    initramfs_sha256: str
    agent_sha256: str
    kernel_release: str
    # "debian" or "kvmc" (images/build.sh --kernel); guest.json from before the key: debian.
    flavour: str = "debian"
    # Whether VMs booting this kernel get ACPI (VMSpec.acpi); see docs/platform.md.
    acpi: bool = True
    # Words this kernel wants on its command line (guest.json "cmdline", written by
    # images/build.sh), e.g. kvmc's kernel is told the local APIC timer's rate.
    cmdline: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """One short digest for the whole guest, for cache keys (pool members and templates,
        the accel probe's verdict), including the VM shape the guest runs in."""
        return f"{self.kernel_sha256[:16]}-{self.initramfs_sha256[:16]}-{VM_SHAPE}"


def load_guest(directory: Path) -> GuestArtefacts:
    """Read ``directory/guest.json``; a missing or partial build is a one-sentence error."""
    manifest = directory / "guest.json"
    if not manifest.is_file():
        raise GuestError(f"no guest kernel built yet in {directory}", hint=BUILD_HINT)
    try:
        meta = json.loads(manifest.read_text())
        guest = GuestArtefacts(
            kernel=directory / meta["kernel"],
            initramfs=directory / meta["initramfs"],
            kernel_sha256=meta["kernel_sha256"],
            initramfs_sha256=meta["initramfs_sha256"],
            agent_sha256=meta["agent_sha256"],
            kernel_release=meta.get("kernel_release", "unknown"),
            flavour=meta.get("kernel_flavour", "debian"),
            acpi=bool(meta.get("acpi", True)),
            cmdline=tuple(str(word) for word in meta.get("cmdline", [])),
        )
    except (ValueError, KeyError) as exc:
        raise GuestError(f"{manifest} is unreadable ({exc})", hint=BUILD_HINT) from exc
    for path in (guest.kernel, guest.initramfs):
        if not path.is_file():
            raise GuestError(f"guest artefact {path} is missing", hint=BUILD_HINT)
    return guest

"""The host as a whole: what kvmc runs on, what it uses, and clean-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmc.space import disk_full_errors

if TYPE_CHECKING:
    from kvmc.runtime import Runtime


@dataclass
class HostInfo:
    """``kvmc info`` / docker's ``/info`` and ``/version``: the facts behind them."""

    data_dir: str
    libvirt_uri: str
    guest_kernel: str
    kernel_release: str
    accel: str
    accel_reason: str


@disk_full_errors(lambda self: self.engine.config.data_dir)
class SystemService:
    """System-wide operations for both front doors."""

    def __init__(self, engine: Runtime) -> None:
        self.engine = engine

    def info(self) -> HostInfo:
        host = self.engine.host
        guest = host.guest()
        choice = host.accel()
        return HostInfo(str(host.config.data_dir), host.config.libvirt_uri, str(guest.kernel),
                        guest.kernel_release, choice.accel, choice.reason)

    def disk_usage(self) -> dict:
        return self.engine.disk_usage()

    def prune(self, all_images: bool) -> tuple[list[str], list[str]]:
        """Stopped containers (names) and, with ``all_images``, every unused image (short ids)."""
        from kvmc.service.images import ImageService

        removed = [r.name for r in self.engine.prune_containers()]
        deleted = [i[:12] for i in ImageService(self.engine).prune()] if all_images else []
        return removed, deleted

    def gc(self, force: bool) -> list[str]:
        """Orphan VMs and half-created containers, then network leftovers (taps, namespaces,
        DNS servers) of VMs that no longer run, and sockets of monitor fork servers that died."""
        from kvmc import forkserver
        from kvmc.service.networks import NetworkService

        found = self.engine.gc(force)
        return found + NetworkService(self.engine).leftovers(force) + forkserver.sweep_stale(force)

    def boot(self) -> list:  # noqa: ANN201 - list[ItemReport[ContainerRecord]]
        """Start the containers whose restart policy wants them running (after a host or libvirtd
        restart): what ``kvmc serve`` does as it starts, and ``kvmc system boot`` without it."""
        from kvmc.service.reports import ItemReport

        return [ItemReport(record.name, result=record if error is None else None, error=error)
                for record, error in self.engine.start_by_policy()]

"""The only module that imports libvirt: define, start, watch, destroy and remove domains.

Everything above it speaks in domain names and XML strings, so it can be unit-tested
without libvirt. libvirt's own error reporting (which prints to stderr by default) is
silenced here and turned into :class:`HypervisorError` with a sentence the user can act on.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from kvmc.errors import HypervisorError

try:
    import libvirt
    import libvirt_qemu
except ImportError:  # pragma: no cover - depends on the host
    libvirt = libvirt_qemu = None

T = TypeVar("T")
START_HINT = 'start it with "libvirtd -d && virtlogd -d" as root, or run "make setup"'
LIBVIRT_QEMU_RUN_DIR = Path("/run/libvirt/qemu")
"""Where libvirt's system QEMU driver writes each running domain's pid file."""

_STATES = {
    0: "nostate", 1: "running", 2: "blocked", 3: "paused",
    4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended",
}


_PAUSED_REASONS = {
    0: "unknown", 1: "user", 2: "migration", 3: "save", 4: "dump", 5: "ioerror", 6: "watchdog",
    7: "from_snapshot", 8: "shutting_down", 9: "snapshot", 10: "crashed", 11: "starting_up",
    12: "postcopy", 13: "postcopy_failed", 14: "api_error",
}
"""libvirt's virDomainPausedReason."""


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt error handler that prints nothing: errors reach the user as exceptions."""


class Hypervisor:
    """A lazily opened libvirt connection with the few operations kvmc needs."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Open the connection now rather than at the first call (HostContext.connect_hv)."""
        _ = self.conn

    @property
    def conn(self) -> Any:
        """The connection, reopened if libvirtd restarted since it was opened."""
        with self._lock:  # opened in one thread while another may need it (HostContext.connect_hv)
            return self._open()

    def _open(self) -> Any:
        if self._conn is not None:
            try:
                alive = self._conn.isAlive()
            except libvirt.libvirtError:
                alive = False
            if not alive:
                self._conn = None
        if self._conn is None:
            if libvirt is None:
                raise HypervisorError(
                    "the libvirt Python binding is not installed",
                    hint='install it with "make setup" (pip install libvirt-python)',
                )
            libvirt.registerErrorHandler(_quiet, None)
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorError(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}", hint=START_HINT
                ) from exc
        return self._conn

    @staticmethod
    def _is_transport_error(exc: Any) -> bool:
        """A dead connection (libvirtd restarted): isAlive() only notices after a call fails."""
        return exc.get_error_domain() == libvirt.VIR_FROM_RPC or exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR

    def _call(self, op: Callable[[Any], T]) -> T:
        """Run ``op(connection)``; if libvirtd restarted under us, reconnect and run it once more.

        Every connection-level call goes through here (domain objects come from ``_lookup``,
        so they are fresh). libvirt errors other than a dead transport propagate unchanged.
        """
        try:
            return op(self.conn)
        except libvirt.libvirtError as exc:
            if not self._is_transport_error(exc):
                raise
            self._conn = None
            return op(self.conn)

    def _lookup(self, name: str) -> Any | None:
        try:
            return self._call(lambda conn: conn.lookupByName(name))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from exc

    def define(self, xml: str) -> None:
        """Define a persistent domain (it stays listed, shut off, after its guest powers off)."""
        try:
            self._call(lambda conn: conn.defineXML(xml))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt refused the domain: {exc.get_error_message()}") from exc

    def _on_domain(self, name: str, what: str, action: Callable[[Any], Any]) -> Any:
        """Run ``action`` on domain ``name``; a libvirt error becomes "cannot WHAT VM NAME: why"."""
        dom = self._require(name)
        try:
            return action(dom)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot {what} VM {name}: {exc.get_error_message()}") from exc

    def start(self, name: str) -> None:
        self._on_domain(name, "start", lambda dom: dom.create())

    def save(self, name: str, path: Path) -> None:
        """Save a running VM's memory and device state to ``path``; the domain is then shut off."""
        self._on_domain(name, "save", lambda dom: dom.save(str(path)))

    def restore(self, path: Path, xml: str, paused: bool = False) -> None:
        """Resume a saved VM; ``xml`` may change host-side paths, not the name or UUID. With
        ``paused`` its memory and devices are loaded but its vCPUs wait for :meth:`resume`."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        try:
            self._call(lambda conn: conn.restoreFlags(str(path), xml, flags))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot restore VM from {path}: {exc.get_error_message()}") from exc

    def human_monitor_command(self, name: str, command: str) -> str:
        """Run an HMP command in the VM's QEMU (libvirt's QEMU passthrough) and return its output.

        Only for what libvirt has no API for: slirp host forwards (``hostfwd_add``) on a running
        VM. libvirt marks the domain "tainted" for it, which is true and harmless here.
        """
        dom = self._require(name)
        try:
            return libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"QEMU of VM {name} refused '{command}': {exc.get_error_message()}") from exc

    def create_transient(self, xml: str, paused: bool = False) -> None:
        """Start a domain from ``xml`` (the accel probe, a pool template, a template's clone).

        A transient domain is forgotten as soon as it stops. If a persistent domain of the same
        name and UUID is defined and shut off, libvirt starts *it* with ``xml`` as its live
        definition only: its persistent definition stays as it was, for the next start. With
        ``paused`` the vCPUs do not run until :meth:`resume` (VIR_DOMAIN_START_PAUSED).
        """
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        try:
            self._call(lambda conn: conn.createXML(xml, flags))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot start VM: {exc.get_error_message()}") from exc

    def resume(self, name: str) -> None:
        """Let a paused VM's vCPUs run (libvirt's own ``cont``, so its view of the state stays right)."""
        self._on_domain(name, "resume", lambda dom: dom.resume())

    def pause(self, name: str) -> None:
        """Stop a running VM's vCPUs (a few ms; its memory and devices stay as they are)."""
        self._on_domain(name, "pause", lambda dom: dom.suspend())

    def forget(self, name: str) -> None:
        """Undefine without stopping: a running domain becomes transient, and libvirt drops it
        by itself once it stops; a shut-off one is gone at once. A missing domain is no error."""
        dom = self._lookup(name)
        if dom is None:
            return
        try:
            dom.undefine()
        except libvirt.libvirtError as exc:
            if self._lookup(name) is not None and dom.isPersistent():
                raise HypervisorError(f"cannot undefine VM {name}: {exc.get_error_message()}") from exc

    def qmp(self, name: str, command: dict[str, Any], fds: tuple[int, ...] = ()) -> Any:
        """Run a QMP command in the VM's QEMU through libvirt (passthrough) and return its
        ``return`` value; ``fds`` are passed along (SCM_RIGHTS) for ``getfd``/``add-fd``.

        Only for what libvirt has no API for: VM templating's migration with the
        x-ignore-shared capability (kvmc/pool/), a microvm's block statistics. libvirt marks the domain tainted
        ("custom-monitor"), which is true and harmless here.
        """
        dom = self._require(name)
        text = json.dumps(command)
        try:
            if fds:
                out, _files = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, list(fds), 0)
            else:
                out = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"QEMU of VM {name} refused {command['execute']}: "
                                  f"{exc.get_error_message()}") from exc
        reply = json.loads(out)
        if "error" in reply:
            raise HypervisorError(f"QEMU of VM {name} refused {command['execute']}: "
                                  f"{reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def qmp_with_fd(self, name: str, command: dict[str, Any], fd: int) -> Any:
        """:meth:`qmp` passing one file descriptor along with the command."""
        return self.qmp(name, command, (fd,))

    def _require(self, name: str) -> Any:
        dom = self._lookup(name)
        if dom is None:
            raise HypervisorError(f"libvirt has no domain {name}")
        return dom

    def state(self, name: str) -> str | None:
        """'running', 'shutoff', 'paused', 'crashed', ..., or None when no such domain exists."""
        dom = self._lookup(name)
        if dom is None:
            return None
        try:
            code, _reason = dom.state()
        except libvirt.libvirtError:
            return None  # vanished between lookup and state (transient domain ended)
        return _STATES.get(code, "nostate")

    def state_reason(self, name: str) -> tuple[str | None, str | None]:
        """(state, why) where libvirt knows why: a paused VM's reason is ``user`` (suspend),
        ``ioerror`` (QEMU stopped it on a disk write that found no space: werror=enospc),
        ``save``, ``migration``, ...; (None, None) when no such domain exists."""
        dom = self._lookup(name)
        if dom is None:
            return None, None
        try:
            code, reason = dom.state()
        except libvirt.libvirtError:
            return None, None
        state = _STATES.get(code, "nostate")
        return state, _PAUSED_REASONS.get(reason, "unknown") if state == "paused" else None

    def wait_stopped(self, name: str, timeout: float, poll: float = 0.05) -> bool:
        """Wait until the domain is shut off (or gone); True if it did within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(name) in (None, "shutoff", "crashed"):
                return True
            time.sleep(poll)
        return False

    def destroy(self, name: str) -> None:
        """Power the VM off at once; a domain that is not running is left as it is."""
        dom = self._lookup(name)
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if self.state(name) not in (None, "shutoff"):
                raise HypervisorError(f"cannot destroy VM {name}: {exc.get_error_message()}") from exc

    def undefine(self, name: str) -> None:
        """Forget a domain (destroying it first if it runs); a missing domain is no error."""
        self.destroy(name)
        self.forget(name)

    def stats(self, name: str) -> dict[str, int]:
        """A running VM's resource use: ``cpu_ns`` (all vCPUs' time), ``memory_kib`` (the guest's
        size), ``rss_kib`` (QEMU's resident memory, 0 when libvirt cannot tell), ``vcpus``, and
        ``block_read_bytes``/``block_write_bytes``: what the guest read from and wrote to its
        disks (QEMU's block statistics of every disk, 0 when QEMU cannot tell)."""
        dom = self._require(name)
        try:
            _state, _max_kib, memory_kib, vcpus, cpu_ns = dom.info()
            try:
                rss = int(dom.memoryStats().get("rss", 0))
            except libvirt.libvirtError:
                rss = 0
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot read the statistics of VM {name}: {exc.get_error_message()}") from exc
        read, written = self._block_bytes(name)
        return {"cpu_ns": int(cpu_ns), "memory_kib": int(memory_kib), "rss_kib": rss, "vcpus": int(vcpus),
                "block_read_bytes": read, "block_write_bytes": written}

    def _block_bytes(self, name: str) -> tuple[int, int]:
        """Bytes the guest read from and wrote to its disks, summed over the devices QEMU's
        ``query-blockstats`` lists (their front-end counters); (0, 0) if QEMU cannot tell.

        Through QMP because libvirt 9.0 has no block statistics for a microvm's disks: they sit
        on virtio-mmio, and both virDomainBlockStats and the bulk stats look the device up by a
        PCI-style qdev path ("cannot find statistics for device .../virtio-backend")."""
        try:
            devices = self.qmp(name, {"execute": "query-blockstats"}) or []
        except HypervisorError:
            return 0, 0
        counters = [device.get("stats", {}) for device in devices]
        return (sum(int(c.get("rd_bytes", 0)) for c in counters),
                sum(int(c.get("wr_bytes", 0)) for c in counters))

    def pss_kib(self, name: str) -> int | None:
        """The proportional set size of a running VM's QEMU process: its private pages plus its
        share of pages mapped by others too (a template clone's share of the template's RAM
        file), which is what it really costs; None if it is not running here.

        From /proc, by the pid file libvirt's QEMU driver writes: libvirt's API reports RSS,
        which counts a shared page in full in every process that maps it."""
        try:
            pid = (LIBVIRT_QEMU_RUN_DIR / f"{name}.pid").read_text().strip()
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def metadata(self, name: str, namespace: str) -> str | None:
        """The XML of the domain's ``<metadata>`` element in ``namespace``, or None."""
        dom = self._lookup(name)
        if dom is None:
            return None
        try:
            return dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0)
        except libvirt.libvirtError:
            return None

    def domain_names(self, prefix: str) -> list[str]:
        """Names of all domains, running or defined, that start with ``prefix``."""
        try:
            domains = self._call(lambda conn: conn.listAllDomains(0))
            return sorted(d.name() for d in domains if d.name().startswith(prefix))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from exc

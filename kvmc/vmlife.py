"""The VM-side steps of a container's life: boot it, publish its ports, and take it apart.

Why apart from the engine (kvmc/runtime.py): these steps run inside the per-container monitor
(kvmc/monitor.py), which must not import the engine that spawns it. The monitor reports how
the container ended and calls :meth:`VMLife.discard` or :meth:`VMLife.reap` as its finish
policy says; the engine calls :meth:`discard` on its own failure paths (rollback, rm). Both
reach only the leaves in :class:`kvmc.context.HostContext`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO

from kvmc.agent import (
    FIRST_WORD_S,
    MAIN_PROCESS_ID,
    AgentConnection,
    AgentTable,
    ProcessSpec,
    attach_process,
    guest_text,
    labelled,
)
from kvmc.context import HostContext
from kvmc.disks import create_overlay
from kvmc.domain import DOMAIN_PREFIX, ro_volume_overlay
from kvmc.errors import DiskFull, GuestError, KvmcError, PortInUse
from kvmc.mounts import agent_mount_items
from kvmc.net.host import NetnsHost, create_tap
from kvmc.net.plan import DnsEntry, Endpoint, defined_mac, dns_names, guest_ifname, mac_for, pick_address
from kvmc.network import DNS_SERVER, GATEWAY, guest_net_config
from kvmc.options import hosts_lines, signal_number
from kvmc.space import check_vm_disk
from kvmc.state import LIVE_STATES, ContainerRecord, State

CLONE_XML = "clone.xml"
"""A template clone's first-start definition (the persistent one, domain.xml, boots cold)."""
CONSOLE_LOG = "console.log"
CONSOLE_READ = 64 * 1024
GUEST_OUTPUT_LABEL = "the guest's own console output (written by the guest, not checked by kvmc)"


def pid_alive(pid: int | None) -> bool:
    """A process with this pid runs and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def is_monitor(pid: int | None) -> bool:
    """A live kvmc process (monitors are forked from kvmc, so their command line is kvmc's),
    not whatever reused the pid of one that died."""
    if not pid_alive(pid):
        return False
    try:
        return b"kvmc" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


SHM_OPTIONS = "nosuid,nodev,noexec,mode=1777"
"""docker's /dev/shm mount options (its size is --shm-size)."""


def process_limits(record: ContainerRecord, privileged: bool = False) -> dict:
    """The RUN items every process of the container gets (its execs and health probes too):
    docker's --ulimit, and the capabilities --cap-drop takes away (none for a privileged exec)."""
    options = record.options
    return {"ulimits": [u.agent_item for u in options.ulimits],
            "cap_drop": [] if privileged else options.dropped_caps}


def container_setup(record: ContainerRecord, nameservers: list[str]) -> dict:
    """Process 1's RUN items beyond the process (ProcessSpec keyword arguments): mounts (with
    --shm-size's /dev/shm), the read-only root, DNS (--dns, else ``nameservers``: the networks'
    and slirp's), --dns-search, --dns-option, /etc/hosts lines (--add-host), the stop signal,
    and the process limits."""
    options = record.options
    mounts = agent_mount_items(record.mounts)
    if options.shm_size and not any(m.target == "/dev/shm" for m in record.mounts):
        mounts.append(f"tmpfs:shm:{SHM_OPTIONS},size={options.shm_size}:/dev/shm")
    return {
        "mounts": mounts, "readonly_root": record.read_only,
        "dns": list(options.dns) or list(nameservers),
        "dns_search": list(options.dns_search), "dns_options": list(options.dns_options),
        "hosts": hosts_lines(options.extra_hosts, GATEWAY),
        "stop_signal": signal_number(record.stop_signal) if record.stop_signal else None,
        **process_limits(record),
    }


class VMLife:
    """Boot, publish, discard and reap one container's VM."""

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self.netns = NetnsHost(host.config.run_dir, str(host.config.data_dir))

    # ---------------------------------------------------------------- remove
    def discard(self, record: ContainerRecord, stop_vm: bool = True) -> None:
        """Remove everything a container owns: domain, directory (disk, logs), sockets, name,
        its taps and its names in its networks' DNS (and a network's namespace if it was the
        last running container there).

        ``stop_vm`` False (the monitor of a --rm container, see Monitor._finish): a VM still
        running is only undefined, and libvirt drops it when the monitor destroys it.
        """
        try:
            if stop_vm:
                self.host.hv.undefine(record.domain)
            else:
                self.reaping_marker(record.domain).write_text(str(os.getpid()))
                self.host.hv.forget(record.domain)
        finally:
            try:
                self.leave_networks(record, update_record=False)
            finally:
                self.host.state.remove(record)

    # ------------------------------------------------------------- networks
    def _running_on(self, network_id: str, exclude: str) -> list[tuple[ContainerRecord, Endpoint]]:
        """Running containers on a network that have an address there (their monitors live)."""
        found = []
        for other in self.host.state.list():
            if other.id == exclude or other.state not in LIVE_STATES or not pid_alive(other.monitor_pid):
                continue
            for endpoint in other.networks:
                if endpoint.network_id == network_id and endpoint.address:
                    found.append((other, endpoint))
        return found

    def _dns_entries(self, running: list[tuple[ContainerRecord, Endpoint]]) -> list[DnsEntry]:
        return [DnsEntry(ep.address, dns_names(rec.name, rec.id, ep.aliases)) for rec, ep in running]

    def create_taps(self, record: ContainerRecord) -> None:
        """The container's taps, before its VM starts (QEMU opens them; they stay down here)."""
        for endpoint in record.networks:
            create_tap(endpoint.tap, str(self.host.config.data_dir))

    def join_networks(self, record: ContainerRecord) -> list[str]:
        """Put a started VM's NICs on its networks: each network's namespace up (the first
        container there brings it up), an address from the network's subnet, the tap moved
        into the namespace onto the bridge, the DNS server's names updated. Returns the
        agent's ``netif`` items."""
        items = []
        endpoints = list(record.networks)
        for index, endpoint in enumerate(endpoints):
            network = self.host.networks.find(endpoint.network_id)
            if network is None:
                raise KvmcError(f"network {endpoint.network} no longer exists: "
                                f"disconnect container {record.name} from it (kvmc network disconnect)")
            network = self.host.networks.with_subnet(network)
            with self.netns.locked(network.id):
                self.netns.up(network)
                running = self._running_on(network.id, exclude=record.id)
                address = pick_address(network.subnet, network.gateway, [ep.address for _, ep in running])
                endpoints[index] = Endpoint(
                    network_id=network.id, network=network.name, aliases=list(endpoint.aliases), address=address,
                    prefix=network.prefix, gateway=network.gateway, mac=mac_for(address), tap=endpoint.tap)
                self.host.state.update(record, networks=list(endpoints))
                self.netns.plug(network, endpoint.tap)
                self.netns.set_entries(network.id, self._dns_entries([*running, (record, endpoints[index])]))
            items.append(f"{defined_mac(index)},{guest_ifname(index)},{endpoints[index].mac},"
                         f"{address}/{network.prefix}")
        if record.networks:
            self.host.say("joined " + ", ".join(f"{ep.network} as {ep.address}" for ep in endpoints))
        return items

    def leave_networks(self, record: ContainerRecord, update_record: bool = True) -> None:
        """Take an ended (or removed) container off its networks: delete its taps, drop its
        names from the networks' DNS, and take down a network's namespace and DNS server when
        no running container is left on it. Idempotent; called by whoever saw the VM end."""
        for endpoint in record.networks:
            with self.netns.locked(endpoint.network_id):
                if endpoint.tap:
                    self.netns.delete_tap(endpoint.tap, endpoint.network_id)
                running = self._running_on(endpoint.network_id, exclude=record.id)
                if running:
                    self.netns.set_entries(endpoint.network_id, self._dns_entries(running))
                else:
                    self.netns.down(endpoint.network_id)
        if update_record and any(ep.address for ep in record.networks):
            cleared = [Endpoint(network_id=ep.network_id, network=ep.network, aliases=list(ep.aliases), tap=ep.tap)
                       for ep in record.networks]
            try:
                self.host.state.update(record, networks=cleared)
            except OSError:
                pass  # removed meanwhile

    def reaping_marker(self, domain: str) -> Path:
        """Names the process that destroys an undefined domain left running by
        ``discard(stop_vm=False)``: while it lives, the domain is no orphan (see gc)."""
        return self.host.config.run_dir / f"{domain.removeprefix(DOMAIN_PREFIX)}.reaping"

    def reap(self, domain: str) -> None:
        """Destroy a domain left running by ``discard(stop_vm=False)`` (undefined: libvirt then
        drops it) and remove its marker."""
        try:
            self.host.hv.destroy(domain)
        finally:
            self.reaping_marker(domain).unlink(missing_ok=True)

    def being_reaped(self, domain: str) -> bool:
        try:
            return pid_alive(int(self.reaping_marker(domain).read_text()))
        except (OSError, ValueError):
            return False

    # --------------------------------------------------------------- reports
    def _console_end(self, record: ContainerRecord) -> str:
        """The last CONSOLE_READ bytes of the console log (the guest decides its size)."""
        try:
            with (self.host.state.container_dir(record.id) / CONSOLE_LOG).open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - CONSOLE_READ))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def console_tail(self, record: ContainerRecord, lines: int = 8) -> str:
        text = [ln for ln in self._console_end(record).splitlines() if ln.strip()]
        # Escaped: the guest wrote these bytes, and they end up on the user's terminal.
        return "\n".join(guest_text(ln.encode(), 500) for ln in text[-lines:]) or "(no console output)"

    def vm_lost_reason(self, record: ContainerRecord, what: str) -> str:
        """Why a started VM went away, in kvmc's words; the console's tail is labelled as the
        guest's own output, which a container can write anything into."""
        state = self.host.hv.state(record.domain)
        text = self._console_end(record)
        panic = next((ln.strip() for ln in text.splitlines() if "Kernel panic" in ln), None)
        cause = f"{what}; its console says the guest kernel panicked: {guest_text(panic.encode(), 500)}" if panic else what
        return (f"the VM stopped unexpectedly ({cause}; domain {state or 'gone'}); "
                f"last lines of {GUEST_OUTPUT_LABEL}:\n{self.console_tail(record)}")

    # ------------------------------------------------------------------ boot
    def boot(self, record: ContainerRecord, keep_last_exit: bool = False) -> tuple[AgentConnection, AgentTable | None]:
        """Start the domain, connect to its agent and hand it the main process (monitor side):
        the connection, and the agent's table when it had to be asked whether the process
        started (:meth:`first_word`; the monitor adopts it then). ``keep_last_exit``: a restart
        by the restart policy, whose record keeps the last run's end (docker's FinishedAt and
        exit code stay until the next exit)."""
        host = self.host
        started = time.monotonic()
        directory = host.state.container_dir(record.id)
        cloned = bool(record.clone_from)
        self.create_taps(record)
        # A hot member (restored or cloned ahead of time, waiting paused) resumes, or was resumed
        # by the start already (Runtime.start); one whose VM is gone restores its save file, or
        # boots cold if it has none (a hot template clone).
        resumed = record.vm_resumed or (record.resume_paused and self.resume_hot(record))
        restored = resumed or bool(record.restore_from)
        done: dict = {}  # written with the state below: one write of the record, not two
        spent: Path | None = None  # a save file no longer needed, removed once the process is asked for
        if record.vm_resumed:  # the monitor needs libvirt only when the process has ended: connect meanwhile
            threading.Thread(target=host.connect_hv, name="kvmc-connect", daemon=True).start()
        if restored:
            if record.restore_from:
                save = Path(record.restore_from)
                if not resumed:
                    host.hv.restore(save, (directory / "domain.xml").read_text())
                spent = save  # ~the guest's RAM in size: freeing its blocks took ~8 ms before RUN
            done = {"restore_from": "", "resume_paused": False, "vm_resumed": False}
        elif cloned:
            # Started from the clone definition as this start's live definition; the persistent
            # definition stays the cold one, so a later start boots from the container's overlay.
            from kvmc.pool import Pool  # here only: its import (~14 ms) is on every monitor's path

            Pool(host).start_clone(record.domain, (directory / CLONE_XML).read_text(), Path(record.clone_from))
            (directory / CLONE_XML).unlink(missing_ok=True)
            done = {"clone_from": ""}
        else:
            if record.resume_paused:
                host.state.update(record, resume_paused=False)
            self.fresh_ro_layers(record)  # only cold boots have volumes
            host.hv.define((directory / "domain.xml").read_text())  # a hot claim's is the member's still
            host.hv.start(record.domain)
        if keep_last_exit:
            host.state.update(record, state=State.RUNNING, started_at=None, error=None, **done)
        else:
            host.state.update(record, state=State.RUNNING, started_at=None, finished_at=None, exit_code=None,
                              error=None, **done)
        try:
            self.publish_ports(record)
            netifs = self.join_networks(record)
            conn = AgentConnection.connect(record.agent_socket, timeout=host.config.boot_timeout_s)
            proc = record.process
            networked = record.network == "user"
            # The networks' DNS servers first (they answer their containers' names, NXDOMAIN for
            # other plain names, and refuse dotted names, which the resolver then asks the next
            # server for), then slirp's proxy to the host's resolvers.
            nameservers = list(dict.fromkeys(ep.gateway for ep in record.networks if ep.gateway))
            nameservers += [DNS_SERVER] if networked else []
            # A restored or cloned guest's clock is as old as its save file or template, and every
            # clone of one save or template shares its RNG state: the agent sets the clock and
            # reseeds from these first.
            spec = ProcessSpec(
                args=proc.args, env=proc.env, cwd=proc.cwd, user=proc.user,
                hostname=proc.hostname, stdin=proc.stdin, time_ns=time.time_ns(), seed=os.urandom(64),
                tty=record.tty, winsize=tuple(record.console_size) if record.console_size else None,
                net=guest_net_config() if networked else None, netifs=netifs, **container_setup(record, nameservers),
            )
            conn.run(MAIN_PROCESS_ID, spec)
        finally:  # after RUN: the guest sets up the process meanwhile
            if spent is not None:
                spent.unlink(missing_ok=True)
        # started_at is recorded by the monitor when the agent reports the process STARTED
        # (Monitor._relay): a command that cannot be executed never counts as started.
        if restored or cloned:  # its READY went to the connection that warmed it
            answered = self.first_word(record, conn, spec)
            host.say(f"{'restored pool member' if restored else 'cloned template'} in "
                     f"{time.monotonic() - started:.2f}s")
            return answered
        try:
            conn.wait_ready(host.config.boot_timeout_s, check=lambda: check_vm_disk(host.hv, record.domain, directory))
        except DiskFull:
            conn.close()
            raise
        except (GuestError, OSError) as exc:
            conn.close()
            raise GuestError(f"the VM did not come up: {exc}; last lines of {GUEST_OUTPUT_LABEL}:\n"
                             f"{self.console_tail(record)}") from exc
        host.say(f"agent ready {time.monotonic() - started:.2f}s after start (guest uptime {conn.ready_uptime_ms} ms)")
        return conn, None

    def first_word(self, record: ContainerRecord, conn: AgentConnection,
                   spec: ProcessSpec) -> tuple[AgentConnection, AgentTable | None]:
        """Make sure a just restored or cloned VM's agent heard the container's RUN (``spec``,
        sent on ``conn``): its first word within FIRST_WORD_S, or else one more connection,
        where the agent's TABLE (REATTACH) says whether the RUN reached it. Not reached: the
        same RUN again, with the clock read anew (``(conn, None)``). Reached (the agent was only
        slow, and what it said went to the first connection): the table, for the monitor to
        adopt process 1 as after its own death. Never a second process 1, never a wait
        without end (QEMU 7.2 left such a first connection unanswered: docs/platform.md)."""
        if conn.heard_within(FIRST_WORD_S):
            return conn, None
        conn.close()
        self.host.say(f"no answer from the agent of container {record.name}'s VM on the first connection; "
                      "connecting again")
        timeout = self.host.config.boot_timeout_s
        again = AgentConnection.connect(record.agent_socket, timeout=timeout)
        try:
            table, _skipped = again.reattach(timeout)
            if MAIN_PROCESS_ID in table.processes:
                return again, table
            again.run(MAIN_PROCESS_ID, dataclasses.replace(spec, time_ns=time.time_ns()))
        except BaseException:
            again.close()
            raise
        return again, None

    def reattach(self, record: ContainerRecord) -> tuple[AgentConnection, AgentTable, int]:
        """Connect to a running VM's agent whose monitor died (monitor side): the agent's
        TABLE of processes and how many bytes in transit were skipped (AgentConnection.reattach).
        Waits as long as the VM exists (a paused one answers once resumed)."""
        hv = self.host.hv

        def still_there() -> None:
            if hv.state(record.domain) not in ("running", "paused", "blocked"):
                raise GuestError("the VM ended while kvmc's monitor was away")

        conn = AgentConnection.connect(record.agent_socket, timeout=5.0)
        try:
            table, skipped = conn.reattach(None, still_there)
        except BaseException:
            conn.close()
            raise
        return conn, table, skipped

    def fresh_ro_layers(self, record: ContainerRecord) -> None:
        """A new throwaway layer over each read-only volume (kvmc.domain.ro_volume_overlay),
        before any boot from the container's definition: the volume may have changed since."""
        directory = self.host.state.container_dir(record.id)
        volumes = [m for m in record.mounts if m.kind == "volume"]
        for index, mount in enumerate(volumes, start=1):
            if mount.readonly:
                layer = ro_volume_overlay(directory, index)
                layer.unlink(missing_ok=True)
                create_overlay(Path(self.host.volumes.get(mount.source).path), layer)

    def run_offline(self, record: ContainerRecord, args: list[str], stdin: BinaryIO | None, stdout: BinaryIO,
                    stderr: BinaryIO) -> int:
        """Boot a stopped container's own VM (its disk, its volumes) for one process as root,
        and power it off: docker cp into a created or stopped container.

        Why a VM and not the host: the disk may hold guest-written ext4, which kvmc never
        parses on the host as root; the guest's own kernel does it. The record is not
        touched (the container stays created or exited, its log unwritten); the caller holds
        the container's lock, so no start runs meanwhile. A pooled container that never ran
        loses its snapshot (its disk is about to change under the saved RAM): its first
        start boots cold.
        """
        host = self.host
        if record.restore_from or record.clone_from or record.resume_paused:
            host.hv.destroy(record.domain)  # a hot member's paused VM
            if record.restore_from:
                Path(record.restore_from).unlink(missing_ok=True)
            (host.state.container_dir(record.id) / CLONE_XML).unlink(missing_ok=True)
            host.state.update(record, restore_from="", clone_from="", resume_paused=False)
        self.fresh_ro_layers(record)
        self.create_taps(record)
        try:
            host.hv.define((host.state.container_dir(record.id) / "domain.xml").read_text())
            host.hv.start(record.domain)
            with AgentConnection.connect(record.agent_socket, timeout=host.config.boot_timeout_s) as conn:
                conn.wait_ready(host.config.boot_timeout_s)
                conn.run(MAIN_PROCESS_ID, ProcessSpec(
                    args=args, env=list(record.process.env), cwd="/", user="0", stdin=stdin is not None,
                    time_ns=time.time_ns(), seed=os.urandom(64), mounts=agent_mount_items(record.mounts)))
                result = attach_process(conn, MAIN_PROCESS_ID, stdin=stdin, stdout=stdout, stderr=stderr)
            if not host.hv.wait_stopped(record.domain, 15.0):  # the agent powers off after EXIT_ACK
                host.hv.destroy(record.domain)
        finally:
            if host.hv.state(record.domain) in ("running", "paused", "blocked"):
                host.hv.destroy(record.domain)
            for endpoint in record.networks:
                if endpoint.tap:
                    self.netns.delete_tap(endpoint.tap)
        if result.error:
            raise KvmcError(f"cannot run {args[0]} in container {record.name}'s VM: {labelled(result.error)}")
        return result.exit_code

    def resume_hot(self, record: ContainerRecord) -> bool:
        """Resume a claimed hot member's paused VM; False (VM destroyed) if it cannot be."""
        try:
            self.host.hv.resume(record.domain)
            return True
        except KvmcError as exc:
            self.host.say(f"hot pool member could not be resumed ({exc}): "
                          f"{'restoring its save file' if record.restore_from else 'cold boot'}")
            self.host.hv.destroy(record.domain)
            return False

    def publish_ports(self, record: ContainerRecord) -> None:
        """Add the container's host forwards to its running VM's slirp (cold or restored)."""
        for port in record.ports:
            # hostfwd_add prints nothing on success and a sentence when it cannot bind.
            output = self.host.hv.human_monitor_command(record.domain, port.hostfwd()).strip()
            if output:
                raise PortInUse(f"cannot publish {port.host_ip}:{port.host_port}/{port.protocol}: "
                                f"the port is already in use on the host ({output})")

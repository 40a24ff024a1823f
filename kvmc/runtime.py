"""Container lifecycle orchestration: the one layer that ties image, disk, VM, agent and monitor.

``run`` = ``create`` (record + overlay + defined domain) then ``start`` (a monitor process
boots the VM and owns the agent connection, see kvmc/monitor.py) and, in the foreground,
``attach`` to the monitor. Whatever a step creates is undone if a later step fails, so a
failed ``run`` leaves no domain, disk, socket or name behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from kvmc.accel import AccelChoice, choose_accel
from kvmc.agent import MAIN_PROCESS_ID, AgentConnection, FrameType, ProcessResult, ProcessSpec, attach_process
from kvmc.config import Config
from kvmc.disks import create_overlay
from kvmc.domain import DOMAIN_PREFIX, METADATA_NS, OVERLAY_FILE, ShareSpec, container_vm, render_domain_xml
from kvmc.errors import CommandNotFound, CommandNotInvokable, GuestError, ImageError, KvmcError, UsageError
from kvmc.guest import GuestArtefacts, load_guest
from kvmc.hypervisor import Hypervisor
from kvmc.images import ImageStore
from kvmc.monitor import MonitorProcess
from kvmc.monitor import spawn as spawn_monitor
from kvmc.mounts import Mount, agent_mount_items, check_targets, parse_tmpfs, parse_volume, share_tag
from kvmc.network import (DNS_SERVER, PortInUse, PortMapping, allocate_ports, guest_net_config, parse_network,
                          parse_publish)
from kvmc.pool import SAVE_FILE, TEMPLATE_DISK, Pool, clone_spec
from kvmc.process import ProcessOptions, build_process, merge_env
from kvmc.state import ContainerRecord, StateStore, now_iso
from kvmc.volumes import VolumeInUse, VolumeStore

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
HOST_ARCH = "amd64"
ACTIVE_VM_STATES = ("running", "paused", "blocked")
CLONE_XML = "clone.xml"
"""A template clone's first-start definition (the persistent one, domain.xml, boots cold)."""


@dataclass
class RunOptions:
    """What ``kvmc run``/``create`` was asked for, beyond the process itself."""

    image: str
    process: ProcessOptions
    name: str | None = None
    auto_remove: bool = False
    detach: bool = False
    memory_mib: int | None = None
    cpus: int | None = None
    accel: str | None = None
    use_pool: bool = True
    network: str = "user"
    publish: list[str] = field(default_factory=list)
    """docker's -p specs."""
    volumes: list[str] = field(default_factory=list)
    """docker's -v specs: NAME:/path or /host/dir:/path, then :ro or :rw."""
    tmpfs: list[str] = field(default_factory=list)
    read_only: bool = False


def _raise_for(result: ProcessResult) -> int:
    """The docker exit code of a finished process, raising for kvmc-level failures."""
    if result.error:
        err = {127: CommandNotFound, 126: CommandNotInvokable}.get(result.exit_code, KvmcError)
        raise err(result.error)
    return result.exit_code


def _pid_alive(pid: int | None) -> bool:
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


def _is_monitor(pid: int | None) -> bool:
    """A live kvmc process (monitors are forked from the kvmc CLI, so their command line is
    kvmc's), not whatever reused the pid of one that died."""
    if not _pid_alive(pid):
        return False
    try:
        return b"kvmc" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Runtime:
    """Creates, starts, stops and removes containers; every other layer is reached through here."""

    SHUTOFF_WAIT_S = 15.0

    def __init__(self, config: Config, notice: Callable[[str], None] | None = None, verbose: bool = False) -> None:
        self.config = config
        self.notice = notice or (lambda msg: print(f"kvmc: {msg}", file=sys.stderr))
        self.verbose = verbose
        self.hv = Hypervisor(config.libvirt_uri)
        self.images = ImageStore(config.images_dir)
        self.state = StateStore(config.containers_dir)
        self.volumes = VolumeStore(config.volumes_dir)
        self._guest: GuestArtefacts | None = None

    def _say(self, message: str) -> None:
        if self.verbose:
            self.notice(message)

    def guest(self) -> GuestArtefacts:
        """The guest artefacts, read once per Runtime (create, accel and pool all need them)."""
        if self._guest is None:
            self._guest = load_guest(self.config.guest_artefacts_dir)
        return self._guest

    def accel(self, requested: str | None = None) -> AccelChoice:
        return choose_accel(
            requested or self.config.accel, self.hv, self.guest(), self.config.data_dir,
            self.config.templates_dir, self.notice,
        )

    # ----------------------------------------------------------------- create
    def create(self, opts: RunOptions) -> ContainerRecord:
        """Record, overlay and defined (not started) domain; all or nothing."""
        image = self.images.get(opts.image)
        if image.architecture and image.architecture != HOST_ARCH:
            raise ImageError(f'image "{opts.image}" is built for {image.architecture}; kvmc runs {HOST_ARCH} guests')
        process = build_process(image.config, opts.process)
        network, ports, mounts = self._network_and_mounts(opts)
        cold_reason = next((
            f"host directory {m.source} is shared through virtiofs, and QEMU cannot save a VM with virtiofs"
            if m.kind == "bind" else f"volume {m.source} is a disk of its own, which a saved VM does not have"
            for m in mounts if m.needs_cold_boot), None)
        guest = self.guest()
        accel = self.accel(opts.accel)
        self._say(f"accelerator: {accel.accel} ({accel.reason})")
        self.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        memory_mib = opts.memory_mib or self.config.memory_mib
        cpus = opts.cpus or self.config.cpus
        pool = Pool(self)
        key = pool.key_for(image.id, memory_mib, cpus, accel.accel, network)
        container_id, name, directory = self.state.allocate(opts.name, make_dir=False)
        # A template serves any number of runs and is not consumed: prefer it to a save member.
        found = pool.template_for(key) if opts.use_pool and not cold_reason else None
        template_dir, template = found if found else (None, None)
        member = pool.claim(key, directory) if opts.use_pool and not cold_reason and not template else None
        if template is not None:
            directory.mkdir(mode=0o755)
            self._say(f"cloned template {template.id[:12]} (RAM {template.mem_path}): no boot")
        elif member is None:
            directory.mkdir(mode=0o755)
            self._say(f"not pooled: {cold_reason}: cold boot" if cold_reason
                      else "no ready pool member or template for this image and size: cold boot" if opts.use_pool
                      else "--no-pool: cold boot")
        hot = member is not None and pool.is_hot(member)
        if member is not None:
            self._say(f"claimed {'hot ' if hot else ''}pool member {member.id[:12]} ({member.domain}): "
                      f"{'resume' if hot else 'restore'} instead of boot")
            if self.config.pool_refill:
                pool.refill_in_background(image.id, memory_mib, cpus, accel.accel, network, hot)
        process["hostname"] = process["hostname"] or container_id[:12]
        sockets = self.config.run_dir / container_id[:16]
        record = ContainerRecord(
            id=container_id, name=name, image=opts.image, image_id=image.id,
            domain=member.domain if member else f"{DOMAIN_PREFIX}{container_id[:16]}", accel=accel.accel,
            memory_mib=memory_mib, cpus=cpus,
            process=process, auto_remove=opts.auto_remove, detached=opts.detach,
            agent_socket=f"{sockets}.agent.sock", control_socket=f"{sockets}.ctl",
            boot="pool" if member else "template" if template else "cold",
            restore_from=str(directory / SAVE_FILE) if member else "", resume_paused=hot,
            clone_from=str(template_dir) if template_dir else "",
            network=network, ports=[p.to_dict() for p in ports], mounts=[m.to_dict() for m in mounts],
            read_only=opts.read_only,
        )
        try:
            self.state.save(record)
            if hot and not pool.take_socket(member, Path(record.agent_socket)):
                self.state.update(record, resume_paused=False)
            if template_dir is not None:
                # A copy of the template's frozen overlay: the clone's cached ext4 state (in the
                # template's RAM) describes exactly these blocks. A copy, not an overlay on top of
                # it, so the container keeps no link to the template once it exists.
                shutil.copyfile(template_dir / TEMPLATE_DISK, directory / OVERLAY_FILE)
            elif member is None:
                create_overlay(image.disk_path, directory / OVERLAY_FILE)
            spec = container_vm(
                # A claimed member keeps its name and UUID (libvirt restores a save only under
                # those); everything else is this container's own.
                name=record.domain, uuid=member.uuid if member else str(uuid.uuid4()),
                container_id=container_id, container_name=name, directory=directory,
                agent_socket=Path(record.agent_socket), image_disk=image.disk_path, guest=guest,
                domain_type=accel.domain_type, memory_mib=memory_mib, vcpus=cpus,
                state_root=str(self.config.data_dir), network=network == "user", **self._storage_devices(mounts),
            )
            xml = render_domain_xml(spec, self.config.templates_dir)
            (directory / "domain.xml").write_text(xml)
            if template is not None:  # the live definition of the first start only (Runtime.boot)
                (directory / CLONE_XML).write_text(render_domain_xml(clone_spec(spec, template),
                                                                     self.config.templates_dir))
            if not hot:  # for a pool member: the same domain, redefined with this container's paths
                # A hot member's VM runs already: its persistent definition is replaced at its
                # first cold start (boot). Not here: libvirt's define waits for any other
                # domain's destroy in progress (0.19 s measured), e.g. the previous --rm run's.
                self.hv.define(xml)
        except BaseException:
            if member is not None:
                pool.member_socket(member).unlink(missing_ok=True)
            self.discard(record)
            raise
        return record

    def _network_and_mounts(self, opts: RunOptions) -> tuple[str, list[PortMapping], list[Mount]]:
        """Parse and check --network, -p, -v and --tmpfs before anything is created.

        Host ports must be free now and named volumes (created if missing, as docker does)
        must not be held by a running container.
        """
        network = parse_network(opts.network)
        mounts = [parse_volume(v) for v in opts.volumes] + [parse_tmpfs(t) for t in opts.tmpfs]
        check_targets(mounts)
        if opts.publish and network == "none":
            raise UsageError("-p needs a network: it cannot be combined with --network none")
        ports = allocate_ports([parse_publish(p) for p in opts.publish], self.published_ports())
        for mount in mounts:
            if mount.kind == "volume":
                self.volumes.create(mount.source, exist_ok=True)
                self.check_volume_free(mount.source)
        return network, ports, mounts

    def _storage_devices(self, mounts: list[Mount]) -> dict:
        """container_vm's volume disks and virtiofs shares, numbered in the order of ``mounts``
        (the numbering kvmc.mounts.agent_mount_items gives the agent)."""
        volumes = [m for m in mounts if m.kind == "volume"]
        binds = [m for m in mounts if m.kind == "bind"]
        return {
            "volume_disks": tuple((Path(self.volumes.get(m.source).path), m.readonly) for m in volumes),
            "shares": tuple(ShareSpec(Path(m.source), share_tag(i), m.readonly) for i, m in enumerate(binds, start=1)),
        }

    def discard(self, record: ContainerRecord, stop_vm: bool = True) -> None:
        """Remove everything a container owns: domain, directory (disk, logs), sockets, name.

        ``stop_vm`` False (the monitor of a --rm container, see Monitor._finish): a VM still
        running is only undefined, and libvirt drops it when the monitor destroys it.
        """
        try:
            if stop_vm:
                self.hv.undefine(record.domain)
            else:
                self.reaping_marker(record.domain).write_text(str(os.getpid()))
                self.hv.forget(record.domain)
        finally:
            self.state.remove(record)

    def reaping_marker(self, domain: str) -> Path:
        """Names the process that destroys an undefined domain left running by
        ``discard(stop_vm=False)``: while it lives, the domain is no orphan (see gc)."""
        return self.config.run_dir / f"{domain.removeprefix(DOMAIN_PREFIX)}.reaping"

    def reap(self, domain: str) -> None:
        """Destroy a domain left running by ``discard(stop_vm=False)`` (undefined: libvirt then
        drops it) and remove its marker."""
        try:
            self.hv.destroy(domain)
        finally:
            self.reaping_marker(domain).unlink(missing_ok=True)

    def _being_reaped(self, domain: str) -> bool:
        try:
            return _pid_alive(int(self.reaping_marker(domain).read_text()))
        except (OSError, ValueError):
            return False

    # ------------------------------------------------------------------- boot
    def console_tail(self, record: ContainerRecord, lines: int = 8) -> str:
        console = self.state.container_dir(record.id) / "console.log"
        if not console.exists():
            return "(no console output)"
        text = [ln for ln in console.read_text(errors="replace").splitlines() if ln.strip()]
        return "\n".join(text[-lines:]) or "(no console output)"

    def vm_lost_reason(self, record: ContainerRecord, what: str) -> str:
        state = self.hv.state(record.domain)
        console = self.state.container_dir(record.id) / "console.log"
        text = console.read_text(errors="replace") if console.exists() else ""
        panic = next((ln.strip() for ln in text.splitlines() if "Kernel panic" in ln), None)
        cause = f"the guest kernel panicked: {panic}" if panic else what
        return (f"the VM stopped unexpectedly ({cause}; domain {state or 'gone'}); "
                f"last lines of its console:\n{self.console_tail(record)}")

    def boot(self, record: ContainerRecord) -> AgentConnection:
        """Start the domain, connect to its agent and hand it the main process (monitor side)."""
        started = time.monotonic()
        directory = self.state.container_dir(record.id)
        restored, cloned = bool(record.restore_from), bool(record.clone_from)
        if restored:
            save = Path(record.restore_from)
            if not (record.resume_paused and self._resume_hot(record)):
                self.hv.restore(save, (directory / "domain.xml").read_text())
            save.unlink(missing_ok=True)  # ~the guest's RAM in size: no longer needed
            self.state.update(record, restore_from="", resume_paused=False)
        elif cloned:
            # Started from the clone definition as this start's live definition; the persistent
            # definition stays the cold one, so a later start boots from the container's overlay.
            Pool(self).start_clone(record.domain, (directory / CLONE_XML).read_text(), Path(record.clone_from))
            (directory / CLONE_XML).unlink(missing_ok=True)
            self.state.update(record, clone_from="")
        else:
            for mount in record.mounts:  # only cold boots have volumes (see create)
                if mount["kind"] == "volume" and mount["readonly"]:
                    self.volumes.replay_journal(mount["source"])
            self.hv.define((directory / "domain.xml").read_text())  # a hot claim's is the member's still
            self.hv.start(record.domain)
        self.state.update(record, state="running", started_at=None, finished_at=None, exit_code=None, error=None)
        self._publish_ports(record)
        conn = AgentConnection.connect(record.agent_socket, timeout=self.config.boot_timeout_s)
        proc = record.process
        networked = record.network == "user"
        # A restored or cloned guest's clock is as old as its save file or template, and every
        # clone of one save or template shares its RNG state: the agent sets the clock and
        # reseeds from these first.
        conn.run(MAIN_PROCESS_ID, ProcessSpec(
            args=proc["args"], env=proc["env"], cwd=proc["cwd"], user=proc["user"],
            hostname=proc["hostname"], stdin=proc["stdin"], time_ns=time.time_ns(), seed=os.urandom(64),
            mounts=agent_mount_items([Mount(**m) for m in record.mounts]), readonly_root=record.read_only,
            net=guest_net_config() if networked else None, dns=[DNS_SERVER] if networked else [],
        ))
        if restored or cloned:  # its READY went to the connection that warmed it
            self.state.update(record, started_at=now_iso())
            self._say(f"{'restored pool member' if restored else 'cloned template'} in "
                      f"{time.monotonic() - started:.2f}s")
            return conn
        try:
            conn.wait_ready(self.config.boot_timeout_s)
        except (GuestError, OSError) as exc:
            conn.close()
            raise GuestError(f"the VM did not come up: {exc}; last lines of its console:\n"
                             f"{self.console_tail(record)}") from exc
        self.state.update(record, started_at=now_iso())
        self._say(f"agent ready {time.monotonic() - started:.2f}s after start (guest uptime {conn.ready_uptime_ms} ms)")
        return conn

    def _resume_hot(self, record: ContainerRecord) -> bool:
        """Resume a claimed hot member's paused VM; False (VM destroyed) if it cannot be."""
        try:
            self.hv.resume(record.domain)
            return True
        except KvmcError as exc:
            self._say(f"hot pool member could not be resumed ({exc}): restoring its save file")
            self.hv.destroy(record.domain)
            return False

    def _publish_ports(self, record: ContainerRecord) -> None:
        """Add the container's host forwards to its running VM's slirp (cold or restored)."""
        for port in map(lambda p: PortMapping(**p), record.ports):
            # hostfwd_add prints nothing on success and a sentence when it cannot bind.
            output = self.hv.human_monitor_command(record.domain, port.hostfwd()).strip()
            if output:
                raise PortInUse(f"cannot publish {port.host_ip}:{port.host_port}/{port.protocol}: "
                                f"the port is already in use on the host ({output})")

    # ------------------------------------------------ host resources in use
    def _live_records(self, exclude: str | None = None) -> Iterator[ContainerRecord]:
        for record in self.state.list():
            if record.id != exclude and record.state in ("running", "starting"):
                record = self.reconcile(record)
                if record.state in ("running", "starting"):
                    yield record

    def published_ports(self, exclude: str | None = None) -> dict[tuple[str, int, str], str]:
        """(host ip, port, protocol) -> name, for every port a running container publishes."""
        return {(p["host_ip"], p["host_port"], p["protocol"]): r.name
                for r in self._live_records(exclude) for p in r.ports}

    def volume_users(self, name: str, running_only: bool = False) -> list[str]:
        records = self._live_records() if running_only else self.state.list()
        return [r.name for r in records if any(m["kind"] == "volume" and m["source"] == name for m in r.mounts)]

    def check_volume_free(self, name: str, exclude: str | None = None) -> None:
        """ext4 on a block device has one writer at a time: refuse a second running user."""
        users = [u for u in self.volume_users(name, running_only=True) if exclude is None or u != exclude]
        if users:
            raise VolumeInUse(f"volume {name} is in use by running container {users[0]}: "
                              "a kvmc volume is an ext4 disk and can be mounted by one running container at a time")

    def check_host_resources(self, record: ContainerRecord) -> None:
        """Before a VM starts: its host ports are free and its volumes are not mounted elsewhere."""
        allocate_ports([PortMapping(**p) for p in record.ports], self.published_ports(exclude=record.id))
        for mount in record.mounts:
            if mount["kind"] == "volume":
                self.volumes.get(mount["source"])  # removed meanwhile: say so rather than fail in QEMU
                self.check_volume_free(mount["source"], exclude=record.name)

    # ------------------------------------------------------------------ start
    def start(self, record: ContainerRecord, *, wait_attach: bool = False,
              discard_on_failure: bool = False) -> MonitorProcess:
        """Hand the container to a new monitor process (which boots it and outlives this CLI).

        The record is reset before the monitor is spawned and never written here afterwards:
        from then on the monitor is its only writer.
        """
        with self.state.locked(record.id):  # two concurrent starts must not spawn two monitors
            current = self.reconcile(self.state.load(record.id) or record)
            if current.state in ("running", "starting"):
                raise KvmcError(f"container {record.name} is already running")
            self._wait_powered_off(current)
            self.check_host_resources(current)
            self.state.update(record, state="starting", started_at=None, finished_at=None, exit_code=None,
                              error=None, monitor_pid=None)
            return spawn_monitor(self.config, record.id, Path(record.control_socket),
                                 self.state.container_dir(record.id) / "monitor.log",
                                 wait_attach=wait_attach, discard_on_failure=discard_on_failure)

    def _wait_powered_off(self, record: ContainerRecord) -> None:
        """An exited container's monitor may still be waiting for its guest to power off (see
        Monitor._finish): its VM can be started again only once it is off."""
        if record.state != "exited":
            return
        deadline = time.monotonic() + self.SHUTOFF_WAIT_S + 5
        while _is_monitor(record.monitor_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _is_monitor(record.monitor_pid):
            raise KvmcError(f"container {record.name} is still shutting down: see "
                            f"{self.state.container_dir(record.id) / 'monitor.log'}")
        if self.hv.state(record.domain) in ACTIVE_VM_STATES:  # its monitor was killed meanwhile
            self.hv.destroy(record.domain)

    def _end_monitor(self, record: ContainerRecord) -> None:
        """Kill the container's monitor, if one still lives (a running container's, for rm -f,
        or an exited one's that waits for its guest's power-off)."""
        if record.monitor_pid and record.monitor_pid != os.getpid() and _is_monitor(record.monitor_pid):
            os.kill(record.monitor_pid, signal.SIGKILL)

    def wait_started(self, record: ContainerRecord, monitor: MonitorProcess) -> ContainerRecord:
        """Wait until a detached start's process runs (or failed); raise on failure."""
        deadline = time.monotonic() + self.config.boot_timeout_s + 10
        while time.monotonic() < deadline:
            current = self.state.load(record.id)
            if current is None:
                raise KvmcError(f"container {record.name} failed to start and was removed")
            if current.started_at or current.state == "exited":
                break
            if monitor.poll() is not None:
                raise KvmcError(f"the monitor of container {record.name} died: see "
                                f"{self.state.container_dir(record.id) / 'monitor.log'}")
            time.sleep(0.05)
        else:
            raise KvmcError(f"container {record.name} did not start within {self.config.boot_timeout_s:.0f}s")
        if current.state == "exited" and current.exit_code == 125 and current.error:
            raise KvmcError(current.error)
        return current

    # ----------------------------------------------------------------- attach
    def _connect_monitor(self, record: ContainerRecord) -> AgentConnection:
        try:
            return AgentConnection.connect(record.control_socket, timeout=self.config.boot_timeout_s)
        except (OSError, GuestError) as exc:
            raise KvmcError(f"cannot reach the monitor of container {record.name}: {exc}") from exc

    @contextmanager
    def _forward_signals(self, conn: AgentConnection, proc_id: int) -> Iterator[None]:
        previous = {}

        def forward(signum: int, _frame: object) -> None:
            try:
                conn.signal(proc_id, signum)
            except OSError:
                pass

        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def attach(self, record: ContainerRecord, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO) -> int:
        """Relay process 1's stdio through the monitor until the container ends; its exit code."""
        conn = self._connect_monitor(record)
        with conn:
            try:
                conn.send(FrameType.ATTACH, MAIN_PROCESS_ID, b"stdin=1" if stdin is not None else b"")
                with self._forward_signals(conn, MAIN_PROCESS_ID):
                    result = attach_process(conn, MAIN_PROCESS_ID, stdin=stdin, stdout=stdout, stderr=stderr)
            except (GuestError, OSError) as exc:
                ended = self.state.load(record.id)
                if ended is not None and ended.state == "exited" and ended.error:
                    raise KvmcError(ended.error) from exc  # it failed before we could hear it
                raise KvmcError(f"lost the monitor of container {record.name}: {exc}") from exc
            # The monitor closes the connection once the exit is recorded (and --rm done).
            try:
                while conn.read_frame(self.SHUTOFF_WAIT_S + 5) is not None:
                    pass
            except (GuestError, OSError):
                pass
        return _raise_for(result)

    # -------------------------------------------------------------------- run
    def run(self, opts: RunOptions, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO) -> int:
        """docker run: the command's exit code, or raise KvmcError (125/126/127)."""
        record = self.create(opts)
        try:
            monitor = self.start(record, wait_attach=not opts.detach, discard_on_failure=True)
        except BaseException:
            self.discard(record)
            raise
        if opts.detach:
            self.wait_started(record, monitor)
            stdout.write(f"{record.id}\n".encode())
            stdout.flush()
            return 0
        return self.attach(record, stdin if opts.process.interactive else None, stdout, stderr)

    # ------------------------------------------------------------------- exec
    def exec(self, ref: str, opts: ProcessOptions, stdin: BinaryIO | None, stdout: BinaryIO,
             stderr: BinaryIO) -> int:
        """docker exec: a second process in the running VM, with its own stdio and exit code."""
        record = self.reconcile(self.state.resolve(ref))
        if record.state != "running" or not record.started_at:
            raise KvmcError(f"container {record.name} is not running")
        proc = record.process
        spec = ProcessSpec(
            args=opts.command, env=merge_env(proc["env"], opts.env, os.environ),
            cwd=opts.workdir or proc["cwd"], user=opts.user or proc["user"], stdin=opts.interactive,
        )
        proc_id = random.randint(2, 0xFFFF)
        conn = self._connect_monitor(record)
        with conn:
            with self._forward_signals(conn, proc_id):
                try:
                    conn.run(proc_id, spec)
                    result = attach_process(conn, proc_id, stdin=stdin if opts.interactive else None,
                                            stdout=stdout, stderr=stderr)
                except (GuestError, OSError) as exc:
                    raise KvmcError(f"container {record.name} ended during exec: {exc}") from exc
        return _raise_for(result)

    # ------------------------------------------------------------- stop, kill
    def kill(self, ref: str, signum: int = signal.SIGKILL) -> ContainerRecord:
        """Send a signal to the container's main process."""
        record = self.reconcile(self.state.resolve(ref))
        if record.state != "running":
            raise KvmcError(f"container {record.name} is not running")
        try:
            with self._connect_monitor(record) as conn:
                conn.signal(MAIN_PROCESS_ID, signum)
        except OSError as exc:  # the monitor closed between connect and send: it just ended
            raise KvmcError(f"container {record.name} is not running") from exc
        return record

    def stop(self, ref: str, timeout_s: int | None = None) -> ContainerRecord:
        """SIGTERM, SIGKILL after the timeout (both by the agent), then the VM powers off."""
        record = self.reconcile(self.state.resolve(ref))
        timeout = self.config.stop_timeout_s if timeout_s is None else timeout_s
        if record.state == "running":
            try:
                with self._connect_monitor(record) as conn:
                    conn.shutdown(timeout)
            except (KvmcError, OSError):
                pass  # monitor gone: destroy below
            if not self.wait_exited(record, timeout + self.SHUTOFF_WAIT_S):
                self.hv.destroy(record.domain)
                self.wait_exited(record, 10)
        return self.reconcile(self.state.load(record.id) or record)

    def wait_exited(self, record: ContainerRecord, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            current = self.state.load(record.id)
            if current is None or self.reconcile(current).state == "exited":
                return True
            time.sleep(0.1)
        return False

    # ------------------------------------------------------------- reconcile
    def reconcile(self, record: ContainerRecord) -> ContainerRecord:
        """Make the record tell the truth about a VM whose monitor is gone."""
        # "starting" without a monitor pid: start() has reset the record and is spawning the
        # monitor, which records its own pid first thing. Not dead, just not yet born.
        spawning = record.state == "starting" and record.monitor_pid is None
        if record.state in ("running", "starting") and not spawning and not _pid_alive(record.monitor_pid):
            vm = self.hv.state(record.domain)
            if vm in ACTIVE_VM_STATES:
                self.hv.destroy(record.domain)  # unmonitored: its output and exit are lost anyway
            self.state.update(record, state="exited", finished_at=record.finished_at or now_iso(),
                              exit_code=record.exit_code if record.exit_code is not None else 137,
                              error=record.error or "kvmc's monitor for this container died", monitor_pid=None)
        elif record.state in ("created", "exited") and self.hv.state(record.domain) is None:
            xml = self.state.container_dir(record.id) / "domain.xml"
            if xml.exists():
                self.hv.define(xml.read_text())  # the domain vanished from libvirt: define it again
        return record

    # ------------------------------------------------------------------ misc
    def remove(self, ref: str, force: bool = False) -> ContainerRecord:
        record = self.reconcile(self.state.resolve(ref))
        if record.state in ("running", "starting"):
            if not force:
                raise KvmcError(f"container {record.name} is running: stop it first or use rm -f")
        self._end_monitor(record)
        self.discard(record)
        return record

    def orphan_domains(self) -> list[str]:
        """kvmc domains of this state root that no container record owns (e.g. after a crash)."""
        known = {r.domain for r in self.state.list()} | Pool(self).domains()
        orphans = []
        for name in self.hv.domain_names(DOMAIN_PREFIX):
            if name in known or self._being_reaped(name):
                continue
            meta = self.hv.metadata(name, METADATA_NS) or ""
            match = re.search(r"<(?:\w+:)?state-root>([^<]*)</", meta)
            if match and match.group(1) == str(self.config.data_dir):
                orphans.append(name)
        return orphans

    def gc(self, force: bool) -> list[str]:
        """Show (or with ``force`` remove) what no container record owns: domains of this state
        root, the sockets named after them, and directories/names of half-created containers."""
        orphans = self.orphan_domains()
        half_created = self.state.unrecorded()
        if force:
            for name in orphans:
                self.hv.undefine(name)
                short = name.removeprefix(DOMAIN_PREFIX)
                for sock in self.config.run_dir.glob(f"{short}.*"):
                    sock.unlink(missing_ok=True)
            for path in half_created:
                self.state.reclaim(path)
        return orphans + [str(p) for p in half_created]

    def disk_usage(self) -> dict:
        """What images and containers use on disk (allocated bytes), and what prune would free."""
        def allocated(path: Path) -> int:
            return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) if path.exists() else 0

        records = [self.reconcile(r) for r in self.state.list()]
        used = {r.image_id for r in records}
        images = self.images.list()
        volumes = self.volumes.list()
        mounted = {m["source"] for r in records for m in r.mounts if m["kind"] == "volume"}
        return {
            "images": {"count": len(images), "active": sum(i.id in used for i in images),
                       "bytes": sum(allocated(i.disk_path.parent) for i in images),
                       "reclaimable": sum(allocated(i.disk_path.parent) for i in images if i.id not in used)},
            "volumes": {"count": len(volumes), "active": sum(v.name in mounted for v in volumes),
                        "bytes": sum(self.volumes.usage_bytes(v) for v in volumes),
                        "reclaimable": sum(self.volumes.usage_bytes(v) for v in volumes if v.name not in mounted)},
            "containers": {"count": len(records), "running": sum(r.state == "running" for r in records),
                           "bytes": sum(allocated(self.state.container_dir(r.id)) for r in records),
                           "reclaimable": sum(allocated(self.state.container_dir(r.id))
                                              for r in records if r.state in ("exited", "created"))},
        }

    def prune(self, all_images: bool) -> tuple[list[str], list[str]]:
        """Remove stopped containers, and with ``all_images`` every image no container uses."""
        removed = []
        for record in map(self.reconcile, self.state.list()):
            if record.state in ("exited", "created"):
                self._end_monitor(record)
                self.discard(record)
                removed.append(record.name)
        deleted = []
        if all_images:
            used = {r.image_id for r in self.state.list()}
            for image in self.images.list():
                if image.id not in used:
                    self.images.remove(image.id, force=True)
                    deleted.append(image.short_id)
        return removed, deleted

    def check_image_unused(self, ref: str) -> None:
        """Refuse to delete an image whose disk a container's overlay still backs onto.

        Untagging one of several tags deletes nothing, so it is allowed (as in docker).
        """
        image = self.images.get(ref)
        if ref in image.tags or f"{ref}:latest" in image.tags:
            if len(image.tags) > 1:
                return
        users = [r.name for r in self.state.list() if r.image_id == image.id]
        if users:
            raise ImageError(f'image "{ref}" is used by container(s) {", ".join(users)}: remove them first')

    def inspect(self, ref: str) -> dict:
        record = self.reconcile(self.state.resolve(ref))
        data = asdict(record)
        data["vm_state"] = self.hv.state(record.domain)
        try:
            config = self.images.get(record.image_id).config
            data["image_config"] = {"exposed_ports": config.exposed_ports, "volumes": config.volumes}
        except ImageError:
            data["image_config"] = None
        return data

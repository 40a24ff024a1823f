"""The engine: a container's lifecycle across the layers (image, disk, VM, agent, monitor).

``run`` = ``create`` (record + overlay + defined domain) then ``start`` (a monitor process
boots the VM and owns the agent connection, see kvmc/monitor.py) and, in the foreground,
``attach`` to the monitor. Whatever a step creates is undone if a later step fails, so a
failed ``run`` leaves no domain, disk, socket or name behind.

Two front doors (the CLI, the API server) reach this through kvmc/service, so nothing here
assumes a terminal: stdio, signal forwarding and the caller's environment are parameters, and
nothing is printed. Reading a container (:meth:`Runtime.observe`) never changes libvirt or the
record; :meth:`Runtime.repair` is the explicit step that does (start, rm, stop, gc).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import re
import shutil
import signal
import struct
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Protocol

from kvmc.agent import (MAIN_PROCESS_ID, AgentConnection, FrameType, ProcessResult, ProcessSpec, SignalWatch,
                        attach_process, labelled, parse_exit)
from kvmc.detach import parse_detach_keys
from kvmc.context import HostContext
from kvmc.disks import create_overlay
from kvmc.domain import DOMAIN_PREFIX, METADATA_NS, OVERLAY_FILE, ShareSpec, container_vm
from kvmc.errors import (CommandNotFound, CommandNotInvokable, Conflict, ContainerNotRunning, ContainerRunning,
                         GaveUpWaiting, GuestError,
                         ImageError, KvmcError, UsageError, VolumeInUse)
from kvmc.logs import resolve_log_opts
from kvmc.monitor import EXEC_ID_MAX, SHUTOFF_WAIT_S, MonitorProcess
from kvmc.monitor import spawn as spawn_monitor
from kvmc.mounts import Mount, check_targets, parse_tmpfs, parse_volume, share_tag
from kvmc.health import Healthcheck, merge as merge_healthcheck
from kvmc.net.plan import MAX_NETWORKS_PER_CONTAINER, Endpoint, guest_ifname, tap_name, valid_dns_name
from kvmc.network import NETWORK_MODES, PortMapping, allocate_ports, parse_network, parse_publish
from kvmc.options import ContainerOptions, signal_number
from kvmc.pool import SAVE_FILE, TEMPLATE_DISK, Offer, Pool, clone_spec
from kvmc.process import ProcessOptions, build_process, merge_env, terminal_env
from kvmc.state import ContainerRecord, State
from kvmc.vmlife import CLONE_XML, VMLife, is_monitor, pid_alive, process_limits

HOST_ARCH = "amd64"
ACTIVE_VM_STATES = ("running", "paused", "blocked")
REATTACH_LOCK = ".monitor.lock"
"""Taken while a new monitor is spawned for a running container whose monitor died, while a
vanished domain is defined again, and while rm takes the container apart."""
MONITOR_DIED = "kvmc's monitor for this container died"

SignalForwarder = Callable[[Callable[[int], None]], AbstractContextManager]
"""Given ``send(signum)``, a context manager that forwards the caller's signals while a
process is attached: the CLI installs handlers (kvmc/cli/signals.py); the API server passes
None and turns docker's ``kill`` calls into signals itself. As docker's --sig-proxy, signals
are forwarded to processes without a TTY only: a TTY's ^C is a byte that the guest's terminal
driver turns into SIGINT."""


class Console(Protocol):
    """A front door's terminal, for a process with a TTY (the CLI's is kvmc/terminal.py; the
    API has none: its clients resize through the resize endpoints)."""

    def size(self) -> tuple[int, int] | None:
        """(rows, columns) now, or None when the caller has no terminal."""

    def session(self, resize: Callable[[int, int], None], raw: bool) -> AbstractContextManager:
        """While attached: ``resize`` with the size now and on every change; with ``raw``, the
        caller's terminal in raw mode, restored on every way out."""


@dataclass
class DockerFields:
    """Container settings that only docker's model has (the API sets them; the CLI some)."""

    labels: dict[str, str] = field(default_factory=dict)
    tty: bool = False
    console_size: tuple[int, int] | None = None
    """(rows, columns) of the TTY at start: docker's ConsoleSize, the CLI's terminal."""
    open_stdin: bool = False
    stdin_once: bool = False
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    stop_signal: str | None = None
    stop_timeout: int | None = None


@dataclass
class RunOptions:
    """What ``kvmc run``/``create`` (or a docker create) was asked for, beyond the process."""

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
    """docker's --network/NetworkMode: user (docker's bridge/default), none, or a kvmc network."""
    network_aliases: list[str] = field(default_factory=list)
    """--network-alias: more names on the network ``network`` names."""
    more_networks: list[tuple[str, list[str]]] = field(default_factory=list)
    """Further kvmc networks with their aliases (the API's EndpointsConfig beyond NetworkMode)."""
    publish: list[str] = field(default_factory=list)
    """docker's -p specs."""
    publish_all: bool = False
    """docker's -P: every port the image exposes, on a free host port."""
    volumes: list[str] = field(default_factory=list)
    """docker's -v specs: NAME:/path or /host/dir:/path, then :ro or :rw."""
    tmpfs: list[str] = field(default_factory=list)
    read_only: bool = False
    log_opts: dict[str, str] = field(default_factory=dict)
    """docker's --log-opt (max-size, max-file); the configured defaults fill in the rest."""
    host_env: Mapping[str, str] = field(default_factory=dict)
    """Where ``-e NAME`` (no value) takes NAME's value from: the CLI's environment; none for
    the API (the docker client has resolved those already)."""
    docker: DockerFields = field(default_factory=DockerFields)
    options: ContainerOptions = field(default_factory=ContainerOptions)
    """Restart policy, health check, DNS, hosts, ulimits, capabilities, /dev/shm (kvmc/options.py)."""
    pull: str | None = None
    """docker's --pull (missing | always | never), for the service layer; None: never pull."""
    platform: str | None = None
    guest_dir: Path | None = None
    """Boot these guest artefacts instead of the configured ones (``kvmc host``); never pooled:
    pool members and templates are made with the configured guest."""


def pool_source(offer: Offer | None) -> str:
    """What served a run, as the container's record keeps it (inspect: ``Kvmc.PoolSource``):
    which kind of pool VM, and whose pool (``kvmc pool warm``'s or ``kvmc serve``'s automatic one)."""
    if offer is None:
        return ""
    record = offer.record
    if offer.boot == "template":
        kind = f"template {record.id[:12]}"
    elif getattr(record, "template", ""):
        kind = "hot template clone" if offer.hot else "template clone"
    else:
        kind = "hot member" if offer.hot else "saved member"
    return f"{kind} ({'auto: kvmc serve' if record.origin else 'manual: pool warm'})"


def raise_for(result: ProcessResult) -> int:
    """The docker exit code of a finished process, raising for kvmc-level failures."""
    if result.error:
        err = {127: CommandNotFound, 126: CommandNotInvokable}.get(result.exit_code, KvmcError)
        raise err(labelled(result.error) if result.exit_code in (126, 127) else result.error)
    return result.exit_code


class Runtime:
    """Creates, starts, stops and removes containers over the leaves of a HostContext."""

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self.life = VMLife(host)

    @property
    def config(self):  # noqa: ANN201 - kvmc.config.Config
        return self.host.config

    @property
    def hv(self):  # noqa: ANN201 - kvmc.hypervisor.Hypervisor (or a fake)
        return self.host.hv

    @property
    def images(self):  # noqa: ANN201
        return self.host.images

    @property
    def state(self):  # noqa: ANN201
        return self.host.state

    @property
    def volumes(self):  # noqa: ANN201
        return self.host.volumes

    # ----------------------------------------------------------------- create
    def create(self, opts: RunOptions) -> ContainerRecord:
        """Record, overlay and defined (not started) domain; all or nothing."""
        image = self.images.get(opts.image)
        if image.architecture and image.architecture != HOST_ARCH:
            raise ImageError(f'image "{opts.image}" is built for {image.architecture}; kvmc runs {HOST_ARCH} guests')
        process = build_process(image.config, opts.process, opts.host_env)
        if opts.docker.tty:
            process["env"] = terminal_env(process["env"], opts.host_env)
        log_opts = resolve_log_opts(opts.log_opts, self.config.log_max_size, self.config.log_max_file)
        options = self._container_options(opts, image.config)
        if options.publish_all:
            opts = dataclasses.replace(opts, publish=[*opts.publish, *image.config.exposed_ports, *options.expose])
        network, ports, mounts, endpoints = self._network_and_mounts(opts)
        cold_reason = next((
            f"host directory {m.source} is shared through virtiofs, and QEMU cannot save a VM with virtiofs"
            if m.kind == "bind" else f"volume {m.source} is a disk of its own, which a saved VM does not have"
            for m in mounts if m.needs_cold_boot), None)
        if endpoints and cold_reason is None:
            cold_reason = (f"network {endpoints[0].network} needs a NIC of its own, which pool members and "
                           "templates are not made with")
        if opts.guest_dir is not None and cold_reason is None:
            cold_reason = f"it boots the guest in {opts.guest_dir}, and pool members are made with the configured one"
        guest = self.host.guest(opts.guest_dir)
        accel = self.host.accel(opts.accel)
        self.host.say(f"accelerator: {accel.accel} ({accel.reason})")
        self.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        memory_mib = opts.memory_mib or self.config.memory_mib
        cpus = opts.cpus or self.config.cpus
        pool = Pool(self.host)
        key = pool.key_for(image.id, memory_mib, cpus, accel.accel, network)
        container_id, name, directory = self.state.allocate(opts.name, make_dir=False)
        try:
            # The pool's sources in order: a template (it serves any number of runs and is not
            # consumed), else a member claimed atomically (its directory becomes this one).
            offer = (pool.claim(key, directory, auto=self.host.claim_auto_pools)
                     if opts.use_pool and not cold_reason else None)
            member = offer.record if offer is not None and offer.boot == "pool" else None
            if member is None:
                directory.mkdir(mode=0o755)
        except BaseException:
            self.state.release(container_id, name)  # nothing but the name and directory exist yet
            raise
        template = offer.record if offer is not None and offer.boot == "template" else None
        template_dir = offer.directory if template is not None else None
        if template is not None:
            self.host.say(f"cloned template {template.id[:12]} (RAM {template.mem_path}): no boot")
        elif member is None:
            self.host.say(f"not pooled: {cold_reason}: cold boot" if cold_reason
                      else "no ready pool member or template for this image and size: cold boot" if opts.use_pool
                      else "--no-pool: cold boot")
        hot = offer is not None and offer.hot
        if member is not None:
            self.host.say(f"claimed {'hot ' if hot else ''}pool member {member.id[:12]} ({member.domain})"
                          f"{' cloned from template ' + member.template[:12] if member.template else ''}: "
                          f"{'resume' if hot else 'restore'} instead of boot")
            if self.config.pool_refill and not member.origin:  # an automatic pool's server refills its own
                pool.refill_in_background(image.id, memory_mib, cpus, accel.accel, network, hot)
        process["hostname"] = process["hostname"] or container_id[:12]
        endpoints = [dataclasses.replace(ep, tap=tap_name(container_id, i)) for i, ep in enumerate(endpoints)]
        docker = opts.docker
        sockets = self.config.run_dir / container_id[:16]
        record = ContainerRecord(
            id=container_id, name=name, image=opts.image, image_id=image.id,
            domain=member.domain if member else f"{DOMAIN_PREFIX}{container_id[:16]}", accel=accel.accel,
            memory_mib=memory_mib, cpus=cpus,
            process=process, auto_remove=opts.auto_remove, detached=opts.detach,
            agent_socket=f"{sockets}.agent.sock", control_socket=f"{sockets}.ctl",
            boot="pool" if member else "template" if template else "cold",
            # A hot template clone has no save file: if its VM is gone, it boots cold from its disk.
            restore_from=str(directory / SAVE_FILE) if member and not member.template else "", resume_paused=hot,
            pool_source=pool_source(offer),
            clone_from=str(template_dir) if template_dir else "",
            network=network, ports=ports, mounts=mounts, networks=endpoints, read_only=opts.read_only,
            labels={**image.config.labels, **docker.labels}, tty=docker.tty,
            console_size=list(docker.console_size) if docker.tty and docker.console_size else None,
            open_stdin=docker.open_stdin,
            stdin_once=docker.stdin_once, entrypoint=docker.entrypoint, cmd=docker.cmd,
            stop_signal=docker.stop_signal or image.config.stop_signal, stop_timeout=docker.stop_timeout,
            log_opts=log_opts,
            options=options, guest_dir=str(opts.guest_dir or ""),
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
                network_taps=tuple(ep.tap for ep in endpoints), tcg_tb_cache_mib=self.config.tcg_tb_cache_mib,
            )
            xml = self.host.domain_xml(spec)
            (directory / "domain.xml").write_text(xml)
            if template is not None:  # the live definition of the first start only (VMLife.boot)
                (directory / CLONE_XML).write_text(self.host.domain_xml(clone_spec(spec, template)))
            if not hot:  # for a pool member: the same domain, redefined with this container's paths
                # A hot member's VM runs already: its persistent definition is replaced at its
                # first cold start (boot). Not here: libvirt's define waits for any other
                # domain's destroy in progress (0.19 s measured), e.g. the previous --rm run's.
                self.hv.define(xml)
        except BaseException:
            if member is not None:
                pool.member_socket(member).unlink(missing_ok=True)
            self.life.discard(record)
            raise
        return record


    @staticmethod
    def _container_options(opts: RunOptions, image_config) -> ContainerOptions:  # noqa: ANN001 - ImageConfig
        """The options a container is made with, checked, with what the image adds: its health
        check under the one asked for (docker's merge), the publish-all flag, a valid stop signal."""
        options = dataclasses.replace(opts.options, dns=list(opts.options.dns)).check()
        if options.restart.enabled and opts.auto_remove:
            raise UsageError("conflicting options: --restart and --rm: a container removed when it exits cannot "
                             "be restarted")
        asked = options.healthcheck
        merged = merge_healthcheck(asked, Healthcheck.from_docker(image_config.healthcheck))
        # --no-healthcheck (a NONE test) stays recorded as such: docker shows it in Config.
        options.healthcheck = merged if merged is not None or asked is None else Healthcheck(test=["NONE"])
        options.publish_all = options.publish_all or opts.publish_all
        stop_signal = opts.docker.stop_signal or image_config.stop_signal
        if stop_signal:
            signal_number(stop_signal)
        if opts.docker.stop_timeout is not None and opts.docker.stop_timeout < -1:
            raise UsageError("--stop-timeout must be -1 (wait for ever) or more")
        return options

    def _network_and_mounts(self, opts: RunOptions) -> tuple[str, list[PortMapping], list[Mount], list[Endpoint]]:
        """Parse and check --network, -p, -v and --tmpfs before anything is created.

        Host ports must be free now and named volumes (created if missing, as docker does)
        must not be held by a running container.
        """
        network, endpoints = self._networks(opts)
        mounts = [parse_volume(v) for v in opts.volumes] + [parse_tmpfs(t) for t in opts.tmpfs]
        check_targets(mounts)
        if opts.publish and network == "none":
            raise UsageError("-p needs a network with outbound access: it cannot be combined with --network none "
                             "or only internal networks")
        wanted = [parse_publish(p) for p in opts.publish]
        ports = allocate_ports(wanted, self.published_ports()) if wanted else []
        for i, mount in enumerate(mounts):
            if mount.kind == "volume":
                volume = self.host.volumes.create(mount.source, exist_ok=True, driver=self.config.volume_driver)
                self.check_volume_free(mount.source)
                if volume.shared_dir:
                    mounts[i] = dataclasses.replace(mount, shared_dir=volume.shared_dir)
        return network, ports, mounts, endpoints

    def _networks(self, opts: RunOptions) -> tuple[str, list[Endpoint]]:
        """(user-mode network mode, kvmc network endpoints) for --network/--network-alias and
        the API's further endpoints. docker's bridge/default is kvmc's user-mode network; a
        container on kvmc networks keeps it (outbound access, -p) unless every one of them is
        internal, as docker's internal networks have no way out."""
        mode, wanted = opts.network or "user", []
        if mode in ("default", "bridge"):
            mode = "user"
        if mode not in NETWORK_MODES:
            if mode == "host":
                raise UsageError('kvmc containers are VMs: "--network host" (sharing the host network stack) '
                                 "is not possible; publish ports with -p instead")
            if mode.startswith("container:"):
                raise UsageError("kvmc containers are VMs: they cannot share another container's network stack")
            wanted.append((mode, list(opts.network_aliases)))
            mode = "user"
        for name, aliases in opts.more_networks:
            if name in ("default", "bridge", "user"):
                continue
            if name in ("none", "host"):
                raise UsageError(f'network "{name}" cannot be combined with other networks')
            if all(name != w[0] for w in wanted):
                wanted.append((name, list(aliases)))
        if wanted and mode == "none":
            raise UsageError("--network none cannot be combined with other networks")
        if len(wanted) > MAX_NETWORKS_PER_CONTAINER:
            raise UsageError(f"a kvmc container can be on at most {MAX_NETWORKS_PER_CONTAINER} networks")
        endpoints, internal = [], []
        for name, aliases in wanted:
            network = self.host.networks.get(name)  # NotFound, as docker: "network X not found"
            if network.builtin:
                raise UsageError(f'network "{network.name}" cannot be combined with other networks')
            network = self.host.networks.with_subnet(network)
            bad = [a for a in aliases if not valid_dns_name(a)]
            if bad:
                raise UsageError(f'invalid network alias "{bad[0]}": use letters, digits, "-", "_" and dots')
            endpoints.append(Endpoint(network_id=network.id, network=network.name, aliases=list(aliases)))
            internal.append(network.internal)
        if endpoints and all(internal):
            mode = "none"
        return parse_network(mode), endpoints

    def redefine(self, record: ContainerRecord, **changes: object) -> ContainerRecord:
        """Record ``changes`` to a stopped container and define its VM again to match (network
        connect/disconnect change its NICs). The VM keeps its name, UUID, disk and size: the
        definition is rendered as create rendered it, from the record."""
        directory = self.state.container_dir(record.id)
        current = (directory / "domain.xml").read_text()
        uuid_match = re.search(r"<uuid>([^<]+)</uuid>", current)
        type_match = re.search(r"<domain type='(\w+)'", current)
        if not uuid_match or not type_match:
            raise KvmcError(f"cannot read the VM definition of container {record.name}")
        if record.restore_from or record.clone_from or record.resume_paused:
            # Not started yet from a pool member or template: those VMs have no NICs to change,
            # so its first start becomes a cold boot from its own disk.
            if record.resume_paused and self.hv.state(record.domain) in ACTIVE_VM_STATES:
                self.hv.destroy(record.domain)
            if record.restore_from:
                Path(record.restore_from).unlink(missing_ok=True)
            (directory / CLONE_XML).unlink(missing_ok=True)
            changes = {**changes, "restore_from": "", "clone_from": "", "resume_paused": False, "boot": "cold",
                       "pool_source": ""}
        updated = dataclasses.replace(record, **changes)
        spec = container_vm(
            name=updated.domain, uuid=uuid_match.group(1), container_id=updated.id, container_name=updated.name,
            directory=directory, agent_socket=Path(updated.agent_socket),
            image_disk=self.images.get(updated.image_id).disk_path, guest=self.host.guest(updated.guest_dir),
            domain_type=type_match.group(1), memory_mib=updated.memory_mib, vcpus=updated.cpus,
            state_root=str(self.config.data_dir), network=updated.network == "user",
            **self._storage_devices(updated.mounts), network_taps=tuple(ep.tap for ep in updated.networks),
            tcg_tb_cache_mib=self.config.tcg_tb_cache_mib,
        )
        xml = self.host.domain_xml(spec)
        self.hv.define(xml)
        (directory / "domain.xml").write_text(xml)
        return self.state.update(record, **changes)

    def _storage_devices(self, mounts: list[Mount]) -> dict:
        """container_vm's volume disks and virtiofs shares, numbered in the order of ``mounts``
        (the numbering kvmc.mounts.agent_mount_items gives the agent)."""
        volumes = [m for m in mounts if m.is_disk]
        binds = [m for m in mounts if m.share_source]
        return {
            "volume_disks": tuple((Path(self.host.volumes.get(m.source).path), m.readonly) for m in volumes),
            "shares": tuple(ShareSpec(Path(m.share_source), share_tag(i), m.readonly)
                            for i, m in enumerate(binds, start=1)),
        }

    # ------------------------------------------------ host resources in use
    def _live_records(self, exclude: str | None = None) -> Iterator[ContainerRecord]:
        for record in self.state.list():
            if record.id != exclude and record.is_live:
                record = self.observe(record)
                if record.is_live:
                    yield record

    def published_ports(self, exclude: str | None = None) -> dict[tuple[str, int, str], str]:
        """(host ip, port, protocol) -> name, for every port a running container publishes."""
        return {(p.host_ip, p.host_port, p.protocol): r.name for r in self._live_records(exclude) for p in r.ports}

    def volume_users(self, name: str, running_only: bool = False) -> list[str]:
        """Names of the containers that mount volume ``name`` (that run, with ``running_only``)."""
        records = self._live_records() if running_only else self.state.list()
        return [r.name for r in records if name in r.volume_names]

    def check_volume_free(self, name: str, exclude: str | None = None) -> None:
        """ext4 on a block device has one writer at a time: refuse a second running user
        (a kvmc-dir volume has no such limit)."""
        if self.host.volumes.get(name).shared_dir:
            return
        users = [u for u in self.volume_users(name, running_only=True) if exclude is None or u != exclude]
        if users:
            raise VolumeInUse(f"volume {name} is in use by running container {users[0]}: "
                              "a kvmc volume is an ext4 disk and can be mounted by one running container at a time")

    def check_host_resources(self, record: ContainerRecord) -> None:
        """Before a VM starts: its host ports are free and its volumes are not mounted elsewhere.
        (Every running container's record is read for the ports: only when there are some.)"""
        if record.ports:
            allocate_ports(record.ports, self.published_ports(exclude=record.id))
        for volume in record.volume_names:
            self.volumes.get(volume)  # removed meanwhile: say so rather than fail in QEMU
            self.check_volume_free(volume, exclude=record.name)

    # ------------------------------------------------------------------ start
    def start(self, record: ContainerRecord, *, wait_attach: bool = False,
              discard_on_failure: bool = False) -> MonitorProcess:
        """Hand the container to a new monitor process (which boots it and outlives the caller).

        The record is reset before the monitor is spawned and never written here afterwards:
        from then on the monitor is its only writer.
        """
        with self.state.locked(record.id):  # two concurrent starts must not spawn two monitors
            current = self.repair(self.state.load(record.id) or record)
            if current.is_live:
                raise ContainerRunning(f"container {record.name} is already running")
            self.wait_powered_off(current)
            self.check_host_resources(current)
            resumed = self._resume_claimed(current)
            # A start by hand: the restart policy starts over (docker resets RestartCount) and
            # an unless-stopped container is no longer "stopped by a user".
            self.state.update(record, state=State.STARTING, started_at=None, finished_at=None, exit_code=None,
                              error=None, monitor_pid=None, restart_count=0, manually_stopped=False, **resumed)
            try:
                return spawn_monitor(self.host, record.id, Path(record.control_socket),
                                     self.state.container_dir(record.id) / "monitor.log",
                                     wait_attach=wait_attach, discard_on_failure=discard_on_failure)
            except BaseException:
                if resumed.get("vm_resumed"):  # paused again: the next start resumes it as before
                    self._pause_unclaimed(record)
                raise

    def _resume_claimed(self, record: ContainerRecord) -> dict[str, bool]:
        """Resume a claimed hot member's paused VM here, before its monitor exists, and say so
        in the record the monitor reads (the changes to record).

        Why here and not in the monitor: the caller's libvirt connection is open already (the
        claim used it), where a new monitor would first open its own (~17 ms) and then resume
        (~8 ms) before it hands the agent the process; here both leave the run's path, and the
        guest's first moments after the resume overlap the monitor's start. The guest waits
        idle for its process: its clock and RNG are set by the process's RUN, as before. A VM
        that cannot be resumed is destroyed: the monitor restores the save file or boots cold."""
        if not record.resume_paused:
            return {}
        return {"resume_paused": False, "vm_resumed": self.life.resume_hot(record)}

    def _pause_unclaimed(self, record: ContainerRecord) -> None:
        """Undo :meth:`_resume_claimed` when no monitor could be started (destroyed if it cannot
        pause: the next start restores or boots cold)."""
        try:
            self.hv.pause(record.domain)
            self.state.update(record, resume_paused=True, vm_resumed=False)
        except KvmcError:
            self.hv.destroy(record.domain)
            self.state.update(record, vm_resumed=False)

    def wait_powered_off(self, record: ContainerRecord) -> None:
        """An exited container's monitor may still be waiting for its guest to power off (see
        Monitor._finish): its VM can be started again only once it is off."""
        if record.state != State.EXITED:
            return
        deadline = time.monotonic() + SHUTOFF_WAIT_S + 5
        while is_monitor(record.monitor_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if is_monitor(record.monitor_pid):
            raise KvmcError(f"container {record.name} is still shutting down: see "
                            f"{self.state.container_dir(record.id) / 'monitor.log'}")
        if self.hv.state(record.domain) in ACTIVE_VM_STATES:  # its monitor was killed meanwhile
            self.hv.destroy(record.domain)

    def _end_monitor(self, record: ContainerRecord) -> None:
        """Kill the container's monitor, if one still lives (a running container's, for rm -f,
        or an exited one's that waits for its guest's power-off)."""
        if record.monitor_pid and record.monitor_pid != os.getpid() and is_monitor(record.monitor_pid):
            os.kill(record.monitor_pid, signal.SIGKILL)

    def wait_started(self, record: ContainerRecord, monitor: MonitorProcess | None = None) -> ContainerRecord:
        """Wait until a detached start's process runs (or failed); raise on failure."""
        deadline = time.monotonic() + self.config.boot_timeout_s + 10
        with self.state.watch(record.id) as changed:  # woken by the monitor's writes
            while time.monotonic() < deadline:
                current = self.state.load(record.id)
                if current is None:  # removed already: its tombstone says whether it ran
                    ended = self.state.tombstone(record.id)
                    if ended is not None and not ended[1]:
                        return record  # it ran and ended before we looked (an --rm container)
                    if ended is not None:  # removed on failure (run -d, --rm)
                        raise_for(ProcessResult(exit_code=ended[0] if ended[0] in (126, 127) else 125, error=ended[1]))
                    raise KvmcError(f"container {record.name} failed to start and was removed")
                if current.started_at or current.state in (State.EXITED, State.RESTARTING):
                    break
                if monitor is not None and monitor.poll() is not None:
                    raise KvmcError(f"the monitor of container {record.name} died: see "
                                    f"{self.state.container_dir(record.id) / 'monitor.log'}")
                changed(0.05)
            else:
                raise KvmcError(f"container {record.name} did not start within {self.config.boot_timeout_s:.0f}s")
        if current.state == State.EXITED and current.error:
            raise_for(ProcessResult(exit_code=current.exit_code or 125, error=current.error))  # 125/126/127
        return current

    # ----------------------------------------------------------------- attach
    def connect_monitor(self, record: ContainerRecord) -> AgentConnection:
        """A connection to the container's monitor (its control socket)."""
        try:
            return AgentConnection.connect(record.control_socket, timeout=self.config.boot_timeout_s)
        except (OSError, GuestError) as exc:
            raise KvmcError(f"cannot reach the monitor of container {record.name}: {exc}") from exc

    @staticmethod
    def _forwarding(signals: SignalForwarder | None, conn: AgentConnection, proc_id: int,
                    record: ContainerRecord) -> tuple[AbstractContextManager, SignalWatch | None]:
        """The caller's signals forwarded to process ``proc_id`` while it is attached, and the
        watch that lets the caller give up waiting (a second Ctrl-C; see SignalWatch)."""
        if signals is None:
            return nullcontext(), None

        def send(signum: int) -> None:
            try:
                conn.signal(proc_id, signum)
            except OSError:
                pass

        def give_up(signum: int) -> GaveUpWaiting:
            what = "its process" if proc_id == MAIN_PROCESS_ID else f"exec'd process {proc_id}"
            return GaveUpWaiting(
                f"gave up waiting for container {record.name} after {signal.Signals(signum).name}: {what} may "
                f"still be running (see 'kvmc ps'; 'kvmc stop {record.name}' or 'kvmc rm -f {record.name}' ends it)",
                signum)

        watch = SignalWatch(send, give_up)
        return signals(watch), watch

    @staticmethod
    def _terminal(console: Console | None, conn: AgentConnection, proc_id: int,
                  raw: bool) -> AbstractContextManager:
        """The caller's terminal while a TTY process is attached: its size follows the
        caller's (RESIZE on the attach's own connection), raw mode when stdin is attached."""
        if console is None:
            return nullcontext()

        def resize(rows: int, cols: int) -> None:
            try:
                conn.resize(proc_id, rows, cols)
            except OSError:
                pass

        return console.session(resize, raw)

    def attach(self, record: ContainerRecord, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
               signals: SignalForwarder | None = None, console: Console | None = None,
               detach_keys: str | None = None) -> int | None:
        """Relay process 1's stdio through the monitor until the container ends; its exit code,
        or None when the caller detached (detach keys, or the end of a TTY attach's stdin) and
        the container goes on.

        docker's rules: stdin is relayed only to a container with stdin open (``-i``); its EOF
        closes the container's stdin if StdinOnce (``run -i`` in the foreground), and ends a
        TTY attach. Detach keys apply to TTY attaches with stdin.
        """
        tty = record.tty
        if not (record.open_stdin or record.process.stdin):
            stdin = None
        keys = parse_detach_keys(detach_keys) if tty and stdin is not None else None
        conn = self.connect_monitor(record)
        with conn:
            try:
                conn.send(FrameType.ATTACH, MAIN_PROCESS_ID, b"stdin=1" if stdin is not None else b"")
                forwarding, watch = self._forwarding(None if tty else signals, conn, MAIN_PROCESS_ID, record)
                with forwarding, self._terminal(console if tty else None, conn, MAIN_PROCESS_ID,
                                                raw=stdin is not None):
                    result = attach_process(conn, MAIN_PROCESS_ID, stdin=stdin, stdout=stdout, stderr=stderr,
                                            close_stdin_at_eof=record.stdin_once and not tty,
                                            detach_keys=keys, end_at_stdin_eof=tty, watch=watch)
            except (GuestError, OSError) as exc:
                ended = self.state.load(record.id)
                if ended is not None and ended.state == State.EXITED and ended.error:
                    raise KvmcError(ended.error) from exc  # it failed before we could hear it
                raise KvmcError(f"lost the monitor of container {record.name}: {exc}") from exc
            if result.detached:
                return None
            # The monitor closes the connection once the exit is recorded (and --rm done).
            try:
                while conn.read_frame(SHUTOFF_WAIT_S + 5) is not None:
                    pass
            except (GuestError, OSError):
                pass
        return raise_for(result)

    def resize(self, ref: str, rows: int, cols: int, proc_id: int = MAIN_PROCESS_ID) -> ContainerRecord:
        """Set the window size of the terminal of a running container's process (1: its main
        process, else an exec's): the API's resize endpoints. The CLI resizes on its attach's
        own connection (:meth:`_terminal`); both end in the agent's RESIZE."""
        record = self.require_running(ref)
        if rows <= 0 or cols <= 0:
            return record  # docker's clients send 0x0 when they do not know: nothing to do
        try:
            with self.connect_monitor(record) as conn:
                conn.resize(proc_id, rows, cols)
        except (OSError, KvmcError) as exc:
            raise ContainerNotRunning(f"container {record.name} is not running") from exc
        return record

    # -------------------------------------------------------------------- run
    def run(self, opts: RunOptions, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
            signals: SignalForwarder | None = None, console: Console | None = None,
            detach_keys: str | None = None,
            created: Callable[[ContainerRecord], None] | None = None) -> tuple[ContainerRecord, int | None]:
        """docker run: the record and, in the foreground, the command's exit code (raises
        KvmcError for 125/126/127). Detached (``-d``, or detach keys later): code None.
        ``created`` is told the record before the start (docker's --cidfile)."""
        record = self.create(opts)
        if created is not None:
            try:
                created(record)
            except BaseException:
                self.life.discard(record)
                raise
        try:
            monitor = self.start(record, wait_attach=not opts.detach, discard_on_failure=True)
        except BaseException:
            self.life.discard(record)
            raise
        if opts.detach:
            return self.wait_started(record, monitor), None
        return record, self.attach(record, stdin if opts.process.interactive else None, stdout, stderr, signals,
                                   console, detach_keys)

    # ------------------------------------------------------------------- exec
    def exec(self, ref: str, opts: ProcessOptions, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
             signals: SignalForwarder | None = None, host_env: Mapping[str, str] | None = None, *,
             console: Console | None = None, detach_keys: str | None = None, winsize: tuple[int, int] | None = None,
             proc_id: int | None = None, privileged: bool = False, detach: bool = False) -> int | None:
        """docker exec: a second process in the running VM, with its own stdio and exit code
        (None if the caller detached from a TTY exec, which goes on). ``winsize``: the TTY's
        size at start when there is no ``console`` to ask (the API's ConsoleSize). It gets the
        container's ulimits and dropped capabilities (all of them if ``privileged``).
        ``detach``: return 0 once it runs (its output is dropped, as docker's exec -d)."""
        record = self.require_running(ref)
        proc = record.process
        env = merge_env(proc.env, opts.env, host_env or {})
        if opts.tty:
            env = terminal_env(env, host_env or {})
            winsize = (console.size() if console is not None else None) or winsize
        spec = ProcessSpec(
            args=opts.command, env=env, cwd=opts.workdir or proc.cwd, user=opts.user or proc.user,
            stdin=opts.interactive, tty=opts.tty, winsize=winsize, **process_limits(record, privileged),
        )
        # Random, so that a guest cannot guess which id to forge an EXIT for (ProcessTable); below
        # the ids of the monitor's health probes.
        proc_id = proc_id or 2 + secrets.randbelow(EXEC_ID_MAX - 1)
        stdin = stdin if opts.interactive else None
        keys = parse_detach_keys(detach_keys) if opts.tty and stdin is not None else None
        conn = self.connect_monitor(record)
        with conn:
            if detach:
                return self._exec_detached(record, conn, proc_id, spec)
            forwarding, watch = self._forwarding(None if opts.tty else signals, conn, proc_id, record)
            with forwarding, self._terminal(console if opts.tty else None, conn, proc_id, raw=stdin is not None):
                try:
                    conn.run(proc_id, spec)
                    result = attach_process(conn, proc_id, stdin=stdin, stdout=stdout, stderr=stderr,
                                            detach_keys=keys, end_at_stdin_eof=opts.tty, watch=watch)
                except (GuestError, OSError) as exc:
                    raise KvmcError(f"container {record.name} ended during exec: {exc}") from exc
        return None if result.detached else raise_for(result)

    def _exec_detached(self, record: ContainerRecord, conn: AgentConnection, proc_id: int, spec: ProcessSpec) -> int:
        """Start an exec and leave it running: 0 once the agent reports it STARTED, docker's
        126/127 if it could not be (the monitor drops its output when this client is gone)."""
        spec.stdin = False
        error = None
        try:
            conn.run(proc_id, spec)
            while (frame := conn.read_frame(self.config.boot_timeout_s)) is not None:
                if frame.proc_id != proc_id:
                    continue
                if frame.type == FrameType.STARTED:
                    return 0
                if frame.type == FrameType.ERROR:
                    error = frame.payload.decode(errors="replace")
                if frame.type == FrameType.EXIT:
                    return raise_for(ProcessResult(exit_code=parse_exit(frame.payload)[0], error=error))
        except (GuestError, OSError) as exc:
            raise KvmcError(f"container {record.name} ended during exec: {exc}") from exc
        raise KvmcError(f"exec in container {record.name} did not start")

    def require_running(self, ref: str) -> ContainerRecord:
        """The container ``ref`` names, which must be running (exec, attach, kill); a running
        one whose monitor died gets a new one first."""
        record = self.repair(self.state.resolve(ref))
        if record.state != State.RUNNING or not record.started_at:
            raise ContainerNotRunning(f"container {record.name} is not running")
        return record

    # ------------------------------------------------------------ pause, stats
    def pause(self, ref: str) -> ContainerRecord:
        """Freeze the container's VM (its vCPUs stop; memory and devices stay)."""
        record = self.require_running(ref)
        if self.hv.state(record.domain) == "paused":
            raise Conflict(f"container {record.name} is already paused")
        self.hv.pause(record.domain)
        return record

    def unpause(self, ref: str) -> ContainerRecord:
        record = self.require_running(ref)
        if self.hv.state(record.domain) != "paused":
            raise Conflict(f"container {record.name} is not paused")
        self.hv.resume(record.domain)
        return record

    def is_paused(self, record: ContainerRecord) -> bool:
        return record.state == State.RUNNING and self.hv.state(record.domain) == "paused"

    def stats(self, ref: str) -> tuple[ContainerRecord, dict[str, Any]]:
        """The VM's CPU time, memory and disk traffic (Hypervisor.stats), and under ``networks``
        each kvmc network NIC's traffic by its guest interface name (eth1, ...). The user-mode
        NIC (eth0) is missing: slirp has no host device whose counters could be read."""
        record = self.require_running(ref)
        sample: dict[str, Any] = dict(self.hv.stats(record.domain))
        networks = {guest_ifname(index): self.life.netns.nic_counters(endpoint.network_id, endpoint.tap)
                    for index, endpoint in enumerate(record.networks) if endpoint.tap}
        sample["networks"] = {name: counters for name, counters in networks.items() if counters}
        return record, sample

    # ------------------------------------------------------------- stop, kill
    def kill(self, ref: str, signum: int = signal.SIGKILL) -> ContainerRecord:
        """Send a signal to the container's main process."""
        record = self.repair(self.state.resolve(ref))
        if record.state not in (State.RUNNING, State.RESTARTING):  # restarting: the kill ends the restarts
            raise ContainerNotRunning(f"container {record.name} is not running")
        try:
            with self.connect_monitor(record) as conn:
                conn.signal(MAIN_PROCESS_ID, signum)
        except (OSError, KvmcError) as exc:  # the monitor closed between connect and send: it just ended
            raise ContainerNotRunning(f"container {record.name} is not running") from exc
        return record

    def stop(self, ref: str, timeout_s: int | None = None, signum: int | None = None) -> tuple[ContainerRecord, bool]:
        """The stop signal (SIGTERM, or the container's --stop-signal; ``signum`` if given), SIGKILL
        after the timeout, then the VM powers off. Returns the record and whether it was running
        (docker answers 304 when not)."""
        record = self.repair(self.state.resolve(ref))
        timeout = record.stop_timeout if timeout_s is None and record.stop_timeout is not None else timeout_s
        timeout = self.config.stop_timeout_s if timeout is None else timeout
        forever = timeout < 0  # docker's -1: no SIGKILL, wait as long as it takes
        was_running = record.is_live
        if was_running:
            try:
                with self.connect_monitor(record) as conn:
                    if signum is None:
                        conn.shutdown(0xFFFFFFFF if forever else timeout)
                    else:  # the monitor signals and, after the timeout, has the agent kill all
                        conn.send(FrameType.STOP, 0, struct.pack(">II", 0xFFFFFFFF if forever else timeout, signum))
            except (KvmcError, OSError):
                pass  # monitor gone: destroy below
            if not self.wait_exited(record, None if forever else timeout + SHUTOFF_WAIT_S):
                self.hv.destroy(record.domain)
                self.wait_exited(record, 10)
        return self.repair(self.state.load(record.id) or record), was_running

    def wait_exited(self, record: ContainerRecord, timeout: float | None = None) -> bool:
        """Wait until the container is no longer live (or removed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.state.watch(record.id) as changed:
            while deadline is None or time.monotonic() < deadline:
                current = self.state.load(record.id)
                if current is None or not self.observe(current).is_live:
                    return True
                changed(0.1)
        return False

    # ---------------------------------------------------- observe and repair
    def _monitor_lost(self, record: ContainerRecord) -> bool:
        # "starting" without a monitor pid: start() has reset the record and is spawning the
        # monitor, which records its own pid first thing. Not dead, just not yet born.
        spawning = record.state == State.STARTING and record.monitor_pid is None
        return record.is_live and not spawning and not pid_alive(record.monitor_pid)

    def _outlives_monitor(self, record: ContainerRecord) -> bool:
        """A container whose monitor died while its process ran in a VM that still runs: a new
        monitor re-attaches (repair), the container goes on."""
        return (record.state == State.RUNNING and bool(record.started_at)
                and self.hv.state(record.domain) in ACTIVE_VM_STATES)

    def observe(self, record: ContainerRecord) -> ContainerRecord:
        """What the record would say once repaired, without writing it or changing libvirt:
        for ``ps``, ``inspect``, ``logs`` and every API GET."""
        if not self._monitor_lost(record):
            return record
        if self._outlives_monitor(record):
            return dataclasses.replace(record, monitor_pid=None)  # running; the next command re-attaches
        # Between the runs of a restart policy the record holds the last run's exit, which is
        # how it ended; a running container whose monitor died was killed with its VM (137).
        between_runs = record.state == State.RESTARTING and record.exit_code is not None
        return dataclasses.replace(  # finished_at: the time the monitor died is not known
            record, state=State.EXITED, finished_at=record.finished_at or record.started_at or record.created,
            exit_code=record.exit_code if between_runs else 137,
            error=(record.error if between_runs else None) or MONITOR_DIED, monitor_pid=None)

    def repair(self, record: ContainerRecord) -> ContainerRecord:
        """Make the record and libvirt tell the truth: a running container whose monitor is
        gone gets a new one that re-attaches to its VM; a VM that cannot be re-attached (its
        process had not started, or it is between two runs) is destroyed and recorded exited;
        a stopped container whose domain vanished is defined again."""
        if self._monitor_lost(record) and self._outlives_monitor(record):
            return self._reattach(record)
        try:
            if self._monitor_lost(record):
                if self.hv.state(record.domain) in ACTIVE_VM_STATES:
                    self.hv.destroy(record.domain)  # unmonitored: its output and exit are lost anyway
                repaired = self.observe(record)
                self.state.update(record, state=repaired.state, finished_at=repaired.finished_at,
                                  exit_code=repaired.exit_code, error=repaired.error, monitor_pid=None)
                self.life.leave_networks(record)  # its monitor never did
            elif record.state in (State.CREATED, State.EXITED) and self.hv.state(record.domain) is None:
                # The domain vanished from libvirt: define it again. Not while rm takes the container
                # apart (it undefines the domain, then deletes the record, under this lock).
                with self.state.locked(record.id, REATTACH_LOCK):
                    xml = self.state.container_dir(record.id) / "domain.xml"
                    if self.state.load(record.id) is not None and xml.exists() and self.hv.state(record.domain) is None:
                        self.hv.define(xml.read_text())
        except FileNotFoundError:
            pass  # removed meanwhile: nothing to repair
        return record

    def reattach_lost(self) -> list[ContainerRecord]:
        """Give every running container whose monitor died a new one (``kvmc serve`` does this
        every few seconds, so an API client need not touch the container first)."""
        found = []
        for record in self.state.list():
            if self._monitor_lost(record) and self._outlives_monitor(record):
                found.append(self._reattach(record))
        return found

    def _reattach(self, record: ContainerRecord) -> ContainerRecord:
        """Spawn a monitor that takes over the running VM (Monitor._take_over) and wait until it
        has recorded itself. One at a time per container: concurrent commands find the first
        one's monitor. Not start()'s lock: start() repairs while holding it."""
        with self.state.locked(record.id, REATTACH_LOCK, missing_ok=True):
            current = self.state.load(record.id)
            if current is None or not self._monitor_lost(current) or not self._outlives_monitor(current):
                return self.observe(current) if current is not None else record
            monitor = spawn_monitor(self.host, record.id, Path(record.control_socket),
                                    self.state.container_dir(record.id) / "monitor.log",
                                    wait_attach=False, discard_on_failure=False, reattach=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                current = self.state.load(record.id)
                if current is None or current.monitor_pid == monitor.pid or monitor.poll() is not None:
                    return current or record
                time.sleep(0.02)
        raise KvmcError(f"container {record.name}: a new monitor did not take over within 10 s: see "
                        f"{self.state.container_dir(record.id) / 'monitor.log'}")

    # ----------------------------------------------------------------- remove
    def remove(self, ref: str, force: bool = False) -> ContainerRecord:
        """Remove a container (``force``: a running one too) and everything it owns."""
        record = self.observe(self.state.resolve(ref))
        if record.is_live and not force:
            raise ContainerRunning(f"container {record.name} is running: stop it first or use rm -f")
        self._take_apart(record)
        return record

    def _take_apart(self, record: ContainerRecord) -> None:
        """End the container's monitor and discard its VM and files, holding the lock a repair
        or a re-attach takes: neither defines the domain again nor spawns a monitor meanwhile."""
        with self.state.locked(record.id, REATTACH_LOCK, missing_ok=True):
            self._end_monitor(record)
            self.life.discard(record)

    def orphan_domains(self) -> list[str]:
        """kvmc domains of this state root that no container record owns (e.g. after a crash)."""
        known = {r.domain for r in self.state.list()} | Pool(self.host).domains()
        orphans = []
        for name in self.hv.domain_names(DOMAIN_PREFIX):
            if name in known or self.life.being_reaped(name):
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

        records = [self.observe(r) for r in self.state.list()]
        used = {r.image_id for r in records}
        images = self.images.list()
        volumes = self.volumes.list()
        mounted = {v for r in records for v in r.volume_names}
        return {
            "images": {"count": len(images), "active": sum(i.id in used for i in images),
                       "bytes": sum(allocated(i.disk_path.parent) for i in images),
                       "reclaimable": sum(allocated(i.disk_path.parent) for i in images if i.id not in used)},
            "volumes": {"count": len(volumes), "active": sum(v.name in mounted for v in volumes),
                        "bytes": sum(self.volumes.usage_bytes(v) for v in volumes),
                        "reclaimable": sum(self.volumes.usage_bytes(v) for v in volumes if v.name not in mounted)},
            "containers": {"count": len(records), "running": sum(r.state == State.RUNNING for r in records),
                           "bytes": sum(allocated(self.state.container_dir(r.id)) for r in records),
                           "reclaimable": sum(allocated(self.state.container_dir(r.id))
                                              for r in records if not r.is_live)},
        }

    def start_by_policy(self) -> list[tuple[ContainerRecord, KvmcError | None]]:
        """What docker's daemon does when it starts: start again every container whose restart
        policy says so (always; unless-stopped unless a user stopped it; on-failure after a
        failure with retries left) and that is not running: its VM went down with the host, or
        with libvirtd, or its monitor was killed. ``kvmc serve`` calls this as it starts, and
        ``kvmc system boot`` for hosts without the server. Returns each start's outcome."""
        wanted = []
        for record in self.state.list():
            try:
                record = self.repair(record)  # a lost monitor: its VM destroyed, recorded exited
            except KvmcError as exc:
                wanted.append((record, exc))
                continue
            policy = record.options.restart
            if (not record.is_live and record.started_at and policy.enabled
                    and policy.should_restart(record.exit_code or 0, record.manually_stopped, record.restart_count)):
                wanted.append((record, None))
        started: list[tuple[ContainerRecord, MonitorProcess | None, KvmcError | None]] = []
        for record, error in wanted:  # all monitors first, then wait: the VMs boot side by side
            if error is not None:
                started.append((record, None, error))
                continue
            try:
                started.append((record, self.start(record), None))
            except KvmcError as exc:
                started.append((record, None, exc))
        outcome: list[tuple[ContainerRecord, KvmcError | None]] = []
        for record, monitor, error in started:
            if error is None:
                try:
                    self.wait_started(record, monitor)
                except KvmcError as exc:
                    error = exc
            outcome.append((record, error))
        return outcome

    def prune_containers(self) -> list[ContainerRecord]:
        """Remove every stopped container (docker container prune)."""
        removed = []
        for record in map(self.repair, self.state.list()):
            if not record.is_live:
                self._take_apart(record)
                removed.append(record)
        return removed

    def containers_using_image(self, image_id: str) -> list[str]:
        """Names of the containers whose disk backs onto this image."""
        return [r.name for r in self.state.list() if r.image_id == image_id]

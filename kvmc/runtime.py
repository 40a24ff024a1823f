"""Container lifecycle orchestration: the one layer that ties image, disk, VM and agent.

``run`` = create (record + overlay + defined domain) then start-and-attach (boot, send the
process, relay stdio, record the exit). Whatever a step creates is undone if a later step
fails, so a failed ``run`` leaves no domain, disk, socket or name behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from kvmc.accel import AccelChoice, choose_accel
from kvmc.agent import AgentConnection, ProcessResult, ProcessSpec, attach_process
from kvmc.config import Config
from kvmc.disks import create_overlay
from kvmc.domain import DOMAIN_PREFIX, ChannelSpec, DiskSpec, VMSpec, host_tsc_khz, render_domain_xml
from kvmc.errors import CommandNotFound, CommandNotInvokable, GuestError, ImageError, KvmcError
from kvmc.guest import GuestArtefacts, load_guest
from kvmc.hypervisor import Hypervisor
from kvmc.images import ImageStore
from kvmc.process import ProcessOptions, build_process
from kvmc.state import ContainerRecord, StateStore, now_iso

MAIN_PROCESS = 1
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
SHUTOFF_WAIT_S = 15.0
HOST_ARCH = "amd64"


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


class JsonLogWriter:
    """Docker json-file style log: one JSON object per chunk, with stream and time."""

    def __init__(self, path: Path, stream: str) -> None:
        self.path, self.stream = path, stream

    def write(self, data: bytes) -> int:
        line = json.dumps({"stream": self.stream, "time": now_iso(), "log": data.decode(errors="replace")})
        with self.path.open("a") as f:
            f.write(line + "\n")
        return len(data)

    def flush(self) -> None:
        """Each write is already on disk."""


class Runtime:
    """Creates, runs and removes containers; every other layer is reached through here."""

    def __init__(self, config: Config, notice: Callable[[str], None] | None = None, verbose: bool = False) -> None:
        self.config = config
        self.notice = notice or (lambda msg: print(f"kvmc: {msg}", file=sys.stderr))
        self.verbose = verbose
        self.hv = Hypervisor(config.libvirt_uri)
        self.images = ImageStore(config.images_dir)
        self.state = StateStore(config.containers_dir)

    def _say(self, message: str) -> None:
        if self.verbose:
            self.notice(message)

    def guest(self) -> GuestArtefacts:
        return load_guest(self.config.guest_artefacts_dir)

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
        guest = self.guest()
        accel = self.accel(opts.accel)
        self._say(f"accelerator: {accel.accel} ({accel.reason})")
        container_id, name, directory = self.state.allocate(opts.name)
        process["hostname"] = process["hostname"] or container_id[:12]
        self.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        record = ContainerRecord(
            id=container_id, name=name, image=opts.image, image_id=image.id,
            domain=f"{DOMAIN_PREFIX}{container_id[:16]}", accel=accel.accel,
            memory_mib=opts.memory_mib or self.config.memory_mib, cpus=opts.cpus or self.config.cpus,
            process=process, auto_remove=opts.auto_remove, detached=opts.detach,
            agent_socket=str(self.config.run_dir / f"{container_id[:16]}.agent.sock"),
        )
        try:
            self.state.save(record)
            overlay = create_overlay(image.disk_path, directory / "rootfs.qcow2")
            spec = VMSpec(
                name=record.domain, uuid=str(uuid.uuid4()), container_id=container_id, container_name=name,
                domain_type=accel.domain_type, memory_mib=record.memory_mib, vcpus=record.cpus,
                kernel=guest.kernel, initrd=guest.initramfs, console_log=directory / "console.log",
                disks=[DiskSpec(path=overlay, target="vda", backing_path=image.disk_path)],
                channels=[ChannelSpec(socket=Path(record.agent_socket))], tsc_khz=host_tsc_khz(),
            )
            xml = render_domain_xml(spec, self.config.templates_dir)
            (directory / "domain.xml").write_text(xml)
            self.hv.define(xml)
        except BaseException:
            self._discard(record)
            raise
        return record

    def _discard(self, record: ContainerRecord) -> None:
        """Remove everything a container owns: domain, directory (disk, socket, logs), name."""
        try:
            self.hv.undefine(record.domain)
        finally:
            self.state.remove(record)

    # ------------------------------------------------------------------ start
    def _boot_failure(self, record: ContainerRecord, what: str) -> GuestError:
        console = self.state.container_dir(record.id) / "console.log"
        tail = ""
        if console.exists():
            lines = [ln for ln in console.read_text(errors="replace").splitlines() if ln.strip()]
            tail = "\n".join(lines[-8:])
        return GuestError(f"{what}; last lines of the VM console:\n{tail or '(empty)'}")

    def _boot_and_send(self, record: ContainerRecord) -> AgentConnection:
        """Start the domain, connect to its agent and hand it the main process."""
        started = time.monotonic()
        self.hv.start(record.domain)
        self.state.update(record, state="running")
        conn = AgentConnection.connect(record.agent_socket, timeout=self.config.boot_timeout_s)
        proc = record.process
        conn.run(MAIN_PROCESS, ProcessSpec(
            args=proc["args"], env=proc["env"], cwd=proc["cwd"], user=proc["user"],
            hostname=proc["hostname"], stdin=proc["stdin"], time_ns=time.time_ns(),
        ))
        try:
            conn.wait_ready(self.config.boot_timeout_s)
        except (GuestError, OSError) as exc:
            conn.close()
            state = self.hv.state(record.domain)
            raise self._boot_failure(record, f"the VM did not come up ({state or 'gone'}): {exc}") from exc
        self.state.update(record, started_at=now_iso())
        self._say(f"agent ready {time.monotonic() - started:.2f}s after start (guest uptime {conn.ready_uptime_ms} ms)")
        return conn

    @contextmanager
    def _forward_signals(self, conn: AgentConnection) -> Iterator[None]:
        previous = {}

        def forward(signum: int, _frame: object) -> None:
            try:
                conn.signal(MAIN_PROCESS, signum)
            except OSError:
                pass

        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start_attached(
        self, record: ContainerRecord, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
        forward_signals: bool = True,
    ) -> ProcessResult:
        """Boot, run the main process with stdio relayed, record how it ended."""
        try:
            conn = self._boot_and_send(record)
            with conn:
                if forward_signals:
                    with self._forward_signals(conn):
                        result = attach_process(conn, MAIN_PROCESS, stdin=stdin, stdout=stdout, stderr=stderr)
                else:
                    result = attach_process(conn, MAIN_PROCESS, stdin=stdin, stdout=stdout, stderr=stderr)
        except (KvmcError, OSError) as exc:
            self.hv.destroy(record.domain)
            message = exc.message if isinstance(exc, KvmcError) else str(exc)
            self.state.update(record, state="exited", finished_at=now_iso(), exit_code=125, error=message)
            raise
        if record.auto_remove:
            # The overlay is about to be deleted, so there is nothing for the guest's final
            # sync to save: skip its power-off (~1.2 s under TCG) and destroy the VM now.
            self.hv.destroy(record.domain)
        elif not self.hv.wait_stopped(record.domain, SHUTOFF_WAIT_S):
            self.hv.destroy(record.domain)
        self.state.update(
            record, state="exited", finished_at=now_iso(), exit_code=result.exit_code,
            error=result.error, guest_uptime_ms=result.started_uptime_ms,
        )
        self._say(f"process started at guest uptime {result.started_uptime_ms} ms; exit code {result.exit_code}")
        return result

    # -------------------------------------------------------------------- run
    def run(self, opts: RunOptions, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO) -> int:
        """docker run: the command's exit code, or raise KvmcError (125/126/127)."""
        record = self.create(opts)
        if opts.detach:
            return self._start_detached(record, stdout)
        try:
            result = self.start_attached(record, stdin if opts.process.interactive else None, stdout, stderr)
        except BaseException:
            self._discard(record)
            raise
        finally:
            if opts.auto_remove:
                self._discard(record)
        if result.error:
            err = {127: CommandNotFound, 126: CommandNotInvokable}.get(result.exit_code, KvmcError)
            raise err(result.error)
        return result.exit_code

    def _start_detached(self, record: ContainerRecord, stdout: BinaryIO) -> int:
        """Hand the container to a monitor process that outlives this CLI; print its id."""
        directory = self.state.container_dir(record.id)
        monitor = subprocess.Popen(
            [sys.executable, "-m", "kvmc.monitor", record.id],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(directory / "monitor.log").open("ab"), start_new_session=True,
        )
        self.state.update(record, monitor_pid=monitor.pid)
        deadline = time.monotonic() + self.config.boot_timeout_s + 5
        while time.monotonic() < deadline:
            current = self.state.load(record.id)
            if current is None or current.state == "exited" or current.started_at or monitor.poll() is not None:
                break
            time.sleep(0.05)
        current = self.state.load(record.id)
        if current is not None and current.state == "exited" and current.exit_code == 125:
            self._discard(current)
            raise KvmcError(current.error or "the container failed to start")
        stdout.write(f"{record.id}\n".encode())
        stdout.flush()
        return 0

    def monitor(self, container_id: str) -> None:
        """Body of the detached monitor: relay output to the container's log until exit."""
        record = self.state.load(container_id)
        if record is None:
            return
        directory = self.state.container_dir(container_id)
        log = directory / "container.log"
        out, err = JsonLogWriter(log, "stdout"), JsonLogWriter(log, "stderr")

        try:
            self.start_attached(record, None, out, err, forward_signals=False)  # type: ignore[arg-type]
        except KvmcError:
            pass  # recorded in the record by start_attached
        finally:
            current = self.state.load(container_id)
            if current is not None and current.auto_remove:
                self._discard(current)

    # ------------------------------------------------------------------ misc
    def remove(self, ref: str, force: bool = False) -> ContainerRecord:
        record = self.state.resolve(ref)
        running = self.hv.state(record.domain) in ("running", "paused", "blocked")
        if running and not force:
            raise KvmcError(f"container {record.name} is running: stop it first or use rm -f")
        self._discard(record)
        return record

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
        record = self.state.resolve(ref)
        data = asdict(record)
        data["vm_state"] = self.hv.state(record.domain)
        return data

"""The per-container monitor: owns the agent connection for the container's whole life.

Why a process of its own (conmon's job for podman, containerd-shim's for docker): the guest
agent's output blocks while no host client reads it, QEMU's chardev takes one client at a
time, and the container must be recorded correctly even when the CLI that started it is
killed with -9. So every start spawns a monitor that boots the VM, hands the agent process 1,
writes its output to the container's log, serves a control socket (docs/agent-protocol.md,
"The monitor's control socket") for attach, exec, stop and kill, records how the container
ended, and removes it if asked to (``--rm``, or a failed ``run``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvmc.agent import (
    CLIENT_TO_MONITOR,
    MAIN_PROCESS_ID,
    AgentConnection,
    Frame,
    FrameReader,
    FrameType,
    ProcessResult,
    ProcessTable,
    guest_text,
    labelled,
    encode_exit,
    encode_frame,
    parse_exit,
    parse_started,
)
from kvmc.config import load_config
from kvmc.context import HostContext
from kvmc.errors import AgentProtocolError, DiskFull, KvmcError
from kvmc.logs import LOG_FILE, LogOptions, LogWriter, log_options, resolve_log_opts
from kvmc.space import free_bytes, mount_point, resume_threshold, to_disk_full
from kvmc.state import ContainerRecord, State, now_iso
from kvmc.vmlife import VMLife

ATTACH_WAIT_S = 30.0
DISK_CHECK_S = 2.0
"""How often the monitor asks libvirt whether QEMU paused the VM on a full disk."""
SHUTOFF_WAIT_S = 15.0
"""How long a guest may take to power off after its process ended before it is destroyed."""
_RELAYED_TO_ATTACHED = {FrameType.STARTED, FrameType.STDOUT, FrameType.STDERR, FrameType.ERROR, FrameType.EXIT}


@dataclass(eq=False)
class Client:
    """One connection on the control socket."""

    sock: socket.socket
    stdin: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, frame_type: FrameType, proc_id: int, payload: bytes = b"") -> bool:
        try:
            with self.lock:
                self.sock.sendall(encode_frame(frame_type, proc_id, payload))
            return True
        except OSError:
            return False


def open_log(host: HostContext, record: ContainerRecord) -> LogWriter:
    """The container's json-file log, capped as its record says (the configured defaults for
    records from before caps, or whose options no longer parse)."""
    config = host.config
    try:
        opts = log_options(record.log_opts or resolve_log_opts(None, config.log_max_size, config.log_max_file))
    except KvmcError:
        opts = LogOptions()
    return LogWriter(host.state.container_dir(record.id) / LOG_FILE, opts)


class Monitor:
    """Boot one container's VM, relay its agent, record its end. Runs in its own process."""

    def __init__(self, life: VMLife, record: ContainerRecord, wait_attach: bool, discard_on_failure: bool) -> None:
        self.life = life
        self.host = life.host
        self.record = record
        self.wait_attach = wait_attach
        self.discard_on_failure = discard_on_failure
        self.conn: AgentConnection | None = None
        self.conn_ready = threading.Event()
        self.first_attach = threading.Event()
        self.attached: set[Client] = set()
        self.execs: dict[int, Client] = {}
        """Which client started which exec'd process (its frames go there only)."""
        self.procs = ProcessTable()
        """Which processes the guest may speak for: every guest frame is checked against it."""
        self.lock = threading.Lock()
        self.clients: set[Client] = set()
        self.log = open_log(self.host, record)
        self.pending_exit: Frame | None = None
        self.ended = threading.Event()
        """Set once the relay has ended (the VM is being stopped): the disk watch stops."""

    # ---------------------------------------------------------------- clients
    def _broadcast(self, frame: Frame) -> None:
        with self.lock:
            targets = list(self.attached)
        for client in targets:
            if not client.send(frame.type, frame.proc_id, frame.payload):
                self._drop(client)

    def _drop(self, client: Client) -> None:
        with self.lock:
            # docker's StdinOnce: the first attached client's stdin is the process's. Never
            # for a TTY: its terminal outlives any attach (detach keys, a closed attach).
            was_stdin = client.stdin and client in self.attached and self.record.stdin_once and not self.record.tty
            self.attached.discard(client)
            self.clients.discard(client)
            for pid in [p for p, c in self.execs.items() if c is client]:
                del self.execs[pid]
        if was_stdin and self.conn is not None:
            try:
                self.conn.close_stdin(MAIN_PROCESS_ID)  # docker: stdin closes with its client
            except OSError:
                pass

    def _serve_client(self, client: Client) -> None:
        reader = FrameReader(accept=CLIENT_TO_MONITOR)
        try:
            while data := client.sock.recv(1 << 16):
                reader.feed(data)
                while (frame := reader.next_frame()) is not None:
                    self._handle_client_frame(client, frame)
        except (OSError, AgentProtocolError):
            pass
        self._drop(client)

    def _handle_client_frame(self, client: Client, frame: Frame) -> None:
        if frame.type == FrameType.ATTACH:
            with self.lock:
                client.stdin = frame.payload == b"stdin=1"
                self.attached.add(client)
            self.first_attach.set()
            return
        if frame.type == FrameType.EXIT_ACK:
            return  # the monitor acknowledges EXIT itself
        self.conn_ready.wait()
        assert self.conn is not None
        if frame.type == FrameType.RUN:
            # Registered before it is sent: the guest's first frame about it may come at once.
            taken = frame.proc_id <= MAIN_PROCESS_ID or not self.procs.requested(frame.proc_id)
            if taken:
                client.send(FrameType.ERROR, frame.proc_id, f"process id {frame.proc_id} is in use".encode())
                client.send(FrameType.EXIT, frame.proc_id, encode_exit(126))
                return
            with self.lock:
                self.execs[frame.proc_id] = client
            try:
                self.conn.send(frame.type, frame.proc_id, frame.payload, frame.flags)  # RUN_TTY kept
            except OSError:
                self.procs.forget(frame.proc_id)
                raise
            return
        elif frame.type in (FrameType.STDIN, FrameType.SIGNAL):
            with self.lock:
                allowed = frame.proc_id == MAIN_PROCESS_ID or self.execs.get(frame.proc_id) is client
            if not allowed:
                return
        # RESIZE comes from any client (the API resizes an exec on a request of its own); the
        # agent ignores it for a process without a terminal.
        self.conn.send(frame.type, frame.proc_id, frame.payload, frame.flags)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            client = Client(sock)
            with self.lock:
                self.clients.add(client)
            threading.Thread(target=self._serve_client, args=(client,), daemon=True).start()

    # ------------------------------------------------------------------ relay
    def _relay(self, conn: AgentConnection) -> ProcessResult:
        """Route agent frames until process 1 exits; GuestError if the agent goes away,
        AgentProtocolError (a GuestError) at the first frame outside the protocol: an EXIT
        for a process that does not run, a malformed payload, ... (ProcessTable.check)."""
        result = ProcessResult(exit_code=-1)
        while True:
            frame = conn.read_frame(None)
            self.procs.check(frame)
            if frame.type == FrameType.READY:
                continue
            if frame.type == FrameType.ERROR:  # the guest's words: one line, escaped, for everyone
                frame = Frame(frame.type, frame.proc_id, guest_text(frame.payload).encode(), frame.flags)
            if frame.proc_id != MAIN_PROCESS_ID:
                with self.lock:
                    owner = self.execs.get(frame.proc_id)
                    if frame.type == FrameType.EXIT:
                        self.execs.pop(frame.proc_id, None)
                if frame.type == FrameType.EXIT:
                    conn.ack_exit(frame.proc_id)
                if owner is not None and not owner.send(frame.type, frame.proc_id, frame.payload):
                    self._drop(owner)
                continue
            if frame.type in (FrameType.STDOUT, FrameType.STDERR):
                self.log.write("stdout" if frame.type == FrameType.STDOUT else "stderr", frame.payload)
            elif frame.type == FrameType.STARTED:
                _pid, result.started_uptime_ms = parse_started(frame.payload)
                # Started now, not when the VM booted: a start that fails to exec the command
                # (ERROR, then EXIT 126/127) is a failed start for wait_started and docker's API.
                self.host.state.update(self.record, started_at=now_iso())
            elif frame.type == FrameType.ERROR:
                result.error = labelled(frame.payload.decode())
                self.log.note("stderr", f"kvmc: {result.error}")
            if frame.type == FrameType.EXIT:
                result.exit_code, result.signal = parse_exit(frame.payload)
                self.log.flush()  # its last line, if it did not end with a newline
                conn.ack_exit(MAIN_PROCESS_ID)
                # Clients hear EXIT only after the record says so (see _finish).
                self.pending_exit = frame
                return result
            if frame.type in _RELAYED_TO_ATTACHED:
                self._broadcast(frame)

    # ------------------------------------------------------------- disk full
    def _disk_paths(self) -> list[Path]:
        """Where the VM's disks live: the container's directory and its volumes'."""
        paths = [self.host.state.container_dir(self.record.id)]
        for name in self.record.volume_names:
            try:
                paths.append(Path(self.host.volumes.get(name).path).parent)
            except KvmcError:
                pass
        return paths

    def _watch_disk(self) -> None:
        """A VM whose disk write found no space is paused by QEMU (werror=enospc) and shows as
        paused (kvmc ps: "Paused (disk full)"). Say so once in the monitor's log, and resume it
        once every file system its disks are on has room again (space.resume_threshold); if it
        fills up again, QEMU pauses it again. A VM paused by the user is left alone."""
        domain, noted = self.record.domain, False
        while not self.ended.wait(DISK_CHECK_S):
            try:
                if self.host.hv.state_reason(domain) != ("paused", "ioerror"):
                    noted = False
                    continue
                paths = self._disk_paths()
                short = [p for p in paths if free_bytes(p) < resume_threshold(p)]
                if not noted:
                    where = ", ".join(str(mount_point(p)) for p in short or paths)
                    say(f"QEMU paused the VM: a write to its disk found no space left on {where}; it resumes "
                        "once there is room again")
                    noted = True
                if not short:
                    self.host.hv.resume(domain)
                    say("there is room again: the VM resumed")
            except (KvmcError, OSError) as exc:
                say(f"checking the VM's disk space: {exc}")

    # ------------------------------------------------------------------- main
    def run(self, listener: socket.socket | None = None) -> int:
        """Serve ``listener`` (bound to the control socket; made here if None) until the end."""
        record = self.record
        ctl = Path(record.control_socket)
        listener = listener or listen_control(ctl)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        failure: str | None = None
        result: ProcessResult | None = None
        try:
            if self.wait_attach and not self.first_attach.wait(ATTACH_WAIT_S):
                raise KvmcError("no client attached to the container within 30 s")
            self.conn = self.life.boot(record)
            self.procs.requested(MAIN_PROCESS_ID)  # boot sent its RUN
            self.conn_ready.set()
            threading.Thread(target=self._watch_disk, daemon=True).start()
            result = self._relay(self.conn)
        except AgentProtocolError as exc:
            # The guest is not trusted: one frame outside the protocol and its VM is stopped
            # (by _finish), with the reason recorded. Nothing it sent is relayed any more.
            failure = f"kvmc stopped the VM: its guest agent broke the protocol: {exc.message}"
            say(failure)
        except Exception as exc:  # noqa: BLE001 - whatever happens, the VM must end and be recorded
            if not isinstance(exc, (KvmcError, OSError)):
                traceback.print_exc()
            full = to_disk_full(exc, self.host.state.container_dir(record.id))
            if full is not None or isinstance(exc, DiskFull):
                failure = str(full or exc)
            else:
                failure = exc.message if isinstance(exc, KvmcError) else f"{type(exc).__name__}: {exc}"
                if self.conn is not None and record.started_at:
                    failure = self.life.vm_lost_reason(record, failure)
        finally:
            self.conn_ready.set()
            self.ended.set()
        self.log.close()
        deferred = self._finish(result, failure)
        listener.close()
        ctl.unlink(missing_ok=True)
        for client in list(self.clients):
            try:  # shutdown: a thread blocked in recv() keeps a merely closed socket open
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.sock.close()
        if deferred is not None:
            try:
                deferred()
            except KvmcError as exc:
                print(f"kvmc-monitor: {exc}", file=sys.stderr)
        try:  # the VM is gone now: its taps, DNS names and maybe its networks' namespaces too
            self.life.leave_networks(record)
        except (KvmcError, OSError) as exc:
            print(f"kvmc-monitor: leaving networks: {exc}", file=sys.stderr)
        return 0

    def _finish(self, result: ProcessResult | None, failure: str | None) -> Callable[[], None] | None:
        """Stop the VM, record the end, tell the clients, remove the container if asked to.

        Returns what is left to do once the clients are gone, so that a client hears the exit
        code as soon as the process has ended:

        * a removed container whose VM leaves nothing behind: its VM is only paused here and
          destroyed afterwards. libvirt's destroy takes >= 200 ms however fast QEMU dies (it
          polls the process in 0.2 s steps, virProcessKillPainfully), and a paused QEMU of an
          already undefined domain whose files are deleted is nothing kvmc still shows (gc
          knows it by its reaping marker); the monitor stays until libvirt has dropped it.
        * a kept container without volumes: it is recorded exited (docker's state follows the
          process) while its guest powers off (~0.3 s under TCG, so the disk is consistent for
          a later start); the record keeps naming this monitor until the VM is off, and
          ``start``/``rm`` wait for it or end it.

        Containers with named volumes, and VMs that failed, are stopped before anyone hears:
        the volume's ext4 must be cleanly unmounted when ``run`` returns.
        """
        record = self.record
        vm_failed = result is None
        removing = record.auto_remove or (vm_failed and not record.started_at and self.discard_on_failure)
        has_volumes = bool(record.volume_names)
        quick = removing and not has_volumes
        powering_off = not removing and not vm_failed and not has_volumes
        try:
            if quick:
                self._freeze(record.domain)
            elif vm_failed:
                self.host.hv.destroy(record.domain)
            elif not powering_off:
                self._power_off(record.domain)
        except KvmcError as exc:  # libvirt unreachable: still record the exit; gc/rm finish later
            print(f"kvmc-monitor: {exc}", file=sys.stderr)
        if result is not None:
            code, error = result.exit_code, result.error
        else:
            code, error = (137 if record.started_at else 125), failure
        try:
            self.host.state.update(
                record, state=State.EXITED, finished_at=now_iso(), exit_code=code, error=error,
                guest_uptime_ms=result.started_uptime_ms if result else None,
                monitor_pid=os.getpid() if powering_off else None,
            )
        except OSError:
            pass  # removed under us (rm -f): nothing left to record
        if vm_failed:
            self._broadcast(Frame(FrameType.ERROR, MAIN_PROCESS_ID, (failure or "the VM failed").encode()))
            self._broadcast(Frame(FrameType.EXIT, MAIN_PROCESS_ID, encode_exit(code)))
        elif self.pending_exit is not None:
            self._broadcast(self.pending_exit)
        if powering_off:
            return self._release_after_power_off
        if not removing:
            return None
        self.life.discard(record, stop_vm=not quick)
        return (lambda: self.life.reap(record.domain)) if quick else None

    def _power_off(self, domain: str) -> None:
        """Wait for the guest's own power-off (the agent's, after EXIT_ACK); destroy if it hangs."""
        if not self.host.hv.wait_stopped(domain, SHUTOFF_WAIT_S):
            self.host.hv.destroy(domain)

    def _release_after_power_off(self) -> None:
        self._power_off(self.record.domain)
        try:
            self.host.state.update(self.record, monitor_pid=None)
        except OSError:
            pass  # removed meanwhile

    def _freeze(self, domain: str) -> None:
        """Pause a running VM (ms); one that is not running, or cannot pause, is destroyed."""
        if self.host.hv.state(domain) in ("running", "blocked"):
            try:
                self.host.hv.pause(domain)
                return
            except KvmcError:
                pass
        self.host.hv.destroy(domain)


def say(message: str) -> None:
    """A line in the monitor's log (its stderr, fd 2: whatever sys.stderr has become)."""
    try:
        os.write(2, f"kvmc-monitor: {now_iso()}: {message}\n".encode())
    except OSError:
        pass


def listen_control(path: Path) -> socket.socket:
    """The monitor's control socket, listening."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener


def serve(host: HostContext, container_id: str, wait_attach: bool, discard_on_failure: bool,
          listener: socket.socket | None = None) -> int:
    """Be the monitor of one container until it has ended (and, if asked, is removed)."""
    record = host.state.load(container_id)
    if record is None:
        print(f"kvmc-monitor: no container {container_id}", file=sys.stderr)
        return 1
    host.state.update(record, monitor_pid=os.getpid())
    return Monitor(VMLife(host), record, wait_attach, discard_on_failure).run(listener)


@dataclass
class MonitorProcess:
    """A monitor forked by :func:`spawn`; ``poll`` as subprocess.Popen's (None while it runs)."""

    pid: int

    def poll(self) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # reaped already
        return None if pid == 0 else os.waitstatus_to_exitcode(status)


def spawn(host: HostContext, container_id: str, control_socket: Path, log_path: Path, *, wait_attach: bool,
          discard_on_failure: bool) -> MonitorProcess:
    """Start the container's monitor: a new session that outlives the caller. Forked from a
    CLI (:func:`fork_monitor`); a fresh interpreter from a threaded process such as the API
    server (:func:`exec_monitor`), where a fork could inherit a lock another thread holds."""
    if host.monitor_start == "exec":
        child = exec_monitor(container_id, control_socket, log_path, wait_attach=wait_attach,
                             discard_on_failure=discard_on_failure)
        host.children.add(child.pid)  # a long-lived caller reaps it (HostContext.reap_children)
        return child
    return fork_monitor(host, container_id, control_socket, log_path, wait_attach=wait_attach,
                        discard_on_failure=discard_on_failure)


def exec_monitor(container_id: str, control_socket: Path, log_path: Path, *, wait_attach: bool,
                 discard_on_failure: bool) -> MonitorProcess:
    """``python -m kvmc.monitor`` in a new session, handed the control socket already
    listening (so an attach right after this returns connects at once). It reads the same
    configuration as the caller, from the environment and config files."""
    import subprocess

    listener = listen_control(control_socket)
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvmc.monitor", container_id, "--listen-fd", str(listener.fileno()),
                 *(["--wait-attach"] if wait_attach else []), *(["--discard-on-failure"] if discard_on_failure else [])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
    finally:
        listener.close()
    return MonitorProcess(proc.pid)


def fork_monitor(host: HostContext, container_id: str, control_socket: Path, log_path: Path, *,
                 wait_attach: bool, discard_on_failure: bool) -> MonitorProcess:
    """Fork the container's monitor: a new session that outlives the CLI.

    Why fork and not exec a fresh ``python -m kvmc.monitor``: the child already has every
    module imported, which takes a new interpreter ~0.15 s under this host's CPUs, on the path
    of every run and start. The child keeps nothing of the parent but its code: it closes every
    inherited descriptor (the CLI's libvirt connection, the container lock it holds while
    spawning) and opens its own, except the control socket: it is bound and listening before
    the fork, so the CLI's attach connects at once instead of polling for it to appear.
    """
    listener = listen_control(control_socket)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        listener.close()
        raise
    if pid:
        listener.close()
        return MonitorProcess(pid)
    code = 1
    try:
        os.setsid()
        keep = listener.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        devnull = os.open(os.devnull, os.O_RDWR)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(log, 2)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
        host.after_fork()  # its libvirt connection was the parent's, closed above
        code = serve(host, container_id, wait_attach, discard_on_failure, listener)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the CLI
        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmc-monitor", description="kvmc's per-container monitor")
    parser.add_argument("container_id")
    parser.add_argument("--wait-attach", action="store_true", help="Start process 1 only once a client attached.")
    parser.add_argument("--discard-on-failure", action="store_true", help="Remove the container if it fails to start.")
    parser.add_argument("--listen-fd", type=int, help="The control socket, bound and listening (exec_monitor).")
    args = parser.parse_args(argv)
    listener = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else None
    return serve(HostContext(load_config()), args.container_id, args.wait_attach, args.discard_on_failure, listener)


if __name__ == "__main__":
    sys.exit(main())

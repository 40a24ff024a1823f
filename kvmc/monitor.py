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
import dataclasses
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

from kvmc.agent import (
    CLIENT_TO_MONITOR,
    MAIN_PROCESS_ID,
    AgentConnection,
    AgentTable,
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
from kvmc import health as healthcheck
from kvmc.agent import ProcessSpec
from kvmc.config import load_config
from kvmc.context import HostContext
from kvmc.errors import AgentProtocolError, DiskFull, GuestError, KvmcError
from kvmc.logs import LOG_FILE, LogOptions, LogWriter, log_options, resolve_log_opts
from kvmc.options import restart_delay, signal_number
from kvmc.space import free_bytes, mount_point, resume_threshold, to_disk_full
from kvmc.state import ContainerRecord, State, now_iso
from kvmc.vmlife import VMLife, pid_alive, process_limits

ATTACH_WAIT_S = 30.0
DISK_CHECK_S = 2.0
"""How often the monitor asks libvirt whether QEMU paused the VM on a full disk."""
SHUTOFF_WAIT_S = 15.0
"""How long a guest may take to power off after its process ended before it is destroyed."""
_RELAYED_TO_ATTACHED = {FrameType.STARTED, FrameType.STDOUT, FrameType.STDERR, FrameType.ERROR, FrameType.EXIT}
EXEC_ID_MAX = 0xFEFF
"""Clients choose exec ids in 2..EXEC_ID_MAX; the ids above are the monitor's health probes."""
PROBE_IDS = range(EXEC_ID_MAX + 1, 0x10000)
PROBE_START_TIMEOUT_S = 30.0
"""How long a health probe may take to start (docker's separate timeout for starting the exec)."""


class ProbeClient:
    """Where a health probe's frames go (in place of a client): its output, its exit."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.started = threading.Event()
        self.done = threading.Event()
        self.exit_code = -1
        self.error = ""

    def send(self, frame_type: FrameType, proc_id: int, payload: bytes = b"") -> bool:
        if frame_type in (FrameType.STDOUT, FrameType.STDERR):
            if len(self.output) < healthcheck.MAX_OUTPUT:
                self.output += payload
        elif frame_type == FrameType.STARTED:
            self.started.set()
        elif frame_type == FrameType.ERROR:
            self.error = payload.decode(errors="replace")
        elif frame_type == FrameType.EXIT:
            self.exit_code, _ = parse_exit(payload)
            self.started.set()
            self.done.set()
        return True




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

    def __init__(self, life: VMLife, record: ContainerRecord, wait_attach: bool, discard_on_failure: bool,
                 reattach: bool = False) -> None:
        self.life = life
        self.reattach = reattach
        """Take over a running VM whose previous monitor died, instead of booting one."""
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
        """Set once the current run's relay has ended (the VM is being stopped): that run's disk
        watch and health checks stop. A new one for each run of a restart policy."""
        self.running = False
        """The container's process runs in a VM whose agent ``conn`` reaches (not while it boots or
        between the runs of a restart policy)."""
        self.stop_requested = threading.Event()
        """A user stopped or killed it: no restart (docker's HasBeenManuallyStopped + ExitOnNext)."""
        self.started_at = 0.0
        self.next_probe_id = PROBE_IDS.start
        self.hostile = False
        """Its guest broke the protocol: kvmc stopped the VM, and its restart policy does not apply."""

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
        if frame.type in (FrameType.SHUTDOWN, FrameType.STOP) or (
                frame.type == FrameType.SIGNAL and frame.proc_id == MAIN_PROCESS_ID and self._ends_restarts(frame.payload)):
            self._stopped_by_user()
        self.conn_ready.wait()
        with self.lock:
            conn, procs = (self.conn, self.procs) if self.running else (None, None)
        if conn is None or procs is None:  # between two runs of a restart policy (or it just ended)
            if frame.type == FrameType.RUN:
                client.send(FrameType.ERROR, frame.proc_id, b"the container is restarting: wait until it runs")
                client.send(FrameType.EXIT, frame.proc_id, encode_exit(126))
            return
        if frame.type == FrameType.STOP:
            self._stop_with(conn, frame.payload)
            return
        if frame.type == FrameType.RUN:
            # Registered before it is sent: the guest's first frame about it may come at once.
            # Ids above EXEC_ID_MAX are the health probes'.
            taken = not MAIN_PROCESS_ID < frame.proc_id <= EXEC_ID_MAX or not procs.requested(frame.proc_id)
            if taken:
                client.send(FrameType.ERROR, frame.proc_id, f"process id {frame.proc_id} is in use".encode())
                client.send(FrameType.EXIT, frame.proc_id, encode_exit(126))
                return
            with self.lock:
                self.execs[frame.proc_id] = client
            try:
                conn.send(frame.type, frame.proc_id, frame.payload, frame.flags)  # RUN_TTY kept
            except OSError:
                procs.forget(frame.proc_id)
                raise
            return
        elif frame.type in (FrameType.STDIN, FrameType.SIGNAL):
            with self.lock:
                allowed = frame.proc_id == MAIN_PROCESS_ID or self.execs.get(frame.proc_id) is client
            if not allowed:
                return
        # RESIZE comes from any client (the API resizes an exec on a request of its own); the
        # agent ignores it for a process without a terminal.
        conn.send(frame.type, frame.proc_id, frame.payload, frame.flags)

    def _stop_with(self, conn: AgentConnection, payload: bytes) -> None:
        """docker's ``stop --signal S -t T``: S to process 1, and if it still runs after T
        seconds, the agent's SHUTDOWN 0 (SIGKILL to everything)."""
        if len(payload) != 8:
            return
        timeout, signum = struct.unpack(">II", payload)
        conn.signal(MAIN_PROCESS_ID, signum)
        ended = self.ended  # this run's

        def kill_later() -> None:
            if not ended.wait(timeout) and self.conn is conn:
                try:
                    conn.shutdown(0)
                except OSError:
                    pass

        threading.Thread(target=kill_later, daemon=True).start()

    def _ends_restarts(self, payload: bytes) -> bool:
        """docker's kill: SIGKILL or the container's stop signal ends the restart policy until the
        next start; another signal (SIGUSR1, ...) leaves it in place."""
        if len(payload) != 4:
            return False
        signum = struct.unpack(">I", payload)[0]
        try:
            stop = signal_number(self.record.stop_signal) if self.record.stop_signal else signal.SIGTERM
        except KvmcError:
            stop = signal.SIGTERM
        return signum in (signal.SIGKILL, stop)

    def _stopped_by_user(self) -> None:
        if self.stop_requested.is_set():
            return
        self.stop_requested.set()
        if self.record.options.restart.enabled:
            try:  # unless-stopped containers stay down at the next `system boot` (docker's daemon start)
                self.host.state.update(dataclasses.replace(self.record), manually_stopped=True)
            except OSError:
                pass


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
                self._started(conn, record_it=True)
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

    def _started(self, conn: AgentConnection, record_it: bool) -> None:
        """Process 1 runs: record when (not for a re-attach: it started long ago) and start its
        health checks."""
        self.started_at = time.monotonic()
        check = self.record.options.healthcheck
        health = check is not None and not check.disabled
        if record_it:
            changes = {"health": healthcheck.restarted(self.record.health)} if health else {}
            self.host.state.update(self.record, started_at=now_iso(), **changes)
        if health:
            threading.Thread(target=self._health_loop, args=(check, conn, self.ended), daemon=True).start()

    def _take_over(self, procs: ProcessTable) -> tuple[AgentConnection, ProcessResult | None]:
        """Re-attach to the running VM (its previous monitor died): adopt what its agent runs;
        (connection, None) to relay on, or (connection, result) if process 1 ended meanwhile.
        What the container lost while nobody read its output goes into its log and ours."""
        conn, table, skipped = self.life.reattach(self.record)
        say(f"re-attached to the running VM after its monitor died: processes {sorted(table.processes)}; "
            f"the agent dropped {table.dropped} bytes of the container's output and {table.dropped_other} of "
            f"other processes while no monitor read them; {skipped} bytes in transit were skipped")
        if table.dropped or skipped:
            self.log.note("stderr", f"kvmc: output lost while kvmc's monitor was away: {table.dropped} bytes "
                                    f"dropped by the guest, up to {skipped} bytes in transit")
        return conn, self._adopt(conn, table, procs)

    def _adopt(self, conn: AgentConnection, table: AgentTable, procs: ProcessTable) -> ProcessResult | None:
        """Take the processes in the agent's ``table`` as this monitor's (after a re-attach):
        None while process 1 runs, its result if it ended; GuestError if it is not there."""
        for proc_id, entry in table.processes.items():
            if entry.state != "exited":  # execs whose clients died with the old monitor: orphans
                procs.adopt(proc_id, started=entry.state != "starting")
        main = table.processes.get(MAIN_PROCESS_ID)
        if main is None:
            conn.close()
            raise GuestError("the container's process ended while kvmc's monitor was away; its exit code was lost")
        if main.state != "exited":
            return None
        conn.ack_exit(MAIN_PROCESS_ID)
        code = main.exit_code if main.exit_code is not None else -1
        self.pending_exit = Frame(FrameType.EXIT, MAIN_PROCESS_ID, struct.pack(">BI", 1, main.signal)
                                  if main.signal else encode_exit(code))
        return ProcessResult(exit_code=code, signal=main.signal)

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

    def _watch_disk(self, ended: threading.Event) -> None:
        """A VM whose disk write found no space is paused by QEMU (werror=enospc) and shows as
        paused (kvmc ps: "Paused (disk full)"). Say so once in the monitor's log, and resume it
        once every file system its disks are on has room again (space.resume_threshold); if it
        fills up again, QEMU pauses it again. A VM paused by the user is left alone."""
        domain, noted = self.record.domain, False
        while not ended.wait(DISK_CHECK_S):
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
        delay = 0.0
        restarting = False
        while True:
            result, failure = self._run_once(restarting, taking_over=self.reattach and not restarting)
            delay = self._restart_delay(result, failure, delay)
            if delay is None or not self._restart(result, failure, delay):
                break
            restarting = True
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

    def _run_once(self, restarting: bool, taking_over: bool = False) -> tuple[ProcessResult | None, str | None]:
        """Boot the VM, hand the agent process 1 and relay until it ends: (result, None), or
        (None, why) if the VM failed, could not start or broke the protocol. ``taking_over``:
        the VM runs already (its monitor died): re-attach instead of booting."""
        record = self.record
        failure: str | None = None
        result: ProcessResult | None = None
        ended = self.ended = threading.Event()
        procs = ProcessTable()  # a new VM: nothing it may speak for yet
        adopted = False
        try:
            if taking_over:
                conn, result = self._take_over(procs)
            else:
                if not restarting and self.wait_attach and not self.first_attach.wait(ATTACH_WAIT_S):
                    raise KvmcError("no client attached to the container within 30 s")
                conn, table = self.life.boot(record, keep_last_exit=restarting)
                if table is None:
                    procs.requested(MAIN_PROCESS_ID)  # boot sent its RUN
                else:  # the RUN was heard, its answer lost with the first connection (VMLife.first_word)
                    adopted = True
                    result = self._adopt(conn, table, procs)
            with self.lock:
                self.conn, self.procs, self.running = conn, procs, result is None
            self.conn_ready.set()
            if result is None:
                threading.Thread(target=self._watch_disk, args=(ended,), daemon=True).start()
                if (taking_over or adopted) and procs.started(MAIN_PROCESS_ID):
                    self._started(conn, record_it=adopted)  # a take-over's started long ago
                result = self._relay(conn)
        except AgentProtocolError as exc:
            # The guest is not trusted: one frame outside the protocol and its VM is stopped
            # (by _finish), with the reason recorded. Nothing it sent is relayed any more.
            failure = f"kvmc stopped the VM: its guest agent broke the protocol: {exc.message}"
            say(failure)
            self.hostile = True  # not restarted: kvmc ended it on purpose
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
            with self.lock:
                self.running = False
            ended.set()
            self.conn_ready.set()
        return result, failure

    # ---------------------------------------------------------------- restarts
    def _restart_delay(self, result: ProcessResult | None, failure: str | None, previous: float) -> float | None:
        """Seconds to wait before starting the container again, or None to let it end: its
        restart policy (kvmc/options.py) allows it, no user stopped it, and it had started (a
        process that could not be executed, or a VM that never booted, is a failed start)."""
        record = self.record
        policy = record.options.restart
        if not policy.enabled or self.stop_requested.is_set() or self.hostile or not record.started_at:
            return None
        if result is not None and result.error:
            return None
        code = result.exit_code if result is not None else 137
        if not policy.should_restart(code, manually_stopped=False, restart_count=record.restart_count):
            return None
        return restart_delay(previous, time.monotonic() - self.started_at)

    def _restart(self, result: ProcessResult | None, failure: str | None, delay: float) -> bool:
        """Between two runs: record ``restarting`` (the exit, one more restart), tell attached
        clients the exit and let them go (a foreground run ends at the first exit, as docker's),
        power the VM off, wait ``delay``. False if a user stopped it meanwhile."""
        record = self.record
        code, error = (result.exit_code, result.error) if result is not None else (137, failure)
        try:
            self.host.state.update(record, state=State.RESTARTING, finished_at=now_iso(), exit_code=code, error=error,
                                   restart_count=record.restart_count + 1,
                                   guest_uptime_ms=result.started_uptime_ms if result else None)
        except OSError:
            return False  # removed under us
        if result is None:
            self._broadcast(Frame(FrameType.ERROR, MAIN_PROCESS_ID, (failure or "the VM failed").encode()))
            self._broadcast(Frame(FrameType.EXIT, MAIN_PROCESS_ID, encode_exit(code)))
        elif self.pending_exit is not None:
            self._broadcast(self.pending_exit)
        self.pending_exit = None
        self.discard_on_failure = False  # it ran: a failed restart keeps it, recorded exited
        self.conn_ready.clear()
        self._let_clients_go()
        if self.conn is not None:
            self.conn.close()
        try:
            if result is None:
                self.host.hv.destroy(record.domain)
            else:
                self._power_off(record.domain)
        except KvmcError as exc:
            say(str(exc))
        try:  # its taps and DNS names go with the VM; the next boot joins its networks again
            self.life.leave_networks(record)
        except (KvmcError, OSError) as exc:
            say(f"leaving networks: {exc}")
        say(f"exit code {code}: restart {record.restart_count} ({record.options.restart}) in {delay:.1f}s")
        return not self.stop_requested.wait(delay)

    def _let_clients_go(self) -> None:
        """Close every client's connection (attached ones have heard the exit; execs died with
        the VM): they see EOF, as at the end of a container."""
        with self.lock:
            clients = list(self.clients)
        for client in clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._drop(client)

    # ------------------------------------------------------------------ health
    def _health_loop(self, check: healthcheck.Healthcheck, conn: AgentConnection, ended: threading.Event) -> None:
        """Probe the container as its health check says until this run ends (moby's monitor)."""
        record = self.record
        started = self.started_at
        current = healthcheck.restarted(record.health)
        while not ended.wait(healthcheck.next_probe_in(check, current, time.monotonic() - started)):
            if self.host.hv.state(record.domain) == "paused":
                continue  # docker does not probe a paused container
            since_start = time.monotonic() - started
            probe = self._probe(check, conn, ended)
            if probe is None:
                return
            current = healthcheck.record_result(current, probe, check, since_start)
            try:
                self.host.state.update(dataclasses.replace(record), health=current)
            except OSError:
                return

    def _probe(self, check: healthcheck.Healthcheck, conn: AgentConnection,
               ended: threading.Event) -> healthcheck.HealthResult | None:
        """Run the check once as an exec of the container's user, env and workdir; None when
        the run ended meanwhile."""
        record = self.record
        proc = record.process
        client = ProbeClient()
        with self.lock:
            if not self.running or self.conn is not conn:
                return None
            procs = self.procs
            proc_id = self._next_probe_id()
            if proc_id is None or not procs.requested(proc_id):  # the guest may speak for it now
                return None
            self.execs[proc_id] = client  # type: ignore[assignment]
        start = now_iso()
        try:
            conn.run(proc_id, ProcessSpec(args=check.command, env=proc.env, cwd=proc.cwd, user=proc.user,
                                          **process_limits(record)))
        except (OSError, ValueError) as exc:
            procs.forget(proc_id)
            with self.lock:
                self.execs.pop(proc_id, None)
            return healthcheck.HealthResult(start, now_iso(), -1, f"cannot start the health check: {exc}")
        if not self._wait(client.started, PROBE_START_TIMEOUT_S, ended):
            return None if ended.is_set() else healthcheck.HealthResult(
                start, now_iso(), -1, "timed out starting the health check")
        if not self._wait(client.done, check.timeout, ended):
            if ended.is_set():
                return None
            try:
                conn.signal(proc_id, signal.SIGKILL)
            except OSError:
                pass
            self._wait(client.done, 5.0, ended)
            output = healthcheck.truncate_output(bytes(client.output))
            text = f"Health check exceeded timeout ({check.timeout:g}s)"
            return healthcheck.HealthResult(start, now_iso(), -1, f"{text}: {output}" if output else text)
        output = client.error or healthcheck.truncate_output(bytes(client.output))
        return healthcheck.HealthResult(start, now_iso(), client.exit_code, output)

    def _next_probe_id(self) -> int | None:
        """A free probe id (self.lock held), in turn: an id the agent just freed is not reused at once."""
        for _ in PROBE_IDS:
            proc_id = self.next_probe_id
            self.next_probe_id = proc_id + 1 if proc_id + 1 < PROBE_IDS.stop else PROBE_IDS.start
            if proc_id not in self.execs and proc_id not in self.procs.running():  # nor a re-attached VM's
                return proc_id
        return None

    @staticmethod
    def _wait(event: threading.Event, timeout: float, ended: threading.Event) -> bool:
        """Wait for ``event`` at most ``timeout`` s; give up early once the run ``ended``."""
        deadline = time.monotonic() + timeout
        while not event.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if ended.is_set() or time.monotonic() >= deadline:
                return event.is_set()
        return True

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
        # A failed VM is ended before anyone hears, even when it goes with its container: the
        # failure's caller (run, start, docker's API) finds nothing of it left when it returns.
        quick = removing and not has_volumes and not vm_failed
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
        """Pause a running VM (ms); one that cannot be paused (it stopped meanwhile) is destroyed.
        No state query first: each libvirt call is a round trip on the exit's path, and a pause
        refuses a VM that does not run; one paused already stays paused until reap destroys it."""
        try:
            self.host.hv.pause(domain)
        except KvmcError:
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
          listener: socket.socket | None = None, reattach: bool = False) -> int:
    """Be the monitor of one container until it has ended (and, if asked, is removed);
    ``reattach``: of a running one whose monitor died."""
    record = host.state.load(container_id)
    if record is None:
        print(f"kvmc-monitor: no container {container_id}", file=sys.stderr)
        return 1
    host.state.update(record, monitor_pid=os.getpid())
    return Monitor(VMLife(host), record, wait_attach, discard_on_failure, reattach).run(listener)


@dataclass
class MonitorProcess:
    """A monitor started by :func:`spawn`; ``poll`` as subprocess.Popen's (None while it runs).
    ``child``: whether the caller forked it (and can collect its exit status) or the fork
    server did (then only whether it lives is known)."""

    pid: int
    child: bool = True

    def poll(self) -> int | None:
        if not self.child:
            return None if pid_alive(self.pid) else 0
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # reaped already
        return None if pid == 0 else os.waitstatus_to_exitcode(status)


def spawn(host: HostContext, container_id: str, control_socket: Path, log_path: Path, *, wait_attach: bool,
          discard_on_failure: bool, reattach: bool = False) -> MonitorProcess:
    """Start the container's monitor: a new session that outlives the caller. Forked by the
    user's fork server (kvmc/forkserver.py: monitors share its memory) when one answers; else
    forked from a CLI (:func:`fork_monitor`), or a fresh interpreter from a threaded process
    such as the API server (:func:`exec_monitor`), where a fork could inherit a lock another
    thread holds. The control socket is bound and listening before any of them starts (an
    attach right after this returns connects at once); the caller's copy is closed here."""
    listener = listen_control(control_socket)
    try:
        if host.monitors_from_forkserver:
            served = _forkserver_monitor(host, container_id, listener, log_path, wait_attach=wait_attach,
                                         discard_on_failure=discard_on_failure, reattach=reattach)
            if served is not None:
                return served
        if host.monitor_start == "exec":
            child = exec_monitor(container_id, listener, log_path, wait_attach=wait_attach,
                                 discard_on_failure=discard_on_failure, reattach=reattach)
            host.children.add(child.pid)  # a long-lived caller reaps it (HostContext.reap_children)
            return child
        return fork_monitor(host, container_id, listener, log_path, wait_attach=wait_attach,
                            discard_on_failure=discard_on_failure, reattach=reattach)
    finally:
        listener.close()


def _forkserver_monitor(host: HostContext, container_id: str, listener: socket.socket, log_path: Path, *,
                        wait_attach: bool, discard_on_failure: bool, reattach: bool) -> MonitorProcess | None:
    """The monitor forked by the fork server, or None when none answered (one is started
    then, for the next container)."""
    from kvmc import forkserver

    request = forkserver.Request(config=host.config, container_id=container_id, log_path=str(log_path),
                                 wait_attach=wait_attach, discard_on_failure=discard_on_failure, reattach=reattach,
                                 env=dict(os.environ), cwd=_cwd(), umask=_umask())
    try:
        return MonitorProcess(forkserver.fork_monitor(request, listener), child=False)
    except forkserver.ForkServerUnavailable as exc:
        host.say(str(exc))
        return None


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def exec_monitor(container_id: str, listener: socket.socket, log_path: Path, *, wait_attach: bool,
                 discard_on_failure: bool, reattach: bool = False) -> MonitorProcess:
    """``python -m kvmc.monitor`` in a new session, handed the control socket ``listener``
    already listening. It reads the same configuration as the caller, from the environment and
    config files."""
    import subprocess

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmc.monitor", container_id, "--listen-fd", str(listener.fileno()),
             *(["--wait-attach"] if wait_attach else []), *(["--discard-on-failure"] if discard_on_failure else []),
             *(["--reattach"] if reattach else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(listener.fileno(),),
            start_new_session=True,
        )
    return MonitorProcess(proc.pid)


def fork_monitor(host: HostContext, container_id: str, listener: socket.socket, log_path: Path, *,
                 wait_attach: bool, discard_on_failure: bool, reattach: bool = False) -> MonitorProcess:
    """Fork the container's monitor: a new session that outlives the CLI.

    Why fork and not exec a fresh ``python -m kvmc.monitor``: the child already has every
    module imported, which takes a new interpreter ~0.15 s under this host's CPUs, on the path
    of every run and start. The child keeps nothing of the parent but its code: it closes every
    inherited descriptor (the CLI's libvirt connection, the container lock it holds while
    spawning) and opens its own, except the control socket: it is bound and listening before
    the fork (``listener``), so the CLI's attach connects at once instead of polling for it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return MonitorProcess(pid)
    keep = listener.fileno()

    def close_inherited() -> None:
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))

    def own_host() -> HostContext:
        host.after_fork()  # its libvirt connection was the parent's, closed by close_inherited
        return host

    run_forked(own_host, container_id, log_path, wait_attach=wait_attach, discard_on_failure=discard_on_failure,
               listener=listener, reattach=reattach, prepare=close_inherited)


def _title(container_id: str) -> None:
    """What ps shows for this monitor: ``kvmc-monitor ID`` (command line) and ``kvmc-monitor``
    (comm, what top and pgrep see), not the command of the process it was forked from."""
    import setproctitle

    setproctitle.setproctitle(f"kvmc-monitor {container_id[:12]}")
    setproctitle.setthreadtitle("kvmc-monitor")


def run_forked(make_host: Callable[[], HostContext], container_id: str, log_path: Path | str, *, wait_attach: bool,
               discard_on_failure: bool, listener: socket.socket, reattach: bool,
               prepare: Callable[[], None]) -> NoReturn:
    """The life of a monitor just forked (by the CLI or by the fork server): a session of its
    own, ``prepare`` (drop what the parent had open), stdio on /dev/null and the monitor's
    log, default signals, then :func:`serve`. Never returns into the parent's code."""
    code = 1
    try:
        os.setsid()
        prepare()
        _title(container_id)
        devnull = os.open(os.devnull, os.O_RDWR)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(log, 2)
        for fd in {devnull, log} - {0, 1, 2}:
            os.close(fd)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        code = serve(make_host(), container_id, wait_attach, discard_on_failure, listener, reattach)
    except BaseException:  # noqa: BLE001 - a forked child must never return into its parent's code
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
    parser.add_argument("--reattach", action="store_true", help="Take over the running VM of a monitor that died.")
    args = parser.parse_args(argv)
    listener = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else None
    _title(args.container_id)
    return serve(HostContext(load_config()), args.container_id, args.wait_attach, args.discard_on_failure, listener,
                 args.reattach)


if __name__ == "__main__":
    sys.exit(main())

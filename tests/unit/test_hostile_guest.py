"""A hostile guest, on the host's side: the frame reader, the payload parsers, the monitor's
relay and the CLI's attach/exec path against random, truncated, oversized, interleaved and
malformed frames (hypothesis), and the frame sprays of issue 15.

The monitor runs in a thread of the test with a scripted fake agent on the other end of a
socket pair (``ScriptedGuest``) and stubs for libvirt and the VM's life: what is under test is
what the monitor does with what the guest sends. The properties:

* nothing on the host raises anything but kvmc's own errors, and memory stays bounded;
* a frame outside the protocol stops that container's VM (destroy) with the reason recorded;
* an exec's exit code only ever comes from an EXIT the guest sent for that exec's own id,
  after its start; a sprayed EXIT never reaches an exec as its exit code.
"""

from __future__ import annotations

import io
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmc.agent import (
    CLIENT_TO_MONITOR,
    GUEST_TO_HOST,
    HEADER_SIZE,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    AgentConnection,
    Frame,
    FrameReader,
    FrameType,
    ProcessSpec,
    ProcessTable,
    SignalWatch,
    attach_process,
    encode_exit,
    encode_frame,
    guest_text,
    parse_exit,
    parse_ready,
    parse_started,
    parse_uptime,
)
from kvmc.config import Config
from kvmc.errors import AgentProtocolError, GuestError, KvmcError
from kvmc.monitor import Monitor
from kvmc.state import ContainerProcess, ContainerRecord, State, StateStore

WAIT_S = 10.0
EXEC_ID = 40000
_HEADER = struct.Struct(">BBHI")


def raw_frame(ftype: int, proc_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A frame as a guest may send it: any type, any length field."""
    return _HEADER.pack(ftype, 0, proc_id, len(payload) if length is None else length) + payload


# ------------------------------------------------------------ frame reader
chunks = st.lists(st.binary(max_size=300), max_size=20)


@settings(max_examples=300, deadline=None)
@given(chunks)
def test_reader_on_random_bytes_yields_frames_or_a_protocol_error(pieces: list[bytes]) -> None:
    """Any byte stream, split anywhere: frames that re-encode to exactly what was consumed, or
    AgentProtocolError; never another exception, and never more than one frame buffered."""
    reader = FrameReader()
    consumed = b""
    data = b"".join(pieces)
    try:
        for piece in pieces:
            reader.feed(piece)
            while (frame := reader.next_frame()) is not None:
                consumed += encode_frame(frame.type, frame.proc_id, frame.payload, frame.flags)
            assert reader.buffered <= HEADER_SIZE + MAX_PAYLOAD + len(piece)
    except AgentProtocolError:
        return
    assert data.startswith(consumed) and len(data) - len(consumed) == reader.buffered


valid_frames = st.builds(
    lambda t, pid, payload: (t, pid, payload),
    st.sampled_from(sorted(GUEST_TO_HOST)), st.integers(0, 0xFFFF), st.binary(max_size=64))


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_frames, max_size=30), st.data())
def test_reader_decodes_interleaved_frames_split_anywhere(frames: list[tuple], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(t, p, payload) for t, p, payload in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        reader.feed(stream[start:end])
        while (frame := reader.next_frame()) is not None:
            got.append((frame.type, frame.proc_id, frame.payload))
    assert got == [(FrameType(t), p, payload) for t, p, payload in frames]


def test_reader_refuses_an_oversized_header_before_its_payload_arrives() -> None:
    reader = FrameReader()
    reader.feed(raw_frame(FrameType.STDOUT, 1, length=MAX_PAYLOAD + 1))
    with pytest.raises(AgentProtocolError):
        reader.next_frame()
    reader = FrameReader()
    reader.feed(raw_frame(FrameType.STDOUT, 1, length=0xFFFFFFFF))
    with pytest.raises(AgentProtocolError):
        reader.next_frame()


# ---------------------------------------------------------------- parsers
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_parsers_raise_only_protocol_errors(payload: bytes) -> None:
    for parse in (parse_exit, parse_started, parse_ready, parse_uptime):
        try:
            parse(payload)
        except AgentProtocolError:
            pass


@given(st.integers(0, 1), st.integers(0, 0xFFFFFFFF))
def test_exit_codes_are_docker_exit_statuses(kind: int, value: int) -> None:
    try:
        code, signum = parse_exit(struct.pack(">BI", kind, value))
    except AgentProtocolError:
        assert (kind == 0 and value > 255) or (kind == 1 and not 1 <= value <= 127)
        return
    assert 0 <= code <= 255 and (signum is None) == (kind == 0)


def test_started_with_a_pid_that_is_no_number_is_a_protocol_error() -> None:
    assert parse_started(b"pid=12 uptime_ms=34") == (12, 34)
    for bad in (b"pid=abc", b"pid=-1", b"pid=99999999999999999999", b"pid=\xff", b"uptime_ms=1e3"):
        with pytest.raises(AgentProtocolError):
            parse_started(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.booleans())
def test_guest_text_is_safe_to_print(payload: bytes, one_line: bool) -> None:
    text = guest_text(payload, 1000, one_line=one_line)
    allowed = {"\t", "\n"} if not one_line else set()
    assert not any((ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) and c not in allowed for c in text)
    assert len(text) <= 1003


# ------------------------------------------------------------ process table
def test_process_table_follows_the_lifecycle() -> None:
    table = ProcessTable()
    assert table.requested(1) and not table.requested(1)
    exit0 = Frame(FrameType.EXIT, 1, encode_exit(0))
    with pytest.raises(AgentProtocolError, match="before its start"):
        table.check(exit0)
    table.check(Frame(FrameType.STDOUT, 1, b"early output is fine"))
    table.check(Frame(FrameType.STARTED, 1, b"pid=7 uptime_ms=1"))
    with pytest.raises(AgentProtocolError, match="after it started"):
        table.check(Frame(FrameType.ERROR, 1, b"late"))
    table.check(exit0)
    with pytest.raises(AgentProtocolError, match="did not start or which has exited"):
        table.check(exit0)  # EXIT twice
    with pytest.raises(AgentProtocolError, match="did not start"):
        table.check(Frame(FrameType.EXIT, 777, encode_exit(0)))  # never run
    with pytest.raises(AgentProtocolError, match="READY"):
        table.check(Frame(FrameType.READY, 5, f"kvmc-agent/{PROTOCOL_VERSION}".encode()))
    table.check(Frame(FrameType.READY, 0, f"kvmc-agent/{PROTOCOL_VERSION} uptime_ms=3".encode()))


# ------------------------------------------------------------ the monitor
class StubHypervisor:
    """What the monitor asks libvirt: a VM that runs until destroyed."""

    def __init__(self) -> None:
        self.destroyed = threading.Event()

    def destroy(self, name: str) -> None:
        self.destroyed.set()

    def state(self, name: str) -> str:
        return "shutoff" if self.destroyed.is_set() else "running"

    def state_reason(self, name: str) -> tuple[str, None]:
        return self.state(name), None

    def pause(self, name: str) -> None:
        pass

    def wait_stopped(self, name: str, timeout: float) -> bool:
        return True


class ScriptedGuest:
    """The guest end of the agent connection: the test sends what it likes; what the monitor
    sends (forwarded RUNs, EXIT_ACKs) is collected."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[Frame] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        reader = FrameReader(accept=CLIENT_TO_MONITOR)
        try:
            while data := self.sock.recv(1 << 16):
                reader.feed(data)
                while (frame := reader.next_frame()) is not None:
                    with self.changed:
                        self.received.append(frame)
                        self.changed.notify_all()
        except (OSError, AgentProtocolError):
            pass

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False  # the monitor hung up (it stopped the VM)

    def wait_for(self, ftype: FrameType, proc_id: int) -> None:
        with self.changed:
            assert self.changed.wait_for(
                lambda: any(f.type == ftype and f.proc_id == proc_id for f in self.received), WAIT_S)

    def close(self) -> None:
        try:  # shutdown first: the drain thread blocked in recv() keeps a merely closed socket open
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ScriptedLife:
    """VMLife for the monitor: boot hands it the host end of the socket pair."""

    def __init__(self, host: SimpleNamespace, host_end: socket.socket) -> None:
        self.host = host
        self.host_end = host_end

    def boot(self, record: ContainerRecord, keep_last_exit: bool = False) -> tuple[AgentConnection, None]:
        self.host.state.update(record, state=State.RUNNING, started_at="2024-01-01T00:00:00.000Z")
        return AgentConnection(self.host_end), None

    def vm_lost_reason(self, record: ContainerRecord, what: str) -> str:
        return f"the VM stopped unexpectedly ({what})"

    def discard(self, record: ContainerRecord, stop_vm: bool = True) -> None:
        self.host.state.remove(record)

    def reap(self, domain: str) -> None:
        pass

    def leave_networks(self, record: ContainerRecord, update_record: bool = True) -> None:
        pass


@dataclass
class MonitorRun:
    monitor: Monitor
    guest: ScriptedGuest
    hv: StubHypervisor
    state: StateStore
    record: ContainerRecord
    thread: threading.Thread
    outcome: list = field(default_factory=list)

    def client(self) -> AgentConnection:
        return AgentConnection.connect(self.record.control_socket, timeout=WAIT_S)

    def attach(self) -> AgentConnection:
        """A client attached to process 1 (once the monitor says so)."""
        conn = self.client()
        conn.send(FrameType.ATTACH, 1)
        deadline = time.monotonic() + WAIT_S
        while not self.monitor.attached:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return conn

    def start_exec(self, proc_id: int = EXEC_ID) -> AgentConnection:
        conn = self.client()
        conn.run(proc_id, ProcessSpec(args=["sh"]))
        self.guest.wait_for(FrameType.RUN, proc_id)
        return conn

    def end(self) -> ContainerRecord:
        """Wait for the monitor to finish; the record as it left it."""
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the monitor did not end"
        assert self.outcome == [0], self.outcome
        record = self.state.load(self.record.id)
        assert record is not None
        return record


@pytest.fixture
def monitor_run() -> Iterator[callable]:
    runs: list[MonitorRun] = []
    dirs: list[str] = []

    def start() -> MonitorRun:
        base = Path(tempfile.mkdtemp(prefix="kvmc-hg-", dir="/tmp"))  # unix socket paths are short
        dirs.append(str(base))
        state = StateStore(base / "containers")
        container_id, name, _ = state.allocate(None)
        record = ContainerRecord(
            id=container_id, name=name, image="test", image_id="0" * 64, domain=f"kvmc-{container_id[:16]}",
            accel="tcg", memory_mib=128, cpus=1, process=ContainerProcess(args=["sh"]),
            control_socket=str(base / "ctl"), state=State.STARTING)
        state.save(record)
        host_end, guest_end = socket.socketpair()
        hv = StubHypervisor()
        host = SimpleNamespace(state=state, hv=hv, config=Config())
        monitor = Monitor(ScriptedLife(host, host_end), record, wait_attach=False, discard_on_failure=False)
        run = MonitorRun(monitor, ScriptedGuest(guest_end), hv, state, record, None)  # type: ignore[arg-type]

        def serve() -> None:
            try:
                run.outcome.append(monitor.run())
            except BaseException as exc:  # noqa: BLE001 - the property: this never happens
                run.outcome.append(exc)

        run.thread = threading.Thread(target=serve, daemon=True)
        run.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not Path(record.control_socket).exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        monitor.conn_ready.wait(WAIT_S)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.guest.close()
        run.thread.join(WAIT_S)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def exec_outcome(conn: AgentConnection, proc_id: int = EXEC_ID) -> tuple[str, object]:
    """What an exec client heard: ("exit", code) or ("lost", why)."""
    try:
        result = attach_process(conn, proc_id, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(), timeout=WAIT_S)
        return "exit", result.exit_code
    except (GuestError, OSError) as exc:
        return "lost", str(exc)
    finally:
        conn.close()


def started(proc_id: int) -> bytes:
    return encode_frame(FrameType.STARTED, proc_id, f"pid={proc_id} uptime_ms=1".encode())


def test_sprayed_exits_stop_the_vm_and_never_end_a_running_exec(monitor_run) -> None:  # noqa: ANN001
    """Issue 15: EXIT frames sprayed to every process id made a concurrent exec return 0 while
    its process ran. The first EXIT for an id that does not run is a protocol violation."""
    run = monitor_run()
    run.guest.send(started(1))
    execing = run.start_exec()
    run.guest.send(started(EXEC_ID))
    spray = b"".join(encode_frame(FrameType.EXIT, i, encode_exit(0)) for i in [*range(2, 200), EXEC_ID, 1])
    run.guest.send(spray)
    kind, _ = exec_outcome(execing)
    assert kind == "lost"  # no exit code at all: not the forged 0
    record = run.end()
    assert run.hv.destroyed.is_set()
    assert record.state == State.EXITED and record.exit_code == 137
    assert "broke the protocol" in record.error and "process 2" in record.error


def test_exit_twice_for_an_exec_is_a_violation_after_the_first_was_delivered(monitor_run) -> None:  # noqa: ANN001
    run = monitor_run()
    run.guest.send(started(1))
    execing = run.start_exec()
    run.guest.send(started(EXEC_ID) + encode_frame(FrameType.EXIT, EXEC_ID, encode_exit(4)))
    assert exec_outcome(execing) == ("exit", 4)
    run.guest.send(encode_frame(FrameType.EXIT, EXEC_ID, encode_exit(0)))
    record = run.end()
    assert "broke the protocol" in record.error and run.hv.destroyed.is_set()


def test_started_with_a_bad_pid_stops_the_vm_and_the_exec_gets_no_traceback(monitor_run) -> None:  # noqa: ANN001
    """``kvmc exec`` died with a ValueError traceback on ``STARTED pid=abc``."""
    run = monitor_run()
    run.guest.send(started(1))
    execing = run.start_exec()
    run.guest.send(encode_frame(FrameType.STARTED, EXEC_ID, b"pid=abc uptime_ms=1"))
    assert exec_outcome(execing)[0] == "lost"
    record = run.end()
    assert "pid is not a number" in record.error and run.hv.destroyed.is_set()


@pytest.mark.parametrize("bad", [
    raw_frame(0x42, 1, b"x"),                                 # unknown type
    raw_frame(FrameType.RUN, 1, b"arg=sh\0"),                 # host-to-guest type from the guest
    raw_frame(FrameType.STDOUT, 1, length=MAX_PAYLOAD + 1),    # oversized
    raw_frame(FrameType.EXIT, 1, b"\0\0\0"),                  # short EXIT
    raw_frame(FrameType.EXIT, 1, b"\2\0\0\0\0"),              # unknown EXIT kind
    raw_frame(FrameType.EXIT, 1, b"\1\0\0\1\0"),              # signal 256
    raw_frame(FrameType.READY, 0, b"kvmc-agent/9"),           # another protocol
    raw_frame(FrameType.READY, 3, b"kvmc-agent/3"),           # READY is the VM's
    raw_frame(FrameType.STARTED, 1, b"pid=1"),                # STARTED twice
    raw_frame(FrameType.ERROR, 1, b"started already"),        # ERROR after STARTED
    raw_frame(FrameType.STDERR, 0, b"the VM has no output"),  # frame for id 0
    raw_frame(FrameType.STDOUT, 9, b"never run"),              # frame for an id never run
], ids=["unknown-type", "wrong-direction", "oversized", "short-exit", "exit-kind", "exit-signal",
        "version", "ready-id", "started-twice", "error-late", "id-0", "unknown-id"])
def test_every_kind_of_violation_stops_the_vm_with_a_recorded_error(monitor_run, bad: bytes) -> None:  # noqa: ANN001
    run = monitor_run()
    attached = run.attach()
    run.guest.send(started(1) + encode_frame(FrameType.STDOUT, 1, b"fine\n") + bad)
    result = attach_process(attached, 1, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(), timeout=WAIT_S)
    assert result.exit_code == 137 and "broke the protocol" in (result.error or "")
    record = run.end()
    assert record.exit_code == 137 and "broke the protocol" in record.error and run.hv.destroyed.is_set()


def test_a_truncated_frame_then_silence_then_hangup_is_a_lost_vm(monitor_run) -> None:  # noqa: ANN001
    run = monitor_run()
    run.guest.send(started(1) + raw_frame(FrameType.STDOUT, 1, length=100) + b"only part")
    run.guest.close()
    record = run.end()
    assert record.exit_code == 137 and "stopped unexpectedly" in record.error and run.hv.destroyed.is_set()


def test_error_text_from_the_guest_is_escaped_and_labelled(monitor_run) -> None:  # noqa: ANN001
    run = monitor_run()
    attached = run.attach()
    run.guest.send(encode_frame(FrameType.ERROR, 1, b"exec failed\nkvmc: all is well \x1b[2J")
                   + encode_frame(FrameType.EXIT, 1, encode_exit(126)))
    result = attach_process(attached, 1, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(), timeout=WAIT_S)
    assert result.error == "exec failed\\nkvmc: all is well \\x1b[2J"
    record = run.end()
    assert record.error == "exec failed\\nkvmc: all is well \\x1b[2J (reported by the guest agent)"
    assert not run.hv.destroyed.is_set()  # an ERROR is no violation


# A guest's script: ("frame", kind, ...) steps the test knows to be valid or not.
steps = st.lists(st.one_of(
    st.tuples(st.just("out"), st.sampled_from([FrameType.STDOUT, FrameType.STDERR]), st.binary(max_size=40)),
    st.tuples(st.just("exec-out"), st.binary(max_size=40)),
    st.tuples(st.just("exec-started")),
    st.tuples(st.just("exec-error"), st.binary(max_size=40)),
    st.tuples(st.just("exec-exit"), st.integers(0, 255)),
    st.tuples(st.just("main-exit"), st.integers(0, 255)),
    st.tuples(st.just("spray"), st.integers(0, 0xFFFF), st.integers(0, 255)),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("bad-payload"), st.sampled_from([FrameType.STARTED, FrameType.EXIT, FrameType.READY]),
              st.binary(max_size=12)),
), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_monitor_against_random_guest_scripts(monitor_run, script: list[tuple]) -> None:  # noqa: ANN001
    """Whatever the guest sends: the monitor ends cleanly and records the end; a frame known to
    be outside the protocol stops the VM; the exec hears an exit code only if the guest sent a
    valid EXIT for it, and then that code."""
    run = monitor_run()
    run.guest.send(started(1))
    execing = run.start_exec()
    exec_state = "requested"
    expect_exit: int | None = None
    violated = ended = unknown = False
    for step in script:
        kind = step[0]
        if kind == "out":
            data = encode_frame(step[1], 1, step[2])
        elif kind == "exec-out":
            data = encode_frame(FrameType.STDOUT, EXEC_ID, step[1])
            violated |= exec_state == "exited"
        elif kind == "exec-started":
            data = started(EXEC_ID)
            violated |= exec_state != "requested"
            exec_state = "started" if exec_state == "requested" else exec_state
        elif kind == "exec-error":
            data = encode_frame(FrameType.ERROR, EXEC_ID, step[1])
            violated |= exec_state != "requested"
            exec_state = "failed" if exec_state == "requested" else exec_state
        elif kind == "exec-exit":
            data = encode_frame(FrameType.EXIT, EXEC_ID, encode_exit(step[1]))
            if exec_state in ("started", "failed") and not violated:
                expect_exit = step[1]
            violated |= exec_state not in ("started", "failed")
            exec_state = "exited"
        elif kind == "main-exit":
            data = encode_frame(FrameType.EXIT, 1, encode_exit(step[1]))
            ended = True
        elif kind == "spray":
            if step[1] == EXEC_ID:
                continue  # the one id a guest could forge an EXIT for: it must know it (random in kvmc)
            data = encode_frame(FrameType.EXIT, step[1], encode_exit(step[2]))
            if step[1] == 1:
                ended = True  # process 1 started: its EXIT is valid and ends the container
            else:
                violated = True  # no other process runs
        elif kind == "garbage":
            data = step[1]
            unknown = True
        else:
            payload = step[2]
            data = encode_frame(step[1], 1 if step[1] != FrameType.READY else 0, payload)
            unknown = True  # may happen to be valid (an EXIT of 5 good bytes)
        run.guest.send(data)
        if violated or ended or unknown:
            break
    if not (violated or ended):
        run.guest.close()
    kind, code = exec_outcome(execing)
    record = run.end()
    if kind == "exit":
        assert code == expect_exit or unknown, (script, code, expect_exit)
    if violated and not unknown:
        assert "broke the protocol" in (record.error or ""), record.error
        assert run.hv.destroyed.is_set()
    assert record.state == State.EXITED


# --------------------------------------------------- the CLI's attach path
@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.builds(lambda t, pid, p: raw_frame(t, pid, p), st.sampled_from(sorted(GUEST_TO_HOST)),
              st.sampled_from([0, 1, 2, EXEC_ID]), st.binary(max_size=20)),
    st.binary(max_size=20),
), max_size=10))
def test_attach_process_raises_only_kvmc_errors(pieces: list[bytes]) -> None:
    """The CLI's side of exec/attach against whatever a (compromised) monitor socket sends."""
    host_end, far_end = socket.socketpair()
    far_end.sendall(b"".join(pieces))
    far_end.close()
    try:
        with AgentConnection(host_end) as conn:
            result = attach_process(conn, EXEC_ID, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(),
                                    timeout=1.0)
        assert 0 <= result.exit_code <= 255
    except KvmcError:
        pass


# --------------------------------------------------------- giving up waiting
class GaveUp(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def test_second_sigint_gives_up_at_once_and_forwards_the_first() -> None:
    forwarded: list[int] = []
    watch = SignalWatch(forwarded.append, GaveUp, ack_s=60)
    watch(signal.SIGINT)
    with pytest.raises(GaveUp) as caught:
        watch(signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM
    time.sleep(0.1)
    assert forwarded == [signal.SIGINT]


def test_unanswered_signal_gives_up_after_the_grace_period() -> None:
    """The attached process's guest says nothing after a Ctrl-C: attach_process ends."""
    host_end, far_end = socket.socketpair()
    watch = SignalWatch(lambda signum: None, GaveUp, ack_s=0.3)
    with AgentConnection(host_end) as conn:
        watch(signal.SIGINT)
        began = time.monotonic()
        with pytest.raises(GaveUp):
            attach_process(conn, 1, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(), watch=watch)
        assert time.monotonic() - began < 2
    far_end.close()


def test_answered_signal_keeps_waiting() -> None:
    host_end, far_end = socket.socketpair()
    watch = SignalWatch(lambda signum: None, GaveUp, ack_s=0.3)
    with AgentConnection(host_end) as conn:
        watch(signal.SIGINT)

        def guest() -> None:
            for _ in range(4):
                far_end.sendall(encode_frame(FrameType.STDOUT, 1, b"still here\n"))
                time.sleep(0.2)
            far_end.sendall(encode_frame(FrameType.EXIT, 1, encode_exit(0)))

        threading.Thread(target=guest, daemon=True).start()
        out = io.BytesIO()
        result = attach_process(conn, 1, stdin=None, stdout=out, stderr=io.BytesIO(), watch=watch)
    assert result.exit_code == 0 and out.getvalue().count(b"still here") == 4
    far_end.close()


def test_guest_output_the_host_reads_is_bounded() -> None:
    from kvmc.agent import GuestOutput

    sink = GuestOutput(10)
    for _ in range(1000):
        assert sink.write(b"x" * 1000) == 1000
    assert sink.getvalue() == b"x" * 10 and sink.dropped == 1000 * 1000 - 10

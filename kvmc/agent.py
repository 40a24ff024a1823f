"""Host side of "kvmc-agent protocol 3", spoken with the guest agent over virtio-serial.

The wire format is described in ``docs/agent-protocol.md``; the guest side is
``images/agent/kvmc-agent.c``. On the host the port is QEMU's unix socket for the
``org.kvmc.agent`` virtio-serial port (tests use a plain unix socket the agent connects to).

Everything here is stdlib only: frame encoding/decoding, a small connection object and
:func:`attach_process`, which relays one process's stdio until it exits.
"""

from __future__ import annotations

import io
import os
import re
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO, Callable

from kvmc.detach import DetachScanner
from kvmc.errors import AgentProtocolError, AgentSilent, GuestError

PROTOCOL_VERSION = 3
RUN_TTY = 0x01
"""RUN header flag (protocol 2): the agent gives the process a pseudo-terminal."""
MAX_PAYLOAD = 1 << 20
OUTPUT_CHUNK = 32 * 1024
"""The agent never sends STDOUT/STDERR payloads larger than this."""
MAIN_PROCESS_ID = 1
MAX_HELD_FRAMES = 64
"""READY is the agent's first frame: :meth:`AgentConnection.wait_ready` keeps at most this many
frames that come before it."""
"""The container's main process: when it ends, the VM ends."""

_HEADER = struct.Struct(">BBHI")  # type, flags, process id, payload length
HEADER_SIZE = _HEADER.size


class FrameType(IntEnum):
    """Frame types; 0x0_ go host to guest, 0x1_ guest to host."""

    RUN = 0x01
    STDIN = 0x02
    SIGNAL = 0x03
    SHUTDOWN = 0x04
    EXIT_ACK = 0x05
    RESIZE = 0x06
    """Protocol 2: u16 rows, u16 columns: the window size of a TTY process's terminal."""
    REATTACH = 0x07
    """Protocol 3: a nonce: a host connecting to a running VM asks where things stand (TABLE)."""
    READY = 0x10
    STARTED = 0x11
    STDOUT = 0x12
    STDERR = 0x13
    EXIT = 0x14
    ERROR = 0x15
    TABLE = 0x16
    """Protocol 3: the answer to REATTACH, the agent's processes (see :class:`AgentTable`)."""
    ATTACH = 0x20
    """Client to kvmc's monitor only (never reaches the guest): relay process 1's output to me."""
    STOP = 0x21
    """Client to kvmc's monitor only: docker's ``stop --signal``, u32 timeout and u32 signal."""


HOST_TO_GUEST = frozenset(t for t in FrameType if t < 0x10)
GUEST_TO_HOST = frozenset(t for t in FrameType if 0x10 <= t < 0x20)
CLIENT_TO_MONITOR = (HOST_TO_GUEST - {FrameType.REATTACH}) | {FrameType.ATTACH, FrameType.STOP}
"""A client of the monitor never re-attaches: the monitor holds the agent's one connection."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    proc_id: int
    payload: bytes
    flags: int = 0


def encode_frame(type: int, proc_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """Return the bytes of one frame; raise AgentProtocolError if it cannot be sent."""
    try:
        ftype = FrameType(type)
    except ValueError:
        raise AgentProtocolError(f"unknown agent frame type 0x{type:02x}") from None
    if len(payload) > MAX_PAYLOAD:
        raise AgentProtocolError(f"agent frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= proc_id <= 0xFFFF or not 0 <= flags <= 0xFF:
        raise AgentProtocolError(f"agent frame process id {proc_id} or flags {flags} out of range")
    return _HEADER.pack(ftype, flags, proc_id, len(payload)) + payload


class FrameReader:
    """Incremental frame decoder: :meth:`feed` bytes, then take frames with :meth:`next_frame`.

    ``accept`` is the set of types this side may receive (guest-to-host by default); anything
    else, or a payload length over :data:`MAX_PAYLOAD`, raises AgentProtocolError. After an
    error the stream cannot be resynchronised: close the connection.

    Memory: the header is checked as soon as it is complete, so the buffer never holds more
    than one frame (header + at most :data:`MAX_PAYLOAD`) plus whatever the last :meth:`feed`
    added, as long as the caller takes every complete frame before feeding more.
    """

    def __init__(self, accept: frozenset[FrameType] = GUEST_TO_HOST) -> None:
        self._buf = bytearray()
        self._accept = accept

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed."""
        if len(self._buf) < HEADER_SIZE:
            return None
        ftype, flags, proc_id, length = _HEADER.unpack_from(self._buf)
        if ftype not in self._accept:
            raise AgentProtocolError(f"the peer sent a frame of unknown or unexpected type 0x{ftype:02x}")
        if length > MAX_PAYLOAD:
            raise AgentProtocolError(f"the peer sent a frame of {length} bytes (max {MAX_PAYLOAD})")
        if len(self._buf) < HEADER_SIZE + length:
            return None
        payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
        del self._buf[: HEADER_SIZE + length]
        return Frame(FrameType(ftype), proc_id, payload, flags)


@dataclass
class ProcessSpec:
    """What to run: the payload of a RUN frame."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str | None = None
    user: str | None = None
    hostname: str | None = None
    stdin: bool = False
    time_ns: int | None = None
    seed: bytes | None = None
    tty: bool = False
    """Protocol 2: a pseudo-terminal for stdin, stdout and stderr (sent as the RUN_TTY flag)."""
    winsize: tuple[int, int] | None = None
    """(rows, columns) of that terminal at start."""
    # Container setup, applied by the agent before the main process (id 1) starts; see
    # docs/agent-protocol.md. A mount is "FSTYPE:SOURCE:OPTIONS:TARGET" (TARGET last, so it
    # is the only field that may hold a colon); SOURCE "@SERIAL" names a virtio-blk disk by
    # its serial.
    mounts: list[str] = field(default_factory=list)
    readonly_root: bool = False
    net: str | None = None
    """``ADDRESS/PREFIX,GATEWAY`` for eth0, or None: no interface is configured."""
    netifs: list[str] = field(default_factory=list)
    """``MATCHMAC,NAME,MAC,ADDRESS/PREFIX`` per NIC on a kvmc network (kvmc/net/)."""
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    """Extra /etc/hosts lines, ``IP NAME [NAME...]`` (docker's --add-host)."""
    stop_signal: int | None = None
    """What SHUTDOWN sends process 1 (docker's --stop-signal); SIGTERM when None."""
    # Any process (execs too): docker's --ulimit as ``NAME:SOFT:HARD`` (-1 unlimited) and the
    # capabilities dropped from the bounding set (numbers), both applied right before the exec.
    ulimits: list[str] = field(default_factory=list)
    cap_drop: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        """Return the RUN payload: NUL-terminated ``key=value`` items."""
        if not self.args:
            raise ValueError("a process needs at least one argument")
        items = [("proto", str(PROTOCOL_VERSION))]
        items += [("arg", a) for a in self.args] + [("env", e) for e in self.env]
        for key, value in (("cwd", self.cwd), ("user", self.user), ("hostname", self.hostname)):
            if value is not None:
                items.append((key, value))
        if self.stdin:
            items.append(("stdin", "1"))
        if self.tty and self.winsize and all(self.winsize):
            items.append(("winsize", f"{self.winsize[0]}x{self.winsize[1]}"))
        if self.time_ns is not None:
            items.append(("time_ns", str(self.time_ns)))
        if self.seed:
            items.append(("seed", self.seed.hex()))
        items += [("mount", m) for m in self.mounts]
        if self.readonly_root:
            items.append(("readonly_root", "1"))
        items += [("netif", n) for n in self.netifs]
        if self.net:
            items.append(("net", self.net))
        items += [("dns", d) for d in self.dns]
        items += [("dns_search", d) for d in self.dns_search] + [("dns_option", o) for o in self.dns_options]
        items += [("host", h) for h in self.hosts]
        if self.stop_signal:
            items.append(("stop_signal", str(self.stop_signal)))
        items += [("ulimit", u) for u in self.ulimits] + [("cap_drop", str(c)) for c in self.cap_drop]
        out = bytearray()
        for key, value in items:
            raw = value.encode()
            if b"\0" in raw:
                raise ValueError(f"NUL byte in {key} {value!r}")
            out += key.encode() + b"=" + raw + b"\0"
        return bytes(out)


@dataclass
class ProcessResult:
    """How a process ended, docker style: ``exit_code`` is the code or 128+signal."""

    exit_code: int
    signal: int | None = None
    error: str | None = None
    """Why it did not start: the guest agent's words (ERROR), escaped (:func:`guest_text`);
    :func:`labelled` says whose words they are."""
    pid: int | None = None
    started_uptime_ms: int | None = None
    ready_uptime_ms: int | None = None
    detached: bool = False
    """The relay ended before the process did (detach keys, or a TTY client's stdin ended):
    the process goes on and ``exit_code`` means nothing."""


GUEST_TEXT_LIMIT = 2000
"""At most this many characters of guest-written text go into one of kvmc's messages."""
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_NEWLINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
GUEST_REPORT = "reported by the guest agent"
"""The label on text the guest wrote (ERROR frames) wherever kvmc shows it."""


def guest_text(payload: bytes, limit: int = GUEST_TEXT_LIMIT, *, one_line: bool = True) -> str:
    """Text the guest wrote, safe to put in kvmc's own messages: invalid UTF-8 replaced, control
    characters (newlines too when ``one_line``) shown as escapes, so that a guest can neither
    drive the reader's terminal nor fake a line of kvmc's; at most ``limit`` characters."""
    text = payload[: limit * 4].decode(errors="replace")
    pattern = _CONTROL_OR_NEWLINE if one_line else _CONTROL
    text = pattern.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[:limit] + "..."


class GuestOutput(io.RawIOBase):
    """A sink for output of a process in the guest that the host reads itself (``stat``, ``ps``,
    ``tar``'s complaints): keeps the first ``limit`` bytes and only counts the rest, since a
    guest can write any amount."""

    def __init__(self, limit: int = 1 << 20) -> None:
        super().__init__()
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        take = max(0, self.limit - len(self.data))
        self.data += b[:take]
        self.dropped += max(0, len(b) - take)
        return len(b)

    def getvalue(self) -> bytes:
        return bytes(self.data)


def labelled(error: str) -> str:
    """An ERROR frame's text (:attr:`ProcessResult.error`) as kvmc reports it: the guest's
    words, labelled as such (idempotent)."""
    return error if error.endswith(f"({GUEST_REPORT})") else f"{error} ({GUEST_REPORT})"


def _fields(payload: bytes, what: str) -> dict[str, str]:
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise AgentProtocolError(f"malformed {what} payload from the guest: {guest_text(payload, 200)!r}") from None
    return dict(word.split("=", 1) for word in text.split() if "=" in word)


def _number(fields: dict[str, str], key: str, what: str, payload: bytes, maximum: int) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not (value.isdigit() and value.isascii()) or int(value) > maximum:
        raise AgentProtocolError(f"malformed {what} payload from the guest ({key} is not a number "
                                 f"up to {maximum}): {guest_text(payload, 200)!r}")
    return int(value)


_MAX_UPTIME_MS = 1 << 62
_MAX_PID = (1 << 31) - 1


def parse_uptime(payload: bytes, what: str = "READY") -> int | None:
    """The ``uptime_ms=N`` a READY or STARTED payload carries (guest ms since boot), or None
    if absent; AgentProtocolError if it is there and not a number."""
    return _number(_fields(payload, what), "uptime_ms", what, payload, _MAX_UPTIME_MS)


def parse_started(payload: bytes) -> tuple[int | None, int | None]:
    """A STARTED payload (``pid=<pid> uptime_ms=<ms>``) as (pid, uptime_ms); AgentProtocolError
    if either is there and not a number."""
    fields = _fields(payload, "STARTED")
    return (_number(fields, "pid", "STARTED", payload, _MAX_PID),
            _number(fields, "uptime_ms", "STARTED", payload, _MAX_UPTIME_MS))


def parse_ready(payload: bytes) -> int | None:
    """Check a READY payload's protocol version; return the guest uptime it carries (ms)."""
    text = payload.decode(errors="replace")
    if not text.startswith(f"kvmc-agent/{PROTOCOL_VERSION} ") and text != f"kvmc-agent/{PROTOCOL_VERSION}":
        raise AgentProtocolError(f"guest agent speaks {guest_text(payload, 40).split(' ')[0]!r}, "
                                 f"kvmc needs kvmc-agent/{PROTOCOL_VERSION}")
    return parse_uptime(payload)


def encode_resize(rows: int, cols: int) -> bytes:
    """A RESIZE payload: u16 rows, u16 columns (each clamped to 1..65535)."""
    return struct.pack(">HH", max(1, min(rows, 0xFFFF)), max(1, min(cols, 0xFFFF)))


def parse_resize(payload: bytes) -> tuple[int, int]:
    """Decode a RESIZE payload into (rows, columns)."""
    if len(payload) != 4:
        raise AgentProtocolError(f"malformed RESIZE payload {payload!r}")
    rows, cols = struct.unpack(">HH", payload)
    return rows, cols


def encode_exit(code: int) -> bytes:
    """An EXIT payload for a process that exited with ``code`` (kind 0), as the agent sends it."""
    return struct.pack(">BI", 0, code)


def parse_exit(payload: bytes) -> tuple[int, int | None]:
    """Decode an EXIT payload into (docker exit code, signal or None).

    A process exits with 0..255 or is killed by a signal 1..127 (so that 128 + signal is still
    an exit status); anything else is no process's end and a protocol error.
    """
    if len(payload) != 5 or payload[0] not in (0, 1):
        raise AgentProtocolError(f"malformed EXIT payload from the guest: {payload[:16]!r}")
    kind, value = struct.unpack(">BI", payload)
    if kind == 0 and value > 255 or kind == 1 and not 1 <= value <= 127:
        raise AgentProtocolError(f"EXIT payload from the guest with an impossible "
                                 f"{'exit code' if kind == 0 else 'signal'} {value}")
    return (value, None) if kind == 0 else (128 + value, value)


@dataclass(frozen=True)
class TableEntry:
    """One process in a TABLE: its guest pid, and how it stands."""

    pid: int
    state: str
    """``starting`` (STARTED or ERROR follows), ``running``, or ``exited`` (process 1 only: its
    EXIT went to a host that left before acknowledging it)."""
    exit_code: int | None = None
    signal: int | None = None


@dataclass(frozen=True)
class AgentTable:
    """The agent's answer to REATTACH (docs/agent-protocol.md, "Re-attaching")."""

    processes: dict[int, TableEntry]
    dropped: int
    """Bytes of process 1's output the agent dropped while no host was connected."""
    dropped_other: int
    """The same for every other process."""


FIRST_WORD_S = 15.0
"""How long kvmc waits for the agent's first word on its first connection to a just restored or
cloned VM before it connects once more. Seen under load (3 of 7 runs of five e2e files in
parallel, two warm-ups at a time): QEMU 7.2 left that first connection unanswered while its
chardev said "disconnected"; a second connection to the same socket was answered at once
(docs/platform.md). The agent normally answers a RUN in well under a second."""

TABLE_STATES = ("starting", "running", "exited")
MAX_TABLE_PAYLOAD = 64 * 1024
MAX_REATTACH_SKIP = 64 << 20
"""What may precede the TABLE on a re-attached port: frames the agent queued before it, held by
QEMU or half-read by the host that left. Far less in practice (the agent's queue is 1 MiB)."""


def parse_table(payload: bytes, nonce_hex: str) -> AgentTable:
    """Decode a TABLE payload; AgentProtocolError unless it is well-formed and answers ``nonce_hex``."""
    _fields(payload, "TABLE")  # ASCII, or AgentProtocolError
    lines = payload.decode("ascii").split("\n")
    head = _fields(lines[0].encode(), "TABLE")
    if head.get("nonce") != nonce_hex:
        raise AgentProtocolError("the guest's TABLE answers another REATTACH")
    if head.get("proto") != str(PROTOCOL_VERSION):
        raise AgentProtocolError(f"the guest's TABLE speaks protocol {guest_text(head.get('proto', '?').encode(), 8)!r}, "
                                 f"kvmc needs {PROTOCOL_VERSION}")
    dropped = _number(head, "dropped", "TABLE", payload, 1 << 62) or 0
    dropped_other = _number(head, "dropped_other", "TABLE", payload, 1 << 62) or 0
    processes: dict[int, TableEntry] = {}
    for line in filter(None, lines[1:]):
        fields = _fields(line.encode(), "TABLE")
        proc_id = _number(fields, "id", "TABLE", payload, 0xFFFF)
        pid = _number(fields, "pid", "TABLE", payload, _MAX_PID)
        state = fields.get("state")
        if not proc_id or pid is None or state not in TABLE_STATES or proc_id in processes:
            raise AgentProtocolError(f"malformed TABLE line from the guest: {guest_text(line.encode(), 200)!r}")
        code = signum = None
        if state == "exited":
            kind, _, value = fields.get("exit", "").partition(":")
            if proc_id != MAIN_PROCESS_ID or kind not in ("0", "1") or not (value.isdigit() and value.isascii()) \
                    or len(value) > 10:
                raise AgentProtocolError(f"malformed TABLE line from the guest: {guest_text(line.encode(), 200)!r}")
            code, signum = parse_exit(struct.pack(">BI", int(kind), int(value)))
        processes[proc_id] = TableEntry(pid, state, code, signum)
    return AgentTable(processes, dropped, dropped_other)


class ProcessTable:
    """What the guest may say about which process, by the protocol's lifecycle
    (docs/agent-protocol.md, "Process lifecycle"): only about processes the host asked for
    (RUN), STARTED or ERROR once and before EXIT, EXIT once, nothing after it. :meth:`check`
    raises AgentProtocolError for a frame outside that: an EXIT for a process that is not
    running (sprayed, or a second one) never reaches anyone as an exit code.

    Output (STDOUT/STDERR) may precede STARTED: the agent reads the process's pipes and its
    exec report in one poll loop, in any order. Thread-safe.
    """

    REQUESTED, STARTED, FAILED = "requested", "started", "failed"

    def __init__(self) -> None:
        self._state: dict[int, str] = {}
        self._lock = threading.Lock()

    def requested(self, proc_id: int) -> bool:
        """Record a RUN for ``proc_id`` about to be sent; False if the id is in use."""
        with self._lock:
            if proc_id in self._state or not 0 < proc_id <= 0xFFFF:
                return False
            self._state[proc_id] = self.REQUESTED
            return True

    def adopt(self, proc_id: int, started: bool) -> None:
        """A process a re-attached agent reports (its TABLE): started, or still starting."""
        with self._lock:
            self._state[proc_id] = self.STARTED if started else self.REQUESTED

    def forget(self, proc_id: int) -> None:
        """A RUN that was never sent (the connection failed)."""
        with self._lock:
            self._state.pop(proc_id, None)

    def started(self, proc_id: int) -> bool:
        with self._lock:
            return self._state.get(proc_id) == self.STARTED

    def running(self) -> list[int]:
        with self._lock:
            return sorted(self._state)

    def check(self, frame: Frame) -> None:
        """Validate one guest frame (type, process, payload) and advance the process's state."""
        ftype, proc_id = frame.type, frame.proc_id
        if ftype == FrameType.READY:
            if proc_id != 0:
                raise AgentProtocolError(f"the guest sent READY for process {proc_id} (READY is the VM's, id 0)")
            parse_ready(frame.payload)
            return
        if ftype == FrameType.TABLE:
            raise AgentProtocolError("the guest sent TABLE unasked (it only answers REATTACH)")
        with self._lock:
            state = self._state.get(proc_id)
            if state is None:
                raise AgentProtocolError(f"the guest sent {ftype.name} for process {proc_id}, which kvmc did not "
                                         "start or which has exited")
            if ftype == FrameType.STARTED:
                if state != self.REQUESTED:
                    raise AgentProtocolError(f"the guest sent STARTED for process {proc_id} twice or after its ERROR")
                parse_started(frame.payload)
                self._state[proc_id] = self.STARTED
            elif ftype == FrameType.ERROR:
                if state != self.REQUESTED:
                    raise AgentProtocolError(f"the guest sent ERROR for process {proc_id} after it started")
                self._state[proc_id] = self.FAILED
            elif ftype == FrameType.EXIT:
                if state == self.REQUESTED:
                    raise AgentProtocolError(f"the guest sent EXIT for process {proc_id} before its start was "
                                             "resolved (no STARTED or ERROR)")
                parse_exit(frame.payload)
                del self._state[proc_id]


class AgentConnection:
    """A connection to one guest agent. Sending is thread-safe; read from one thread only."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader()
        self._backlog: deque[Frame] = deque()
        self._send_lock = threading.Lock()
        self.ready_uptime_ms: int | None = None

    @classmethod
    def connect(cls, socket_path: str, timeout: float = 10.0) -> AgentConnection:
        """Connect to a unix socket (QEMU's chardev), retrying until it exists and listens."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(socket_path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise GuestError(f"cannot connect to the guest agent at {socket_path}: {exc}") from exc
                time.sleep(0.05)

    def fileno(self) -> int:
        """The socket's file descriptor (for selectors)."""
        return self.sock.fileno()

    def send(self, type: FrameType, proc_id: int, payload: bytes = b"", flags: int = 0) -> None:
        """Send one frame."""
        data = encode_frame(type, proc_id, payload, flags)
        with self._send_lock:
            self.sock.sendall(data)

    def run(self, proc_id: int, spec: ProcessSpec) -> None:
        """Ask the agent to start a process under ``proc_id`` (1 = the container's main process)."""
        self.send(FrameType.RUN, proc_id, spec.encode(), RUN_TTY if spec.tty else 0)

    def send_stdin(self, proc_id: int, data: bytes) -> None:
        """Send bytes to the process's stdin (only if it was started with ``stdin=True``)."""
        for i in range(0, len(data), MAX_PAYLOAD):
            self.send(FrameType.STDIN, proc_id, data[i : i + MAX_PAYLOAD])

    def close_stdin(self, proc_id: int) -> None:
        """Close the process's stdin (an empty STDIN frame)."""
        self.send(FrameType.STDIN, proc_id, b"")

    def signal(self, proc_id: int, signum: int) -> None:
        """Deliver a signal to the process (not to its children)."""
        self.send(FrameType.SIGNAL, proc_id, struct.pack(">I", signum))

    def resize(self, proc_id: int, rows: int, cols: int) -> None:
        """Set the window size of a TTY process's terminal (SIGWINCH in the guest)."""
        self.send(FrameType.RESIZE, proc_id, encode_resize(rows, cols))

    def shutdown(self, timeout_s: int) -> None:
        """SIGTERM every process, SIGKILL after ``timeout_s`` seconds, then power the VM off."""
        self.send(FrameType.SHUTDOWN, 0, struct.pack(">I", timeout_s))

    def ack_exit(self, proc_id: int) -> None:
        """Tell the agent its EXIT for ``proc_id`` arrived (for id 1 this ends the VM)."""
        self.send(FrameType.EXIT_ACK, proc_id)

    def read_frame(self, timeout: float | None = None) -> Frame | None:
        """Return the next frame, or None after ``timeout`` seconds (None waits forever).

        Raises GuestError when the agent closes the connection, AgentProtocolError on a
        frame outside the protocol.
        """
        if self._backlog:
            return self._backlog.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (frame := self._reader.next_frame()) is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], remaining)[0]:
                return None
            data = self.sock.recv(1 << 16)
            if not data:
                raise GuestError("the guest agent closed the connection")
            self._reader.feed(data)
        if frame.type == FrameType.READY:
            self.ready_uptime_ms = parse_ready(frame.payload)
        return frame

    def heard_within(self, timeout: float) -> bool:
        """Whether the agent says anything within ``timeout`` seconds; what it said is kept for
        the next :meth:`read_frame`."""
        frame = self.read_frame(timeout)
        if frame is None:
            return False
        self._backlog.appendleft(frame)
        return True

    def reattach(self, timeout: float | None, check: Callable[[], None] | None = None) -> tuple[AgentTable, int]:
        """Take over a running VM's agent from a host that left (a monitor that died): send
        REATTACH with a fresh nonce and skip what the stream holds before the TABLE answering
        it (frames queued for the old host, maybe starting mid-frame). Returns the TABLE and
        how many bytes were skipped. ``check`` runs about once a second while nothing comes
        (a paused VM answers once resumed): it raises if waiting is pointless."""
        nonce = os.urandom(16)
        needle = b"nonce=" + nonce.hex().encode()
        self.send(FrameType.REATTACH, 0, nonce)
        buf, skipped = bytearray(), 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            at = buf.find(needle)
            if at >= 0:
                start = at - HEADER_SIZE
                ftype, _flags, proc_id, length = _HEADER.unpack_from(buf, start) if start >= 0 else (0, 0, 0, 0)
                if ftype != FrameType.TABLE or proc_id != 0 or length > MAX_TABLE_PAYLOAD:
                    skipped += at + 1  # the needle inside other data, or its header cut off
                    del buf[:at + 1]
                    continue
                if len(buf) >= at + length:
                    table = parse_table(bytes(buf[at:at + length]), nonce.hex())
                    self._reader.feed(bytes(buf[at + length:]))
                    return table, skipped + start
            elif len(buf) > len(needle) + HEADER_SIZE:
                keep = len(needle) + HEADER_SIZE
                skipped += len(buf) - keep
                del buf[:-keep]
            if skipped > MAX_REATTACH_SKIP:
                raise AgentProtocolError(f"the guest agent did not answer REATTACH within {skipped} bytes")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = 1.0 if left is None else min(left, 1.0)
            if not select.select([self.sock], [], [], wait)[0]:
                if deadline is not None and time.monotonic() >= deadline:
                    raise GuestError(f"the guest agent did not answer REATTACH within {timeout:g}s")
                if check is not None:
                    check()
                continue
            data = self.sock.recv(1 << 16)
            if not data:
                raise GuestError("the guest agent closed the connection")
            buf += data

    def wait_ready(self, timeout: float, check: Callable[[], None] | None = None) -> str:
        """Wait for READY and return its payload text; other frames stay queued for read_frame.
        ``check`` is called about once a second meanwhile, to raise if waiting is pointless
        (the VM paused on a full disk)."""
        deadline = time.monotonic() + timeout
        held: list[Frame] = []
        try:
            while True:
                left = max(0.0, deadline - time.monotonic())
                frame = self.read_frame(left if check is None else min(left, 1.0))
                if frame is None and check is not None and time.monotonic() < deadline:
                    check()
                    continue
                if frame is None:
                    raise GuestError(f"the guest agent did not become ready within {timeout:g}s")
                if frame.type == FrameType.READY:
                    return frame.payload.decode(errors="replace")
                held.append(frame)
                if len(held) > MAX_HELD_FRAMES:
                    raise AgentProtocolError(f"the guest agent sent {len(held)} frames before READY")
        finally:
            self._backlog.extendleft(reversed(held))

    def close(self) -> None:
        """Close the connection (in test/socket mode the agent then kills its processes)."""
        self.sock.close()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump_stdin(conn: AgentConnection, proc_id: int, stdin: BinaryIO, done: threading.Event,
                detached: threading.Event, close_at_eof: bool, scanner: DetachScanner | None,
                end_at_eof: bool) -> None:
    read = getattr(stdin, "read1", stdin.read)
    try:
        while not done.is_set():
            data = read(OUTPUT_CHUNK)
            if not data:
                break
            if scanner is not None:
                data, detach = scanner.feed(data)
                if data and not done.is_set():
                    conn.send_stdin(proc_id, data)
                if detach:
                    _end_relay(conn, detached)
                    return
            elif not done.is_set():
                conn.send_stdin(proc_id, data)
        if done.is_set():
            return
        if end_at_eof:
            _end_relay(conn, detached)
        elif close_at_eof:
            conn.close_stdin(proc_id)
    except (OSError, ValueError):
        pass  # connection or stream closed under us: the process outcome says the rest


def _end_relay(conn: AgentConnection, detached: threading.Event) -> None:
    """Leave the process running and make the relay's read return (it sees EOF)."""
    detached.set()
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class SignalWatch:
    """A terminal's signals while it is attached to a process (``kvmc run``, ``attach``,
    ``exec``): each is forwarded to the process, and the caller can always get out.

    The first SIGINT or SIGTERM is forwarded; if the guest says nothing about the process
    (no output, no exit) within ``ack_s`` seconds, or a second SIGINT/SIGTERM comes, waiting
    is given up: ``give_up(signum)`` is raised (an exception; from the signal handler for the
    second signal, so even a blocked write is left). The container is left as it is, to
    ``stop`` or ``rm -f``. Forwarding happens in a thread of its own: a monitor that stopped
    reading cannot block the handler.
    """

    ACK_S = 5.0
    ENDING = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, forward: Callable[[int], None], give_up: Callable[[int], BaseException],
                 ack_s: float = ACK_S) -> None:
        self.forward = forward
        self.give_up = give_up
        self.ack_s = ack_s
        self.pending: tuple[int, float] | None = None
        """(signal, when) of a forwarded SIGINT/SIGTERM the guest has not answered yet."""
        self.ending: int | None = None

    def __call__(self, signum: int) -> None:
        """The signal handler's send: forward, or give up at the second SIGINT/SIGTERM."""
        if signum in self.ENDING:
            if self.ending is not None:
                raise self.give_up(signum)
            self.ending = signum
            self.pending = (signum, time.monotonic())
        threading.Thread(target=self.forward, args=(signum,), daemon=True).start()

    def heard(self) -> None:
        """The guest said something about the process: it is alive."""
        self.pending = None

    def check(self) -> None:
        """Raise ``give_up`` when a forwarded SIGINT/SIGTERM went unanswered for ``ack_s``."""
        pending = self.pending
        if pending is not None and time.monotonic() - pending[1] >= self.ack_s:
            raise self.give_up(pending[0])


WATCH_POLL_S = 0.25
"""How often :func:`attach_process` looks at its SignalWatch while no frame comes."""


def attach_process(
    conn: AgentConnection,
    proc_id: int,
    *,
    stdin: BinaryIO | None,
    stdout: BinaryIO,
    stderr: BinaryIO,
    timeout: float | None = None,
    close_stdin_at_eof: bool = True,
    detach_keys: bytes | None = None,
    end_at_stdin_eof: bool = False,
    watch: SignalWatch | None = None,
) -> ProcessResult:
    """Relay one process's stdio until its EXIT, acknowledge it and return the result.

    ``stdin`` is pumped from a daemon thread; pass None when the process was started without
    ``stdin=True`` (or a TTY). At its EOF the process's stdin is closed if
    ``close_stdin_at_eof`` (docker's StdinOnce for attaches, always for execs), or the relay
    ends if ``end_at_stdin_eof`` (a TTY attach, as docker's: the process keeps its terminal).
    ``detach_keys`` (TTY attaches): the stdin bytes that end the relay and leave the process
    running (they are not forwarded). An ended relay returns ``detached=True``.

    READY is recorded if seen but not required: after a snapshot restore an earlier connection
    consumed it. Frames for other process ids are dropped. ``timeout`` bounds the wait between
    two frames. ``watch``: the caller's SignalWatch, told about every frame for the process and
    checked while none comes. Anything outside the protocol raises AgentProtocolError, never
    anything else.
    """
    result = ProcessResult(exit_code=-1, ready_uptime_ms=conn.ready_uptime_ms)
    done, detached = threading.Event(), threading.Event()
    if stdin is not None:
        scanner = DetachScanner(detach_keys) if detach_keys else None
        threading.Thread(target=_pump_stdin, args=(conn, proc_id, stdin, done, detached, close_stdin_at_eof,
                                                   scanner, end_at_stdin_eof), daemon=True).start()
    last = time.monotonic()
    try:
        while True:
            wait = timeout
            if watch is not None:
                wait = WATCH_POLL_S if timeout is None else min(timeout, WATCH_POLL_S)
            try:
                frame = conn.read_frame(wait)
            except (GuestError, OSError):
                if detached.is_set():
                    result.detached = True
                    return result
                raise
            if frame is None:
                if watch is not None:
                    watch.check()
                if timeout is not None and time.monotonic() - last >= timeout:
                    raise AgentSilent(f"no word from the guest agent about process {proc_id} for {timeout:g}s")
                continue
            last = time.monotonic()
            if frame.type == FrameType.READY:
                result.ready_uptime_ms = conn.ready_uptime_ms
                continue
            if frame.proc_id != proc_id:
                continue
            if watch is not None:
                watch.heard()
            if frame.type in (FrameType.STDOUT, FrameType.STDERR):
                stream = stdout if frame.type == FrameType.STDOUT else stderr
                stream.write(frame.payload)
                stream.flush()
            elif frame.type == FrameType.STARTED:
                result.pid, result.started_uptime_ms = parse_started(frame.payload)
            elif frame.type == FrameType.ERROR:
                # Escaped, not one-lined: through kvmc's monitor (which one-lines the guest's
                # words) this may be the monitor's own multi-line account of a failure.
                result.error = guest_text(frame.payload, one_line=False)
            elif frame.type == FrameType.EXIT:
                result.exit_code, result.signal = parse_exit(frame.payload)
                done.set()
                try:
                    conn.ack_exit(proc_id)
                except OSError:
                    pass  # a monitor that failed the start closes at once: the outcome is known
                return result
    finally:
        done.set()

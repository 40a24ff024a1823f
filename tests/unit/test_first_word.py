"""A just restored or cloned VM's agent must hear the container's RUN: VMLife.first_word waits
for its first word, and when none comes (QEMU 7.2 left such a first connection unanswered:
docs/platform.md) asks the agent on a new connection whether the RUN reached it. A socket stands
in for QEMU's chardev here: it takes the first connection and never speaks on it, and answers on
the second as the agent does."""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmc import vmlife
from kvmc.agent import MAIN_PROCESS_ID, AgentConnection, FrameType, ProcessSpec, encode_frame
from kvmc.vmlife import VMLife


def _read_frame(conn: socket.socket) -> tuple[int, int, bytes]:
    header = b""
    while len(header) < 8:
        header += conn.recv(8 - len(header))
    ftype, _flags, proc_id, length = struct.unpack(">BBHI", header)
    payload = b""
    while len(payload) < length:
        payload += conn.recv(length - len(payload))
    return ftype, proc_id, payload


@contextmanager
def chardev(table_body: str, silent_first: bool = True) -> Iterator[tuple[str, list, list[socket.socket]]]:
    """A listening socket: the first connection is held unanswered (``silent_first``); on the
    next, a REATTACH gets a TABLE listing ``table_body``, and every frame after it is recorded."""
    directory = Path(tempfile.mkdtemp(prefix="kvmc-fw-", dir="/tmp"))  # unix socket paths stay short
    path = directory / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    heard: list[tuple[int, int, bytes]] = []
    held: list[socket.socket] = []

    def serve() -> None:
        if silent_first:
            silent, _ = listener.accept()
            held.append(silent)  # accepted, never read nor answered
        conn, _ = listener.accept()
        held.append(conn)
        ftype, proc_id, nonce = _read_frame(conn)
        heard.append((ftype, proc_id, nonce))
        if ftype == FrameType.REATTACH:
            conn.sendall(encode_frame(FrameType.TABLE, 0, f"nonce={nonce.hex()} proto=3 dropped=0 dropped_other=0\n"
                                                          f"{table_body}".encode()))
            heard.append(_read_frame(conn) if not table_body else (0, 0, b""))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield str(path), heard, held
    finally:
        server.join(5)
        listener.close()
        for sock in held:
            sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


def _life(said: list[str]) -> VMLife:
    config = SimpleNamespace(boot_timeout_s=10, run_dir=Path("/nonexistent"), data_dir=Path("/nonexistent"))
    return VMLife(SimpleNamespace(config=config, say=said.append))  # type: ignore[arg-type]


def _spec() -> ProcessSpec:
    return ProcessSpec(args=["true"], time_ns=1, seed=b"s" * 64)


def test_a_run_the_agent_never_heard_is_sent_again_on_a_new_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmlife, "FIRST_WORD_S", 0.3)
    said: list[str] = []
    with chardev(table_body="") as (path, heard, held):
        record = SimpleNamespace(name="web", agent_socket=path)
        first = AgentConnection.connect(path)
        first.run(MAIN_PROCESS_ID, _spec())
        conn, table = _life(said).first_word(record, first, _spec())  # type: ignore[arg-type]
        conn.close()
    assert table is None and conn is not first
    assert [(t, p) for t, p, _ in heard] == [(FrameType.REATTACH, 0), (FrameType.RUN, MAIN_PROCESS_ID)]
    assert b"arg=true" in heard[1][2] and b"time_ns=1\0" not in heard[1][2] and b"time_ns=" in heard[1][2]  # the clock read anew
    assert len(held) == 2 and said == ["no answer from the agent of container web's VM on the first connection; "
                                       "connecting again"]


def test_a_run_the_agent_heard_is_never_sent_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its answer went to the first connection: the table, for the monitor to adopt process 1."""
    monkeypatch.setattr(vmlife, "FIRST_WORD_S", 0.3)
    with chardev(table_body="id=1 pid=42 state=running\n") as (path, heard, _held):
        record = SimpleNamespace(name="web", agent_socket=path)
        first = AgentConnection.connect(path)
        first.run(MAIN_PROCESS_ID, _spec())
        conn, table = _life([]).first_word(record, first, _spec())  # type: ignore[arg-type]
        conn.close()
    assert table is not None and table.processes[MAIN_PROCESS_ID].state == "running"
    assert [t for t, _, _ in heard][:1] == [FrameType.REATTACH]  # and no second RUN


def test_an_agent_that_answers_keeps_its_connection_and_first_frame() -> None:
    host, guest = socket.socketpair()
    started = encode_frame(FrameType.STARTED, MAIN_PROCESS_ID, b"pid=9 uptime_ms=1")
    guest.sendall(started)
    first = AgentConnection(host)
    conn, table = _life([]).first_word(SimpleNamespace(name="web", agent_socket=""), first, _spec())  # type: ignore[arg-type]
    assert (conn, table) == (first, None)
    frame = conn.read_frame(1)
    assert frame is not None and (frame.type, frame.proc_id) == (FrameType.STARTED, MAIN_PROCESS_ID)
    conn.close()
    guest.close()

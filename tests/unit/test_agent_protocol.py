"""kvmc-agent protocol 3, end to end: the real static agent, a real busybox chroot, real
fork/exec, driven through kvmc.agent over a unix socket ("socket mode"). Plus frame
encoding tests. Needs root (chroot), gcc/make and busybox-static."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmc.agent import (
    MAX_PAYLOAD,
    RUN_TTY,
    Frame,
    encode_resize,
    parse_ready,
    parse_resize,
    AgentConnection,
    FrameReader,
    FrameType,
    ProcessResult,
    ProcessSpec,
    attach_process,
    encode_frame,
    parse_exit,
)
from kvmc.errors import AgentProtocolError, GuestError

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")

needs_root = pytest.mark.usefixtures("rootfs")  # the fixture fails, loudly, when not root


# ---------- frame encoding (no agent needed) ----------


def test_encode_frame_header_layout() -> None:
    assert encode_frame(FrameType.STDIN, 0x0102, b"hi") == b"\x02\x00\x01\x02\x00\x00\x00\x02hi"


def test_encode_rejects_oversized_and_unknown() -> None:
    with pytest.raises(AgentProtocolError):
        encode_frame(FrameType.STDIN, 1, b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(AgentProtocolError):
        encode_frame(0x42, 1)
    encode_frame(FrameType.STDIN, 1, b"x" * MAX_PAYLOAD)  # the maximum itself is fine


def test_reader_decodes_split_frames() -> None:
    data = encode_frame(FrameType.STDOUT, 7, b"hello") + encode_frame(FrameType.EXIT, 7, b"\0\0\0\0\3")
    reader = FrameReader()
    frames = []
    for byte in data:  # one byte at a time: frames straddle reads
        reader.feed(bytes([byte]))
        while (f := reader.next_frame()) is not None:
            frames.append(f)
    assert [(f.type, f.proc_id, f.payload) for f in frames] == [
        (FrameType.STDOUT, 7, b"hello"),
        (FrameType.EXIT, 7, b"\0\0\0\0\3"),
    ]
    assert parse_exit(frames[1].payload) == (3, None)
    assert parse_exit(b"\1\0\0\0\x09") == (137, 9)


def test_reader_rejects_oversized_frame() -> None:
    reader = FrameReader()
    reader.feed(struct.pack(">BBHI", FrameType.STDOUT, 0, 1, MAX_PAYLOAD + 1))
    with pytest.raises(AgentProtocolError):
        reader.next_frame()


def test_reader_rejects_unknown_and_wrong_direction_types() -> None:
    for ftype in (0x42, FrameType.RUN):  # RUN is host-to-guest only
        reader = FrameReader()
        reader.feed(struct.pack(">BBHI", ftype, 0, 1, 0))
        with pytest.raises(AgentProtocolError):
            reader.next_frame()


def test_connection_raises_on_bad_frame_from_peer() -> None:
    a, b = socket.socketpair()
    with AgentConnection(a) as conn:
        b.sendall(struct.pack(">BBHI", FrameType.STDERR, 0, 1, 1 << 30))
        with pytest.raises(AgentProtocolError):
            conn.read_frame(timeout=2)
    b.close()


def test_spec_encoding() -> None:
    spec = ProcessSpec(args=["sh", "-c", "x"], env=["A=1"], cwd="/w", user="app", stdin=True, seed=b"\x01\xff")
    assert spec.encode() == b"proto=3\0arg=sh\0arg=-c\0arg=x\0env=A=1\0cwd=/w\0user=app\0stdin=1\0seed=01ff\0"
    with pytest.raises(ValueError):
        ProcessSpec(args=[]).encode()


# ---------- end to end against the real agent ----------


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("gcc") or not shutil.which("make"):
        pytest.fail("gcc and make are needed to build the agent: run 'make setup'")
    out = tmp_path_factory.mktemp("agent")
    subprocess.run(["make", "-s", "-C", str(REPO / "images/agent"), f"OUT={out}"], check=True)
    return out / "kvmc-agent"


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the agent tests chroot, which needs root (as CI and 'make test' run)")
    if not BUSYBOX.exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "busybox-static"], check=True, capture_output=True)
    root = tmp_path_factory.mktemp("rootfs")
    root.chmod(0o755)  # pytest makes 0700 dirs; the chroot's / must be searchable by app/nobody
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        "app:x:1000:1000:App User:/home/app:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\napp:x:1000:\nextra:x:2000:app,other\n")
    (root / "home/app").mkdir(parents=True)
    (root / "bin/notexec").write_text("#!/bin/sh\necho nope\n")
    (root / "bin/notexec").chmod(0o644)
    return root


class Agent:
    """A running agent subprocess and the host's connection to it."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: AgentConnection) -> None:
        self.proc = proc
        self.conn = conn

    def run(self, args: list[str], proc_id: int = 1, stdin: bytes | None = None, **kw: object) -> tuple[ProcessResult, bytes, bytes]:
        """Run one process to completion; return (result, stdout, stderr)."""
        self.conn.run(proc_id, ProcessSpec(args=args, stdin=stdin is not None, **kw))  # type: ignore[arg-type]
        out, err = io.BytesIO(), io.BytesIO()
        result = attach_process(
            self.conn, proc_id, stdin=None if stdin is None else io.BytesIO(stdin), stdout=out, stderr=err, timeout=10
        )
        return result, out.getvalue(), err.getvalue()


@contextmanager
def start_agent(
    agent_bin: Path, rootfs: Path, wrapper: tuple[str, ...] = (), flags: tuple[str, ...] = ("--no-poweroff",)
) -> Iterator[Agent]:
    sockdir = tempfile.mkdtemp(prefix="kvmc-agent-")  # short path: sun_path is 108 bytes
    path = os.path.join(sockdir, "port")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    proc = subprocess.Popen(
        [*wrapper, str(agent_bin), "--port", path, "--root", str(rootfs), *flags],
        stderr=subprocess.PIPE,
    )
    try:
        sock, _ = listener.accept()
        with AgentConnection(sock) as conn:
            yield Agent(proc, conn)
    finally:
        listener.close()
        shutil.rmtree(sockdir, ignore_errors=True)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def agent(agent_bin: Path, rootfs: Path) -> Iterator[Agent]:
    with start_agent(agent_bin, rootfs) as a:
        yield a


@needs_root
def test_stdout_stderr_separate_and_exit_code(agent: Agent) -> None:
    res, out, err = agent.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.exit_code, res.signal, res.error) == (3, None, None)
    assert (out, err) == (b"out\n", b"err\n")
    assert res.pid and res.started_uptime_ms is not None
    assert res.ready_uptime_ms is not None  # READY came first, even though RUN was sent before it


@needs_root
def test_ready_reports_version(agent: Agent) -> None:
    assert agent.conn.wait_ready(5).startswith("kvmc-agent/3 uptime_ms=")


@needs_root
def test_env_cwd_and_defaults(agent: Agent) -> None:
    res, out, _ = agent.run(["sh", "-c", 'echo "$FOO|$PWD|$HOME|$PATH"'], proc_id=2, env=["FOO=bar baz"], cwd="/new/dir")
    assert res.exit_code == 0
    assert out == b"bar baz|/new/dir|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    # The container's PATH is searched inside the chroot, not the agent's.
    res, out, _ = agent.run(["busybox", "echo", "found"], proc_id=3, env=["PATH=/nowhere:/bin"])
    assert (res.exit_code, out) == (0, b"found\n")


@needs_root
def test_users(agent: Agent) -> None:
    cases = {
        "app": b"1000 1000 1000 2000 /home/app\n",
        "1000:1000": b"1000 1000 1000 2000 /home/app\n",
        "nobody": b"65534 65534 65534 /nonexistent\n",
        "4242": b"4242 0 0 /\n",
        "app:nogroup": b"1000 65534 65534 2000 /home/app\n",
    }
    for i, (user, expected) in enumerate(cases.items(), start=2):
        res, out, err = agent.run(["sh", "-c", 'echo $(id -u) $(id -g) $(id -G) $HOME'], proc_id=i, user=user)
        assert (res.exit_code, out, err) == (0, expected, b""), (user, res.error)


@needs_root
def test_unknown_user_is_126(agent: Agent) -> None:
    res, out, _ = agent.run(["true"], user="ghost")
    assert res.exit_code == 126
    assert res.error == "unable to find user ghost: no matching entries in passwd file"


@needs_root
def test_stdin_piped(agent: Agent) -> None:
    data = b"line one\n" + b"x" * 200_000 + b"\nend\n"
    res, out, _ = agent.run(["cat"], stdin=data)
    assert (res.exit_code, out) == (0, data)


@needs_root
def test_stdin_default_is_dev_null(agent: Agent) -> None:
    res, out, _ = agent.run(["cat"])
    assert (res.exit_code, out) == (0, b"")


@needs_root
def test_missing_command_127(agent: Agent) -> None:
    res, _, _ = agent.run(["no-such-command"], proc_id=2)
    assert res.exit_code == 127
    assert res.error == 'exec: "no-such-command": executable file not found in $PATH'
    res, _, _ = agent.run(["/no/such"], proc_id=3)
    assert res.exit_code == 127 and res.error and "no such file or directory" in res.error


@needs_root
def test_not_executable_126(agent: Agent) -> None:
    res, _, _ = agent.run(["/bin/notexec"], proc_id=2)
    assert res.exit_code == 126 and res.error == 'exec: "/bin/notexec": permission denied'  # Go's wording: docker's CLI maps it to 126
    res, _, _ = agent.run(["notexec"], proc_id=3)
    assert res.exit_code == 126 and res.error == 'exec: "notexec": permission denied'
    assert res.started_uptime_ms is None


@needs_root
def test_signal_sigterm_143(agent: Agent) -> None:
    agent.conn.run(1, ProcessSpec(args=["sleep", "100"]))
    while (f := agent.conn.read_frame(5)) is not None and f.type != FrameType.STARTED:
        pass
    agent.conn.signal(1, signal.SIGTERM)
    res = attach_process(agent.conn, 1, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(), timeout=5)
    assert (res.exit_code, res.signal) == (143, 15)


@needs_root
def test_killed_by_signal_reports_kind_1(agent: Agent) -> None:
    res, _, _ = agent.run(["sh", "-c", "kill -KILL $$"])
    assert (res.exit_code, res.signal) == (137, 9)


@needs_root
def test_grandchild_holding_pipes_does_not_block_exit(agent: Agent) -> None:
    t0 = time.monotonic()
    res, out, _ = agent.run(["sh", "-c", "sleep 30 & echo hi"])
    assert (res.exit_code, out) == (0, b"hi\n")
    assert time.monotonic() - t0 < 3


@needs_root
def test_concurrent_processes_and_exit_after_main_ack(agent: Agent) -> None:
    conn = agent.conn
    conn.run(2, ProcessSpec(args=["sh", "-c", "sleep 0.3; echo two"]))
    conn.run(3, ProcessSpec(args=["sh", "-c", "echo three"]))
    outs: dict[int, bytes] = {2: b"", 3: b""}
    exits: dict[int, tuple[int, int | None]] = {}
    while len(exits) < 2:
        f = conn.read_frame(5)
        assert f is not None
        if f.type == FrameType.STDOUT:
            outs[f.proc_id] += f.payload
        elif f.type == FrameType.EXIT:
            exits[f.proc_id] = parse_exit(f.payload)
            conn.ack_exit(f.proc_id)
    assert outs == {2: b"two\n", 3: b"three\n"} and exits == {2: (0, None), 3: (0, None)}
    assert agent.proc.poll() is None  # non-main processes don't end the agent
    res, out, _ = agent.run(["echo", "main"])
    assert (res.exit_code, out) == (0, b"main\n")
    assert agent.proc.wait(timeout=3) == 0  # exits once the main EXIT is acked


@needs_root
def test_shutdown_sigterm_then_sigkill(agent: Agent) -> None:
    # The shell survives SIGTERM (its sleeps don't), so only the SIGKILL after 1 s ends it.
    script = "trap 'echo term' TERM; echo trapped; while :; do sleep 0.1; done"
    agent.conn.run(1, ProcessSpec(args=["sh", "-c", script]))
    while (f := agent.conn.read_frame(5)) is not None and f.type != FrameType.STDOUT:
        pass  # wait for "trapped": a SIGTERM before the trap is set would just kill the shell
    t0 = time.monotonic()
    agent.conn.shutdown(1)
    res = attach_process(agent.conn, 1, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(), timeout=5)
    assert (res.exit_code, res.signal) == (137, 9)
    assert 0.9 < time.monotonic() - t0 < 3
    assert agent.proc.wait(timeout=3) == 0


@needs_root
def test_unknown_frame_ignored_oversized_frame_closes(agent: Agent) -> None:
    agent.conn.sock.sendall(struct.pack(">BBHI", 0x42, 0, 1, 3) + b"abc")  # skipped by the agent
    res, out, _ = agent.run(["echo", "still here"], proc_id=2)
    assert (res.exit_code, out) == (0, b"still here\n")
    agent.conn.sock.sendall(struct.pack(">BBHI", FrameType.STDIN, 0, 2, MAX_PAYLOAD + 1))
    with pytest.raises(GuestError):
        while agent.conn.read_frame(5) is not None:
            pass
    assert agent.proc.wait(timeout=3) == 0
    assert b"protocol error" in agent.proc.stderr.read()  # type: ignore[union-attr]


@needs_root
def test_host_disconnect_kills_processes(agent: Agent) -> None:
    agent.conn.run(1, ProcessSpec(args=["sleep", "100"]))
    f = agent.conn.read_frame(5)
    while f is not None and f.type != FrameType.STARTED:
        f = agent.conn.read_frame(5)
    assert f is not None
    pid = int(f.payload.split()[0].removeprefix(b"pid="))
    agent.conn.close()
    assert agent.proc.wait(timeout=3) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@needs_root
def test_hostname_in_own_uts_namespace(agent_bin: Path, rootfs: Path) -> None:
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is missing: it is part of every Debian base system")
    # A mount namespace with a /run of its own too: the agent keeps the container's /etc/hostname
    # in its root's /run (in a VM, the initramfs), which here is the host's.
    wrapper = ("unshare", "--uts", "--mount", "--propagation", "private",
               "sh", "-c", 'mount -t tmpfs tmpfs /run && exec "$@"', "sh")
    with start_agent(agent_bin, rootfs, wrapper=wrapper) as a:
        res, out, _ = a.run(["sh", "-c", 'echo "$(hostname) $HOSTNAME"'], hostname="box1", seed=b"\x12\x34")
        assert (res.exit_code, out) == (0, b"box1 box1\n")


@needs_root
def test_pid1_reaps_and_powers_off_its_namespace(agent_bin: Path, rootfs: Path) -> None:
    """As PID 1 (of a new PID namespace: reboot() there only ends the namespace)."""
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is missing: it is part of every Debian base system")
    wrapper = ("unshare", "--pid", "--fork", "--mount-proc")
    with start_agent(agent_bin, rootfs, wrapper=wrapper, flags=()) as a:
        # The orphaned `sleep` is reparented to the agent; the 200 ms drain rule still applies.
        res, out, _ = a.run(["sh", "-c", "sleep 100 & echo $$"])
        assert (res.exit_code, out) == (0, b"2\n")  # the agent is 1, its first child 2
        t0 = time.monotonic()
        a.proc.wait(timeout=5)
        assert time.monotonic() - t0 < 3


# ---------- protocol 2: TTY processes, RESIZE, the version handshake ----------


def test_tty_run_frame_carries_the_flag_and_the_size() -> None:
    sent: list[bytes] = []

    class Sock:
        def sendall(self, data: bytes) -> None:
            sent.append(data)

    conn = AgentConnection(Sock())  # type: ignore[arg-type]
    conn.run(3, ProcessSpec(args=["sh"], tty=True, winsize=(40, 120)))
    conn.run(4, ProcessSpec(args=["sh"], winsize=(40, 120)))  # no TTY: no flag, no size
    conn.resize(3, 50, 132)
    reader = FrameReader(accept=frozenset(FrameType))
    for data in sent:
        reader.feed(data)
    tty_run, plain_run, resize = reader.next_frame(), reader.next_frame(), reader.next_frame()
    assert tty_run == Frame(FrameType.RUN, 3, b"proto=3\0arg=sh\0winsize=40x120\0", RUN_TTY)
    assert plain_run == Frame(FrameType.RUN, 4, b"proto=3\0arg=sh\0", 0)
    assert (resize.type, resize.proc_id, resize.payload) == (FrameType.RESIZE, 3, b"\x00\x32\x00\x84")
    assert parse_resize(resize.payload) == (50, 132)


def test_resize_encoding_clamps_and_rejects_malformed() -> None:
    assert encode_resize(0, 70000) == b"\x00\x01\xff\xff"
    with pytest.raises(AgentProtocolError):
        parse_resize(b"\x00\x01\x02")


def test_host_refuses_another_agent_version() -> None:
    assert parse_ready(b"kvmc-agent/3 uptime_ms=12") == 12
    with pytest.raises(AgentProtocolError, match="kvmc-agent/2.*needs kvmc-agent/3"):
        parse_ready(b"kvmc-agent/2 uptime_ms=12")


@needs_root
def test_agent_refuses_a_protocol_1_host(agent: Agent) -> None:
    """A RUN without ``proto`` (what kvmc of protocol 1 sends) fails its start, clearly."""
    agent.conn.send(FrameType.RUN, 1, b"arg=true\0")
    res = attach_process(agent.conn, 1, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(), timeout=5)
    assert res.exit_code == 126
    assert "host speaks kvmc-agent protocol 1 and this guest agent speaks 3" in (res.error or "")


@contextmanager
def tty_agent(agent_bin: Path, rootfs: Path) -> Iterator[Agent]:
    """The agent with a devpts instance of its own at ROOT/dev/pts, as the guest's init mounts it."""
    script = ('mount -t tmpfs tmpfs /run && '  # the agent's /run/kvmc-etc, not the host's
              'mount --bind "$1" "$1" && mkdir -p "$1/dev/pts" && mount -t proc proc "$1/proc" && '
              'mount -t devpts -o newinstance,ptmxmode=0666 devpts "$1/dev/pts" && shift && exec "$@"')
    (rootfs / "proc").mkdir(exist_ok=True)
    wrapper = ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(rootfs))
    with start_agent(agent_bin, rootfs, wrapper=wrapper) as a:
        yield a


class Typist(io.RawIOBase):
    """stdin for attach_process: each item is sent once the output so far contains its prompt."""

    def __init__(self, out: io.BytesIO, script: list[tuple[bytes, bytes]], end: bool = True) -> None:
        super().__init__()
        self.out, self.script, self.end = out, list(script), end

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        if not self.script:
            if not self.end:
                time.sleep(30)
            return b""
        prompt, keys = self.script[0]
        deadline = time.monotonic() + 10
        while prompt not in self.out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.script.pop(0)
        return keys

    read = read1  # type: ignore[assignment]


@needs_root
def test_tty_process_has_a_controlling_terminal_of_the_given_size(agent_bin: Path, rootfs: Path) -> None:
    with tty_agent(agent_bin, rootfs) as a:
        script = 'tty; stty size; echo "TERM=$TERM"; ls -l /proc/self/fd/2'
        res, out, err = a.run(["sh", "-c", script], tty=True, winsize=(33, 101))
    text = out.decode()
    assert res.exit_code == 0 and err == b"", (res, out, err)
    assert text.split("\r\n")[0] == "/dev/pts/0"
    assert "33 101\r\n" in text and "TERM=xterm\r\n" in text  # docker's TERM; \r\n: the pty's ONLCR
    assert "/dev/pts/0" in text.split("\r\n")[-2]  # stderr is the terminal too: one stream


@needs_root
def test_tty_keystrokes_resize_ctrl_c_and_the_shells_exit_code(agent_bin: Path, rootfs: Path) -> None:
    with tty_agent(agent_bin, rootfs) as a:
        a.conn.run(1, ProcessSpec(args=["sh", "-i"], env=["PS1=$ "], tty=True, winsize=(24, 80)))
        out = io.BytesIO()
        keys = Typist(out, [
            (b"$ ", b"echo $((6*7))\r"),
            (b"42", b"stty size\r"),
            (b"24 80", b""),
        ])
        # The resize happens once the first size is printed, from another thread (as SIGWINCH).
        def resize_later() -> None:
            deadline = time.monotonic() + 10
            while b"24 80" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            a.conn.resize(1, 50, 132)
            time.sleep(0.2)
            a.conn.send_stdin(1, b"stty size\r")
            while b"50 132" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            # ^C reaches the foreground job as SIGINT from the guest's terminal driver
            a.conn.send_stdin(1, b"sleep 30; echo not-interrupted\r")
            time.sleep(0.5)
            a.conn.send_stdin(1, b"\x03")
            time.sleep(0.3)
            a.conn.send_stdin(1, b"exit 7\r")

        import threading
        threading.Thread(target=resize_later, daemon=True).start()
        t0 = time.monotonic()
        res = attach_process(a.conn, 1, stdin=keys, stdout=out, stderr=io.BytesIO(), timeout=20,
                             end_at_stdin_eof=False, close_stdin_at_eof=False)
    text = out.getvalue().decode(errors="replace")
    assert res.exit_code == 7, text
    assert "42\r\n" in text and "24 80\r\n" in text and "50 132\r\n" in text
    assert "^C" in text and "not-interrupted" not in text.replace("echo not-interrupted", "")
    assert time.monotonic() - t0 < 15  # the sleep 30 was interrupted


@needs_root
def test_tty_stdin_eof_is_the_terminals_eof_character(agent_bin: Path, rootfs: Path) -> None:
    with tty_agent(agent_bin, rootfs) as a:
        res, out, _ = a.run(["sh", "-c", "cat; echo cat-ended"], stdin=b"hello\n", tty=True)
    assert res.exit_code == 0
    assert b"hello\r\n" in out and b"cat-ended" in out  # ^D at the start of a line: read() returns 0


@needs_root
def test_detach_keys_end_the_relay_and_leave_the_process_running(agent_bin: Path, rootfs: Path) -> None:
    with tty_agent(agent_bin, rootfs) as a:
        a.conn.run(1, ProcessSpec(args=["sh", "-i"], env=["PS1=$ "], tty=True))
        out = io.BytesIO()
        keys = Typist(out, [(b"$ ", b"echo one\r\x10"), (b"one\r\n", b"\x11echo lost\r")], end=False)
        res = attach_process(a.conn, 1, stdin=keys, stdout=out, stderr=io.BytesIO(), timeout=10,
                             detach_keys=b"\x10\x11", end_at_stdin_eof=True)
        assert res.detached and res.exit_code == -1
        assert a.proc.poll() is None  # the agent and its shell go on
    assert b"lost" not in out.getvalue()


# ---------- protocol 3: REATTACH and TABLE ----------


def _table_frame(nonce: bytes, body: str = "", head: str = " proto=3 dropped=5 dropped_other=0") -> bytes:
    return encode_frame(FrameType.TABLE, 0, f"nonce={nonce.hex()}{head}\n{body}".encode())


def _reattach_over(stream: bytes, monkeypatch: pytest.MonkeyPatch, body: str = "") -> tuple[object, int, Frame | None]:
    """AgentConnection.reattach against a peer that first sends ``stream`` (what the old host
    left in transit), then the TABLE answering the REATTACH, then one STDOUT frame."""
    nonce = b"\x01" * 16
    monkeypatch.setattr(os, "urandom", lambda n: nonce[:n])
    host, guest = socket.socketpair()
    with AgentConnection(host) as conn:
        guest.sendall(stream + _table_frame(nonce, body) + encode_frame(FrameType.STDOUT, 1, b"next"))
        table, skipped = conn.reattach(5)
        assert guest.recv(100) == encode_frame(FrameType.REATTACH, 0, nonce)
        guest.close()
        return table, skipped, conn.read_frame(5)


def test_reattach_skips_what_came_before_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a frame of the old host's, whole frames, and the nonce's text inside output are
    skipped; the TABLE is read, and the frames after it are the stream."""
    nonce_text = b"nonce=" + (b"\x01" * 16).hex().encode()
    before = encode_frame(FrameType.STDOUT, 1, b"y" * 100)[37:] + encode_frame(FrameType.STDOUT, 1, nonce_text)
    table, skipped, after = _reattach_over(before, monkeypatch, "id=1 pid=42 state=running\nid=3 pid=50 state=starting\n")
    assert skipped == len(before)
    assert table.dropped == 5 and sorted(table.processes) == [1, 3]  # type: ignore[attr-defined]
    assert table.processes[1].state == "running" and table.processes[3].state == "starting"  # type: ignore[attr-defined]
    assert after == Frame(FrameType.STDOUT, 1, b"next")


def test_reattach_reads_an_exit_that_waited_for_a_host(monkeypatch: pytest.MonkeyPatch) -> None:
    table, skipped, _ = _reattach_over(b"", monkeypatch, "id=1 pid=42 state=exited exit=1:9\n")
    entry = table.processes[1]  # type: ignore[attr-defined]
    assert skipped == 0 and (entry.state, entry.exit_code, entry.signal) == ("exited", 137, 9)


@pytest.mark.parametrize("payload", [
    "nonce=00 proto=3\n",                                           # another REATTACH's
    "nonce={n} proto=2\n",                                          # another protocol
    "nonce={n} proto=3 dropped=x\n",
    "nonce={n} proto=3\nid=1 pid=1 state=sleeping\n",
    "nonce={n} proto=3\nid=2 pid=1 state=exited exit=0:0\n",        # only process 1 waits with its exit
    "nonce={n} proto=3\nid=1 pid=1 state=exited exit=0:300\n",      # no process exits 300
    "nonce={n} proto=3\nid=1 pid=1 state=running\nid=1 pid=2 state=running\n",
    "nonce={n} proto=3\nid=0 pid=1 state=running\n",
    "nonce={n} proto=3\nid=1 state=running\n",
    "nonce={n} proto=3\n\xff\n",
])
def test_parse_table_refuses_what_the_protocol_cannot_say(payload: str) -> None:
    from kvmc.agent import parse_table

    nonce = "ab" * 16
    with pytest.raises(AgentProtocolError):
        parse_table(payload.format(n=nonce).encode("latin-1"), nonce)


def test_a_table_nobody_asked_for_is_a_protocol_error() -> None:
    from kvmc.agent import ProcessTable

    with pytest.raises(AgentProtocolError, match="unasked"):
        ProcessTable().check(Frame(FrameType.TABLE, 0, b"nonce=00 proto=3\n"))


def test_clients_of_the_monitor_cannot_reattach() -> None:
    from kvmc.agent import CLIENT_TO_MONITOR

    assert FrameType.REATTACH not in CLIENT_TO_MONITOR


@needs_root
def test_agent_answers_reattach_with_its_processes(agent: Agent) -> None:
    """The real agent: a second host (here the same socket) asks; the TABLE lists what runs."""
    agent.conn.wait_ready(5)
    agent.conn.run(1, ProcessSpec(args=["sleep", "30"]))
    agent.conn.run(2, ProcessSpec(args=["sleep", "30"]))
    for _ in range(2):
        assert agent.conn.read_frame(5).type == FrameType.STARTED  # type: ignore[union-attr]
    table, skipped = agent.conn.reattach(5)
    assert skipped == 0 and table.dropped == 0 and table.dropped_other == 0
    assert {i: e.state for i, e in table.processes.items()} == {1: "running", 2: "running"}
    assert all(e.pid > 1 for e in table.processes.values())
    agent.conn.signal(1, signal.SIGKILL)
    frame = agent.conn.read_frame(5)
    assert frame is not None and frame.type == FrameType.EXIT and parse_exit(frame.payload) == (137, 9)


@settings(max_examples=60, deadline=None)
@given(before=st.binary(max_size=20000), garbage_after=st.binary(max_size=200))
def test_reattach_finds_its_table_after_any_bytes(before: bytes, garbage_after: bytes) -> None:
    """Whatever a dead host left in transit, the host finds its TABLE and everything before it
    is counted as skipped; the bytes after it are the stream (a later garbage frame is then the
    reader's business: a protocol error, never a hang or a crash)."""
    from unittest import mock

    nonce = b"\x07" * 16
    host, guest = socket.socketpair()
    with mock.patch.object(os, "urandom", lambda n: nonce[:n]), AgentConnection(host) as conn:
        guest.sendall(before + _table_frame(nonce, "id=1 pid=9 state=running\n") + garbage_after)
        table, skipped = conn.reattach(5)
        assert guest.recv(100)[:1] == bytes([FrameType.REATTACH])
        guest.close()
        assert skipped == len(before) and table.processes[1].pid == 9
        try:
            while conn.read_frame(1) is not None:
                pass
        except (AgentProtocolError, GuestError):
            pass


def test_init_mode_only_as_pid_1(agent_bin: Path) -> None:
    # --init mounts over /proc, /sys and /dev: outside a guest (not PID 1) it must refuse.
    res = subprocess.run([str(agent_bin), "--init"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "--init only as PID 1" in res.stderr

"""TTY containers and execs through the engine and the monitor, on the fake hypervisor (the
real agent in namespaces, with the container's own devpts as the guest's init mounts it):
resize, detach keys and re-attach, docker's stdin rules. Needs root, as test_engine.py."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from kvmc.process import ProcessOptions
from kvmc.runtime import DockerFields
from kvmc.state import State
from tests.fakes import agent_bin, fake_hypervisor, root  # noqa: F401 (fixtures)
from tests.unit.test_engine import Env, busybox_images, env, wait_for  # noqa: F401 (fixtures)


class Keys(io.RawIOBase):
    """stdin that types each item once the output so far contains its prompt, then holds (or ends)."""

    def __init__(self, out: io.BytesIO, script: list[tuple[bytes, bytes]], end: bool = False) -> None:
        super().__init__()
        self.out, self.script, self.end = out, list(script), end
        self.closed_by_test = threading.Event()

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        if not self.script:
            if not self.end:
                self.closed_by_test.wait(30)
            return b""
        prompt, keys = self.script[0]
        wait_for(lambda: prompt in self.out.getvalue(), why=f"{prompt!r} in {self.out.getvalue()!r}")
        self.script.pop(0)
        return keys

    read = read1  # type: ignore[assignment]


class FakeConsole:
    """A kvmc.runtime.Console that records what the engine does with it."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.now = size
        self.raw: list[bool] = []
        self.resize: Callable[[int, int], None] | None = None

    def size(self) -> tuple[int, int]:
        return self.now

    @contextmanager
    def session(self, resize: Callable[[int, int], None], raw: bool) -> Iterator[None]:
        self.raw.append(raw)
        self.resize = resize
        resize(*self.now)
        yield


def tty_opts(env: Env, *command: str, **kw: object):  # noqa: ANN201
    opts = env.opts(*command, detach=True, docker=DockerFields(tty=True, console_size=(31, 97), open_stdin=True),
                    **kw)
    opts.process.interactive, opts.process.env = True, ["PS1=$ "]
    return opts


def test_detach_keys_leave_the_shell_running_and_attach_gets_back_to_it(env: Env) -> None:
    record, code = env.svc.run(tty_opts(env, "sh", "-i", name="box"), None, io.BytesIO(), io.BytesIO())
    assert code is None and record.tty and record.console_size == [31, 97]
    out = io.BytesIO()
    # The shell's first prompt went to the log before anyone attached: type at once.
    keys = Keys(out, [(b"", b"stty size; X=kept\r"), (b"31 97", b"\x10\x11")])
    assert env.svc.attach("box", keys, out, out, detach_keys=None) is None  # detached: None
    assert env.svc.get("box").state == State.RUNNING
    out2 = io.BytesIO()
    console = FakeConsole((44, 111))
    keys2 = Keys(out2, [(b"", b"echo $X; stty size\r"), (b"44 111", b"exit 7\r")])
    assert env.svc.attach("box", keys2, out2, out2, console=console, detach_keys="ctrl-a") == 7
    assert console.raw == [True]
    text = out2.getvalue().decode()
    assert "kept\r\n" in text and "44 111\r\n" in text  # the same shell, resized on attach
    assert wait_for(lambda: env.svc.get("box").state == State.EXITED) and env.svc.get("box").exit_code == 7
    env.svc.remove("box")
    env.wait_monitors()


def test_resize_reaches_the_guest_and_tty_output_is_one_stream(env: Env) -> None:
    env.svc.run(tty_opts(env, "sh", "-i", name="box"), None, io.BytesIO(), io.BytesIO())
    out, err = io.BytesIO(), io.BytesIO()
    env.svc.resize("box", 50, 132)  # what the API's resize endpoint does, on a connection of its own
    keys = Keys(out, [(b"", b"stty size; echo to-stderr >&2; tty\r"), (b"/dev/pts/", b"exit\r")])
    assert env.svc.attach("box", keys, out, err) == 0
    assert b"50 132\r\n" in out.getvalue() and b"to-stderr\r\n" in out.getvalue() and err.getvalue() == b""
    assert b"to-stderr" in (env.config.containers_dir / env.svc.get("box").id / "container.log").read_bytes()
    env.svc.remove("box")
    env.wait_monitors()


def test_exec_tty_size_term_and_exit_code(env: Env) -> None:
    env.svc.run(env.opts("sleep", "60", name="box", detach=True), None, io.BytesIO(), io.BytesIO())
    out = io.BytesIO()
    console = FakeConsole((25, 81))
    keys = Keys(out, [(b"# ", b"tty; stty size; echo TERM=$TERM\r"), (b"TERM=", b"exit 3\r")])
    code = env.svc.exec("box", ProcessOptions(command=["sh", "-i"], interactive=True, tty=True), keys, out, out,
                        host_env={"TERM": "vt220"}, console=console)
    text = out.getvalue().decode()
    assert code == 3 and "/dev/pts/" in text and "25 81\r\n" in text and "TERM=vt220\r\n" in text
    out = io.BytesIO()  # detached from an exec: None, the container runs on
    keys = Keys(out, [(b"# ", b"\x10\x11")])
    assert env.svc.exec("box", ProcessOptions(command=["sh", "-i"], interactive=True, tty=True), keys, out, out,
                        winsize=(20, 70)) is None
    assert env.svc.get("box").state == State.RUNNING
    env.svc.remove("box", force=True)
    env.wait_monitors()


def test_run_d_i_keeps_stdin_open_across_attaches(env: Env) -> None:
    """docker's run -d -i: StdinOnce is false, so an attach's EOF leaves stdin open for the next."""
    opts = env.opts("sh", name="box", detach=True, docker=DockerFields(open_stdin=True))
    opts.process.interactive = True
    record, _ = env.svc.run(opts, None, io.BytesIO(), io.BytesIO())
    assert not record.stdin_once
    first_out: io.BytesIO = io.BytesIO()
    codes: list[int | None] = []
    first = threading.Thread(target=lambda: codes.append(
        env.svc.attach("box", io.BytesIO(b"echo one\n"), first_out, io.BytesIO())))
    first.start()
    wait_for(lambda: b"one" in first_out.getvalue())
    out = io.BytesIO()
    assert env.svc.attach("box", io.BytesIO(b"echo two; exit 4\n"), out, io.BytesIO()) == 4
    first.join(10)
    assert codes == [4] and out.getvalue() == b"two\n"
    env.svc.remove("box")
    env.wait_monitors()

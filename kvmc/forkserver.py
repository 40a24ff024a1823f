"""One resident process per user that forks containers' monitors, so that they share memory.

Why: every container has a monitor process (kvmc/monitor.py) for as long as it runs. Forked from
the CLI that started it, a monitor keeps a private copy of the CLI's whole interpreter: 21.5 MiB
each (PSS, measured by bench/density.py), the largest per-container cost after QEMU. Forked from
this server instead, which has imported only what a monitor runs and frozen it out of the
garbage collector's reach (``gc.freeze``), every monitor shares those pages with its siblings
and owns only what it writes. It also spares ``kvmc serve`` a fresh interpreter per container
(``exec_monitor``, ~0.11 s of imports under TCG-loaded CPUs), since a threaded server must not
fork itself.

Why by hand: multiprocessing's forkserver forks workers for one parent process and ends with it;
kvmc's callers are short-lived CLI calls whose monitors outlive them, and they pass descriptors
(the monitor's control socket, listening) that the stdlib's server does not take.

The protocol: one SOCK_SEQPACKET message per request, a pickled :class:`Request` with the
listening control socket as SCM_RIGHTS; one message back, the child's pid or an error. Only a
peer of the same uid is served (SO_PEERCRED), and the socket's directory is the user's own: the
pickle never comes from another user. The server forks single-threaded (it never starts a thread
or opens a libvirt connection), so a child inherits no lock held by another thread.

The server is keyed by kvmc's code (a digest of its modules' names, sizes and mtimes) and the
interpreter, so a changed kvmc never gets monitors of the old code; it exits after
``IDLE_EXIT_S`` without requests (its children go on: they are in sessions of their own, and the
pages they share stay shared among them).
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from kvmc.config import Config

IDLE_EXIT_S = 300.0
"""A server that forked nothing for this long exits (a new one starts on the next need)."""

REQUEST_TIMEOUT_S = 10.0
"""How long a caller waits for the fork's answer (a server still importing answers in ~0.2 s)."""

MAX_MESSAGE = 1 << 20


class ForkServerUnavailable(Exception):
    """No server answered: the caller starts its monitor the old way (fork or exec)."""


@dataclass(frozen=True)
class Request:
    """What the monitor child needs of its caller: what the caller's own fork would have kept."""

    config: Config
    container_id: str
    log_path: str
    wait_attach: bool
    discard_on_failure: bool
    reattach: bool
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    umask: int = 0o022


def code_digest(root: Path = Path(__file__).resolve().parent) -> str:
    """kvmc's modules as they are on disk now, and the interpreter that would run them."""
    h = hashlib.sha256(f"{sys.executable}\0{root}\0".encode())
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


_DIGEST: str | None = None


def socket_dir() -> Path:
    """The user's own directory for servers: one per user, shared by every state root
    (``KVMC_FORKSERVER_DIR`` moves it: a server of one's own, as a test that kills it needs)."""
    if os.environ.get("KVMC_FORKSERVER_DIR"):
        return Path(os.environ["KVMC_FORKSERVER_DIR"])
    if os.geteuid() == 0:
        return Path("/run/kvmc-forkserver")
    return Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/kvmc-{os.getuid()}")) / "kvmc-forkserver"


def socket_path() -> Path:
    global _DIGEST
    if _DIGEST is None:
        _DIGEST = code_digest()
    return socket_dir() / f"{_DIGEST}.sock"


# ---------------------------------------------------------------- the caller's side
def fork_monitor(request: Request, listener: socket.socket, path: Path | None = None) -> int:
    """Ask the server to fork a monitor for ``request``; its pid. Starts a server when none
    answers and raises :class:`ForkServerUnavailable`, so this call's monitor starts the old way
    at once (no wait for the new server's imports) and the next one is forked."""
    path = path or socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(REQUEST_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            start_server(path)
            raise ForkServerUnavailable(f"no fork server at {path}: starting one") from exc
        socket.send_fds(sock, [pickle.dumps(request)], [listener.fileno()])
        reply = sock.recv(MAX_MESSAGE)
    except OSError as exc:
        raise ForkServerUnavailable(f"fork server at {path}: {exc}") from exc
    finally:
        sock.close()
    if not reply:
        raise ForkServerUnavailable(f"fork server at {path} closed the connection")
    answer = pickle.loads(reply)
    if "pid" not in answer:
        raise ForkServerUnavailable(f"fork server at {path}: {answer.get('error')}")
    return int(answer["pid"])


def start_server(path: Path, idle_exit_s: float = IDLE_EXIT_S) -> None:
    """Start a server on ``path`` unless another caller just did (a lock decides). The socket
    is bound here and handed over listening, so the next caller's connect waits in its backlog
    instead of failing while the server imports."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
            return  # started by someone else meanwhile
        except OSError:
            pass
        finally:
            probe.close()
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old = os.umask(0o077)
            try:
                listener.bind(str(path))
            finally:
                os.umask(old)
            listener.listen(64)
            # Started in the directory that holds the caller's kvmc package: ``-m`` puts it first
            # on the server's sys.path, so the server imports the caller's kvmc even when the
            # caller found it through its own working directory (a checkout) and PYTHONPATH or
            # the installed package would lead elsewhere; --code lets the server check that.
            package = Path(__file__).resolve().parent
            with open(path.with_suffix(".log"), "ab") as log:  # the server's own errors
                subprocess.Popen([sys.executable, "-m", "kvmc.forkserver", "--listen-fd", str(listener.fileno()),
                                  "--idle-exit", str(idle_exit_s), "--code", code_digest(package)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                 pass_fds=(listener.fileno(),), start_new_session=True, cwd=package.parent)
        finally:
            listener.close()


def sweep_stale(force: bool) -> list[str]:
    """Sockets of servers that died without removing them (for ``kvmc gc``)."""
    found = []
    directory = socket_dir()
    for path in sorted(directory.glob("*.sock")) if directory.is_dir() else []:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
            continue
        except OSError:
            found.append(f"fork server socket {path} (no server)")
            if force:
                path.unlink(missing_ok=True)
                path.with_suffix(".lock").unlink(missing_ok=True)
                path.with_suffix(".log").unlink(missing_ok=True)
        finally:
            probe.close()
    if force:
        for lock in sorted(directory.glob("*.lock")) if directory.is_dir() else []:
            _drop_unused_lock(lock)
    return found


def _drop_unused_lock(lock: Path) -> None:
    """A lock file whose server exited (it stays so that starters always lock the same file)."""
    if lock.with_suffix(".sock").exists():
        return
    try:
        with open(lock, "r+") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not lock.with_suffix(".sock").exists():
                lock.unlink()
    except OSError:
        pass  # in use: a server is being started


# ---------------------------------------------------------------- the server
def _warm_up() -> None:
    """Import everything a monitor runs, ahead of the forks: what a child imports later is its
    own private copy."""
    import kvmc.health  # noqa: F401
    import kvmc.hypervisor  # noqa: F401
    import kvmc.monitor  # noqa: F401
    import kvmc.runtime  # noqa: F401
    try:
        import libvirt  # noqa: F401
    except ImportError:
        pass


def serve(listener: socket.socket, idle_exit_s: float = IDLE_EXIT_S, code: str | None = None) -> int:
    """Fork monitors for callers until idle for ``idle_exit_s``. ``code``: the code digest of the
    kvmc that started this server; a server that would fork monitors of other code refuses."""
    import setproctitle

    os.chdir("/")  # started in the package's directory (start_server): hold no directory
    if code is not None and code != code_digest():
        print(f"kvmc-forkserver: this is kvmc {code_digest()} at {Path(__file__).resolve().parent}, "
              f"started for kvmc {code}: not serving", file=sys.stderr)
        path = Path(listener.getsockname())
        with open(path.with_suffix(".lock"), "w") as lock:  # as _leave, but the log stays: it says why
            fcntl.flock(lock, fcntl.LOCK_EX)
            path.unlink(missing_ok=True)
            listener.close()
        return 1
    setproctitle.setthreadtitle("kvmc-forkserver")  # comm: what top, pgrep and kvmc's tests see
    _warm_up()
    own_path = listener.getsockname()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the monitors (no zombies)
    gc.collect()
    gc.freeze()  # the collector never writes to what the children share
    listener.settimeout(idle_exit_s)
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            _leave(listener, own_path)
            return 0
        try:
            _answer(conn, listener)
        except Exception:  # noqa: BLE001 - one bad request must not end the server
            traceback.print_exc()
        finally:
            conn.close()


def _leave(listener: socket.socket, own_path: str) -> None:
    """Remove our socket and stop listening. Under start_server's lock: while we listen, no
    caller starts another server on the path, so what is there is ours. A request that queued
    meanwhile finds its connection reset and starts its monitor the old way."""
    path = Path(own_path)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path.unlink(missing_ok=True)
        path.with_suffix(".log").unlink(missing_ok=True)
        listener.close()


def _answer(conn: socket.socket, listener: socket.socket) -> None:
    conn.settimeout(REQUEST_TIMEOUT_S)
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 1)
    try:
        if not data:
            return  # a probe (start_server, sweep_stale): it only wanted to know we are here
        if uid != os.geteuid():
            conn.send(pickle.dumps({"error": f"uid {uid} may not use this server"}))
            return
        if len(fds) != 1:
            conn.send(pickle.dumps({"error": "a request carries the control socket"}))
            return
        request: Request = pickle.loads(data)
        pid = os.fork()
        if pid == 0:
            try:
                _child(request, fds[0], (conn.fileno(), listener.fileno()))
            finally:
                os._exit(1)  # only if _child failed before it could run the monitor
        conn.send(pickle.dumps({"pid": pid}))
    finally:
        for fd in fds:
            os.close(fd)


def _child(request: Request, control_fd: int, server_fds: tuple[int, ...]) -> NoReturn:
    """Become the monitor, as kvmc.monitor.fork_monitor's child would, in the caller's
    environment; never return into the server."""
    from kvmc.context import HostContext
    from kvmc.monitor import run_forked

    def enter_callers_world() -> None:
        for fd in server_fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(request.env)
        os.umask(request.umask)
        try:
            os.chdir(request.cwd)
        except OSError:
            os.chdir("/")

    run_forked(lambda: HostContext(request.config), request.container_id, request.log_path,
               wait_attach=request.wait_attach, discard_on_failure=request.discard_on_failure,
               listener=socket.socket(fileno=control_fd), reattach=request.reattach, prepare=enter_callers_world)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kvmc-forkserver", description="Forks kvmc's container monitors.")
    parser.add_argument("--listen-fd", type=int, required=True, help="The server's socket, bound and listening.")
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S, help="Exit after this many idle seconds.")
    parser.add_argument("--code", help="The code digest of the kvmc that started the server (checked).")
    args = parser.parse_args(argv)
    return serve(socket.socket(fileno=args.listen_fd), args.idle_exit, args.code)


if __name__ == "__main__":
    sys.exit(main())

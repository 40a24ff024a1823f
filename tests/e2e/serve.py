"""`kvmc serve` for the docker API tests: one server per test session, on the session's data dir.

The server runs exactly as a user runs it (``python -m kvmc serve -H unix://PATH``) with the
environment of the ``kvmc`` fixture, so ``kvmc ps`` and ``docker ps`` see the same containers.
Its socket lives under /run/kvmc/tests (a unix socket path must stay under 108 bytes, which
pytest's tmp dirs do not promise). The fixture yields a :class:`KvmcServe`: ``.socket``,
``.env`` (for the docker CLI, compose and docker-py), ``.docker(*args)``, ``.client()``,
``.log_text()``; and ``.kill9()``/``.start()`` for the crash test.

At the end of the session the server gets SIGTERM and must exit 0; the fixture then checks that
nothing leaked: no container or libvirt domain made while it ran, no zombie monitor, no socket
file, nothing left in the server's private TMPDIR, no traceback in its log.

Use it by importing the fixture into conftest.py (``from tests.e2e.serve import kvmc_serve``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.docker_clients import ToolMissing, docker_env, docker_py_client, make_docker_config, run_docker

if TYPE_CHECKING:  # conftest.py imports this module: no import of conftest at run time
    from tests.e2e.conftest import Kvmc

SOCKET_ROOT = Path("/run/kvmc/tests")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
UNIX_PATH_MAX = 108


def _children(pid: int) -> dict[int, str]:
    """pid -> state letter of every process whose parent is ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found[int(entry.name)] = fields[0]
    return found


class KvmcServe:
    """One ``kvmc serve`` process (restartable on the same socket) and the clients pointed at it."""

    def __init__(self, kvmc: Kvmc, workdir: Path) -> None:
        self.kvmc = kvmc
        self.workdir = workdir
        self.socket = workdir / "d.sock"
        if len(os.fsencode(self.socket)) >= UNIX_PATH_MAX:
            raise AssertionError(f"socket path too long for AF_UNIX: {self.socket}")
        self.tmpdir = workdir / "tmp"     # the server's TMPDIR: must be empty at the end
        self.tmpdir.mkdir()
        self.log_path = workdir / "serve.log"
        self.env = docker_env(self.socket, make_docker_config(workdir / "docker-config"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    # ------------------------------------------------------------------ clients
    def docker(self, *args: str, input: bytes | None = None, timeout: float = 180,
               check: bool = False) -> subprocess.CompletedProcess[bytes]:
        """``docker ARGS`` against this server."""
        return run_docker(self.env, *args, input=input, timeout=timeout, check=check)

    def client(self, **kwargs: Any) -> Any:
        """A docker-py client of this server (API version negotiated)."""
        kwargs.setdefault("timeout", 180)
        return docker_py_client(self.socket, **kwargs)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---------------------------------------------------------------- lifecycle
    @property
    def pid(self) -> int:
        assert self.proc is not None, "kvmc serve is not running"
        return self.proc.pid

    def start(self) -> KvmcServe:
        """Start a server on ``self.socket`` and wait until ``docker version`` answers."""
        assert self.proc is None or self.proc.poll() is not None, "kvmc serve already runs"
        env = {**self.kvmc.env, "TMPDIR": str(self.tmpdir)}
        with open(self.log_path, "ab") as log:
            log.write(f"--- kvmc serve started by the tests at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvmc", "serve", "-H", f"unix://{self.socket}"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids.append(self.proc.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kvmc serve exited {self.proc.returncode} at start:\n{self.log_text()}")
            if self.socket.exists():
                last = run_docker(self.env, "version", timeout=20)
                if last.returncode == 0:
                    return self
            time.sleep(0.2)
        detail = last.stderr.decode(errors="replace") if last is not None else "no socket"
        self.kill9()
        raise AssertionError(f"kvmc serve did not answer 'docker version' within {START_TIMEOUT_S:.0f} s "
                             f"({detail}):\n{self.log_text()}")

    def kill9(self) -> None:
        """SIGKILL the server (its containers and their monitors go on) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM, then wait for the exit; returns the exit status (SIGKILL after a timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -signal.SIGKILL
        return self.proc.returncode

    # ------------------------------------------------------------------ leaks
    def container_ids(self) -> set[str]:
        containers = self.kvmc.data_dir / "containers"
        return {p.parent.name for p in containers.glob("*/record.json")}

    def zombies(self) -> set[int]:
        """Children of the server that ended and were not reaped (monitors it started)."""
        if self.proc is None or self.proc.poll() is not None:
            return set()
        return {pid for pid, state in _children(self.proc.pid).items() if state == "Z"}


@pytest.fixture(scope="session")
def kvmc_serve(kvmc: Kvmc) -> Iterator[KvmcServe]:
    """`kvmc serve` on a fresh unix socket, sharing the session's kvmc data dir."""
    SOCKET_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="s", dir=SOCKET_ROOT))
    try:
        server = KvmcServe(kvmc, workdir)
    except ToolMissing as err:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(str(err))
    containers_before = server.container_ids()
    domains_before = kvmc.domains()
    server.start()
    try:
        yield server
    finally:
        problems = []
        # Containers (and their VMs) made while the server ran, that a test did not remove.
        leaked = server.container_ids() - containers_before
        if leaked:
            problems.append(f"containers left behind: {sorted(leaked)}")
            for cid in leaked:
                kvmc("rm", "-f", cid)
        deadline = time.monotonic() + 3
        while server.zombies() and time.monotonic() < deadline:
            time.sleep(0.25)  # the server reaps its monitors every 0.25 s
        if server.zombies():
            problems.append(f"unreaped monitors (zombies) of kvmc serve: {sorted(server.zombies())}")
        rc = server.stop()
        if rc != 0:
            problems.append(f"kvmc serve exited {rc} on SIGTERM, not 0")
        if server.socket.exists():
            problems.append(f"kvmc serve left its socket {server.socket}")
        left = sorted(p.name for p in server.tmpdir.iterdir()) if server.tmpdir.is_dir() else []
        if left:
            problems.append(f"kvmc serve left files in its TMPDIR: {left}")
        domains = kvmc.domains() - domains_before
        if domains:
            problems.append(f"libvirt domains left behind: {sorted(domains)}")
        log = server.log_text()
        if "Traceback" in log:
            problems.append("kvmc serve logged a traceback")
        if rc == 0 and "kvmc serve: stopped" not in log.rsplit("--- kvmc serve started", 1)[-1]:
            problems.append("kvmc serve did not log 'stopped'")
        shutil.rmtree(workdir, ignore_errors=True)
        assert not problems, "; ".join(problems) + f"\nkvmc serve's log:\n{log[-6000:]}"

"""The monitor fork server (kvmc/forkserver.py): a real server process, real forks.

The children here are monitors of containers that do not exist (a state root with no records),
so each one writes "no container" to its log and exits: enough to see that the server forked
it with the caller's log and that the caller is not its parent. Monitors of real containers
forked this way run in every e2e test (tests/e2e), where the server is the default.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmc import forkserver
from kvmc.config import Config
from kvmc.monitor import MonitorProcess

WAIT_S = 20.0


@pytest.fixture
def server_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory of our own for servers (unix socket paths stay short), emptied after."""
    directory = Path(tempfile.mkdtemp(prefix="kvmc-fs-", dir="/tmp"))
    monkeypatch.setattr(forkserver, "socket_dir", lambda: directory)
    yield directory
    for sock in directory.glob("*.sock"):
        _stop_server(sock)
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def _stop_server(sock: Path) -> None:
    """End the server listening on ``sock`` (not found by SO_PEERCRED: that names the process
    that called listen(), which is the caller that started the server)."""
    for pid in _servers(sock):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _servers(sock: Path) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _comm(int(p)) == "kvmc-forkserver"
            and str(sock) in _fds_of(int(p))]


def _request(tmp_path: Path, name: str = "nope") -> forkserver.Request:
    config = Config(data_dir=tmp_path / "data", run_dir=tmp_path / "run")
    return forkserver.Request(config=config, container_id=name, log_path=str(tmp_path / f"{name}.log"),
                              wait_attach=False, discard_on_failure=False, reattach=False,
                              env={"PATH": os.environ.get("PATH", "")}, cwd="/", umask=0o022)


def _listening(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    return listener


def _fork(request: forkserver.Request, control: Path, path: Path) -> int:
    """One request the way kvmc.monitor.spawn makes it, retried while the server starts."""
    deadline = time.monotonic() + WAIT_S
    while True:
        listener = _listening(control)
        try:
            return forkserver.fork_monitor(request, listener, path)
        except forkserver.ForkServerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            listener.close()
            control.unlink(missing_ok=True)


def _wait_for(predicate, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_the_server_forks_monitors_the_caller_does_not_parent(server_dir: Path, tmp_path: Path) -> None:
    path = server_dir / "t.sock"
    request = _request(tmp_path)
    with pytest.raises(forkserver.ForkServerUnavailable, match="starting one"):
        listener = _listening(tmp_path / "c.sock")
        try:
            forkserver.fork_monitor(request, listener, path)  # none yet: one is started
        finally:
            listener.close()
            (tmp_path / "c.sock").unlink()
    pids = [_fork(request, tmp_path / "c.sock", path) for _ in range(2)]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # the server's children, not ours
        _wait_for(lambda p=pid: MonitorProcess(p, child=False).poll() is not None, "the monitor did not end")
    log = Path(request.log_path).read_text()
    assert log.count("kvmc-monitor: no container nope") == 2, log
    assert list(server_dir.glob("*.sock")) == [path]


def test_concurrent_callers_start_one_server(server_dir: Path, tmp_path: Path) -> None:
    path = server_dir / "t.sock"
    pids: list[int] = []
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            pids.append(_fork(_request(tmp_path, f"c{i}"), tmp_path / f"c{i}.sock", path))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(pids)) == 4
    for pid in pids:  # a child holds the server's socket for a moment after the fork
        _wait_for(lambda p=pid: MonitorProcess(p, child=False).poll() is not None, "the monitor did not end")
    assert len(_servers(path)) == 1


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _fds_of(pid: int) -> str:
    """The unix socket paths a process listens on (its fds' inodes matched in /proc/net/unix)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return ""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return " ".join(line.split()[-1] for line in lines
                    if len(line.split()) >= 8 and f"socket:[{line.split()[6]}]" in inodes)


def test_an_idle_server_exits_and_removes_its_socket(server_dir: Path, tmp_path: Path) -> None:
    path = server_dir / "t.sock"
    forkserver.start_server(path, idle_exit_s=0.5)
    _fork(_request(tmp_path), tmp_path / "c.sock", path)
    _wait_for(lambda: not path.exists(), "the idle server kept its socket")
    assert forkserver.sweep_stale(force=False) == []


def test_gc_finds_the_socket_of_a_server_that_died(server_dir: Path, tmp_path: Path) -> None:
    path = server_dir / "t.sock"
    forkserver.start_server(path)
    _fork(_request(tmp_path), tmp_path / "c.sock", path)
    assert forkserver.sweep_stale(force=False) == []  # a live server is not stale
    assert _servers(path)
    _stop_server(path)
    _wait_for(lambda: forkserver.sweep_stale(force=False) != [], "a dead server's socket was not found")
    assert forkserver.sweep_stale(force=True) == [f"fork server socket {path} (no server)"]
    assert not path.exists() and forkserver.sweep_stale(force=False) == []


def test_the_code_digest_follows_the_modules(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    before = forkserver.code_digest(tmp_path)
    assert forkserver.code_digest(tmp_path) == before
    (tmp_path / "a.py").write_text("x = 22\n")
    assert forkserver.code_digest(tmp_path) != before


def test_the_server_runs_the_callers_kvmc_wherever_the_caller_found_it(server_dir: Path, tmp_path: Path) -> None:
    """A caller that imports kvmc from its working directory (a checkout, with another kvmc
    installed) gets a server of that same code: the server is started in the package's directory
    and checks the code digest it was started for (it refuses to serve other code). Before, the
    server started in / and imported whichever kvmc its sys.path found first."""
    import shutil
    import subprocess
    import sys

    checkout = tmp_path / "checkout"
    shutil.copytree(Path(forkserver.__file__).parent, checkout / "kvmc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = server_dir / "t.sock"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    started = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from kvmc import forkserver; "
         "assert Path(forkserver.__file__).parent.parent == Path.cwd(), forkserver.__file__; "
         f"forkserver.start_server(Path({str(path)!r}))"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    _wait_for(lambda: _servers(path), "the server did not start")
    time.sleep(0.5)
    assert _servers(path), f"the server exited: {path.with_suffix('.log').read_text()}"
    assert path.with_suffix(".log").read_text() == ""


def test_a_server_started_for_other_code_refuses_to_serve(tmp_path: Path) -> None:
    import subprocess
    import sys

    listener = _listening(tmp_path / "s.sock")
    try:
        proc = subprocess.run([sys.executable, "-m", "kvmc.forkserver", "--listen-fd", str(listener.fileno()),
                               "--code", "0" * 16], pass_fds=(listener.fileno(),), capture_output=True,
                              text=True, timeout=60)
    finally:
        listener.close()
    assert proc.returncode == 1
    assert f"started for kvmc {'0' * 16}: not serving" in proc.stderr
    assert not (tmp_path / "s.sock").exists()  # nothing for kvmc gc to find

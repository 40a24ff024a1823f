"""The engine (kvmc/runtime.py) and the monitor (kvmc/monitor.py) over the fake hypervisor.

A real HostContext on a temporary state root, the real busybox image (built once per session),
fake guest artefacts (the fake boots no kernel) and tests/fakes/hypervisor.py as libvirt: a
container really runs busybox commands, in namespaces, under the real agent, and the monitor is
forked by the engine as in production (it reaches the fake through the context's factory; the
fake's state lives in files, so the test sees what the monitor did).

Covered: create's all-or-nothing rollback at each step; observe() that only reads versus
repair() that destroys and records; the monitor's three ends (``--rm``, kept, VM failure).
Needs root, as the agent tests do.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import kvmc.runtime as runtime_mod
import kvmc.vmlife as vmlife_mod
from kvmc.config import Config
from kvmc.context import HostContext
from kvmc.errors import HypervisorError, ImageNotFound, KvmcError, UsageError
from kvmc.images import ImageStore, build_busybox_image
from kvmc.monitor import MonitorProcess
from kvmc.pool import Pool
from kvmc.process import ProcessOptions
from kvmc.runtime import MONITOR_DIED, RunOptions, Runtime
from kvmc.service import ContainerService
from kvmc.state import ContainerRecord, State, StateStore
from kvmc.vmlife import VMLife, pid_alive
from tests.fakes.hypervisor import MUTE_FIRST_HOST_ENV
from tests.fakes import FakeHypervisor, agent_bin, fake_hypervisor, root  # noqa: F401 (fixtures)

IMAGE = "kvmc/busybox:latest"
WAIT_S = 20.0


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def busybox_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image store with the default busybox image (umoci + mke2fs: ~0.3 s, once)."""
    store_root = tmp_path_factory.mktemp("busybox") / "images"
    build_busybox_image(ImageStore(store_root), IMAGE)
    return store_root


def fake_guest(directory: Path) -> Path:
    """What kvmc.guest.load_guest reads: guest.json and the two files it names (never booted)."""
    directory.mkdir()
    (directory / "vmlinuz").write_bytes(b"not a kernel\n")
    (directory / "initramfs.img").write_bytes(b"not an initramfs\n")
    (directory / "guest.json").write_text(json.dumps({
        "kernel": "vmlinuz", "initramfs": "initramfs.img", "kernel_sha256": "1" * 64,
        "initramfs_sha256": "2" * 64, "agent_sha256": "3" * 64, "kernel_release": "fake",
        "kernel_flavour": "kvmc", "acpi": False}))
    return directory


@dataclass
class Env:
    host: HostContext
    engine: Runtime
    svc: ContainerService
    hv: FakeHypervisor
    monitors: list[MonitorProcess] = field(default_factory=list)

    @property
    def config(self) -> Config:
        return self.host.config

    @property
    def state(self) -> StateStore:
        return self.host.state

    def opts(self, *command: str, **kw: Any) -> RunOptions:
        return RunOptions(image=IMAGE, process=ProcessOptions(command=list(command)), **kw)

    def leftovers(self) -> dict[str, list[str]]:
        """Everything a container can leave on the host; all empty when none exists."""
        containers = self.config.containers_dir
        names = containers / "names"
        tombstones = names / ".exited"
        return {
            "container dirs": sorted(p.name for p in containers.iterdir() if p.name != "names")
            if containers.is_dir() else [],
            "names": sorted(p.name for p in names.iterdir() if p.name != ".exited") if names.is_dir() else [],
            "run dir": sorted(p.name for p in self.config.run_dir.iterdir()),
            "domains": self.hv.domain_names(""),
            "vm processes": [str(p) for p in self.hv.processes()],
            "tombstones": sorted(p.name for p in tombstones.iterdir()) if tombstones.is_dir() else [],
        }

    def nothing_left(self, tombstones: list[str] | None = None) -> None:
        left = self.leftovers()
        assert left.pop("tombstones") == (tombstones or [])
        assert left == {k: [] for k in left}

    def monitor_of(self, record: ContainerRecord) -> MonitorProcess:
        """The monitor process the record names (one this test spawned)."""
        pid = wait_for(lambda: getattr(self.state.load(record.id), "monitor_pid", None), why="the monitor's pid")
        [monitor] = [m for m in self.monitors if m.pid == pid]
        return monitor

    def wait_monitors(self, timeout: float = WAIT_S) -> None:
        """Wait until every monitor this test spawned has ended (and reap it)."""
        deadline = time.monotonic() + timeout
        for monitor in self.monitors:
            while monitor.poll() is None:
                assert time.monotonic() < deadline, f"monitor {monitor.pid} still runs: {self.monitor_logs()}"
                time.sleep(0.02)

    def monitor_logs(self) -> str:
        containers = self.config.containers_dir
        return "\n".join(f"{p}: {p.read_text()}" for p in containers.glob("*/monitor.log"))


def wait_for(what: Callable[[], Any], timeout: float = WAIT_S, why: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {why or what}"
        time.sleep(0.02)
    return value


@pytest.fixture
def env(tmp_path: Path, fake_hypervisor: FakeHypervisor, busybox_images: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(busybox_images, data / "images", copy_function=os.link)  # the disk is sparse: link it
    run_dir = Path(tempfile.mkdtemp(prefix="kvmc-eng-", dir="/tmp"))  # unix socket paths stay short
    config = Config(data_dir=data, run_dir=run_dir, accel="tcg", guest_dir=fake_guest(tmp_path / "guest"),
                    boot_timeout_s=15.0, stop_timeout_s=2).validate()
    host = HostContext(config, notice=lambda _msg: None, hypervisor_factory=fake_hypervisor.factory())
    engine = Runtime(host)
    env = Env(host, engine, ContainerService(engine), fake_hypervisor)
    real_spawn = runtime_mod.spawn_monitor

    def spawn(*args: Any, **kwargs: Any) -> MonitorProcess:
        monitor = real_spawn(*args, **kwargs)
        env.monitors.append(monitor)
        return monitor

    monkeypatch.setattr(runtime_mod, "spawn_monitor", spawn)
    # A monitor is known by "kvmc" in its command line (vmlife.is_monitor); here it is a fork of
    # pytest, whose command line need not say kvmc: recognise this test's monitors by pid.
    monkeypatch.setattr(runtime_mod, "is_monitor",
                        lambda pid: pid_alive(pid) and any(m.pid == pid for m in env.monitors))
    try:
        yield env
    finally:
        for monitor in env.monitors:
            if monitor.poll() is None:
                os.kill(monitor.pid, signal.SIGKILL)
                os.waitpid(monitor.pid, 0)
        shutil.rmtree(run_dir, ignore_errors=True)


def inject(monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str, exc: BaseException,
           after_real: bool = False) -> list[tuple]:
    """Make ``owner.attr`` fail once with ``exc`` (``after_real``: after doing its job); the
    calls it saw are returned, so a test can tell the step was reached."""
    real = getattr(owner, attr)
    calls: list[tuple] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) > 1:
            return real(*args, **kwargs)
        if after_real:
            real(*args, **kwargs)
        raise exc

    monkeypatch.setattr(owner, attr, step)
    return calls


def fail_boots(monkeypatch: pytest.MonkeyPatch, flag: Path) -> Path:
    """Make the fake's ``start`` fail while ``flag`` exists. A file, not a counter: the start
    happens in the forked monitor, whose memory the test does not see."""
    real = FakeHypervisor.start
    flag.touch()

    def start(self: FakeHypervisor, name: str) -> None:
        if flag.exists():
            raise HypervisorError(f"cannot start VM {name}: injected")
        real(self, name)

    monkeypatch.setattr(FakeHypervisor, "start", start)
    return flag


# ------------------------------------------------------------ 1. create rollback
CREATE_STEPS: dict[str, Callable[[pytest.MonkeyPatch], list[tuple]]] = {
    "pool.claim": lambda mp: inject(mp, Pool, "claim", KvmcError("injected: pool claim")),
    "state.save": lambda mp: inject(mp, StateStore, "save", OSError(28, "No space left on device")),
    "create_overlay": lambda mp: inject(mp, runtime_mod, "create_overlay", KvmcError("injected: qemu-img")),
    "container_vm": lambda mp: inject(mp, runtime_mod, "container_vm", ValueError("injected: container_vm")),
    "domain_xml": lambda mp: inject(mp, HostContext, "domain_xml", KvmcError("injected: render")),
    "hv.define": lambda mp: inject(mp, FakeHypervisor, "define", HypervisorError("injected: libvirt refused")),
    # libvirt defined the domain, then the caller was interrupted (Ctrl-C) before create returned.
    "hv.define, then interrupted": lambda mp: inject(mp, FakeHypervisor, "define", KeyboardInterrupt(),
                                                     after_real=True),
}


@pytest.mark.parametrize("step", list(CREATE_STEPS))
def test_create_rolls_back_at_each_step(env: Env, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    calls = CREATE_STEPS[step](monkeypatch)
    with pytest.raises((KvmcError, OSError, ValueError, KeyboardInterrupt)):
        env.svc.create(env.opts("true", name="box", publish=["127.0.0.1::80"]))
    assert len(calls) == 1, f"{step} was not reached"
    env.nothing_left()
    # The name is free again and the next create (the step works now) succeeds.
    record = env.svc.create(env.opts("true", name="box"))
    assert env.state.resolve("box").id == record.id and env.hv.state(record.domain) == "shutoff"
    env.svc.remove("box")
    env.nothing_left()


def test_run_rolls_back_when_the_monitor_cannot_be_spawned(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = inject(monkeypatch, runtime_mod, "spawn_monitor", OSError(11, "Resource temporarily unavailable"))
    with pytest.raises(OSError):
        env.svc.run(env.opts("true", name="box"), None, io.BytesIO(), io.BytesIO())
    assert len(calls) == 1
    env.nothing_left()


def test_unknown_image_leaves_nothing(env: Env) -> None:
    with pytest.raises(ImageNotFound):
        env.svc.create(RunOptions(image="nosuch:image", process=ProcessOptions(command=["true"]), name="box"))
    with pytest.raises(ImageNotFound):
        env.svc.run(RunOptions(image="nosuch:image", process=ProcessOptions(command=["true"])), None,
                    io.BytesIO(), io.BytesIO())
    env.nothing_left()


@pytest.mark.parametrize("spec", ["80:80:80:80", "notaport", "[::1]:8080:80", "127.0.0.1:99999:80", "80/sctp"])
def test_invalid_port_spec_leaves_nothing(env: Env, spec: str) -> None:
    with pytest.raises(UsageError):
        env.svc.create(env.opts("true", name="box", publish=[spec]))
    with pytest.raises(UsageError):
        env.svc.run(env.opts("true", name="box", publish=[spec]), None, io.BytesIO(), io.BytesIO())
    env.nothing_left()


# --------------------------------------------------------- 2. observe vs repair
STATE_CHANGING = ("define", "start", "destroy", "undefine", "forget", "pause", "resume", "save", "restore",
                  "create_transient", "human_monitor_command", "qmp")


def record_state_changes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The FakeHypervisor calls that change a VM, from now on, by name."""
    calls: list[str] = []
    for name in STATE_CHANGING:
        real = getattr(FakeHypervisor, name)
        monkeypatch.setattr(FakeHypervisor, name,
                            lambda self, *a, _n=name, _r=real, **k: (calls.append(_n), _r(self, *a, **k))[1])
    return calls


def kill_monitor(env: Env, record: ContainerRecord) -> MonitorProcess:
    monitor = env.monitor_of(record)
    os.kill(monitor.pid, signal.SIGKILL)  # the monitor dies; the VM does not notice
    os.waitpid(monitor.pid, 0)
    return monitor


def test_a_container_outlives_its_monitor(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the monitor: reads show the container running and change nothing; the next
    command that touches it (an exec) starts a monitor that re-attaches to the agent; the
    process runs on, its output reaches the log and its exit code is recorded."""
    script = "echo before; while [ ! -e /dev/shm/go ]; do sleep 0.05; done; echo after; exit 7"
    record, code = env.svc.run(env.opts("sh", "-c", script, name="orphan", detach=True), None,
                               io.BytesIO(), io.BytesIO())
    assert code is None and record.state == State.RUNNING and record.started_at
    wait_for(lambda: b"before" in env.svc.log_path(record).read_bytes(), why="the first line")
    old = kill_monitor(env, record)
    path = env.state.container_dir(record.id) / "record.json"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    vm_pids = env.hv.processes(record.domain)
    calls = record_state_changes(monkeypatch)

    seen = env.engine.observe(env.state.load(record.id))
    assert (seen.state, seen.exit_code, seen.monitor_pid) == (State.RUNNING, None, None)
    assert [r.name for r in env.svc.list()] == ["orphan"]
    assert env.svc.inspect("orphan")["State"]["Running"] is True
    assert calls == [] and (path.read_bytes(), path.stat().st_mtime_ns) == before
    vm = vm_pids[:3]  # relay, unshare, agent: the "VM" (its sleeps come and go)
    assert env.hv.processes(record.domain)[:3] == vm

    out = io.BytesIO()
    assert env.engine.exec("orphan", ProcessOptions(command=["sh", "-c", "touch /dev/shm/go && echo done"]), None,
                           out, io.BytesIO()) == 0
    assert out.getvalue() == b"done\n"
    current = env.state.load(record.id)
    assert current is not None and current.monitor_pid not in (None, old.pid)
    assert env.svc.wait("orphan") == 7
    assert calls.count("destroy") == 0
    logged = [e.data for e in env.svc.logs("orphan")]
    assert logged == [b"before\n", b"after\n"]
    env.wait_monitors()
    env.svc.remove("orphan")
    env.nothing_left(tombstones=[record.id])


def test_serve_reconcile_gives_orphans_a_monitor_and_stop_works_through_it(env: Env) -> None:
    """What kvmc serve runs every 2 s: each running container whose monitor died gets one."""
    record, _ = env.svc.run(env.opts("sleep", "100", name="adopted", detach=True), None, io.BytesIO(), io.BytesIO())
    env.svc.run(env.opts("sleep", "100", name="fine", detach=True), None, io.BytesIO(), io.BytesIO())
    old = kill_monitor(env, record)
    [found] = env.svc.reattach_lost()
    assert found.id == record.id and found.monitor_pid not in (None, old.pid)
    assert env.svc.reattach_lost() == []  # one monitor per container, however often it runs
    env.svc.stop("adopted", timeout_s=1)
    assert env.svc.get("adopted").exit_code == 143
    for name in ("adopted", "fine"):
        env.svc.remove(name, force=True)
    env.wait_monitors()
    env.nothing_left(tombstones=[record.id])  # the one that had exited


def test_a_container_whose_vm_ended_without_monitor_is_recorded_exited(env: Env,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a container whose VM is really gone is recorded exited (137, the reason): observe
    says so without writing, repair writes it."""
    record, _ = env.svc.run(env.opts("sleep", "100", name="gone", detach=True), None, io.BytesIO(), io.BytesIO())
    kill_monitor(env, record)
    env.hv.destroy(record.domain)
    path = env.state.container_dir(record.id) / "record.json"
    before = path.read_bytes()
    calls = record_state_changes(monkeypatch)
    seen = env.engine.observe(env.state.load(record.id))
    assert (seen.state, seen.exit_code, seen.error, seen.monitor_pid) == (State.EXITED, 137, MONITOR_DIED, None)
    assert [(r.name, r.exit_code) for r in env.svc.list(all_=True)] == [("gone", 137)]
    assert env.svc.list() == []
    assert calls == [] and path.read_bytes() == before
    assert env.svc.wait("gone") == 137  # a command: it repairs
    written = env.state.load(record.id)
    assert written is not None
    assert (written.state, written.exit_code, written.error, written.monitor_pid) == (
        State.EXITED, 137, MONITOR_DIED, None)
    env.svc.remove("gone")
    env.nothing_left(tombstones=[record.id])


def test_observe_of_a_starting_record_without_monitor_is_left_alone(env: Env) -> None:
    """start() writes "starting" before the monitor records its pid: not a lost monitor."""
    record = env.svc.create(env.opts("true", name="born"))
    env.state.update(record, state=State.STARTING, monitor_pid=None)
    assert env.engine.observe(env.state.load(record.id)).state == State.STARTING


# ------------------------------------------------------ 3. the monitor's three ends
def test_auto_remove_container_is_removed_with_a_tombstone(env: Env) -> None:
    out, err = io.BytesIO(), io.BytesIO()
    record, code = env.svc.run(env.opts("sh", "-c", "echo bye; echo oops >&2; exit 3", name="rmme",
                                        auto_remove=True), None, out, err)
    assert code == 3 and (out.getvalue(), err.getvalue()) == (b"bye\n", b"oops\n")
    # The client hears the exit once the container is removed (the monitor closes afterwards).
    assert not env.state.container_dir(record.id).exists()
    assert not (env.config.containers_dir / "names" / "rmme").exists()
    assert env.state.tombstone_exit_code(record.id) == 3
    with pytest.raises(KvmcError):
        env.svc.get("rmme")
    env.wait_monitors()  # then it reaps the VM
    assert env.hv.record(record.domain) is None
    assert not VMLife(env.host).reaping_marker(record.domain).exists()
    env.nothing_left(tombstones=[record.id])


def test_kept_container_records_the_exit_and_powers_off(env: Env) -> None:
    out, err = io.BytesIO(), io.BytesIO()
    record, code = env.svc.run(env.opts("sh", "-c", "echo out; echo err >&2; exit 5", name="keep"), None, out, err)
    assert code == 5 and (out.getvalue(), err.getvalue()) == (b"out\n", b"err\n")
    monitor = env.monitors[0]
    seen = env.state.load(record.id)
    assert seen is not None
    assert (seen.state, seen.exit_code, seen.error) == (State.EXITED, 5, None)
    assert seen.started_at and seen.finished_at
    assert seen.monitor_pid in (monitor.pid, None)  # names the monitor until the VM is off
    assert env.svc.wait("keep") == 5
    env.wait_monitors()
    after = env.state.load(record.id)
    assert after is not None and after.monitor_pid is None
    assert (after.state, after.exit_code, after.finished_at) == (State.EXITED, 5, seen.finished_at)
    # Powered off by the guest itself (the agent's exit), not destroyed; still defined.
    assert env.hv.state(record.domain) == "shutoff" and env.hv.record(record.domain)["last_exit"] == 0
    assert env.hv.processes() == []
    log = [json.loads(line) for line in (env.state.container_dir(record.id) / "container.log").read_text().splitlines()]
    assert [(e["stream"], e["log"]) for e in log] == [("stdout", "out\n"), ("stderr", "err\n")]
    assert not Path(record.control_socket).exists() and not Path(record.agent_socket).exists()

    # A kept container starts again (start -a), on the same domain, and records the new end.
    out2 = io.BytesIO()
    assert env.svc.start_attached("keep", None, out2, io.BytesIO()) == 5
    assert out2.getvalue() == b"out\n"
    env.wait_monitors()
    again = env.state.load(record.id)
    assert again is not None and (again.state, again.exit_code, again.monitor_pid) == (State.EXITED, 5, None)
    assert env.hv.record(record.domain)["boots"] == 2
    env.svc.remove("keep")
    env.nothing_left(tombstones=[record.id])  # rm keeps the exit code for wait?condition=removed


def test_rename_while_the_guest_powers_off_is_kept(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept container is recorded exited while its guest still powers off (~0.3 s under TCG);
    the record is the container's meanwhile: a rename then must survive the monitor's last write
    (clearing monitor_pid once the VM is off)."""
    real_wait = FakeHypervisor.wait_stopped

    def slow_power_off(self: FakeHypervisor, name: str, timeout: float, poll: float = 0.05) -> bool:
        time.sleep(0.5)  # a guest as slow to power off as a TCG one
        return real_wait(self, name, timeout, poll)

    monkeypatch.setattr(FakeHypervisor, "wait_stopped", slow_power_off)  # the forked monitor's copy
    record, code = env.svc.run(env.opts("sh", "-c", "exit 4", name="first"), None, io.BytesIO(), io.BytesIO())
    assert code == 4
    powering_off = env.state.load(record.id)
    assert powering_off is not None and powering_off.monitor_pid == env.monitors[0].pid  # still powering off
    env.svc.rename("first", "second")
    assert env.svc.get("second").id == record.id
    env.wait_monitors()
    after = env.state.load(record.id)
    assert after is not None and after.monitor_pid is None
    names = sorted(p.name for p in (env.config.containers_dir / "names").iterdir() if p.name != ".exited")
    assert names == ["second"]
    assert after.name == "second", f"the monitor wrote back its stale record: name {after.name!r}, names/ {names}"
    assert env.svc.get("second").name == "second"


def test_vm_destroyed_under_a_running_container(env: Env) -> None:
    ticker = "while :; do echo tick; sleep 0.05; done"
    record, _ = env.svc.run(env.opts("sh", "-c", ticker, name="victim", detach=True), None, io.BytesIO(), io.BytesIO())
    monitor = env.monitor_of(record)
    heard: dict[str, Any] = {}
    out = io.BytesIO()

    def attach() -> None:
        try:
            heard["code"] = env.svc.attach("victim", None, out, io.BytesIO())
        except KvmcError as exc:
            heard["error"] = exc

    client = threading.Thread(target=attach)
    client.start()
    wait_for(lambda: b"tick" in out.getvalue(), why="the attached client to hear the process")
    env.hv.destroy(record.domain)  # from outside: as if QEMU were killed
    client.join(WAIT_S)
    assert not client.is_alive()
    env.wait_monitors()
    ended = env.state.load(record.id)
    assert ended is not None, "a container that had started must be kept (discard_on_failure is for starts)"
    assert (ended.state, ended.exit_code, ended.monitor_pid) == (State.EXITED, 137, None)
    assert ended.error and ended.error.startswith("the VM stopped unexpectedly"), ended.error
    assert ended.started_at and ended.finished_at
    assert "error" in heard and "the VM stopped unexpectedly" in str(heard["error"]), heard
    assert env.hv.state(record.domain) == "shutoff" and env.hv.record(record.domain)["last_exit"] == "destroyed"
    assert env.svc.wait("victim") == 137
    assert monitor.poll() is not None
    env.svc.remove("victim")
    env.nothing_left(tombstones=[record.id])  # rm keeps the exit code for wait?condition=removed


def test_vm_destroyed_under_an_auto_remove_container(env: Env) -> None:
    record, _ = env.svc.run(env.opts("sleep", "100", name="gone", detach=True, auto_remove=True), None,
                            io.BytesIO(), io.BytesIO())
    env.hv.destroy(record.domain)
    env.wait_monitors()
    assert env.state.load(record.id) is None
    assert env.state.tombstone_exit_code(record.id) == 137
    env.nothing_left(tombstones=[record.id])


def test_stop_records_the_signal_exit(env: Env) -> None:
    """The kept path through stop: SIGTERM by the agent, exit 143, the guest powers off."""
    record, _ = env.svc.run(env.opts("sleep", "100", name="stopme", detach=True), None, io.BytesIO(), io.BytesIO())
    stopped, was_running = env.svc.stop("stopme", timeout_s=5)
    assert was_running
    env.wait_monitors()
    ended = env.state.load(record.id)
    assert ended is not None and (ended.state, ended.exit_code, ended.error, ended.monitor_pid) == (
        State.EXITED, 143, None, None)
    assert env.hv.state(record.domain) == "shutoff" and env.hv.record(record.domain)["last_exit"] == 0
    assert env.svc.stop("stopme")[1] is False  # docker's 304: not running
    env.svc.remove("stopme")
    env.nothing_left(tombstones=[record.id])


def test_rm_force_of_a_running_container_leaves_nothing(env: Env) -> None:
    record, _ = env.svc.run(env.opts("sleep", "100", name="doomed", detach=True), None, io.BytesIO(), io.BytesIO())
    with pytest.raises(KvmcError, match="is running"):
        env.svc.remove("doomed")
    assert env.hv.state(record.domain) == "running"
    env.svc.remove("doomed", force=True)
    env.wait_monitors()
    env.nothing_left()


def test_run_whose_vm_cannot_boot_is_removed(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fail_boots(monkeypatch, tmp_path / "fail-boots")
    real_destroy = FakeHypervisor.destroy

    def slow_destroy(self: FakeHypervisor, name: str) -> None:  # libvirt's takes >= 0.2 s
        time.sleep(0.3)
        real_destroy(self, name)

    monkeypatch.setattr(FakeHypervisor, "destroy", slow_destroy)
    with pytest.raises(KvmcError, match="injected"):
        env.svc.run(env.opts("true", name="stillborn"), None, io.BytesIO(), io.BytesIO())
    # Ended before the caller heard, not reaped afterwards (CI's e2e test found a marker left).
    assert not list(env.config.run_dir.glob("*.reaping"))
    env.wait_monitors()
    [gone] = [p.name for p in (env.config.containers_dir / "names" / ".exited").iterdir()]
    assert env.state.tombstone_exit_code(gone) == 125
    env.nothing_left(tombstones=[gone])


def test_detached_run_whose_vm_cannot_boot_is_removed(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """run -d of a VM that cannot boot removes the container, as the foreground run does; the
    caller must still learn why (the removed record and monitor.log are gone with it)."""
    fail_boots(monkeypatch, tmp_path / "fail-boots")
    with pytest.raises(KvmcError) as failed:
        env.svc.run(env.opts("true", name="stillborn", detach=True), None, io.BytesIO(), io.BytesIO())
    env.wait_monitors()
    [gone] = [p.name for p in (env.config.containers_dir / "names" / ".exited").iterdir()]
    env.nothing_left(tombstones=[gone])
    assert "injected" in str(failed.value), f"the cause is lost: {failed.value}"


@pytest.mark.parametrize("detach", [False, True])
def test_run_whose_port_cannot_be_published(env: Env, monkeypatch: pytest.MonkeyPatch, detach: bool) -> None:
    """QEMU's hostfwd_add cannot bind (a non-kvmc process holds the port): the run fails with
    PortInUse's sentence and leaves nothing."""
    busy = "Could not set up host forwarding rule 'tcp:127.0.0.1:18080-:80'"
    monkeypatch.setattr(FakeHypervisor, "human_monitor_command", lambda self, name, command: busy)
    with pytest.raises(KvmcError) as failed:
        env.svc.run(env.opts("true", name="porty", detach=detach, publish=["127.0.0.1:18080:80"]), None,
                    io.BytesIO(), io.BytesIO())
    env.wait_monitors()
    [gone] = [p.name for p in (env.config.containers_dir / "names" / ".exited").iterdir()]
    assert env.state.tombstone_exit_code(gone) == 125
    env.nothing_left(tombstones=[gone])
    assert "already in use" in str(failed.value), f"the cause is lost: {failed.value}"


def test_start_whose_vm_cannot_boot_keeps_the_container(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    record = env.svc.create(env.opts("true", name="created"))
    flag = fail_boots(monkeypatch, tmp_path / "fail-boots")
    with pytest.raises(KvmcError, match="injected"):
        env.svc.start("created")
    env.wait_monitors()
    ended = env.state.load(record.id)
    assert ended is not None
    assert (ended.state, ended.exit_code, ended.monitor_pid, ended.started_at) == (State.EXITED, 125, None, None)
    assert ended.error and "injected" in ended.error
    assert env.hv.state(record.domain) == "shutoff"
    assert env.svc.wait("created") == 125
    # The next start (booting works again) runs it.
    flag.unlink()
    assert env.svc.start_attached("created", None, io.BytesIO(), io.BytesIO()) == 0
    env.wait_monitors()
    env.svc.remove("created")
    env.nothing_left(tombstones=[record.id])  # rm keeps the exit code for wait?condition=removed


def test_a_quick_rm_container_that_ended_before_the_start_was_seen_started(env: Env) -> None:
    """wait_started (run -d, the API's start) polls the record; an --rm process may run, end
    and be removed in between (docker run -i --rm IMAGE cat): its tombstone, without an error,
    says it started."""
    record = env.svc.create(env.opts("true", name="quick", auto_remove=True))
    monitor = env.engine.start(record)
    env.wait_monitors()  # the monitor removes an --rm container after its exit, then ends
    assert env.state.load(record.id) is None and env.state.tombstone(record.id) == (0, None)
    assert env.engine.wait_started(record, monitor).id == record.id


def test_logs_capped_rotated_and_read_by_lines(env: Env) -> None:
    """--log-opt max-size/max-file reach the monitor's writer; the service reads by lines."""
    script = "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; echo err >&2; printf no-newline"
    record, code = env.svc.run(env.opts("sh", "-c", script, name="chatty",
                                        log_opts={"max-size": "20k", "max-file": "3"}), None, io.BytesIO(), io.BytesIO())
    assert code == 0 and record.log_opts == {"max-size": "20k", "max-file": "3"}
    directory = env.state.container_dir(record.id)
    files = sorted(p.name for p in directory.glob("container.log*"))
    assert files == ["container.log", "container.log.1", "container.log.2"]
    assert all((directory / f).stat().st_size <= 20_000 for f in files)
    last = list(env.svc.logs("chatty", tail=3))  # stdout and stderr are separate pipes: either order
    assert sorted((e.stream, e.data) for e in last) == [("stderr", b"err\n"), ("stdout", b"line 1999\n"),
                                                         ("stdout", b"no-newline")]
    with pytest.raises(UsageError):
        env.svc.create(env.opts("true", log_opts={"max-size": "0"}))
    env.svc.remove("chatty")
    env.wait_monitors()
    env.nothing_left(tombstones=[record.id])


def test_default_log_cap_comes_from_the_config(env: Env) -> None:
    record = env.svc.create(env.opts("true", name="quiet"))
    assert record.log_opts == {"max-size": "20m", "max-file": "5"}
    env.svc.remove("quiet")


# ---------------------------------------------------- a restore's first connection
def test_restored_member_unheard_on_the_first_connection_is_adopted(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU 7.2 once left the first connection to a just restored VM unanswered: the RUN sent on
    it reaches the agent, but nothing comes back. kvmc connects again after FIRST_WORD_S and
    the agent's table says process 1 runs: the monitor adopts it (no second process 1, no wait
    without end) and the attached client hears it to the end."""
    Pool(env.host).warm(IMAGE, 1, env.config.memory_mib, env.config.cpus, "tcg")
    monkeypatch.setattr(vmlife_mod, "FIRST_WORD_S", 0.3)
    monkeypatch.setenv(MUTE_FIRST_HOST_ENV, "1")  # read by the fake's restore, in the forked monitor
    said = env.config.data_dir / "said.log"  # the monitor is a fork: its remarks go to a file

    def note(message: str) -> None:
        with said.open("a") as f:
            f.write(message + "\n")

    monkeypatch.setattr(env.host, "verbose", True)
    monkeypatch.setattr(env.host, "notice", note)
    out, err = io.BytesIO(), io.BytesIO()
    record, code = env.svc.run(env.opts("sh", "-c", "sleep 2; echo hi; exit 4", name="muted"), None, out, err)
    log = said.read_text() if said.exists() else ""
    assert (code, out.getvalue(), err.getvalue()) == (4, b"hi\n", b""), log
    assert "restored pool member" in log and "no answer from the agent" in log, log
    assert env.state.load(record.id).started_at, "adopted, the start is recorded"
    env.svc.remove("muted")
    env.wait_monitors()
    env.nothing_left(tombstones=[record.id])


# ------------------------------------------------------------------ full disk
ENOSPC_STEPS: dict[str, Callable[[pytest.MonkeyPatch], list[tuple]]] = {
    "name reservation": lambda mp: inject(mp, Path, "write_text", OSError(28, "No space left on device", "names")),
    "state.save": lambda mp: inject(mp, StateStore, "save", OSError(28, "No space left on device", "record.json")),
    "qemu-img": lambda mp: inject(mp, runtime_mod, "create_overlay",
                                  KvmcError("cannot create the container disk x: No space left on device")),
}


@pytest.mark.parametrize("step", list(ENOSPC_STEPS))
def test_create_on_a_full_disk_says_so_and_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                          step: str) -> None:
    from kvmc.errors import DiskFull

    calls = ENOSPC_STEPS[step](monkeypatch)
    with pytest.raises(DiskFull) as caught:
        env.svc.create(env.opts("true", name="box"))
    assert len(calls) == 1, f"{step} was not reached"
    assert caught.value.kind == "unavailable" and str(caught.value).startswith("the disk is full: no space left")
    assert "free" in str(caught.value) and "kvmc rm" in str(caught.value)
    env.nothing_left()
    assert not [p for p in (env.config.containers_dir / "names").iterdir() if p.name.startswith(".") and p.is_file()]


def test_a_vm_paused_on_a_full_disk_is_shown_and_resumed(env: Env) -> None:
    """QEMU pauses a VM whose disk write found no space (reason ioerror); ps says "Paused (disk
    full)", and the monitor resumes it once there is room (here: at once, the disk is not full)."""
    record, _ = env.svc.run(env.opts("sh", "-c", "while true; do echo tick; sleep 0.2; done", name="filler",
                                     detach=True), None, io.BytesIO(), io.BytesIO())
    env.hv.pause(record.domain, reason="ioerror")
    assert env.svc.status(record, env.svc.vm_states([record])[record.id]) == "Paused (disk full)"
    assert env.svc.inspect("filler")["Kvmc"]["VmStateReason"] == "disk full"
    wait_for(lambda: env.hv.state(record.domain) == "running",
             why=f"the monitor to resume the VM: {env.monitor_logs()}", timeout=10)
    assert env.svc.status(record, env.svc.vm_states([record])[record.id]) == "Running"
    log = env.state.container_dir(record.id) / "monitor.log"
    wait_for(lambda: "resumed" in log.read_text(), why="the monitor's note")  # written right after the resume
    assert "found no space" in log.read_text()
    env.hv.pause(record.domain)  # the user's own pause is left alone
    time.sleep(2.5)
    assert env.hv.state_reason(record.domain) == ("paused", "user")
    assert env.svc.status(record, env.svc.vm_states([record])[record.id]) == "Paused"
    env.svc.remove("filler", force=True)

"""The fake hypervisor (tests/fakes/hypervisor.py): kvmc's domain XML in, the real agent in
private namespaces as the "VM", state shared through files across processes. Needs root, as
the agent tests do."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmc.agent import AgentConnection, FrameType, ProcessResult, ProcessSpec, attach_process
from kvmc.domain import DOMAIN_PREFIX, METADATA_NS, container_vm, render_domain_xml
from kvmc.errors import GuestError, HypervisorError
from kvmc.guest import GuestArtefacts
from kvmc.network import DNS_SERVER, guest_net_config
from tests.fakes import FakeHypervisor, agent_bin, fake_hypervisor, root  # noqa: F401 (fixtures)
from tests.fakes.hypervisor import alive, namespace_pids

REPO = Path(__file__).resolve().parents[2]
GUEST = GuestArtefacts(kernel=Path("/nonexistent/vmlinuz"), initramfs=Path("/nonexistent/initramfs"),
                       kernel_sha256="0" * 64, initramfs_sha256="0" * 64, agent_sha256="0" * 64,
                       kernel_release="fake")


@dataclass
class Vm:
    name: str
    container_id: str
    xml: str
    socket: Path


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for agent sockets (sun_path is 108 bytes; pytest's tmp paths are long)."""
    path = Path(tempfile.mkdtemp(prefix="kvmc-fake-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_vm(tmp_path: Path, sockdir: Path):  # noqa: ANN201
    """Domain XML as Runtime.create renders it (container_vm + the repository's template)."""
    def make(network: bool = True) -> Vm:
        container_id = uuid.uuid4().hex * 2
        directory = tmp_path / "containers" / container_id
        directory.mkdir(parents=True)
        spec = container_vm(
            name=f"{DOMAIN_PREFIX}{container_id[:16]}", uuid=str(uuid.uuid4()), container_id=container_id,
            container_name=f"box-{container_id[:4]}", directory=directory,
            agent_socket=sockdir / f"{container_id[:16]}.agent.sock", image_disk=tmp_path / "image.raw",
            guest=GUEST, domain_type="qemu", memory_mib=256, vcpus=1, state_root=str(tmp_path / "data"),
            network=network,
        )
        return Vm(spec.name, container_id, render_domain_xml(spec, REPO / "templates"), spec.channels[0].socket)
    return make


def run_main(sock: Path, args: list[str], **kw: object) -> tuple[ProcessResult, bytes, bytes]:
    """Connect as the monitor does, run process 1 to its end and acknowledge its EXIT."""
    with AgentConnection.connect(str(sock), timeout=5) as conn:
        conn.wait_ready(10)
        conn.run(1, ProcessSpec(args=args, **kw))  # type: ignore[arg-type]
        out, err = io.BytesIO(), io.BytesIO()
        result = attach_process(conn, 1, stdin=None, stdout=out, stderr=err, timeout=10)
        return result, out.getvalue(), err.getvalue()


def start_main(conn: AgentConnection, args: list[str], **kw: object) -> None:
    """RUN process 1 and wait for its STARTED."""
    conn.run(1, ProcessSpec(args=args, **kw))  # type: ignore[arg-type]
    while (frame := conn.read_frame(10)) is not None:
        assert frame.type not in (FrameType.ERROR, FrameType.EXIT), frame
        if frame.type == FrameType.STARTED:
            return
    raise AssertionError("no STARTED")


def test_main_process_exit_powers_the_vm_off(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    assert hv.state(vm.name) == "shutoff" and hv.domain_names(DOMAIN_PREFIX) == [vm.name]
    hv.start(vm.name)
    assert hv.state(vm.name) == "running" and vm.socket.is_socket()
    result, out, err = run_main(vm.socket, ["sh", "-c", "echo hi; exit 3"])
    assert (result.exit_code, result.error, out, err) == (3, None, b"hi\n", b"")
    assert result.ready_uptime_ms is not None
    assert hv.wait_stopped(vm.name, 5)
    assert hv.state(vm.name) == "shutoff"  # persistent: still defined
    assert hv.record(vm.name)["last_exit"] == 0  # the agent's own exit (--no-poweroff)
    assert not vm.socket.exists() and hv.processes() == []
    hv.start(vm.name)  # a second boot of the same definition
    result, out, _ = run_main(vm.socket, ["echo", "again"])
    assert (result.exit_code, out) == (0, b"again\n")
    assert hv.wait_stopped(vm.name, 5) and hv.record(vm.name)["boots"] == 2


def test_runtime_style_main_process(fake_hypervisor: FakeHypervisor, make_vm, tmp_path: Path) -> None:  # noqa: ANN001
    """The RUN items Runtime.boot sends: eth0 exists (slirp's stand-in), hostname and DNS work,
    the root has proc, sys and dev as the initramfs mounts them, and the time_ns item cannot
    touch the host's clock (the agent lacks CAP_SYS_TIME)."""
    hv, vm = fake_hypervisor, make_vm(network=True)
    hv.define(vm.xml)
    hv.start(vm.name)
    before = time.time()
    script = ("hostname; cat /etc/resolv.conf; ip -4 addr show dev eth0 | grep -o 'inet [0-9./]*'; "
              "echo x > /dev/null && test -e /sys/class/net/eth0 && grep -q ' /dev/shm tmpfs' /proc/mounts && echo dev-ok")
    result, out, err = run_main(vm.socket, ["sh", "-c", script], hostname="c0ffee", net=guest_net_config(),
                                dns=[DNS_SERVER], time_ns=time.time_ns() - 10**12, seed=os.urandom(16))
    assert (result.exit_code, result.error, err) == (0, None, b"")
    address = guest_net_config().split(",")[0]
    assert out.decode() == f"c0ffee\nnameserver {DNS_SERVER}\ninet {address}\ndev-ok\n"
    assert time.time() >= before  # the host's clock did not jump 1000 s back
    assert hv.wait_stopped(vm.name, 5)
    console = tmp_path / "containers" / vm.container_id / "console.log"  # the XML's serial log
    assert "clock_settime: Operation not permitted" in console.read_text()


def test_destroy_kills_the_vm(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    hv.start(vm.name)
    with AgentConnection.connect(str(vm.socket), timeout=5) as conn:
        start_main(conn, ["sh", "-c", "sleep 100 & sleep 100"])
        deadline = time.monotonic() + 5
        while len(pids := hv.processes(vm.name)) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pids) == 5  # relay, unshare, agent, 2 x sleep (sh execs the last command)
        hv.destroy(vm.name)
        assert hv.state(vm.name) == "shutoff"
        assert not [p for p in pids if alive(p)]
        with pytest.raises(GuestError):  # QEMU is gone: so is the host's connection
            while conn.read_frame(5) is not None:
                pass
    assert not vm.socket.exists()
    hv.destroy(vm.name)  # not running: nothing to do


def test_host_may_disconnect_and_reconnect(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    """In socket mode the agent kills everything when its peer goes: the relay keeps that peer,
    so, as with QEMU's chardev, a host can leave and a later one carries on."""
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    hv.start(vm.name)
    with AgentConnection.connect(str(vm.socket), timeout=5) as first:
        first.wait_ready(10)
        start_main(first, ["sh", "-c", "read line; echo got $line"], stdin=True)
    time.sleep(0.2)
    assert hv.state(vm.name) == "running"
    with AgentConnection.connect(str(vm.socket), timeout=5) as second:
        second.send_stdin(1, b"you\n")
        out = io.BytesIO()
        result = attach_process(second, 1, stdin=None, stdout=out, stderr=io.BytesIO(), timeout=10)
    assert (result.exit_code, out.getvalue()) == (0, b"got you\n")
    assert hv.wait_stopped(vm.name, 5)


def test_pause_stops_every_process_and_resume_continues(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    hv.start(vm.name)
    with AgentConnection.connect(str(vm.socket), timeout=5) as conn:
        start_main(conn, ["sh", "-c", "while :; do echo tick; sleep 0.05; done"])
        assert conn.read_frame(5).type == FrameType.STDOUT  # type: ignore[union-attr]
        hv.pause(vm.name)
        hv.pause(vm.name)  # already paused: nothing to do, as libvirt's suspend
        assert hv.state(vm.name) == "paused"
        members = namespace_pids(hv.record(vm.name)["pidns"])
        assert len(members) >= 2
        assert all(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] in "tT" for p in members)
        while conn.read_frame(0.3) is not None:
            pass  # what was written before the pause
        assert conn.read_frame(0.5) is None
        hv.resume(vm.name)
        assert hv.state(vm.name) == "running"
        frame = conn.read_frame(5)
        assert frame is not None and frame.type == FrameType.STDOUT
    hv.destroy(vm.name)


def test_forget_undefine_and_transient_domains(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    hv = fake_hypervisor
    a, b, c = make_vm(), make_vm(), make_vm()
    hv.define(a.xml)
    hv.forget(a.name)  # shut off: gone at once
    assert hv.state(a.name) is None
    hv.define(a.xml)
    hv.start(a.name)
    hv.forget(a.name)  # running: transient, dropped when it stops
    assert hv.state(a.name) == "running"
    result, _, _ = run_main(a.socket, ["true"])
    assert result.exit_code == 0 and hv.wait_stopped(a.name, 5)
    assert hv.state(a.name) is None and hv.domain_names(DOMAIN_PREFIX) == []

    hv.define(b.xml)
    hv.start(b.name)
    pids = hv.processes(b.name)
    hv.undefine(b.name)
    assert hv.state(b.name) is None and not [p for p in pids if alive(p)] and not b.socket.exists()

    hv.create_transient(c.xml, paused=True)
    assert hv.state(c.name) == "paused"
    hv.resume(c.name)
    result, out, _ = run_main(c.socket, ["echo", "transient"])
    assert (result.exit_code, out) == (0, b"transient\n")
    assert hv.wait_stopped(c.name, 5) and hv.state(c.name) is None
    hv.create_transient(c.xml)
    hv.destroy(c.name)
    assert hv.state(c.name) is None
    hv.undefine("kvmc-nosuch")  # a missing domain is no error
    hv.forget("kvmc-nosuch")


def test_removed_container_end_of_life(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    """The monitor's --rm path: freeze the VM right after acknowledging EXIT (racing the
    agent's own exit), undefine it without stopping (forget), then destroy it."""
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    hv.start(vm.name)
    pids = hv.processes(vm.name)
    result, _, _ = run_main(vm.socket, ["true"])
    assert result.exit_code == 0
    try:
        hv.pause(vm.name)
    except HypervisorError:
        hv.destroy(vm.name)  # it powered off first
    hv.forget(vm.name)
    assert hv.domain_names(DOMAIN_PREFIX) in ([], [vm.name])
    hv.destroy(vm.name)
    assert hv.state(vm.name) is None and hv.domain_names(DOMAIN_PREFIX) == []
    # A VM that powered off by itself is recorded shut off by its relay, which then exits.
    deadline = time.monotonic() + 5
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in pids if alive(p)] and not vm.socket.exists()


def test_state_is_shared_with_forked_processes(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    """kvmc's monitor is a forked process: what it does is what the CLI sees, and back."""
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    hv.start(vm.name)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "monitor"
        code = 1
        try:
            os.close(read)
            os.write(write, (hv.state(vm.name) or "none").encode())
            hv.pause(vm.name)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        seen = pipe.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert seen == "running" and hv.state(vm.name) == "paused"
    other = FakeHypervisor(hv.root, hv.rootfs, hv.agent_bin)  # a Runtime's own instance, same root
    other.resume(vm.name)
    assert hv.state(vm.name) == "running"


def test_save_then_restore_paused(fake_hypervisor: FakeHypervisor, make_vm, tmp_path: Path) -> None:  # noqa: ANN001
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    hv.start(vm.name)
    pids = hv.processes(vm.name)
    save = tmp_path / "vm.save"
    hv.save(vm.name, save)
    assert save.exists() and hv.state(vm.name) == "shutoff" and not [p for p in pids if alive(p)]
    hv.restore(save, vm.xml, paused=True)
    assert hv.state(vm.name) == "paused"
    hv.resume(vm.name)
    result, out, _ = run_main(vm.socket, ["echo", "restored"])  # a fresh agent: READY again
    assert (result.exit_code, out) == (0, b"restored\n")
    assert hv.wait_stopped(vm.name, 5) and hv.state(vm.name) == "shutoff"
    with pytest.raises(HypervisorError, match="cannot restore VM from"):
        hv.restore(tmp_path / "missing.save", vm.xml)


def test_metadata_monitor_commands_and_errors(fake_hypervisor: FakeHypervisor, make_vm, tmp_path: Path) -> None:  # noqa: ANN001
    hv, vm = fake_hypervisor, make_vm(network=False)
    hv.define(vm.xml)
    meta = hv.metadata(vm.name, METADATA_NS)
    assert meta is not None and f"<kvmc:id>{vm.container_id}</kvmc:id>" in meta
    match = re.search(r"<(?:\w+:)?state-root>([^<]*)</", meta)  # as Runtime.orphan_domains reads it
    assert match and match.group(1) == str(tmp_path / "data")
    assert hv.metadata(vm.name, "https://example.com/other") is None and hv.metadata("kvmc-nosuch", METADATA_NS) is None
    assert hv.domain_names("kvmc-") == [vm.name] and hv.domain_names("other-") == []

    for call in (lambda: hv.start("kvmc-nosuch"), lambda: hv.pause("kvmc-nosuch"),
                 lambda: hv.human_monitor_command("kvmc-nosuch", "info status")):
        with pytest.raises(HypervisorError, match="libvirt has no domain kvmc-nosuch"):
            call()
    assert hv.state("kvmc-nosuch") is None
    with pytest.raises(HypervisorError, match="not running"):
        hv.pause(vm.name)
    with pytest.raises(HypervisorError, match="not running"):
        hv.human_monitor_command(vm.name, "hostfwd_add tcp:127.0.0.1:8080-:80")
    with pytest.raises(HypervisorError, match="already exists with uuid"):
        hv.define(re.sub(r"<uuid>[^<]*</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", vm.xml))
    with pytest.raises(HypervisorError, match="libvirt refused the domain"):
        hv.define("<domain><name>broken")

    assert hv.stats(vm.name) == {"cpu_ns": 0, "memory_kib": 256 * 1024, "rss_kib": 0, "vcpus": 1,
                                 "block_read_bytes": 0, "block_write_bytes": 0}
    hv.start(vm.name)
    assert hv.stats(vm.name)["rss_kib"] > 0
    with pytest.raises(HypervisorError, match="already running"):
        hv.start(vm.name)
    with pytest.raises(HypervisorError, match="already active"):
        hv.create_transient(vm.xml)
    assert hv.human_monitor_command(vm.name, "hostfwd_add tcp:127.0.0.1:8080-:80") == ""
    assert hv.record(vm.name)["hmp"] == ["hostfwd_add tcp:127.0.0.1:8080-:80"]
    with pytest.raises(HypervisorError, match="refused query-migrate"):
        hv.qmp(vm.name, {"execute": "query-migrate"})
    hv.destroy(vm.name)


def test_killed_relay_is_a_crashed_vm(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    """QEMU killed behind libvirt's back: the domain is shut off and nothing of it lives on."""
    hv, vm = fake_hypervisor, make_vm()
    hv.define(vm.xml)
    hv.start(vm.name)
    pids = hv.processes(vm.name)
    os.kill(hv.record(vm.name)["relay_pid"], signal.SIGKILL)
    assert hv.wait_stopped(vm.name, 5)
    assert hv.record(vm.name)["last_exit"] == "crashed"
    deadline = time.monotonic() + 5
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in pids if alive(p)] and not vm.socket.exists()


def test_close_leaves_nothing_behind(fake_hypervisor: FakeHypervisor, make_vm) -> None:  # noqa: ANN001
    hv = fake_hypervisor
    vms = [make_vm(), make_vm()]
    hv.define(vms[0].xml)
    hv.start(vms[0].name)
    hv.create_transient(vms[1].xml, paused=True)
    conn = AgentConnection.connect(str(vms[0].socket), timeout=5)
    start_main(conn, ["sleep", "100"])
    pids = hv.processes()
    assert len(pids) >= 7
    hv.close()
    conn.close()
    assert not [p for p in pids if alive(p)]
    assert not any(vm.socket.exists() for vm in vms)
    assert hv.state(vms[0].name) == "shutoff" and hv.state(vms[1].name) is None
    assert list((hv.root / "run").iterdir()) == []

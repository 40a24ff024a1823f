"""Faults that must leave nothing lost or leaked: orphans, guest panics, libvirtd restarts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmc import forkserver
from tests.e2e.conftest import DEFAULT_IMAGE, TEST_ROOT, Kvmc

pytestmark = pytest.mark.e2e


def _inspect(kvmc: Kvmc, ref: str) -> dict:
    return json.loads(kvmc("inspect", ref, check=True).stdout)[0]


def _wait_exited(kvmc: Kvmc, ref: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _inspect(kvmc, ref)
        if info["Kvmc"]["State"] == "exited":
            return info
        time.sleep(0.3)
    raise AssertionError(f"{ref} did not exit")


def test_guest_kernel_panic_is_reported(kvmc: Kvmc) -> None:
    kvmc("run", "-d", "--name", "panicky", DEFAULT_IMAGE, "sh", "-c",
         "echo c > /proc/sysrq-trigger; sleep 100", check=True)
    info = _wait_exited(kvmc, "panicky")
    assert info["State"]["ExitCode"] == 137
    assert "kernel panicked" in info["State"]["Error"]
    kvmc("rm", "panicky", check=True)
    assert info["Kvmc"]["Domain"] not in kvmc.domains()


def test_gc_finds_and_removes_orphan_domains(kvmc: Kvmc) -> None:
    """A domain of this state root with no record (kvmc killed mid-create) is found and removed."""
    container_id = kvmc("create", "--name", "template", DEFAULT_IMAGE, "true", check=True).stdout.decode().strip()
    xml = (kvmc.data_dir / "containers" / container_id / "domain.xml").read_text()
    orphan = f"kvmc-{uuid.uuid4().hex[:16]}"
    xml = re.sub(r"<name>[^<]+</name>", f"<name>{orphan}</name>", xml)
    xml = re.sub(r"<uuid>[^<]+</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", xml)
    subprocess.run(["virsh", "-c", "qemu:///system", "define", "/dev/stdin"], input=xml.encode(),
                   check=True, capture_output=True)
    try:
        listed = kvmc("gc", check=True).stdout.decode()
        assert f"orphan {orphan}" in listed
        assert container_id[:16] not in listed  # a recorded container is not an orphan
        assert f"removed {orphan}" in kvmc("gc", "--force", check=True).stdout.decode()
        names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert orphan not in names
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", orphan], capture_output=True)
    kvmc("rm", "template", check=True)


def test_system_df_and_prune(kvmc: Kvmc) -> None:
    kvmc("create", "--name", "prunable", "-v", "dfvol:/data", DEFAULT_IMAGE, "true", check=True)
    df = kvmc("system", "df", check=True).stdout.decode()
    assert "Images" in df and "Containers" in df
    [volumes] = [line.split() for line in df.splitlines() if line.startswith("Volumes")]
    assert int(volumes[1]) >= 1 and int(volumes[2]) >= 1  # total, active (prunable mounts it)
    pruned = kvmc("system", "prune", check=True).stdout.decode()
    assert "Deleted container: prunable" in pruned
    assert kvmc("inspect", "prunable").returncode == 125
    # As in docker, prune keeps volumes: data is only deleted by name.
    assert b"dfvol" in kvmc("volume", "ls", "-q", check=True).stdout
    kvmc("volume", "rm", "dfvol", check=True)


@pytest.mark.serial
def test_containers_survive_a_libvirtd_restart(kvmc: Kvmc) -> None:
    kvmc("run", "-d", "--name", "steady", DEFAULT_IMAGE, "sh", "-c",
         "trap 'echo bye; exit 3' TERM; while true; do sleep 0.2; done", check=True)
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    time.sleep(1)
    subprocess.run(["bash", "-c", "setsid nohup tini -s -- libvirtd </dev/null >>/var/log/kvmc-libvirtd.log 2>&1 &"],
                   check=True)
    for _ in range(100):
        if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    info = _inspect(kvmc, "steady")
    assert info["Kvmc"]["State"] == "running" and info["Kvmc"]["VmState"] == "running"
    assert kvmc("exec", "steady", "echo", "still-here").stdout == b"still-here\n"
    kvmc("stop", "-t", "5", "steady", check=True)
    info = _wait_exited(kvmc, "steady")
    assert info["State"]["ExitCode"] == 3
    kvmc("rm", "steady", check=True)
    assert info["Kvmc"]["Domain"] not in kvmc.domains()


def test_gc_reclaims_half_created_containers(kvmc: Kvmc) -> None:
    """What a kvmc killed between reserving a name and writing the record leaves behind."""
    import os

    containers = kvmc.data_dir / "containers"
    containers.joinpath("names").mkdir(parents=True, exist_ok=True)
    stray_dir = containers / ("ab" * 32)
    stray_dir.mkdir()
    (stray_dir / "rootfs.qcow2").write_bytes(b"half")
    stray_name = containers / "names" / "half-made"
    stray_name.write_text("cd" * 32)
    old = time.time() - 3600
    for path in (stray_dir, stray_name):
        os.utime(path, (old, old))
    listed = kvmc("gc", check=True).stdout.decode()
    assert str(stray_dir) in listed and str(stray_name) in listed
    kvmc("gc", "--force", check=True)
    assert not stray_dir.exists() and not stray_name.exists()
    kvmc("run", "--rm", "--name", "half-made", DEFAULT_IMAGE, "true", check=True)  # the name is free again


def _monitor_pid(kvmc: Kvmc, ref: str) -> int | None:
    return _inspect(kvmc, ref)["Kvmc"]["MonitorPid"]


@pytest.fixture
def alone(kvmc: Kvmc) -> Iterator[Kvmc]:
    """kvmc on a state root of its own: no ``kvmc serve`` of the session re-attaches for it."""
    root = Path(tempfile.mkdtemp(prefix="alone-", dir=TEST_ROOT))
    os.chmod(root, 0o755)  # libvirt's QEMU user reaches the disks under it
    if (kvmc.data_dir / "accel.json").exists():  # the session's probe verdict: no second probe
        shutil.copy(kvmc.data_dir / "accel.json", root / "accel.json")
    tool = Kvmc(env={**kvmc.env, "KVMC_DATA_DIR": str(root)}, data_dir=root)
    tool("image", "build-default", check=True)
    try:
        yield tool
    finally:
        for record in (root / "containers").glob("*/record.json"):
            tool("rm", "-f", record.parent.name)
        shutil.rmtree(root, ignore_errors=True)


def test_a_container_outlives_its_monitor(alone: Kvmc) -> None:
    """kill -9 of the monitor: the VM runs on; while nobody reads it the agent keeps the
    process going, buffers 1 MiB of output and drops (and counts) the rest; the next command
    (an exec) starts a monitor that re-attaches; the exit code is still recorded."""
    kvmc = alone
    burst = 3_000_000
    script = (f"echo begin; sleep 3; head -c {burst} /dev/zero | tr '\\0' x; echo; echo burst-done; "
              "while [ ! -e /tmp/go ]; do sleep 0.2; done; sleep 1; echo after; exit 3")
    kvmc("run", "-d", "--name", "survivor", DEFAULT_IMAGE, "sh", "-c", script, check=True)
    deadline = time.monotonic() + 60
    while b"begin" not in kvmc("logs", "survivor").stdout:
        assert time.monotonic() < deadline, "no output"
        time.sleep(0.2)
    old = _monitor_pid(kvmc, "survivor")
    assert old
    os.kill(old, signal.SIGKILL)
    time.sleep(8)  # the burst happens with nobody reading the port
    listed = kvmc("ps", "--filter", "name=survivor", "--format", "{{.Status}}", check=True).stdout.decode()
    assert listed.startswith("Up"), listed  # reads show it running, and change nothing
    assert _monitor_pid(kvmc, "survivor") is None

    # The exec says its word before it lets the container end, and the container waits a second
    # more: an exec still running when process 1 exits ends with its VM ("ended during exec",
    # seen once under a loaded full run when the touch came first).
    done = kvmc("exec", "survivor", "sh", "-c", "echo touched && touch /tmp/go", check=True)
    assert done.stdout == b"touched\n"
    assert kvmc("wait", "survivor", check=True).stdout == b"3\n"
    info = _inspect(kvmc, "survivor")
    assert info["State"]["ExitCode"] == 3 and not info["State"]["Error"]
    logs = kvmc("logs", "survivor", check=True)
    assert logs.stdout.startswith(b"begin\n") and logs.stdout.endswith(b"after\n")
    kept = logs.stdout.count(b"x")
    monitor_log = (kvmc.data_dir / "containers" / info["Id"] / "monitor.log").read_text()
    assert 0 < kept < burst, (kept, monitor_log, logs.stdout[-300:], logs.stderr)  # a buffer's worth kept
    said = re.search(r"re-attached to the running VM after its monitor died: .* the agent dropped (\d+) bytes of "
                     r"the container's output", monitor_log)
    assert said and int(said.group(1)) > 0, monitor_log
    assert b"output lost while kvmc's monitor was away" in logs.stderr
    print(f"re-attached: kept {kept} of {burst} bytes; {monitor_log.strip().splitlines()[-1]}")
    kvmc("rm", "survivor", check=True)
    assert info["Kvmc"]["Domain"] not in kvmc.domains()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_monitors_share_a_fork_server_whose_death_ends_no_container(kvmc: Kvmc) -> None:
    """Monitors are forked by the user's fork server (kvmc/forkserver.py), in sessions of their
    own: kill -9 of the server ends no container and no monitor; the next start forks its
    monitor the old way and starts a new server; gc finds nothing left by the dead one. The
    server is one of this test's own (KVMC_FORKSERVER_DIR): the dead server's socket must not
    show in other tests' gc."""
    own_dir = Path(tempfile.mkdtemp(prefix="fs-", dir="/run"))
    kvmc = Kvmc(env={**kvmc.env, "KVMC_FORKSERVER_DIR": str(own_dir)}, data_dir=kvmc.data_dir)
    names = [f"fs-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    try:
        for name in names:
            kvmc("run", "-d", "--name", name, DEFAULT_IMAGE, "sleep", "600", check=True)
        monitors = [_monitor_pid(kvmc, name) for name in names]
        assert all(monitors)
        servers = {_parent(pid) for pid in monitors[1:]}  # the first may have started the server
        assert len(servers) == 1 and all(_comm(pid) == "kvmc-monitor" for pid in monitors[1:])
        (server,) = servers
        assert _comm(server) == "kvmc-forkserver"

        os.kill(server, signal.SIGKILL)
        for name, monitor in zip(names, monitors):
            assert kvmc("exec", name, "echo", "alive", check=True).stdout == b"alive\n"
            assert _monitor_pid(kvmc, name) == monitor  # the same monitor: no re-attach needed
        late = [f"fs-{uuid.uuid4().hex[:6]}-late{i}" for i in range(2)]
        names += late
        for name in late:  # the first finds no server and starts one; the second is its fork
            kvmc("run", "-d", "--name", name, DEFAULT_IMAGE, "sleep", "600", check=True)
        assert kvmc("exec", late[0], "true", check=True).returncode == 0
        new_server = _parent(_monitor_pid(kvmc, late[1]))
        assert new_server != server and _comm(new_server) == "kvmc-forkserver"
        assert str(own_dir) not in kvmc("gc", check=True).stdout.decode()  # the dead one's socket was replaced
    finally:
        kvmc("rm", "-f", *names)
        for pid in _servers_started_with(f"KVMC_FORKSERVER_DIR={own_dir}"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(own_dir, ignore_errors=True)


def _servers_started_with(variable: str) -> list[int]:
    """Fork servers whose environment has ``variable`` (NAME=value): started by a caller with it."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "kvmc-forkserver" \
                    and variable.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found

"""Networking and storage end to end: published ports answer from the host, the guest reaches
the host and resolves names, named volumes outlive containers, host directories are shared
through virtiofs with :ro enforced by the host, and --read-only/--tmpfs behave as docker's.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc

pytestmark = pytest.mark.e2e

SERVE_8080 = "while true; do echo hello-from-$(hostname) | nc -l -p 8080; done"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(port: int, timeout: float = 60) -> bytes:
    """Read what the guest's server says, retrying while it is still starting.

    slirp accepts on the host before the guest listens, then closes: an empty read means "not
    yet", not failure.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                data = conn.recv(100)
                if data:
                    return data
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"nothing answered on 127.0.0.1:{port} within {timeout}s")


def _inspect(kvmc: Kvmc, name: str) -> dict:
    return json.loads(kvmc("inspect", name, check=True).stdout)[0]


def test_published_port_answers_and_a_taken_port_is_refused(kvmc: Kvmc) -> None:
    kvmc("run", "-d", "--name", "web", "-p", "127.0.0.1:18080:8080", DEFAULT_IMAGE, "sh", "-c", SERVE_8080,
         check=True)
    try:
        assert _fetch(18080).startswith(b"hello-from-")
        ps = kvmc("ps", check=True).stdout.decode()
        assert "127.0.0.1:18080->8080/tcp" in ps
        assert _inspect(kvmc, "web")["Kvmc"]["Ports"] == [
            {"host_ip": "127.0.0.1", "host_port": 18080, "guest_port": 8080, "protocol": "tcp"}]
        before = kvmc.domains()
        second = kvmc("run", "--rm", "--name", "web2", "-p", "127.0.0.1:18080:8080", DEFAULT_IMAGE, "true")
        assert second.returncode == 125
        assert b"18080" in second.stderr and b"already allocated by container web" in second.stderr
        assert kvmc.domains() == before  # refused before any VM was defined
        # A port some other program holds is refused the same way.
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            taken = holder.getsockname()[1]
            third = kvmc("run", "--rm", "-p", f"127.0.0.1:{taken}:80", DEFAULT_IMAGE, "true")
        assert third.returncode == 125 and b"already in use on the host" in third.stderr
    finally:
        kvmc("rm", "-f", "web", check=True)


def test_bad_publish_and_network_flags(kvmc: Kvmc) -> None:
    for args, message in (
        (["-p", "99999:80"], b"ports are 1-65535"),
        (["-p", "localhost:80:80"], b"not an IP address"),
        (["-p", "80:80/sctp"], b"invalid -p"),
        (["--network", "host"], b'"--network host" (sharing the host network stack) is not possible'),
        (["--network", "nosuch"], b"network nosuch not found"),
        (["--network", "none", "-p", "8080:80"], b"cannot be combined with --network none"),
    ):
        proc = kvmc("run", "--rm", *args, DEFAULT_IMAGE, "true")
        assert proc.returncode == 125 and message in proc.stderr, (args, proc.stderr)


def test_guest_network_reaches_the_host_and_resolves_names(kvmc: Kvmc) -> None:
    received: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def accept() -> None:
        conn, _ = server.accept()
        with conn:
            received.append(conn.recv(100))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    # 10.0.2.2 is the host's loopback as slirp shows it; 10.0.2.3 its DNS proxy. deb.debian.org
    # is a name the host must resolve anyway (setup installs from it).
    script = (f"echo ping-from-guest | nc 10.0.2.2 {port}; cat /etc/resolv.conf; ip route; "
              "nslookup deb.debian.org >/dev/null && echo resolved")
    out = kvmc("run", "--rm", DEFAULT_IMAGE, "sh", "-c", script, check=True).stdout.decode()
    thread.join(10)
    server.close()
    assert received == [b"ping-from-guest\n"]
    assert "nameserver 10.0.2.3" in out
    assert "default via 10.0.2.2" in out
    assert "resolved" in out


def test_network_none_has_only_loopback(kvmc: Kvmc) -> None:
    out = kvmc("run", "--rm", "--network", "none", DEFAULT_IMAGE, "ls", "/sys/class/net", check=True).stdout
    assert out.split() == [b"lo"]


def test_named_volume_outlives_its_container(kvmc: Kvmc) -> None:
    kvmc("volume", "create", "--size", "64m", "keep", check=True)
    kvmc("run", "-d", "--name", "writer", "-v", "keep:/data", DEFAULT_IMAGE, "sh", "-c",
         "echo kept-data > /data/file && sync && sleep 300", check=True)
    try:
        busy = kvmc("run", "--rm", "-v", "keep:/data", DEFAULT_IMAGE, "true")
        assert busy.returncode == 125 and b"in use by running container writer" in busy.stderr
        refused = kvmc("volume", "rm", "keep")
        assert refused.returncode == 1 and b"in use by container(s) writer" in refused.stderr
    finally:
        kvmc("rm", "-f", "writer", check=True)  # killed: its ext4 may have a journal to replay
    # Read-only: QEMU opens the volume read-only under a throwaway layer. The guest's ext4
    # replays the journal into that layer (the host never runs e2fsck on the guest's disk), and
    # whatever the guest's root does (remount, write) never reaches the volume.
    disk = kvmc.data_dir / "volumes" / "keep" / "disk.ext4"
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    out = kvmc("run", "--rm", "-v", "keep:/data:ro", DEFAULT_IMAGE, "sh", "-c",
               "cat /data/file; touch /data/x 2>/dev/null && echo writable; "
               "mount -o remount,rw /data 2>/dev/null && touch /data/y 2>/dev/null && echo remounted-private; exit 0",
               check=True).stdout
    assert out.startswith(b"kept-data\n") and b"\nwritable\n" not in out
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    after = kvmc("run", "--rm", "-v", "keep:/data", DEFAULT_IMAGE, "ls", "/data", check=True).stdout.split()
    assert b"file" in after and b"x" not in after and b"y" not in after
    assert b"keep" in kvmc("volume", "ls", check=True).stdout
    kvmc("volume", "rm", "keep", check=True)
    assert not (kvmc.data_dir / "volumes" / "keep").exists()


def test_host_directories_ro_enforced_and_rw_both_ways(kvmc: Kvmc, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "in.txt").write_text("from-host-ro\n")
    (rw / "in.txt").write_text("from-host-rw\n")
    # The guest's root tries to get around :ro by remounting; the host's read-only view wins.
    script = ("cat /ro/in.txt /rw/in.txt; echo from-guest > /rw/out.txt; "
              "touch /ro/x 2>/dev/null && echo ro-writable; "
              "mount -o remount,rw /ro 2>/dev/null; touch /ro/y 2>/dev/null && echo ro-writable-after-remount; "
              "echo done")
    proc = kvmc("-v", "run", "--rm", "-v", f"{ro}:/ro:ro", "-v", f"{rw}:/rw", DEFAULT_IMAGE, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["from-host-ro", "from-host-rw", "done"]
    assert (rw / "out.txt").read_text() == "from-guest\n"
    assert sorted(p.name for p in ro.iterdir()) == ["in.txt"]
    assert b"virtiofs" in proc.stderr and b"cold boot" in proc.stderr  # never pooled, and says why


def test_read_only_rootfs_with_tmpfs_and_volume(kvmc: Kvmc) -> None:
    script = ("touch /rootfile 2>&1; touch /scratch/a && echo tmpfs-ok; touch /data/b && echo volume-ok; "
              "grep ' /scratch ' /proc/mounts")
    proc = kvmc("run", "--rm", "--read-only", "--tmpfs", "/scratch:size=8m", "-v", "rovol:/data",
                DEFAULT_IMAGE, "sh", "-c", script)
    out = proc.stdout.decode()
    assert "Read-only file system" in out
    assert "tmpfs-ok" in out and "volume-ok" in out
    assert "tmpfs" in out and "size=8192k" in out and "noexec" in out
    # The agent unmounted the volume before power-off (--rm lets a VM with volumes power off):
    # its ext4 has no journal left to replay.
    features = subprocess.run(["dumpe2fs", "-h", str(kvmc.data_dir / "volumes/rovol/disk.ext4")],
                              capture_output=True, text=True, check=True).stdout
    assert "needs_recovery" not in features
    kvmc("volume", "rm", "rovol", check=True)


def test_inspect_shows_the_images_exposed_ports_and_volumes(kvmc: Kvmc, config_image: str) -> None:
    kvmc("create", "--name", "exposed", config_image, check=True)
    try:
        info = _inspect(kvmc, "exposed")
        assert info["Kvmc"]["ImageConfig"] == {"ExposedPorts": ["8080/tcp"], "Volumes": ["/var/data"]}
    finally:
        kvmc("rm", "exposed", check=True)


def test_pooled_vm_publishes_ports_added_at_claim(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "1", "-m", "240m", check=True)
    port = _free_port()
    kvmc("-v", "run", "-d", "--name", "pooledweb", "-m", "240m", "-p", f"127.0.0.1:{port}:8080",
         DEFAULT_IMAGE, "sh", "-c", SERVE_8080, check=True)
    try:
        assert _inspect(kvmc, "pooledweb")["Kvmc"]["Boot"] == "pool"
        assert _fetch(port).startswith(b"hello-from-")
    finally:
        kvmc("rm", "-f", "pooledweb", check=True)

"""Parsing of -p, --network, -v and --tmpfs, the agent's mount items, and the volume store.

The volume store test really formats an ext4 disk (mkfs.ext4 is installed by setup).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from kvmc.errors import UsageError
from kvmc.mounts import Mount, agent_mount_items, check_targets, parse_tmpfs, parse_volume
from kvmc.network import PortInUse, PortMapping, allocate_ports, parse_network, parse_publish
from kvmc.volumes import VolumeStore, parse_size


@pytest.mark.parametrize("spec, expected", [
    ("8080", PortMapping("0.0.0.0", 0, 8080, "tcp")),
    ("18080:80", PortMapping("0.0.0.0", 18080, 80, "tcp")),
    ("127.0.0.1:18080:80", PortMapping("127.0.0.1", 18080, 80, "tcp")),
    ("127.0.0.1::80/udp", PortMapping("127.0.0.1", 0, 80, "udp")),
    ("53:53/udp", PortMapping("0.0.0.0", 53, 53, "udp")),
])
def test_parse_publish(spec: str, expected: PortMapping) -> None:
    assert parse_publish(spec) == expected


@pytest.mark.parametrize("spec", ["", "a:b", "0:80", "80:70000", "1.2.3.4:5:6:7", "80/sctp", "[::1]:80:80"])
def test_parse_publish_rejects(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_publish(spec)


def test_mapping_strings() -> None:
    m = PortMapping("127.0.0.1", 18080, 8080, "tcp")
    assert str(m) == "127.0.0.1:18080->8080/tcp"
    assert m.hostfwd() == "hostfwd_add hostnet0 tcp:127.0.0.1:18080-:8080"


def test_allocate_ports_picks_free_ports_and_refuses_taken_ones() -> None:
    [chosen] = allocate_ports([PortMapping("127.0.0.1", 0, 80)], {})
    assert chosen.host_port > 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUse, match="already in use on the host"):
            allocate_ports([PortMapping("127.0.0.1", port, 80)], {})
    with pytest.raises(PortInUse, match="allocated by container web"):
        allocate_ports([PortMapping("127.0.0.1", 18080, 80)], {("0.0.0.0", 18080, "tcp"): "web"})
    with pytest.raises(UsageError, match="published twice"):
        free = chosen.host_port
        allocate_ports([PortMapping("127.0.0.1", free, 80), PortMapping("127.0.0.1", free, 81)], {})


def test_parse_network() -> None:
    assert parse_network("none") == "none"
    with pytest.raises(UsageError, match="user and none"):
        parse_network("bridge")


def test_parse_volume(tmp_path: Path) -> None:
    assert parse_volume("data:/var/lib/data") == Mount("volume", "/var/lib/data", "data")
    assert parse_volume("data:/d/:ro") == Mount("volume", "/d", "data", readonly=True)
    assert parse_volume(f"{tmp_path}:/h:rw") == Mount("bind", "/h", str(tmp_path))
    for bad, message in (("/only", "anonymous"), ("data:rel", "absolute"), ("data:/", "cannot mount over"),
                         ("data:/x:rx", "ro or rw"), ("bad name:/x", "invalid volume name"),
                         (f"{tmp_path}/missing:/x", "does not exist"), ("data:/a/../b", "cannot mount over")):
        with pytest.raises(UsageError, match=message):
            parse_volume(bad)


def test_tmpfs_and_agent_items(tmp_path: Path) -> None:
    mounts = [parse_volume("a:/a"), parse_volume(f"{tmp_path}:/h:ro"), parse_tmpfs("/t:size=8m,mode=1777"),
              parse_volume("b:/b:ro"), parse_tmpfs("/u")]
    assert agent_mount_items(mounts) == [
        "ext4:@vol1:rw,noatime:/a", "virtiofs:share1:ro:/h", "tmpfs:tmpfs:nosuid,nodev,noexec,size=8m,mode=1777:/t",
        "ext4:@vol2:ro,noatime:/b", "tmpfs:tmpfs:nosuid,nodev,noexec:/u",
    ]
    with pytest.raises(UsageError, match="duplicate mount point"):
        check_targets([parse_tmpfs("/x"), parse_volume("v:/x")])


def test_volume_store_creates_a_real_ext4_disk_and_removes_it(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path / "volumes")
    volume = store.create("data", parse_size("32m"))
    disk = Path(volume.path)
    assert disk.stat().st_size == 32 << 20
    assert disk.stat().st_blocks * 512 < 8 << 20  # sparse
    assert "ext4" in subprocess.run(["blkid", "-o", "value", "-s", "TYPE", str(disk)],
                                    capture_output=True, text=True).stdout
    assert store.create("data", exist_ok=True) == volume
    assert [v.name for v in store.list()] == ["data"]
    store.remove("data")
    assert store.list() == [] and not list((tmp_path / "volumes").iterdir())
    with pytest.raises(UsageError):
        parse_size("1m")


def test_a_kvmc_dir_volume_is_a_directory_shared_like_a_bind(tmp_path: Path) -> None:
    """gitlab-ci-local mounts one build volume into a job and its services at once: a kvmc-dir
    volume is a host directory, shared by virtiofs, numbered among the binds."""
    store = VolumeStore(tmp_path / "volumes")
    volume = store.create("build", driver="kvmc-dir", labels={"a": "b"})
    assert volume.driver == "kvmc-dir" and volume.shared_dir == volume.path
    assert Path(volume.path).is_dir() and volume.path.endswith("/build/data")
    (Path(volume.path) / "f").write_bytes(b"x" * 5000)
    assert store.usage_bytes(volume) >= 5000
    assert store.get("build") == volume and store.create("build", exist_ok=True) == volume
    disk = store.create("disk")
    assert disk.driver == "kvmc-ext4" and disk.shared_dir == ""
    with pytest.raises(UsageError, match="not one of"):
        store.create("other", driver="nfs")

    shared = Mount("volume", "/builds", "build", shared_dir=volume.path)
    mounts = [parse_volume("disk:/d"), shared, parse_volume(f"{tmp_path}:/h:ro")]
    assert [m.is_disk for m in mounts] == [True, False, False]
    assert [m.share_source for m in mounts] == ["", volume.path, str(tmp_path)]
    assert agent_mount_items(mounts) == [
        "ext4:@vol1:rw,noatime:/d", "virtiofs:share1:rw:/builds", "virtiofs:share2:ro:/h"]
    store.remove("build")
    assert not (tmp_path / "volumes" / "build").exists()

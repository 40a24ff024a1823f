"""A data dir that runs out of space (issue 15): a loop-mounted 64 MiB ext4 under
/var/lib/kvmc/tests as kvmc's data dir, filled on purpose.

Writes fail with a message that says the disk is full and where, and leave nothing half-made
(image, container, volume, pool member, template, temp file); reads (ps, inspect, logs) and
rm -f keep working; a VM that QEMU paused on the full disk shows as such and resumes once
there is room again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmc.images import add_layer, build_busybox_layout
from tests.e2e.conftest import DEFAULT_IMAGE, TEST_ROOT, Kvmc

pytestmark = pytest.mark.e2e

DISK_MIB = 64
FULL = b"the disk is full: no space left"


@pytest.fixture
def small(kvmc: Kvmc) -> Iterator[Kvmc]:
    """kvmc on a 64 MiB ext4 of its own (no blocks reserved for root), with the default image."""
    base = Path(tempfile.mkdtemp(prefix="full-", dir=TEST_ROOT))
    os.chmod(base, 0o755)
    image, mnt = base / "disk.img", base / "mnt"
    with image.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        os.chmod(mnt, 0o755)  # libvirt's QEMU user reaches the disks under it
        if (kvmc.data_dir / "accel.json").exists():  # the session's probe verdict: no second probe
            shutil.copy(kvmc.data_dir / "accel.json", mnt / "accel.json")
        tool = Kvmc(env={**kvmc.env, "KVMC_DATA_DIR": str(mnt)}, data_dir=mnt)
        tool("image", "build-default", check=True)
        tool("create", "--name", "probe", DEFAULT_IMAGE, "true", check=True)  # the accelerator verdict, cached
        tool("rm", "probe", check=True)
        yield tool
        unfill(mnt)
        for record in (mnt / "containers").glob("*/record.json"):
            tool("rm", "-f", record.parent.name)
        tool("pool", "rm")
        leaked = tool.domains() | tool.pool_domains()
        assert not leaked, f"domains left on the small disk: {leaked}"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def fill(mnt: Path, leave: int = 0) -> None:
    """Leave about ``leave`` bytes free on ``mnt`` (0: none at all)."""
    unfill(mnt)
    size = shutil.disk_usage(mnt).free - leave
    while size > 0:  # ext4 needs some of what df calls free for the filler's own metadata
        if subprocess.run(["fallocate", "-l", str(size), str(mnt / "filler")], capture_output=True).returncode == 0:
            break
        size -= 256 << 10
    if leave == 0:  # whatever fallocate left: block by block
        subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'filler.tail'}", "bs=4k"], capture_output=True)
    subprocess.run(["sync", "-f", str(mnt)], check=True)


def unfill(mnt: Path) -> None:
    for name in ("filler", "filler.tail"):
        (mnt / name).unlink(missing_ok=True)


def tree(path: Path) -> list[str]:
    """Every path under ``path``, relative (what a failed step must not change)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def kvmc_temp_files() -> list[str]:
    return sorted(p.name for p in Path(tempfile.gettempdir()).glob("kvmc-import-*"))


def assert_full(proc: subprocess.CompletedProcess[bytes], where: Path) -> None:
    assert proc.returncode == 125, proc.stderr
    assert any(line.startswith(b"kvmc: " + FULL) for line in proc.stderr.splitlines()), proc.stderr
    assert f"on the file system at {where}".encode() in proc.stderr, proc.stderr


def test_writes_on_a_full_disk_say_so_and_leave_nothing(small: Kvmc, tmp_path: Path) -> None:
    mnt = small.data_dir
    images, temps = tree(mnt / "images"), kvmc_temp_files()
    # An image of 30 MB of random data with 10 MB free: the ext4 base disk cannot be written.
    layout = build_busybox_layout(tmp_path / "big", "latest")
    add_layer(layout, "latest", lambda root: (root / "big").write_bytes(os.urandom(30 << 20)))
    fill(mnt, 10 << 20)
    assert_full(small("image", "import", str(layout), "--name", "big:1"), mnt)
    assert tree(mnt / "images") == images and set(kvmc_temp_files()) <= set(temps)  # others' imports may end
    assert b"big" not in small("images", check=True).stdout

    fill(mnt, 0)
    assert_full(small("create", "--name", "nope", DEFAULT_IMAGE, "true"), mnt)
    assert_full(small("run", "--rm", "--name", "nope", DEFAULT_IMAGE, "true"), mnt)
    assert [p for p in tree(mnt / "containers") if not p.startswith("names")] == []
    assert not (mnt / "containers" / "names" / "nope").exists()
    assert_full(small("volume", "create", "vol"), mnt)
    assert small("volume", "ls", "-q", check=True).stdout == b""
    assert not [p for p in tree(mnt) if ".creating-" in p or ".warming-" in p or p.startswith("images/.staging/")
                or p.startswith("containers/names/.") and not p.startswith("containers/names/.exited")]

    unfill(mnt)  # and with room again, all of it works
    small("create", "--name", "fine", DEFAULT_IMAGE, "true", check=True)
    small("volume", "create", "vol", check=True)
    small("rm", "fine", check=True)
    small("volume", "rm", "vol", check=True)


def test_pool_warm_and_template_capture_on_a_full_disk(small: Kvmc) -> None:
    mnt = small.data_dir
    # A saved member is ~36 MiB (its RAM): with 12 MiB free the save fails.
    fill(mnt, 12 << 20)
    proc = small("pool", "warm", DEFAULT_IMAGE, "--size", "1", "-m", "128m")
    assert_full(proc, mnt)
    assert b"cannot save VM" in proc.stderr
    assert tree(mnt / "pool") == [] and small.pool_domains() == set()
    # A template needs ~0.4 MiB here; with a quarter of that its VM cannot even boot: QEMU pauses
    # it on the write that finds no space, and the warm-up says so instead of waiting for READY.
    fill(mnt, 100 << 10)
    began = time.monotonic()
    proc = small("pool", "warm", DEFAULT_IMAGE, "--template", "-m", "128m")
    assert_full(proc, mnt)
    assert time.monotonic() - began < 30
    assert [p for p in tree(mnt / "pool") if p != "templates" and not p.endswith(".lock")] == []
    assert b"template" not in small("pool", "ls", check=True).stdout.split(b"\n", 1)[1]
    unfill(mnt)


def wait_for(what, timeout: float = 60, why: str = "") -> object:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        time.sleep(0.5)
    return value


def status(small: Kvmc, name: str) -> str:
    return json.loads(small("inspect", name, check=True).stdout)[0]["Kvmc"]["Status"]


def test_reads_and_rm_on_a_full_disk_and_a_vm_paused_on_it(small: Kvmc) -> None:
    mnt = small.data_dir
    script = "i=0; while true; do echo tick $i; i=$((i+1)); date >> /var/tmp/stamps; sync; sleep 0.3; done"
    small("run", "-d", "--name", "ticker", DEFAULT_IMAGE, "sh", "-c", script, check=True)
    wait_for(lambda: b"tick 2" in small("logs", "ticker", check=True).stdout, why="ticks")
    fill(mnt, 0)
    # The guest's next write finds no space: QEMU pauses the VM (werror=enospc), and it says so.
    wait_for(lambda: status(small, "ticker") == "Paused (disk full)", why="the VM to pause on the full disk")
    assert b"Paused (disk full)" in small("ps", check=True).stdout
    info = json.loads(small("inspect", "ticker", check=True).stdout)[0]
    assert (info["Kvmc"]["VmState"] == "paused" and info["Kvmc"]["VmStateReason"] == "disk full"
            and info["Kvmc"]["State"] == "running")
    ticks = small("logs", "--tail", "2", "ticker", check=True).stdout
    assert ticks.count(b"tick") == 2
    # Room again: the monitor resumes the VM, and the container goes on where it was.
    unfill(mnt)
    wait_for(lambda: status(small, "ticker") == "Running", why="the monitor to resume the VM")
    last = int(ticks.split()[-1])
    wait_for(lambda: f"tick {last + 3}".encode() in small("logs", "ticker", check=True).stdout, why="more ticks")
    # rm -f frees space, so it must work on a full disk.
    fill(mnt, 0)
    small("rm", "-f", "ticker", check=True)
    assert small("ps", "-a", "-q", check=True).stdout == b""
    assert [p for p in tree(mnt / "containers") if not p.startswith("names")] == []

"""Pools of saved VMs, end to end: pooled runs behave as cold ones, claims are atomic, a
restored guest gets a fresh clock and RNG, and a changed image invalidates its pool.

Each test warms members of its own VM size, so no other test's run can claim them.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from kvmc.images import add_layer, build_busybox_layout
from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc

pytestmark = pytest.mark.e2e


def _pools(kvmc: Kvmc) -> list[dict]:
    return [json.loads(line) for line in kvmc("pool", "ls", "--format", "json", check=True).stdout.splitlines()]


def _ready(kvmc: Kvmc, memory_mib: int) -> int:
    return sum(p["ready"] for p in _pools(kvmc) if p["memory_mib"] == memory_mib)


def test_pooled_run_behaves_like_a_cold_one(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "1", "-m", "160m", check=True)
    assert _ready(kvmc, 160) == 1
    script = 'echo "$X $(id -un) $(pwd)"; date +%s; echo err >&2; exit 3'
    cold = kvmc("run", "--rm", "--no-pool", "-m", "160m", "-e", "X=1", "-u", "app", "-w", "/tmp",
                DEFAULT_IMAGE, "sh", "-c", script)
    assert _ready(kvmc, 160) == 1  # --no-pool left the member alone
    host_before = time.time()
    pooled = kvmc("-v", "run", "--name", "pooled", "-m", "160m", "-e", "X=1", "-u", "app", "-w", "/tmp",
                  DEFAULT_IMAGE, "sh", "-c", script)
    host_after = time.time()
    assert b"claimed pool member" in pooled.stderr
    assert pooled.returncode == cold.returncode == 3
    cold_lines, pooled_lines = cold.stdout.decode().splitlines(), pooled.stdout.decode().splitlines()
    assert pooled_lines[0] == cold_lines[0] == "1 app /tmp"
    guest_clock = int(pooled_lines[1])
    assert host_before - 2 <= guest_clock <= host_after + 2  # the save's stale clock was reset
    assert pooled.stderr.endswith(b"err\n")
    info = json.loads(kvmc("inspect", "pooled", check=True).stdout)[0]
    assert info["boot"] == "pool" and info["exit_code"] == 3
    assert _ready(kvmc, 160) == 0
    kvmc("rm", "pooled", check=True)
    assert info["domain"] not in kvmc.domains()


def test_restored_clones_read_different_random_bytes(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "2", "-m", "176m", check=True)
    read = ["run", "--rm", "-m", "176m", DEFAULT_IMAGE, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"]
    first, second = kvmc(*read, check=True).stdout, kvmc(*read, check=True).stdout
    assert len(first.split()) == 32 and first != second
    assert _ready(kvmc, 176) == 0


def test_four_concurrent_runs_against_a_pool_of_two(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "2", "-m", "192m", check=True)

    def one(i: int):
        return kvmc("run", "--name", f"pc{i}", "-m", "192m", DEFAULT_IMAGE, "sh", "-c", f"echo pc-{i}")

    with concurrent.futures.ThreadPoolExecutor(4) as workers:
        results = list(workers.map(one, range(4)))
    assert [r.stdout for r in results] == [f"pc-{i}\n".encode() for i in range(4)], [r.stderr for r in results]
    boots = sorted(json.loads(kvmc("inspect", f"pc{i}", check=True).stdout)[0]["boot"] for i in range(4))
    assert boots == ["cold", "cold", "pool", "pool"]
    domains = {json.loads(kvmc("inspect", f"pc{i}", check=True).stdout)[0]["domain"] for i in range(4)}
    assert len(domains) == 4
    for i in range(4):
        kvmc("rm", f"pc{i}", check=True)
    assert not domains & kvmc.domains()


def test_changed_image_invalidates_its_pool(kvmc: Kvmc, layouts) -> None:
    layout = build_busybox_layout(layouts / "poolinv", "latest")
    add_layer(layout, "latest", lambda rootfs: (rootfs / "etc/version").write_text("one\n"))
    kvmc("image", "import", str(layout), "--name", "test/poolinv:1", check=True)
    kvmc("pool", "warm", "test/poolinv:1", "--size", "1", "-m", "208m", check=True)
    add_layer(layout, "latest", lambda rootfs: (rootfs / "etc/version").write_text("two\n"))
    kvmc("image", "import", str(layout), "--name", "test/poolinv:1", check=True)  # same tag, new image
    [pool] = [p for p in _pools(kvmc) if p["memory_mib"] == 208]
    assert pool["stale"] == 1 and pool["ready"] == 0
    proc = kvmc("-v", "run", "--rm", "-m", "208m", "test/poolinv:1", "cat", "/etc/version")
    assert proc.stdout == b"two\n" and b"cold boot" in proc.stderr
    assert b"removed 1 stale" in kvmc("pool", "gc", check=True).stdout
    assert not [p for p in _pools(kvmc) if p["memory_mib"] == 208]


def test_pool_refill_tops_the_pool_up_after_a_claim(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "1", "-m", "224m", check=True)
    env = {**kvmc.env, "KVMC_POOL_REFILL": "true"}
    refilling = Kvmc(env=env, data_dir=kvmc.data_dir)
    proc = refilling("-v", "run", "--rm", "-m", "224m", DEFAULT_IMAGE, "true")
    assert proc.returncode == 0 and b"claimed pool member" in proc.stderr
    deadline = time.monotonic() + 120
    while _ready(kvmc, 224) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ready(kvmc, 224) == 1
    kvmc("pool", "rm", DEFAULT_IMAGE, check=True)
    assert _ready(kvmc, 224) == 0

"""Pools of saved VMs and VM templates, end to end: pooled and cloned runs behave as cold
ones, claims are atomic, a restored or cloned guest gets a fresh clock and RNG, a cloned
container lives on as an ordinary one, and a changed image invalidates its pool.

Each test warms members (or a template) of its own VM size, so no other test's run can use them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kvmc.images import add_layer, build_busybox_layout
from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc
from tests.e2e.test_network_volumes import SERVE_8080, _fetch, _free_port

pytestmark = pytest.mark.e2e
RUN_DIR = Path("/run/kvmc")  # kvmc's sockets (tests run as root); shared by every state root


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
    assert info["Kvmc"]["Boot"] == "pool" and info["State"]["ExitCode"] == 3
    assert _ready(kvmc, 160) == 0
    kvmc("rm", "pooled", check=True)
    assert info["Kvmc"]["Domain"] not in kvmc.domains()


def _virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True).stdout.strip()


def _members(kvmc: Kvmc, memory_mib: int) -> list[dict]:
    found = [json.loads(m.read_text()) for m in (kvmc.data_dir / "pool").glob("*/member.json")]
    return [m for m in found if m["key"]["memory_mib"] == memory_mib]


def test_hot_members_wait_paused_and_a_claim_resumes_one(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "1", "-m", "352m", check=True)
    assert [p["hot"] for p in _pools(kvmc) if p["memory_mib"] == 352] == [0]
    # --hot makes the saved member hot and two more hot ones.
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "3", "--hot", "-m", "352m", check=True)
    [row] = [p for p in _pools(kvmc) if p["memory_mib"] == 352]
    assert row["ready"] == 3 and row["hot"] == 3
    members = _members(kvmc, 352)
    assert [_virsh("domstate", m["domain"]) for m in members] == ["paused"] * 3
    sockets = {m["domain"]: RUN_DIR / f"pool-{m['id'][:16]}.agent.sock" for m in members}
    assert all(sock.is_socket() for sock in sockets.values())

    script = 'echo "$X $(id -un) $(pwd)"; date +%s; echo err >&2; exit 3'
    host_before = time.time()
    hot = kvmc("-v", "run", "--name", "hot", "-m", "352m", "-e", "X=1", "-u", "app", "-w", "/tmp",
               DEFAULT_IMAGE, "sh", "-c", script)
    host_after = time.time()
    assert b"claimed hot pool member" in hot.stderr and hot.returncode == 3
    lines = hot.stdout.decode().splitlines()
    assert lines[0] == "1 app /tmp" and host_before - 2 <= int(lines[1]) <= host_after + 2
    assert hot.stderr.endswith(b"err\n")
    info = json.loads(kvmc("inspect", "hot", check=True).stdout)[0]
    assert info["Kvmc"]["Boot"] == "pool" and not info["Kvmc"]["ResumePaused"] and not info["Kvmc"]["RestoreFrom"]
    assert not sockets[info["Kvmc"]["Domain"]].exists()  # moved to the container, removed with its VM
    # Its persistent definition is the container's own: a restart boots cold from its disk.
    again = kvmc("start", "-a", "hot")
    assert again.returncode == 3 and again.stdout.decode().splitlines()[0] == "1 app /tmp"
    kvmc("rm", "hot", check=True)
    assert info["Kvmc"]["Domain"] not in kvmc.domains()

    # A hot member whose QEMU went away (libvirtd or host restart) is restored from its save file.
    rest = [m for m in members if m["domain"] != info["Kvmc"]["Domain"]]
    for member in rest:
        _virsh("destroy", member["domain"])
    assert [p["hot"] for p in _pools(kvmc) if p["memory_mib"] == 352] == [0]
    restored = kvmc("-v", "run", "--rm", "-m", "352m", DEFAULT_IMAGE, "echo", "restored")
    assert restored.stdout == b"restored\n" and b"claimed pool member" in restored.stderr
    [claimed] = [m for m in rest if m["domain"] not in {x["domain"] for x in _members(kvmc, 352)}]
    deadline = time.time() + 10  # --rm answers first, libvirt drops the paused VM just after
    while claimed["domain"] in _virsh("list", "--all", "--name").split() and time.time() < deadline:
        time.sleep(0.1)
    assert claimed["domain"] not in _virsh("list", "--all", "--name").split()
    assert not list(RUN_DIR.glob(f"pool-{claimed['id'][:16]}.*"))

    # pool rm removes a hot member's QEMU and socket too.
    kvmc("pool", "warm", DEFAULT_IMAGE, "--size", "2", "--hot", "-m", "352m", check=True)
    left = _members(kvmc, 352)
    assert len(left) == 2 and "paused" in {_virsh("domstate", m["domain"]) for m in left}
    kvmc("pool", "rm", check=True)
    names = _virsh("list", "--all", "--name").split()
    assert not {m["domain"] for m in left} & set(names)
    assert not [p for m in left for p in RUN_DIR.glob(f"pool-{m['id'][:16]}.*")]


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
    boots = sorted(json.loads(kvmc("inspect", f"pc{i}", check=True).stdout)[0]["Kvmc"]["Boot"] for i in range(4))
    assert boots == ["cold", "cold", "pool", "pool"]
    domains = {json.loads(kvmc("inspect", f"pc{i}", check=True).stdout)[0]["Kvmc"]["Domain"] for i in range(4)}
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


# ------------------------------------------------------------------------------------ templates
def _templates(kvmc: Kvmc, memory_mib: int) -> list[dict]:
    return [p for p in _pools(kvmc) if p["mode"] == "template" and p["memory_mib"] == memory_mib]


def _template_files(kvmc: Kvmc, memory_mib: int) -> tuple[Path, Path]:
    """(template directory, RAM file) of this session's one template of that size."""
    [(directory, data)] = [(p.parent, json.loads(p.read_text()))
                           for p in (kvmc.data_dir / "pool" / "templates").glob("*/template.json")
                           if json.loads(p.read_text())["key"]["memory_mib"] == memory_mib]
    return directory, Path(data["mem_path"])


def test_template_run_behaves_like_a_cold_one(kvmc: Kvmc) -> None:
    warmed = kvmc("pool", "warm", DEFAULT_IMAGE, "--template", "-m", "272m", check=True)
    assert b"made" in warmed.stdout
    again = kvmc("pool", "warm", DEFAULT_IMAGE, "--template", "-m", "272m", check=True)
    assert b"already ready" in again.stdout  # one template per pool key
    [row] = _templates(kvmc, 272)
    assert row["ready"] == 1 and row["stale"] == 0 and row["ram_mib"] > 1
    _, ram = _template_files(kvmc, 272)
    assert ram.parent == Path("/dev/shm") and ram.stat().st_size == 272 << 20
    script = 'echo "$X $(id -un) $(pwd)"; date +%s; echo err >&2; exit 3'
    cold = kvmc("run", "--rm", "--no-pool", "-m", "272m", "-e", "X=1", "-u", "app", "-w", "/tmp",
                DEFAULT_IMAGE, "sh", "-c", script)
    host_before = time.time()
    cloned = kvmc("-v", "run", "--name", "cloned", "-m", "272m", "-e", "X=1", "-u", "app", "-w", "/tmp",
                  DEFAULT_IMAGE, "sh", "-c", script)
    host_after = time.time()
    assert b"cloned template " + row["id"].encode() in cloned.stderr
    assert cloned.returncode == cold.returncode == 3
    cold_lines, cloned_lines = cold.stdout.decode().splitlines(), cloned.stdout.decode().splitlines()
    assert cloned_lines[0] == cold_lines[0] == "1 app /tmp"
    assert host_before - 2 <= int(cloned_lines[1]) <= host_after + 2  # the template's clock was reset
    assert cloned.stderr.endswith(b"err\n")
    info = json.loads(kvmc("inspect", "cloned", check=True).stdout)[0]
    assert info["Kvmc"]["Boot"] == "template" and info["State"]["ExitCode"] == 3
    assert _templates(kvmc, 272)[0]["ready"] == 1  # a template is not consumed
    assert not kvmc("gc", check=True).stdout  # no orphans: the template VM itself is gone
    kvmc("rm", "cloned", check=True)
    assert info["Kvmc"]["Domain"] not in kvmc.domains()
    assert b"--size does not apply" in kvmc("pool", "warm", DEFAULT_IMAGE, "--template", "--size", "2").stderr


def test_concurrent_template_clones_get_their_own_randomness_and_the_hosts_clock(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--template", "-m", "288m", check=True)
    script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; exec sleep 600"

    def one(i: int):
        return kvmc("run", "-d", "--name", f"tc{i}", "-m", "288m", DEFAULT_IMAGE, "sh", "-c", script)

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as workers:
            results = list(workers.map(one, range(2)))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        infos = [json.loads(kvmc("inspect", f"tc{i}", check=True).stdout)[0] for i in range(2)]
        assert [i["Kvmc"]["Boot"] for i in infos] == ["template", "template"]
        assert [i["Kvmc"]["VmState"] for i in infos] == ["running", "running"]  # both clones at once
        assert infos[0]["Kvmc"]["Domain"] != infos[1]["Kvmc"]["Domain"]
        randoms = []
        for i in range(2):
            deadline = time.monotonic() + 30
            while not (out := kvmc("logs", f"tc{i}", check=True).stdout.strip()) and time.monotonic() < deadline:
                time.sleep(0.2)
            randoms.append(out)
        assert all(len(r) == 64 for r in randoms) and randoms[0] != randoms[1]
        for i in range(2):
            host_before = time.time()
            guest = int(kvmc("exec", f"tc{i}", "date", "+%s", check=True).stdout)
            assert host_before - 2 <= guest <= time.time() + 2
    finally:
        for i in range(2):
            kvmc("rm", "-f", f"tc{i}")


def test_cloned_container_publishes_ports_and_restarts_cold_from_its_own_disk(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--template", "-m", "304m", check=True)
    port = _free_port()
    kvmc("-v", "run", "-d", "--name", "tweb", "-m", "304m", "-p", f"127.0.0.1:{port}:8080",
         DEFAULT_IMAGE, "sh", "-c", SERVE_8080, check=True)
    try:
        info = json.loads(kvmc("inspect", "tweb", check=True).stdout)[0]
        assert info["Kvmc"]["Boot"] == "template"
        assert _fetch(port).startswith(b"hello-from-")
        kvmc("exec", "tweb", "sh", "-c", "echo kept > /root/kept; sync", check=True)
        kvmc("stop", "-t", "2", "tweb", check=True)
        # the persistent definition is the plain one: the next start is a cold boot
        inactive = os.popen(f"virsh -c qemu:///system dumpxml --inactive {info['Kvmc']['Domain']}").read()
        assert "memory-backend-file" not in inactive and "incoming" not in inactive
        kvmc("start", "tweb", check=True)
        assert kvmc("exec", "tweb", "cat", "/root/kept", check=True).stdout == b"kept\n"
        assert _fetch(port).startswith(b"hello-from-")
    finally:
        kvmc("rm", "-f", "tweb", check=True)
    assert info["Kvmc"]["Domain"] not in kvmc.domains()


def test_pool_rm_removes_the_template_and_its_ram_file(kvmc: Kvmc) -> None:
    kvmc("pool", "warm", DEFAULT_IMAGE, "--template", "-m", "320m", check=True)
    directory, ram = _template_files(kvmc, 320)
    assert directory.is_dir() and ram.exists()
    kvmc("create", "--name", "tlate", "-m", "320m", DEFAULT_IMAGE, "true", check=True)
    assert b"template(s)" in kvmc("pool", "rm", DEFAULT_IMAGE, check=True).stdout
    assert not directory.exists() and not ram.exists() and not _templates(kvmc, 320)
    # a container created from it but never started cannot clone it any more: a clear error
    late = kvmc("start", "-a", "tlate")
    assert late.returncode == 125 and b"template" in late.stderr and b"is gone" in late.stderr
    kvmc("rm", "-f", "tlate", check=True)
    proc = kvmc("-v", "run", "--rm", "-m", "320m", DEFAULT_IMAGE, "true")
    assert proc.returncode == 0 and b"cold boot" in proc.stderr


def test_changed_image_makes_its_template_stale(kvmc: Kvmc, layouts) -> None:
    layout = build_busybox_layout(layouts / "tmplinv", "latest")
    add_layer(layout, "latest", lambda rootfs: (rootfs / "etc/version").write_text("one\n"))
    kvmc("image", "import", str(layout), "--name", "test/tmplinv:1", check=True)
    kvmc("pool", "warm", "test/tmplinv:1", "--template", "-m", "336m", check=True)
    _, ram = _template_files(kvmc, 336)
    add_layer(layout, "latest", lambda rootfs: (rootfs / "etc/version").write_text("two\n"))
    kvmc("image", "import", str(layout), "--name", "test/tmplinv:1", check=True)  # same tag, new image
    [row] = _templates(kvmc, 336)
    assert row["stale"] == 1 and row["ready"] == 0
    proc = kvmc("-v", "run", "--rm", "-m", "336m", "test/tmplinv:1", "cat", "/etc/version")
    assert proc.stdout == b"two\n" and b"cold boot" in proc.stderr
    assert b"1 stale template(s)" in kvmc("pool", "gc", check=True).stdout
    assert not _templates(kvmc, 336) and not ram.exists()

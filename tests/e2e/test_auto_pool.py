"""kvmc serve's automatic pools, end to end: after a first `docker run` of an image, the server
warms a VM for it in the background and the next run is served from that pool (inspect says
so) and behaves as a cold one; a server with a tiny budget keeps nothing and says why.

Each test uses a VM size of its own, so no other test's runs claim its members.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc
from tests.e2e.serve import SOCKET_ROOT, KvmcServe

pytestmark = pytest.mark.e2e
WARM_TIMEOUT_S = 240  # a template boot and a clone under TCG on a shared 2-core host


def _auto_rows(kvmc: Kvmc, memory_mib: int, pid: int) -> list[dict]:
    rows = [json.loads(line) for line in kvmc("pool", "ls", "--format", "json", check=True).stdout.splitlines()]
    return [r for r in rows if r["memory_mib"] == memory_mib and r.get("origin") == f"auto:{pid}"]


def test_a_second_docker_run_is_served_from_the_automatic_pool(kvmc: Kvmc, kvmc_serve: KvmcServe) -> None:
    first = kvmc_serve.docker("run", "--rm", "-m", "368m", DEFAULT_IMAGE, "true")
    assert first.returncode == 0, first.stderr
    deadline = time.monotonic() + WARM_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = _auto_rows(kvmc, 368, kvmc_serve.pid)
        if sum(r["hot"] for r in rows if r["mode"] in ("clone", "save")) >= 1:
            break
        time.sleep(1)
    members = [r for r in rows if r["mode"] in ("clone", "save")]
    assert [r["hot"] for r in members] == [1], (rows, kvmc_serve.log_text()[-3000:])
    assert members[0]["why"].startswith("auto (serve): last used") and "keeping 1 of 1" in members[0]["why"]

    script = 'echo "$X $(id -un) $(pwd)"; date +%s; head -c 16 /dev/urandom | od -An -tx1; exit 3'
    host_before = time.time()
    pooled = kvmc_serve.docker("run", "--name", "autopooled", "-m", "368m", "-e", "X=1", "-u", "app", "-w", "/tmp",
                               DEFAULT_IMAGE, "sh", "-c", script)
    host_after = time.time()
    try:
        assert pooled.returncode == 3, pooled.stderr
        lines = pooled.stdout.decode().splitlines()
        assert lines[0] == "1 app /tmp"
        assert host_before - 2 <= int(lines[1]) <= host_after + 2  # the clone's stale clock was reset
        [info] = json.loads(kvmc_serve.docker("inspect", "autopooled", check=True).stdout)
        assert info["Kvmc"]["Boot"] == "pool"
        assert info["Kvmc"]["PoolSource"] == f"hot {'template clone' if members[0]['mode'] == 'clone' else 'member'}" \
                                            " (auto: kvmc serve)"
    finally:
        kvmc_serve.docker("rm", "-f", "autopooled")
    # A cold run of the same command reads other random bytes than the pooled one did.
    cold = kvmc("run", "--rm", "--no-pool", "-m", "368m", "-e", "X=1", "-u", "app", "-w", "/tmp",
                DEFAULT_IMAGE, "sh", "-c", script)
    assert cold.returncode == 3 and cold.stdout.decode().splitlines()[0] == lines[0]
    assert cold.stdout.decode().splitlines()[2:] != lines[2:]
    # kvmc run (the CLI) never claims the server's members: they serve the API's runs.
    deadline = time.monotonic() + WARM_TIMEOUT_S
    while sum(r["hot"] for r in _auto_rows(kvmc, 368, kvmc_serve.pid) if r["mode"] != "template") < 1:
        assert time.monotonic() < deadline, kvmc_serve.log_text()[-3000:]
        time.sleep(1)
    cli = kvmc("-v", "run", "--rm", "-m", "368m", DEFAULT_IMAGE, "true")
    assert cli.returncode == 0 and b"cold boot" in cli.stderr


def test_a_tiny_budget_keeps_nothing_and_pool_ls_says_why(kvmc: Kvmc) -> None:
    SOCKET_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="b", dir=SOCKET_ROOT))
    server = KvmcServe(Kvmc(env={**kvmc.env, "KVMC_AUTO_POOL_BUDGET": "1m"}, data_dir=kvmc.data_dir), workdir)
    server.start()
    try:
        assert server.docker("run", "--rm", "-m", "384m", DEFAULT_IMAGE, "true").returncode == 0
        deadline = time.monotonic() + 60
        while not (rows := _auto_rows(kvmc, 384, server.pid)):
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.5)
        [row] = rows
        assert row["ready"] == 0 and "over budget" in row["why"] and "of 1 MiB left" in row["why"]
        assert not [p for p in (kvmc.data_dir / "pool").glob("*/member.json")
                    if json.loads(p.read_text())["key"]["memory_mib"] == 384]
        assert "budget 1 MiB" in server.log_text()
    finally:
        assert server.stop() == 0
        shutil.rmtree(workdir, ignore_errors=True)
    assert not _auto_rows(kvmc, 384, server.pid)  # its view is gone with it

"""Load (issue 15): 20 `kvmc run --rm` and 20 `docker run --rm` through `kvmc serve`, all at
once (10 at a time: TCG on two shared cores), every exit code and output right, nothing left
behind. An end-to-end test with a bound on count and time, not a benchmark.

Plus what the API's side of the log work must show: `docker logs --tail/--since/--until/-t`
through the shared reader, and inspect's LogPath and LogConfig.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc
from tests.e2e.serve import KvmcServe

pytestmark = pytest.mark.e2e

EACH = 20
AT_ONCE = 10
BUDGET_S = 900.0
"""40 cold VMs, 10 at a time, under TCG on 2 shared cores: ~1.5-5 s each when alone."""


def script(i: int) -> list[str]:
    """A command whose output and exit code say which run it was."""
    return ["sh", "-c", f"echo out-{i}; echo err-{i} >&2; exit {i % 7}"]


def test_parallel_runs_through_both_doors(kvmc: Kvmc, kvmc_serve: KvmcServe) -> None:
    containers_before = kvmc_serve.container_ids()
    domains_before = kvmc.domains()

    def cli(i: int) -> tuple[str, int, subprocess.CompletedProcess[bytes]]:
        return "kvmc", i, kvmc("run", "--rm", "--no-pool", "--name", f"load-cli-{i}", DEFAULT_IMAGE, *script(i),
                               timeout=BUDGET_S)

    def docker(i: int) -> tuple[str, int, subprocess.CompletedProcess[bytes]]:
        return "docker", i, kvmc_serve.docker("run", "--rm", "--name", f"load-api-{i}", DEFAULT_IMAGE, *script(i),
                                              timeout=BUDGET_S)

    jobs = [(cli, i) for i in range(EACH)] + [(docker, i) for i in range(EACH)]
    jobs = [job for pair in zip(jobs[:EACH], jobs[EACH:]) for job in pair]  # both doors at once
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=AT_ONCE) as pool:
        results = list(pool.map(lambda job: job[0](job[1]), jobs))
    took = time.monotonic() - began
    wrong = []
    for door, i, proc in results:
        if (proc.returncode, proc.stdout) != (i % 7, f"out-{i}\n".encode()) or f"err-{i}\n".encode() not in proc.stderr:
            wrong.append((door, i, proc.returncode, proc.stdout, proc.stderr[-300:]))
    assert not wrong, wrong
    print(f"{len(results)} runs ({EACH} kvmc run --rm, {EACH} docker run --rm), {AT_ONCE} at a time: {took:.0f} s")
    assert took < BUDGET_S
    # Nothing left: no container (record, directory, name), no domain, no monitor.
    deadline = time.monotonic() + 30
    while (kvmc.domains() - domains_before or kvmc_serve.container_ids() - containers_before) \
            and time.monotonic() < deadline:
        time.sleep(0.5)  # a --rm container's monitor destroys its paused VM after the client heard
    assert kvmc_serve.container_ids() - containers_before == set()
    assert kvmc.domains() - domains_before == set()
    names = kvmc.data_dir / "containers" / "names"
    assert not [p.name for p in names.iterdir() if p.name.startswith("load-")]
    assert b"load-" not in kvmc("ps", "-a", check=True).stdout
    assert b"load-" not in kvmc_serve.docker("ps", "-a", check=True).stdout
    deadline = time.monotonic() + 30
    while (left := monitors_of(kvmc.data_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"monitors still running: {left}"


def monitors_of(data_dir: Path) -> list[str]:
    """Monitors of containers on this data dir: processes titled ``kvmc-monitor`` (however they
    were started: by the fork server, from a CLI, or ``python -m kvmc.monitor``) whose stderr is
    a monitor.log under the data dir."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes()
            log = os.readlink(proc / "fd" / "2")
        except OSError:
            continue
        if argv.startswith(b"kvmc-monitor") and log.startswith(f"{data_dir}/containers/"):
            found.append(f"{proc.name}: {argv[:80]!r}")
    return found


def test_docker_logs_use_the_shared_reader(kvmc: Kvmc, kvmc_serve: KvmcServe) -> None:
    srv = kvmc_serve
    srv.docker("run", "-d", "--name", "api-logs", "--log-opt", "max-size=10k", "--log-opt", "max-file=2",
               DEFAULT_IMAGE, "sh", "-c", "i=0; while [ $i -lt 500 ]; do echo line $i; i=$((i+1)); done; "
               "sleep 2; echo late", check=True)
    try:
        deadline = time.monotonic() + 60
        while b"late" not in srv.docker("logs", "api-logs").stdout and time.monotonic() < deadline:
            time.sleep(0.5)
        tail = srv.docker("logs", "--tail", "2", "api-logs", check=True).stdout
        assert tail == b"line 499\nlate\n"  # lines, not chunks
        stamped = srv.docker("logs", "-t", "--tail", "1", "api-logs", check=True).stdout.decode()
        assert stamped.endswith(" late\n") and stamped[:4].isdigit() and "T" in stamped.split()[0]
        assert srv.docker("logs", "--since", "1m", "--tail", "1", "api-logs", check=True).stdout == b"late\n"
        assert srv.docker("logs", "--until", "2000-01-01T00:00:00Z", "api-logs", check=True).stdout == b""
        assert kvmc("logs", "--tail", "2", "api-logs", check=True).stdout == tail  # one reader, two doors
        info = json.loads(srv.docker("inspect", "api-logs", check=True).stdout)[0]
        log_path = Path(info["LogPath"])
        assert log_path.name == "container.log" and log_path.is_file()
        assert info["HostConfig"]["LogConfig"] == {"Type": "json-file",
                                                  "Config": {"max-size": "10k", "max-file": "2"}}
        files = sorted(p.name for p in log_path.parent.glob("container.log*"))
        assert files == ["container.log", "container.log.1"]  # 500 lines in 10 kB files, 2 kept
        assert all(p.stat().st_size <= 10_000 for p in log_path.parent.glob("container.log*"))
        bad = srv.docker("run", "--rm", "--log-opt", "max-size=lots", DEFAULT_IMAGE, "true")
        assert bad.returncode == 125 and b"invalid size" in bad.stderr
    finally:
        srv.docker("rm", "-f", "api-logs")


def test_yes_is_capped_and_tail_is_fast(kvmc: Kvmc) -> None:
    """Issue 15's report, shrunk: `yes` for a few seconds under a 1 MB x 3 cap."""
    kvmc("run", "-d", "--name", "yes", "--log-opt", "max-size=1m", "--log-opt", "max-file=3", DEFAULT_IMAGE,
         "yes", check=True)
    try:
        time.sleep(8)
        kvmc("kill", "yes", check=True)  # measure a log that no longer rotates under the glob
        kvmc("wait", "yes", check=True)
        directory = next(p.parent for p in (kvmc.data_dir / "containers").glob("*/record.json")
                         if json.loads(p.read_text())["name"] == "yes")
        total = sum(p.stat().st_size for p in directory.glob("container.log*"))
        assert 0 < total <= 3_000_000
        began = time.monotonic()
        out = kvmc("logs", "--tail", "3", "yes", check=True).stdout
        assert out == b"y\ny\ny\n" and time.monotonic() - began < 5
    finally:
        kvmc("rm", "-f", "yes", check=True)

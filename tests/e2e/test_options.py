"""docker's container options (issue 16), end to end on real VMs: restart policies, health checks,
labels, DNS and hosts, ulimits, the stop signal, -P, docker's --format/--filter conventions, and
the same through kvmc serve (compose's service_healthy; unless-stopped after a host going down).

VMs are few (TCG, shared cores): one container carries every setup option, one health check
turns unhealthy then healthy, and the restart tests count their boots.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc
from tests.e2e.docker_clients import compose, docker_binary
from tests.e2e.serve import KvmcServe

pytestmark = pytest.mark.e2e


def _inspect(kvmc: Kvmc, ref: str) -> dict:
    return json.loads(kvmc("inspect", ref, check=True).stdout)[0]


def _fmt(kvmc: Kvmc, ref: str, fmt: str) -> str:
    return kvmc("inspect", "-f", fmt, ref, check=True).stdout.decode().strip()


def _until(what: Callable[[], Any], timeout: float = 90.0, why: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{why} not reached within {timeout:.0f}s")


def _fetch(port: int, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = conn.recv(4096)
                if data:
                    return data
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"nothing answered on 127.0.0.1:{port}")


# ------------------------------------------------------------------ restart policies
def test_on_failure_restarts_twice_then_stops(kvmc: Kvmc) -> None:
    kvmc("run", "-d", "--name", "flaky", "--restart", "on-failure:2", DEFAULT_IMAGE, "sh", "-c",
         "echo run; exit 3", check=True)
    try:
        assert kvmc("wait", "flaky", timeout=120, check=True).stdout == b"3\n"
        info = _inspect(kvmc, "flaky")
        assert (info["State"]["Status"], info["State"]["ExitCode"], info["RestartCount"]) == ("exited", 3, 2)
        assert info["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
        assert kvmc("logs", "flaky", check=True).stdout == b"run\n" * 3
        time.sleep(2)
        assert _fmt(kvmc, "flaky", "{{.State.Status}} {{.RestartCount}}") == "exited 2"
    finally:
        kvmc("rm", "-f", "flaky")


def test_always_restarts_after_its_process_is_killed_not_after_stop(kvmc: Kvmc) -> None:
    kvmc("run", "-d", "--name", "always", "--restart", "always", DEFAULT_IMAGE, "sh", "-c",
         "echo $$ > /run-pid; echo up; exec sleep 300", check=True)
    try:
        first = _fmt(kvmc, "always", "{{.State.StartedAt}}")
        # The process dies (killed inside the guest, as by an OOM or a crash): the monitor boots
        # the container again.
        kvmc("exec", "always", "sh", "-c", "kill -9 $(cat /run-pid)")  # the exec goes with the container
        _until(lambda: _fmt(kvmc, "always", "{{.State.Status}} {{.RestartCount}}") == "running 1"
               and _fmt(kvmc, "always", "{{.State.StartedAt}}") not in (first, "0001-01-01T00:00:00Z"),
               why="the restart")
        assert kvmc("exec", "always", "echo", "back").stdout == b"back\n"
        assert kvmc("logs", "always", check=True).stdout == b"up\nup\n"
        # A stop is for good: the policy waits for the next start by hand.
        kvmc("stop", "-t", "5", "always", check=True)
        time.sleep(3)
        assert _fmt(kvmc, "always", "{{.State.Status}} {{.RestartCount}}") == "exited 1"
        # docker's kill (SIGKILL or the stop signal) also ends the restarts until the next start.
        kvmc("start", "always", check=True)
        assert _fmt(kvmc, "always", "{{.State.Status}} {{.RestartCount}}") == "running 0"
        kvmc("kill", "always", check=True)
        assert kvmc("wait", "always", timeout=60, check=True).stdout == b"137\n"
        time.sleep(3)
        assert _fmt(kvmc, "always", "{{.State.Status}} {{.RestartCount}}") == "exited 0"
    finally:
        kvmc("rm", "-f", "always")


# ---------------------------------------------------------------------- health checks
def test_health_check_turns_unhealthy_then_healthy(kvmc: Kvmc) -> None:
    kvmc("run", "-d", "--name", "checked", "--health-cmd", "test -e /tmp/ok && echo fine",
         "--health-interval", "1s", "--health-retries", "2", DEFAULT_IMAGE, "sleep", "300", check=True)
    try:
        assert _fmt(kvmc, "checked", "{{.State.Health.Status}}") in ("starting", "unhealthy")
        _until(lambda: _fmt(kvmc, "checked", "{{.State.Health.Status}}") == "unhealthy", why="unhealthy")
        health = _inspect(kvmc, "checked")["State"]["Health"]
        assert health["FailingStreak"] >= 2 and all(r["ExitCode"] == 1 for r in health["Log"])
        assert "(unhealthy)" in kvmc("ps", "--filter", "name=checked", "--format", "{{.Status}}").stdout.decode()
        assert kvmc("ps", "-q", "--filter", "health=unhealthy", check=True).stdout.strip()
        kvmc("exec", "checked", "touch", "/tmp/ok", check=True)
        _until(lambda: _fmt(kvmc, "checked", "{{.State.Health.Status}}") == "healthy", why="healthy")
        health = _inspect(kvmc, "checked")["State"]["Health"]
        assert health["FailingStreak"] == 0 and health["Log"][-1]["Output"] == "fine\n"
        assert kvmc("ps", "--format", "{{.Names}} {{.Status}}", check=True).stdout.decode().count("(healthy)") >= 1
        check = _inspect(kvmc, "checked")["Config"]["Healthcheck"]
        assert check == {"Test": ["CMD-SHELL", "test -e /tmp/ok && echo fine"], "Interval": 1_000_000_000,
                         "Retries": 2}
    finally:
        kvmc("rm", "-f", "checked")


# ------------------------------------------------ setup options, labels, -P, stop signal
SERVE_AND_TRAP = ("mkdir -p /tmp/w && echo hi > /tmp/w/index.html && httpd -p 8080 -h /tmp/w; "
                  "trap 'echo got-usr1; exit 5' USR1; echo ready; while :; do sleep 0.2; done")


def test_setup_options_labels_publish_all_and_stop_signal(kvmc: Kvmc, config_image: str, tmp_path: Path) -> None:
    """One VM: --add-host, --dns, --dns-search, --ulimit visible in the guest; labels (flag and
    file, merged with the image's) filterable; -P publishes the image's exposed port; the
    --stop-signal reaches the process on stop; --cidfile has the id."""
    labels = tmp_path / "labels"
    labels.write_text("# a comment\nowner=ops\n")
    cidfile = tmp_path / "cid"
    kvmc("run", "-d", "--name", "opts", "--label", "tier=front", "--label-file", str(labels),
         "--add-host", "db:192.0.2.7", "--add-host", "gw:host-gateway", "--dns", "192.0.2.53",
         "--dns-search", "corp.example", "--ulimit", "nofile=100:100", "-P", "--stop-signal", "SIGUSR1",
         "--init", "--cidfile", str(cidfile), config_image, SERVE_AND_TRAP, check=True)
    try:
        info = _inspect(kvmc, "opts")
        assert cidfile.read_text() == info["Id"]
        _until(lambda: b"ready" in kvmc("logs", "opts").stdout, why="ready")
        out = kvmc("exec", "opts", "sh", "-c", "ulimit -n; ulimit -Hn; cat /etc/hosts /etc/resolv.conf",
                   check=True).stdout.decode()
        lines = out.splitlines()
        assert lines[:2] == ["100", "100"]
        assert "192.0.2.7 db" in lines and "10.0.2.2 gw" in lines
        assert "nameserver 192.0.2.53" in lines and "search corp.example" in lines
        # Labels: the image's, the file's and the flag's; docker's filters find them.
        assert info["Config"]["Labels"]["tier"] == "front" and info["Config"]["Labels"]["owner"] == "ops"
        short = info["Id"][:12]
        assert kvmc("ps", "-q", "--filter", "label=tier=front", check=True).stdout.decode().split() == [short]
        assert kvmc("ps", "-q", "--filter", "label=tier=back", check=True).stdout == b""
        assert kvmc("ps", "--filter", "label=owner", "--format", '{{.Names}} {{.Label "tier"}}',
                    check=True).stdout == b"opts front\n"
        assert info["HostConfig"]["Init"] is True and info["HostConfig"]["Dns"] == ["192.0.2.53"]
        assert info["HostConfig"]["ExtraHosts"] == ["db:192.0.2.7", "gw:host-gateway"]
        assert info["HostConfig"]["Ulimits"] == [{"Name": "nofile", "Soft": 100, "Hard": 100}]
        # -P: the image's EXPOSE 8080/tcp on a free host port, which answers.
        [binding] = info["NetworkSettings"]["Ports"]["8080/tcp"]
        assert info["HostConfig"]["PublishAllPorts"] is True
        assert _fetch(int(binding["HostPort"])).startswith(b"HTTP/1.1 200 OK")  # the guest's httpd
        assert "->8080/tcp" in kvmc("ps", "--format", "{{.Ports}}", "--filter", "name=opts").stdout.decode()
        # The stop signal reaches the process (its trap runs: exit 5).
        assert info["Config"]["StopSignal"] == "SIGUSR1"
        kvmc("stop", "-t", "10", "opts", check=True)
        assert _fmt(kvmc, "opts", "{{.State.ExitCode}}") == "5"
        assert b"got-usr1" in kvmc("logs", "opts", check=True).stdout
    finally:
        kvmc("rm", "-f", "opts")


def test_docker_output_conventions(kvmc: Kvmc) -> None:
    """ps -n/-l/--no-trunc/--format json/table, inspect -f/--type, images --filter/--format,
    create with the options (no VM boots here)."""
    made = [kvmc("create", "--name", f"conv{i}", "-l", f"n={i}", DEFAULT_IMAGE, "true", check=True).stdout.decode().strip()
            for i in range(2)]
    try:
        assert kvmc("ps", "-l", "-q", check=True).stdout.decode().split() == [made[1][:12]]
        assert kvmc("ps", "-n", "2", "-q", "--no-trunc", check=True).stdout.decode().split() == made[::-1]
        rows = [json.loads(line) for line in kvmc("ps", "-a", "--filter", "name=conv", "--format", "json",
                                                   check=True).stdout.splitlines()]
        assert sorted(r["Names"] for r in rows) == ["conv0", "conv1"] and rows[0]["State"] == "created"
        table = kvmc("ps", "-a", "--filter", "label=n=0", "--format", "table {{.ID}}\t{{.Names}}",
                     check=True).stdout.decode().splitlines()
        assert table == ["CONTAINER ID   NAMES", f"{made[0][:12]}   conv0"]
        assert _fmt(kvmc, "conv0", "{{.Name}} {{.State.Status}} {{json .Config.Labels.n}}") == '/conv0 created "0"'
        assert kvmc("inspect", "--type", "image", "-f", "{{index .RepoTags 0}}", DEFAULT_IMAGE,
                    check=True).stdout == f"{DEFAULT_IMAGE}\n".encode()
        assert kvmc("inspect", "--type", "image", "conv0").returncode == 125
        assert kvmc("images", "--filter", "dangling=true", "-q", check=True).stdout == b""
        images = kvmc("images", "--format", "{{.Repository}}:{{.Tag}}", check=True).stdout.decode().split()
        assert DEFAULT_IMAGE in images
        assert kvmc("run", "--rm", "--platform", "linux/arm64", DEFAULT_IMAGE, "true").returncode == 125
        assert kvmc("run", "--rm", "--restart", "always", DEFAULT_IMAGE, "true").returncode == 125
        assert kvmc("run", "--rm", "--pull", "never", "nosuch/image", "true").returncode == 125
    finally:
        kvmc("rm", *made)


# ---------------------------------------------------------------------------- the API
COMPOSE_HEALTH = """\
services:
  db:
    image: kvmc/busybox:latest
    command: sh -c 'sleep 3; touch /tmp/ready; sleep 300'
    healthcheck:
      test: ["CMD-SHELL", "test -e /tmp/ready"]
      interval: 1s
      retries: 60
  app:
    image: kvmc/busybox:latest
    command: sleep 300
    depends_on:
      db:
        condition: service_healthy
"""


def test_compose_service_healthy_waits_for_the_health_check(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    srv = kvmc_serve
    project = tmp_path / "kvmchealth"
    project.mkdir()
    (project / "compose.yaml").write_text(COMPOSE_HEALTH)
    events = subprocess.Popen([str(docker_binary()), "events", "--format", "{{json .}}"], env=srv.env,
                              stdout=subprocess.PIPE)
    try:
        up = compose(srv.env, project, "up", "-d", timeout=300)
        assert up.returncode == 0, up.stderr
        assert b"Healthy" in up.stderr, up.stderr
        db = json.loads(srv.docker("inspect", "kvmchealth-db-1", check=True).stdout)[0]
        app = json.loads(srv.docker("inspect", "kvmchealth-app-1", check=True).stdout)[0]
        assert db["State"]["Health"]["Status"] == "healthy" and app["State"]["Running"]
        passes = [r["End"] for r in db["State"]["Health"]["Log"] if r["ExitCode"] == 0]
        assert app["State"]["StartedAt"] > min(passes)  # started after a passing check of db
    finally:
        down = compose(srv.env, project, "down", timeout=300)
        events.send_signal(signal.SIGTERM)
        seen, _ = events.communicate(timeout=30)
    assert down.returncode == 0, down.stderr
    # /events: db turned healthy (having started unhealthy: its check failed for 3 s), then app started.
    order = [(json.loads(line)["Actor"]["Attributes"].get("name"), json.loads(line)["Action"])
             for line in seen.splitlines()]
    assert ("kvmchealth-db-1", "health_status: healthy") in order, order
    assert order.index(("kvmchealth-db-1", "health_status: healthy")) < order.index(("kvmchealth-app-1", "start"))
    assert order.index(("kvmchealth-db-1", "start")) < order.index(("kvmchealth-db-1", "health_status: healthy"))


def _restart_libvirtd() -> None:
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    time.sleep(1)
    subprocess.run(["bash", "-c", "setsid nohup tini -s -- libvirtd </dev/null >>/var/log/kvmc-libvirtd.log 2>&1 &"],
                   check=True)
    _until(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0,
           timeout=30, why="libvirtd answers")


@pytest.mark.serial
def test_unless_stopped_comes_back_when_kvmc_serve_starts_after_the_host_went_down(kvmc_serve: KvmcServe) -> None:
    """The host goes down (kvmc serve, the monitor and the VM die; libvirtd restarts): when kvmc
    serve starts again, the unless-stopped container runs again; one stopped by hand does not."""
    srv, kvmc = kvmc_serve, kvmc_serve.kvmc
    srv.docker("run", "-d", "--name", "us-up", "--restart", "unless-stopped", DEFAULT_IMAGE, "sleep", "300",
               check=True)
    srv.docker("run", "-d", "--name", "us-stopped", "--restart", "unless-stopped", DEFAULT_IMAGE, "sleep", "300",
               check=True)
    try:
        srv.docker("stop", "-t", "2", "us-stopped", check=True)
        before = _inspect(kvmc, "us-up")
        assert before["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        srv.kill9()
        os.kill(before["Kvmc"]["MonitorPid"], signal.SIGKILL)
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", before["Kvmc"]["Domain"]], check=True,
                       capture_output=True)
        _restart_libvirtd()
        assert _inspect(kvmc, "us-up")["State"]["Status"] == "exited"  # down with the host
        srv.start()
        _until(lambda: (started := _fmt(kvmc, "us-up", "{{.Kvmc.State}} {{.State.StartedAt}}")).startswith("running ")
               and started.split()[1] not in (before["State"]["StartedAt"], "0001-01-01T00:00:00Z"),
               why="us-up running again")
        assert srv.docker("exec", "us-up", "echo", "back", check=True).stdout == b"back\n"
        assert "restart policy: started us-up" in srv.log_text()
        time.sleep(2)
        assert _fmt(kvmc, "us-stopped", "{{.State.Status}}") == "exited"
    finally:
        if srv.proc is None or srv.proc.poll() is not None:
            srv.start()
        srv.docker("rm", "-f", "us-up", "us-stopped")

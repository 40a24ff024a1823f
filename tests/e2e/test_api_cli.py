"""`kvmc serve` driven by the real docker CLI (28.x) and Docker Compose v2, end to end.

Every container here is a real microVM (TCG in CI), so checks share a container where that is
natural. The server shares the session's data dir with the ``kvmc`` fixture: what one front
door makes, the other sees. Network rule: the clients talk to the server's unix socket, and
the tests to 127.0.0.1 only (the "unknown image" and pull checks use a local registry).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kvmc.images import add_layer, build_busybox_layout
from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc
from tests.e2e.docker_clients import (  # noqa: F401 (fixtures)
    Registry,
    compose,
    docker_binary,
    docker_save_tarball,
    free_port,
    push_layout,
    registry,
)
from tests.e2e.serve import KvmcServe

pytestmark = pytest.mark.e2e


# ------------------------------------------------------------------------------- helpers
def _fetch(port: int, timeout: float = 60) -> bytes:
    """What the guest's server says on 127.0.0.1:``port``, retrying while it starts.

    slirp accepts on the host before the guest listens, then closes: an empty read means
    "not yet".
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


def _until(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s")


def _out(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode(errors="replace")


def _status(srv: KvmcServe, name: str) -> str:
    return _out(srv.docker("inspect", "-f", "{{.State.Status}}", name, check=True)).strip()


def _kvmc_names(kvmc: Kvmc, *args: str) -> set[str]:
    """Container names in ``kvmc ps [ARGS]`` (the last column)."""
    lines = _out(kvmc("ps", *args, check=True)).splitlines()[1:]
    return {line.split()[-1] for line in lines if line.strip()}


def _docker_names(srv: KvmcServe) -> set[str]:
    return set(_out(srv.docker("ps", "-a", "--format", "{{.Names}}", check=True)).split())


def _no_domain_within(kvmc: Kvmc, domain: str, timeout: float = 5.0) -> None:
    """``domain`` is gone from libvirt (a removal may finish just after the client returns)."""
    _until(lambda: domain not in kvmc._libvirt_domains(), timeout=timeout, what=f"domain {domain} gone")


def _domain_of(srv: KvmcServe, name: str) -> str:
    """The libvirt domain of a container, from kvmc's own record (``kvmc inspect``)."""
    return json.loads(srv.kvmc("inspect", name, check=True).stdout)[0]["Kvmc"]["Domain"]


# --------------------------------------------------------------------------------- run
def test_run_streams_and_exit_codes(kvmc_serve: KvmcServe) -> None:
    srv = kvmc_serve
    before = set(_out(srv.docker("ps", "-aq", "--no-trunc", check=True)).split())
    proc = srv.docker("run", "--rm", DEFAULT_IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == b"out\n"
    assert proc.stderr == b"err\n"

    with Registry() as reg:  # a loopback registry that has no such repository: nothing leaves the host
        unknown = f"{reg.host}/nope:1"
        proc = srv.docker("run", "--rm", unknown, "true")
    assert proc.returncode == 125, proc.stderr
    assert b"Unable to find image" in proc.stderr and b"nope" in proc.stderr

    proc = srv.docker("run", "--rm", DEFAULT_IMAGE, "no-such-command")
    assert proc.returncode == 127, proc.stderr
    assert b'"no-such-command": executable file not found' in proc.stderr

    proc = srv.docker("run", "--rm", DEFAULT_IMAGE, "/etc/passwd")
    assert proc.returncode == 126, proc.stderr
    assert b'"/etc/passwd": permission denied' in proc.stderr.lower()

    # the failed runs leave nothing behind either: --rm removed each container
    assert set(_out(srv.docker("ps", "-aq", "--no-trunc", check=True)).split()) == before


def test_run_stdin_and_process_flags(kvmc_serve: KvmcServe) -> None:
    srv = kvmc_serve
    proc = srv.docker("run", "-i", "--rm", DEFAULT_IMAGE, "cat", input=b"a\nb\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"a\nb\n"

    proc = srv.docker("run", "--rm", "-e", "GREETING=hi there", "-w", "/srv/work", "-u", "nobody",
                      "--entrypoint", "/bin/sh", DEFAULT_IMAGE, "-c", 'echo "$GREETING|$(pwd)|$(id -u)|$0"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hi there|/srv/work|65534|/bin/sh\n"


def test_rm_leaves_no_domain(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    srv = kvmc_serve
    cidfile = tmp_path / "cid"
    proc = srv.docker("run", "--rm", "--cidfile", str(cidfile), "--name", "api-rm", DEFAULT_IMAGE,
                      "sh", "-c", "echo bye")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"bye\n"
    cid = cidfile.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid)
    # The record is gone when the client returns; the VM may be in its short paused teardown.
    assert "api-rm" not in _docker_names(srv)
    assert "api-rm" not in _kvmc_names(srv.kvmc, "-a")
    assert not (srv.kvmc.data_dir / "containers" / cid).exists()
    _no_domain_within(srv.kvmc, f"kvmc-{cid[:16]}")
    assert srv.docker("inspect", "api-rm").returncode != 0


# --------------------------------------------------------------- a detached server
WEB = "echo started; echo hello > /www; while true; do nc -l -p 8080 < /www; done"


def test_detached_container_full_lifecycle(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    srv = kvmc_serve
    kvmc = srv.kvmc
    port = free_port()
    proc = srv.docker("run", "-d", "--name", "api-web", "-p", f"127.0.0.1:{port}:8080", "-p", "8080",
                      DEFAULT_IMAGE, "sh", "-c", WEB)
    assert proc.returncode == 0, proc.stderr
    cid = _out(proc).strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid), proc.stdout
    domain = _domain_of(srv, "api-web")
    try:
        ps = _out(srv.docker("ps", "--format", "{{.ID}} {{.Names}} {{.Status}}", check=True))
        assert f"{cid[:12]} api-web Up" in ps, ps

        # logs -f keeps following a running container: bounded by a timeout
        with pytest.raises(subprocess.TimeoutExpired) as followed:
            srv.docker("logs", "-f", "api-web", timeout=5)
        assert b"started\n" in (followed.value.output or b"")

        proc = srv.docker("exec", "api-web", "sh", "-c", "cat /www; exit 4")
        assert proc.returncode == 4 and proc.stdout == b"hello\n", proc.stderr

        # both publications, the fixed one and a random host port for the same guest port
        ports = _out(srv.docker("port", "api-web", check=True)).splitlines()
        assert f"8080/tcp -> 127.0.0.1:{port}" in ports, ports
        random_ports = [int(line.rsplit(":", 1)[1]) for line in ports if line != f"8080/tcp -> 127.0.0.1:{port}"]
        assert len(random_ports) == 1 and random_ports[0] != port, ports
        assert _fetch(port) == b"hello\n"
        assert _fetch(random_ports[0]) == b"hello\n"

        # docker cp in and out
        src = tmp_path / "in.txt"
        src.write_text("copied in\n")
        srv.docker("cp", str(src), "api-web:/root/in.txt", check=True)
        proc = srv.docker("exec", "api-web", "cat", "/root/in.txt", check=True)
        assert proc.stdout == b"copied in\n"
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        srv.docker("cp", "api-web:/www", str(out_dir), check=True)
        assert (out_dir / "www").read_text() == "hello\n"

        assert _status(srv, "api-web") == "running"

        # stop, then start: the files written before are still there, the port answers again
        srv.docker("stop", "-t", "2", "api-web", check=True)
        assert _status(srv, "api-web") == "exited"
        srv.docker("start", "api-web", check=True)
        assert _status(srv, "api-web") == "running"
        # The port first: its server starts once the command has rewritten /www (start returns
        # when the command runs, and `echo hello > /www` empties the file before it writes it).
        assert _fetch(port) == b"hello\n"
        proc = srv.docker("exec", "api-web", "sh", "-c", "cat /root/in.txt /www", check=True)
        assert proc.stdout == b"copied in\nhello\n"

        srv.docker("pause", "api-web", check=True)
        assert _status(srv, "api-web") == "paused"
        assert _out(srv.docker("inspect", "-f", "{{.State.Paused}}", "api-web", check=True)).strip() == "true"
        srv.docker("unpause", "api-web", check=True)
        assert _status(srv, "api-web") == "running"

        stats = _out(srv.docker("stats", "--no-stream", "api-web", check=True, timeout=60))
        header, *rows = stats.splitlines()
        assert "CPU %" in header and "MEM USAGE" in header, stats
        assert len(rows) == 1 and rows[0].split()[:2] == [cid[:12], "api-web"], stats
        # BLOCK I/O is QEMU's count of the disk traffic: the guest read its command from the image.
        block_io = _out(srv.docker("stats", "--no-stream", "--format", "{{.BlockIO}}", "api-web",
                                   check=True, timeout=60)).strip()
        read, written = (part.strip() for part in block_io.split("/"))
        assert read not in ("0B", "0"), block_io

        top = _out(srv.docker("top", "api-web", check=True))
        assert top.split()[0] == "PID", top
        assert "nc -l -p 8080" in top and "sh -c" in top, top
        assert "[kthreadd]" not in top, top  # the guest kernel's threads are not the container's
    finally:
        removed = srv.docker("rm", "-f", "api-web")
    assert removed.returncode == 0, removed.stderr
    assert "api-web" not in _kvmc_names(kvmc, "-a")
    assert "api-web" not in _docker_names(srv)
    _no_domain_within(kvmc, domain)


# ------------------------------------------------------------------------------ volumes
def test_named_volume_persists_and_host_dir_is_read_only(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    srv = kvmc_serve
    host = tmp_path / "host"
    host.mkdir()
    (host / "hostfile").write_text("from the host\n")
    proc = srv.docker("volume", "create", "api-vol")
    assert proc.returncode == 0 and _out(proc).strip() == "api-vol", proc.stderr
    try:
        assert "api-vol" in _out(srv.docker("volume", "ls", "--format", "{{.Name}}", check=True)).split()
        info = json.loads(srv.docker("volume", "inspect", "api-vol", check=True).stdout)[0]
        assert info["Name"] == "api-vol" and info["Driver"] == "local" and info["Mountpoint"]

        proc = srv.docker("run", "--rm", "-v", "api-vol:/data", DEFAULT_IMAGE, "sh", "-c",
                          "echo first-run >> /data/log")
        assert proc.returncode == 0, proc.stderr
        script = ("cat /data/log; cat /h/hostfile; "
                  "if touch /h/new 2>/dev/null; then echo WRITABLE; else echo read-only; fi")
        proc = srv.docker("run", "--rm", "-v", "api-vol:/data", "-v", f"{host}:/h:ro", DEFAULT_IMAGE,
                          "sh", "-c", script)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"first-run\nfrom the host\nread-only\n"
        assert not (host / "new").exists()
    finally:
        removed = srv.docker("volume", "rm", "api-vol")
    assert removed.returncode == 0, removed.stderr
    assert "api-vol" not in _out(srv.docker("volume", "ls", "--format", "{{.Name}}", check=True)).split()
    assert srv.docker("volume", "inspect", "api-vol").returncode != 0


# ------------------------------------------------------------- wait, rename, kill, restart
TRAPPER = "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 1; done"


def test_cp_into_a_created_container_and_its_volume(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    """gitlab-ci-local's order: create, copy its files in (into a named volume too), start -a.
    A stopped container's files are reached the same way (its own VM, booted for the copy)."""
    srv = kvmc_serve
    volume = f"cpvol-{tmp_path.name[-8:]}"
    name = f"cpc-{tmp_path.name[-8:]}"
    (tmp_path / "job.sh").write_text("echo from-the-script\n")
    (tmp_path / "v.txt").write_text("in-the-volume\n")
    assert srv.docker("create", "--name", name, "-v", f"{volume}:/data", DEFAULT_IMAGE,
                      "sh", "-c", "sh /job.sh; cat /data/v.txt; echo after > /data/w.txt").returncode == 0
    try:
        assert srv.docker("cp", str(tmp_path / "job.sh"), f"{name}:/").returncode == 0
        assert srv.docker("cp", str(tmp_path / "v.txt"), f"{name}:/data/").returncode == 0
        started = srv.docker("start", "-a", name)
        assert started.returncode == 0 and started.stdout == b"from-the-script\nin-the-volume\n", started.stderr
        out = srv.docker("cp", f"{name}:/data/w.txt", str(tmp_path / "w.txt"))
        assert out.returncode == 0 and (tmp_path / "w.txt").read_text() == "after\n", out.stderr
        assert _status(srv, name) == "exited"  # copying did not start the container
        missing = srv.docker("cp", str(tmp_path / "job.sh"), f"{name}:/no/such/dir/")
        assert missing.returncode != 0
    finally:
        srv.docker("rm", "-f", name)
        srv.docker("volume", "rm", volume)


def test_save_then_load_round_trips_an_image(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    """docker save: a docker-archive of the image's tree as one layer, which docker load reads back."""
    srv = kvmc_serve
    name = "test/saveme:1"
    srv.docker("tag", DEFAULT_IMAGE, name, check=True)
    saved = tmp_path / "saved.tar"
    try:
        proc = srv.docker("save", "-o", str(saved), name)
        assert proc.returncode == 0, proc.stderr
        import tarfile

        with tarfile.open(saved) as archive:
            [entry] = json.load(archive.extractfile("manifest.json"))
        assert entry["RepoTags"] == [name] and len(entry["Layers"]) == 1
        srv.docker("rmi", name, check=True)
        loaded = srv.docker("load", "-i", str(saved))
        assert loaded.returncode == 0 and f"Loaded image: {name}" in _out(loaded), loaded.stderr
        ran = srv.docker("run", "--rm", name, "sh", "-c", "echo round-trip")
        assert ran.returncode == 0 and ran.stdout == b"round-trip\n", ran.stderr
    finally:
        srv.docker("rmi", "-f", name)


def test_wait_rename_kill_and_restart(kvmc_serve: KvmcServe) -> None:
    srv = kvmc_serve
    srv.docker("run", "-d", "--name", "api-trap", DEFAULT_IMAGE, "sh", "-c", TRAPPER, check=True)
    try:
        srv.docker("rename", "api-trap", "api-trapped", check=True)
        assert srv.docker("inspect", "api-trap").returncode != 0
        assert _out(srv.docker("inspect", "-f", "{{.Name}}", "api-trapped", check=True)).strip() == "/api-trapped"
        assert "api-trapped" in _kvmc_names(srv.kvmc)

        started = _out(srv.docker("inspect", "-f", "{{.State.StartedAt}}", "api-trapped", check=True)).strip()
        srv.docker("restart", "-t", "2", "api-trapped", check=True)
        assert _status(srv, "api-trapped") == "running"
        restarted = _out(srv.docker("inspect", "-f", "{{.State.StartedAt}}", "api-trapped", check=True)).strip()
        assert restarted != started
        _until(lambda: srv.docker("logs", "api-trapped").stdout.count(b"ready\n") == 2, what="second 'ready'")

        # docker wait blocks while the container runs, then prints the exit code of the trap
        waiter = subprocess.Popen([str(docker_binary()), "wait", "api-trapped"], env=srv.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(1.5)
            assert waiter.poll() is None, "docker wait returned while the container runs"
            srv.docker("kill", "-s", "TERM", "api-trapped", check=True)
            out, err = waiter.communicate(timeout=60)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        assert waiter.returncode == 0, err
        assert out == b"7\n"
        assert _status(srv, "api-trapped") == "exited"
        assert _out(srv.docker("inspect", "-f", "{{.State.ExitCode}}", "api-trapped", check=True)).strip() == "7"
        assert b"got-term\n" in srv.docker("logs", "api-trapped", check=True).stdout
        assert srv.docker("wait", "api-trapped", check=True).stdout == b"7\n"  # already exited
    finally:
        srv.docker("rm", "-f", "api-trapped")
        srv.docker("rm", "-f", "api-trap")
    assert not {"api-trap", "api-trapped"} & _docker_names(srv)


# ------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def marked_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox plus a layer holding /marker: an image that is not the default one (whose
    removal would delete a different image than the default, and whose runs show which it is)."""
    layout = build_busybox_layout(tmp_path_factory.mktemp("marked") / "busybox", "latest")
    add_layer(layout, "latest", lambda rootfs: (rootfs / "marker").write_text("marked\n"))
    return layout


def _image_tags(srv: KvmcServe) -> set[str]:
    return set(_out(srv.docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=True)).split())


def test_load_tag_run_and_rmi(kvmc_serve: KvmcServe, marked_layout: Path, tmp_path: Path) -> None:
    srv = kvmc_serve
    tarball = docker_save_tarball(marked_layout, "latest", tmp_path / "saved.tar", "test/loaded:1")
    proc = srv.docker("load", "-i", str(tarball))
    assert proc.returncode == 0, proc.stderr
    assert _out(proc) == "Loaded image: test/loaded:1\n"
    try:
        assert "test/loaded:1" in _image_tags(srv)
        srv.docker("tag", "test/loaded:1", "test/retagged:2", check=True)
        assert {"test/loaded:1", "test/retagged:2"} <= _image_tags(srv)
        ids = _out(srv.docker("images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}",
                              check=True)).splitlines()
        by_tag = dict(line.split() for line in ids)
        assert by_tag["test/loaded:1"] == by_tag["test/retagged:2"] != by_tag[DEFAULT_IMAGE]
        proc = srv.docker("run", "--rm", "test/retagged:2", "cat", "/marker")
        assert proc.returncode == 0 and proc.stdout == b"marked\n", proc.stderr
        proc = srv.docker("rmi", "test/retagged:2")
        assert proc.returncode == 0 and _out(proc) == "Untagged: test/retagged:2\n", proc.stderr
        assert "test/loaded:1" in _image_tags(srv)
    finally:
        srv.docker("rmi", "test/retagged:2")
        rmi = srv.docker("rmi", "test/loaded:1")
    assert rmi.returncode == 0, rmi.stderr
    assert f"Deleted: {by_tag['test/loaded:1']}" in _out(rmi), rmi.stdout
    assert not {"test/loaded:1", "test/retagged:2"} & _image_tags(srv)
    assert srv.docker("image", "inspect", "test/loaded:1").returncode != 0


def test_pull_from_a_local_registry_then_run(kvmc_serve: KvmcServe, marked_layout: Path,
                                             registry: Registry) -> None:
    srv = kvmc_serve
    ref = push_layout(registry, marked_layout, "latest", "kvmc-test/pulled")
    proc = srv.docker("pull", ref)
    assert proc.returncode == 0, proc.stderr
    assert f"Status: Downloaded newer image for {ref}" in _out(proc), proc.stdout
    try:
        assert ref in _image_tags(srv)
        proc = srv.docker("run", "--rm", ref, "cat", "/marker")
        assert proc.returncode == 0 and proc.stdout == b"marked\n", proc.stderr
    finally:
        rmi = srv.docker("rmi", ref)
    assert rmi.returncode == 0, rmi.stderr
    assert ref not in _image_tags(srv)


# --------------------------------------------------------------------- the two front doors
def test_docker_and_kvmc_see_the_same_containers(kvmc_serve: KvmcServe) -> None:
    srv = kvmc_serve
    kvmc = srv.kvmc
    srv.docker("run", "-d", "--name", "api-from-docker", DEFAULT_IMAGE, "sleep", "300", check=True)
    try:
        kvmc("run", "-d", "--name", "api-from-kvmc", DEFAULT_IMAGE, "sleep", "300", check=True)
        assert "api-from-docker" in _kvmc_names(kvmc)
        running = set(_out(srv.docker("ps", "--format", "{{.Names}}", check=True)).split())
        assert {"api-from-docker", "api-from-kvmc"} <= running
        domain = _domain_of(srv, "api-from-kvmc")
        proc = srv.docker("rm", "-f", "api-from-kvmc")
        assert proc.returncode == 0, proc.stderr
        assert "api-from-kvmc" not in _kvmc_names(kvmc, "-a")
        assert "api-from-kvmc" not in _docker_names(srv)
        _no_domain_within(kvmc, domain)
    finally:
        kvmc("rm", "-f", "api-from-kvmc")
        kvmc("rm", "-f", "api-from-docker")
    assert not {"api-from-docker", "api-from-kvmc"} & _docker_names(srv)


def test_containers_survive_kill_9_of_the_server(kvmc_serve: KvmcServe) -> None:
    srv = kvmc_serve
    srv.docker("run", "-d", "--name", "api-survivor", DEFAULT_IMAGE, "sh", "-c", "echo before > /root/f; sleep 300",
               check=True)
    try:
        old_pid = srv.pid
        srv.kill9()
        assert srv.docker("ps", timeout=30).returncode != 0  # nobody answers on the socket now
        assert "api-survivor" in _kvmc_names(srv.kvmc)      # the container did not notice
        srv.start()
        assert srv.pid != old_pid
        running = _out(srv.docker("ps", "--format", "{{.Names}} {{.State}}", check=True)).splitlines()
        assert "api-survivor running" in running, running
        proc = srv.docker("exec", "api-survivor", "cat", "/root/f")
        assert proc.returncode == 0 and proc.stdout == b"before\n", proc.stderr
    finally:
        if srv.proc is None or srv.proc.poll() is not None:
            srv.start()  # the rest of the session needs a server
        removed = srv.docker("rm", "-f", "api-survivor")
    assert removed.returncode == 0, removed.stderr
    assert "api-survivor" not in _kvmc_names(srv.kvmc, "-a")


# ------------------------------------------------------------------------------ compose
COMPOSE_YAML = """\
services:
  web:
    image: kvmc/busybox:latest
    command: sh -c 'echo up; sleep 300'
    volumes:
      - data:/data
volumes:
  data: {}
"""


def test_compose_up_ps_logs_down(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    srv = kvmc_serve
    project = tmp_path / "kvmcapi"
    project.mkdir()
    (project / "compose.yaml").write_text(COMPOSE_YAML)
    domains_before = srv.kvmc.domains()
    try:
        up = compose(srv.env, project, "up", "-d", timeout=300)
        assert up.returncode == 0, up.stderr
        ps = compose(srv.env, project, "ps", "--format", "{{.Service}} {{.State}}", check=True)
        assert _out(ps).split() == ["web", "running"], ps.stdout
        assert "kvmcapi_data" in _out(srv.docker("volume", "ls", "--format", "{{.Name}}", check=True)).split()
        _until(lambda: b"up\n" in compose(srv.env, project, "logs", "--no-log-prefix", "web").stdout,
               what="'up' in compose logs")
        logs = _out(compose(srv.env, project, "logs", check=True))
        assert re.search(r"^web-1\s+\| up$", logs, re.M), logs
    finally:
        down = compose(srv.env, project, "down", "-v", timeout=300)
    assert down.returncode == 0, down.stderr
    assert not [n for n in _docker_names(srv) if n.startswith("kvmcapi")]
    assert "kvmcapi_data" not in _out(srv.docker("volume", "ls", "--format", "{{.Name}}", check=True)).split()
    assert "kvmcapi_default" not in _out(srv.docker("network", "ls", "--format", "{{.Name}}", check=True)).split()
    _until(lambda: srv.kvmc.domains() <= domains_before, timeout=5, what="no new domain")

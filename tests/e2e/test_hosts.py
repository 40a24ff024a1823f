"""`kvmc host`: disposable VMs running Docker Engine, driven with the stock docker CLI.

Two host boots in all (the guest is heavy under TCG): the first host loads an image, runs
nested containers on the engine's bridge and on a user network (by name, over veth + bridge +
netfilter in kvmc's kernel), publishes a port inside, reaches this machine's loopback through
the VM's NAT, builds an image onto its cache volume and is removed; the second,
on the same cache, runs the built image without building and is then collected by `host gc`
once past its TTL. Bad input (unknown host, a cache in use) costs no boot. The image
kvmc/docker-host comes from the machine's layout cache that "make setup" filled
(`kvmc host build`), imported into this session's own store.
"""

from __future__ import annotations

import http.server
import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.conftest import HOST_GUEST_DIR, Kvmc
from tests.e2e.docker_clients import busybox_layout, docker_env, docker_save_tarball, run_docker  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def host_image(kvmc: Kvmc) -> str:
    proc = kvmc("host", "build", timeout=1200, check=True)
    return proc.stdout.decode().split(":")[0]


def _socket_of(url: str) -> Path:
    assert url.startswith("unix://"), url
    return Path(url.removeprefix("unix://"))


def _hosts_dir(kvmc: Kvmc) -> Path:
    return kvmc.data_dir / "hosts"


def _forwarders(socket: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "kvmc.sshfwd"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(socket) in line]


@contextmanager
def _loopback_http_server(body: bytes) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering ``body``; its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_host_is_an_error(kvmc: Kvmc) -> None:
    for args in (("host", "rm", "no-such-host"), ("host", "ssh", "no-such-host", "true")):
        proc = kvmc(*args)
        assert proc.returncode != 0
        assert b"no host named no-such-host" in proc.stderr


def test_host_lifecycle_with_cache(kvmc: Kvmc, host_image: str, tmp_path: Path, busybox_layout: Path) -> None:
    # --- host 1: create, reach the engine, nested containers with network, build onto the cache
    proc = kvmc("host", "create", "h1", "--cache", "hcache", "--ttl", "1h", timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    url = proc.stdout.decode().strip().splitlines()[-1]
    sock = _socket_of(url)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert len(_forwarders(sock)) == 1

    release = json.loads((HOST_GUEST_DIR / "guest.json").read_text())["kernel_release"]
    proc = kvmc("host", "ssh", "h1", "uname", "-r", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == release

    listing = kvmc("host", "ls", check=True).stdout.decode()
    assert "h1" in listing and "running" in listing and url in listing and "hcache" in listing

    # A second host may not take the cache while h1 holds it: refused by name, before any boot.
    proc = kvmc("host", "create", "h3", "--cache", "hcache")
    assert proc.returncode != 0
    assert b"cache volume hcache is in use by host h1" in proc.stderr
    assert not (_hosts_dir(kvmc) / "h3").exists()

    env = docker_env(sock, DOCKER_BUILDKIT="0")
    tarball = docker_save_tarball(busybox_layout, "latest", tmp_path / "bb.tar", "test/bb:1")
    run_docker(env, "load", "-i", str(tarball), timeout=600, check=True)

    # The engine's default bridge gives a nested container a 172.17.x address.
    out = run_docker(env, "run", "--rm", "test/bb:1", "ip", "-4", "-o", "addr", "show", "eth0",
                     timeout=300, check=True).stdout.decode()
    assert " 172.17." in out, out
    # Two nested containers on a user network reach each other by name.
    run_docker(env, "network", "create", "n1", timeout=120, check=True)
    run_docker(env, "run", "-d", "--name", "web", "--network", "n1", "test/bb:1", "sh", "-c",
               "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www",
               timeout=300, check=True)
    out = run_docker(env, "run", "--rm", "--network", "n1", "test/bb:1", "sh", "-c",
                     "for i in $(seq 30); do wget -q -O - http://web:8080/ && exit 0; sleep 1; done; exit 1",
                     timeout=300, check=True).stdout.decode()
    assert "hello-from-web" in out

    # -p inside the nested engine, and outbound NAT through the VM: a server on this machine's
    # loopback, reached as slirp's 10.0.2.2 from a nested container on the default bridge.
    run_docker(env, "run", "-d", "-p", "8081:8080", "test/bb:1", "sh", "-c",
               "mkdir -p /www && echo published > /www/index.html && exec httpd -f -p 8080 -h /www",
               timeout=300, check=True)
    out = run_docker(env, "run", "--rm", "--network", "host", "test/bb:1", "sh", "-c",
                     "for i in $(seq 30); do wget -q -O - http://127.0.0.1:8081/ && exit 0; sleep 1; done; exit 1",
                     timeout=300, check=True).stdout.decode()
    assert "published" in out
    with _loopback_http_server(b"from-the-machine") as port:
        out = run_docker(env, "run", "--rm", "test/bb:1", "wget", "-q", "-O", "-", f"http://10.0.2.2:{port}/",
                         timeout=300, check=True).stdout.decode()
    assert out == "from-the-machine"

    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM test/bb:1\nRUN echo built-in-h1 > /built\n")
    run_docker(env, "build", "-t", "test/built:1", str(context), timeout=600, check=True)

    proc = kvmc("host", "rm", "h1", timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert not sock.exists()
    assert not (_hosts_dir(kvmc) / "h1").exists()
    assert _forwarders(sock) == []
    assert not kvmc.domains()

    # --- host 2 on the same cache: the built image is there, no build; then gc past its TTL
    proc = kvmc("host", "create", "h2", "--cache", "hcache", "--ttl", "1s", timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    sock2 = _socket_of(proc.stdout.decode().strip().splitlines()[-1])
    env2 = docker_env(sock2)
    out = run_docker(env2, "run", "--rm", "test/built:1", "cat", "/built", timeout=300, check=True).stdout.decode()
    assert out.strip() == "built-in-h1"

    proc = kvmc("host", "gc", timeout=300, check=True)
    assert "removed host h2 (past its TTL)" in proc.stdout.decode()
    assert not sock2.exists()
    assert _forwarders(sock2) == []
    assert not kvmc.domains()
    assert list(_hosts_dir(kvmc).iterdir()) == []
    kvmc("volume", "rm", "hcache", check=True)
    assert "hcache" not in kvmc("volume", "ls", "-q", check=True).stdout.decode().split()
    leftovers = [p for p in sock.parent.iterdir()] if sock.parent.exists() else []
    assert leftovers == [], leftovers
    assert not [p for p in os.listdir(kvmc.data_dir / "containers") if p != "names"]


def test_engine_that_does_not_come_up(kvmc: Kvmc, host_image: str) -> None:
    # A cache whose overlay2 directory is a file: dockerd cannot start its storage driver.
    kvmc("volume", "create", "badcache", check=True)
    kvmc("run", "--rm", "-v", "badcache:/d", "kvmc/busybox", "sh", "-c", "echo not-a-dir > /d/overlay2", check=True)
    proc = kvmc("host", "create", "hbad", "--cache", "badcache", timeout=900)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "host hbad: its VM stopped before Docker Engine answered; the log ends:" in err, err
    assert "failed to start daemon: error initializing graphdriver" in err, err
    assert "Traceback" not in err
    assert not (_hosts_dir(kvmc) / "hbad").exists()
    assert not kvmc.domains()
    assert "hbad" not in kvmc("host", "ls", check=True).stdout.decode()
    kvmc("volume", "rm", "badcache", check=True)

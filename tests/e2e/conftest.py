"""End-to-end fixtures: a private kvmc state root per test session, real libvirt, real VMs.

Each pytest-xdist worker gets its own data dir under /var/lib/kvmc/tests (libvirt's QEMU user
must be able to traverse it, which rules out pytest's 0700 tmp dirs), sharing only the guest
artefacts that "make setup" built. The CLI is run as a subprocess, exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmc.images import add_layer, build_busybox_layout
from kvmc.pool.common import WARMING_PREFIX
from kvmc.pool.template import TEMPLATES_DIR, template_domain

SHARED_DATA = Path(os.environ.get("KVMC_TEST_SHARED_DATA", "/var/lib/kvmc"))
TEST_ROOT = SHARED_DATA / "tests"
DEFAULT_IMAGE = "kvmc/busybox:latest"
# The guest kernel the suite boots: KVMC_KERNEL=kvmc|debian as for kvmc itself (config key
# `kernel`, default kvmc), each in the guest directory "make setup" builds it into.
# tests/e2e/test_kernels.py boots both whichever is chosen here.
# KVMC_TEST_GUEST_DIR points the suite at other artefacts (a branch's own agent build).
GUEST_DIR = Path(os.environ.get("KVMC_TEST_GUEST_DIR") or
                 SHARED_DATA / {"debian": "guest", "kvmc": "guest-kvmc"}[os.environ.get("KVMC_KERNEL", "kvmc")])
# `kvmc host` VMs boot the kvmc-host flavour (images/build.sh DIR --kernel kvmc-host);
# KVMC_TEST_HOST_GUEST_DIR points them at other artefacts.
HOST_GUEST_DIR = Path(os.environ.get("KVMC_TEST_HOST_GUEST_DIR") or SHARED_DATA / "guest-kvmc-host")


@dataclass
class Kvmc:
    """Runs the kvmc CLI against one isolated state root."""

    env: dict[str, str]
    data_dir: Path

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 180,
                 check: bool = False) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [sys.executable, "-m", "kvmc", *args], input=input, env=self.env,
            capture_output=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kvmc {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
        return proc

    @staticmethod
    def _libvirt_domains() -> set[str]:
        return set(subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                                  capture_output=True, text=True, check=True).stdout.split())

    def domains(self) -> set[str]:
        """libvirt domains of this state root's containers (ready pool members are not leaks)."""
        ours = set()
        containers = self.data_dir / "containers"
        if containers.is_dir():
            ours = {f"kvmc-{p.name[:16]}" for p in containers.iterdir() if p.name != "names"}
            for record in containers.glob("*/record.json"):
                ours.add(json.loads(record.read_text())["domain"])
        return self._libvirt_domains() & ours

    def pool_domains(self) -> set[str]:
        """libvirt domains of this state root's pool members, and of its templates (a template
        VM is transient and lives only while its template is made: one still running is a leak)."""
        pool = self.data_dir / "pool"
        members = {json.loads(m.read_text())["domain"] for m in pool.glob("*/member.json")}
        templates = {template_domain(p.name.removeprefix(WARMING_PREFIX))
                     for p in (pool / TEMPLATES_DIR).glob("*") if p.is_dir()}
        return self._libvirt_domains() & (members | templates)


@pytest.fixture(autouse=True)
def _containers_a_test_leaves(request: pytest.FixtureRequest) -> Iterator[None]:
    """A warning naming the test after which containers of the session's state root are left
    (a removal racing something else shows up in the summary with its culprit, not only in a
    later test's "nothing left" check)."""
    if "kvmc" not in request.fixturenames:
        yield
        return
    containers = request.getfixturevalue("kvmc").data_dir / "containers"
    before = {p.parent.name for p in containers.glob("*/record.json")}
    yield
    left = [p for p in containers.glob("*/record.json") if p.parent.name not in before]
    if left:
        details = []
        for path in left:
            try:
                record = json.loads(path.read_text())
                details.append(f"{record['name']} ({record['state']}, {record['process']['args']})")
            except (OSError, ValueError, KeyError):
                details.append(path.parent.name[:12])
        warnings.warn(f"{request.node.nodeid} left containers: {', '.join(details)}", stacklevel=1)


@pytest.fixture(scope="session")
def kvmc() -> Kvmc:
    if not (GUEST_DIR / "guest.json").exists():
        pytest.fail(f"no guest artefacts in {GUEST_DIR}: run 'make setup' first")
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o755)
    data_dir = Path(tempfile.mkdtemp(prefix="session-", dir=TEST_ROOT))
    os.chmod(data_dir, 0o755)
    env = {**os.environ, "KVMC_DATA_DIR": str(data_dir), "KVMC_GUEST_DIR": str(GUEST_DIR),
           "KVMC_HOST_GUEST_DIR": str(HOST_GUEST_DIR)}
    tool = Kvmc(env=env, data_dir=data_dir)
    tool("image", "build-default", check=True)
    yield tool
    for record in (data_dir / "containers").glob("*/record.json"):
        tool("rm", "-f", record.parent.name)
    pooled = tool.pool_domains()
    tool("pool", "rm")
    leaked = tool.domains() | (pooled & tool._libvirt_domains())
    shutil.rmtree(data_dir, ignore_errors=True)
    assert not leaked, f"domains leaked by the e2e session: {leaked}"


@pytest.fixture(scope="session")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch dir of OCI layouts built from busybox-static with umoci."""
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="session")
def config_image(kvmc: Kvmc, layouts: Path) -> str:
    """An image whose config sets Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts and Volumes."""
    layout = build_busybox_layout(layouts / "cfg", "latest")
    subprocess.run(
        ["umoci", "config", "--image", f"{layout}:latest",
         "--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c",
         "--config.cmd", 'echo "cmd:$GREETING:$(pwd):$(id -un)"',
         "--config.env", "GREETING=from-image", "--config.workingdir", "/home/app",
         "--config.user", "app", "--config.exposedports", "8080/tcp", "--config.volume", "/var/data"],
        check=True, capture_output=True,
    )
    kvmc("image", "import", str(layout), "--name", "test/config:1", check=True)
    return "test/config:1"


@pytest.fixture(scope="session")
def whiteout_image(kvmc: Kvmc, layouts: Path) -> str:
    """A two-layer image: the upper layer deletes /etc/deleted-me and adds /etc/added."""
    layout = build_busybox_layout(layouts / "wh", "latest")

    def lower(rootfs: Path) -> None:
        (rootfs / "etc/deleted-me").write_text("lower\n")
        (rootfs / "etc/kept").write_text("kept\n")

    def upper(rootfs: Path) -> None:
        (rootfs / "etc/deleted-me").unlink()
        (rootfs / "etc/added").write_text("upper\n")

    add_layer(layout, "latest", lower)
    add_layer(layout, "latest", upper)
    kvmc("image", "import", str(layout), "--name", "test/whiteout:1", check=True)
    return "test/whiteout:1"
from tests.e2e.serve import kvmc_serve  # noqa: E402,F401 (fixture: `kvmc serve` for the docker API tests)

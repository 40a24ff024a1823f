"""The image ``kvmc/docker-host``: Debian 12 with Docker Engine and sshd, for ``kvmc host``.

Built locally from Debian packages (never from a container registry): mmdebstrap writes a
minbase bookworm root with docker.io, openssh-server, iptables and ca-certificates as one tar,
umoci turns that tar into a one-layer OCI image and the store imports it. The build is cached by
its inputs: the candidate versions of the packages named here (apt-cache policy) and this
recipe. The image carries their digest as a label (a store holding it skips everything) and the
OCI layout is kept in the machine's cache dir under that digest, so another state root (the
e2e suite's) imports it instead of running mmdebstrap again.

The guest has no systemd (kvmc's agent is init), so the image's command is a small script
(:data:`ENTRYPOINT`) that mounts cgroup2 and /run, installs the host's public key, starts
sshd and then execs dockerd: dockerd's output is the container's log (``kvmc logs``), which is
what ``kvmc host create`` shows when the engine does not come up.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from kvmc.errors import ImageError, KvmcError
from kvmc.images.builder import DEFAULT_PATH, EPOCH_RFC3339
from kvmc.images.model import Image
from kvmc.images.store import ImageStore
from kvmc.images.tools import run_tool

IMAGE_NAME = "kvmc/docker-host:latest"
SUITE = "bookworm"
PACKAGES = ("docker.io", "openssh-server", "iptables", "ca-certificates")
INPUTS_LABEL = "org.kvmc.docker-host.inputs"
AUTHORIZED_KEY_ENV = "KVMC_HOST_AUTHORIZED_KEY"
"""The environment variable the entrypoint reads root's authorized public key from."""
ENTRYPOINT_PATH = "/usr/local/sbin/kvmc-docker-host"

ENTRYPOINT = f"""#!/bin/sh
# kvmc/docker-host's command (kvmc/images/dockerhost.py): what systemd would do, in order.
set -e
# cgroup v2 for dockerd/runc (the agent mounts no cgroup fs), a fresh /run (sshd, docker's pid
# and socket; /var/run links to it).
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mountpoint -q /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/sshd /run/lock
# The key kvmc host create generated for this host: the only way in (no passwords).
mkdir -p -m 0700 /root/.ssh
printf '%s\\n' "${AUTHORIZED_KEY_ENV}" > /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
# One host key per VM, made now (ed25519: instant even under TCG, unlike RSA).
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
/usr/sbin/sshd -e
sysctl -q -w net.ipv4.ip_forward=1 || true
exec /usr/sbin/dockerd --host unix:///var/run/docker.sock
"""

SSHD_CONFIG = """\
# kvmc/docker-host: root by key only; docker's socket is reached with direct-streamlocal.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
HostKey /etc/ssh/ssh_host_ed25519_key
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
UseDNS no
PrintMotd no
"""

DAEMON_JSON = """{
  "storage-driver": "overlay2",
  "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "iptables": true,
  "ip6tables": false,
  "ipv6": false,
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "2"}
}
"""

# mmdebstrap customize hooks (run on the host with the root as $1). iptables-legacy: kvmc's
# kernel has xtables but no nf_tables (images/kernel/kvmc-host.config).
_HOOKS = [
    'chroot "$1" update-alternatives --quiet --set iptables /usr/sbin/iptables-legacy',
    'chroot "$1" update-alternatives --quiet --set ip6tables /usr/sbin/ip6tables-legacy',
    'rm -f "$1"/etc/ssh/ssh_host_*',
    # Binaries dockerd never runs (swarm overlay tools, containerd's debug CLI, the v1 and
    # legacy shims: 20.10 uses io.containerd.runc.v2): 68 MB of the image's 393.
    'rm -f "$1"/usr/bin/dnet "$1"/usr/sbin/ovrouter "$1"/usr/bin/ctr "$1"/usr/bin/containerd-shim'
    ' "$1"/usr/bin/containerd-shim-runc-v1',
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log',
]
_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")


def _candidate(package: str) -> str:
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise ImageError(f"no Debian package {package} is known to apt",
                     hint="run apt-get update (make setup does), so the build can name package versions")


def inputs_digest() -> str:
    """What the image is made of: the packages' candidate versions and the recipe (the files and
    hooks below; the mmdebstrap flags are in the hooks' company: change them together)."""
    recipe = "\0".join([SUITE, ENTRYPOINT, SSHD_CONFIG, DAEMON_JSON, *_HOOKS, *_EXCLUDES, ENTRYPOINT_PATH])
    versions = " ".join(f"{p}={_candidate(p)}" for p in PACKAGES)
    return hashlib.sha256(f"{recipe}\0{versions}".encode()).hexdigest()


def current_image(store: ImageStore, name: str = IMAGE_NAME) -> Image | None:
    """The stored image if it was built from today's inputs, else None."""
    try:
        image = store.get(name)
    except KvmcError:
        return None
    return image if image.config.labels.get(INPUTS_LABEL) == inputs_digest() else None


def build_docker_host_image(store: ImageStore, cache_dir: Path, name: str = IMAGE_NAME, *, force: bool = False,
                            progress: Callable[[str], None] = lambda _m: None) -> Image:
    """``kvmc/docker-host`` in ``store``: the stored one if built from today's inputs, else
    imported from the OCI layout cached under ``cache_dir`` for those inputs, else built (and
    that layout cached; older ones are removed)."""
    digest = inputs_digest()
    if not force:
        cached = current_image(store, name)
        if cached is not None:
            progress(f"{name} is up to date ({digest[:12]})")
            return cached
    layout = cache_dir / f"docker-host-{digest[:16]}"
    if force or not (layout / "index.json").is_file():
        cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".building-", dir=cache_dir) as tmp:
            built = _build_layout(Path(tmp), digest, name, progress)
            shutil.rmtree(layout, ignore_errors=True)
            built.rename(layout)
        for old in cache_dir.glob("docker-host-*"):
            if old != layout:
                shutil.rmtree(old, ignore_errors=True)
    start = time.monotonic()
    progress(f"importing {name} from {layout}")
    image = store.import_path(layout, name)
    progress(f"{name}: {image.id[:12]} imported in {time.monotonic() - start:.0f} s")
    return image


def _build_layout(work: Path, digest: str, name: str, progress: Callable[[str], None]) -> Path:
    """mmdebstrap -> one tar -> a one-layer OCI layout ``work/layout:latest``."""
    what = f"cannot build {name}"
    (work / "entrypoint").write_text(ENTRYPOINT)
    (work / "sshd_config").write_text(SSHD_CONFIG)
    (work / "daemon.json").write_text(DAEMON_JSON)
    hooks = [
        f'install -m 0755 {work}/entrypoint "$1"{ENTRYPOINT_PATH}',
        f'install -m 0644 {work}/sshd_config "$1"/etc/ssh/sshd_config.d/kvmc.conf',
        f'mkdir -p "$1"/etc/docker && install -m 0644 {work}/daemon.json "$1"/etc/docker/daemon.json',
        *_HOOKS,
    ]
    rootfs = work / "rootfs.tar"
    start = time.monotonic()
    progress(f"building {name}: mmdebstrap {SUITE} with {', '.join(PACKAGES)} (a few minutes)")
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
            f"--include={','.join(PACKAGES)}",
            "--aptopt=APT::Install-Recommends \"false\"",
            *[f"--dpkgopt=path-exclude={p}" for p in _EXCLUDES],
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            *[f"--customize-hook={h}" for h in hooks],
            SUITE, str(rootfs)]
    run_tool(argv, what=what, writes=(work,))
    progress(f"rootfs: {rootfs.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - start:.0f} s; packing")
    layout = work / "layout"
    run_tool(["umoci", "init", "--layout", str(layout)], what=what)
    run_tool(["umoci", "new", "--image", f"{layout}:latest"], what=what)
    run_tool(["umoci", "raw", "add-layer", "--image", f"{layout}:latest",
              "--history.created", EPOCH_RFC3339, "--history.created_by", f"mmdebstrap {SUITE}",
              str(rootfs)], what=what, writes=(work,))
    rootfs.unlink()
    run_tool(["umoci", "config", "--image", f"{layout}:latest",
              "--created", EPOCH_RFC3339, "--author", "kvmc", "--os", "linux",
              "--config.cmd", ENTRYPOINT_PATH,
              "--config.env", f"PATH={DEFAULT_PATH}",
              "--config.workingdir", "/",
              "--config.stopsignal", "SIGTERM",
              "--config.label", f"{INPUTS_LABEL}={digest}",
              "--config.label", "org.opencontainers.image.title=kvmc-docker-host",
              "--config.label", "org.opencontainers.image.description="
              "Debian 12 with Docker Engine and sshd, for kvmc host"], what=what)
    run_tool(["umoci", "gc", "--layout", str(layout)], what=what)
    progress(f"{name}: layout built in {time.monotonic() - start:.0f} s")
    return layout

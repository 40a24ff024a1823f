"""Build kvmc's default image locally from the host's static busybox.

Registries may be unreachable, and kvmc must still be able to run something, so
``kvmc image build-default`` assembles a small busybox image with umoci (which writes a
proper OCI layout: layer tarball, config, manifest, index) and imports it like any other
image. Timestamps are pinned so building twice on one host yields the same image id.

``add_layer`` is the general "derive an image" helper used by tests (and usable by e2e
fixtures): unpack a tag, let a callback edit the rootfs, repack - umoci computes the diff
and writes the ``.wh.`` whiteouts for deleted files itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmc.errors import ImageError
from kvmc.images.model import Image
from kvmc.images.store import ImageStore
from kvmc.images.tools import run_tool, umoci_args

BUSYBOX = Path("/bin/busybox")
BASH_STATIC = Path("/bin/bash-static")
RSYNC = Path("/usr/bin/rsync")
DEFAULT_NAME = "kvmc/busybox:latest"
CI_HELPER_NAME = "kvmc/ci-helper:latest"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Fixed timestamp for files and config (2024-01-01T00:00:00Z): reproducible image ids.
EPOCH = 1704067200
EPOCH_RFC3339 = "2024-01-01T00:00:00Z"
APP_UID = 1000

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
app:x:1000:
nogroup:x:65534:
"""


def _umoci(*args: str, what: str, sub: Sequence[str] | None = None) -> None:
    if sub is not None:
        run_tool(umoci_args(sub, *args), what=what)
    else:
        run_tool(["umoci", *args], what=what)


def _is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP, i.e. it runs without a dynamic loader.

    A dynamically linked busybox (Debian's ``busybox`` package) would find no libc in
    the image; only ``busybox-static`` works.
    """
    import struct

    with path.open("rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF":
            return False
        is64 = ident[4] == 2
        endian = "<" if ident[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(endian + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x36)
        else:
            phoff, = struct.unpack_from(endian + "I", ident, 0x1C)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x2A)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _busybox() -> Path:
    if not BUSYBOX.is_file():
        raise ImageError(f"{BUSYBOX} is missing", hint="install it with: apt-get install busybox-static")
    if not _is_static_elf(BUSYBOX):
        raise ImageError(f"{BUSYBOX} is dynamically linked", hint="install it with: apt-get install busybox-static")
    return BUSYBOX


def _busybox_version(busybox: Path) -> str:
    out = subprocess.run([busybox], capture_output=True, text=True, check=False).stdout
    first = out.splitlines()[0] if out else ""
    return first.split(" multi-call")[0].removeprefix("BusyBox ").strip() or "unknown"


def populate_busybox_rootfs(rootfs: Path) -> None:
    """Fill ``rootfs`` with busybox, its applet links and a minimal /etc."""
    busybox = _busybox()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home/app", "tmp", "proc", "sys", "dev", "var/tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin/busybox")
    os.chmod(rootfs / "bin/busybox", 0o755)
    applets = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        # Only plain relative paths like "usr/bin/[" - never trust a listing blindly.
        if applet.startswith("/") or ".." in applet.split("/") or applet == "bin/busybox":
            continue
        link = rootfs / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    files = {
        "etc/passwd": PASSWD,
        "etc/group": GROUP,
        "etc/hostname": "kvmc\n",
        "etc/hosts": "",
        "etc/resolv.conf": "",
    }
    for rel, text in files.items():
        (rootfs / rel).write_text(text)
        os.chmod(rootfs / rel, 0o644)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "var/tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    os.chown(rootfs / "home/app", APP_UID, APP_UID)
    _pin_times(rootfs)


def _pin_times(rootfs: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(rootfs, (EPOCH, EPOCH))


def add_layer(
    layout: Path,
    tag: str,
    mutate: Callable[[Path], None],
    new_tag: str | None = None,
    *,
    created_by: str = "kvmc add_layer",
) -> None:
    """Add one layer to ``layout:tag``: ``mutate(rootfs)`` edits the unpacked tree, umoci
    repacks the difference (deletions become ``.wh.`` whiteouts) as ``new_tag`` or ``tag``."""
    what = f"cannot add a layer to {layout}:{tag}"
    with tempfile.TemporaryDirectory(prefix="kvmc-build-") as tmp:
        bundle = Path(tmp) / "bundle"
        _umoci("--image", f"{layout}:{tag}", str(bundle), what=what, sub=("unpack",))
        mutate(bundle / "rootfs")
        if new_tag and new_tag != tag:
            run_tool(["umoci", "tag", "--image", f"{layout}:{tag}", new_tag], what=what)
        _umoci(
            "--image", f"{layout}:{new_tag or tag}",
            "--history.created", EPOCH_RFC3339,
            "--history.created_by", created_by,
            str(bundle),
            what=what, sub=("repack",),
        )
    run_tool(["umoci", "gc", "--layout", str(layout)], what=what)


def build_busybox_layout(dest: Path, tag: str = "latest") -> Path:
    """Write an OCI layout holding the busybox image as ``dest:tag``; returns ``dest``.

    ``dest`` must not exist (umoci init refuses to reuse a directory).
    """
    busybox = _busybox()
    what = "cannot build the busybox image"
    _umoci("init", "--layout", str(dest), what=what)
    _umoci("new", "--image", f"{dest}:{tag}", what=what)
    add_layer(dest, tag, populate_busybox_rootfs, created_by="kvmc: busybox rootfs")
    _umoci(
        "config", "--image", f"{dest}:{tag}",
        "--created", EPOCH_RFC3339,
        "--history.created", EPOCH_RFC3339,
        "--history.created_by", "kvmc: busybox config",
        "--author", "kvmc",
        "--os", "linux",
        "--config.cmd", "sh",
        "--config.env", f"PATH={DEFAULT_PATH}",
        "--config.workingdir", "/",
        "--config.label", "org.opencontainers.image.title=kvmc-busybox",
        "--config.label", f"org.opencontainers.image.version={_busybox_version(busybox)}",
        "--config.label",
        "org.opencontainers.image.description=kvmc default image built from the host's busybox-static",
        what=what,
    )
    _umoci("gc", "--layout", str(dest), what=what)
    return dest


def _shared_libraries(binary: Path) -> list[Path]:
    """The shared objects ``binary`` loads (its ELF interpreter included), as ldd resolves them."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ImageError(f"cannot list the libraries of {binary}: {out.stderr.strip() or out.stdout.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0] if words else ""
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def _copy_host_file(src: Path, rootfs: Path, dest: str | None = None) -> None:
    """Copy ``src`` (symlinks resolved) to the same path in ``rootfs`` (or ``dest``)."""
    target = rootfs / (dest or str(src)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.resolve(), target)
    os.chmod(target, 0o755)


def populate_ci_helper_rootfs(rootfs: Path) -> None:
    """Add what gitlab-ci-local's helper scripts run besides busybox: bash (``shopt -s globstar``)
    and rsync (it copies artifacts and caches; without it they are silently not copied).

    bash comes from Debian's ``bash-static``; rsync is the host's own binary with the libraries
    ldd names (Debian ships no static rsync): copying them is seconds, where a debootstrap of a
    Debian userland would be a minute and a hundred megabytes.
    """
    for tool, package in ((BASH_STATIC, "bash-static"), (RSYNC, "rsync")):
        if not tool.is_file():
            raise ImageError(f"{tool} is missing", hint=f"install it with: apt-get install {package}")
    _copy_host_file(BASH_STATIC, rootfs, "/bin/bash")
    _copy_host_file(RSYNC, rootfs)
    for lib in _shared_libraries(RSYNC):
        _copy_host_file(lib, rootfs)
    _pin_times(rootfs)


def build_ci_helper_image(store: ImageStore, name: str = CI_HELPER_NAME) -> Image:
    """The image gitlab-ci-local's docker executor runs its helper steps in (``--helper-image``):
    busybox with bash and rsync, built locally like the default image."""
    with tempfile.TemporaryDirectory(prefix="kvmc-build-") as tmp:
        layout = build_busybox_layout(Path(tmp) / "layout", "latest")
        add_layer(layout, "latest", populate_ci_helper_rootfs, created_by="kvmc: bash and rsync for CI helpers")
        return store.import_path(layout, name)


def build_busybox_image(store: ImageStore, name: str = DEFAULT_NAME) -> Image:
    """Build the default busybox image and import it into ``store`` as ``name``."""
    with tempfile.TemporaryDirectory(prefix="kvmc-build-") as tmp:
        layout = build_busybox_layout(Path(tmp) / "layout", "latest")
        return store.import_path(layout, name)

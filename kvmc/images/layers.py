"""Refuse hostile layer tarballs before anything is unpacked.

umoci already confines extraction to the rootfs (it resolves every path with
securejoin), so a hostile entry cannot escape on this host. We still refuse such layers
up front because (a) an image built to contain ``../`` names or writes through symlinks
is broken or malicious, and silently "fixing" it yields a rootfs that differs from what
docker would run; (b) the refusal names the layer and entry, which a confined extraction
never reports; (c) it keeps kvmc safe even if a future tool swap loses umoci's confinement.
umoci has no "check only" mode, hence this hand-written pass over the tar headers.

Rules, per entry of every layer, lower layers first:

* names and hard-link targets must be relative and free of ``..`` components;
* no entry (nor hard-link target) may lie *under* a path that an earlier entry, in this or
  a lower layer and not since removed or replaced, created as a symlink - the "create
  ``link -> /etc`` then write ``link/passwd``" trick;
* symlink *targets* are not checked: absolute targets (``/bin/sh -> busybox``) are normal
  and only ever resolved inside the guest;
* device nodes, FIFOs and sockets are allowed: umoci creates them (as root) only inside
  our 0700 scratch dir, mke2fs copies their metadata without opening them, and in the
  guest they reach only the VM's own devices, which the container's root controls anyway.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path
from typing import IO

from kvmc.errors import ImageError
from kvmc.images.tools import require_tool

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class LayerScanner:
    """Checks layers in order, remembering the symlinks earlier entries left in the tree."""

    def __init__(self) -> None:
        # normalised path -> index of the layer that created the symlink
        self._symlinks: dict[str, int] = {}
        self._layer = -1

    def scan(self, layer: Path, digest: str) -> None:
        """Scan one layer blob (gzip, zstd or plain tar); raise ImageError on a hostile entry."""
        self._layer += 1
        with layer.open("rb") as raw:
            magic = raw.read(4)
            raw.seek(0)
            if magic != _ZSTD_MAGIC:
                self._scan_stream(raw, digest)
                return
        self._scan_zstd(layer, digest)

    def _scan_zstd(self, layer: Path, digest: str) -> None:
        # tarfile has no zstd support before Python 3.14; the zstd CLI decompresses.
        try:
            zstd = require_tool("zstd")
        except ImageError as exc:
            raise ImageError(f"layer {digest} is zstd-compressed and zstd is not installed",
                             hint="install it with: apt-get install zstd") from exc
        proc = subprocess.Popen(
            [zstd, "-dcq", "--", str(layer)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            self._scan_stream(proc.stdout, digest)
            proc.stdout.read()  # drain the tar's trailing padding so zstd exits cleanly
        finally:
            proc.stdout.close()
            _, err = proc.communicate()
        if proc.returncode != 0:
            raise ImageError(f"layer {digest}: zstd failed: {err.decode(errors='replace').strip()}")

    def _scan_stream(self, stream: IO[bytes], digest: str) -> None:
        try:
            # "r|*": sequential read, transparently gunzipped (also bzip2/xz).
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    self._check(member, digest)
        except tarfile.TarError as exc:
            raise ImageError(f"layer {digest} is not a valid tar archive: {exc}") from exc
        except (EOFError, OSError) as exc:
            raise ImageError(f"layer {digest} is truncated or corrupt: {exc}") from exc

    def _check(self, member: tarfile.TarInfo, digest: str) -> None:
        path = _normalise(member.name, digest, "entry")
        self._refuse_through_symlink(path, member.name, digest)
        if member.islnk():
            target = _normalise(member.linkname, digest, f"hard link {member.name!r} -> target")
            self._refuse_through_symlink(target, member.name, digest, via=member.linkname)
        if not path:
            return  # the layer root itself ("./")
        parent, _, base = path.rpartition("/")
        if base == OPAQUE_WHITEOUT:
            # Opaque dir: everything lower layers put under parent disappears.
            self._forget_under(parent, lower_only=True)
        elif base.startswith(WHITEOUT_PREFIX):
            hidden = f"{parent}/{base[len(WHITEOUT_PREFIX):]}" if parent else base[len(WHITEOUT_PREFIX):]
            self._forget(hidden)
        elif member.issym():
            self._forget(path)  # a symlink replaces whatever was there, subtree included
            self._symlinks[path] = self._layer
        else:
            # A file or directory replaces an earlier symlink of the same name.
            self._symlinks.pop(path, None)

    def _refuse_through_symlink(self, path: str, entry: str, digest: str, via: str | None = None) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._symlinks:
                what = f"hard link target {via!r}" if via is not None else "it"
                raise ImageError(
                    f"refusing image: layer {digest} entry {entry!r}: {what} goes through "
                    f"{prefix!r}, which an earlier entry created as a symlink"
                )

    def _forget(self, path: str) -> None:
        self._symlinks.pop(path, None)
        self._forget_under(path, lower_only=False)

    def _forget_under(self, directory: str, *, lower_only: bool) -> None:
        prefix = f"{directory}/" if directory else ""
        for p in [p for p, layer in self._symlinks.items() if p.startswith(prefix)]:
            if not lower_only or self._symlinks[p] < self._layer:
                del self._symlinks[p]


def _normalise(name: str, digest: str, what: str) -> str:
    """``./a//b/`` -> ``a/b``; refuses absolute names and ``..`` components."""
    if name.startswith("/"):
        raise ImageError(f"refusing image: layer {digest} {what} {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"refusing image: layer {digest} {what} {name!r} contains a '..' component")
    if "\0" in name:
        raise ImageError(f"refusing image: layer {digest} {what} {name!r} contains a NUL byte")
    return "/".join(parts)


def scan_layers(layers: list[tuple[Path, str]]) -> None:
    """Scan ``(blob path, digest)`` pairs, lowest layer first."""
    scanner = LayerScanner()
    for path, digest in layers:
        scanner.scan(path, digest)

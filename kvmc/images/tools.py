"""Run the external image tools (skopeo, umoci, mke2fs) and turn their failures into ImageError.

The tools do the heavy lifting (format conversion, digest checks, whiteouts, ext4
population); this module only makes their errors readable: skopeo and umoci end with a
logrus line such as ``time=... level=fatal msg="..."``, of which the user wants the msg.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvmc.errors import DiskFull, ImageError
from kvmc.space import HINT, TOOL_ENV, says_no_space, tool_error

_PACKAGES = {
    "skopeo": "skopeo",
    "umoci": "umoci",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "zstd": "zstd",
}
_LOGRUS_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
# Layout of the policy skopeo insists on before copying anything.
SIGNATURE_POLICY = Path("/etc/containers/policy.json")


def require_tool(name: str) -> str:
    """Absolute path of ``name`` or an ImageError telling which package provides it."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        pkg = _PACKAGES.get(name, name)
        raise ImageError(f"{name} is not installed", hint=f"install it with: apt-get install {pkg}")
    return found


def last_error_line(stderr: str) -> str:
    """The most useful line of a tool's stderr: the last non-empty one, logrus msg unwrapped."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return "no error output"
    line = lines[-1]
    m = _LOGRUS_MSG.search(line)
    if m:
        return m.group(1).replace('\\"', '"').replace("\\\\", "\\")
    # umoci prints "   ⨯ message" for its fatal errors.
    return line.lstrip("⨯•· ").strip()


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    writes: Sequence[Path] = (),
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise ``ImageError("<what>: <tool's last error line>")``, or
    DiskFull when it ran out of space (its output says so, or a file system it ``writes`` to
    is full)."""
    exe = require_tool(argv[0])
    full_env = {**os.environ, **TOOL_ENV}
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=full_env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what}: {argv[0]} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        output = proc.stderr or proc.stdout
        full = tool_error(output, *writes)
        if full is None and says_no_space(output):
            full = DiskFull(f"the disk is full: {what}: {last_error_line(output)}", hint=HINT)
        if full is not None:
            raise full
        raise ImageError(f"{what}: {last_error_line(output)}")
    return proc


def skopeo_copy(
    source: str,
    dest: str,
    *,
    what: str,
    scratch: Path,
    timeout: float | None = None,
    gzip_layers: bool = True,
    source_tls_verify: bool = True,
) -> None:
    """``skopeo copy SOURCE DEST`` keeping its big temporary files inside ``scratch``.

    ``source_tls_verify`` False: the source registry may be plain HTTP (docker's default
    insecure registries: loopback only, see kvmc.images.refs.insecure_registry).

    ``gzip_layers``: umoci 0.4.7 cannot unpack zstd layers ("blob is not correct
    mediatype"); with ``--dest-compress-format gzip`` skopeo recompresses only layers that
    are not gzip already (gzip blobs and the config are copied byte for byte).

    containers/image stages blobs (e.g. a whole docker-archive) under TMPDIR, /var/tmp by
    default; pointing TMPDIR at our scratch dir keeps the "nothing outside the store and
    the scratch dir" promise and gets it cleaned up with the scratch dir.
    """
    argv = ["skopeo", "copy", "--quiet"]
    if not SIGNATURE_POLICY.exists():
        # skopeo refuses to copy without a policy file; without one the host has no
        # signature policy to honour, so accepting anything is what the admin chose.
        argv.insert(1, "--insecure-policy")
    if gzip_layers:
        argv += ["--dest-compress-format", "gzip"]
    if not source_tls_verify:
        argv.append("--src-tls-verify=false")
    tmp = scratch / "skopeo-tmp"
    tmp.mkdir(exist_ok=True)
    run_tool([*argv, source, dest], what=what, env={"TMPDIR": str(tmp)}, timeout=timeout, writes=(scratch,))


def umoci_args(subcommand: Sequence[str], *args: str) -> list[str]:
    """umoci argv; adds ``--rootless`` to (raw) unpack/repack when not root.

    As root umoci restores owners and creates device nodes; unprivileged it cannot, and
    ``--rootless`` makes it skip that instead of failing. urfave/cli wants flags before
    positional arguments, so the flag goes right after the subcommand.
    """
    argv = ["umoci", *subcommand]
    if os.geteuid() != 0 and subcommand[-1] in ("unpack", "repack"):
        argv.append("--rootless")
    return [*argv, *args]

"""Per-container disks: a qcow2 copy-on-write overlay on the image's read-only ext4 base.

The base is shared by every container of the image and never written; each container's
writes land in its own overlay, which lives in the container's directory until ``rm``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvmc.errors import KvmcError
from kvmc.space import TOOL_ENV, tool_error


def create_overlay(base: Path, overlay: Path) -> Path:
    """Create ``overlay`` as a qcow2 backed by the raw ``base`` (absolute path recorded)."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base.resolve()), str(overlay)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **TOOL_ENV})
    except FileNotFoundError as exc:
        raise KvmcError("qemu-img is not installed", hint='run "make setup" (apt-get install qemu-utils)') from exc
    except subprocess.CalledProcessError as exc:
        overlay.unlink(missing_ok=True)  # nothing half-written
        raise tool_error(exc.stderr, overlay.parent) or KvmcError(
            f"cannot create the container disk {overlay}: {exc.stderr.strip()}") from exc
    return overlay

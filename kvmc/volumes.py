"""Named volumes: data that outlives containers, one ext4 disk image per volume.

A volume is ``<data_dir>/volumes/<name>/`` holding ``volume.json`` and ``disk.ext4``, a
sparse raw file formatted by ``mkfs.ext4`` (so it costs only what is written). The disk is
attached to a container's VM as a virtio-blk device and mounted by the guest agent.

Why a block device and not a shared directory: under emulation block I/O is by far the
cheaper path (see bench/volumes.py), and ext4 inside the disk keeps ownership, modes and
xattrs exactly as the guest wrote them. The price: ext4 is not a cluster file system, so a
volume serves one running container at a time (QEMU's image locking would refuse a second
writer too; kvmc says so first, and by name).

The other driver, ``kvmc-dir``, is for data that several running containers share at once
(gitlab-ci-local mounts a job's build volume into the job and each of its services): the
volume is a host directory ``<name>/data`` shared through virtiofs as a host directory is
(kvmc/mounts.py), slower than a disk under emulation but with no single-writer limit.

Creation is atomic: a volume is built in a dot-prefixed directory and renamed into place,
so concurrent ``run -v data:/x`` of a new volume create it once and both use it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmc.errors import Conflict, KvmcError, UsageError, VolumeInUse, VolumeNotFound  # noqa: F401 (re-exported)
from kvmc.mounts import VOLUME_NAME
from kvmc.space import TOOL_ENV, tool_error
from kvmc.state import now_iso

VOLUME_FILE = "volume.json"
DISK_FILE = "disk.ext4"
DIR_DATA = "data"
DEFAULT_SIZE = 1 << 30
EXT4_DRIVER = "kvmc-ext4"
DIR_DRIVER = "kvmc-dir"
VOLUME_DRIVERS = (EXT4_DRIVER, DIR_DRIVER)


@dataclass
class Volume:
    name: str
    created: str
    size_bytes: int
    path: str
    """The disk image (kvmc-ext4) or the shared directory (kvmc-dir)."""
    labels: dict[str, str] = field(default_factory=dict)
    """docker's volume labels (compose marks its project's volumes with them)."""
    driver: str = EXT4_DRIVER

    @property
    def shared_dir(self) -> str:
        """The host directory a kvmc-dir volume is (shared by virtiofs); empty for a disk."""
        return self.path if self.driver == DIR_DRIVER else ""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> int:
    """``512m``, ``2g``, ``1048576`` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower().removesuffix("b")
    try:
        value = int(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else int(raw)
    except ValueError:
        raise UsageError(f'invalid size "{text}": expected e.g. 512m or 2g') from None
    if value < 16 << 20:
        raise UsageError(f'invalid size "{text}": a volume needs at least 16m')
    return value


class VolumeStore:
    """The volumes under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, name: str) -> Path:
        if not VOLUME_NAME.match(name):
            raise UsageError(f'invalid volume name "{name}": use letters, digits and _.-')
        return self.root / name

    def get(self, name: str) -> Volume:
        try:
            return Volume(**json.loads((self._dir(name) / VOLUME_FILE).read_text()))
        except FileNotFoundError:
            raise VolumeNotFound(f"no such volume: {name}", hint="see 'kvmc volume ls'") from None

    def exists(self, name: str) -> bool:
        return (self._dir(name) / VOLUME_FILE).exists()

    def list(self) -> list[Volume]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if not path.name.startswith("."):
                try:
                    found.append(self.get(path.name))
                except (KvmcError, ValueError, TypeError):
                    continue
        return found

    def create(self, name: str, size_bytes: int = DEFAULT_SIZE, exist_ok: bool = False,
               labels: dict[str, str] | None = None, driver: str = EXT4_DRIVER) -> Volume:
        """Make the disk (sparse, ext4) or the directory and publish it under ``name`` in one rename."""
        if driver not in VOLUME_DRIVERS:
            raise UsageError(f'volume driver "{driver}" is not one of kvmc\'s: {", ".join(VOLUME_DRIVERS)}')
        final = self._dir(name)
        if final.exists():
            if exist_ok:
                return self.get(name)
            raise Conflict(f"volume {name} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".creating-{name}-{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        try:
            if driver == DIR_DRIVER:
                (work / DIR_DATA).mkdir(mode=0o755)
                volume = Volume(name=name, created=now_iso(), size_bytes=0, path=str(final / DIR_DATA),
                                labels=dict(labels or {}), driver=driver)
            else:
                volume = self._make_disk(work, name, size_bytes, final, labels)
            (work / VOLUME_FILE).write_text(json.dumps(asdict(volume), indent=1))
            work.chmod(0o755)
            try:
                os.rename(work, final)
            except OSError:  # created by a concurrent run meanwhile (rename onto a non-empty dir)
                if exist_ok and self.exists(name):
                    return self.get(name)
                raise Conflict(f"volume {name} already exists") from None
            return volume
        except subprocess.CalledProcessError as exc:
            raise tool_error(exc.stderr, work) or KvmcError(f"cannot format volume {name}: {exc.stderr.strip()}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _make_disk(work: Path, name: str, size_bytes: int, final: Path, labels: dict[str, str] | None) -> Volume:
        disk = work / DISK_FILE
        with disk.open("wb") as f:
            f.truncate(size_bytes)
        # -m 0: no blocks reserved for root (a data disk, not a system disk);
        # lazy init: formatting costs milliseconds, the guest's ext4 zeroes tables lazily.
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-L", name[:16],
             "-E", "lazy_itable_init=1,lazy_journal_init=1", str(disk)],
            check=True, capture_output=True, text=True, env={**os.environ, **TOOL_ENV},
        )
        return Volume(name=name, created=now_iso(), size_bytes=size_bytes, path=str(final / DISK_FILE),
                      labels=dict(labels or {}))

    def remove(self, name: str) -> None:
        path = self._dir(name)
        if not (path / VOLUME_FILE).exists():
            raise VolumeNotFound(f"no such volume: {name}")
        # Rename first: a half-deleted volume is never seen as a volume.
        doomed = self.root / f".removing-{name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def usage_bytes(self, volume: Volume) -> int:
        if volume.shared_dir:
            total = 0
            for dirpath, dirnames, filenames in os.walk(volume.path):  # never follows symlinks
                for entry in (*dirnames, *filenames):
                    try:
                        total += os.lstat(os.path.join(dirpath, entry)).st_blocks * 512
                    except OSError:
                        continue
            return total
        try:
            return os.stat(volume.path).st_blocks * 512
        except OSError:
            return 0

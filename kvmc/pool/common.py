"""What both kinds of pool share: the key, the records, and one directory's life on disk.

A pool directory holds one subdirectory per record (``<root>/<id>/``, the record's JSON in it).
One is made under a hidden name (``.warming-<id>``: listings skip dot names, so nothing
unfinished is ever claimed or offered) and published by ``rename()`` once complete. A warming
directory whose owner (the process that warms it, named in its ``.owner`` file) has ended, or
older than any warm-up takes (``STALE_WARMING_S``), is a crashed ``pool warm``'s or ``kvmc
serve``'s: it is abandoned, listed stale and removed by ``pool gc`` (and by a starting ``kvmc
serve``) with the VM it may have left.

Every record holds the :class:`PoolKey` it was made for, digests included: one made from an
image or guest that has since changed is stale, never used, and removed by ``pool gc``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Generic, Iterator, TypeVar

from kvmc.agent import AgentConnection
from kvmc.disks import create_overlay
from kvmc.domain import DOMAIN_PREFIX, OVERLAY_FILE, VMSpec, container_vm
from kvmc.context import HostContext
from kvmc.guest import GuestArtefacts
from kvmc.space import check_vm_disk

if TYPE_CHECKING:
    from kvmc.images import Image

WARMING_PREFIX = ".warming-"
STALE_WARMING_S = 600
OWNER_FILE = ".owner"
"""In a warming directory: the process that warms it, as "PID START" (its start time in clock
ticks since boot, so that a process that reused the pid is not taken for it)."""
AUTO_ORIGIN = "auto:"
"""A record's ``origin`` is empty for ``kvmc pool warm``'s, ``auto:<pid>`` for the automatic
pool of the ``kvmc serve`` with that pid (kvmc/service/autopool.py)."""


def auto_origin(pid: int) -> str:
    return f"{AUTO_ORIGIN}{pid}"


def origin_pid(origin: str) -> int | None:
    """The serving process of an automatic pool's record, None for a manual one."""
    if not origin.startswith(AUTO_ORIGIN):
        return None
    try:
        return int(origin[len(AUTO_ORIGIN):])
    except ValueError:
        return 0


@dataclass(frozen=True)
class PoolKey:
    """What a member must match to serve a run: same image, VM size, accelerator and guest."""

    image_id: str
    memory_mib: int
    cpus: int
    accel: str
    guest_digest: str
    network: str = "none"
    """user | none: a NIC is a device, so it is part of what a saved VM is (members saved
    before kvmc had networking have no NIC, hence the default)."""


def pool_key(host: HostContext, image_id: str, memory_mib: int, cpus: int, accel: str,
             network: str = "user") -> PoolKey:
    return PoolKey(image_id, memory_mib, cpus, accel, host.guest().digest, network)


def resolve(host: HostContext, image_ref: str, memory_mib: int, cpus: int, accel: str | None,
            network: str) -> tuple[Image, PoolKey]:
    """The image a warm-up boots and the key of what it makes (the accelerator chosen now)."""
    image = host.images.get(image_ref)
    return image, pool_key(host, image.id, memory_mib, cpus, host.accel(accel).accel, network)


class KeyedRecord:
    """JSON round trip of a pool dataclass whose ``key`` field is a PoolKey."""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "key": asdict(self.key)}, indent=1)  # type: ignore[call-overload, attr-defined]

    @classmethod
    def from_json(cls, text: str):  # noqa: ANN206 - returns cls
        data = json.loads(text)
        return cls(**{**data, "key": PoolKey(**data["key"])})


R = TypeVar("R")


@dataclass(frozen=True)
class Offer(Generic[R]):
    """What serves one run, from one source: a claimed member or a template to clone."""

    boot: str
    """What the container records as its boot: ``pool`` (a saved member) or ``template``."""
    record: R
    directory: Path
    """A claimed member's: the container's directory now. A template's: its own, copied from."""
    hot: bool = False
    """A member restored and paused already: the run resumes it."""

    @property
    def id(self) -> str:
        return self.record.id  # type: ignore[attr-defined]

    @property
    def domain(self) -> str:
        return self.record.domain  # type: ignore[attr-defined]


def pool_domain(tag: str, ident: str) -> str:
    """The domain of a pool VM: ``kvmc-pool-<id16>`` (members), ``kvmc-tmpl-<id16>`` (templates)."""
    return f"{DOMAIN_PREFIX}{tag}-{ident[:16]}"


def pool_vm(key: PoolKey, *, name: str, uuid: str, ident: str, label: str, directory: Path, agent_socket: Path,
            image_disk: Path, guest: GuestArtefacts, state_root: str, tcg_tb_cache_mib: int = 0) -> VMSpec:
    """A pool VM of ``key``'s size, accelerator and network, named ``<label>-<id12>``; its TCG
    translation cache sized as the containers' (config tcg_tb_cache_mib): a hot member's or hot
    clone's QEMU is the one the container later runs in."""
    return container_vm(
        name=name, uuid=uuid, container_id=ident, container_name=f"{label}-{ident[:12]}",
        directory=directory, agent_socket=agent_socket, image_disk=image_disk, guest=guest,
        domain_type="kvm" if key.accel == "kvm" else "qemu", memory_mib=key.memory_mib,
        vcpus=key.cpus, state_root=state_root, network=key.network == "user", tcg_tb_cache_mib=tcg_tb_cache_mib,
    )


def published(root: Path, record_file: str, kind: type) -> list:
    """(directory, record) for every published directory under ``root`` (ones still being
    made hide behind a dot prefix), read from ``record_file``."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            found.append((path, kind.from_json((path / record_file).read_text())))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # claimed or removed while we listed (or not a record's directory)
    return found


def _start_ticks(pid: int) -> str | None:
    """A live (not zombie) process's start time (field 22 of /proc/PID/stat), None if none runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def own_warming(directory: Path) -> None:
    """Name this process as the one warming ``directory``, until :func:`disown_warming`."""
    (directory / OWNER_FILE).write_text(f"{os.getpid()} {_start_ticks(os.getpid())}")


def disown_warming(directory: Path) -> None:
    """Before a warming directory is published (or handed back): a published one has no owner."""
    (directory / OWNER_FILE).unlink(missing_ok=True)


def _owner_ended(directory: Path) -> bool:
    """The process named in the directory's owner file has ended (False when none is named)."""
    try:
        pid, start = (directory / OWNER_FILE).read_text().split()
        return _start_ticks(int(pid)) != start
    except (OSError, ValueError):
        return False


def abandoned(root: Path) -> Iterator[tuple[Path, None]]:
    """Warm-ups under ``root`` whose owner ended (a killed ``pool warm``, or a ``kvmc serve``
    killed while its automatic pool made a member: its VM runs on), or older than any warm-up
    takes (one made before owners were named)."""
    if root.is_dir():
        for path in root.iterdir():
            if not path.name.startswith(WARMING_PREFIX):
                continue
            try:
                old = time.time() - path.stat().st_mtime > STALE_WARMING_S
            except OSError:
                continue  # published or removed meanwhile
            if old or _owner_ended(path):
                yield path, None


class PoolDirectory(Generic[R]):
    """One kind of pool in its directory: listing, staleness, removal, ``pool ls`` rows and
    the warm-up that publishes a new record. A kind names its files and VMs and supplies the
    steps that differ: how its VM boots, how it is captured, what removing one releases."""

    MODE: ClassVar[str]
    """``pool ls``'s mode and ``pool rm --mode``'s value: save | template."""
    BOOT: ClassVar[str]
    """A container's ``boot`` when this kind serves its run: pool | template."""
    TAG: ClassVar[str]
    """In its VMs' names: domain ``kvmc-<TAG>-<id16>``, agent socket ``<TAG>-<id16>.agent.sock``."""
    RECORD_FILE: ClassVar[str]
    RECORD: ClassVar[type]

    def __init__(self, host: HostContext, root: Path) -> None:
        self.host = host
        self.root = root

    def items(self) -> list[tuple[Path, R]]:
        """Published records (directory, record)."""
        return published(self.root, self.RECORD_FILE, self.RECORD)

    def matching(self, key: PoolKey, auto: bool = True) -> list[tuple[Path, R]]:
        """Records of ``key``; without ``auto``, only manual ones (``kvmc pool warm``'s): the
        automatic pools of ``kvmc serve`` serve the API's runs only."""
        return [(path, r) for path, r in self.items()
                if r.key == key and (auto or not r.origin)]  # type: ignore[attr-defined]

    def domain_for(self, ident: str) -> str:
        return pool_domain(self.TAG, ident)

    def socket_for(self, ident: str) -> Path:
        """The agent socket of this kind's VM while it is in the pool (or being made)."""
        return self.host.config.run_dir / f"{self.TAG}-{ident[:16]}.agent.sock"

    def domains(self) -> set[str]:
        """Domains of the warm-ups under way (a kind adds those its published records own)."""
        if not self.root.is_dir():
            return set()
        return {self.domain_for(p.name.removeprefix(WARMING_PREFIX))
                for p in self.root.iterdir() if p.name.startswith(WARMING_PREFIX)}

    def intact(self, record: R) -> bool:
        """Whether everything the record needs outside its directory is still there."""
        return True

    def stale(self) -> Iterator[tuple[Path, R | None]]:
        """Records made from a guest or image that changed (or no longer intact), and
        abandoned warm-ups (None).

        Only finds them (``pool ls`` lists through here); :meth:`gc` removes them."""
        guest = self.host.guest().digest
        live_images = {i.id for i in self.host.images.list() if i.tags}
        for path, record in self.items():
            key: PoolKey = record.key  # type: ignore[attr-defined]
            if key.guest_digest != guest or key.image_id not in live_images or not self.intact(record):
                yield path, record
        yield from abandoned(self.root)

    def remove(self, image_id: str | None) -> int:
        """Remove every record (of one image, if given); how many."""
        return self.remove_if(lambda r: image_id is None or r.key.image_id == image_id)  # type: ignore[attr-defined]

    def remove_if(self, wanted: Callable[[R], bool]) -> int:
        """Remove the records ``wanted`` accepts; how many. Each is first hidden by a rename,
        as a claim takes one: a member a run claimed meanwhile is the run's, never removed."""
        removed = 0
        for path, record in self.items():
            if wanted(record):
                hidden = self._warming(record.id)  # type: ignore[attr-defined]
                try:
                    os.rename(path, hidden)
                except OSError:
                    continue  # claimed (or removed) meanwhile
                own_warming(hidden)
                self._remove(hidden, record)
                removed += 1
        return removed

    def gc(self) -> int:
        """Remove stale records and abandoned warm-ups; how many."""
        removed = 0
        for path, record in list(self.stale()):
            self._remove(path, record)
            removed += 1
        return removed

    def remove_abandoned(self) -> int:
        """Remove abandoned warm-ups only (with their VMs); how many."""
        found = list(abandoned(self.root))
        for path, _ in found:
            self._remove(path, None)
        return len(found)

    def _remove(self, path: Path, record: R | None) -> None:
        """Remove a record, or (``record`` None) an abandoned warm-up, with what it holds outside."""
        ident = record.id if record is not None else path.name.removeprefix(WARMING_PREFIX)  # type: ignore[attr-defined]
        self._release(ident, unfinished=record is None)
        shutil.rmtree(path, ignore_errors=True)

    def _release(self, ident: str, unfinished: bool) -> None:
        """What record ``ident`` holds outside its directory (its VM, sockets, files), removed;
        ``unfinished``: a warm-up's, whose VM may still run."""
        raise NotImplementedError

    # ------------------------------------------------------------- pool ls
    def summary_rows(self, tags: dict[str, str]) -> list[dict]:
        """``pool ls`` rows of this kind: ready and stale counts per row (see :meth:`_row`)."""
        stale = {r.id for _, r in self.stale() if r is not None}  # type: ignore[attr-defined]
        rows: dict[object, dict] = {}
        for _, record in self.items():
            key: PoolKey = record.key  # type: ignore[attr-defined]
            row = rows.setdefault(self._row(record), {
                "mode": self._mode(record), "origin": record.origin,  # type: ignore[attr-defined]
                "why": "auto (serve)" if record.origin else "manual (pool warm)",  # type: ignore[attr-defined]
                "image": tags.get(key.image_id, key.image_id[:12]), "image_id": key.image_id,
                "memory_mib": key.memory_mib, "cpus": key.cpus, "accel": key.accel, "network": key.network,
                "ready": 0, "hot": 0, "stale": 0, "save_mib": 0.0, "ram_mib": 0.0,
            })
            fresh = record.id not in stale  # type: ignore[attr-defined]
            row["ready" if fresh else "stale"] += 1
            self._fill_row(row, record, fresh)
        return list(rows.values())

    def _row(self, record: R) -> object:
        """Which row a record counts in: one per pool key and origin, unless a kind says otherwise."""
        return record.key, record.origin  # type: ignore[attr-defined]

    def _mode(self, record: R) -> str:
        """``pool ls``'s mode of a record's row."""
        return self.MODE

    def _fill_row(self, row: dict, record: R, fresh: bool) -> None:
        """A kind's own columns of ``row`` for ``record``."""

    # ---------------------------------------------------------------- make
    def _warming(self, ident: str) -> Path:
        return self.root / f"{WARMING_PREFIX}{ident}"

    def _make(self, record: R, image_disk: Path, **options: bool) -> R:
        """Boot ``record``'s VM on a new overlay of ``image_disk`` to agent-ready, capture it
        (the kind's step, with ``options``), and only then publish it by rename. A failure
        removes everything of it (:meth:`_release`); its agent socket goes unless the capture
        leaves its VM running."""
        ident: str = record.id  # type: ignore[attr-defined]
        warming = self._warming(ident)
        warming.mkdir(parents=True, mode=0o755)
        own_warming(warming)
        self.host.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        sock = self.socket_for(ident)
        running = False
        try:
            create_overlay(image_disk, warming / OVERLAY_FILE)
            self._boot(record, warming, sock, image_disk)
            with AgentConnection.connect(str(sock), timeout=self.host.config.boot_timeout_s) as conn:
                conn.wait_ready(self.host.config.boot_timeout_s,
                                check=lambda: check_vm_disk(self.host.hv, self.domain_for(ident), warming))
            running = self._capture(record, warming, image_disk, **options)
            (warming / self.RECORD_FILE).write_text(record.to_json())  # type: ignore[attr-defined]
            disown_warming(warming)
            os.rename(warming, self.root / ident)
        except BaseException:
            self._release(ident, unfinished=True)
            shutil.rmtree(warming, ignore_errors=True)
            raise
        finally:
            if not running:
                sock.unlink(missing_ok=True)
        return record

    def _boot(self, record: R, directory: Path, agent_socket: Path, image_disk: Path) -> None:
        """Start the record's VM from ``directory`` (its overlay is there)."""
        raise NotImplementedError

    def _capture(self, record: R, directory: Path, image_disk: Path, **options: bool) -> bool:
        """Capture the agent-ready VM into ``directory`` and fill in the record; True if the
        VM is left running (its agent socket is kept)."""
        raise NotImplementedError

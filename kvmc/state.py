"""Container records: one directory per container under the state root, one JSON record each.

Why files and not a daemon: kvmc has no daemon, so concurrent CLI invocations coordinate
through the file system. Records are written atomically (temp file + rename); a name is
reserved by creating ``names/<name>`` with O_EXCL, which is atomic, so two concurrent
``run --name x`` can never both get ``x``. Everything a container owns on the host (overlay,
agent socket, console and output logs) lives in its directory, so ``rm`` is one rmtree.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import AbstractContextManager, contextmanager
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from enum import Enum
from typing import Any, Callable, Iterator

from kvmc.errors import AmbiguousContainer, ContainerNotFound, NameInUse, UsageError
from kvmc.health import Health
from kvmc.mounts import Mount
from kvmc.names import generate_name, valid_name
from kvmc.net.plan import Endpoint
from kvmc.network import PortMapping
from kvmc.options import ContainerOptions
from kvmc.watch import record_changes

ID_PREFIX_MIN = 1
TOMBSTONE_TTL_S = 600.0


SCHEMA_VERSION = 2
"""Version of record.json. 1 (no ``schema`` key): ``process``, ``ports`` and ``mounts`` were
free-form dicts; 2: the same keys, read into the typed classes below. :func:`migrate` turns
any older record into the current shape, so containers survive an upgrade of kvmc."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class State(str, Enum):
    """A container's life, as its record says (a ``str``, so records read as plain JSON)."""

    CREATED = "created"
    STARTING = "starting"
    """start() reset the record and is spawning the monitor, which boots the VM."""
    RUNNING = "running"
    RESTARTING = "restarting"
    """Its process ended and its monitor will start it again (restart policy, back-off)."""
    EXITED = "exited"

    def __str__(self) -> str:
        return self.value


LIVE_STATES = (State.RUNNING, State.STARTING, State.RESTARTING)
STOPPED_STATES = (State.CREATED, State.EXITED)


@dataclass
class ContainerProcess:
    """The container's main process as docker computes it (kvmc.process.build_process)."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    user: str | None = None
    hostname: str | None = None
    stdin: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContainerProcess:
        return cls(**{k: v for k, v in data.items() if k in _PROCESS_FIELDS})


_PROCESS_FIELDS = {f.name for f in fields(ContainerProcess)}


@dataclass
class ContainerRecord:
    """What kvmc knows about one container: the single source of truth for both front doors."""

    id: str
    name: str
    image: str
    image_id: str
    domain: str
    accel: str
    memory_mib: int
    cpus: int
    process: ContainerProcess
    auto_remove: bool = False
    detached: bool = False
    state: State = State.CREATED
    created: str = field(default_factory=now_iso)
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    error: str | None = None
    monitor_pid: int | None = None
    agent_socket: str = ""
    control_socket: str = ""
    boot: str = "cold"
    restore_from: str = ""
    """A claimed pool member's save file: the first start restores it instead of booting."""
    resume_paused: bool = False
    """A claimed hot pool member: the first start resumes its paused, already restored VM (and
    restores from ``restore_from`` only if that VM is gone)."""
    vm_resumed: bool = False
    """That VM was resumed by the start itself (Runtime.start), before the monitor existed: the
    monitor only hands its agent the process."""
    clone_from: str = ""
    """A pool template's directory: the first start clones it instead of booting (kvmc/pool/)."""
    pool_source: str = ""
    """What served the run when it came from a pool (kvmc.runtime.pool_source): the kind of
    pool VM and whose pool, e.g. ``hot template clone (auto: kvmc serve)``; empty if cold."""
    guest_uptime_ms: int | None = None
    network: str = "none"
    """user | none (records from before networking had none)."""
    ports: list[PortMapping] = field(default_factory=list)
    """Published ports, with the host port as allocated."""
    mounts: list[Mount] = field(default_factory=list)
    """In the order their devices are attached."""
    networks: list[Endpoint] = field(default_factory=list)
    """kvmc networks (kvmc/net/), in the order of their NICs (eth1, eth2, ...); the user-mode
    NIC of ``network`` is eth0 and stays for outbound access and -p."""
    read_only: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    tty: bool = False
    """docker's Tty: process 1 runs on a pseudo-terminal in the guest (one output stream)."""
    console_size: list[int] | None = None
    """[rows, columns] of that terminal at start (docker's HostConfig.ConsoleSize)."""
    open_stdin: bool = False
    """docker's OpenStdin: stdin stays open for attaches (API containers)."""
    stdin_once: bool = False
    entrypoint: list[str] | None = None
    """docker's Config.Entrypoint and Config.Cmd as asked (``process.args`` is their result)."""
    cmd: list[str] | None = None
    stop_signal: str | None = None
    stop_timeout: int | None = None
    log_opts: dict[str, str] = field(default_factory=dict)
    """docker's LogConfig.Config as resolved at create (max-size, max-file; kvmc/logs.py);
    empty in records from before logs were capped: the configured defaults apply."""
    options: ContainerOptions = field(default_factory=ContainerOptions)
    """docker's settings beyond the process: restart policy, health check, DNS, ulimits, ..."""
    restart_count: int = 0
    """Restarts by the restart policy since the last start by hand (docker's RestartCount)."""
    manually_stopped: bool = False
    """Stopped (or killed) by a user: unless-stopped containers stay down at ``system boot``."""
    health: Health | None = None
    """State.Health while a health check runs (kvmc/health.py), kept after the container ends."""
    guest_dir: str = ""
    """Guest artefacts this container boots when not the configured ones (a ``kvmc host``: the
    kvmc-host kernel flavour); empty: the configuration's."""
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Typed whatever the caller passed: records are built from JSON dicts too.
        self.state = State(self.state)
        if isinstance(self.process, dict):
            self.process = ContainerProcess.from_dict(self.process)
        self.ports = [p if isinstance(p, PortMapping) else PortMapping(**p) for p in self.ports]
        self.mounts = [m if isinstance(m, Mount) else Mount(**m) for m in self.mounts]
        self.networks = [n if isinstance(n, Endpoint) else Endpoint.from_dict(n) for n in self.networks]
        if not isinstance(self.options, ContainerOptions):
            self.options = ContainerOptions.from_dict(self.options)
        if isinstance(self.health, dict):
            self.health = Health.from_dict(self.health)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def volume_names(self) -> list[str]:
        """The named volumes this container mounts."""
        return [m.source for m in self.mounts if m.kind == "volume"]

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES


def new_container_id() -> str:
    """A random id of 64 hex digits whose short form, the container's default hostname, is not
    all decimal digits: glibc's resolver takes such a name for a numeric address and answers
    "unknown host" without looking it up (``hostname -i`` failed in a container with id
    885052174032...; moby draws again for the same reason, its issue #3869)."""
    while True:
        container_id = secrets.token_hex(32)
        if not container_id[:12].isdigit():
            return container_id


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a record.json of any earlier schema to :data:`SCHEMA_VERSION` (pure)."""
    data = dict(data)
    if data.get("schema", 1) < 2:
        # Schema 1 had the same keys untyped; labels/tty/... did not exist (docker's defaults).
        data["schema"] = 2
    return data


_FIELDS = {f.name for f in fields(ContainerRecord)}



def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    try:
        tmp.write_text(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave empty temp files behind
        raise


class StateStore:
    """Container records under ``root`` (``<root>/<id>/record.json`` and ``<root>/names/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names = root / "names"

    def container_dir(self, container_id: str) -> Path:
        return self.root / container_id

    def _reserve_name(self, name: str, container_id: str) -> bool:
        """Atomically claim ``names/<name>``: link() a file already holding the id, so a
        loser never sees the reservation without its owner."""
        tmp = self.names / f".{container_id}.{secrets.token_hex(3)}"
        try:
            tmp.write_text(container_id)
            os.link(tmp, self.names / name)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)  # also when the write failed (a full disk)
        return True

    def allocate(self, name: str | None, make_dir: bool = True) -> tuple[str, str, Path]:
        """Reserve a fresh id, a unique name (given or generated) and the container's directory
        (created here, or left for the caller to rename into place: a claimed pool member)."""
        self.names.mkdir(parents=True, exist_ok=True)
        container_id = new_container_id()
        if name is not None:
            if not valid_name(name):
                raise UsageError(f'invalid container name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed')
            if not self._reserve_name(name, container_id):
                owner = (self.names / name).read_text().strip()[:12]
                raise NameInUse(f'the container name "{name}" is already in use by container {owner}: '
                                "remove it or choose another name")
        else:
            for attempt in range(100):
                name = generate_name() if attempt < 50 else f"{generate_name()}{attempt}"
                if self._reserve_name(name, container_id):
                    break
            else:  # pragma: no cover - 1000 names in use at once
                raise UsageError("could not generate a free container name; pass --name")
        directory = self.container_dir(container_id)
        if make_dir:
            directory.mkdir(mode=0o755)
        return container_id, name, directory

    def rename(self, record: ContainerRecord, new_name: str) -> ContainerRecord:
        """Give a container another name: reserve the new one first, then release the old."""
        if not valid_name(new_name):
            raise UsageError(f'invalid container name "{new_name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed')
        if new_name == record.name:
            return record
        if not self._reserve_name(new_name, record.id):
            owner = (self.names / new_name).read_text().strip()[:12]
            raise NameInUse(f'the container name "{new_name}" is already in use by container {owner}: '
                            "remove it or choose another name")
        old = record.name
        self.update(record, name=new_name)
        try:
            if (self.names / old).read_text().strip() == record.id:
                (self.names / old).unlink()
        except OSError:
            pass
        return record

    def save(self, record: ContainerRecord) -> None:
        _write_atomic(self.container_dir(record.id) / "record.json", json.dumps(asdict(record), indent=1))

    def load(self, container_id: str) -> ContainerRecord | None:
        try:
            data = json.loads((self.container_dir(container_id) / "record.json").read_text())
        except (OSError, ValueError):
            return None
        try:
            return ContainerRecord(**{k: v for k, v in migrate(data).items() if k in _FIELDS})
        except (TypeError, ValueError):
            return None  # not a record kvmc can read: gc lists its directory

    def update(self, record: ContainerRecord, **changes: Any) -> ContainerRecord:
        """Write ``changes`` into the stored record and into ``record``.

        Read-modify-write under the record's own lock, so writers of different fields in
        different processes (a monitor recording the end, a rename) never undo each other:
        each call writes only its fields onto what is stored now. A container removed
        meanwhile raises FileNotFoundError (an OSError): its record is never written back.
        """
        # The directory itself is the lock (flock works on a directory's descriptor): no file
        # of its own, and not the ``.lock`` that start() holds while it updates the record.
        fd = os.open(self.container_dir(record.id), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stored = self.load(record.id)
            if stored is None:  # removed meanwhile (rm holds this lock while it deletes): never resurrect it
                raise FileNotFoundError(f"container {record.id} was removed")
            for field_ in fields(ContainerRecord):
                if field_.name not in changes:
                    setattr(record, field_.name, getattr(stored, field_.name))
            for key, value in changes.items():
                setattr(record, key, value)
            self.save(record)
        finally:
            os.close(fd)
        return record

    def list(self) -> list[ContainerRecord]:
        if not self.root.is_dir():
            return []
        records = [self.load(p.name) for p in self.root.iterdir() if p.is_dir() and p.name != "names"]
        return sorted((r for r in records if r is not None), key=lambda r: r.created, reverse=True)

    def resolve(self, ref: str) -> ContainerRecord:
        """Find a container by exact name, full id, or unambiguous id prefix."""
        try:
            owner = (self.names / ref).read_text().strip()
            record = self.load(owner)
            if record is not None:
                return record
        except (OSError, ValueError):
            pass
        matches = [r for r in self.list() if r.id.startswith(ref.lower())] if ref else []
        if not matches:
            raise ContainerNotFound(f"no such container: {ref}")
        if len(matches) > 1:
            ids = ", ".join(r.short_id for r in matches[:5])
            raise AmbiguousContainer(f'container prefix "{ref}" is ambiguous: it matches {ids}')
        return matches[0]

    def watch(self, container_id: str) -> AbstractContextManager[Callable[[float], bool]]:
        """A sleep for wait loops that returns early once the container's record is written or
        the container removed (kvmc/watch.py): ``with store.watch(id) as changed: ... changed(0.1)``
        (True if woken by a change, False after the timeout)."""
        return record_changes(self.container_dir(container_id))

    @contextmanager
    def locked(self, container_id: str, name: str = ".lock", missing_ok: bool = False) -> Iterator[None]:
        """An exclusive fcntl lock on one container, for read-check-write sequences (``name``:
        another of its locks, for a sequence that may run while this one is held).
        ``missing_ok``: a container whose directory is gone (removed) runs the sequence unlocked;
        otherwise that raises FileNotFoundError."""
        try:
            f = (self.container_dir(container_id) / name).open("a")
        except FileNotFoundError:
            if not missing_ok:
                raise
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def unrecorded(self, min_age_s: float = 60.0) -> list[Path]:
        """Container dirs without a record and names whose container is gone: what a kvmc
        killed between reserving and recording leaves. Young ones may be mid-create: skipped."""
        found: list[Path] = []
        if not self.root.is_dir():
            return found
        now = time.time()
        for path in self.root.iterdir():
            if path.name != "names" and path.is_dir() and not (path / "record.json").exists():
                if now - path.stat().st_mtime > min_age_s:
                    found.append(path)
        if self.names.is_dir():
            for name in self.names.iterdir():
                if name.name.startswith("."):
                    continue
                owner = name.read_text().strip()
                if not (self.root / owner).is_dir() and now - name.stat().st_mtime > min_age_s:
                    found.append(name)
        return found

    def reclaim(self, path: Path) -> None:
        """Delete one path found by :meth:`unrecorded`."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def remove(self, record: ContainerRecord) -> None:
        """Delete the container's directory and socket and release its name (idempotent),
        leaving a tombstone with its exit code (see :meth:`tombstone_exit_code`)."""
        self._bury(record)
        self.release(record.id, record.name)
        for sock in (record.agent_socket, record.control_socket):
            if sock:
                Path(sock).unlink(missing_ok=True)

    @property
    def tombstones(self) -> Path:
        return self.root / "names" / ".exited"

    def _bury(self, record: ContainerRecord) -> None:
        """Keep a removed container's exit code for a while: docker's ``wait?condition=removed``
        (what ``docker run --rm`` waits on) answers with it after the record is gone."""
        try:
            self.tombstones.mkdir(parents=True, exist_ok=True)
            now = time.time()
            for old in self.tombstones.iterdir():
                if now - old.stat().st_mtime > TOMBSTONE_TTL_S:
                    old.unlink(missing_ok=True)
            if record.exit_code is not None:
                _write_atomic(self.tombstones / record.id,
                              json.dumps({"exit_code": record.exit_code, "error": record.error}))
        except OSError:
            pass  # a full disk must not stop rm: the exit code is then reported as 0

    def tombstone(self, container_id: str) -> tuple[int, str | None] | None:
        """(exit code, error) of a container removed in the last few minutes, if known."""
        try:
            data = json.loads((self.tombstones / container_id).read_text())
            return int(data["exit_code"]), data.get("error")
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def tombstone_exit_code(self, container_id: str) -> int:
        found = self.tombstone(container_id)
        return found[0] if found else 0

    def release(self, container_id: str, name: str | None) -> None:
        """Delete a container directory and release its name, for a record never saved.
        Under the directory's lock (:meth:`update`'s): a writer that comes after finds no record
        and fails, instead of writing one back into the half-deleted directory."""
        try:
            fd = os.open(self.container_dir(container_id), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            shutil.rmtree(self.container_dir(container_id), ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        if name:
            try:
                if (self.names / name).read_text().strip() == container_id:
                    (self.names / name).unlink()
            except OSError:
                pass

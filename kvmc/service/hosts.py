"""Container hosts as cattle (``kvmc host``): disposable VMs that run their own Docker Engine.

A host is a kvmc container of ``kvmc/docker-host`` (kvmc/images/dockerhost.py), privileged
inside its VM, booting the kvmc-host kernel flavour (config ``host_guest_dir``; netfilter,
bridge, veth: images/kernel/kvmc-host.config), with sshd published on 127.0.0.1 only, plus what
kvmc keeps for it:

* ``data_dir/hosts/NAME/``: ``host.json`` (container, cache volume, TTL, state), the per-host
  SSH key pair (``id_ed25519``, its ``.pub`` is root's only authorized key in the guest), the
  guest's pinned host key (``known_host``), the forwarder's pid file and log;
* ``run_dir/hosts/DIGEST/NAME.sock``: the DOCKER_HOST, mode 0600, served by the forwarder (a host
  process, kvmc/sshfwd.py) that tunnels each connection to the guest's docker.sock over SSH.

``--cache VOLUME`` mounts a named volume at /var/lib/docker, so images and build cache outlive
the host; a volume serves one host (container) at a time. ``rm`` removes everything but the
cache volume; ``gc`` removes hosts past their TTL and what a crash left: hosts whose create
never finished, whose VM is gone or stopped, host containers with no host record, sockets with
no host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kvmc.errors import Conflict, KvmcError, NotFound, UsageError
from kvmc.names import NAME_RE
from kvmc.vmlife import pid_alive

if TYPE_CHECKING:
    from kvmc.service.containers import ContainerService
    from kvmc.service.images import ImageService
    from kvmc.service.volumes import VolumeService

HOST_LABEL = "org.kvmc.host"
"""Label on a host's container: the host's name (gc finds host containers by it)."""
CONTAINER_PREFIX = "kvmc-host-"
SSH_PORT = 22
DEFAULT_MEMORY_MIB = 1024
READY_TIMEOUT_S = 300.0
"""dockerd + containerd starting under TCG take tens of seconds; KVM a second or two."""
POLL_S = 0.5


class HostNotFound(NotFound):
    """No host of that name."""


@dataclass
class HostRecord:
    """What kvmc keeps about a host (``host.json``)."""

    name: str
    container: str
    cache: str | None
    created: float
    ttl_s: float | None
    socket: str
    ready: bool = False
    creator_pid: int = 0

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def expired(self, now: float) -> bool:
        return self.ttl_s is not None and self.created + self.ttl_s <= now


@dataclass
class HostView:
    """A host as ``host ls`` shows it."""

    record: HostRecord
    state: str
    forwarder_pid: int | None


class HostService:
    """``kvmc host``: create, list, ssh, rm, gc, build the image."""

    def __init__(self, containers: ContainerService, images: ImageService, volumes: VolumeService) -> None:
        self.containers = containers
        self.images = images
        self.volumes = volumes
        config = containers.engine.config
        self.root = config.data_dir / "hosts"
        # run_dir is shared by every state root of this user; the data dir's digest keeps one
        # root's host names (and gc) away from another's.
        self.sockets = config.run_dir / "hosts" / hashlib.sha256(str(config.data_dir).encode()).hexdigest()[:8]

    # --------------------------------------------------------------- files
    def _dir(self, name: str) -> Path:
        return self.root / name

    def _load(self, name: str) -> HostRecord:
        try:
            data = json.loads((self._dir(name) / "host.json").read_text())
        except (OSError, ValueError):
            raise HostNotFound(f"no host named {name}", hint="kvmc host ls lists them") from None
        return HostRecord(**data)

    def _save(self, record: HostRecord) -> None:
        path = self._dir(record.name) / "host.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        tmp.replace(path)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    # ----------------------------------------------------------------- image
    def build_image(self, force: bool = False, progress: Callable[[str], None] = lambda _m: None):  # noqa: ANN201
        """Build ``kvmc/docker-host`` unless today's is stored (kvmc/images/dockerhost.py)."""
        from kvmc.images.dockerhost import build_docker_host_image

        return build_docker_host_image(self.images.store, self.containers.engine.config.cache_dir, force=force,
                                       progress=progress)

    def _image(self, progress: Callable[[str], None]) -> str:
        from kvmc.images.dockerhost import IMAGE_NAME

        try:
            self.images.get(IMAGE_NAME)
        except NotFound:
            self.build_image(progress=progress)
        return IMAGE_NAME

    # ---------------------------------------------------------------- create
    def create(self, name: str, *, cache: str | None = None, memory_mib: int | None = None,
               cpus: int | None = None, ttl_s: float | None = None,
               timeout_s: float = READY_TIMEOUT_S, progress: Callable[[str], None] = lambda _m: None) -> HostRecord:
        """Boot a host and wait until its engine answers through the forwarded socket; all or
        nothing (a failure removes what was made, and says why with the engine's log tail)."""
        if not NAME_RE.fullmatch(name):
            raise UsageError(f'invalid host name "{name}": use letters, digits and _.- (at most 63)')
        if ttl_s is not None and ttl_s <= 0:
            raise UsageError("--ttl must be a positive duration such as 30m or 2h")
        if self._dir(name).exists():
            raise Conflict(f"host {name} already exists", hint=f"kvmc host rm {name} first")
        guest_dir = self.containers.engine.config.host_guest_artefacts_dir
        if not (guest_dir / "guest.json").is_file():
            raise KvmcError(f"no host guest in {guest_dir}: kvmc host VMs boot kvmc's kernel with the host "
                            "fragment (netfilter, bridge, veth)",
                            hint=f"build it: images/build.sh {guest_dir} --kernel kvmc-host (make setup does)")
        image = self._image(progress)
        if cache is not None:
            self._claim_cache(cache)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sockets.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = self._dir(name)
        directory.mkdir(mode=0o700)
        record = HostRecord(name=name, container=f"{CONTAINER_PREFIX}{name}", cache=cache, created=time.time(),
                            ttl_s=ttl_s, socket=str(self.sockets / f"{name}.sock"), creator_pid=os.getpid())
        try:
            self._save(record)
            public_key = _make_key_pair(directory / "id_ed25519")
            progress(f"booting host {name} ({image})")
            self._start_container(record, image, public_key, memory_mib, cpus, guest_dir)
            port = self._ssh_port(record)
            progress(f"waiting for Docker Engine in {name} (ssh on 127.0.0.1:{port})")
            self._wait_engine(record, port, timeout_s)
            self._start_forwarder(record, port)
            record.ready = True
            self._save(record)
            return record
        except BaseException:
            self._discard(record)
            raise

    def _claim_cache(self, cache: str) -> None:
        """Create the volume if missing; refuse one that another container (a host or not) mounts."""
        self.volumes.create(cache, exist_ok=True)
        users = self.volumes.get(cache).used_by
        if users:
            owner = users[0]
            what = f"host {owner.removeprefix(CONTAINER_PREFIX)}" if owner.startswith(CONTAINER_PREFIX) \
                else f"container {owner}"
            raise Conflict(f"cache volume {cache} is in use by {what}: a cache serves one host at a time")

    def _start_container(self, record: HostRecord, image: str, public_key: str, memory_mib: int | None,
                         cpus: int | None, guest_dir: Path) -> None:
        from kvmc.images.dockerhost import AUTHORIZED_KEY_ENV
        from kvmc.options import ContainerOptions
        from kvmc.process import ProcessOptions
        from kvmc.runtime import DockerFields, RunOptions

        opts = RunOptions(
            image=image, name=record.container, detach=True,
            process=ProcessOptions(env=[f"{AUTHORIZED_KEY_ENV}={public_key}"], hostname=record.name),
            memory_mib=memory_mib or DEFAULT_MEMORY_MIB, cpus=cpus,
            publish=[f"127.0.0.1::{SSH_PORT}"],
            volumes=[f"{record.cache}:/var/lib/docker"] if record.cache else [],
            docker=DockerFields(labels={HOST_LABEL: record.name}),
            options=ContainerOptions(privileged=True), guest_dir=guest_dir,
        )
        self.containers.create(opts)
        self.containers.start(record.container)

    def _ssh_port(self, record: HostRecord) -> int:
        container = self.containers.get(record.container)
        for port in container.ports:
            if port.guest_port == SSH_PORT and port.host_port:
                return port.host_port
        raise KvmcError(f"host {record.name}: sshd's port is not published")

    def _wait_engine(self, record: HostRecord, port: int, timeout_s: float) -> None:
        """Until dockerd answers /_ping over SSH; the container ending or the deadline is an
        error with the end of its log (dockerd's output)."""
        from kvmc.sshfwd import GUEST_DOCKER_SOCKET, connect, open_streamlocal

        directory = self._dir(record.name)
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.containers.get(record.container).is_live:
                raise KvmcError(f"host {record.name}: its VM stopped before Docker Engine answered; "
                                f"the log ends:\n{self._log_tail(record)}")
            try:
                client = connect(port, directory / "id_ed25519", directory / "known_host", timeout=5)
                try:
                    chan = open_streamlocal(client.get_transport(), GUEST_DOCKER_SOCKET, timeout=5)
                    if _ping(chan.sendall, chan.recv, chan.close):
                        return
                    last = "the engine's socket did not answer OK"
                finally:
                    client.close()
            except Exception as exc:  # noqa: BLE001 - sshd or dockerd not up yet: try again
                last = str(exc) or type(exc).__name__
            time.sleep(POLL_S)
        raise KvmcError(f"host {record.name}: Docker Engine did not answer within {timeout_s:.0f} s ({last}); "
                        f"the log ends:\n{self._log_tail(record)}")

    def _log_tail(self, record: HostRecord, lines: int = 15) -> str:
        try:
            return b"".join(e.data for e in self.containers.logs(record.container, tail=lines)).decode(
                errors="replace").rstrip() or "(empty)"
        except KvmcError as exc:
            return f"(no log: {exc})"

    def _start_forwarder(self, record: HostRecord, port: int) -> None:
        directory = self._dir(record.name)
        log = (directory / "forwarder.log").open("ab")
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
                [sys.executable, "-m", "kvmc.sshfwd", record.socket, str(port), str(directory / "id_ed25519"),
                 str(directory / "known_host"), str(directory / "forwarder.pid")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise KvmcError(f"host {record.name}: the socket forwarder exited ({proc.returncode}): "
                                f"{(directory / 'forwarder.log').read_text(errors='replace')[-500:]}")
            if Path(record.socket).exists() and _ping_unix(record.socket):
                return
            time.sleep(0.1)
        raise KvmcError(f"host {record.name}: the socket forwarder did not answer on {record.socket}")

    # ------------------------------------------------------------------ reads
    def list(self) -> list[HostView]:
        views = []
        for name in self.names():
            try:
                record = self._load(name)
            except HostNotFound:
                continue
            views.append(HostView(record, self._state(record), self._forwarder_pid(record)))
        return views

    def get(self, name: str) -> HostRecord:
        return self._load(name)

    def _state(self, record: HostRecord) -> str:
        if not record.ready:
            return "creating" if pid_alive(record.creator_pid) else "failed"
        try:
            container = self.containers.get(record.container)
        except NotFound:
            return "gone"
        if not container.is_live:
            return "stopped"
        return "running" if self._forwarder_pid(record) else "no forwarder"

    def _forwarder_pid(self, record: HostRecord) -> int | None:
        try:
            pid = int((self._dir(record.name) / "forwarder.pid").read_text())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"kvmc.sshfwd" in cmdline and record.socket.encode() in cmdline else None

    # ------------------------------------------------------------------- ssh
    def ssh(self, name: str, command: str | None) -> int:
        """One command (its exit status) or an interactive shell, as root in the host."""
        from kvmc.sshfwd import run_command

        record = self._load(name)
        if self._state(record) not in ("running", "no forwarder"):
            raise Conflict(f"host {name} is not running ({self._state(record)})")
        directory = self._dir(name)
        return run_command(self._ssh_port(record), directory / "id_ed25519", directory / "known_host", command)

    # --------------------------------------------------------------- removal
    def remove(self, name: str) -> HostRecord:
        """The VM, forwarder, keys and socket; the cache volume stays."""
        record = self._load(name)
        self._discard(record)
        return record

    def _discard(self, record: HostRecord) -> None:
        pid = self._forwarder_pid(record)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                _wait_gone(pid)
            except ProcessLookupError:
                pass
        try:
            self.containers.remove(record.container, force=True)
        except NotFound:
            pass
        Path(record.socket).unlink(missing_ok=True)
        shutil.rmtree(self._dir(record.name), ignore_errors=True)
        try:  # this state root's socket directory, once its last host is gone
            self.sockets.rmdir()
        except OSError:
            pass

    def gc(self, now: float | None = None) -> list[str]:
        """Remove hosts past their TTL and a crash's leftovers (hosts whose create died or whose VM
        is gone or stopped, host containers and forwarders without a host, stray sockets); what
        was removed, as words."""
        now = time.time() if now is None else now
        removed = []
        for view in self.list():
            record = view.record
            why = ("past its TTL" if record.expired(now)
                   else None if view.state in ("running", "creating", "no forwarder") else view.state)
            if why:
                self._discard(record)
                removed.append(f"host {record.name} ({why})")
        known = set(self.names())
        for container in self.containers.list(all_=True):
            owner = container.labels.get(HOST_LABEL)
            if owner and owner not in known:
                self.containers.remove(container.id, force=True)
                removed.append(f"container {container.name} (no host record)")
        for pid, sock_path in _forwarder_processes(self.sockets):
            if Path(sock_path).stem not in known:
                os.kill(pid, signal.SIGTERM)
                removed.append(f"forwarder {pid} ({sock_path})")
        for sock in self.sockets.glob("*.sock") if self.sockets.is_dir() else []:
            if sock.stem not in known:
                sock.unlink(missing_ok=True)
                removed.append(f"socket {sock}")
        return removed


def _forwarder_processes(sockets: Path) -> list[tuple[int, str]]:
    """(pid, socket) of every running forwarder (kvmc/sshfwd.py) serving a socket in ``sockets``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if "kvmc.sshfwd" in [a.decode(errors="replace") for a in argv[1:3]] and len(argv) > 3:
            sock = argv[3].decode(errors="replace")
            if Path(sock).parent == sockets:
                found.append((int(proc.name), sock))
    return found


def _make_key_pair(path: Path) -> str:
    """An ed25519 key pair for one host (OpenSSH format, private key 0600); the public line.
    cryptography (paramiko's own dependency) writes it: paramiko generates no ed25519 keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} kvmc-host"
    path.with_name(path.name + ".pub").write_text(line + "\n")
    return line


_PING = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n"


def _ping(send: Callable[[bytes], None], recv: Callable[[int], bytes], close: Callable[[], None]) -> bool:
    """Docker's /_ping over an open stream: True when the engine says OK."""
    try:
        send(_PING)
        reply = b""
        while True:
            chunk = recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0] and reply.endswith(b"OK")
    except OSError:
        return False
    finally:
        close()


def _ping_unix(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return False
    return _ping(sock.sendall, sock.recv, sock.close)




def _wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    try:  # our own child (the create that started it): a zombie is not alive, but wants reaping
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)

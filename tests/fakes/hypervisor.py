"""A fake of :class:`kvmc.hypervisor.Hypervisor`: no libvirt, no QEMU, the real agent.

Each "VM" is the real static ``kvmc-agent`` run as PID 1 of private PID, mount, UTS and network
namespaces (``unshare``, as ``agent_in_namespaces`` in tests/unit/test_agent_setup.py does) on a
busybox rootfs, in socket mode, with ``--no-poweroff``: when the VM would power off, the agent
exits 0 and the fake's domain becomes "shutoff".

What QEMU's virtio-serial chardev does is done by a *relay* process per running domain: it
listens on the ``<channel><source mode='bind' path=...>`` socket of the domain XML (kvmc's
agent socket, one host client at a time, reconnects allowed), holds the agent's connection for
the VM's whole life (the agent in socket mode would kill everything on a host disconnect; a
real guest does not notice one) and splices the two. Host bytes sent before the agent reads
are buffered; agent bytes are read only while a host is attached (the real port blocks the
guest's writes then). When the agent exits, the relay records the power-off and exits.

All domain state is one JSON file per domain under ``ROOT/domains`` (read-modify-write under an
``fcntl`` lock on ``ROOT/lock``), because kvmc's monitor is a forked process that calls the
hypervisor too: every method sees what any other process did. The object itself holds no
file descriptor and no process handle, so a forked copy of it (or a new instance on the same
root) is just as good.

The container root gets what images/initramfs/init mounts (proc, sys, a /dev with pts and shm;
/dev is a tmpfs with the usual nodes), the agent's stderr goes to the XML's serial log file.

Not faithful: no kernel, no disks (the rootfs is the fake's directory, shared by its domains;
volume mounts ``@SERIAL`` fail with "no disk with serial"), no virtiofs, no slirp
(``hostfwd_add`` is only recorded; eth0 is one end of a veth pair, so ``net=`` works but
nothing is reachable), no QMP (raises: no VM templating), and ``save``/``restore`` keep no
guest state: a restore boots a fresh agent (which sends READY again). A domain without the
agent channel (the accel probe) just runs until destroyed.
"Pause" is SIGSTOP of every process in the VM's PID namespace. The agent runs without
CAP_SYS_TIME so that kvmc's ``time_ns`` RUN item cannot set the host's clock (the agent only
logs the failure).

Run as a script (``python hypervisor.py relay SPEC``) it is the relay: only the code above
:class:`FakeHypervisor` that it needs runs there, with the standard library and kvmc.errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the relay, run by file name: make kvmc importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvmc.errors import HypervisorError  # noqa: E402

RELAY_SCRIPT = Path(__file__).resolve()
AGENT_PORT = "org.kvmc.agent"
PRIVATE_SOCKET = "agent.sock"
"""The agent's side, relative to the domain's run directory (the relay's and agent's cwd), so
that no path length limit applies to it."""
GUEST_SETUP = """set -e
ip link set lo up
mount -t tmpfs -o mode=0755 run /run
mkdir -p "$1/proc" "$1/sys" "$1/dev"
mount --bind "$1" "$1"
mount -t proc proc "$1/proc"
mount -t sysfs sysfs "$1/sys"
mount -t tmpfs -o nosuid,mode=0755 dev "$1/dev"
mknod -m 666 "$1/dev/null" c 1 3
mknod -m 666 "$1/dev/zero" c 1 5
mknod -m 666 "$1/dev/full" c 1 7
mknod -m 666 "$1/dev/random" c 1 8
mknod -m 666 "$1/dev/urandom" c 1 9
mknod -m 666 "$1/dev/tty" c 5 0
ln -s /proc/self/fd "$1/dev/fd"
ln -s /proc/self/fd/0 "$1/dev/stdin"
ln -s /proc/self/fd/1 "$1/dev/stdout"
ln -s /proc/self/fd/2 "$1/dev/stderr"
mkdir "$1/dev/pts" "$1/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$1/dev/pts"
ln -s pts/ptmx "$1/dev/ptmx"
mount -t tmpfs -o nosuid,nodev,mode=1777 shm "$1/dev/shm"
shift
exec "$@"
"""
"""What images/initramfs/init gives the container root, run in the VM's private namespaces:
proc, sys, a dev with pts and shm, lo up; and a /run of the VM's own (the agent keeps files
in its root's /run, the initramfs in a VM, the host's here; the agent's cwd, the domain's run
directory, stays reachable under it). /dev is a tmpfs with the usual nodes, not devtmpfs
(that would be the host's own /dev): it has no disks."""
NIC_SETUP = "ip link add eth0 type veth peer name eth1\n"
"""A stand-in for the virtio-net NIC on slirp: an eth0 for the agent to configure."""
MUTE_FIRST_HOST_ENV = "KVMC_FAKE_MUTE_FIRST_HOST"
"""1: a restored VM's agent socket takes its first host's bytes to the agent and drops every
byte the agent sends while that host is connected (as QEMU 7.2 left the first connection to a
just restored VM unanswered, docs/platform.md; here the agent does hear it)."""
BOOT_TIMEOUT_S = 10.0
KILL_WAIT_S = 5.0
RELAY_BUFFER = 1 << 20
NOT_RUNNING = "Requested operation is not valid: domain is not running"


# ------------------------------------------------------------------ processes
def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of a process, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return st[1] if st else None


def alive(pid: int | None, started: int | None = None) -> bool:
    """A live (not zombie) process ``pid``; with ``started``, the very one that started then."""
    if not pid:
        return False
    st = _stat(pid)
    return st is not None and st[0] not in "ZX" and (started is None or st[1] == started)


def namespace_pids(pidns: str | None) -> list[int]:
    """Live processes of the PID namespace ``pidns`` (a /proc/PID/ns/pid link text)."""
    if not pidns:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pidns and alive(int(entry)):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _signal(pid: int, sig: int, pgroup: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if pgroup else os.kill)(pid, sig)


# --------------------------------------------------------------------- store
class Store:
    """The domain JSON files under ``root``; writes are atomic (rename), so reads need no lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.domains = self.root / "domains"
        self.run = self.root / "run"

    def ensure(self) -> None:
        self.domains.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def path(self, name: str) -> Path:
        return self.domains / f"{name}.json"

    def rundir(self, name: str) -> Path:
        return self.run / name

    def load(self, name: str) -> dict[str, Any] | None:
        if not name or "/" in name or name.startswith("."):
            return None
        try:
            return json.loads(self.path(name).read_text())
        except FileNotFoundError:
            return None

    def save(self, rec: dict[str, Any]) -> None:
        path = self.path(rec["name"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(path)

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name[:-5] for p in self.domains.glob("*.json") if not p.name.startswith("."))

    def powered_off(self, rec: dict[str, Any]) -> None:
        """Record that the domain's VM ended: shut off, or gone if it was transient."""
        if rec.get("persistent"):
            rec.update(state="shutoff", live_xml=None, relay_pid=None, relay_start=None, unshare_pid=None,
                       unshare_start=None, agent_pid=None, agent_start=None, pidns=None, host_socket_ino=None)
            self.save(rec)
        else:
            self.delete(rec["name"])


def unlink_socket(path: str | None, ino: int | None) -> None:
    """Remove a listening socket, but only the one we bound (not a newer one at that path)."""
    if not path or ino is None:
        return
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == ino:
            os.unlink(path)


# --------------------------------------------------------------------- relay
class Relay:
    """QEMU's chardev for one running domain: see the module docstring. Runs in its own process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.store = Store(Path(spec["root"]))
        self.agent_proc: subprocess.Popen[bytes] | None = None
        self.listener: socket.socket | None = None
        self.host_ino: int | None = None
        self.host: socket.socket | None = None
        self.agent: socket.socket | None = None

    def report(self, reply: dict[str, Any]) -> None:
        os.write(1, (json.dumps(reply) + "\n").encode())
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)
        os.close(devnull)

    def fail(self, why: str) -> None:
        if self.agent_proc is not None:
            _signal(self.agent_proc.pid, signal.SIGKILL, pgroup=True)
            self.agent_proc.wait()
        unlink_socket(self.spec["host_socket"], self.host_ino)
        self.report({"error": why})

    def command(self) -> list[str]:
        spec = self.spec
        script = (NIC_SETUP if spec["network"] else "") + GUEST_SETUP
        return ["unshare", "--mount", "--uts", "--net", "--pid", "--fork", "--kill-child", "--propagation", "private",
                "sh", "-c", script, "sh", spec["rootfs"],
                "setpriv", "--inh-caps=-sys_time", "--bounding-set=-sys_time",
                spec["agent_bin"], "--root", spec["rootfs"], "--port", PRIVATE_SOCKET, "--no-poweroff"]

    def boot(self) -> bool:
        spec = self.spec
        os.chdir(spec["rundir"])
        try:
            console = os.open(spec["console"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self.fail(f"cannot open the serial log {spec['console']}: {exc.strerror}")
            return False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):  # QEMU unlinks a stale socket too
                os.unlink(spec["host_socket"])
            self.listener.bind(spec["host_socket"])
            self.host_ino = os.stat(spec["host_socket"]).st_ino
            self.listener.listen(1)
        except OSError as exc:
            self.fail(f"cannot listen on the channel socket {spec['host_socket']}: {exc}")
            return False
        private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PRIVATE_SOCKET)
        private.bind(PRIVATE_SOCKET)
        private.listen(1)
        private.settimeout(0.05)
        self.agent_proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                                           start_new_session=True)
        os.close(console)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.agent is None:
            try:
                self.agent, _ = private.accept()
            except TimeoutError:
                if self.agent_proc.poll() is not None or time.monotonic() > deadline:
                    tail = Path(spec["console"]).read_text(errors="replace").strip()[-400:]
                    self.fail(f"the agent did not connect ({tail or 'no output'})")
                    return False
        private.close()
        os.unlink(PRIVATE_SOCKET)
        pid, _uid, _gid = struct.unpack("3i", self.agent.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
        try:
            pidns = os.readlink(f"/proc/{pid}/ns/pid")
        except OSError:
            pidns = None
        self.report({"relay_pid": os.getpid(), "relay_start": start_time(os.getpid()),
                     "unshare_pid": self.agent_proc.pid, "unshare_start": start_time(self.agent_proc.pid),
                     "agent_pid": pid, "agent_start": start_time(pid), "pidns": pidns,
                     "host_socket_ino": self.host_ino})
        return True

    def _drop_host(self) -> None:
        if self.host is not None:
            self.host.close()
            self.host = None

    def splice(self) -> None:
        """Until the agent ends: accept one host at a time and copy bytes both ways."""
        assert self.listener is not None and self.agent is not None and self.agent_proc is not None
        listener, agent = self.listener, self.agent
        listener.setblocking(False)
        agent.setblocking(False)
        to_agent, self.to_host = bytearray(), bytearray()
        mute: socket.socket | None = None  # the first host, when muted (MUTE_FIRST_HOST_ENV)
        hosts = 0
        while self.agent_proc.poll() is None:
            host = self.host
            readers: list[socket.socket] = []
            writers: list[socket.socket] = []
            if host is None:
                readers.append(listener)
            else:
                if len(to_agent) < RELAY_BUFFER:
                    readers.append(host)
                if self.to_host:
                    writers.append(host)
                else:
                    readers.append(agent)  # the guest's writes wait while nobody can take them
            if to_agent:
                writers.append(agent)
            readable, writable, _ = select.select(readers, writers, [], 0.1)
            if listener in readable:
                with contextlib.suppress(BlockingIOError):
                    self.host, _ = listener.accept()
                    self.host.setblocking(False)
                    hosts += 1
                    if hosts == 1 and self.spec.get("mute_first_host"):
                        mute = self.host
            if host is not None and host in readable:
                try:
                    data = host.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    self._drop_host()  # QEMU takes the next client; the guest keeps its port
                elif data:
                    to_agent += data
            if agent in readable:
                try:
                    data = agent.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    return  # the agent is exiting
                if data and (mute is None or self.host is not mute):
                    self.to_host += data
            if host is not None and host is self.host and host in writable:
                try:
                    del self.to_host[: host.send(self.to_host)]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._drop_host()
            if agent in writable:
                try:
                    del to_agent[: agent.send(to_agent)]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    return

    def finish(self) -> None:
        """The VM powered off: last output to the host, reap, record, close its socket."""
        assert self.agent is not None and self.agent_proc is not None
        deadline = time.monotonic() + 1.0
        if self.host is not None:
            with contextlib.suppress(OSError):
                while time.monotonic() < deadline and select.select([self.agent], [], [], 0.2)[0]:
                    data = self.agent.recv(1 << 16)
                    if not data:
                        break
                    self.to_host += data
                self.host.setblocking(True)
                self.host.settimeout(max(0.05, deadline - time.monotonic()))
                self.host.sendall(self.to_host)
        try:
            self.agent_proc.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            _signal(self.agent_proc.pid, signal.SIGKILL, pgroup=True)
            self.agent_proc.wait()
        self.agent.close()
        assert self.listener is not None
        self.listener.close()
        unlink_socket(self.spec["host_socket"], self.host_ino)
        with self.store.locked():
            rec = self.store.load(self.spec["name"])
            if rec is not None and rec.get("relay_pid") == os.getpid():
                rec["last_exit"] = self.agent_proc.returncode
                self.store.powered_off(rec)
        self._drop_host()


def relay_main(spec_json: str) -> None:
    """Fork the relay off (so it belongs to nobody's process tree) and let the launcher exit."""
    if os.fork():
        os._exit(0)
    code = 0
    relay = Relay(json.loads(spec_json))
    try:
        if relay.boot():
            relay.splice()
            relay.finish()
    except BaseException:  # noqa: BLE001 - report, then never return into anything
        traceback.print_exc()
        code = 1
        with contextlib.suppress(OSError):
            relay.fail(f"the fake's relay crashed: {traceback.format_exc(limit=3)}")
    finally:
        os._exit(code)


# ---------------------------------------------------------------- hypervisor
class _BootError(Exception):
    pass


def parse_domain(xml: str, what: str = "libvirt refused the domain") -> dict[str, Any]:
    """What the fake needs of a domain XML: name, uuid, agent channel socket, serial log, NIC."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise HypervisorError(f"{what}: XML error: {exc}") from None
    name = (root.findtext("name") or "").strip()
    if root.tag != "domain" or not name or "/" in name or name.startswith("."):
        raise HypervisorError(f"{what}: XML error: a domain needs a <name> (a plain file name here)")
    channel = None
    for ch in root.iterfind("devices/channel"):
        source, target = ch.find("source"), ch.find("target")
        if (ch.get("type") == "unix" and source is not None and source.get("mode") == "bind"
                and target is not None and target.get("name") == AGENT_PORT):
            channel = source.get("path")
    console = None
    for serial in root.iterfind("devices/serial"):
        source = serial.find("source")
        if serial.get("type") == "file" and source is not None:
            console = source.get("path")
    return {"name": name, "uuid": (root.findtext("uuid") or "").strip() or None, "channel": channel,
            "console": console, "network": root.find("devices/interface[@type='user']") is not None}


class FakeHypervisor:
    """Drop-in for kvmc.hypervisor.Hypervisor (same public methods and signatures)."""

    def __init__(self, root: Path, rootfs: Path, agent_bin: Path) -> None:
        self.root = Path(root)
        self.rootfs = Path(rootfs)
        self.agent_bin = Path(agent_bin)
        self.uri = f"fake://{self.root}"
        self.store = Store(self.root)
        self.store.ensure()

    def factory(self) -> Any:
        """``f(anything) -> FakeHypervisor`` on this fake's state: a HostContext's
        ``hypervisor_factory`` (given a Config), or a stand-in for the Hypervisor class (given a
        URI). Every instance, the forked monitor's too, sees the same domains."""
        return lambda _config_or_uri: FakeHypervisor(self.root, self.rootfs, self.agent_bin)

    def connect(self) -> None:
        """Nothing to open: the fake's state is files."""

    # ------------------------------------------------------------ internals
    def _require(self, name: str) -> dict[str, Any]:
        rec = self.store.load(name)
        if rec is None:
            raise HypervisorError(f"libvirt has no domain {name}")
        return rec

    def _new(self, info: dict[str, Any], xml: str, persistent: bool) -> dict[str, Any]:
        for other in self.store.names():
            rec = self.store.load(other)
            if rec is not None and info["uuid"] and rec["uuid"] == info["uuid"] and other != info["name"]:
                raise _BootError(f"operation failed: domain '{other}' is already defined with uuid {rec['uuid']}")
        return {"name": info["name"], "uuid": info["uuid"] or str(uuid_mod.uuid4()), "xml": xml if persistent else None,
                "live_xml": None, "state": "shutoff", "persistent": persistent, "relay_pid": None, "hmp": [],
                "qmp": [], "boots": 0}

    def _boot(self, rec: dict[str, Any], xml: str, paused: bool, restored: bool = False) -> None:
        """Start the VM of ``rec`` from ``xml`` (lock held); _BootError if it cannot. A restored
        one's relay mutes its first host when MUTE_FIRST_HOST_ENV is 1 in the caller's environment."""
        info = parse_domain(xml)
        rundir = self.store.rundir(rec["name"])
        shutil.rmtree(rundir, ignore_errors=True)
        rundir.mkdir(parents=True)
        rec.update(live_xml=xml, hmp=[], qmp=[], boots=rec.get("boots", 0) + 1, host_socket=info["channel"])
        if info["channel"] is None:  # nothing to run: a VM that runs until destroyed
            rec.update(state="paused" if paused else "running", relay_pid=None, pidns=None)
            self.store.save(rec)
            return
        spec = {"root": str(self.root), "name": rec["name"], "rundir": str(rundir), "host_socket": info["channel"],
                "console": info["console"] or str(rundir / "console.log"), "network": info["network"],
                "rootfs": str(self.rootfs), "agent_bin": str(self.agent_bin),
                "mute_first_host": restored and os.environ.get(MUTE_FIRST_HOST_ENV) == "1"}
        with (rundir / "relay.log").open("ab") as log:
            launcher = subprocess.Popen([sys.executable, str(RELAY_SCRIPT), "relay", json.dumps(spec)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                        start_new_session=True)
        assert launcher.stdout is not None
        try:
            line = b""
            deadline = time.monotonic() + BOOT_TIMEOUT_S + 10
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if select.select([launcher.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    chunk = os.read(launcher.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    line += chunk
        finally:
            launcher.stdout.close()
            launcher.wait()
        try:
            reply = json.loads(line)
        except ValueError:
            raise _BootError(f"the fake's relay did not report (see {rundir / 'relay.log'})") from None
        if "error" in reply:
            raise _BootError(reply["error"])
        rec.update(reply, state="running")
        if paused:
            self._freeze(rec)
            rec["state"] = "paused"
        self.store.save(rec)

    def _freeze(self, rec: dict[str, Any]) -> None:
        """SIGSTOP every process of the VM and wait until they are all stopped."""
        stopped: set[int] = set()
        for _ in range(100):
            fresh = set(namespace_pids(rec.get("pidns"))) - stopped
            if not fresh:
                break
            for pid in fresh:
                _signal(pid, signal.SIGSTOP)
            stopped |= fresh
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            states = [_stat(pid) for pid in stopped]
            if all(st is None or st[0] in "TtZX" for st in states):
                return
            time.sleep(0.005)

    def _thaw(self, rec: dict[str, Any]) -> None:
        for pid in namespace_pids(rec.get("pidns")):
            _signal(pid, signal.SIGCONT)

    def _kill(self, rec: dict[str, Any]) -> None:
        """End the VM's processes (lock held; the relay cannot record anything meanwhile)."""
        members = namespace_pids(rec.get("pidns"))
        procs = [(rec.get("relay_pid"), rec.get("relay_start"), False),
                 (rec.get("unshare_pid"), rec.get("unshare_start"), True),
                 (rec.get("agent_pid"), rec.get("agent_start"), False)]
        for pid, started, group in procs:
            if alive(pid, started):
                _signal(pid, signal.SIGKILL, pgroup=group)
        for pid in members:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline:
            if not any(alive(pid, started) for pid, started, _ in procs) and not any(alive(p) for p in members):
                break
            time.sleep(0.005)
        unlink_socket(rec.get("host_socket"), rec.get("host_socket_ino"))
        shutil.rmtree(self.store.rundir(rec["name"]), ignore_errors=True)

    def _heal(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """A domain whose relay died without recording the end (killed): it crashed. Lock held."""
        if rec["state"] != "shutoff" and rec.get("relay_pid") and not alive(rec["relay_pid"], rec.get("relay_start")):
            self._kill(rec)
            rec["last_exit"] = "crashed"
            self.store.powered_off(rec)
            return self.store.load(rec["name"])
        return rec

    # ------------------------------------------------------- the public API
    def define(self, xml: str) -> None:
        info = parse_domain(xml)
        with self.store.locked():
            rec = self.store.load(info["name"])
            if rec is None:
                try:
                    rec = self._new(info, xml, persistent=True)
                except _BootError as exc:
                    raise HypervisorError(f"libvirt refused the domain: {exc}") from None
            elif info["uuid"] and info["uuid"] != rec["uuid"]:
                raise HypervisorError(f"libvirt refused the domain: operation failed: domain '{rec['name']}' "
                                      f"already exists with uuid {rec['uuid']}")
            rec.update(xml=xml, persistent=True)
            self.store.save(rec)

    def start(self, name: str) -> None:
        with self.store.locked():
            rec = self._require(name)
            rec = self._heal(rec) or self._require(name)
            if rec["state"] != "shutoff":
                raise HypervisorError(f"cannot start VM {name}: Requested operation is not valid: "
                                      "domain is already running")
            try:
                self._boot(rec, rec["xml"], paused=False)
            except _BootError as exc:
                raise HypervisorError(f"cannot start VM {name}: {exc}") from None

    def save(self, name: str, path: Path) -> None:
        with self.store.locked():
            rec = self._require(name)
            if rec["state"] == "shutoff":
                raise HypervisorError(f"cannot save VM {name}: {NOT_RUNNING}")
            try:
                Path(path).write_text(json.dumps({"kvmc_fake_save": 1, "name": name, "uuid": rec["uuid"],
                                                  "xml": rec["live_xml"]}))
            except OSError as exc:
                raise HypervisorError(f"cannot save VM {name}: {exc}") from None
            self._kill(rec)
            self.store.powered_off(rec)

    def restore(self, path: Path, xml: str, paused: bool = False) -> None:
        what = f"cannot restore VM from {path}"
        try:
            saved = json.loads(Path(path).read_text())
            saved_name, saved_uuid = saved["name"], saved["uuid"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HypervisorError(f"{what}: {exc}") from None
        xml = xml or saved["xml"]
        info = parse_domain(xml, what)
        if info["name"] != saved_name or (info["uuid"] and info["uuid"] != saved_uuid):
            raise HypervisorError(f"{what}: operation failed: cannot restore domain '{info['name']}' uuid "
                                  f"{info['uuid']} from a file which belongs to domain '{saved_name}' uuid {saved_uuid}")
        info["uuid"] = saved_uuid
        self._create(info, xml, paused, what, restored=True)

    def _create(self, info: dict[str, Any], xml: str, paused: bool, what: str, restored: bool = False) -> None:
        with self.store.locked():
            rec = self.store.load(info["name"])
            rec = rec and self._heal(rec)
            fresh = rec is None
            try:
                if rec is None:
                    rec = self._new(info, xml, persistent=False)
                elif rec["state"] != "shutoff":
                    raise _BootError(f"operation failed: domain '{rec['name']}' is already active")
                elif info["uuid"] and info["uuid"] != rec["uuid"]:
                    raise _BootError(f"operation failed: domain '{rec['name']}' already exists with uuid {rec['uuid']}")
                self._boot(rec, xml, paused, restored)
            except _BootError as exc:
                if fresh:
                    self.store.delete(info["name"])
                elif rec is not None and rec["state"] == "shutoff":
                    rec["live_xml"] = None
                    self.store.save(rec)
                raise HypervisorError(f"{what}: {exc}") from None

    def human_monitor_command(self, name: str, command: str) -> str:
        with self.store.locked():
            rec = self._require(name)
            if rec["state"] == "shutoff":
                raise HypervisorError(f"QEMU of VM {name} refused '{command}': {NOT_RUNNING}")
            rec.setdefault("hmp", []).append(command)
            self.store.save(rec)
        return ""

    def create_transient(self, xml: str, paused: bool = False) -> None:
        self._create(parse_domain(xml, "cannot start VM"), xml, paused, "cannot start VM")

    def resume(self, name: str) -> None:
        with self.store.locked():
            rec = self._require(name)
            if rec["state"] == "shutoff":
                raise HypervisorError(f"cannot resume VM {name}: {NOT_RUNNING}")
            if rec["state"] == "paused":
                self._thaw(rec)
                rec["state"] = "running"
                rec.pop("pause_reason", None)
                self.store.save(rec)

    def pause(self, name: str, reason: str = "user") -> None:
        """libvirt's suspend (reason ``user``); tests pass ``ioerror`` for what QEMU does on
        a disk write that finds no space (werror=enospc)."""
        with self.store.locked():
            rec = self._require(name)
            if rec["state"] == "shutoff":
                raise HypervisorError(f"cannot pause VM {name}: {NOT_RUNNING}")
            if rec["state"] == "running":
                self._freeze(rec)
                rec["state"] = "paused"
                rec["pause_reason"] = reason
                self.store.save(rec)

    def state_reason(self, name: str) -> tuple[str | None, str | None]:
        state = self.state(name)
        rec = self.store.load(name) if state == "paused" else None
        return state, (rec or {}).get("pause_reason", "user") if state == "paused" else None

    def forget(self, name: str) -> None:
        with self.store.locked():
            rec = self.store.load(name)
            if rec is None:
                return
            if rec["state"] == "shutoff":
                self.store.delete(name)
            else:
                rec.update(persistent=False, xml=None)
                self.store.save(rec)

    def qmp(self, name: str, command: dict[str, Any], fds: tuple[int, ...] = ()) -> Any:
        with self.store.locked():
            rec = self._require(name)
            rec.setdefault("qmp", []).append(command)
            self.store.save(rec)
        raise HypervisorError(f"QEMU of VM {name} refused {command.get('execute')}: the fake hypervisor has no QMP")

    def qmp_with_fd(self, name: str, command: dict[str, Any], fd: int) -> Any:
        return self.qmp(name, command, (fd,))

    def state(self, name: str) -> str | None:
        rec = self.store.load(name)
        if rec is None:
            return None
        if rec["state"] != "shutoff" and rec.get("relay_pid") and not alive(rec["relay_pid"], rec.get("relay_start")):
            with self.store.locked():
                rec = self.store.load(name)
                rec = rec and self._heal(rec)
        return rec["state"] if rec else None

    def wait_stopped(self, name: str, timeout: float, poll: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(name) in (None, "shutoff", "crashed"):
                return True
            time.sleep(poll)
        return False

    def destroy(self, name: str) -> None:
        with self.store.locked():
            rec = self.store.load(name)
            if rec is None or rec["state"] == "shutoff":
                return
            self._kill(rec)
            rec["last_exit"] = "destroyed"
            self.store.powered_off(rec)

    def undefine(self, name: str) -> None:
        self.destroy(name)
        self.forget(name)

    def pss_kib(self, name: str) -> int | None:
        """No QEMU process behind a fake domain: nothing measured."""
        return None

    def stats(self, name: str) -> dict[str, int]:
        """As libvirt's dom.info(): CPU time and resident memory of the VM's processes (0 when
        shut off), the guest's memory size and vCPUs from its definition."""
        import xml.etree.ElementTree as ET

        rec = self._require(name)
        running = rec["state"] != "shutoff"
        root = ET.fromstring(rec["live_xml"] if running and rec.get("live_xml") else rec["xml"])
        memory = root.find("memory")
        scale = {"KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1 << 20, "G": 1 << 20}
        memory_kib = int(memory.text or 0) * scale.get(memory.get("unit", "KiB"), 1) if memory is not None else 0
        cpu_ticks = rss_kib = 0
        for pid in namespace_pids(rec.get("pidns")) if running else []:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu_ticks += int(fields[11]) + int(fields[12])  # utime, stime
                rss_kib += int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
        return {"cpu_ns": cpu_ticks * 10**9 // os.sysconf("SC_CLK_TCK"), "memory_kib": memory_kib,
                "rss_kib": rss_kib, "vcpus": int(root.findtext("vcpu") or 1),
                "block_read_bytes": 0, "block_write_bytes": 0}  # no disk is read: the rootfs is a directory

    def metadata(self, name: str, namespace: str) -> str | None:
        from xml.dom import minidom

        rec = self.store.load(name)
        if rec is None:
            return None
        xml = rec["live_xml"] if rec["state"] != "shutoff" and rec.get("live_xml") else rec["xml"]
        if not xml:
            return None
        for meta in minidom.parseString(xml).getElementsByTagName("metadata"):
            for node in meta.childNodes:
                if node.nodeType == node.ELEMENT_NODE and node.namespaceURI == namespace:
                    return node.toxml()
        return None

    def domain_names(self, prefix: str) -> list[str]:
        return [n for n in self.store.names() if n.startswith(prefix)]

    # ------------------------------------------------------- for the tests
    def record(self, name: str) -> dict[str, Any] | None:
        """The domain's JSON (hmp commands, pids, boots, last_exit ...), or None."""
        return self.store.load(name)

    def processes(self, name: str | None = None) -> list[int]:
        """Live host pids of a running domain (all if ``name`` is None): relay, unshare, VM."""
        pids: list[int] = []
        for n in [name] if name else self.store.names():
            rec = self.store.load(n)
            if rec is None or rec["state"] == "shutoff":
                continue
            for key in ("relay", "unshare", "agent"):
                if alive(rec.get(f"{key}_pid"), rec.get(f"{key}_start")):
                    pids.append(rec[f"{key}_pid"])
            pids += namespace_pids(rec.get("pidns"))
        return sorted(set(pids))

    def close(self) -> None:
        """Destroy every running domain (definitions stay, as files under root)."""
        for name in self.store.names():
            self.destroy(name)
        shutil.rmtree(self.store.run, ignore_errors=True)
        self.store.run.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "relay":
        sys.exit("usage: hypervisor.py relay SPEC_JSON")
    relay_main(sys.argv[2])

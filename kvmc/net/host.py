"""A kvmc network on the host: a network namespace with a bridge and a DNS server, and taps.

Why this shape (measured in docs/platform.md, "Container networks"): each kvmc network in use
is a network namespace of its own, ``kvmc-<id12>``, holding a bridge ``br0`` with the
network's gateway address and a dnsmasq that listens on that address only and serves the
names of the network's running containers from a hosts file. Each VM on the network has one
more virtio-net NIC backed by a tap device that kvmc creates (persistent, never up) in the
host's namespace, that libvirt hands to QEMU (``<interface type='ethernet'>``,
``managed='no'``), and that kvmc then moves into the namespace and enslaves to the bridge. So
east-west traffic is guest -> tap -> bridge -> tap -> guest inside a namespace kvmc made; no
address, route or listening socket is added to the host's own namespace, and a tap is brought
up only once it is inside. Two networks are two namespaces: nothing connects them.

The namespace exists while a container on the network runs: the first one to start brings it
up, the last one to end takes it down (with its dnsmasq). Every change to a network's
namespace happens under a per-network lock (``<run_dir>/net/<id12>.lock``). Nothing here
decides who is on a network: callers (kvmc/vmlife.py) pass the DNS entries, from the records.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from kvmc.errors import KvmcError
from kvmc.net.plan import BRIDGE, NETNS_PREFIX, TAP_PREFIX, DnsEntry, netns_name, render_hosts, render_local_domains
from kvmc.net.store import Network

NETNS_DIR = Path("/run/netns")
DNSMASQ = "dnsmasq"
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


class NetworkSetupError(KvmcError):
    """The host could not set a network up (ip, dnsmasq, /dev/net/tun)."""


def _ip(*args: str, netns: str | None = None, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkSetupError(f"{' '.join(cmd)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def owner_mark(state_root: str) -> str:
    """What kvmc writes into a tap's alias (ifalias): the state root whose VM made it, so that
    ``kvmc gc`` of one state root never touches another's (tests run several at once)."""
    return f"kvmc {state_root}"


def create_tap(name: str, state_root: str) -> None:
    """A persistent tap ``name`` in this namespace, left down, for libvirt to open (managed='no').

    Persistent: it exists before QEMU opens it and after QEMU closes it, so kvmc deletes it
    (:meth:`NetnsHost.delete_tap`). ``EBUSY``/``EEXIST``: it exists already (a restart).
    Its alias names ``state_root`` (:func:`owner_mark`)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkSetupError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                return
            raise NetworkSetupError(f"cannot create tap {name}: {exc.strerror}") from None
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)
    try:
        Path(f"/sys/class/net/{name}/ifalias").write_text(owner_mark(state_root))
    except OSError as exc:
        raise NetworkSetupError(f"cannot label tap {name}: {exc.strerror}") from None


def tap_owner(name: str) -> str:
    """The alias of a tap in this namespace ("" if it has none or is gone)."""
    try:
        return Path(f"/sys/class/net/{name}/ifalias").read_text().strip()
    except OSError:
        return ""


def host_taps() -> list[str]:
    """kvmc's taps in this (the host's) namespace."""
    try:
        return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(TAP_PREFIX))
    except OSError:
        return []


def kvmc_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(NETNS_PREFIX))
    except OSError:
        return []


class NetnsHost:
    """Bring networks up and down, move taps in, keep each network's DNS hosts file.

    ``state_root``: kvmc's data dir; each network's directory under ``<run_dir>/net`` names it
    (``state-root``), so gc of one state root leaves another's networks alone."""

    def __init__(self, run_dir: Path, state_root: str = "") -> None:
        self.base = run_dir / "net"
        self.state_root = state_root

    def dir(self, network_id: str) -> Path:
        return self.base / network_id[:12]

    @contextmanager
    def locked(self, network_id: str) -> Iterator[None]:
        self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(self.base / f"{network_id[:12]}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def forget_lock(self, network_id: str) -> None:
        """The lock file of a removed network (nothing can lock it any more)."""
        (self.base / f"{network_id[:12]}.lock").unlink(missing_ok=True)

    # ------------------------------------------------------------ namespace
    def is_up(self, network: Network) -> bool:
        return (NETNS_DIR / netns_name(network.id)).exists() and self._dns_pid(network.id) is not None

    def up(self, network: Network) -> None:
        """Namespace, bridge with the gateway address, DNS server: made once (under the lock)."""
        if self.is_up(network):
            return
        self.down(network.id)  # a half-made one (a crash during up): start over
        ns = netns_name(network.id)
        directory = self.dir(network.id)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        (directory / "state-root").write_text(self.state_root)
        try:
            _ip("netns", "add", ns)
            _ip("-batch", "-", netns=ns, stdin="\n".join([
                "link set lo up",
                f"link add {BRIDGE} type bridge",
                f"addr add {network.gateway}/{network.prefix} dev {BRIDGE}",
                f"link set {BRIDGE} up",
            ]) + "\n")
            self._write_hosts(network.id, [])
            self._start_dns(network)
        except BaseException:
            self.down(network.id)
            raise

    def _start_dns(self, network: Network) -> None:
        """dnsmasq in the namespace, on the gateway address only: no upstream, no DHCP.

        It answers the names in its hosts file, and for each of them it is the authority
        (``server=/NAME/`` in its servers file, re-read on SIGHUP with the hosts file): a
        type it has no record of (AAAA) gets "no data", not REFUSED, so no resolver asks
        elsewhere and gets NXDOMAIN (musl fails a whole lookup on an NXDOMAIN for AAAA). An
        unknown name without a dot gets NXDOMAIN (``--domain-needed``: no resolver asks on, as
        no other server could know a container name). Any other name gets REFUSED, so the
        guest's resolver asks its next nameserver, slirp's proxy to the host's resolvers."""
        directory = self.dir(network.id)
        cmd = ["ip", "netns", "exec", netns_name(network.id), DNSMASQ,
               "--conf-file=/dev/null", f"--pid-file={directory / 'dnsmasq.pid'}",
               f"--listen-address={network.gateway}", "--bind-interfaces", "--except-interface=lo",
               "--no-resolv", "--no-hosts", "--no-poll", "--no-negcache", "--local-ttl=0", "--domain-needed",
               f"--addn-hosts={directory / 'hosts'}", f"--servers-file={directory / 'servers'}",
               f"--log-facility={directory / 'dnsmasq.log'}",
               "--user=root", "--group=root"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NetworkSetupError(f"the DNS server of network {network.name} did not start "
                                    f"(is dnsmasq installed? run 'make setup'): {proc.stderr.strip()}")
        for _ in range(100):  # dnsmasq writes its pid file as it daemonizes
            if self._dns_pid(network.id) is not None:
                return
            time.sleep(0.01)
        raise NetworkSetupError(f"the DNS server of network {network.name} wrote no pid file")

    def _dns_pid(self, network_id: str) -> int | None:
        """The network's dnsmasq, if it runs (checked by its command line, not just the pid)."""
        pid_file = self.dir(network_id) / "dnsmasq.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if f"--pid-file={pid_file}".encode() in cmdline else None

    def down(self, network_id: str) -> None:
        """Stop the DNS server, delete the namespace (its bridge and taps go with it), remove
        the files. Idempotent: every step tolerates what is already gone."""
        pid = self._dns_pid(network_id)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        ns = netns_name(network_id)
        if (NETNS_DIR / ns).exists():
            _ip("netns", "del", ns, check=False)
        directory = self.dir(network_id)
        for name in ("hosts", "hosts.tmp", "servers", "servers.tmp", "dnsmasq.pid", "dnsmasq.log", "state-root"):
            (directory / name).unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass

    # ------------------------------------------------------------------ DNS
    def _write_hosts(self, network_id: str, entries: Iterable[DnsEntry]) -> None:
        directory = self.dir(network_id)
        entries = list(entries)
        for name, text in (("hosts", render_hosts(entries)), ("servers", render_local_domains(entries))):
            tmp = directory / f"{name}.tmp"
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, directory / name)

    def set_entries(self, network_id: str, entries: Iterable[DnsEntry]) -> None:
        """Replace the names the network's DNS server answers (it re-reads them on SIGHUP)."""
        if not self.dir(network_id).is_dir():
            return
        self._write_hosts(network_id, entries)
        pid = self._dns_pid(network_id)
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    # ----------------------------------------------------------------- taps
    def plug(self, network: Network, tap: str) -> None:
        """Move ``tap`` (opened by QEMU already) into the network's namespace, enslave it to the
        bridge and bring it up there."""
        ns = netns_name(network.id)
        _ip("link", "set", "dev", tap, "netns", ns)
        _ip("link", "set", "dev", tap, "master", BRIDGE, "up", netns=ns)

    def delete_tap(self, tap: str, network_id: str | None = None) -> None:
        """Delete ``tap`` wherever it is: in the network's namespace or still in the host's."""
        if network_id and (NETNS_DIR / netns_name(network_id)).exists():
            if _ip("link", "del", "dev", tap, netns=netns_name(network_id), check=False).returncode == 0:
                return
        if Path(f"/sys/class/net/{tap}").exists():
            _ip("link", "del", "dev", tap, check=False)

    def nic_counters(self, network_id: str, tap: str) -> dict[str, int]:
        """Traffic of the VM NIC behind ``tap`` as Docker counts a container's interface, from
        the guest's side (``rx_bytes``: what the guest received, which the tap sent); {} if the
        tap is not in the network's namespace.

        Read here, not through libvirt: libvirt's interface statistics look for the tap in the
        host's /proc/net/dev, and kvmc moved it into the network's namespace (:meth:`plug`)."""
        proc = _ip("-j", "-s", "link", "show", "dev", tap, netns=netns_name(network_id), check=False)
        try:
            host_view = json.loads(proc.stdout)[0]["stats64"]
        except (ValueError, LookupError, TypeError):
            return {}
        guest_side = {"rx": host_view.get("tx", {}), "tx": host_view.get("rx", {})}
        return {f"{side}_{field}": int(counters.get(field, 0))
                for side, counters in guest_side.items() for field in ("bytes", "packets", "errors", "dropped")}

    def owned(self, network_id: str) -> bool:
        """The network's namespace was made for this state root."""
        try:
            return (self.dir(network_id) / "state-root").read_text() == self.state_root
        except OSError:
            return False

    def taps_in(self, network_id: str) -> list[tuple[str, str]]:
        """kvmc's taps inside a network's namespace, with their aliases."""
        proc = _ip("-o", "link", "show", netns=netns_name(network_id), check=False)
        taps = []
        for line in proc.stdout.splitlines():
            parts = line.split(":", 2)
            if len(parts) > 2:
                name = parts[1].strip().split("@")[0]
                alias = parts[2].split("alias ", 1)[1].strip() if "alias " in parts[2] else ""
                if name.startswith(TAP_PREFIX):
                    taps.append((name, alias))
        return taps

    def stray_dns_servers(self) -> list[int]:
        """dnsmasq processes kvmc started (their pid file is under ``<run_dir>/net``) whose
        namespace is gone: of no use to any state root (a crash between the two steps of
        :meth:`down`)."""
        strays = []
        marker = f"--pid-file={self.base}/".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":
                continue
            for arg in args:
                if arg.startswith(marker):
                    short = arg[len(marker):].split(b"/")[0].decode(errors="replace")
                    if not (NETNS_DIR / netns_name(short)).exists():
                        strays.append(int(entry.name))
        return strays

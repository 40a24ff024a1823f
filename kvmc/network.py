"""Container networking: the guest's user-mode network and published ports (``-p``).

Why slirp through libvirt (``<interface type='user'>``) and not passt: libvirt 9.0 here refuses
passt's ``<backend type='passt'/>``, so passt would be a process kvmc starts, tracks and kills
outside libvirt and attaches through ``<qemu:commandline>``; and a saved pool member's network
must come back with its restore, which slirp's state (inside QEMU's migration stream) does and
an external passt process does not. The measurement behind the choice is in docs/platform.md.

The guest side is fixed by slirp's defaults: the guest is 10.0.2.15/24, the host is reachable
as the gateway 10.0.2.2, and slirp's DNS proxy at 10.0.2.3 forwards to the host's resolvers.
The agent configures eth0, the route and /etc/resolv.conf from the RUN request (no DHCP:
a static address costs nothing at start, which matters for pooled VMs). Published ports are
slirp host forwards added through QEMU's monitor once the VM runs, so they work the same for a
cold boot and for a restored pool member.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import asdict, dataclass

from kvmc.errors import PortInUse, UsageError  # noqa: F401 (PortInUse re-exported)

NETWORK_MODES = ("user", "none")
GUEST_ADDRESS = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY = "10.0.2.2"
DNS_SERVER = "10.0.2.3"
NETDEV_ID = "hostnet0"
"""libvirt's id for the first interface's netdev (what ``hostfwd_add`` must name)."""

_PUBLISH = re.compile(
    r"^(?:(?:(?P<ip>\[[^\]]*\]|[^:]*):)?(?P<host>\d*):)?(?P<guest>\d+)(?:/(?P<proto>tcp|udp))?$"
)


@dataclass(frozen=True)
class PortMapping:
    """One ``-p``: host ``host_ip:host_port`` forwarded to the guest's ``guest_port``."""

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        """docker ps style: ``127.0.0.1:8080->80/tcp``."""
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.protocol}"

    def hostfwd(self) -> str:
        """The HMP command that makes QEMU's slirp listen on the host port."""
        return f"hostfwd_add {NETDEV_ID} {self.protocol}:{self.host_ip}:{self.host_port}-:{self.guest_port}"

    def to_dict(self) -> dict:
        return asdict(self)


def _port(text: str, what: str, spec: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise UsageError(f'invalid {what} port {value} in "-p {spec}": ports are 1-65535')
    return value


def parse_publish(spec: str) -> PortMapping:
    """Parse docker's ``[HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|udp]``.

    A missing host port means "any free port" (0, chosen by :func:`allocate_ports`); a missing
    host IP means all addresses, as in docker.
    """
    match = _PUBLISH.match(spec.strip())
    if not match:
        raise UsageError(f'invalid -p "{spec}": expected [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|udp]')
    host_ip = (match.group("ip") or "0.0.0.0").strip("[]")
    try:
        if ipaddress.ip_address(host_ip).version != 4:
            raise UsageError(f'invalid -p "{spec}": kvmc publishes on IPv4 addresses only')
    except ValueError:
        raise UsageError(f'invalid -p "{spec}": "{host_ip}" is not an IP address') from None
    host = match.group("host")
    return PortMapping(
        host_ip=host_ip,
        host_port=_port(host, "host", spec) if host else 0,
        guest_port=_port(match.group("guest"), "container", spec),
        protocol=match.group("proto") or "tcp",
    )


def parse_network(mode: str) -> str:
    if mode not in NETWORK_MODES:
        raise UsageError(f'invalid --network "{mode}": kvmc supports {" and ".join(NETWORK_MODES)}')
    return mode


def _probe_socket(mapping: PortMapping) -> socket.socket:
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    # Same as slirp's own listening socket: a port in TIME_WAIT is free, a listener is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((mapping.host_ip, mapping.host_port))
    return sock


def allocate_ports(mappings: list[PortMapping], owner_of: dict[tuple[str, int, str], str]) -> list[PortMapping]:
    """Check every host port is free now and pick free ports for ``HOSTPORT`` 0.

    ``owner_of`` maps (ip, port, proto) of ports published by kvmc's running containers to
    their names, so the error can name the container holding the port. This is the "before
    the VM starts" check; QEMU's own bind when the forward is added closes the remaining race.
    """
    seen: set[tuple[str, int, str]] = set()
    result = []
    for mapping in mappings:
        for ip in {mapping.host_ip, "0.0.0.0"} if mapping.host_port else ():
            holder = owner_of.get((ip, mapping.host_port, mapping.protocol))
            if holder:
                raise PortInUse(f"cannot publish {mapping.host_ip}:{mapping.host_port}/{mapping.protocol}: "
                                f"port is already allocated by container {holder}")
        try:
            sock = _probe_socket(mapping)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"cannot publish {mapping.host_ip}:{mapping.host_port}/{mapping.protocol}: "
                                "the port is already in use on the host") from None
            raise UsageError(f"cannot publish on {mapping.host_ip}:{mapping.host_port}: {exc.strerror}") from None
        with sock:
            chosen = PortMapping(mapping.host_ip, sock.getsockname()[1], mapping.guest_port, mapping.protocol)
        key = (chosen.host_ip, chosen.host_port, chosen.protocol)
        if key in seen:
            raise UsageError(f"host port {chosen.host_ip}:{chosen.host_port}/{chosen.protocol} is published twice")
        seen.add(key)
        result.append(chosen)
    return result


def guest_net_config() -> str:
    """The agent's ``net=`` item for slirp's fixed guest address."""
    return f"{GUEST_ADDRESS}/{GUEST_PREFIX},{GATEWAY}"


def format_ports(ports: list[PortMapping]) -> str:
    return ", ".join(str(p) for p in ports)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1: this host only (who may reach
    kvmc serve over TCP; which registries docker reaches over plain HTTP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

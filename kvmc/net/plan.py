"""The pure rules of kvmc networks: subnets, addresses, MACs, device names, the DNS hosts file.

Nothing here touches the host; kvmc/net/host.py carries these out and the unit tests check
them alone. Every figure follows docker where docker has one (its default subnets, its MAC
scheme, what a container answers to in DNS).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from kvmc.errors import Conflict, UsageError

SLIRP_SUBNET = ipaddress.ip_network("10.0.2.0/24")
"""Every container's user-mode NIC (eth0) lives here: a network subnet must not overlap it."""


def _default_subnets() -> Iterable[ipaddress.IPv4Network]:
    # docker's default address pools: 172.17.0.0/16 is its default bridge, then 172.18-31/16,
    # then 192.168.0.0/16 in /20s. kvmc's default network is slirp, so it starts at 172.18.
    for second in range(18, 32):
        yield ipaddress.ip_network(f"172.{second}.0.0/16")
    for third in range(0, 256, 16):
        yield ipaddress.ip_network(f"192.168.{third}.0/20")


NETNS_PREFIX = "kvmc-"
"""Network namespaces kvmc creates: ``kvmc-<network id 12>`` (one per network in use)."""
TAP_PREFIX = "kvt"
"""Tap devices kvmc creates: ``kvt<owner id 11><index>`` (15 characters, the kernel's limit)."""
BRIDGE = "br0"
"""The bridge inside a network's namespace (its own namespace: the name never clashes)."""
DEFINED_MAC_BASE = 0x525400123457
"""NIC n (1, 2, ...) of a VM on kvmc networks is defined with MAC 52:54:00:12:34:57 + n - 1
(the user-mode NIC has ...:56): fixed, because a pool member's save restores only into NICs
with the MACs it was saved with; the agent gives the NIC the container's own MAC."""
MAX_NETWORKS_PER_CONTAINER = 8


def netns_name(network_id: str) -> str:
    return f"{NETNS_PREFIX}{network_id[:12]}"


def tap_name(owner_id: str, index: int) -> str:
    """The host tap of NIC ``index`` (0-based among kvmc networks) of a VM ``owner_id`` made."""
    if not 0 <= index < 10:
        raise ValueError(f"tap index {index} out of range")
    return f"{TAP_PREFIX}{owner_id[:11]}{index}"


def defined_mac(index: int) -> str:
    """The MAC NIC ``index`` (0-based among kvmc networks) is defined with in the domain."""
    value = DEFINED_MAC_BASE + index
    return ":".join(f"{(value >> shift) & 0xFF:02x}" for shift in range(40, -1, -8))


def guest_ifname(index: int) -> str:
    """The guest's name for that NIC: eth0 is the user-mode NIC, networks follow."""
    return f"eth{index + 1}"


def mac_for(address: str) -> str:
    """docker's scheme: 02:42 then the IPv4 address, so a MAC is unique on its network."""
    packed = ipaddress.IPv4Address(address).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in packed)


def pick_subnet(used: Iterable[str], requested: str | None = None, gateway: str | None = None) -> tuple[str, str]:
    """(subnet, gateway) for a new network: ``requested`` if given and free, else the first of
    docker's default pools that overlaps neither another kvmc network nor the user-mode NIC's."""
    taken = [ipaddress.ip_network(u) for u in used]
    if requested:
        try:
            subnet = ipaddress.ip_network(requested, strict=False)
        except ValueError:
            raise UsageError(f'invalid subnet "{requested}"') from None
        if subnet.version != 4:
            raise UsageError(f"subnet {requested}: kvmc networks are IPv4 only")
        if subnet.prefixlen > 29:
            raise UsageError(f"subnet {requested} is too small: use a /29 or larger")
        if subnet.overlaps(SLIRP_SUBNET):
            raise UsageError(f"subnet {subnet} overlaps {SLIRP_SUBNET}, the containers' user-mode network")
        clash = next((t for t in taken if t.overlaps(subnet)), None)
        if clash is not None:
            raise Conflict(f"subnet {subnet} overlaps {clash}, the subnet of another kvmc network")
    else:
        subnet = next((s for s in _default_subnets() if not any(s.overlaps(t) for t in taken)), None)
        if subnet is None:
            raise Conflict("no free subnet left in docker's default pools: remove a network or give --subnet")
    if gateway:
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError:
            raise UsageError(f'invalid gateway "{gateway}"') from None
        if gw not in subnet or gw in (subnet.network_address, subnet.broadcast_address):
            raise UsageError(f"gateway {gateway} is not a host address of subnet {subnet}")
    else:
        gw = subnet.network_address + 1
    return str(subnet), str(gw)


def pick_address(subnet: str, gateway: str, used: Iterable[str]) -> str:
    """The lowest host address of ``subnet`` that is neither the gateway nor ``used``."""
    net = ipaddress.ip_network(subnet)
    taken = {ipaddress.ip_address(gateway), *(ipaddress.ip_address(u) for u in used if u)}
    for host in net.hosts():
        if host not in taken:
            return str(host)
    raise Conflict(f"no free address left in subnet {subnet}")


def prefix_of(subnet: str) -> int:
    return ipaddress.ip_network(subnet).prefixlen


@dataclass(frozen=True)
class DnsEntry:
    """One running container on a network: its address and every name it answers to."""

    address: str
    names: tuple[str, ...]


def dns_names(name: str, container_id: str, aliases: Iterable[str] = ()) -> tuple[str, ...]:
    """What a container answers to on a network, as on docker's: its name, its short id and
    its aliases on that network (compose gives the service name as one)."""
    names: list[str] = []
    for candidate in (name, container_id[:12], *aliases):
        if candidate and candidate not in names:
            names.append(candidate)
    return tuple(names)


def valid_dns_name(name: str) -> bool:
    """A name dnsmasq serves from a hosts file: labels of letters, digits, '-' and '_'."""
    labels = name.split(".")
    return bool(name) and len(name) <= 253 and all(
        label and len(label) <= 63 and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
        for label in labels)


def render_hosts(entries: Iterable[DnsEntry]) -> str:
    """The network's DNS server's hosts file: one line per container, names it can serve.

    A name two containers claim (an alias shared by replicas) is listed for each: the server
    then answers with every address, as docker's DNS answers a shared alias."""
    lines = []
    for entry in sorted(entries, key=lambda e: ipaddress.ip_address(e.address)):
        names = [n for n in entry.names if valid_dns_name(n)]
        if names:
            lines.append(f"{entry.address} {' '.join(names)}")
    return "".join(f"{line}\n" for line in lines)


def render_local_domains(entries: Iterable[DnsEntry]) -> str:
    """The DNS server's servers file: the names it answers with authority (``server=/NAME/``
    with no address: never "ask elsewhere"), so that a query for a type it has no record of
    (AAAA) gets "no data" rather than REFUSED: each name it serves."""
    names = sorted({n for e in entries for n in e.names if valid_dns_name(n)})
    return "".join(f"server=/{name}/\n" for name in names)


@dataclass
class Endpoint:
    """A container's attachment to a kvmc network, as its record keeps it.

    ``network_id``, ``network`` and ``aliases`` are what was asked for (create, connect);
    ``address``, ``mac`` and ``tap`` are filled while the container runs (docker, too, gives
    an address at start and takes it back at stop) and cleared when it ends."""

    network_id: str
    network: str
    aliases: list[str] = field(default_factory=list)
    address: str = ""
    prefix: int = 0
    gateway: str = ""
    mac: str = ""
    tap: str = ""
    """The host tap of this NIC while the VM runs (named after the VM that made it: a claimed
    pool member's taps keep the member's names)."""

    @classmethod
    def from_dict(cls, data: dict) -> Endpoint:
        return cls(**{k: v for k, v in data.items() if k in _ENDPOINT_FIELDS})


_ENDPOINT_FIELDS = {"network_id", "network", "aliases", "address", "prefix", "gateway", "mac", "tap"}

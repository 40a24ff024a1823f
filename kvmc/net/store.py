"""The network registry: named networks with their labels, subnet and gateway.

Files under ``<data_dir>/networks``, one JSON each, written atomically; creation holds a
lock so that two concurrent ``network create`` never get the same subnet. docker's three
predefined networks are listed too: ``bridge`` (kvmc's default: the container's own user-mode
network), ``none`` and ``host`` (refused for VMs).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from kvmc.errors import Conflict, NotFound, UsageError
from kvmc.names import valid_name
from kvmc.net.plan import pick_subnet, prefix_of

BUILTIN = {"bridge": "bridge", "host": "host", "none": "null"}
"""docker's predefined networks and their drivers; kvmc maps bridge to its user network."""


def now_iso() -> str:
    from kvmc.state import now_iso as _now

    return _now()


@dataclass
class Network:
    id: str
    name: str
    driver: str = "bridge"
    labels: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=now_iso)
    internal: bool = False
    attachable: bool = False
    options: dict[str, str] = field(default_factory=dict)
    builtin: bool = False
    subnet: str = ""
    """IPv4 subnet inside the network's namespace (kvmc/net/host.py); "" for the predefined."""
    gateway: str = ""
    """The namespace's own address on the bridge: where the network's DNS server listens."""

    @property
    def prefix(self) -> int:
        return prefix_of(self.subnet)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @classmethod
    def from_dict(cls, data: dict) -> Network:
        return cls(**{k: v for k, v in data.items() if k in _NETWORK_FIELDS})


_NETWORK_FIELDS = {f.name for f in fields(Network)}


def _builtin(name: str) -> Network:
    return Network(id=hashlib.sha256(f"kvmc-network-{name}".encode()).hexdigest(), name=name, driver=BUILTIN[name],
                   builtin=True, created="1970-01-01T00:00:00Z")


class NetworkStore:
    """Create, list, get and remove network records."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, network_id: str) -> Path:
        return self.root / f"{network_id}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def list(self) -> list[Network]:
        found = [_builtin(name) for name in BUILTIN]
        if self.root.is_dir():
            for path in sorted(self.root.glob("*.json")):
                try:
                    found.append(Network.from_dict(json.loads(path.read_text())))
                except (OSError, ValueError, TypeError):
                    continue
        return found

    def get(self, ref: str) -> Network:
        """By name, full id or id prefix."""
        networks = self.list()
        for network in networks:
            if ref in (network.name, network.id):
                return network
        matches = [n for n in networks if ref and n.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"network {ref} not found")

    def find(self, network_id: str) -> Network | None:
        """The network with exactly this id, if it still exists."""
        try:
            network = Network.from_dict(json.loads(self._path(network_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return network

    def _write(self, network: Network) -> None:
        tmp = self.root / f".{network.id}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(asdict(network)))
            os.replace(tmp, self._path(network.id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create(self, name: str, driver: str | None = None, labels: dict[str, str] | None = None,
               internal: bool = False, attachable: bool = False, options: dict[str, str] | None = None,
               subnet: str | None = None, gateway: str | None = None) -> Network:
        if not valid_name(name):
            raise UsageError(f'invalid network name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed')
        if driver not in (None, "", "bridge"):
            raise UsageError(f'network driver "{driver}" is not supported by kvmc (only bridge)')
        with self._locked():
            existing = self.list()
            if any(n.name == name for n in existing):
                raise Conflict(f"network with name {name} already exists")
            chosen, gw = pick_subnet([n.subnet for n in existing if n.subnet], subnet, gateway)
            network = Network(id=secrets.token_hex(32), name=name, labels=dict(labels or {}), internal=internal,
                              attachable=attachable, options=dict(options or {}), subnet=chosen, gateway=gw)
            self._write(network)
        return network

    def remove(self, network: Network) -> None:
        if network.builtin:
            raise Conflict(f"{network.name} is a pre-defined network and cannot be removed")
        self._path(network.id).unlink(missing_ok=True)

    def with_subnet(self, network: Network) -> Network:
        """``network`` with a subnet: one registered before networks carried traffic gets one
        now (kept from then on)."""
        if network.subnet or network.builtin:
            return network
        with self._locked():
            current = self.find(network.id)
            if current is None:
                raise NotFound(f"network {network.name} not found")
            if not current.subnet:
                current.subnet, current.gateway = pick_subnet([n.subnet for n in self.list() if n.subnet])
                self._write(current)
            return current

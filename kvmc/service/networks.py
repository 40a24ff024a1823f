"""Networks as docker's clients see them: named objects with labels, and docker's defaults.

What exists today (issue 14 builds the rest): a registry of networks, so compose and the
docker CLI can create, list, inspect and remove them, and containers can name one in
``--network``/``NetworkMode``. A container on any network gets kvmc's user-mode network (NAT
to the host, ``-p`` publishing); containers on the same network do NOT reach each other yet.
The registry is files under ``<data_dir>/networks``, one JSON each, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmc.errors import Conflict, NotFound, UsageError
from kvmc.names import valid_name
from kvmc.state import now_iso

BUILTIN = {"bridge": "bridge", "host": "host", "none": "null"}
"""docker's predefined networks and their drivers; kvmc maps bridge to its user network."""


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


def _builtin(name: str) -> Network:
    return Network(id=hashlib.sha256(f"kvmc-network-{name}".encode()).hexdigest(), name=name, driver=BUILTIN[name], builtin=True,
                   created="1970-01-01T00:00:00Z")


class NetworkService:
    """Create, list, get and remove networks."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, network_id: str) -> Path:
        return self.root / f"{network_id}.json"

    def list(self) -> list[Network]:
        found = [_builtin(name) for name in BUILTIN]
        if self.root.is_dir():
            for path in sorted(self.root.glob("*.json")):
                try:
                    found.append(Network(**json.loads(path.read_text())))
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

    def create(self, name: str, driver: str | None = None, labels: dict[str, str] | None = None,
               internal: bool = False, attachable: bool = False, options: dict[str, str] | None = None,
               check_duplicate: bool = True) -> Network:
        if not valid_name(name):
            raise UsageError(f'invalid network name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed')
        if driver not in (None, "", "bridge"):
            raise UsageError(f'network driver "{driver}" is not supported by kvmc (only bridge)')
        if any(n.name == name for n in self.list()):
            raise Conflict(f"network with name {name} already exists")
        network = Network(id=secrets.token_hex(32), name=name, labels=dict(labels or {}), internal=internal,
                          attachable=attachable, options=dict(options or {}))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._path(network.id).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(asdict(network)))
            os.replace(tmp, self._path(network.id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return network

    def remove(self, ref: str) -> Network:
        network = self.get(ref)
        if network.builtin:
            raise Conflict(f"{network.name} is a pre-defined network and cannot be removed")
        self._path(network.id).unlink(missing_ok=True)
        return network

    def prune(self) -> list[str]:
        removed = []
        for network in self.list():
            if not network.builtin:
                self._path(network.id).unlink(missing_ok=True)
                removed.append(network.name)
        return removed

    def mode_for(self, ref: str) -> str:
        """kvmc's network mode for a container that asks for network ``ref`` (docker's name)."""
        if ref in ("", "default", "bridge"):
            return "user"
        if ref == "none":
            return "none"
        if ref == "host":
            raise UsageError('kvmc containers are VMs: "--network host" (sharing the host network stack) '
                             "is not possible; publish ports with -p instead")
        if ref.startswith("container:"):
            raise UsageError("kvmc containers are VMs: they cannot share another container's network stack")
        self.get(ref)  # must exist, as in docker
        return "user"

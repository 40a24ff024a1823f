"""Networks as docker's clients see them, with the rules that involve containers.

A kvmc network is docker's user-defined bridge network: containers on it reach each other at
L3 by name, alias and short id (a DNS server per network), and nothing else reaches them
there. The registry is kvmc/net/store.py, the host side kvmc/net/host.py, joining and leaving
as VMs start and end kvmc/vmlife.py. Here: who is attached, refusing to remove a network
containers are attached to (naming them), connect and disconnect, prune, and the leftovers of
a crash for ``kvmc gc``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmc.errors import Conflict, ContainerRunning, NotFound, UsageError
from kvmc.net.host import host_taps, kvmc_namespaces, owner_mark, tap_owner
from kvmc.net.plan import MAX_NETWORKS_PER_CONTAINER, NETNS_PREFIX, Endpoint, tap_name, valid_dns_name
from kvmc.net.store import BUILTIN, Network
from kvmc.state import ContainerRecord
from kvmc.space import disk_full_errors

if TYPE_CHECKING:
    from kvmc.runtime import Runtime

__all__ = ["BUILTIN", "Network", "NetworkService", "NetworkView"]


@dataclass
class NetworkView:
    """A network with what the registry does not know by itself: the containers on it."""

    network: Network
    containers: list[tuple[ContainerRecord, Endpoint]] = field(default_factory=list)
    """Every container attached (running or not), with its endpoint (an address while it runs)."""
    up: bool = False
    """Its namespace and DNS server exist (a container on it runs)."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self.network), "up": self.up, "containers": [
            {"id": r.id, "name": r.name, "state": str(r.state), "address": ep.address, "mac": ep.mac,
             "aliases": ep.aliases} for r, ep in self.containers]}


@disk_full_errors(lambda self: self.engine.config.data_dir)
class NetworkService:
    """Create, list, inspect, connect, disconnect, remove and prune networks."""

    def __init__(self, engine: Runtime) -> None:
        self.engine = engine
        self.store = engine.host.networks
        self.netns = engine.life.netns

    # ----------------------------------------------------------------- reads
    def _attached(self, network: Network) -> list[tuple[ContainerRecord, Endpoint]]:
        found = []
        for record in self.engine.state.list():
            for endpoint in record.networks:
                if endpoint.network_id == network.id:
                    found.append((self.engine.observe(record), endpoint))
        return found

    def _view(self, network: Network) -> NetworkView:
        if network.builtin:
            return NetworkView(network)
        return NetworkView(network, self._attached(network), self.netns.is_up(network))

    def list(self) -> list[Network]:
        return self.store.list()

    def get(self, ref: str) -> Network:
        """By name, full id or id prefix."""
        return self.store.get(ref)

    def inspect(self, ref: str) -> NetworkView:
        return self._view(self.store.get(ref))

    def views(self) -> list[NetworkView]:
        return [self._view(n) for n in self.store.list()]

    # --------------------------------------------------------------- changes
    def create(self, name: str, driver: str | None = None, labels: dict[str, str] | None = None,
               internal: bool = False, attachable: bool = False, options: dict[str, str] | None = None,
               subnet: str | None = None, gateway: str | None = None) -> Network:
        """A network record with its own subnet; nothing exists on the host until a container
        on it starts."""
        if name in BUILTIN:
            raise Conflict(f"network with name {name} already exists (it is pre-defined)")
        return self.store.create(name, driver, labels, internal, attachable, options, subnet, gateway)

    def remove(self, ref: str) -> Network:
        """Refused while any container (running or not) is attached: their names are given."""
        network = self.store.get(ref)
        if network.builtin:
            raise Conflict(f"{network.name} is a pre-defined network and cannot be removed")
        attached = self._attached(network)
        if attached:
            names = ", ".join(r.name for r, _ in attached)
            raise Conflict(f"error while removing network: network {network.name} id {network.id} has active "
                           f"endpoints (containers {names}): remove them or disconnect them first")
        with self.netns.locked(network.id):
            self.netns.down(network.id)  # nothing runs on it: a leftover of a crash, if anything
            self.store.remove(network)
        self.netns.forget_lock(network.id)
        return network

    def prune(self) -> list[str]:
        """Remove every network no container is attached to; their names."""
        removed = []
        for network in self.store.list():
            if not network.builtin and not self._attached(network):
                try:
                    self.remove(network.id)
                except (Conflict, NotFound):
                    continue
                removed.append(network.name)
        return removed

    def connect(self, ref: str, container: str, aliases: list[str] | None = None) -> tuple[Network, ContainerRecord]:
        """Attach a created or stopped container to a network (one more NIC at its next start).

        A running VM cannot get a NIC: virtio-mmio, microvm's only bus, has no hotplug. docker
        connects running containers; kvmc refuses with a reason instead of pretending."""
        network = self.store.get(ref)
        record = self.engine.state.resolve(container)
        if network.builtin:
            if network.name == "bridge" and record.network == "user":
                return network, record  # every kvmc container has the user-mode network
            raise UsageError(f"container {record.name} cannot be connected to the pre-defined network {network.name}")
        aliases = list(aliases or [])
        bad = [a for a in aliases if not valid_dns_name(a)]
        if bad:
            raise UsageError(f'invalid network alias "{bad[0]}"')
        network = self.store.with_subnet(network)
        with self.engine.state.locked(record.id):
            record = self.engine.observe(self.engine.state.load(record.id) or record)
            if any(ep.network_id == network.id for ep in record.networks):
                raise Conflict(f"container {record.name} is already attached to network {network.name}")
            if record.is_live:
                raise ContainerRunning(f"container {record.name} is running: a kvmc VM cannot get a new network "
                                       "interface while it runs (microvm's virtio-mmio has no hotplug); stop it, "
                                       "connect, then start it")
            if len(record.networks) >= MAX_NETWORKS_PER_CONTAINER:
                raise UsageError(f"a kvmc container can be on at most {MAX_NETWORKS_PER_CONTAINER} networks")
            endpoints = [*record.networks, Endpoint(network_id=network.id, network=network.name, aliases=aliases,
                                                    tap=tap_name(record.id, len(record.networks)))]
            self.engine.redefine(record, networks=endpoints)
        return network, record

    def disconnect(self, ref: str, container: str, force: bool = False) -> tuple[Network, ContainerRecord]:
        """Detach a created or stopped container from a network (its NIC goes at the next start)."""
        network = self.store.get(ref)
        record = self.engine.state.resolve(container)
        with self.engine.state.locked(record.id):
            record = self.engine.observe(self.engine.state.load(record.id) or record)
            if not any(ep.network_id == network.id for ep in record.networks):
                if force:
                    return network, record
                raise Conflict(f"container {record.name} is not connected to network {network.name}")
            if record.is_live:
                raise ContainerRunning(f"container {record.name} is running: a kvmc VM cannot lose a network "
                                       "interface while it runs; stop it first")
            kept = [ep for ep in record.networks if ep.network_id != network.id]
            # NICs are renumbered: their taps are named after their position
            endpoints = [Endpoint(network_id=ep.network_id, network=ep.network, aliases=list(ep.aliases),
                                  tap=tap_name(record.id, i)) for i, ep in enumerate(kept)]
            self.engine.redefine(record, networks=endpoints)
        return network, record

    # --------------------------------------------------------------------- gc
    def leftovers(self, force: bool) -> list[str]:
        """What a crash can leave on the host: this state root's taps of VMs that no longer
        run, its network namespaces with no running container (or of removed networks), and
        DNS servers whose namespace is gone. With ``force``, remove them. Their descriptions.
        Another state root's taps and namespaces are never touched (kvmc.net.host.owner_mark)."""
        found: list[str] = []
        running_taps: set[str] = set()
        running_networks: set[str] = set()
        for record in self.engine.state.list():
            seen = self.engine.observe(record)
            if seen.is_live:
                running_taps.update(ep.tap for ep in record.networks)
                running_networks.update(ep.network_id[:12] for ep in record.networks)
        mark = owner_mark(str(self.engine.config.data_dir))
        for tap in host_taps():
            if tap not in running_taps and tap_owner(tap) == mark:
                found.append(f"tap {tap}")
                if force:
                    self.netns.delete_tap(tap)
        for ns in kvmc_namespaces():
            short = ns[len(NETNS_PREFIX):]
            if not self.netns.owned(short):
                continue
            if short in running_networks:
                for tap, alias in self.netns.taps_in(short):
                    if tap not in running_taps and alias == mark:
                        found.append(f"tap {tap} (in {ns})")
                        if force:
                            self.netns.delete_tap(tap, short)
                continue
            found.append(f"network namespace {ns} and its DNS server")
            if force:
                with self.netns.locked(short):
                    self.netns.down(short)
        for pid in self.netns.stray_dns_servers():
            found.append(f"dnsmasq pid {pid}")
            if force:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        return found

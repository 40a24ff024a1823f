"""kvmc networks' pure rules (kvmc/net/plan.py) and the registry (kvmc/net/store.py): subnet
and address allocation, MACs and device names, the DNS server's hosts and servers files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvmc.errors import Conflict, NotFound, UsageError
from kvmc.net.plan import (DnsEntry, defined_mac, dns_names, guest_ifname, mac_for, pick_address, pick_subnet,
                           render_hosts, render_local_domains, tap_name, valid_dns_name)
from kvmc.net.store import NetworkStore


def test_subnets_follow_dockers_pools_and_skip_taken_ones() -> None:
    assert pick_subnet([]) == ("172.18.0.0/16", "172.18.0.1")
    assert pick_subnet(["172.18.0.0/16"]) == ("172.19.0.0/16", "172.19.0.1")
    # a user's subnet inside 172.20/16 takes that pool out
    assert pick_subnet(["172.18.0.0/16", "172.19.0.0/16", "172.20.5.0/24"]) == ("172.21.0.0/16", "172.21.0.1")
    taken = [f"172.{n}.0.0/16" for n in range(18, 32)]
    assert pick_subnet(taken) == ("192.168.0.0/20", "192.168.0.1")
    assert pick_subnet([*taken, "192.168.0.0/20"]) == ("192.168.16.0/20", "192.168.16.1")
    with pytest.raises(Conflict, match="no free subnet"):
        pick_subnet([*taken, "192.168.0.0/16"])


def test_requested_subnet_and_gateway_are_checked() -> None:
    assert pick_subnet([], "10.89.0.0/24") == ("10.89.0.0/24", "10.89.0.1")
    assert pick_subnet([], "10.89.0.7/24", "10.89.0.254") == ("10.89.0.0/24", "10.89.0.254")
    with pytest.raises(Conflict, match="overlaps 172.18.0.0/16"):
        pick_subnet(["172.18.0.0/16"], "172.18.3.0/24")
    with pytest.raises(UsageError, match="user-mode network"):
        pick_subnet([], "10.0.0.0/16")  # holds slirp's 10.0.2.0/24
    with pytest.raises(UsageError, match="IPv4 only"):
        pick_subnet([], "fd00::/64")
    with pytest.raises(UsageError, match="too small"):
        pick_subnet([], "10.89.0.0/30")
    with pytest.raises(UsageError, match="not a host address"):
        pick_subnet([], "10.89.0.0/24", "10.89.1.1")
    with pytest.raises(UsageError, match="invalid subnet"):
        pick_subnet([], "nonsense")


def test_addresses_skip_the_gateway_and_used_ones() -> None:
    assert pick_address("172.18.0.0/16", "172.18.0.1", []) == "172.18.0.2"
    assert pick_address("172.18.0.0/16", "172.18.0.1", ["172.18.0.2", "172.18.0.4", ""]) == "172.18.0.3"
    assert pick_address("10.89.0.0/24", "10.89.0.254", []) == "10.89.0.1"
    with pytest.raises(Conflict, match="no free address"):
        pick_address("10.89.0.0/29", "10.89.0.1", [f"10.89.0.{n}" for n in range(2, 7)])


def test_macs_and_device_names() -> None:
    assert mac_for("172.18.0.2") == "02:42:ac:12:00:02"  # docker's scheme
    assert defined_mac(0) == "52:54:00:12:34:57"  # right after the user-mode NIC's ...:56
    assert defined_mac(1) == "52:54:00:12:34:58"
    assert guest_ifname(0) == "eth1"
    name = tap_name("0123456789abcdef" * 4, 3)
    assert name == "kvt0123456789a3" and len(name) == 15  # the kernel's IFNAMSIZ - 1
    with pytest.raises(ValueError):
        tap_name("ab" * 32, 10)


def test_dns_names_are_name_short_id_and_aliases_once() -> None:
    cid = "ab12" * 16
    assert dns_names("proj-web-1", cid, ["proj-web-1", "web"]) == ("proj-web-1", "ab12ab12ab12", "web")
    assert valid_dns_name("agile_popek") and valid_dns_name("my.app") and valid_dns_name("a-1")
    assert not valid_dns_name("") and not valid_dns_name("a..b") and not valid_dns_name("sp ace")
    assert not valid_dns_name("x" * 64)


def test_hosts_file_lists_each_running_container_with_its_names() -> None:
    entries = [DnsEntry("172.18.0.10", ("db", "cafe00000001", "database")),
               DnsEntry("172.18.0.2", ("web", "cafe00000002", "www", "bad name")),
               DnsEntry("172.18.0.3", ("web-2", "cafe00000003", "www"))]  # a shared alias: both answer
    assert render_hosts(entries) == ("172.18.0.2 web cafe00000002 www\n"
                                     "172.18.0.3 web-2 cafe00000003 www\n"
                                     "172.18.0.10 db cafe00000001 database\n")
    assert render_hosts([]) == ""
    assert render_local_domains(entries) == "".join(
        f"server=/{n}/\n" for n in sorted({"db", "cafe00000001", "database", "web", "cafe00000002", "www", "web-2",
                                           "cafe00000003"}))


def test_store_creates_networks_with_distinct_subnets(tmp_path: Path) -> None:
    store = NetworkStore(tmp_path / "networks")
    made: list = []
    errors: list = []

    def create(i: int) -> None:
        try:
            made.append(NetworkStore(tmp_path / "networks").create(f"net{i}"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({n.subnet for n in made}) == 6
    assert {n.name for n in store.list()} >= {"bridge", "host", "none", *(f"net{i}" for i in range(6))}
    net = store.get("net3")
    assert store.get(net.id[:8]) == net and store.find(net.id) == net
    assert net.prefix == 16 and net.gateway.endswith(".0.1")
    with pytest.raises(Conflict, match="already exists"):
        store.create("net3")
    with pytest.raises(UsageError, match="not supported"):
        store.create("x", driver="overlay")
    store.remove(net)
    with pytest.raises(NotFound):
        store.get("net3")
    with pytest.raises(Conflict, match="pre-defined"):
        store.remove(store.get("bridge"))


def test_store_gives_a_registry_only_network_a_subnet(tmp_path: Path) -> None:
    """A network registered before networks carried traffic (no subnet in its file) gets one
    on first use, kept from then on."""
    import json

    root = tmp_path / "networks"
    root.mkdir()
    (root / f"{'cd' * 32}.json").write_text(json.dumps({"id": "cd" * 32, "name": "old", "labels": {"a": "b"}}))
    store = NetworkStore(root)
    old = store.get("old")
    assert old.subnet == ""
    given = store.with_subnet(old)
    assert given.subnet == "172.18.0.0/16" and store.get("old").subnet == "172.18.0.0/16"
    assert store.get("old").labels == {"a": "b"}
    assert store.create("new").subnet == "172.19.0.0/16"

"""kvmc host's rules that need no VM: bad input is refused before anything is made, and gc
removes what a crashed create or a lost host left (records, keys, sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmc.config import Config
from kvmc.errors import NotFound, UsageError
from kvmc.service import Services
from kvmc.service.hosts import HostRecord


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return Services.for_config(Config(data_dir=tmp_path / "data", run_dir=tmp_path / "run",
                                      cache_dir=tmp_path / "cache"))


@pytest.mark.parametrize("name,ttl,message", [
    ("bad/name", None, "invalid host name"),
    ("-leading", None, "invalid host name"),
    ("ok", -5.0, "--ttl must be a positive duration"),
])
def test_bad_input_makes_nothing(services: Services, name: str, ttl: float | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        services.hosts.create(name, ttl_s=ttl)
    assert services.hosts.names() == []


def test_unknown_host(services: Services) -> None:
    for call in (services.hosts.remove, services.hosts.get, lambda n: services.hosts.ssh(n, "true")):
        with pytest.raises(NotFound, match="no host named ghost"):
            call("ghost")


def test_ttl() -> None:
    record = HostRecord(name="h", container="kvmc-host-h", cache=None, created=100.0, ttl_s=60.0, socket="/x")
    assert not record.expired(159.0)
    assert record.expired(160.0)
    assert not HostRecord(name="h", container="c", cache=None, created=0.0, ttl_s=None, socket="/x").expired(1e12)


def test_gc_removes_a_crashed_create_and_stray_sockets(services: Services) -> None:
    hosts = services.hosts
    crashed = hosts.root / "crashed"
    crashed.mkdir(parents=True)
    record = HostRecord(name="crashed", container="kvmc-host-crashed", cache=None, created=0.0, ttl_s=None,
                        socket=str(hosts.sockets / "crashed.sock"), ready=False, creator_pid=2**22 + 1)
    (crashed / "host.json").write_text(json.dumps(record.__dict__))
    (crashed / "id_ed25519").write_text("key")
    hosts.sockets.mkdir(parents=True)
    (hosts.sockets / "crashed.sock").touch()
    (hosts.sockets / "stray.sock").touch()
    assert [v.state for v in hosts.list()] == ["failed"]
    removed = hosts.gc()
    assert "host crashed (failed)" in removed
    assert f"socket {hosts.sockets / 'stray.sock'}" in removed
    assert hosts.names() == []
    assert list(hosts.sockets.iterdir()) == []

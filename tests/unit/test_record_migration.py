"""Records written by the previous kvmc (schema 1) are read, typed and rewritten as schema 2.

tests/unit/fixtures/record-v1.json was written by the StateStore of commit 2f176ba (the last
schema-1 kvmc): the record of a container with published ports and volume, bind and tmpfs
mounts, saved with that version's own ``ContainerRecord``/``StateStore.save`` (``process``,
``ports`` and ``mounts`` as plain dicts, no ``schema`` key).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from kvmc.mounts import Mount
from kvmc.network import PortMapping
from kvmc.options import ContainerOptions
from kvmc.state import SCHEMA_VERSION, ContainerProcess, ContainerRecord, State, StateStore, migrate

FIXTURE = Path(__file__).parent / "fixtures" / "record-v1.json"
NEW_KEYS = {"labels": {}, "tty": False, "open_stdin": False, "stdin_once": False, "entrypoint": None, "cmd": None,
            "stop_signal": None, "stop_timeout": None, "networks": [], "console_size": None,
            "log_opts": {}}
"""What schema 2 added (and typed fields added since, with defaults: ``networks``,
``console_size``, ``log_opts``), with the value a migrated record gets (docker's defaults)."""
NEW_KEYS.update({"restart_count": 0, "manually_stopped": False, "health": None, "pool_source": "",
                 "guest_dir": "", "vm_resumed": False})
TYPED_NEW_KEYS = {"options": ContainerOptions()}
"""Typed fields added since (issue 16: restart policy, health check, DNS, ulimits... as one
object), with defaults: a record without them loads with none of those settings."""


@pytest.fixture
def v1() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def store(tmp_path: Path, v1: dict) -> StateStore:
    """A state root holding the schema-1 record as the old kvmc left it."""
    store = StateStore(tmp_path / "containers")
    (store.container_dir(v1["id"])).mkdir(parents=True)
    (store.container_dir(v1["id"]) / "record.json").write_bytes(FIXTURE.read_bytes())
    store.names.mkdir()
    (store.names / v1["name"]).write_text(v1["id"])
    return store


def test_fixture_is_schema_1(v1: dict) -> None:
    assert SCHEMA_VERSION == 2
    assert "schema" not in v1
    assert isinstance(v1["process"], dict) and all(isinstance(p, dict) for p in v1["ports"] + v1["mounts"])
    assert not (set(NEW_KEYS) | set(TYPED_NEW_KEYS)) & set(v1)


def test_load_types_a_schema_1_record(store: StateStore, v1: dict) -> None:
    record = store.load(v1["id"])
    assert record is not None
    assert record.schema == SCHEMA_VERSION
    assert record.state is State.EXITED and record.state == "exited"
    assert record.process == ContainerProcess(
        args=["httpd", "-f", "-p", "80"],
        env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "MODE=prod"],
        cwd="/www", user="1000:1000", hostname=None, stdin=False)
    assert record.ports == [PortMapping("127.0.0.1", 8080, 80, "tcp"), PortMapping("0.0.0.0", 5353, 53, "udp")]
    assert all(isinstance(p, PortMapping) for p in record.ports)
    assert record.mounts == [Mount("volume", "/data", "webdata"), Mount("bind", "/src", "/home/me/src", True),
                             Mount("tmpfs", "/run", "", False, "size=64m,mode=1777")]
    assert all(isinstance(m, Mount) for m in record.mounts)
    assert record.volume_names == ["webdata"]
    assert str(record.ports[0]) == "127.0.0.1:8080->80/tcp"
    assert not record.is_live
    # Everything else as the old kvmc wrote it; schema 2's new fields at docker's defaults.
    for key, value in v1.items():
        if key not in ("process", "ports", "mounts", "state"):
            assert getattr(record, key) == value, key
    for key, value in {**NEW_KEYS, **TYPED_NEW_KEYS}.items():
        assert getattr(record, key) == value, key


def test_reading_does_not_rewrite_the_file(store: StateStore, v1: dict) -> None:
    path = store.container_dir(v1["id"]) / "record.json"
    before = path.stat().st_mtime_ns
    assert store.load(v1["id"]) is not None
    assert [r.id for r in store.list()] == [v1["id"]]
    assert store.resolve(v1["name"]).id == v1["id"]
    assert store.resolve(v1["id"][:6]).id == v1["id"]
    assert path.read_bytes() == FIXTURE.read_bytes() and path.stat().st_mtime_ns == before


def test_round_trip_through_save_writes_schema_2(store: StateStore, v1: dict) -> None:
    record = store.load(v1["id"])
    assert record is not None
    store.save(record)
    written = json.loads((store.container_dir(v1["id"]) / "record.json").read_text())
    assert written["schema"] == 2
    # Nothing of the old record is lost or changed; the new keys are added (a mount's
    # shared_dir, empty, too: only kvmc-dir volumes set it).
    assert all(m.pop("shared_dir") == "" for m in written["mounts"])
    assert {k: v for k, v in written.items() if k != "schema" and k not in {**NEW_KEYS, **TYPED_NEW_KEYS}} == v1
    assert {k: written[k] for k in NEW_KEYS} == NEW_KEYS
    assert {k: written[k] for k in TYPED_NEW_KEYS} == {k: asdict(v) for k, v in TYPED_NEW_KEYS.items()}
    again = store.load(v1["id"])
    assert again == record
    assert asdict(again) == asdict(record)
    # An update of a migrated record keeps it typed and schema 2.
    store.update(again, state=State.RUNNING, monitor_pid=os.getpid(), exit_code=None)
    third = store.load(v1["id"])
    assert third is not None and third.state is State.RUNNING and third.is_live
    assert json.loads((store.container_dir(v1["id"]) / "record.json").read_text())["state"] == "running"
    assert third.ports == record.ports and third.mounts == record.mounts and third.process == record.process


def test_migrate_is_pure(v1: dict) -> None:
    original = copy.deepcopy(v1)
    out = migrate(v1)
    assert v1 == original  # the input is untouched
    assert out is not v1
    assert out["schema"] == 2
    assert {k: v for k, v in out.items() if k != "schema"} == original
    assert migrate(v1) == out  # same input, same output
    assert migrate(out) == out  # idempotent
    current = asdict(ContainerRecord(**{k: v for k, v in out.items()}))
    assert migrate(current) == current  # a schema-2 record is left as it is


def test_migrate_of_an_explicit_schema_1(v1: dict) -> None:
    out = migrate({**v1, "schema": 1})
    assert out["schema"] == 2


def test_minimal_schema_1_record_from_before_networking(tmp_path: Path) -> None:
    """The oldest records: no network, ports, mounts or read_only keys, and process dicts
    with only the keys the agent needed then (plus one kvmc no longer knows)."""
    store = StateStore(tmp_path / "containers")
    cid = "ab" * 32
    old = {"id": cid, "name": "ancient", "image": "busybox:latest", "image_id": "cd" * 32, "domain": f"kvmc-{cid[:16]}",
           "accel": "kvm", "memory_mib": 128, "cpus": 2, "process": {"args": ["sh"], "env": [], "tty": False},
           "state": "created", "created": "2025-01-01T00:00:00.000Z", "obsolete_key": 1}
    store.container_dir(cid).mkdir(parents=True)
    (store.container_dir(cid) / "record.json").write_text(json.dumps(old))
    record = store.load(cid)
    assert record is not None
    assert record.state is State.CREATED and record.network == "none" and record.ports == [] and record.mounts == []
    assert record.process == ContainerProcess(args=["sh"])
    store.save(record)
    written = json.loads((store.container_dir(cid) / "record.json").read_text())
    assert written["schema"] == 2 and "obsolete_key" not in written
    assert store.load(cid) == record


@pytest.mark.parametrize("state", ["created", "starting", "running", "exited"])
def test_every_state_string_is_typed(tmp_path: Path, v1: dict, state: str) -> None:
    store = StateStore(tmp_path / "containers")
    store.container_dir(v1["id"]).mkdir(parents=True)
    (store.container_dir(v1["id"]) / "record.json").write_text(json.dumps({**v1, "state": state}))
    record = store.load(v1["id"])
    assert record is not None and record.state is State(state)
    assert json.loads(json.dumps(asdict(record)))["state"] == state  # still plain JSON


def test_schema_2_record_without_networks_loads_and_gains_typed_endpoints(store: StateStore, v1: dict) -> None:
    """Records written before kvmc networks (schema 2, no ``networks`` key) load with none;
    an endpoint written back is read as the typed class."""
    from kvmc.net.plan import Endpoint

    record = store.load(v1["id"])
    assert record is not None
    store.save(record)
    path = store.container_dir(v1["id"]) / "record.json"
    data = json.loads(path.read_text())
    del data["networks"]
    path.write_text(json.dumps(data))
    loaded = store.load(v1["id"])
    assert loaded is not None and loaded.networks == []
    store.update(loaded, networks=[Endpoint("ab" * 32, "backend", ["db"], "172.18.0.2", 16, "172.18.0.1",
                                            "02:42:ac:12:00:02", "kvtabc0")])
    again = store.load(v1["id"])
    assert again is not None and isinstance(again.networks[0], Endpoint)
    assert again.networks[0].aliases == ["db"] and again.networks[0].address == "172.18.0.2"

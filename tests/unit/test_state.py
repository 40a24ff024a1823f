"""kvmc.state: container records, name reservation, id resolution, all on a tmp directory."""

from __future__ import annotations

import json
import re
import secrets
import threading
from pathlib import Path

import pytest

from kvmc.errors import ContainerNotFound, UsageError
from kvmc.state import ContainerRecord, StateStore


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "containers")


def make_record(container_id: str, name: str, **changes) -> ContainerRecord:
    values = dict(
        id=container_id,
        name=name,
        image="docker.io/library/busybox:latest",
        image_id="sha256:" + "ab" * 32,
        domain="kvmc-" + container_id[:12],
        accel="tcg",
        memory_mib=256,
        cpus=1,
        process={"args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin"], "cwd": "/", "user": None,
                 "hostname": None, "stdin": False},
    )
    values.update(changes)
    return ContainerRecord(**values)


def new_container(store: StateStore, name: str | None = None, **changes) -> ContainerRecord:
    container_id, name, _ = store.allocate(name)
    record = make_record(container_id, name, **changes)
    store.save(record)
    return record


def with_ids(monkeypatch, *ids: str) -> None:
    """Make the next allocations get exactly these ids (secrets.token_hex(32) in kvmc.state)."""
    queue = list(ids)
    real = secrets.token_hex
    # Only the 32-byte container id; the temp-file suffix in _write_atomic stays random.
    monkeypatch.setattr("kvmc.state.secrets.token_hex", lambda n=None: queue.pop(0) if n == 32 else real(n))


# --- allocate ----------------------------------------------------------------------------

def test_allocate_with_name(store):
    container_id, name, directory = store.allocate("web")
    assert name == "web"
    assert re.fullmatch(r"[0-9a-f]{64}", container_id)
    assert directory == store.root / container_id
    assert directory.is_dir()
    assert (store.names / "web").read_text() == container_id


def test_allocate_same_name_twice_names_the_owner(store):
    owner_id, _, _ = store.allocate("web")
    with pytest.raises(UsageError) as excinfo:
        store.allocate("web")
    message = str(excinfo.value)
    assert '"web"' in message
    assert owner_id[:12] in message
    # The failed attempt leaves no stray container directory behind.
    assert sorted(p.name for p in store.root.iterdir()) == sorted(["names", owner_id])


@pytest.mark.parametrize("name", ["-web", "_web", ".web", "we b", "a/b", "../x", "é", "", "x" * 64, "web\n"])
def test_allocate_invalid_name(store, name):
    with pytest.raises(UsageError, match="invalid container name"):
        store.allocate(name)
    assert not store.root.exists() or [p.name for p in store.root.iterdir()] == ["names"]


@pytest.mark.parametrize("name", ["a", "Web-1", "web.example_2", "0", "x" * 63])
def test_allocate_valid_names(store, name):
    assert store.allocate(name)[1] == name


def test_generated_names_are_unique(store):
    allocated = [store.allocate(None) for _ in range(50)]
    names = [name for _, name, _ in allocated]
    ids = [cid for cid, _, _ in allocated]
    assert len(set(names)) == 50
    assert len(set(ids)) == 50
    for name in names:
        assert re.fullmatch(r"[a-z]+_[a-z]+\d*", name), name
    assert sorted(p.name for p in store.names.iterdir()) == sorted(names)


def test_generated_name_skips_a_name_in_use(store, monkeypatch):
    store.allocate("calm_hopper")
    generated = iter(["calm_hopper", "calm_hopper", "swift_wirth"])
    monkeypatch.setattr("kvmc.state.generate_name", lambda: next(generated))
    assert store.allocate(None)[1] == "swift_wirth"


def test_no_container_gets_an_all_digit_short_id(store, monkeypatch):
    """The short id is the default hostname, and glibc does not look an all-digit name up."""
    drawn = iter(["885052174032" + "0" * 52, "88505217403a" + "0" * 52])
    real = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(drawn) if n == 32 else real(n))
    container_id, _name, _directory = store.allocate("digits")
    assert container_id == "88505217403a" + "0" * 52


def test_concurrent_allocation_of_one_name(store):
    barrier = threading.Barrier(8)
    winners: list[str] = []
    losers: list[Exception] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            container_id, _, _ = store.allocate("contested")
        except UsageError as exc:
            with lock:
                losers.append(exc)
        else:
            with lock:
                winners.append(container_id)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(winners) == 1
    assert len(losers) == 7
    assert all("already in use" in str(exc) for exc in losers)
    assert (store.names / "contested").read_text() == winners[0]


# --- save / load -------------------------------------------------------------------------

def test_save_load_round_trip(store):
    record = new_container(
        store, "web",
        state="exited", started_at="2024-01-01T00:00:00.000Z", finished_at="2024-01-01T00:00:01.000Z",
        exit_code=3, error=None, monitor_pid=4242, auto_remove=True, detached=True, boot="snapshot",
        guest_uptime_ms=812,
    )
    loaded = store.load(record.id)
    assert loaded == record
    assert loaded is not record
    assert loaded.short_id == record.id[:12]


def test_record_defaults(store):
    record = new_container(store, "web")
    assert record.state == "created"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record.created)
    assert store.load(record.id).created == record.created


def test_record_file_is_json(store):
    record = new_container(store, "web")
    data = json.loads((store.container_dir(record.id) / "record.json").read_text())
    assert data["id"] == record.id
    assert data["name"] == "web"
    assert data["process"]["args"] == ["sh", "-c", "echo hi"]


def test_load_ignores_unknown_fields(store):
    record = new_container(store, "web")
    path = store.container_dir(record.id) / "record.json"
    data = json.loads(path.read_text())
    data["from_a_future_version"] = 1
    path.write_text(json.dumps(data))
    assert store.load(record.id) == record


def test_load_missing_or_corrupt(store):
    assert store.load("0" * 64) is None
    container_id, _, directory = store.allocate("web")
    assert store.load(container_id) is None  # allocated, no record yet
    (directory / "record.json").write_text("{not json")
    assert store.load(container_id) is None


def test_update(store):
    record = new_container(store, "web")
    returned = store.update(record, state="running", monitor_pid=99)
    assert returned is record
    assert record.state == "running"
    loaded = store.load(record.id)
    assert (loaded.state, loaded.monitor_pid) == ("running", 99)


def test_save_is_atomic_no_temp_files_left(store):
    record = new_container(store, "web")
    for i in range(5):
        store.update(record, exit_code=i)
    assert sorted(p.name for p in store.container_dir(record.id).iterdir()) == ["record.json"]
    assert store.load(record.id).exit_code == 4


def test_save_writes_via_rename(store, monkeypatch):
    record = new_container(store, "web")
    calls: list[tuple[Path, Path]] = []
    import os as real_os
    original = real_os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        return original(src, dst)

    monkeypatch.setattr("kvmc.state.os.replace", spy)
    store.update(record, state="running")
    assert len(calls) == 1
    src, dst = calls[0]
    assert dst == store.container_dir(record.id) / "record.json"
    assert src.parent == dst.parent and src != dst
    assert not src.exists()


def test_list_newest_first_skips_dirs_without_records(store):
    old = new_container(store, "old", created="2024-01-01T00:00:00.000Z")
    new = new_container(store, "new", created="2024-06-01T00:00:00.000Z")
    store.allocate("half-made")  # no record saved
    assert [r.id for r in store.list()] == [new.id, old.id]


def test_list_without_root(tmp_path):
    assert StateStore(tmp_path / "absent").list() == []


# --- resolve -----------------------------------------------------------------------------

ID_A = "abc123" + "1" * 58
ID_B = "abc456" + "2" * 58
ID_C = "def789" + "3" * 58


@pytest.fixture
def three(store, monkeypatch) -> StateStore:
    with_ids(monkeypatch, ID_A, ID_B, ID_C)
    new_container(store, "alpha")
    new_container(store, "beta")
    new_container(store, "gamma")
    return store


def test_crafted_ids(three):
    assert sorted(r.id for r in three.list()) == [ID_A, ID_B, ID_C]


def test_resolve_by_name(three):
    assert three.resolve("alpha").id == ID_A
    assert three.resolve("gamma").id == ID_C


def test_resolve_by_full_id(three):
    assert three.resolve(ID_B).name == "beta"


def test_resolve_by_unique_prefix(three):
    assert three.resolve("abc4").id == ID_B
    assert three.resolve("d").id == ID_C
    assert three.resolve(ID_A[:12]).id == ID_A


def test_resolve_prefix_is_case_insensitive(three):
    assert three.resolve("DEF7").id == ID_C


def test_resolve_ambiguous_prefix_lists_ids(three):
    with pytest.raises(ContainerNotFound) as excinfo:
        three.resolve("abc")
    message = str(excinfo.value)
    assert "ambiguous" in message
    assert ID_A[:12] in message
    assert ID_B[:12] in message
    assert ID_C[:12] not in message


@pytest.mark.parametrize("ref", ["nothing", "fff", "", "names", "alpha2"])
def test_resolve_missing(three, ref):
    with pytest.raises(ContainerNotFound, match="no such container"):
        three.resolve(ref)


def test_resolve_name_wins_over_id_prefix(store, monkeypatch):
    with_ids(monkeypatch, "beef" + "0" * 60, "cafe" + "0" * 60)
    new_container(store, "x")
    # A container named like the prefix of the other container's id.
    new_container(store, "beef")
    assert store.resolve("beef").id == "cafe" + "0" * 60


def test_resolve_stale_name_falls_back_to_prefix(three):
    (three.names / "ghost").write_text("0" * 64)
    with pytest.raises(ContainerNotFound):
        three.resolve("ghost")


# --- remove / release -------------------------------------------------------------------

def test_remove_deletes_dir_and_releases_name(store):
    record = new_container(store, "web")
    (store.container_dir(record.id) / "console.log").write_text("boot\n")
    store.remove(record)
    assert not store.container_dir(record.id).exists()
    assert not (store.names / "web").exists()
    with pytest.raises(ContainerNotFound):
        store.resolve("web")
    with pytest.raises(ContainerNotFound):
        store.resolve(record.id)
    again_id, again_name, _ = store.allocate("web")
    assert again_name == "web" and again_id != record.id


def test_remove_deletes_agent_socket(store, tmp_path):
    socket = tmp_path / "run" / "abc.sock"
    socket.parent.mkdir()
    socket.write_text("")  # stands in for the unix socket QEMU binds
    record = new_container(store, "web", agent_socket=str(socket))
    assert store.load(record.id).agent_socket == str(socket)
    store.remove(record)
    assert not socket.exists()
    assert socket.parent.is_dir()


def test_remove_is_idempotent(store, tmp_path):
    record = new_container(store, "web", agent_socket=str(tmp_path / "gone.sock"))
    store.remove(record)
    store.remove(record)
    store.release(record.id, None)
    store.release(record.id, record.name)


def test_release_of_allocated_but_unsaved_container(store):
    container_id, name, directory = store.allocate("half")
    store.release(container_id, name)
    assert not directory.exists()
    assert not (store.names / "half").exists()
    assert store.allocate("half")[1] == "half"


def test_remove_keeps_a_name_now_owned_by_another_container(store):
    first = new_container(store, "web")
    store.release(first.id, None)  # dir gone, name file still says first.id
    (store.names / "web").unlink()
    second = new_container(store, "web")
    store.remove(first)  # a late, second rm of the first container
    assert (store.names / "web").read_text() == second.id
    assert store.resolve("web").id == second.id


def test_remove_leaves_other_containers(store):
    a = new_container(store, "a")
    b = new_container(store, "b")
    store.remove(a)
    assert [r.id for r in store.list()] == [b.id]
    assert store.resolve("b").id == b.id


# ------------------------------------------------------------------ watch
WOKEN_WITHIN_S = 20.0
"""A bound far above any wake-up: ``changed`` says whether it was woken or timed out."""


def _in_thread(action) -> threading.Event:
    """Run ``action`` in a thread once released; the event says it ran."""
    done = threading.Event()

    def run() -> None:
        action()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_watch_wakes_at_a_record_write_and_at_removal(store: StateStore) -> None:
    record = new_container(store, "watched")
    with store.watch(record.id) as changed:
        written = _in_thread(lambda: store.update(record, exit_code=3))
        assert changed(WOKEN_WITHIN_S)
        written.wait(WOKEN_WITHIN_S)
        assert store.load(record.id).exit_code == 3
        # A monitor keeps its log in the directory open until it exits: the removal still wakes.
        log = (store.container_dir(record.id) / "monitor.log").open("w")
        try:
            removed = _in_thread(lambda: store.remove(record))
            assert changed(WOKEN_WITHIN_S)
            removed.wait(WOKEN_WITHIN_S)
            assert store.load(record.id) is None
        finally:
            log.close()


def test_watch_is_not_woken_by_other_containers(store: StateStore) -> None:
    mine, other = new_container(store, "mine"), new_container(store, "other")
    with store.watch(mine.id) as changed:
        store.update(other, exit_code=1)
        store.remove(other)
        assert not changed(0.2)  # nothing of its own changed
        assert store.load(mine.id) is not None
        store.update(mine, exit_code=0)
        assert changed(WOKEN_WITHIN_S)  # the write before this call is not missed


def test_watch_of_a_removed_container_sleeps(store: StateStore) -> None:
    record = new_container(store, "gone")
    store.remove(record)
    with store.watch(record.id) as changed:
        assert not changed(0.01)


def test_cli_inspect_of_an_ambiguous_prefix_says_ambiguous(three, tmp_path, monkeypatch):
    """`kvmc inspect PREFIX` falls back to images only when no container matches: a prefix that
    matches two containers is said to be ambiguous, not "no such container or image" (seen in CI
    when two random ids shared their first digit)."""
    from typer.testing import CliRunner

    from kvmc.cli import app

    monkeypatch.setenv("KVMC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KVMC_RUN_DIR", str(tmp_path / "run"))
    from kvmc.errors import AmbiguousContainer

    result = CliRunner().invoke(app, ["inspect", "abc"])
    assert isinstance(result.exception, AmbiguousContainer)  # main() prints it and exits 125
    assert 'container prefix "abc" is ambiguous' in str(result.exception)
    result = CliRunner().invoke(app, ["inspect", "--type", "container", "abc"])
    assert isinstance(result.exception, AmbiguousContainer)
    result = CliRunner().invoke(app, ["inspect", "zzz"])
    assert isinstance(result.exception, ContainerNotFound)
    assert str(result.exception) == "no such container or image: zzz"

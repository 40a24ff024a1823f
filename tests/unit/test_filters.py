"""docker's container filters (kvmc ps --filter, GET /containers/json?filters=)."""

from __future__ import annotations

import pytest

from kvmc.errors import UsageError
from kvmc.mounts import Mount
from kvmc.service.filters import check, container_matches, docker_status, parse_filter_flags
from kvmc.state import ContainerRecord


def _record(**changes: object) -> ContainerRecord:
    base = dict(id="ab" * 32, name="web", image="kvmc/busybox", image_id="cd" * 32, domain="kvmc-x",
                accel="tcg", memory_mib=256, cpus=1, process={"args": ["sh"]}, labels={"tier": "front", "x": ""},
                state="running", mounts=[Mount("volume", "/data", "data")], network="user")
    return ContainerRecord(**{**base, **changes})


def test_flags_become_the_api_filter_map() -> None:
    assert parse_filter_flags(["label=a=b", "label=c", "status=exited"]) == {"label": ["a=b", "c"],
                                                                              "status": ["exited"]}
    with pytest.raises(UsageError, match="bad format"):
        parse_filter_flags(["label"])


@pytest.mark.parametrize("filters, expected", [
    ({"label": ["tier=front"]}, True), ({"label": ["tier=back"]}, False), ({"label": ["tier", "x"]}, True),
    ({"name": ["we"]}, True), ({"name": ["/web"]}, True), ({"name": ["db"]}, False),
    ({"id": ["abab"]}, True), ({"id": ["cd"]}, False),
    ({"status": ["running", "exited"]}, True), ({"status": ["exited"]}, False),
    ({"ancestor": ["kvmc/busybox:latest"]}, True), ({"ancestor": ["cdcd"]}, True), ({"ancestor": ["alpine"]}, False),
    ({"volume": ["data"]}, True), ({"volume": ["/data"]}, True), ({"volume": ["other"]}, False),
    ({"network": ["bridge"]}, True), ({"network": ["none"]}, False),
])
def test_each_filter(filters: dict, expected: bool) -> None:
    check(filters)
    assert container_matches(_record(), filters) is expected


def test_status_paused_and_exited_codes() -> None:
    assert docker_status(_record(), paused=True) == "paused"
    assert container_matches(_record(), {"status": ["paused"]}, paused=True)
    exited = _record(state="exited", exit_code=3)
    assert container_matches(exited, {"exited": ["3"]}) and not container_matches(exited, {"exited": ["0"]})


def test_unknown_filters_are_refused() -> None:
    with pytest.raises(UsageError, match="invalid filter 'colour'"):
        check({"colour": ["red"]})
    with pytest.raises(UsageError, match="status=sleepy"):
        check({"status": ["sleepy"]})

"""kvmc ps / kvmc images / kvmc stats rows as docker's CLI prints them (kvmc/formatting.py)."""

from __future__ import annotations

import json

from kvmc.formatting import (IMAGES_HEADERS, IMAGES_TABLE, PS_HEADERS, PS_TABLE, STATS_HEADERS, STATS_TABLE,
                             ContainerRow, ImageRow, StatsRow, bytes_size, human_size, image_filter, render_rows)
from kvmc.state import ContainerRecord
from kvmc.views import container_stats, container_summary

NOW = 1_800_000_000.0


def _summary(**changes: object) -> dict:
    base = dict(id="ab" * 32, name="web", image="kvmc/busybox", image_id="cd" * 32, domain="kvmc-x", accel="tcg",
                memory_mib=256, cpus=1, process={"args": ["sh", "-c", "echo a long command line; sleep 300"]},
                labels={"tier": "front"}, state="running", network="user",
                created="2027-01-15T08:00:00.000Z", started_at="2027-01-15T08:00:01.000Z",
                ports=[{"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 80, "protocol": "tcp"}])
    return container_summary(ContainerRecord(**{**base, **changes}), now=NOW)


def test_ps_default_table_and_placeholders() -> None:
    row = ContainerRow(_summary(), now=NOW)
    assert row.ID == "ab" * 6 and row.Names == "web"
    assert row.Command == '"sh -c echo a long c…"'  # 20 characters, the last one the ellipsis
    assert row.Ports == "127.0.0.1:8080->80/tcp" and row.Labels == "tier=front" and row.Label("tier") == "front"
    assert row.Status.startswith("Up ") and row.State == "running" and row.RunningFor.endswith(" ago")
    lines = render_rows(None, [row], PS_TABLE, PS_HEADERS)
    assert lines[0].split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    assert lines[1].startswith("abababababab   kvmc/busybox   ") and lines[1].endswith("web")
    assert json.loads(render_rows("json", [row], PS_TABLE, PS_HEADERS)[0])["Names"] == "web"
    full = ContainerRow(_summary(), trunc=False, now=NOW, size=(1500, 2_100_000))
    assert full.ID == "ab" * 32 and full.Command == '"sh -c echo a long command line; sleep 300"'
    assert full.Size == "1.5kB (virtual 2.1MB)"


def test_ps_health_and_restarting_statuses() -> None:
    healthy = ContainerRow(_summary(health={"status": "healthy"}), now=NOW)
    assert healthy.Status.endswith("(healthy)")
    starting = ContainerRow(_summary(health={"status": "starting"}), now=NOW)
    assert starting.Status.endswith("(health: starting)")
    restarting = ContainerRow(_summary(state="restarting", exit_code=3, finished_at="2027-01-15T08:00:05.000Z"),
                              now=NOW)
    assert restarting.Status.startswith("Restarting (3) ") and restarting.State == "restarting"


def test_images_rows_and_filters() -> None:
    summary = {"Id": "sha256:" + "ef" * 32, "RepoTags": ["kvmc/busybox:latest"], "Created": int(NOW) - 7200,
               "Size": 1_990_000, "Labels": {"a": "b"}}
    row = ImageRow(summary, "kvmc/busybox:latest", now=NOW, containers=2)
    assert (row.Repository, row.Tag, row.ID, row.Size, row.CreatedSince, row.Containers) == (
        "kvmc/busybox", "latest", "ef" * 6, "1.99MB", "2 hours ago", "2")
    assert ImageRow(summary, "registry:5000/team/app", now=NOW).Tag == "<none>"
    untagged = ImageRow(summary, None, now=NOW)
    assert (untagged.Repository, untagged.Tag) == ("<none>", "<none>")
    lines = render_rows(None, [row], IMAGES_TABLE, IMAGES_HEADERS)
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    tags = ["kvmc/busybox:latest", "me/app:1"]
    assert image_filter(summary, tags, {"dangling": ["true"]}) == []
    assert image_filter(summary, [], {"dangling": ["true"]}) == [None]
    assert image_filter(summary, tags, {"reference": ["me/*"]}) == ["me/app:1"]
    assert image_filter(summary, tags, {"label": ["a=c"]}) == []
    assert human_size(512) == "512B" and human_size(1_234_567) == "1.23MB"


def test_stats_rows_compute_as_the_docker_cli_does() -> None:
    """Two samples 1 s apart, 0.5 s of vCPU time between them: 50% (of one host core); the
    columns are the docker CLI's, with its units (binary for memory, decimal for I/O)."""
    record = ContainerRecord(id="ab" * 32, name="web", image="kvmc/busybox", image_id="cd" * 32, domain="kvmc-x",
                             accel="tcg", memory_mib=256, cpus=2, process={"args": ["sh"]}, state="running")
    eth1 = {"rx_bytes": 1_500_000, "tx_bytes": 2_000, "rx_packets": 1, "tx_packets": 1, "rx_errors": 0,
            "tx_errors": 0, "rx_dropped": 0, "tx_dropped": 0}
    before = {"cpu_ns": 3 * 10**9, "memory_kib": 262144, "rss_kib": 65536, "vcpus": 2}
    after = {**before, "cpu_ns": 3_500_000_000, "block_read_bytes": 1_860_000, "block_write_bytes": 4096,
             "networks": {"eth1": eth1}}
    row = StatsRow(container_stats(record, after, before, NOW + 1, NOW), container="web")
    lines = render_rows(None, [row], STATS_TABLE, STATS_HEADERS)
    assert lines[0].split() == ["CONTAINER", "ID", "NAME", "CPU", "%", "MEM", "USAGE", "/", "LIMIT", "MEM", "%",
                                "NET", "I/O", "BLOCK", "I/O", "PIDS"]
    assert lines[1].split() == ["abababababab", "web", "50.00%", "64MiB", "/", "256MiB", "25.00%",
                                "1.5MB", "/", "2kB", "1.86MB", "/", "4.1kB", "0"]
    assert json.loads(render_rows("json", [row], STATS_TABLE, STATS_HEADERS)[0])["Container"] == "web"
    first = StatsRow(container_stats(record, before, None, NOW, None))
    assert first.CPUPerc == "0.00%" and first.NetIO == "0B / 0B" and first.Container == "abababababab"
    assert bytes_size(126.3 * 1024 * 1024) == "126.3MiB" and bytes_size(512) == "512B"

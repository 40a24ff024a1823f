"""kvmc.api.translate and kvmc.api.shapes: Docker JSON in, Docker JSON out, no I/O.

The create bodies below were recorded from the real clients (docker CLI 28.2.2 and
docker-py 7.1.0 pointed at a recording ``kvmc serve``); the CLI sends the full struct with
zero values, docker-py only what it sets.
"""

from __future__ import annotations

import base64
import copy
import json
import stat
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmc.api import shapes
from kvmc.api.translate import (
    InvalidRequest,
    create_options,
    format_time,
    go_file_mode,
    human_duration,
    human_status,
    normalize_image_ref,
    parse_filters,
    parse_signal,
    parse_time,
    path_stat_header,
    pull_ref,
)
from kvmc.images.model import Image, ImageConfig
from kvmc.mounts import parse_tmpfs, parse_volume
from kvmc.network import parse_publish
from kvmc.service.filters import match_labels
from kvmc.state import ContainerRecord
from kvmc.volumes import Volume

# `docker run --rm alpine echo hi`, as CLI 28.2.2 sent it.
CLI_DEFAULT = json.loads("""
{"Hostname": "", "Domainname": "", "User": "", "AttachStdin": false, "AttachStdout": true, "AttachStderr": true,
 "Tty": false, "OpenStdin": false, "StdinOnce": false, "Env": null, "Cmd": ["echo", "hi"], "Image": "alpine",
 "Volumes": {}, "WorkingDir": "", "Entrypoint": null, "OnBuild": null, "Labels": {},
 "HostConfig": {"Binds": null, "ContainerIDFile": "", "LogConfig": {"Type": "", "Config": {}}, "NetworkMode": "default",
  "PortBindings": {}, "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0}, "AutoRemove": true, "VolumeDriver": "",
  "VolumesFrom": null, "ConsoleSize": [0, 0], "CapAdd": null, "CapDrop": null, "CgroupnsMode": "", "Dns": [],
  "DnsOptions": [], "DnsSearch": [], "ExtraHosts": null, "GroupAdd": null, "IpcMode": "", "Cgroup": "", "Links": null,
  "OomScoreAdj": 0, "PidMode": "", "Privileged": false, "PublishAllPorts": false, "ReadonlyRootfs": false,
  "SecurityOpt": null, "UTSMode": "", "UsernsMode": "", "ShmSize": 0, "Isolation": "", "CpuShares": 0, "Memory": 0,
  "NanoCpus": 0, "CgroupParent": "", "BlkioWeight": 0, "BlkioWeightDevice": [], "BlkioDeviceReadBps": [],
  "BlkioDeviceWriteBps": [], "BlkioDeviceReadIOps": [], "BlkioDeviceWriteIOps": [], "CpuPeriod": 0, "CpuQuota": 0,
  "CpuRealtimePeriod": 0, "CpuRealtimeRuntime": 0, "CpusetCpus": "", "CpusetMems": "", "Devices": [],
  "DeviceCgroupRules": null, "DeviceRequests": null, "MemoryReservation": 0, "MemorySwap": 0,
  "MemorySwappiness": -1, "OomKillDisable": false, "PidsLimit": 0, "Ulimits": [], "CpuCount": 0, "CpuPercent": 0,
  "IOMaximumIOps": 0, "IOMaximumBandwidth": 0, "MaskedPaths": null, "ReadonlyPaths": null},
 "NetworkingConfig": {"EndpointsConfig": {"default": {"IPAMConfig": null, "Links": null, "Aliases": null,
  "MacAddress": "", "DriverOpts": null, "GwPriority": 0, "NetworkID": "", "EndpointID": "", "Gateway": "",
  "IPAddress": "", "IPPrefixLen": 0, "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
  "DNSNames": null}}}}
""")

# docker-py 7.1: containers.create('alpine', 'echo hi', user=1000, ports={'80/tcp': 8080, '81/tcp': None},
# mem_limit='256m', network_mode='bridge', environment=..., volumes={'/tmp': {'bind': '/h', 'mode': 'ro'}},
# tmpfs={'/run': ''}, auto_remove=True)
DOCKER_PY = json.loads("""
{"ExposedPorts": {"80/tcp": {}, "81/tcp": {}}, "User": "1000", "Tty": false, "OpenStdin": false, "StdinOnce": false,
 "AttachStdin": false, "AttachStdout": false, "AttachStderr": false, "Env": ["X=y"], "Cmd": ["echo", "hi"],
 "Image": "alpine", "Volumes": {"/h": {}}, "NetworkDisabled": false,
 "HostConfig": {"Memory": 268435456, "NetworkMode": "bridge", "Binds": ["/tmp:/h:ro"],
  "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}], "81/tcp": [{"HostIp": "", "HostPort": ""}]},
  "Tmpfs": {"/run": ""}, "AutoRemove": true}}
""")


def cli_body(**changes: object) -> dict:
    """The CLI's default body with the fields a flag changed (as recorded for that flag)."""
    body = copy.deepcopy(CLI_DEFAULT)
    host = changes.pop("HostConfig", {})
    body.update(changes)
    body["HostConfig"].update(host)  # type: ignore[arg-type]
    return body


# ---------------------------------------------------------------------------------- create

def test_default_cli_body_means_kvmc_defaults() -> None:
    req = create_options(CLI_DEFAULT, None)
    assert req.image == "alpine" and req.cmd == ["echo", "hi"] and req.entrypoint is None
    assert req.env == [] and req.workdir is None and req.user is None and req.hostname is None
    assert req.memory_mib is None and req.cpus is None
    assert req.network == "user" and req.publish == [] and req.volumes == [] and req.tmpfs == []
    assert req.anonymous_volumes == [] and req.console_size is None and req.init is None
    assert req.auto_remove and not req.tty and not req.open_stdin and req.attach_stdout and not req.attach_stdin
    assert req.restart_policy == "no" and req.log_driver is None and req.labels == {}
    assert req.network_aliases == []


def test_compose_network_and_aliases() -> None:
    # compose v2: HostConfig.NetworkMode is the project network, aliases per endpoint
    body = cli_body(HostConfig={"NetworkMode": "proj_default", "Binds": ["proj_data:/data:rw"]},
                    NetworkingConfig={"EndpointsConfig": {"proj_default": {"Aliases": ["proj-web-1", "web"]}}})
    req = create_options(body, "proj-web-1")
    assert req.network == "proj_default" and req.network_aliases == ["proj-web-1", "web"]
    assert req.volumes == ["proj_data:/data"]


def test_publish_from_port_bindings() -> None:
    # docker create -p 8080:80 -p 80 -p 127.0.0.1::53/udp --expose 9000 alpine
    body = cli_body(ExposedPorts={"53/udp": {}, "80/tcp": {}, "9000/tcp": {}}, Cmd=None, HostConfig={
        "PortBindings": {"53/udp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
                         "80/tcp": [{"HostIp": "", "HostPort": "8080"}, {"HostIp": "", "HostPort": ""}]}})
    req = create_options(body, None)
    assert req.publish == ["127.0.0.1::53/udp", "8080:80/tcp", "80/tcp"]
    assert req.exposed_ports == ["53/udp", "80/tcp", "9000/tcp"]
    assert req.cmd is None
    mappings = [parse_publish(spec) for spec in req.publish]  # kvmc's own -p parser takes them
    assert [(m.host_ip, m.host_port, m.guest_port, m.protocol) for m in mappings] == [
        ("127.0.0.1", 0, 53, "udp"), ("0.0.0.0", 8080, 80, "tcp"), ("0.0.0.0", 0, 80, "tcp")]


def test_binds_mounts_tmpfs_and_anonymous_volumes() -> None:
    # docker create -v vol1:/data -v /tmp:/host:ro,z --mount type=volume,src=v2,dst=/d
    #   --mount type=bind,src=/tmp,dst=/b,readonly --mount type=tmpfs,dst=/t,tmpfs-size=1048576
    #   --tmpfs /run:size=64m --tmpfs /scratch -v /anon alpine
    body = cli_body(Cmd=None, Volumes={"/anon": {}}, HostConfig={
        "Binds": ["vol1:/data", "/tmp:/host:ro,z"],
        "Tmpfs": {"/run": "size=64m", "/scratch": ""},
        "Mounts": [{"Type": "volume", "Source": "v2", "Target": "/d"},
                   {"Type": "bind", "Source": "/tmp", "Target": "/b", "ReadOnly": True},
                   {"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"SizeBytes": 1048576}}]})
    req = create_options(body, None)
    assert req.volumes == ["vol1:/data", "/tmp:/host:ro", "v2:/d", "/tmp:/b:ro"]
    assert req.tmpfs == ["/t:size=1048576", "/run:size=64m", "/scratch"]
    assert req.anonymous_volumes == ["/anon"]
    parsed = [parse_volume(spec) for spec in req.volumes]  # kvmc's own -v parser takes them
    assert [(m.kind, m.target, m.readonly) for m in parsed] == [
        ("volume", "/data", False), ("bind", "/host", True), ("volume", "/d", False), ("bind", "/b", True)]
    assert [parse_tmpfs(spec).options for spec in req.tmpfs] == ["size=1048576", "size=64m", ""]


def test_process_resources_and_host_options() -> None:
    # docker create -m 256m --cpus 1.5 --name web -e A=1 -e B -w /srv -u 1000:1000 --entrypoint /bin/sh
    #   --label x=y --stop-signal SIGINT --stop-timeout 3 --read-only --network none --dns 1.1.1.1
    #   --add-host h:1.2.3.4 --init --restart on-failure:2 --log-driver none alpine -c 'echo hi'
    body = cli_body(User="1000:1000", Env=["A=1", "B"], Cmd=["-c", "echo hi"], WorkingDir="/srv",
                    Entrypoint=["/bin/sh"], Labels={"x": "y"}, StopSignal="SIGINT", StopTimeout=3, HostConfig={
                        "LogConfig": {"Type": "none", "Config": {}}, "NetworkMode": "none",
                        "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 2}, "AutoRemove": False,
                        "Dns": ["1.1.1.1"], "ExtraHosts": ["h:1.2.3.4"], "ReadonlyRootfs": True,
                        "Memory": 268435456, "NanoCpus": 1500000000, "Init": True})
    req = create_options(body, "web")
    assert req.name == "web" and req.memory_mib == 256 and req.cpus == 2
    assert req.entrypoint == ["/bin/sh"] and req.cmd == ["-c", "echo hi"]
    assert req.env == ["A=1", "B"] and req.workdir == "/srv" and req.user == "1000:1000"
    assert req.labels == {"x": "y"} and req.stop_signal == "SIGINT" and req.stop_timeout == 3
    assert req.read_only and req.network == "none" and req.dns == ["1.1.1.1"] and req.extra_hosts == ["h:1.2.3.4"]
    assert req.init is True and req.restart_policy == "on-failure" and req.log_driver == "none"
    assert not req.auto_remove


def test_interactive_tty_body() -> None:
    # docker create -it alpine sh (run -it also sends ConsoleSize [rows, cols])
    body = cli_body(AttachStdin=True, Tty=True, OpenStdin=True, StdinOnce=True, Cmd=["sh"],
                    HostConfig={"AutoRemove": False, "ConsoleSize": [30, 100]})
    req = create_options(body, None)
    assert req.tty and req.open_stdin and req.stdin_once and req.attach_stdin
    assert req.console_size == (30, 100)


def test_docker_py_body() -> None:
    req = create_options(DOCKER_PY, None)
    assert req.user == "1000" and req.memory_mib == 256 and req.network == "user" and req.auto_remove
    assert req.publish == ["8080:80/tcp", "81/tcp"]
    assert req.volumes == ["/tmp:/h:ro"]
    assert req.anonymous_volumes == []  # /h is in Config.Volumes too, but bound
    assert req.tmpfs == ["/run"]
    assert not req.attach_stdout and req.workdir is None and req.labels == {}


def test_odd_but_valid_values() -> None:
    body = {"Image": "alpine", "User": 1000, "Cmd": "echo hi", "Entrypoint": [""],
            "HostConfig": {"Memory": 100_000_000, "CpuCount": 3, "NetworkMode": "proj_default",
                           "Binds": ["data:/d:rw,nocopy"], "Mounts": [{"Type": "volume", "Target": "/anon2"}]}}
    req = create_options(body, "/named")
    assert req.user == "1000" and req.cmd == ["echo hi"] and req.entrypoint == [""]
    assert req.memory_mib == 96  # 95.4 MiB, rounded up
    assert req.cpus == 3 and req.network == "proj_default" and req.name == "named"
    assert req.volumes == ["data:/d"] and req.anonymous_volumes == ["/anon2"]
    assert create_options({"Image": "a", "Cmd": []}, None).cmd is None  # moby: image's Cmd


@pytest.mark.parametrize("body, message", [
    (None, "config cannot be empty"),
    ({}, "no image specified"),
    ({"Image": ""}, "no image specified"),
    ({"Image": "a", "Env": "A=1"}, "invalid Env"),
    ({"Image": "a", "Labels": {"k": 1}}, "invalid Labels"),
    ({"Image": "a", "HostConfig": {"Memory": -1}}, "HostConfig.Memory"),
    ({"Image": "a", "HostConfig": {"Binds": ["/only-one-part"]}}, "invalid volume specification"),
    ({"Image": "a", "HostConfig": {"Binds": ["/a:/b:bogus"]}}, 'invalid mode "bogus"'),
    ({"Image": "a", "HostConfig": {"PortBindings": {"80/sctp": [{"HostPort": "1"}]}}}, "tcp and udp only"),
    ({"Image": "a", "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": "8000-8010"}]}}}, "not ranges"),
    ({"Image": "a", "HostConfig": {"Mounts": [{"Type": "npipe", "Target": "/x"}]}}, 'mount type "npipe"'),
    ({"Image": "a", "HostConfig": {"ConsoleSize": [1]}}, "ConsoleSize"),
])
def test_malformed_create_bodies(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as info:
        create_options(body, None)
    assert info.value.kind == "invalid"


# ---------------------------------------------------------------------------------- images

@pytest.mark.parametrize("ref, expected", [
    ("alpine", "alpine:latest"),
    ("alpine:3.10", "alpine:3.10"),
    ("library/alpine", "alpine:latest"),
    ("docker.io/library/alpine:latest", "alpine:latest"),
    ("index.docker.io/library/alpine", "alpine:latest"),
    ("docker.io/foo/bar", "foo/bar:latest"),
    ("docker.io/firecow/gitlab-ci-local-util:latest", "firecow/gitlab-ci-local-util:latest"),
    ("127.0.0.1:5000/x/y", "127.0.0.1:5000/x/y:latest"),
    ("localhost/x", "localhost/x:latest"),
    ("ghcr.io/o/r:1.2", "ghcr.io/o/r:1.2"),
    ("alpine@sha256:" + "a" * 64, "alpine@sha256:" + "a" * 64),
    ("docker.io/library/alpine:3@sha256:" + "b" * 64, "alpine:3@sha256:" + "b" * 64),
    ("sha256:" + "c" * 64, "sha256:" + "c" * 64),
    ("c" * 64, "c" * 64),
    ("0123456789ab", "0123456789ab"),
    ("cafe", "cafe:latest"),  # short hex is also a valid name: normalised as one
])
def test_normalize_image_ref(ref: str, expected: str) -> None:
    assert normalize_image_ref(ref) == expected


def test_normalize_image_ref_refuses_bad_names() -> None:
    with pytest.raises(InvalidRequest, match="invalid reference format"):
        normalize_image_ref("Alpine")


@pytest.mark.parametrize("from_image, tag, expected", [
    ("docker.io/library/alpine", "latest", "alpine:latest"),  # the CLI
    ("alpine", "latest", "alpine:latest"),  # docker-py
    ("alpine", "", "alpine:latest"),
    ("alpine:3.10", "", "alpine:3.10"),
    ("alpine:3.10", "3.11", "alpine:3.11"),
    ("alpine", "sha256:" + "d" * 64, "alpine@sha256:" + "d" * 64),
    ("alpine@sha256:" + "e" * 64, "", "alpine@sha256:" + "e" * 64),
    ("127.0.0.1:5000/x", None, "127.0.0.1:5000/x:latest"),
])
def test_pull_ref(from_image: str, tag: str | None, expected: str) -> None:
    assert pull_ref(from_image, tag) == expected


# ---------------------------------------------------------------------------------- filters

def test_filters_both_encodings() -> None:
    cli = '{"label":{"com.docker.compose.project=proj":true,"com.docker.compose.config-hash":true}}'
    assert parse_filters(cli) == {"label": ["com.docker.compose.project=proj", "com.docker.compose.config-hash"]}
    assert parse_filters('{"label":["a=b"],"status":["exited"]}') == {"label": ["a=b"], "status": ["exited"]}
    assert parse_filters('{"name":"web"}') == {"name": ["web"]}
    assert parse_filters(None) == {} and parse_filters("") == {}


@pytest.mark.parametrize("raw", ["{", "[]", '{"label": 3}'])
def test_filters_invalid(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_filters(raw)


label_key = st.text(alphabet="abcdefghijklmnopqrstuvwxyz.-", min_size=1, max_size=8)
filter_values = st.lists(st.text(min_size=0, max_size=10), max_size=5, unique=True)


@settings(database=None)  # no .hypothesis/ directory in the work tree
@given(st.dictionaries(label_key, filter_values, max_size=4))
def test_filters_encodings_agree(filters: dict[str, list[str]]) -> None:
    as_map = json.dumps({k: {v: True for v in vs} for k, vs in filters.items()})
    as_list = json.dumps(filters)
    assert parse_filters(as_map) == parse_filters(as_list) == filters


def test_match_labels() -> None:
    labels = {"com.docker.compose.project": "proj", "com.docker.compose.oneoff": "False", "empty": ""}
    assert match_labels(labels, [])
    assert match_labels(labels, ["com.docker.compose.project=proj", "com.docker.compose.oneoff=False"])
    assert match_labels(labels, ["com.docker.compose.project"])
    assert match_labels(labels, ["empty="]) and match_labels(labels, ["empty"])
    assert not match_labels(labels, ["com.docker.compose.project=other"])
    assert not match_labels(labels, ["missing"])


# ---------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("text, number", [("KILL", 9), ("SIGKILL", 9), ("kill", 9), ("9", 9), ("WINCH", 28),
                                          ("SIGTERM", 15), ("hup", 1), ("SIGRTMIN", 34)])
def test_parse_signal(text: str, number: int) -> None:
    assert parse_signal(text) == number


def test_parse_signal_default_and_errors() -> None:
    assert parse_signal("", default=9) == 9 and parse_signal(None, default=15) == 15
    for bad in ("", "NOPE", "0", "999", "-1"):
        with pytest.raises(InvalidRequest):
            parse_signal(bad)


# ---------------------------------------------------------------------------------- status

T0 = parse_time("2026-11-30T12:00:00.000Z")
assert T0 is not None


@pytest.mark.parametrize("seconds, text", [
    (0.4, "Less than a second"), (1, "1 second"), (5, "5 seconds"), (59, "59 seconds"), (60, "About a minute"),
    (119, "About a minute"), (120, "2 minutes"), (3599, "59 minutes"), (3600, "About an hour"),
    (5399, "About an hour"), (5400, "2 hours"), (47 * 3600, "47 hours"), (48 * 3600, "2 days"),
    (13 * 86400, "13 days"), (14 * 86400, "2 weeks"), (59 * 86400, "8 weeks"), (60 * 86400, "2 months"),
    (729 * 86400, "24 months"), (730 * 86400, "2 years"),
])
def test_human_duration_matches_go_units(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_human_status() -> None:
    started, finished = "2026-11-30T12:00:00.000Z", "2026-11-30T12:00:10.000Z"
    assert human_status("running", None, started, None, T0 + 5) == "Up 5 seconds"
    assert human_status("starting", None, started, None, T0 + 90) == "Up About a minute"
    assert human_status("running", None, started, None, T0 + 2 * 3600) == "Up 2 hours"
    assert human_status("running", None, started, None, T0 + 5, paused=True) == "Up 5 seconds (Paused)"
    assert human_status("paused", None, started, None, T0 + 5) == "Up 5 seconds (Paused)"
    assert human_status("exited", 3, started, finished, T0 + 11) == "Exited (3) 1 second ago"
    assert human_status("created", None, None, None, T0) == "Created"
    # a failed start: exited with 127 but never started, docker shows Created
    assert human_status("exited", 127, None, finished, T0 + 60) == "Created"


def test_time_round_trip() -> None:
    assert parse_time("2026-11-30T12:00:00.123456789Z") == pytest.approx(T0 + 0.123456)
    assert parse_time("0001-01-01T00:00:00Z") is None and parse_time(None) is None and parse_time("x") is None
    assert format_time(T0) == "2026-11-30T12:00:00Z"
    assert format_time(T0 + 0.5) == "2026-11-30T12:00:00.5Z"
    assert format_time(None) == "0001-01-01T00:00:00Z"


# ---------------------------------------------------------------------------------- archive

@pytest.mark.parametrize("st_mode, go_mode", [
    (stat.S_IFREG | 0o644, 0o644),
    (stat.S_IFDIR | 0o755, (1 << 31) | 0o755),
    (stat.S_IFLNK | 0o777, (1 << 27) | 0o777),
    (stat.S_IFCHR | 0o666, (1 << 26) | (1 << 21) | 0o666),
    (stat.S_IFBLK | 0o660, (1 << 26) | 0o660),
    (stat.S_IFIFO | 0o600, (1 << 25) | 0o600),
    (stat.S_IFSOCK | 0o755, (1 << 24) | 0o755),
    (stat.S_IFREG | stat.S_ISUID | 0o755, (1 << 23) | 0o755),
    (stat.S_IFDIR | stat.S_ISVTX | 0o777, (1 << 31) | (1 << 20) | 0o777),  # /tmp
])
def test_go_file_mode(st_mode: int, go_mode: int) -> None:
    assert go_file_mode(st_mode) == go_mode


def test_path_stat_header() -> None:
    header = path_stat_header("hostname", 13, stat.S_IFREG | 0o644, T0, "")
    assert json.loads(base64.b64decode(header)) == {
        "name": "hostname", "size": 13, "mode": 0o644, "mtime": "2026-11-30T12:00:00Z", "linkTarget": ""}
    is_dir = json.loads(base64.b64decode(path_stat_header("tmp", 4096, stat.S_IFDIR | 0o1777, T0)))["mode"]
    assert is_dir & (1 << 31)


# ---------------------------------------------------------------------------------- shapes

def make_record(**changes: object) -> ContainerRecord:
    record = ContainerRecord(
        id="ab" * 32, name="web", image="alpine:latest", image_id="cd" * 32, domain="kvmc-abab", accel="tcg",
        memory_mib=256, cpus=2,
        process={"args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin"], "cwd": "/", "user": None,
                 "hostname": "abababababab", "stdin": False},
        state="running", created="2026-11-30T12:00:00.000Z", started_at="2026-11-30T12:00:01.000Z",
        monitor_pid=4242, network="user",
        ports=[{"host_ip": "0.0.0.0", "host_port": 8080, "guest_port": 80, "protocol": "tcp"}],
        mounts=[{"kind": "volume", "target": "/data", "source": "vol1", "readonly": False, "options": ""},
                {"kind": "bind", "target": "/h", "source": "/tmp", "readonly": True, "options": ""},
                {"kind": "tmpfs", "target": "/run", "source": "", "readonly": False, "options": "size=64m"}],
    )
    for key, value in changes.items():
        setattr(record, key, value)
    return record


def test_container_summary() -> None:
    item = shapes.container_summary(make_record(), None, T0 + 6, volume_paths={"vol1": "/v/vol1"})
    assert item["Id"] == "ab" * 32 and item["Names"] == ["/web"] and item["ImageID"] == "sha256:" + "cd" * 32
    assert item["Command"] == "sh -c echo hi" and item["Created"] == int(T0)
    assert item["State"] == "running" and item["Status"] == "Up 5 seconds"
    assert item["Ports"] == [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"}]
    assert item["HostConfig"] == {"NetworkMode": "bridge"}
    assert item["NetworkSettings"]["Networks"]["bridge"]["IPAddress"] == "10.0.2.15"
    assert [m["Type"] for m in item["Mounts"]] == ["volume", "bind", "tmpfs"]
    assert item["Mounts"][0]["Source"] == "/v/vol1" and item["Mounts"][1]["RW"] is False
    json.dumps(item)


def test_container_inspect_current_record() -> None:
    data = shapes.container_inspect(make_record(), vm_state="running", log_path="/x/log.json")
    assert data["Name"] == "/web" and data["Path"] == "sh" and data["Args"] == ["-c", "echo hi"]
    assert data["State"]["Running"] and data["State"]["Status"] == "running" and data["State"]["Pid"] == 4242
    assert data["State"]["FinishedAt"] == "0001-01-01T00:00:00Z"
    assert data["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {}}
    assert data["HostConfig"]["Memory"] == 268435456 and data["HostConfig"]["NanoCpus"] == 2_000_000_000
    assert data["HostConfig"]["Binds"] == ["vol1:/data", "/tmp:/h:ro"]
    assert data["HostConfig"]["Tmpfs"] == {"/run": "size=64m"}
    assert data["HostConfig"]["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}
    assert data["NetworkSettings"]["Ports"] == {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}
    assert data["Config"]["Cmd"] == ["sh", "-c", "echo hi"] and data["Config"]["Entrypoint"] is None
    assert data["Config"]["Tty"] is False and data["Config"]["ExposedPorts"] == {"80/tcp": {}}
    # `run img` with neither asked: exact with the image's config, else the argv as Cmd
    merged = shapes.container_inspect(make_record(), image_config=ImageConfig(entrypoint=["sh"], cmd=["-x"]))
    assert merged["Config"]["Entrypoint"] == ["sh"] and merged["Config"]["Cmd"] == ["-x"]
    # `run img -c 'echo hi'` under an image whose Entrypoint is sh: recovered from the argv
    cmd_only = shapes.container_inspect(make_record(cmd=["-c", "echo hi"]))
    assert cmd_only["Config"]["Entrypoint"] == ["sh"] and cmd_only["Config"]["Cmd"] == ["-c", "echo hi"]
    assert data["Image"] == "sha256:" + "cd" * 32 and data["LogPath"] == "/x/log.json"
    assert data["Kvmc"]["Domain"] == "kvmc-abab"
    json.dumps(data)


def test_container_inspect_docker_fields() -> None:
    record = make_record(state="exited", exit_code=3, finished_at="2026-11-30T12:00:09.000Z", ports=[],
                         labels={"a": "b"}, tty=True, open_stdin=True, stdin_once=True, entrypoint=["sh"],
                         cmd=["-c", "echo hi"], stop_signal="SIGINT", stop_timeout=3)
    data = shapes.container_inspect(record)
    assert data["State"] == {**data["State"], "Status": "exited", "Running": False, "ExitCode": 3, "Pid": 0}
    assert data["Config"]["Entrypoint"] == ["sh"] and data["Config"]["Cmd"] == ["-c", "echo hi"]
    assert data["Config"]["Tty"] and data["Config"]["OpenStdin"] and data["Config"]["StdinOnce"]
    assert data["Config"]["Labels"] == {"a": "b"} and data["Config"]["StopSignal"] == "SIGINT"
    assert data["Config"]["StopTimeout"] == 3
    assert data["NetworkSettings"]["Ports"] == {} and data["NetworkSettings"]["IPAddress"] == ""
    paused = shapes.container_inspect(make_record(), vm_state="paused")
    assert paused["State"]["Paused"] and paused["State"]["Status"] == "paused"
    assert shapes.container_summary(make_record(), None, T0 + 6)["State"] == "running"
    capped = shapes.container_inspect(make_record(log_opts={"max-size": "1m", "max-file": "2"}))
    assert capped["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}}


def test_shapes_read_untyped_records() -> None:
    # A schema-1 style record (dict parts, no docker fields), as a test double or old JSON gives it.
    record = SimpleNamespace(
        id="12" * 32, name="old", image="busybox:latest", image_id="34" * 32, state="running",
        created="2026-11-30T12:00:00.000Z", started_at="2026-11-30T12:00:00.000Z", network="none",
        process={"args": ["sleep", "9"], "env": [], "cwd": "/", "user": "1000", "hostname": None, "stdin": True},
        ports=[{"host_ip": "127.0.0.1", "host_port": 9000, "guest_port": 90, "protocol": "udp"}],
        mounts=[{"kind": "tmpfs", "target": "/t", "source": "", "readonly": False, "options": ""}])
    data = shapes.container_inspect(record)
    assert data["Config"]["Cmd"] == ["sleep", "9"] and data["Config"]["Entrypoint"] is None
    assert data["Config"]["Hostname"] == "121212121212" and data["Config"]["User"] == "1000"
    assert data["Config"]["OpenStdin"] is True
    assert data["NetworkSettings"]["Ports"] == {"90/udp": [{"HostIp": "127.0.0.1", "HostPort": "9000"}]}
    assert data["HostConfig"]["NetworkMode"] == "none" and data["HostConfig"]["Tmpfs"] == {"/t": ""}
    item = shapes.container_summary(record, None, T0 + 1)
    assert item["Ports"] == [{"IP": "127.0.0.1", "PrivatePort": 90, "PublicPort": 9000, "Type": "udp"}]
    assert item["Status"] == "Up 1 second"
    json.dumps([data, item])


def test_image_and_volume_shapes(tmp_path) -> None:
    image = Image(id="ef" * 32, tags=["alpine:latest"], created="2026-11-01T00:00:00Z", size=7_000_000,
                  disk_size=64 << 20, disk_path=tmp_path / "rootfs.ext4",
                  config=ImageConfig(cmd=["/bin/sh"], env=["PATH=/bin"], exposed_ports=["80/tcp"]),
                  architecture="amd64", os="linux", layers=["sha256:" + "1" * 64])
    summary = shapes.image_summary(image)
    assert summary["Id"] == "sha256:" + "ef" * 32 and summary["RepoTags"] == ["alpine:latest"]
    assert isinstance(summary["Created"], int) and summary["SharedSize"] == -1
    inspect = shapes.image_inspect(image)
    assert inspect["Config"]["Cmd"] == ["/bin/sh"] and inspect["Config"]["ExposedPorts"] == {"80/tcp": {}}
    assert inspect["RootFS"] == {"Type": "layers", "Layers": ["sha256:" + "1" * 64]}
    volume = Volume(name="v1", created="2026-11-30T12:00:00.000Z", size_bytes=1 << 30, path="/x/disk.ext4")
    assert shapes.volume_json(volume, "/x")["Driver"] == "local"
    json.dumps([summary, inspect])


def test_system_and_event_shapes() -> None:
    version = shapes.version_json("6.1.0")
    assert version["ApiVersion"] == "1.50" and version["MinAPIVersion"] == "1.24"
    assert version["Components"][0]["Name"] == "Engine"
    info = shapes.info_json(name="host", ncpu=2, mem_total=1 << 30, kernel_release="6.1.0",
                            operating_system="Debian GNU/Linux 12")
    assert info["OSType"] == "linux" and info["Swarm"]["LocalNodeState"] == "inactive"
    assert info["MemoryLimit"] and info["SwapLimit"] and info["CpuCfsQuota"]
    event = shapes.event_json("container", "die", "ab" * 32, {"name": "web", "image": "alpine", "exitCode": "3"},
                              1_700_000_000_123_456_789)
    assert event["time"] == 1_700_000_000 and event["timeNano"] == 1_700_000_000_123_456_789
    assert event["Actor"]["Attributes"]["exitCode"] == "3" and event["status"] == "die"
    assert event["from"] == "alpine"
    assert "from" not in shapes.event_json("volume", "create", "v1", {}, 0)


def test_stats_json_carries_disk_and_network_traffic_as_docker_counts_it() -> None:
    """The docker CLI's BLOCK I/O sums blkio entries by op, its NET I/O the interfaces' rx/tx."""
    eth1 = {"rx_bytes": 1500, "rx_packets": 3, "rx_errors": 0, "rx_dropped": 0,
            "tx_bytes": 700, "tx_packets": 2, "tx_errors": 0, "tx_dropped": 0}
    sample = {"cpu_ns": 5 * 10**9, "memory_kib": 262144, "rss_kib": 65536, "vcpus": 2,
              "block_read_bytes": 4096, "block_write_bytes": 8192, "networks": {"eth1": eth1}}
    body = shapes.container_stats(make_record(), sample, None, T0 + 1, None)
    assert body["networks"] == {"eth1": eth1}
    ops = {entry["op"]: entry["value"] for entry in body["blkio_stats"]["io_service_bytes_recursive"]}
    assert ops == {"read": 4096, "write": 8192}
    assert body["memory_stats"]["usage"] == 65536 * 1024 and body["cpu_stats"]["online_cpus"] == 2
    assert shapes.container_stats(make_record(), {**sample, "networks": {}}, None, T0 + 1, None)["networks"] == {}

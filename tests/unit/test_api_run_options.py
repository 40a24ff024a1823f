"""Docker's create body, as the docker CLI sends it, into the RunOptions kvmc's create takes."""

from __future__ import annotations

from kvmc.api.translate import create_options, run_options
from kvmc.mounts import parse_tmpfs, parse_volume
from kvmc.network import parse_publish


def _body(**host_config: object) -> dict:
    """A `docker run` create body with the zero values the CLI always sends."""
    return {
        "Hostname": "", "User": "", "AttachStdin": False, "AttachStdout": True, "AttachStderr": True,
        "Tty": False, "OpenStdin": False, "StdinOnce": False, "Env": ["A=1"], "Cmd": ["sh", "-c", "exit 3"],
        "Image": "alpine", "Volumes": None, "WorkingDir": "/srv", "Entrypoint": None, "Labels": {"k": "v"},
        "HostConfig": {"NetworkMode": "default", "RestartPolicy": {"Name": "no"}, "ConsoleSize": [0, 0],
                       "LogConfig": {"Type": "", "Config": {}}, **host_config},
        "NetworkingConfig": {"EndpointsConfig": {"default": {}}},
    }


def test_a_plain_docker_run_becomes_a_user_network_container() -> None:
    req = create_options(_body(AutoRemove=True), "web")
    opts = run_options(req)
    assert (opts.image, opts.name, opts.auto_remove, opts.network) == ("alpine", "web", True, "user")
    assert opts.process.command == ["sh", "-c", "exit 3"] and opts.process.entrypoint is None
    assert opts.process.env == ["A=1"] and opts.process.workdir == "/srv" and not opts.process.interactive
    assert opts.docker.labels == {"k": "v"} and opts.docker.cmd == ["sh", "-c", "exit 3"]
    assert opts.host_env == {}  # the API never reads the server's environment for -e NAME


def test_resources_ports_mounts_and_stdin_reach_kvmc_in_its_own_syntax() -> None:
    body = _body(Memory=268435456, NanoCpus=1500000000,
                 PortBindings={"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
                               "53/udp": [{"HostIp": "", "HostPort": ""}]},
                 Binds=["vol1:/data", "/tmp:/host:ro"], Tmpfs={"/run": "size=64m"}, ReadonlyRootfs=True)
    body.update(OpenStdin=True, StdinOnce=True, Entrypoint=["/bin/sh"], Tty=True)
    opts = run_options(create_options(body, None))
    assert (opts.memory_mib, opts.cpus, opts.read_only) == (256, 2, True)
    assert opts.process.interactive and opts.docker.open_stdin and opts.docker.stdin_once and opts.docker.tty
    assert opts.process.entrypoint == ["/bin/sh"]
    ports = sorted((p.host_ip, p.host_port, p.guest_port, p.protocol) for p in map(parse_publish, opts.publish))
    assert ports == [("0.0.0.0", 0, 53, "udp"), ("127.0.0.1", 8080, 80, "tcp")]
    mounts = sorted((m.kind, m.source, m.target, m.readonly) for m in map(parse_volume, opts.volumes))
    assert mounts == [("bind", "/tmp", "/host", True), ("volume", "vol1", "/data", False)]
    [tmpfs] = map(parse_tmpfs, opts.tmpfs)
    assert (tmpfs.target, "size=64m" in tmpfs.options) == ("/run", True)


def test_compose_and_multi_network_endpoints_become_kvmc_networks() -> None:
    """compose: NetworkMode is the project network, its aliases in EndpointsConfig; API 1.44+
    clients may name more endpoints; docker-py's networking_config alone (NetworkMode left
    default) puts the container on the network it names."""
    body = _body(NetworkMode="proj_default")
    body["NetworkingConfig"] = {"EndpointsConfig": {
        "proj_default": {"Aliases": ["proj-web-1", "web"]}, "backend": {"Aliases": ["api"]}}}
    opts = run_options(create_options(body, None))
    assert (opts.network, opts.network_aliases) == ("proj_default", ["proj-web-1", "web"])
    assert opts.more_networks == [("backend", ["api"])]
    body = _body()
    body["NetworkingConfig"] = {"EndpointsConfig": {"ci": {"Aliases": ["postgres"]}}}
    opts = run_options(create_options(body, None))
    assert (opts.network, opts.network_aliases, opts.more_networks) == ("ci", ["postgres"], [])


def test_a_tty_create_carries_its_console_size() -> None:
    body = _body(ConsoleSize=[30, 100])
    body.update(Tty=True, OpenStdin=True, StdinOnce=True, AttachStdin=True)
    opts = run_options(create_options(body, None))
    assert opts.docker.tty and opts.docker.console_size == (30, 100)
    assert run_options(create_options(_body(), None)).docker.console_size is None  # [0, 0]: unknown


def test_log_config_max_size_and_max_file_reach_the_container() -> None:
    """docker run --log-opt max-size=1m --log-opt max-file=2 sends HostConfig.LogConfig.Config."""
    body = _body(LogConfig={"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}})
    opts = run_options(create_options(body, None))
    assert opts.log_opts == {"max-size": "1m", "max-file": "2"}
    assert run_options(create_options(_body(), None)).log_opts == {}  # the configured defaults apply


def test_container_options_reach_kvmc() -> None:
    """Issue 16: RestartPolicy, Healthcheck, Init, DNS, ExtraHosts, Ulimits, capabilities, ShmSize,
    ExposedPorts, PublishAllPorts become kvmc/options.py's ContainerOptions."""
    from kvmc.health import Healthcheck
    from kvmc.options import RestartPolicy, Ulimit

    body = _body(RestartPolicy={"Name": "on-failure", "MaximumRetryCount": 3}, Init=True, Dns=["192.0.2.53"],
                 DnsSearch=["corp"], DnsOptions=["ndots:2"], ExtraHosts=["db:192.0.2.7"],
                 Ulimits=[{"Name": "nofile", "Soft": 100, "Hard": 200}], CapAdd=["NET_ADMIN"], CapDrop=["NET_RAW"],
                 Privileged=True, ShmSize=33554432, PublishAllPorts=True)
    body.update(Healthcheck={"Test": ["CMD-SHELL", "true"], "Interval": 2_000_000_000, "Retries": 5},
                ExposedPorts={"80/tcp": {}}, StopSignal="SIGUSR1", StopTimeout=3)
    opts = run_options(create_options(body, None))
    o = opts.options
    assert o.restart == RestartPolicy("on-failure", 3) and o.init is True and o.privileged
    assert (o.dns, o.dns_search, o.dns_options, o.extra_hosts) == (["192.0.2.53"], ["corp"], ["ndots:2"],
                                                                   ["db:192.0.2.7"])
    assert o.ulimits == [Ulimit("nofile", 100, 200)] and (o.cap_add, o.cap_drop) == (["NET_ADMIN"], ["NET_RAW"])
    assert o.shm_size == 32 << 20 and o.expose == ["80/tcp"] and o.publish_all
    assert o.healthcheck == Healthcheck(test=["CMD-SHELL", "true"], interval_s=2.0, retries=5)
    assert (opts.docker.stop_signal, opts.docker.stop_timeout) == ("SIGUSR1", 3)


def test_bad_container_options_are_400() -> None:
    import pytest

    from kvmc.errors import UsageError

    for host in ({"RestartPolicy": {"Name": "sometimes"}}, {"RestartPolicy": {"Name": "always", "MaximumRetryCount": 2}},
                 {"Ulimits": [{"Name": "bogus", "Soft": 1, "Hard": 1}]}):
        with pytest.raises(UsageError):
            create_options(_body(**host), None)

"""Issue 16's pure rules: restart policies and their back-off, health check results, ulimits,
capabilities, hosts, --mount, durations, --platform, and the events they make."""

from __future__ import annotations

import pytest

from kvmc import health
from kvmc.errors import UsageError
from kvmc.health import HEALTHY, STARTING, UNHEALTHY, Health, Healthcheck, HealthResult
from kvmc.options import (ContainerOptions, MountSpec, RestartPolicy, Ulimit, check_platform, dropped_caps,
                          hosts_lines, parse_bytes, parse_duration, parse_extra_host, parse_mount, restart_delay,
                          signal_number)
from kvmc.service.events import Seen, diff


# ------------------------------------------------------------------ restart policies
@pytest.mark.parametrize("text, policy", [
    (None, RestartPolicy("no")), ("no", RestartPolicy("no")), ("always", RestartPolicy("always")),
    ("unless-stopped", RestartPolicy("unless-stopped")), ("on-failure", RestartPolicy("on-failure")),
    ("on-failure:3", RestartPolicy("on-failure", 3)),
])
def test_restart_policy_parse(text: str | None, policy: RestartPolicy) -> None:
    assert RestartPolicy.parse(text) == policy
    assert str(policy) == (text or "no")


@pytest.mark.parametrize("text, message", [
    ("sometimes", "invalid restart policy 'sometimes'"), ("always:3", "cannot be used with restart policy 'always'"),
    ("on-failure:x", "must be a number"), ("on-failure:-1", "cannot be negative"),
])
def test_restart_policy_refused(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        RestartPolicy.parse(text)


def test_should_restart_as_moby() -> None:
    always, unless, on_failure = RestartPolicy("always"), RestartPolicy("unless-stopped"), RestartPolicy("on-failure", 2)
    assert always.should_restart(0, manually_stopped=True, restart_count=99)
    assert unless.should_restart(0, False, 5) and not unless.should_restart(1, True, 0)
    assert on_failure.should_restart(1, False, 0) and on_failure.should_restart(137, False, 1)
    assert not on_failure.should_restart(1, False, 2) and not on_failure.should_restart(0, False, 0)
    assert RestartPolicy("on-failure").should_restart(1, False, 1000)  # no maximum
    assert not RestartPolicy("no").should_restart(1, False, 0)


def test_restart_back_off_doubles_to_a_minute_and_resets_after_ten_seconds() -> None:
    delays, previous = [], 0.0
    for _ in range(12):
        previous = restart_delay(previous, ran_s=0.5)
        delays.append(previous)
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and delays[-1] == 60.0 and max(delays) == 60.0
    assert restart_delay(60.0, ran_s=10.0) == 0.1


# --------------------------------------------------------------------- health rules
CHECK = Healthcheck(test=["CMD", "true"], interval_s=1, retries=2, start_period_s=5)


def _result(code: int) -> HealthResult:
    return HealthResult("2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", code, "out")


def test_health_results_as_moby() -> None:
    h = health.restarted(None)
    assert h == Health(STARTING, 0, [])
    h = health.record_result(h, _result(1), CHECK, seconds_since_start=1)  # in the start period: not counted
    assert (h.status, h.failing_streak, len(h.log)) == (STARTING, 0, 1)
    h = health.record_result(h, _result(1), CHECK, seconds_since_start=6)
    assert (h.status, h.failing_streak) == (STARTING, 1)
    h = health.record_result(h, _result(1), CHECK, seconds_since_start=7)
    assert (h.status, h.failing_streak) == (UNHEALTHY, 2)
    h = health.record_result(h, _result(0), CHECK, seconds_since_start=8)
    assert (h.status, h.failing_streak) == (HEALTHY, 0)
    h = health.record_result(h, _result(1), CHECK, seconds_since_start=1)  # healthy once: failures count
    assert (h.status, h.failing_streak) == (HEALTHY, 1)
    for _ in range(10):
        h = health.record_result(h, _result(0), CHECK, 20)
    assert len(h.log) == health.MAX_LOG
    again = health.restarted(h)
    assert (again.status, again.failing_streak, again.log) == (STARTING, 0, h.log)


def test_probe_interval_and_defaults() -> None:
    check = Healthcheck(test=["CMD-SHELL", "curl -f localhost"], start_period_s=10, start_interval_s=2)
    assert check.command == ["/bin/sh", "-c", "curl -f localhost"]
    assert (check.interval, check.timeout, check.max_failures) == (30.0, 30.0, 3)
    assert health.next_probe_in(check, Health(STARTING), 3) == 2
    assert health.next_probe_in(check, Health(HEALTHY), 3) == 30
    assert health.next_probe_in(check, Health(STARTING), 11) == 30


def test_healthcheck_merge_and_docker_json() -> None:
    image = Healthcheck.from_docker({"Test": ["CMD-SHELL", "check"], "Interval": 5_000_000_000, "Retries": 4})
    assert image == Healthcheck(test=["CMD-SHELL", "check"], interval_s=5.0, retries=4)
    merged = health.merge(Healthcheck(interval_s=1), image)
    assert merged == Healthcheck(test=["CMD-SHELL", "check"], interval_s=1.0, retries=4)
    assert health.merge(Healthcheck(test=["NONE"]), image) is None
    assert health.merge(None, None) is None
    assert merged.to_docker() == {"Test": ["CMD-SHELL", "check"], "Interval": 1_000_000_000, "Retries": 4}
    with pytest.raises(UsageError, match="less than 1ms"):
        Healthcheck(test=["CMD", "x"], interval_s=0.0001).validate()
    with pytest.raises(UsageError, match="health check type"):
        Healthcheck(test=["SHELL", "x"]).validate()


# ------------------------------------------------------------------ the other options
def test_ulimits() -> None:
    assert Ulimit.parse("nofile=100:200") == Ulimit("nofile", 100, 200)
    assert Ulimit.parse("nproc=512") == Ulimit("nproc", 512, 512)
    assert Ulimit.parse("core=-1").agent_item == "core:-1:-1"
    assert str(Ulimit.parse("nofile=1:2")) == "nofile=1:2"
    for bad in ("nofile", "nofile=x", "bogus=1", "nofile=200:100", "nofile=-2"):
        with pytest.raises(UsageError):
            Ulimit.parse(bad)


def test_capabilities() -> None:
    assert dropped_caps([], ["NET_RAW", "cap_net_admin"]) == [12, 13]
    assert dropped_caps(["NET_RAW"], ["NET_RAW"]) == []
    assert dropped_caps(["CHOWN"], ["ALL"]) == list(range(1, 41))
    assert dropped_caps(["ALL"], ["ALL"]) == []
    assert ContainerOptions(cap_drop=["NET_RAW"], privileged=True).dropped_caps == []
    with pytest.raises(UsageError, match="unknown capability"):
        dropped_caps([], ["NET_FOO"])


def test_extra_hosts_and_dns() -> None:
    assert parse_extra_host("db:192.0.2.7") == "db:192.0.2.7"
    assert parse_extra_host("db=2001:db8::1") == "db:2001:db8::1"
    assert parse_extra_host("v6:[2001:db8::2]") == "v6:2001:db8::2"
    assert parse_extra_host("gw:host-gateway") == "gw:host-gateway"
    assert hosts_lines(["db:192.0.2.7", "gw:host-gateway"], "10.0.2.2") == ["192.0.2.7 db", "10.0.2.2 gw"]
    for bad in ("db", "db:notanip", "two words:1.2.3.4", ":1.2.3.4"):
        with pytest.raises(UsageError):
            parse_extra_host(bad)
    options = ContainerOptions(dns=["8.8.8.8"], dns_search=["."], dns_options=["ndots:1"]).check()
    assert (options.dns, options.dns_search) == (["8.8.8.8"], [])
    for bad in (ContainerOptions(dns=["dns.example"]), ContainerOptions(dns_search=["a b"]),
                ContainerOptions(dns_options=["x\nnameserver 1.1.1.1"])):
        with pytest.raises(UsageError):
            bad.check()


@pytest.mark.parametrize("text, spec", [
    ("type=bind,source=/src,target=/app,readonly", MountSpec(volume="/src:/app:ro")),
    ("type=volume,src=data,dst=/data", MountSpec(volume="data:/data")),
    ("src=data,target=/data,ro=false", MountSpec(volume="data:/data")),
    ("type=volume,target=/cache", MountSpec(anonymous="/cache")),
    ("type=tmpfs,destination=/run,tmpfs-size=64m,tmpfs-mode=1770", MountSpec(tmpfs="/run:size=67108864,mode=1770")),
    ("type=tmpfs,dst=/t", MountSpec(tmpfs="/t")),
    ('type=bind,"source=/a,b",target=/x,bind-propagation=rprivate', MountSpec(volume="/a,b:/x")),
])
def test_mount_flag(text: str, spec: MountSpec) -> None:
    assert parse_mount(text) == spec


@pytest.mark.parametrize("text", ["type=bind,target=/x", "source=a", "type=npipe,src=a,dst=/b", "type=tmpfs,src=a,dst=/b",
                                  "type=volume,src=a,dst=/b,bogus=1", "type=bind,src=/a,dst=/b,readonly=maybe"])
def test_mount_flag_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_mount(text)


def test_durations_sizes_signals_platforms() -> None:
    assert parse_duration("30s", "x") == 30 and parse_duration("1m30s", "x") == 90
    assert parse_duration("500ms", "x") == 0.5 and parse_duration("1h", "x") == 3600 and parse_duration("0", "x") == 0
    with pytest.raises(UsageError):
        parse_duration("10", "--health-interval")
    assert parse_bytes("64m", "x") == 64 << 20 and parse_bytes("1g", "x") == 1 << 30 and parse_bytes("512", "x") == 512
    assert signal_number("SIGUSR1") == signal_number("usr1") == signal_number("10") == 10
    with pytest.raises(UsageError):
        signal_number("SIGNOPE")
    for ok in (None, "linux/amd64", "linux", "linux/x86_64", "LINUX/AMD64"):
        check_platform(ok)
    for bad in ("linux/arm64", "windows/amd64", "linux/amd64/v9"):
        with pytest.raises(UsageError, match="linux/amd64"):
            check_platform(bad)


# ------------------------------------------------------------------------- events
def _seen(state: str, started: str | None, finished: str | None, code: int | None = None, restarts: int = 0,
          status: str | None = None) -> Seen:
    return Seen(state, started, finished, code, "web", "img", (("tier", "front"),), restarts, status)


def test_events_of_restarts_and_health() -> None:
    created = {"c": _seen("running", "t1", None)}
    restarting = {"c": _seen("restarting", None, "t2", 3, restarts=1)}
    assert [e.action for e in diff(created, restarting)] == ["die"]
    assert diff(created, restarting)[0].attributes["exitCode"] == "3"
    again = {"c": _seen("running", "t3", "t2", 3, restarts=1)}
    assert [e.action for e in diff(restarting, again)] == ["start"]
    # A restart between two snapshots (never seen restarting) is still a die, then a start.
    assert [e.action for e in diff(created, again)] == ["die", "start"]
    healthy = {"c": _seen("running", "t3", "t2", 3, restarts=1, status="healthy")}
    [event] = diff(again, healthy)
    assert (event.action, event.attributes["name"], event.attributes["tier"]) == ("health_status: healthy", "web", "front")
    assert diff(healthy, healthy) == []
    stopped = {"c": _seen("exited", "t3", "t4", 0, restarts=1, status="healthy")}
    assert [e.action for e in diff(healthy, stopped)] == ["die"]


def test_no_event_for_a_health_check_starting() -> None:
    running = {"c": _seen("running", "t1", None)}
    starting = {"c": _seen("running", "t1", None, status="starting")}
    assert diff(running, starting) == []
    unhealthy = {"c": _seen("running", "t1", None, status="unhealthy")}
    assert [e.action for e in diff(starting, unhealthy)] == ["health_status: unhealthy"]

"""Issue 16's container options through the engine and the monitor, on the fake hypervisor:
restart policies (the monitor boots the container again), health checks (the monitor's probes
through the agent), and the agent items they become (ulimits, DNS, hosts, stop signal).

The fake hypervisor runs the real agent in namespaces, so these are real processes; see
tests/unit/test_engine.py for the fixtures. Needs root, as the agent tests do.
"""

from __future__ import annotations

import io
import signal
import time
from typing import Any

import pytest

import kvmc.monitor as monitor_mod
from kvmc.errors import UsageError
from kvmc.health import HEALTHY, STARTING, UNHEALTHY, Healthcheck
from kvmc.options import ContainerOptions, RestartPolicy, Ulimit
from kvmc.state import State
from tests.fakes import agent_bin, fake_hypervisor, root  # noqa: F401 (fixtures)
from tests.unit.test_engine import Env, busybox_images, env, wait_for  # noqa: F401 (fixtures)

WAIT_S = 30.0


def run_detached(env: Env, *command: str, options: ContainerOptions | None = None, **kw: Any):  # noqa: ANN201
    record, code = env.svc.run(env.opts(*command, detach=True, options=options or ContainerOptions(), **kw),
                               None, io.BytesIO(), io.BytesIO())
    assert code is None
    return record


def current(env: Env, record):  # noqa: ANN001, ANN201
    return env.engine.observe(env.state.load(record.id))


def log_lines(env: Env, record) -> list[str]:  # noqa: ANN001
    return [entry.data.decode() for entry in env.svc.logs(record.id)]


# ------------------------------------------------------------------ restart policies
def test_on_failure_restarts_n_times_then_stops(env: Env) -> None:
    options = ContainerOptions(restart=RestartPolicy.parse("on-failure:2"))
    record = run_detached(env, "sh", "-c", "echo run; exit 3", name="flaky", options=options)
    done = wait_for(lambda: (r := current(env, record)).state == State.EXITED and r, WAIT_S, "the last exit")
    assert (done.exit_code, done.restart_count) == (3, 2)
    assert log_lines(env, record) == ["run\n"] * 3
    assert env.hv.record(record.domain)["boots"] == 3  # each restart is a fresh boot of the same VM
    env.wait_monitors()
    assert env.svc.wait("flaky") == 3
    env.svc.remove("flaky")


def test_on_failure_does_not_restart_a_success_and_start_resets_the_count(env: Env) -> None:
    options = ContainerOptions(restart=RestartPolicy.parse("on-failure"))
    record = run_detached(env, "sh", "-c", "exit 0", name="fine", options=options)
    done = wait_for(lambda: (r := current(env, record)).state == State.EXITED and r, WAIT_S, "the exit")
    assert (done.exit_code, done.restart_count) == (0, 0)
    env.wait_monitors()
    env.svc.remove("fine")


def test_always_restarts_after_the_process_is_killed_not_after_stop(env: Env) -> None:
    options = ContainerOptions(restart=RestartPolicy.parse("always"))
    record = run_detached(env, "sh", "-c", "echo up; while :; do sleep 0.1; done", name="keeper", options=options)
    # A signal that is not the stop signal or KILL keeps the policy (docker's kill -s USR1): the
    # shell dies of it and the monitor starts the container again.
    env.svc.kill("keeper", "USR1")
    again = wait_for(lambda: (r := current(env, record)).restart_count == 1 and r.state == State.RUNNING
                     and r.started_at and r, WAIT_S, "the restart")
    assert again.exit_code == 128 + signal.SIGUSR1  # the last exit, kept while it runs again
    assert env.hv.record(record.domain)["boots"] == 2
    env.svc.stop("keeper", 2)  # a stop is for good
    time.sleep(1.0)
    stopped = current(env, record)
    assert (stopped.state, stopped.restart_count, stopped.manually_stopped) == (State.EXITED, 1, True)
    assert env.hv.record(record.domain)["boots"] == 2
    # A start by hand resets the count and the stop; docker's kill (SIGKILL) ends it for good too.
    env.svc.start("keeper")
    assert (r := current(env, record)).restart_count == 0 and not r.manually_stopped
    env.svc.kill("keeper")
    gone = wait_for(lambda: (r := current(env, record)).state == State.EXITED and r, WAIT_S, "the kill")
    assert gone.exit_code == 137
    time.sleep(1.0)
    assert current(env, record).state == State.EXITED
    env.wait_monitors()
    env.svc.remove("keeper")


def test_stop_during_the_back_off_ends_the_restarts(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor_mod, "restart_delay", lambda previous, ran: 30.0)  # the forked monitor's copy
    options = ContainerOptions(restart=RestartPolicy.parse("unless-stopped"))
    record = run_detached(env, "sh", "-c", "exit 7", name="backoff", options=options)
    waiting = wait_for(lambda: (r := current(env, record)).state == State.RESTARTING and r, WAIT_S, "restarting")
    assert (waiting.exit_code, waiting.restart_count, waiting.is_live) == (7, 1, True)
    assert env.svc.list()[0].id == record.id  # restarting counts as running (docker's Running: true)
    t0 = time.monotonic()
    _, was_running = env.svc.stop("backoff", 5)
    assert was_running and time.monotonic() - t0 < 5
    after = current(env, record)
    assert (after.state, after.exit_code, after.restart_count, after.manually_stopped) == (State.EXITED, 7, 1, True)
    env.wait_monitors()
    env.svc.remove("backoff")


def test_wait_next_exit_sees_an_exit_followed_by_a_restart(env: Env) -> None:
    options = ContainerOptions(restart=RestartPolicy.parse("on-failure:1"))
    record = run_detached(env, "sh", "-c", "sleep 0.5; exit 2", name="nexter", options=options)
    assert env.svc.wait("nexter", "next-exit") == 2
    assert env.svc.wait("nexter", "not-running") == 2
    assert current(env, record).restart_count == 1
    env.wait_monitors()
    env.svc.remove("nexter")


def test_restart_and_rm_conflict(env: Env) -> None:
    with pytest.raises(UsageError, match="--restart and --rm"):
        env.svc.create(env.opts("true", auto_remove=True, options=ContainerOptions(restart=RestartPolicy("always"))))
    env.nothing_left()


# --------------------------------------------------------------------- health checks
def test_passing_health_check_turns_healthy(env: Env) -> None:
    check = Healthcheck(test=["CMD-SHELL", "echo fine; test -e /bin/sh"], interval_s=0.2)
    record = run_detached(env, "sleep", "100", name="healthy", options=ContainerOptions(healthcheck=check))
    assert current(env, record).health.status in (STARTING, HEALTHY)
    health = wait_for(lambda: (h := current(env, record).health) and h.status == HEALTHY and h, WAIT_S, "healthy")
    assert health.failing_streak == 0 and health.log[-1].exit_code == 0 and health.log[-1].output == "fine\n"
    wait_for(lambda: len(current(env, record).health.log) == 5, WAIT_S, "five probes")
    time.sleep(0.5)
    assert len(current(env, record).health.log) == 5  # docker keeps the last five
    env.svc.remove("healthy", force=True)


def test_failing_health_check_turns_unhealthy_after_the_retries(env: Env) -> None:
    check = Healthcheck(test=["CMD", "sh", "-c", "echo nope >&2; exit 1"], interval_s=0.2, retries=2)
    record = run_detached(env, "sleep", "100", name="sick", options=ContainerOptions(healthcheck=check))
    health = wait_for(lambda: (h := current(env, record).health) and h.status == UNHEALTHY and h, WAIT_S, "unhealthy")
    assert health.failing_streak == 2 and [r.exit_code for r in health.log] == [1, 1]
    assert health.log[0].output == "nope\n"
    assert current(env, record).state == State.RUNNING  # docker does not act on it: only reports
    env.svc.remove("sick", force=True)


def test_health_check_timeout_and_start_period(env: Env) -> None:
    check = Healthcheck(test=["CMD", "sleep", "5"], interval_s=0.2, timeout_s=0.3, retries=1, start_period_s=1.5,
                        start_interval_s=0.2)
    record = run_detached(env, "sleep", "100", name="slow", options=ContainerOptions(healthcheck=check))
    first = wait_for(lambda: (h := current(env, record).health) and h.log and h, WAIT_S, "a probe")
    assert first.log[0].exit_code == -1 and first.log[0].output == "Health check exceeded timeout (0.3s)"
    assert first.status == STARTING and first.failing_streak == 0  # within the start period: not counted
    health = wait_for(lambda: (h := current(env, record).health) and h.status == UNHEALTHY and h, WAIT_S, "unhealthy")
    assert health.failing_streak == 1
    env.svc.remove("slow", force=True)


def test_exec_ids_of_the_probes_are_the_monitors(env: Env) -> None:
    """Clients choose exec ids below the probes' range: an exec works while probes run."""
    check = Healthcheck(test=["CMD", "true"], interval_s=0.05)
    run_detached(env, "sleep", "100", name="busy", options=ContainerOptions(healthcheck=check))
    for _ in range(5):
        out = io.BytesIO()
        assert env.svc.exec("busy", monitor_mod_opts(["echo", "hi"]), None, out, io.BytesIO()) == 0
        assert out.getvalue() == b"hi\n"
    env.svc.remove("busy", force=True)


def monitor_mod_opts(command: list[str]):  # noqa: ANN201
    from kvmc.process import ProcessOptions

    return ProcessOptions(command=command)


# -------------------------------------------------------------- what the agent gets
def test_ulimits_dns_hosts_and_exec_inheritance(env: Env) -> None:
    options = ContainerOptions(ulimits=[Ulimit.parse("nofile=100:100")], dns=["192.0.2.53"], dns_search=["corp"],
                               dns_options=["ndots:2"], extra_hosts=["db:192.0.2.7", "gw:host-gateway"],
                               cap_drop=["NET_RAW"])
    out = io.BytesIO()
    record, code = env.svc.run(env.opts("sh", "-c", "ulimit -n; cat /etc/resolv.conf /etc/hosts", name="opts",
                                        options=options, network="none"), None, out, io.BytesIO())
    assert code == 0
    assert out.getvalue().decode() == (
        "100\nnameserver 192.0.2.53\nsearch corp\noptions ndots:2\n"
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n192.0.2.7 db\n10.0.2.2 gw\n")
    assert record.options.extra_hosts == ["db:192.0.2.7", "gw:host-gateway"]
    env.wait_monitors()
    env.svc.remove("opts")

    run_detached(env, "sleep", "100", name="execs", options=ContainerOptions(ulimits=[Ulimit.parse("nofile=64")],
                                                                         cap_drop=["NET_RAW"]))
    for privileged, caps in ((False, "0"), (True, "1")):
        out = io.BytesIO()
        script = "ulimit -n; grep CapBnd /proc/self/status | cut -f2"
        assert env.svc.exec("execs", monitor_mod_opts(["sh", "-c", script]), None, out, io.BytesIO(),
                            privileged=privileged) == 0
        limit, bnd = out.getvalue().decode().split()
        assert limit == "64" and str((int(bnd, 16) >> 13) & 1) == caps  # CAP_NET_RAW is 13
    env.svc.remove("execs", force=True)


def test_stop_signal_reaches_the_process(env: Env) -> None:
    script = "trap 'echo got-usr1; exit 5' USR1; echo ready; while :; do sleep 0.1; done"
    record = run_detached(env, "sh", "-c", script, name="sig", docker=_docker(stop_signal="SIGUSR1"))
    wait_for(lambda: "ready\n" in log_lines(env, record), WAIT_S, "ready")
    env.svc.stop("sig", 5)
    # (the shell reports its sleep killed by the same signal: the agent signals the process group)
    assert current(env, record).exit_code == 5 and "got-usr1\n" in log_lines(env, record)
    env.wait_monitors()
    env.svc.remove("sig")


def _docker(**kw: Any):  # noqa: ANN202
    from kvmc.runtime import DockerFields

    return DockerFields(**kw)


def test_start_by_policy_after_the_host_went_down(env: Env) -> None:
    """``kvmc system boot`` (and kvmc serve as it starts): after the VMs and monitors died with
    the host, the containers whose policy says so run again; the others stay down."""
    import os

    from kvmc.service.system import SystemService

    def policy(name: str) -> ContainerOptions:
        return ContainerOptions(restart=RestartPolicy.parse(name))

    records = {name: run_detached(env, "sleep", "100", name=name, options=policy(pol))
               for name, pol in (("a", "always"), ("u", "unless-stopped"), ("n", "no"), ("s", "unless-stopped"),
                                 ("f", "on-failure"))}
    monitors = {name: env.monitor_of(record) for name, record in records.items()}
    env.svc.stop("s", 1)  # stopped by a user: unless-stopped keeps it down
    wait_for(lambda: monitors["s"].poll() is not None, WAIT_S, "s's monitor to end")
    for name in ("a", "u", "n", "f"):  # the host goes down: monitors and VMs with it
        os.kill(monitors[name].pid, signal.SIGKILL)
        os.waitpid(monitors[name].pid, 0)
        env.hv.destroy(records[name].domain)
    env.monitors.clear()
    reports = SystemService(env.engine).boot()
    assert sorted((r.ref, r.ok) for r in reports) == [("a", True), ("f", True), ("u", True)]
    states = {name: current(env, record) for name, record in records.items()}
    assert {n: str(r.state) for n, r in states.items()} == {"a": "running", "u": "running", "f": "running",
                                                            "n": "exited", "s": "exited"}
    assert states["n"].exit_code == 137  # died with the host; no policy to bring it back
    assert SystemService(env.engine).boot() == []  # running ones are left alone
    for name in records:
        env.svc.remove(name, force=True)

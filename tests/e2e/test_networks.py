"""kvmc networks end to end: real VMs on a network reach each other by name, alias and short
id; a container on another network cannot; rm is refused while containers are attached; and
nothing is left behind (taps, namespaces, DNS servers). Through the API, compose v2 brings up
a two-service project whose services reach each other by service name, and down removes its
network.

Traffic stays inside the namespaces kvmc makes: the containers talk to each other on their
network's subnet only. The other network is --internal (no user-mode NIC), so an attempt to
reach the first network's address has no route at all instead of going out through slirp, and
an unknown plain name gets NXDOMAIN from the network's own DNS server (nothing asks further).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc
from tests.e2e.docker_clients import compose, run_docker
from tests.e2e.serve import KvmcServe

SERVER = ["nc", "-ll", "-p", "80", "-e", "echo", "hello"]
"""A TCP server that greets every client (busybox nc, persistent)."""


def _id(kvmc: Kvmc, name: str) -> str:
    return json.loads(kvmc("inspect", name, check=True).stdout)[0]["Id"]


def _network_id(kvmc: Kvmc, name: str) -> str:
    return json.loads(kvmc("network", "inspect", name, check=True).stdout)[0]["id"]


def _host_leftovers(network_ids: list[str]) -> list[str]:
    """Taps, namespaces and DNS servers of these networks still on the host (zombies, which
    the host's init reaps when it gets to it, are not processes that run)."""
    shorts = [n[:12] for n in network_ids]
    found = []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    found += [line.split(":")[1].strip() for line in links.splitlines() if line.split(":")[1].strip().startswith("kvt")
              and any(s in line for s in shorts)]
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    found += [n for n in netns if any(n == f"kvmc-{s}" for s in shorts)]
    ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=True).stdout
    found += [line for line in ps.splitlines() if "dnsmasq" in line and not line.startswith("Z")
              and any(f"/net/{s}/" in line for s in shorts)]
    return found


def _our_taps(kvmc: Kvmc) -> list[str]:
    """Taps in the host's namespace labelled with this session's state root."""
    taps = [n for n in os.listdir("/sys/class/net") if n.startswith("kvt")]
    mine = []
    for tap in taps:
        try:
            if Path(f"/sys/class/net/{tap}/ifalias").read_text().strip() == f"kvmc {kvmc.data_dir}":
                mine.append(tap)
        except OSError:
            pass
    return mine


def test_containers_reach_each_other_by_name_alias_and_short_id_other_networks_cannot(kvmc: Kvmc) -> None:
    kvmc("network", "create", "front", check=True)
    kvmc("network", "create", "--internal", "back", check=True)
    ids = [_network_id(kvmc, "front"), _network_id(kvmc, "back")]
    try:
        kvmc("run", "-d", "--name", "web", "--network", "front", "--network-alias", "www", DEFAULT_IMAGE, *SERVER,
             check=True)
        short = _id(kvmc, "web")[:12]
        web = json.loads(kvmc("network", "inspect", "front", check=True).stdout)[0]["containers"][0]
        assert web["name"] == "web" and web["address"].startswith("172.") and web["aliases"] == ["www"]

        # The client is created, then connected (one more NIC at its start) with an alias.
        kvmc("create", "--name", "client", DEFAULT_IMAGE, "sh", "-c",
             f"for n in web www {short} client cl; do nc -w 5 $n 80 </dev/null || echo fail $n; done; "
             "grep -c . /etc/resolv.conf; hostname -i", check=True)
        kvmc("network", "connect", "--alias", "cl", "front", "client", check=True)
        refused = kvmc("network", "connect", "back", "web")  # running: no NIC hotplug on microvm
        assert refused.returncode == 125 and b"running" in refused.stderr
        run = kvmc("start", "-a", "client")
        out = run.stdout.decode()
        assert run.returncode == 0, run.stderr
        # web, its alias, its short id answer; the client's own names resolve to itself (no server there)
        assert out.startswith("hello\nhello\nhello\n"), out
        assert "fail web" not in out and "fail www" not in out and f"fail {short}" not in out
        assert out.splitlines()[-2] == "2"  # the network's DNS server, then slirp's
        assert out.splitlines()[-1].startswith("172.")  # hosts names the container by its network address

        # On the other network: the name is unknown, the address has no route.
        other = kvmc("run", "--rm", "--network", "back", DEFAULT_IMAGE, "sh", "-c",
                     f"nc -w 3 web 80 </dev/null; echo rc=$?; nc -w 3 {web['address']} 80 </dev/null; echo rc=$?")
        text = other.stdout.decode() + other.stderr.decode()
        assert "hello" not in text and text.count("rc=1") == 2, text
        assert "bad address 'web'" in text and "Network is unreachable" in text

        busy = kvmc("network", "rm", "front")
        assert busy.returncode != 0 and b"web" in busy.stderr and b"client" in busy.stderr
    finally:
        kvmc("rm", "-f", "web", "client")
    assert kvmc("network", "rm", "front", "back").returncode == 0
    assert _host_leftovers(ids) == []
    assert _our_taps(kvmc) == []
    gc = kvmc("gc", check=True).stdout.decode()
    assert "network namespace" not in gc and "tap" not in gc


def test_pooled_run_on_a_network_boots_cold_and_says_why(kvmc: Kvmc) -> None:
    """Pool members and templates have no NIC for a network: -v says so, and the run works."""
    kvmc("network", "create", "solo", check=True)
    try:
        run = kvmc("-v", "run", "--rm", "--network", "solo", DEFAULT_IMAGE, "sh", "-c", "ip -o -4 addr show eth1")
        assert run.returncode == 0, run.stderr
        assert b"not pooled: network solo needs a NIC of its own" in run.stderr
        assert b"inet 172." in run.stdout
    finally:
        kvmc("network", "rm", "solo")


COMPOSE = """\
services:
  web:
    image: kvmc/busybox
    command: ["nc", "-ll", "-p", "80", "-e", "echo", "hello-from-web"]
  client:
    image: kvmc/busybox
    command: ["sh", "-c", "while ! nc -w 2 web 80 </dev/null >/tmp/got; do sleep 0.5; done; cat /tmp/got; sleep 300"]
"""


def test_compose_services_reach_each_other_by_service_name(kvmc_serve: KvmcServe, tmp_path: Path) -> None:
    project = tmp_path / "netproj"
    project.mkdir()
    (project / "compose.yaml").write_text(COMPOSE)
    env = kvmc_serve.env
    try:
        compose(env, project, "up", "-d", timeout=240, check=True)
        network = json.loads(run_docker(env, "network", "inspect", "netproj_default", check=True).stdout)[0]
        assert len(network["Containers"]) == 2
        assert network["IPAM"]["Config"][0]["Subnet"].startswith("172.")
        deadline = time.monotonic() + 60
        logs = ""
        while time.monotonic() < deadline:
            logs = compose(env, project, "logs", "client", check=True).stdout.decode()
            if "hello-from-web" in logs:
                break
            time.sleep(1)
        assert "hello-from-web" in logs, logs
        web = json.loads(run_docker(env, "inspect", "netproj-web-1", check=True).stdout)[0]
        endpoint = web["NetworkSettings"]["Networks"]["netproj_default"]
        assert "web" in endpoint["Aliases"] and endpoint["IPAddress"].startswith("172.")
        # docker stats' NET I/O: the web VM's NIC on the network counts the exchange (its tap's
        # counters, through libvirt)
        net_io = run_docker(env, "stats", "--no-stream", "--format", "{{.NetIO}}", "netproj-web-1",
                            check=True, timeout=60).stdout.decode().strip()
        received, sent = (part.strip() for part in net_io.split("/"))
        assert received != "0B" and sent != "0B", net_io
        network_id = network["Id"]
    finally:
        down = compose(env, project, "down", "-t", "1", timeout=240)
    assert down.returncode == 0, down.stderr
    listed = run_docker(env, "network", "ls", "--format", "{{.Name}}", check=True).stdout.decode().split()
    assert "netproj_default" not in listed
    assert _host_leftovers([network_id]) == []

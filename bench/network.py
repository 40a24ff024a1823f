"""Container networking: TCP round-trip latency and throughput between two containers on a kvmc
network, beside the same traffic through slirp (a published port), in one run.

One server container (bench/tcpbench.c, built static into an image here) sits on a kvmc
network and publishes its port on 127.0.0.1. One client container on the same network
measures, from inside its guest: (1) to the server by name over the network (tap -> bridge in
the network's namespace -> tap), (2) to the server through slirp and the published port
(guest -> slirp -> the host's 127.0.0.1 -> slirp -> guest: what two containers without a
shared network must do). The host measures (3) to the server through the published port
(host -> slirp -> guest). Then start-up: a cold ``run --rm IMAGE true`` with and without a
network, the time to bring a network's namespace and DNS server up, and that DNS server's
memory. Traffic goes only to 127.0.0.1 and to addresses inside the network's namespace.

Run with: .venv/bin/python bench/network.py [--round-trips 2000] [--mib 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = "kvmc-bench/tcpbench:1"
PORT = 7000


def kvmc(*args: str, check: bool = True) -> bytes:
    proc = subprocess.run([sys.executable, "-m", "kvmc", *args], capture_output=True)
    if check and proc.returncode != 0:
        sys.exit(f"kvmc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout


def build_image(scratch: Path) -> None:
    from kvmc.images import add_layer, build_busybox_layout

    binary = scratch / "tcpbench"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(HERE / "tcpbench.c")], check=True,
                   capture_output=True)  # (glibc warns that a static getaddrinfo needs its NSS: not for IPs/DNS)
    layout = build_busybox_layout(scratch / "layout", "1")

    def add(rootfs: Path) -> None:
        shutil.copy2(binary, rootfs / "bin/tcpbench")

    add_layer(layout, "1", add)
    kvmc("image", "import", str(layout), "--name", IMAGE)


def parse(out: bytes, key: str) -> float:
    match = re.search(rf"{key}=([0-9.]+)", out.decode())
    if not match:
        sys.exit(f"no {key} in {out!r}")
    return float(match.group(1))


def host_rtt_us(port: int, n: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"R")
        t0 = time.perf_counter()
        for _ in range(n):
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                sys.exit("host round trip: connection lost")
        return (time.perf_counter() - t0) * 1e6 / n


def host_tput_mib_s(port: int, mib: int) -> float:
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        t0 = time.perf_counter()
        sock.sendall(b"T")
        for _ in range(mib * 16):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while len(data) < 8:
            part = sock.recv(8 - len(data))
            if not part:
                break
            data += part
        elapsed = time.perf_counter() - t0
    if len(data) != 8 or struct.unpack("<Q", data)[0] != mib << 20:
        sys.exit(f"host throughput: the server counted {data!r}")
    return mib / elapsed


def wait_for_port(port: int) -> None:
    """slirp accepts before the guest listens, then closes: wait for a real greeting path."""
    for _ in range(100):
        try:
            host_rtt_us(port, 1)
            return
        except (OSError, SystemExit):
            time.sleep(0.2)
    sys.exit("the server container never answered on its published port")


def cold_run_s(*network: str) -> float:
    t0 = time.perf_counter()
    kvmc("run", "--rm", "--no-pool", *network, IMAGE, "true")
    return time.perf_counter() - t0


def network_up_ms(data_dir: Path, run_dir: Path) -> tuple[float, float]:
    """(ms to bring a network's namespace, bridge and DNS server up, its dnsmasq's RSS in MiB)."""
    from kvmc.net.host import NetnsHost
    from kvmc.net.store import NetworkStore

    store = NetworkStore(data_dir / "networks")
    network = store.create(f"bench-up-{os.getpid()}")
    host = NetnsHost(run_dir, str(data_dir))
    try:
        with host.locked(network.id):
            t0 = time.perf_counter()
            host.up(network)
            elapsed = (time.perf_counter() - t0) * 1000
            pid = int((host.dir(network.id) / "dnsmasq.pid").read_text())
            rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024
            host.down(network.id)
    finally:
        store.remove(network)
        host.forget_lock(network.id)
    return elapsed, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="measurements of each figure (median)")
    args = parser.parse_args()
    n, mib, runs = args.round_trips, args.mib, args.runs
    from kvmc.config import load_config

    config = load_config()
    net = f"bench-net-{os.getpid()}"
    scratch = Path(tempfile.mkdtemp(prefix="kvmc-bench-net-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    rows: dict[str, list[float]] = {k: [] for k in ("cc_rtt", "cs_rtt", "hs_rtt", "cc_tput", "cs_tput", "hs_tput",
                                                    "cold", "cold_net", "up_ms", "dns_rss")}
    try:
        build_image(scratch)
        kvmc("network", "create", net)
        kvmc("run", "-d", "--name", f"{net}-server", "--network", net, "--network-alias", "server",
             "-p", f"127.0.0.1:{host_port}:{PORT}", IMAGE, "tcpbench", "serve", str(PORT))
        wait_for_port(host_port)
        client = ("for i in $(seq {runs}); do "
                  "tcpbench rtt server {port} {n}; tcpbench rtt 10.0.2.2 {hport} {n}; "
                  "tcpbench tput server {port} {mib}; tcpbench tput 10.0.2.2 {hport} {mib}; done")
        out = kvmc("run", "--rm", "--network", net, IMAGE, "sh", "-c",
                   client.format(runs=runs, port=PORT, hport=host_port, n=n, mib=mib)).decode().splitlines()
        rtts = [parse(line.encode(), "rtt_mean_us") for line in out if "rtt_mean_us" in line]
        tputs = [parse(line.encode(), "tput_mib_s") for line in out if "tput_mib_s" in line]
        if len(rtts) != 2 * runs or len(tputs) != 2 * runs or min(rtts + tputs) <= 0:
            sys.exit("the client container's measurements are incomplete:\n" + "\n".join(out))
        rows["cc_rtt"], rows["cs_rtt"] = rtts[0::2], rtts[1::2]
        rows["cc_tput"], rows["cs_tput"] = tputs[0::2], tputs[1::2]
        for _ in range(runs):
            rows["hs_rtt"].append(host_rtt_us(host_port, n))
            rows["hs_tput"].append(host_tput_mib_s(host_port, mib))
        kvmc("rm", "-f", f"{net}-server")
        for _ in range(runs):
            rows["cold"].append(cold_run_s())
            rows["cold_net"].append(cold_run_s("--network", net))
            up, rss = network_up_ms(config.data_dir, config.run_dir)
            rows["up_ms"].append(up)
            rows["dns_rss"].append(rss)
    finally:
        kvmc("rm", "-f", f"{net}-server", check=False)
        kvmc("network", "rm", net, check=False)
        shutil.rmtree(scratch, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    table = [
        ("TCP round trip (mean), container<->container on a kvmc network (us)", med["cc_rtt"], med["cc_rtt"] / med["cs_rtt"],
         "ratio <= 1 (vs slirp)"),
        ("TCP round trip (mean), container<->container through slirp + -p (us)", med["cs_rtt"], 1.0, "baseline"),
        ("TCP round trip (mean), host<->container through slirp + -p (us)", med["hs_rtt"], med["hs_rtt"] / med["cs_rtt"], "-"),
        ("TCP throughput, container->container on a kvmc network (MiB/s)", med["cc_tput"],
         med["cc_tput"] / med["cs_tput"], "ratio >= 1 (vs slirp)"),
        ("TCP throughput, container->container through slirp + -p (MiB/s)", med["cs_tput"], 1.0, "baseline"),
        ("TCP throughput, host->container through slirp + -p (MiB/s)", med["hs_tput"], med["hs_tput"] / med["cs_tput"],
         "-"),
        ("cold run --rm IMAGE true, default network (s)", med["cold"], 1.0, "baseline"),
        ("cold run --rm IMAGE true, on a kvmc network (s)", med["cold_net"], med["cold_net"] / med["cold"],
         "ratio <= 1.1"),
        ("network namespace + bridge + DNS server up (ms)", med["up_ms"], med["up_ms"] / (med["cold"] * 1000),
         "ratio <= 0.05 (of a cold run)"),
        ("DNS server (dnsmasq) RSS per network in use (MiB)", med["dns_rss"], float("nan"), "-"),
    ]
    print(f"kvmc networks, median of {runs} ({n} round trips, {mib} MiB per throughput run; TCG guests)")
    print(f"{'figure':<72}{'value':>10}{'ratio':>8}  target")
    for label, value, ratio, target in table:
        ratio_text = "-" if ratio != ratio else f"{ratio:.2f}"
        print(f"{label:<72}{value:>10.2f}{ratio_text:>8}  {target}")
    print("raw: " + json.dumps({k: [round(x, 2) for x in v] for k, v in rows.items()}))


if __name__ == "__main__":
    main()

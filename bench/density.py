"""Density: N idle containers on this host, what each costs in memory and CPU, in one run.

Starts N detached containers running ``sleep`` (by default clones of a pool template made with
`kvmc pool warm --template`, the cheapest way measured: they share the template's RAM file;
``--mode cold`` boots each VM instead), checks that every one answers ``kvmc exec NAME true``,
then measures over ``--seconds``: the PSS of every container's QEMU plus kvmc's own process
per container (its monitor, and the fork server its monitors share), and the CPU time both use; removes the containers and prints the
table with the targets beside it (100 answering, <= 35 MiB, <= 0.5 % of a core each), and a
breakdown by process kind. Memory is PSS (/proc/PID/smaps_rollup): pages shared between
clones (the template's file, QEMU's binary and libraries) count once, split among them.

The translation cache of each VM is capped at --tb-cache MiB (4 by default: an idle clone then
costs ~13 MiB less; docs/platform.md "Density"). KSM is the host's choice: the header says
whether it ran (echo 1 > /sys/kernel/mm/ksm/run; it merged ~4.5 MiB per clone here).
Run with: .venv/bin/python bench/density.py [-n 100] [--mode template|cold] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvmc_bytecode import compile_kvmc

TARGETS = {"answering": 100, "memory": 35.0, "cpu": 0.5}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def kvmc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "kvmc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"kvmc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def qemu_pids() -> dict[str, int]:
    """libvirt domain name -> QEMU pid, from the command lines of running QEMUs."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"qemu-system-x86_64") and b"-name" in args:
            name = args[args.index(b"-name") + 1].decode().split(",")[0].removeprefix("guest=")
            found[name] = int(entry.name)
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def fork_servers(monitors: list[int]) -> list[int]:
    """The monitor fork servers (kvmc/forkserver.py) that forked these monitors: kvmc's own
    memory, split by PSS among them. Not every fork server that runs: another one (an earlier
    run's, with another environment) may end idle during the window, and is no container's."""
    parents = {parent_pid(pid) for pid in monitors}
    return sorted(pid for pid in parents if pid is not None and comm(pid) == "kvmc-forkserver")


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def ksm_line() -> str:
    ksm = Path("/sys/kernel/mm/ksm")
    try:
        run = (ksm / "run").read_text().strip()
        shared, sharing = ((ksm / n).read_text().strip() for n in ("pages_shared", "pages_sharing"))
        return f"KSM run={run} pages_shared={shared} pages_sharing={sharing}"
    except OSError:
        return "KSM: not available"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100, help="how many containers (default 100)")
    parser.add_argument("--image", default="kvmc/busybox")
    parser.add_argument("--memory", default="256m", help="VM memory of each container")
    parser.add_argument("--mode", choices=("template", "cold"), default="template")
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring window (default 30)")
    parser.add_argument("--settle", type=float, default=10.0, help="wait after the last start (default 10)")
    parser.add_argument("--parallel", type=int, default=2, help="concurrent kvmc runs while starting")
    parser.add_argument("--tb-cache", type=int, default=4,
                        help="TCG translation cache MiB per VM (config tcg_tb_cache_mib; default 4, 0: QEMU's)")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    args = parser.parse_args()
    compile_kvmc()  # as an installed kvmc is (bench/kvmc_bytecode.py)
    os.environ["KVMC_TCG_TB_CACHE_MIB"] = str(args.tb_cache)

    prefix = f"density-{os.getpid()}"
    names = [f"{prefix}-{i}" for i in range(args.n)]
    pool_args = ["--no-pool"] if args.mode == "cold" else []
    # A template this run made is removed at the end (its RAM file stays in tmpfs otherwise);
    # one that was there before is left alone, as bench/startup.py does.
    made_template = args.mode == "template" and " made " in kvmc(
        "pool", "warm", "--template", "-m", args.memory, args.image).stdout
    t0 = time.perf_counter()
    try:
        failures: list[str] = []

        def start(name: str) -> bool:
            proc = kvmc("run", "-d", "--name", name, "-m", args.memory, *pool_args, args.image,
                        "sleep", "1000000", check=False)
            if proc.returncode != 0:
                failures.append(f"{name}: {proc.stderr.strip()[-300:]}")
            return proc.returncode == 0

        with ThreadPoolExecutor(args.parallel) as ex:
            up = [name for name, ok in zip(names, ex.map(start, names)) if ok]
        started = len(up)
        start_s = time.perf_counter() - t0
        for failure in failures[:3]:
            print(f"start failed: {failure}", file=sys.stderr)
        time.sleep(args.settle)
        with ThreadPoolExecutor(args.parallel) as ex:
            answering = sum(ex.map(lambda n: kvmc("exec", n, "true", check=False).returncode == 0, up))

        records = json.loads(kvmc("inspect", *up).stdout) if up else []
        by_domain = qemu_pids()
        facts = [r.get("Kvmc", {}) for r in records]
        qemus = [by_domain[f["Domain"]] for f in facts if f.get("Domain") in by_domain]
        monitors = [f["MonitorPid"] for f in facts if f.get("MonitorPid")]
        servers = fork_servers(monitors)
        served = sum(parent_pid(pid) in servers for pid in monitors)
        monitors += servers  # shared by the monitors it forked: its PSS is theirs
        time.sleep(2)  # let the execs' traces settle
        before = {pid: cpu_ticks(pid) for pid in qemus + monitors}
        t_measure = time.perf_counter()
        time.sleep(args.seconds)
        after = {pid: cpu_ticks(pid) for pid in qemus + monitors}
        window = time.perf_counter() - t_measure
        pss_q = sum(pss_kib(p) for p in qemus) / 1024
        pss_m = sum(pss_kib(p) for p in monitors) / 1024
        cpu = {pid: (after[pid] - before[pid]) / CLK_TCK / window * 100 for pid in before}
        cpu_q = sum(cpu[p] for p in qemus)
        cpu_m = sum(cpu[p] for p in monitors)
        ksm = ksm_line()
    finally:
        if not args.keep:
            for i in range(0, len(names), 20):
                kvmc("rm", "-f", *names[i:i + 20], check=False)
            if made_template:
                kvmc("pool", "rm", args.image, "--mode", "template", check=False)
    n = args.n
    print(f"{args.n} containers ({args.mode}, {args.memory}, {args.image}, tb-cache {args.tb_cache or 'default'} MiB), started {started} in {start_s:.0f} s; "
          f"{len(qemus)} QEMUs, {len(monitors) - len(servers)} monitors ({served} forked by a fork server); measured over {window:.0f} s; {ksm}")
    print(f"{'measure':<44}{'value':>10}{'target':>10}")
    rows = (
        ("containers answering exec", f"{answering}", f">= {max(n, TARGETS['answering'])}",
         answering >= max(n, TARGETS["answering"])),
        ("host memory per container (MiB)", f"{(pss_q + pss_m) / n:.1f}", f"<= {TARGETS['memory']:g}",
         (pss_q + pss_m) / n <= TARGETS["memory"]),
        ("idle CPU per container (%)", f"{(cpu_q + cpu_m) / n:.2f}", f"<= {TARGETS['cpu']:g}",
         (cpu_q + cpu_m) / n <= TARGETS["cpu"]),
    )
    for label, value, target, ok in rows:
        print(f"{label:<44}{value:>10}{target:>10} {'ok' if ok else 'MISSED'}")
    print(f"{'  of which QEMU memory (MiB)':<44}{pss_q / n:>10.1f}")
    print(f"{'  of which monitor memory (MiB)':<44}{pss_m / n:>10.1f}")
    print(f"{'  of which QEMU CPU (%)':<44}{cpu_q / n:>10.2f}")
    print(f"{'  of which monitor CPU (%)':<44}{cpu_m / n:>10.2f}")


if __name__ == "__main__":
    main()

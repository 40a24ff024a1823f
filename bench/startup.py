"""Start-up and memory: cold boots against pooled (saved, pre-booted) VMs, in one run.

Median of N runs each of `kvmc run --rm IMAGE true` cold (--no-pool) and pooled (a member
warmed beforehand is restored), all at the same VM size; then the proportional set size (PSS)
of N idle VMs of each kind (`run -d IMAGE sleep`), summed over their QEMU processes; then the
ratios pooled/cold (target under TCG: start-up <= 0.25).

The template mode of issue 4 (clones sharing one template's RAM) is not built yet: its row
says so rather than print a number.
Run with: .venv/bin/python bench/startup.py [--runs 5] [--image kvmc/busybox] [--memory 128m]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def kvmc(*args: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kvmc", *args], capture_output=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"kvmc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return wall, proc.stdout


def qemu_pss_kib(domain: str) -> int:
    """PSS of the QEMU process behind a libvirt domain (libvirt writes its pid file)."""
    pid = Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip()
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for {domain}")


def idle_pss(image: str, memory: str, runs: int, pooled: bool) -> float:
    """Mean PSS (MiB) of ``runs`` idle VMs running side by side."""
    names = [f"bench-idle-{os.getpid()}-{'p' if pooled else 'c'}{i}" for i in range(runs)]
    if pooled:
        kvmc("pool", "warm", image, "--size", str(runs), "-m", memory)
    try:
        for name in names:
            kvmc("run", "-d", "--name", name, "-m", memory, *([] if pooled else ["--no-pool"]), image, "sleep", "600")
        time.sleep(3)  # let the guests settle into idle
        domains = [json.loads(kvmc("inspect", n)[1])[0]["domain"] for n in names]
        return statistics.mean(qemu_pss_kib(d) for d in domains) / 1024
    finally:
        subprocess.run([sys.executable, "-m", "kvmc", "rm", "-f", *names], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="kvmc/busybox")
    parser.add_argument("--memory", default="128m")
    args = parser.parse_args()
    image, memory, n = args.image, args.memory, args.runs

    cold = [kvmc("run", "--rm", "--no-pool", "-m", memory, image, "true")[0] for _ in range(n)]
    warm_wall, _ = kvmc("pool", "warm", image, "--size", str(n), "-m", memory)
    save_mib = [p["save_mib"] for p in map(json.loads, kvmc("pool", "ls", "--format", "json")[1].splitlines())]
    pooled = [kvmc("run", "--rm", "-m", memory, image, "true")[0] for _ in range(n)]
    pss_cold = idle_pss(image, memory, n, pooled=False)
    pss_pool = idle_pss(image, memory, n, pooled=True)

    med = statistics.median
    print(f"kvmc start-up, image {image}, {memory} VMs, median of {n} (seconds, MiB)")
    print(f"{'measure':<52}{'value':>10}")
    print(f"{'cold   kvmc run --rm IMAGE true (baseline)':<52}{med(cold):>10.3f}")
    print(f"{'pooled kvmc run --rm IMAGE true':<52}{med(pooled):>10.3f}")
    print(f"{'template kvmc run --rm IMAGE true':<52}{'not built':>10}")
    print(f"{'pool warm-up, per member (2 in parallel)':<52}{warm_wall / n:>10.3f}")
    print(f"{'save file per member':<52}{(save_mib[0] if save_mib else float('nan')):>10.1f}")
    print(f"{'PSS per idle VM, cold boot':<52}{pss_cold:>10.1f}")
    print(f"{'PSS per idle VM, restored from the pool':<52}{pss_pool:>10.1f}")
    print(f"{'ratio pooled/cold start-up (target <= 0.25)':<52}{med(pooled) / med(cold):>10.2f}")
    print(f"{'ratio PSS pooled/cold':<52}{pss_pool / pss_cold:>10.2f}")


if __name__ == "__main__":
    main()

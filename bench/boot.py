"""Guest boot: Debian's cloud kernel against kvmc's own kernel (images/kernel/), in one run.

For each kernel, median of N runs of: the wall time of a cold `kvmc run --rm IMAGE true`, and
the guest uptime when the agent starts the process (a `kvmc run --name B IMAGE true` without
--rm, whose record keeps it: `kvmc inspect B` -> Kvmc.GuestUptimeMs; `kvmc -v run` no longer
prints it since runs go through the per-container monitor); then the ratios kvmc/Debian
(targets under TCG: uptime <= 0.35, wall <= 0.6) and kvmc's uptime at process start on its own
(target <= 0.25 s, issue 17). The kernel is chosen with KVMC_KERNEL (config key `kernel`); both
guests must be built ("make setup"), or given with --guest-dir-kvmc / --guest-dir-debian.
Runs alternate between the kernels so that host noise hits both alike; one warm-up run per
kernel is not counted (accel probe verdict, page cache, and QEMU's guest RAM landing on host
memory the host must zero first, which alone adds 0.1-0.2 s to a cold guest's boot).
Run with: .venv/bin/python bench/boot.py [--runs 5] [--image kvmc/busybox]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from kvmc_bytecode import compile_kvmc

KERNELS = ("debian", "kvmc")
TARGETS = {"uptime": 0.35, "wall": 0.6}
UPTIME_TARGET_S = 0.25
"""kvmc's kernel: guest uptime when the agent starts the process, under TCG (issue 17)."""
GUEST_DIRS: dict[str, str] = {}
"""Kernel -> guest artefacts directory given on the command line (else the configured one)."""


def kernel_env(kernel: str) -> dict[str, str]:
    """The environment that makes the kvmc CLI boot ``kernel``'s guest."""
    env = {**os.environ, "KVMC_KERNEL": kernel}
    env.pop("KVMC_GUEST_DIR", None)  # an explicit guest dir would override the kernel choice
    if kernel in GUEST_DIRS:
        env["KVMC_GUEST_DIR"] = GUEST_DIRS[kernel]
    return env


def kvmc(kernel: str, *args: str) -> tuple[float, bytes]:
    """Run the kvmc CLI on ``kernel``'s guest: (wall seconds, stdout); exit on failure."""
    env = kernel_env(kernel)
    cmd = [sys.executable, "-m", "kvmc", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"KVMC_KERNEL={kernel} {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return wall, proc.stdout


def one_run(kernel: str, image: str) -> tuple[float, float]:
    """(wall seconds of a cold `run --rm IMAGE true`, guest uptime seconds at process start)."""
    wall, _ = kvmc(kernel, "run", "--rm", "--no-pool", image, "true")
    name = f"bench-boot-{os.getpid()}-{kernel}"
    try:
        kvmc(kernel, "run", "--no-pool", "--name", name, image, "true")
        record = json.loads(kvmc(kernel, "inspect", name)[1])
    finally:
        subprocess.run([sys.executable, "-m", "kvmc", "rm", "-f", name], capture_output=True,
                       env=kernel_env(kernel))
    if isinstance(record, list):
        record = record[0]
    uptime_ms = record.get("Kvmc", {}).get("GuestUptimeMs")
    if uptime_ms is None:
        sys.exit(f"KVMC_KERNEL={kernel}: no Kvmc.GuestUptimeMs in `kvmc inspect {name}`")
    return wall, uptime_ms / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="kvmc/busybox")
    for kernel in KERNELS:
        parser.add_argument(f"--guest-dir-{kernel}", help=f"guest artefacts for KVMC_KERNEL={kernel}")
    args = parser.parse_args()
    compile_kvmc()  # as an installed kvmc is (bench/kvmc_bytecode.py)
    for kernel in KERNELS:
        if getattr(args, f"guest_dir_{kernel}"):
            GUEST_DIRS[kernel] = getattr(args, f"guest_dir_{kernel}")
    walls: dict[str, list[float]] = {k: [] for k in KERNELS}
    uptimes: dict[str, list[float]] = {k: [] for k in KERNELS}
    for kernel in KERNELS:  # warm-up, not counted: accel probe verdict, page cache
        one_run(kernel, args.image)
    for _ in range(args.runs):
        for kernel in KERNELS:
            wall, uptime = one_run(kernel, args.image)
            walls[kernel].append(wall)
            uptimes[kernel].append(uptime)
    med = statistics.median
    up = {k: med(v) for k, v in uptimes.items()}
    wall = {k: med(v) for k, v in walls.items()}
    print(f"{'measure (median of ' + str(args.runs) + ', seconds)':<44}{'debian':>10}{'kvmc':>10}{'ratio':>8}{'target':>8}")
    for label, key, values in (("guest uptime when the process starts", "uptime", up),
                               ("kvmc run --rm IMAGE true, wall", "wall", wall)):
        ratio = values["kvmc"] / values["debian"]
        verdict = "ok" if ratio <= TARGETS[key] else "MISSED"
        print(f"{label:<44}{values['debian']:>10.3f}{values['kvmc']:>10.3f}{ratio:>8.2f}"
              f"{'<= ' + str(TARGETS[key]):>8} {verdict}")
    spread = f"{min(uptimes['kvmc']):.3f}-{max(uptimes['kvmc']):.3f}"
    verdict = "ok" if up["kvmc"] <= UPTIME_TARGET_S else "MISSED"
    print(f"{'kvmc kernel: uptime at process start':<44}{'':>10}{up['kvmc']:>10.3f}{'':>8}"
          f"{'<= ' + str(UPTIME_TARGET_S):>8} {verdict} (runs: {spread})")


if __name__ == "__main__":
    main()

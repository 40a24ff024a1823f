"""Guest boot: Debian's cloud kernel against kvmc's own kernel (images/kernel/), in one run.

For each kernel, median of N runs of: the wall time of a cold `kvmc run --rm IMAGE true`, and
the guest uptime when the agent starts the process (a `kvmc run --name B IMAGE true` without
--rm, whose record keeps it: `kvmc inspect B` -> guest_uptime_ms; `kvmc -v run` no longer
prints it since runs go through the per-container monitor); then the ratios kvmc/Debian (targets under TCG: uptime <= 0.35, wall <= 0.6). The kernel is
chosen with KVMC_KERNEL (config key `kernel`); both guests must be built ("make setup").
Runs alternate between the kernels so that host noise hits both alike.
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

KERNELS = ("debian", "kvmc")
TARGETS = {"uptime": 0.35, "wall": 0.6}


def kvmc(kernel: str, *args: str) -> tuple[float, bytes]:
    """Run the kvmc CLI on ``kernel``'s guest: (wall seconds, stdout); exit on failure."""
    env = {**os.environ, "KVMC_KERNEL": kernel}
    env.pop("KVMC_GUEST_DIR", None)  # an explicit guest dir would override the kernel choice
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
                       env={**os.environ, "KVMC_KERNEL": kernel})
    if isinstance(record, list):
        record = record[0]
    uptime_ms = record.get("guest_uptime_ms")
    if uptime_ms is None:
        sys.exit(f"KVMC_KERNEL={kernel}: no guest_uptime_ms in `kvmc inspect {name}`")
    return wall, uptime_ms / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="kvmc/busybox")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()

"""Cold `kvmc run IMAGE true` latency: wall time and the guest's uptime at process start.

Prints one table, median of N runs each, with the host's own `true` (fork+exec through the
same Python subprocess path) measured in the same run as the baseline the ratio is against.
Run with: .venv/bin/python bench/run_latency.py [--runs 5] [--image kvmc/busybox]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

UPTIME_RE = re.compile(rb"process started at guest uptime (\d+) ms")
READY_RE = re.compile(rb"agent ready ([\d.]+)s after start")


def timed(cmd: list[str]) -> tuple[float, bytes]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return elapsed, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="kvmc/busybox")
    args = parser.parse_args()
    kvmc = [sys.executable, "-m", "kvmc", "-v", "run", "--rm", args.image, "true"]
    walls, uptimes, readies, host = [], [], [], []
    for _ in range(args.runs):
        host.append(timed(["true"])[0])
        wall, err = timed(kvmc)
        walls.append(wall)
        uptimes.append(int(UPTIME_RE.search(err)[1]) / 1000)
        readies.append(float(READY_RE.search(err)[1]))
    med = statistics.median
    print(f"{'measure (median of ' + str(args.runs) + ')':<44}{'seconds':>10}")
    print(f"{'host `true` (baseline)':<44}{med(host):>10.3f}")
    print(f"{'kvmc run --rm IMAGE true, wall':<44}{med(walls):>10.3f}")
    print(f"{'  domain start -> agent ready, wall':<44}{med(readies):>10.3f}")
    print(f"{'  guest uptime when the process starts':<44}{med(uptimes):>10.3f}")
    print(f"{'ratio kvmc run / host true':<44}{med(walls) / med(host):>10.0f}x")


if __name__ == "__main__":
    main()

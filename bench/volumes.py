"""Storage throughput: a sequential read of one file from a named volume (virtio-blk + ext4)
and from a host directory (virtiofs), against the same read on the host, in one run.

Every read is cold: the host's page cache is dropped before each one and every guest read
happens in a fresh VM, so each side reads from the disk beneath it rather than from RAM. The
guest times its own ``dd`` (``date +%s%N`` around it), so VM start-up is not counted. The file
is random data (nothing in the path can compress it). Median of N reads each.

Run with: .venv/bin/python bench/volumes.py [--runs 5] [--size-mib 256] [--memory 512m]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE = "kvmc/busybox"


def kvmc(*args: str) -> bytes:
    proc = subprocess.run([sys.executable, "-m", "kvmc", *args], capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"kvmc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout


def drop_host_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def host_read_s(path: Path) -> float:
    drop_host_caches()
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - start


# busybox's date has no %N and its dd prints no timing: /proc/uptime (10 ms steps) brackets the
# read instead, which is fine for reads that take seconds under TCG.
GUEST_READ = ("sync; echo 3 > /proc/sys/vm/drop_caches; read t0 _ < /proc/uptime; "
              "dd if={path} of=/dev/null bs=1M 2>/dev/null; read t1 _ < /proc/uptime; echo $t0 $t1")


def guest_read_s(mount: str, path: str, memory: str) -> float:
    drop_host_caches()
    out = kvmc("run", "--rm", "--network", "none", "-m", memory, "-v", mount, IMAGE, "sh", "-c",
               GUEST_READ.format(path=path))
    t0, t1 = map(float, out.split()[-2:])
    return t1 - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--memory", default="512m")
    args = parser.parse_args()
    n, size = args.runs, args.size_mib
    volume = f"bench-read-{os.getpid()}"
    scratch = Path(tempfile.mkdtemp(prefix="kvmc-bench-", dir="/var/tmp"))
    try:
        data = scratch / "file"
        with data.open("wb") as f:
            for _ in range(size):
                f.write(os.urandom(1 << 20))
        kvmc("volume", "create", "--size", f"{size + 128}m", volume)
        # Fill the volume with the same bytes, copied inside a VM through the share.
        kvmc("run", "--rm", "--network", "none", "-v", f"{scratch}:/src:ro", "-v", f"{volume}:/data", IMAGE,
             "sh", "-c", "cp /src/file /data/file && sync")
        host = [host_read_s(data) for _ in range(n)]
        vol = [guest_read_s(f"{volume}:/data:ro", "/data/file", args.memory) for _ in range(n)]
        vfs = [guest_read_s(f"{scratch}:/src:ro", "/src/file", args.memory) for _ in range(n)]
    finally:
        subprocess.run([sys.executable, "-m", "kvmc", "volume", "rm", volume], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)

    med = statistics.median
    rate = {name: size / med(times) for name, times in (("host", host), ("volume", vol), ("virtiofs", vfs))}
    print(f"sequential read of a {size} MiB file, cold caches, median of {n} (guest: {args.memory} VM)")
    print(f"{'where':<44}{'seconds':>9}{'MiB/s':>9}{'vs host':>9}")
    for label, key, times in (("host, same file (baseline)", "host", host),
                              ("named volume (virtio-blk, ext4)", "volume", vol),
                              ("host directory (virtiofs)", "virtiofs", vfs)):
        print(f"{label:<44}{med(times):>9.3f}{rate[key]:>9.1f}{rate[key] / rate['host']:>9.2f}")
    print(f"spread (min-max seconds): host {min(host):.3f}-{max(host):.3f}, volume {min(vol):.3f}-{max(vol):.3f}, "
          f"virtiofs {min(vfs):.3f}-{max(vfs):.3f}")


if __name__ == "__main__":
    main()

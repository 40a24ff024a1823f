"""Where a guest boot goes: boot kvmc's guest under QEMU directly (no libvirt), as kvmc would.

Starts QEMU with the devices a kvmc container VM has (microvm, virtio-blk root disk with serial
kvmc-root as a throw-away snapshot, slirp NIC, the agent's virtio-serial port, the UART console
into a file), the kernel command line kvmc/domain.py builds plus ``--append`` words, runs
``true`` through the agent, and prints per boot: real ms from QEMU's start to READY and to
STARTED, and the guest's uptime at READY and at STARTED (what `bench/boot.py` reports). With
``--initcalls`` the guest boots with ``initcall_debug printk.time=1 loglevel=8`` (which makes
every boot slower: each console byte is an emulated UART write) and the slowest initcalls and
the kernel's milestones are printed from the console log. A profiling aid, not a benchmark with
targets: bench/boot.py is that.

Run with: .venv/bin/python bench/boot_profile.py GUEST_DIR [--runs 3] [--initcalls] [--append WORDS]
"""

from __future__ import annotations

import argparse
import re
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kvmc.agent import AgentConnection, FrameType, ProcessSpec, parse_started
from kvmc.domain import host_tsc_khz, kernel_cmdline
from kvmc.guest import load_guest

EMULATOR = "/usr/bin/qemu-system-x86_64"


def qemu_args(guest_dir: Path, rootfs: Path, sock: Path, console: Path, append: str, memory_mib: int,
              tb_mib: int) -> list[str]:
    guest = load_guest(guest_dir)
    cmdline = kernel_cmdline(host_tsc_khz(), guest.cmdline, acpi=guest.acpi, tcg=True) + (f" {append}" if append else "")
    return [
        EMULATOR, "-machine", f"microvm,usb=off,acpi={'on' if guest.acpi else 'off'}", "-accel", f"tcg,tb-size={tb_mib}" if tb_mib else "tcg",
        "-cpu", "qemu64,+arat", "-m", str(memory_mib), "-smp", "1", "-display", "none", "-no-user-config", "-nodefaults",
        "-no-reboot",  # a guest without ACPI ends by reset (kvmc.exit=reboot), as on_reboot=destroy
        "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs), "-append", cmdline,
        "-device", "virtio-serial-device",
        "-drive", f"file={rootfs},if=none,id=root,format=raw,snapshot=on",
        "-device", "virtio-blk-device,drive=root,serial=kvmc-root",
        "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
        "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.kvmc.agent",
    ]


def one_boot(guest_dir: Path, rootfs: Path, append: str, memory_mib: int, tb_mib: int = 0) -> tuple[dict[str, float], str]:
    with tempfile.TemporaryDirectory(prefix="kvmc-bootprof-") as tmp:
        sock, console = Path(tmp) / "agent.sock", Path(tmp) / "console.log"
        start = time.perf_counter()
        qemu = subprocess.Popen(qemu_args(guest_dir, rootfs, sock, console, append, memory_mib, tb_mib))
        try:
            conn = AgentConnection.connect(str(sock), timeout=30)
            ready = conn.read_frame(timeout=60)
            t_ready = time.perf_counter() - start
            assert ready is not None and ready.type == FrameType.READY, ready
            up_ready = float(ready.payload.decode().split("uptime_ms=")[1])
            conn.run(1, ProcessSpec(args=["true"], net="10.0.2.15/24,10.0.2.2", dns=["10.0.2.3"],
                                    time_ns=time.time_ns()))
            while (frame := conn.read_frame(timeout=60)) is not None and frame.type != FrameType.STARTED:
                pass
            t_started = time.perf_counter() - start
            assert frame is not None, "no STARTED"
            _, up_started = parse_started(frame.payload)
            while (frame := conn.read_frame(timeout=60)) is not None and frame.type != FrameType.EXIT:
                pass
            conn.ack_exit(1)
            qemu.wait(timeout=30)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        return ({"real_ready": t_ready * 1000, "real_started": t_started * 1000,
                 "uptime_ready": up_ready, "uptime_started": float(up_started or 0)},
                console.read_text(errors="replace"))


def initcalls(log: str, top: int) -> None:
    calls = [(float(m.group(2)), m.group(1)) for m in
             re.finditer(r"initcall (\S+) returned -?\d+ after (\d+) usecs", log)]
    print(f"{len(calls)} initcalls, {sum(c[0] for c in calls) / 1000:.1f} ms in all; slowest:")
    for usecs, name in sorted(calls, reverse=True)[:top]:
        print(f"  {usecs / 1000:7.2f} ms  {name}")
    for pattern in ("Run /init", "Freeing unused kernel image", "Trying to unpack rootfs", "Freeing initrd",
                    "EXT4-fs", "clocksource: Switched", "APIC"):
        for line in log.splitlines():
            if pattern in line:
                print("  " + line.strip()[:120])
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("guest_dirs", type=Path, nargs="+", help="one or more guests: boots alternate between them")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rootfs", type=Path, help="an ext4 image (default: kvmc/busybox:latest's)")
    parser.add_argument("--append", default="", help="more kernel command line words")
    parser.add_argument("--initcalls", action="store_true", help="initcall_debug: the slowest initcalls")
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tb-size", default="0", help="TCG translation cache MiB, comma-separated to compare (0: QEMU's)")
    args = parser.parse_args()
    images = Path("/var/lib/kvmc/images")
    rootfs = args.rootfs or images / json.loads((images / "index.json").read_text())["tags"]["kvmc/busybox:latest"] / "rootfs.ext4"
    append = args.append
    if args.initcalls:
        append = f"{append} initcall_debug printk.time=1 loglevel=8".strip()
    variants = [(g, int(tb)) for g in args.guest_dirs for tb in args.tb_size.split(",")]
    results: dict[tuple[Path, int], list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.runs):  # interleaved, so that host noise hits every variant alike
        for guest_dir, tb in variants:
            numbers, log = one_boot(guest_dir, rootfs, append, args.memory, tb)
            results[(guest_dir, tb)].append(numbers)
            print(f"{guest_dir} tb={tb}: " + "  ".join(f"{k} {v:7.1f}" for k, v in numbers.items()), flush=True)
            if "kvmc.debug" in append:  # the agent's own timestamps
                for line in log.splitlines():
                    if "kvmc-agent:" in line:
                        print("    " + line.strip()[:140])
    for (guest_dir, tb), runs in results.items():
        print(f"median {guest_dir} tb={tb}: " +
              "  ".join(f"{k} {statistics.median(r[k] for r in runs):7.1f}" for k in runs[0]))
    if args.initcalls:
        initcalls(log, args.top)


if __name__ == "__main__":
    main()

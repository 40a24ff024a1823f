"""Choose the accelerator: KVM where it really runs a guest, TCG where it does not.

``/dev/kvm`` existing proves little: on nested or paravirtual hosts it opens fine and the
guest then dies in early boot or spins (docs/platform.md). So 'auto' boots kvmc's own guest
kernel once under KVM with a short deadline and looks for a marker on its console; the
verdict is cached per (guest kernel, QEMU binary, host kernel) and announced once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvmc.domain import DOMAIN_PREFIX, EMULATOR, VMSpec, host_tsc_khz, render_domain_xml
from kvmc.errors import HypervisorError, UsageError
from kvmc.guest import GuestArtefacts
from kvmc.hypervisor import Hypervisor

PROBE_MARKER = "KVMC-PROBE-OK"
PROBE_TIMEOUT_S = 20.0
LIBVIRT_TYPE = {"kvm": "kvm", "tcg": "qemu"}


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use ('kvm' or 'tcg') and why."""

    accel: str
    reason: str

    @property
    def domain_type(self) -> str:
        return LIBVIRT_TYPE[self.accel]


def _last_line(text: str) -> str:
    """The most specific line of a multi-line QEMU/libvirt error, shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:160]


def _cache_key(guest: GuestArtefacts) -> str:
    qemu = Path(EMULATOR)
    qemu_id = f"{qemu.stat().st_mtime_ns}" if qemu.exists() else "absent"
    return f"{guest.digest}/{qemu_id}/{os.uname().release}"


MAX_VERDICTS = 16
"""Verdicts accel.json keeps (the newest): one per guest kernel in use (kvmc's, Debian's, the
host flavour's) times the QEMU and host kernel seen lately."""


def _read_verdicts(cache: Path) -> dict[str, dict[str, str]]:
    """key -> {"accel", "reason"} from accel.json (empty if it is missing or unreadable; the
    older shape held one verdict at the top level)."""
    try:
        data = json.loads(cache.read_text())
        verdicts = data.get("verdicts", {})
        if "key" in data:  # the older shape: its one verdict stands
            verdicts = {data["key"]: {"accel": data.get("accel"), "reason": data.get("reason")}}
        return {k: v for k, v in verdicts.items()
                if isinstance(v, dict) and v.get("accel") in ("kvm", "tcg") and isinstance(v.get("reason"), str)}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_verdict(cache: Path, key: str, choice: AccelChoice) -> None:
    """Add one verdict, keeping the others: with one verdict per file, two guests in use (kvmc
    run's kernel and kvmc host's, or bench/boot.py's two kernels) made every switch between them
    probe again, 20 s each on a host whose KVM hangs. Two probes writing at once may lose one
    verdict; it is probed again later."""
    verdicts = _read_verdicts(cache)
    verdicts.pop(key, None)
    verdicts[key] = {"accel": choice.accel, "reason": choice.reason}
    kept = dict(list(verdicts.items())[-MAX_VERDICTS:])
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"verdicts": kept}))
    tmp.replace(cache)


def probe_kvm(hv: Hypervisor, guest: GuestArtefacts, work_dir: Path, templates_dir: Path) -> AccelChoice:
    """Boot the guest kernel under KVM; 'kvm' if it reaches user space within the deadline."""
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "/dev/kvm does not exist")
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="probe-", dir=work_dir))
    name = f"{DOMAIN_PREFIX}probe-{secrets.token_hex(4)}"
    console = tmp / "console.log"
    spec = VMSpec(
        name=name, uuid=str(uuid.uuid4()), container_id="probe", container_name="accel-probe",
        domain_type="kvm", memory_mib=128, vcpus=1, kernel=guest.kernel, initrd=guest.initramfs,
        console_log=console, extra_cmdline=(*guest.cmdline, "kvmc.probe"), tsc_khz=host_tsc_khz(),
        acpi=guest.acpi,
    )
    try:
        start = time.monotonic()
        try:
            hv.create_transient(render_domain_xml(spec, templates_dir))
        except HypervisorError as exc:
            return AccelChoice("tcg", f"QEMU cannot start a KVM guest ({_last_line(exc.message)})")
        stopped = hv.wait_stopped(name, PROBE_TIMEOUT_S)
        elapsed = time.monotonic() - start
        text = console.read_text(errors="replace") if console.exists() else ""
        if PROBE_MARKER in text:
            return AccelChoice("kvm", f"a KVM guest reached user space in {elapsed:.1f}s")
        if not stopped:
            return AccelChoice("tcg", f"a KVM guest did not reach user space within {PROBE_TIMEOUT_S:.0f}s")
        return AccelChoice("tcg", f"a KVM guest died during boot ({_last_line(text) or 'no console output'})")
    finally:
        hv.destroy(name)
        shutil.rmtree(tmp, ignore_errors=True)


def choose_accel(
    requested: str,
    hv: Hypervisor,
    guest: GuestArtefacts,
    data_dir: Path,
    templates_dir: Path,
    notice: Callable[[str], None],
) -> AccelChoice:
    """Resolve 'auto' | 'kvm' | 'tcg' to an accelerator; 'auto' probes once and caches."""
    if requested == "kvm":
        return AccelChoice("kvm", "forced with --accel kvm")
    if requested == "tcg":
        return AccelChoice("tcg", "forced with --accel tcg")
    if requested != "auto":
        raise UsageError(f"invalid --accel {requested!r}: choose auto, kvm or tcg")
    cache = data_dir / "accel.json"
    key = _cache_key(guest)
    verdicts = _read_verdicts(cache)
    if key in verdicts:
        return AccelChoice(verdicts[key]["accel"], verdicts[key]["reason"])
    choice = probe_kvm(hv, guest, data_dir / "tmp", templates_dir)
    _write_verdict(cache, key, choice)
    if choice.accel == "tcg":
        notice(f"KVM is not usable here: {choice.reason}. Using TCG (software emulation, slower); "
               "force a choice with --accel kvm|tcg.")
    return choice

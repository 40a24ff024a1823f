"""The VM definition: a typed spec of one microVM, rendered to libvirt XML from templates/.

All choices (machine shape, kernel command line, devices) are made here in Python, where
they can be unit-tested; ``templates/domain.xml.j2`` only spells them in libvirt's XML.
The shape follows docs/platform.md: microvm machine, direct kernel boot, ACPI on for Debian's
kernel (it finds virtio-mmio devices through ACPI) and off for kvmc's (faster to boot; guest.json
says which), virtio-mmio addresses on every device,
no USB, no balloon, a serial console log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from kvmc.guest import GuestArtefacts
from kvmc.mounts import volume_serial
from kvmc.net.plan import defined_mac

if TYPE_CHECKING:
    import jinja2

AGENT_PORT_NAME = "org.kvmc.agent"
METADATA_NS = "https://kvmc.dev/xmlns/container/1"
DOMAIN_PREFIX = "kvmc-"
EMULATOR = "/usr/bin/qemu-system-x86_64"
# Under TCG, about one boot in three hangs calibrating the TSC against the PIT; telling the
# kernel the host's TSC rate up front avoids that (docs/platform.md).
CPUINFO = Path("/proc/cpuinfo")
GUEST_MAC = "52:54:00:12:34:56"
"""Every VM's NIC has this MAC: each VM has a user-mode network of its own, so no two NICs ever
share a link, and a pool member's save restores only into a NIC with the MAC it was saved with."""
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
VIRTIOFSD_RO = Path(__file__).resolve().parent / "libexec" / "virtiofsd-ro"


@dataclass(frozen=True)
class DiskSpec:
    """A virtio-blk disk; ``backing_path`` set for a qcow2 overlay on a raw base."""

    path: Path
    target: str
    format: str = "qcow2"
    backing_path: Path | None = None
    backing_format: str = "raw"
    readonly: bool = False
    serial: str | None = None
    """virtio-blk serial: how the agent finds a volume's disk (kvmc/mounts.py)."""
    # The overlay is private to one VM and is flushed by the guest's sync before power-off;
    # writeback lets QEMU use the host page cache instead of O_DIRECT on small writes.
    cache: str = "writeback"


@dataclass(frozen=True)
class ChannelSpec:
    """A virtio-serial port backed by a unix socket that QEMU listens on."""

    socket: Path
    name: str = AGENT_PORT_NAME


@dataclass(frozen=True)
class ShareSpec:
    """A host directory shared through virtiofs; libvirt starts and stops its ``virtiofsd``."""

    source: Path
    tag: str
    readonly: bool = False

    @property
    def binary(self) -> Path:
        # QEMU 7.2's virtiofsd has no read-only mode: a wrapper gives it a read-only view of
        # the directory in a mount namespace of its own (see the script for why and how).
        return VIRTIOFSD_RO if self.readonly else VIRTIOFSD


@dataclass(frozen=True)
class NicSpec:
    """A NIC on a kvmc network: a virtio-net device on a tap kvmc created (kvmc/net/host.py).

    ``managed='no'``: libvirt opens the existing tap and neither creates, configures nor
    brings it up; kvmc moves it into the network's namespace once QEMU holds it."""

    tap: str
    mac: str


@dataclass(frozen=True)
class TemplateMemory:
    """Guest RAM in a file on tmpfs, for VM templating (kvmc/pool/template.py, docs/platform.md).

    The template maps the file shared (``shared=True``: its guest writes land in the file,
    which then holds the template's RAM); each clone maps the same file privately
    (``shared=False``: copy-on-write, the file is never written again). libvirt 9.0 cannot name
    such a file (its ``<memoryBacking><source type='file'/>`` path is per domain start, under
    ``memory_backing_dir``, and removed when the domain stops), so the backend is passed on
    QEMU's command line and the machine is pointed at it.
    """

    path: Path
    size_mib: int
    shared: bool
    backend_id: str = "kvmc-tmpl-ram"
    """Not libvirt's ``microvm.ram``: that backend is still created, but nothing maps it."""

    def __post_init__(self) -> None:
        if "," in str(self.path) or "=" in str(self.path):
            raise ValueError(f"QEMU option syntax cannot carry the memory file path {self.path}")

    @property
    def qemu_args(self) -> tuple[str, ...]:
        return (
            "-object",
            f"memory-backend-file,id={self.backend_id},size={self.size_mib << 20},"
            f"mem-path={self.path},share={'on' if self.shared else 'off'}",
            # libvirt always emits -machine microvm,...,memory-backend=microvm.ram; QEMU merges
            # repeated -machine options and the last one wins.
            "-machine", f"memory-backend={self.backend_id}",
        )


@dataclass(frozen=True)
class VMSpec:
    """Everything that makes one kvmc VM; ``domain_type`` is libvirt's: 'kvm' or 'qemu' (TCG)."""

    name: str
    uuid: str
    container_id: str
    container_name: str
    domain_type: str
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: Path
    console_log: Path
    disks: list[DiskSpec] = field(default_factory=list)
    channels: list[ChannelSpec] = field(default_factory=list)
    network: bool = False
    """A virtio-net NIC on QEMU's user-mode network (slirp), see kvmc/network.py."""
    nics: list[NicSpec] = field(default_factory=list)
    """One more NIC per kvmc network the container is on, after the user-mode one."""
    shares: list[ShareSpec] = field(default_factory=list)
    mac: str = GUEST_MAC
    extra_cmdline: tuple[str, ...] = ()
    emulator: str = EMULATOR
    tsc_khz: int | None = None
    state_root: str = ""
    """kvmc's data dir that owns this domain: gc only touches domains of its own state root."""

    # ACPI on: the kernel finds the virtio-mmio devices in the DSDT and powers off through the
    # ACPI sleep register. Off: QEMU appends virtio_mmio.device= words to the command line
    # itself (microvm auto-kernel-cmdline) and the guest ends the VM by reset (on_reboot=destroy).
    # Which one a guest kernel boots with is recorded in its guest.json (GuestArtefacts.acpi).
    acpi: bool = True
    tcg_tb_cache_mib: int = 0
    """TCG's translation cache in MiB (config key tcg_tb_cache_mib); 0: QEMU's default."""
    template_memory: TemplateMemory | None = None
    """Guest RAM in a template's file (kvmc/pool/template.py): shared for the template, private for a clone."""
    incoming_defer: bool = False
    """Start QEMU waiting for a migration stream (``-incoming defer``): a template's clone,
    whose device state kvmc then loads with QMP ``migrate-incoming``."""

    def __post_init__(self) -> None:
        if self.template_memory is not None:
            if self.template_memory.size_mib != self.memory_mib:
                raise ValueError(f"the template memory file is {self.template_memory.size_mib} MiB, "
                                 f"the VM has {self.memory_mib} MiB: they must be equal")
            if self.shares:
                raise ValueError("a VM with virtiofs shares needs libvirt's memfd RAM, not a template's file")

    @property
    def cmdline(self) -> str:
        return kernel_cmdline(self.tsc_khz, self.extra_cmdline, acpi=self.acpi, tcg=self.domain_type == "qemu")

    @property
    def shared_memory(self) -> bool:
        """vhost-user (virtiofsd) maps the guest's RAM: it must be a shareable memfd."""
        return bool(self.shares)

    @property
    def qemu_args(self) -> tuple[str, ...]:
        """What libvirt cannot express. virtio-mmio devices default to legacy (virtio 0.9.5)
        mode, in which vhost-user-fs does not work; only VMs with shares get modern mode, so
        the devices (and so the save files) of every other VM stay as they were. A template
        or clone names its RAM file, and a clone waits for its device state (docs/platform.md,
        "VM templating through libvirt")."""
        args: tuple[str, ...] = ("-global", "virtio-mmio.force-legacy=false") if self.shares else ()
        if self.template_memory is not None:
            args += self.template_memory.qemu_args
        if self.incoming_defer:
            args += ("-incoming", "defer")
        return args


OVERLAY_FILE = "rootfs.qcow2"


def ro_volume_overlay(directory: Path, index: int) -> Path:
    """The throwaway copy-on-write layer over a read-only volume (its ``index``: 1, 2, ...),
    made anew at each boot (kvmc.vmlife.VMLife.boot): QEMU opens the volume itself read-only."""
    return directory / f"volume{index}.ro.qcow2"
ROOT_SERIAL = "kvmc-root"
"""How images/initramfs/init finds the root disk among volume disks."""


def container_vm(
    *, name: str, uuid: str, container_id: str, container_name: str, directory: Path, agent_socket: Path,
    image_disk: Path, guest: GuestArtefacts, domain_type: str, memory_mib: int, vcpus: int, state_root: str,
    network: bool = True, volume_disks: tuple[tuple[Path, bool], ...] = (), shares: tuple[ShareSpec, ...] = (),
    network_taps: tuple[str, ...] = (), tcg_tb_cache_mib: int = 0,
) -> VMSpec:
    """The VM of one container, its files in ``directory`` (overlay, console log).

    Cold containers and pool members are both built here, so that a restored member is the
    very VM a cold boot of the same container would have been: libvirt restores a save only
    into a definition whose devices match, and only host-side paths may differ.
    ``volume_disks`` (disk image, read-only) are attached as vdb, vdc, ... with serials vol1,
    vol2, ... (the names kvmc.mounts.agent_mount_items gives the agent). A read-only one is
    the backing file of a throwaway qcow2 layer (:func:`ro_volume_overlay`): QEMU opens the
    volume read-only, so nothing the guest does reaches it, while the guest's ext4 can still
    replay a journal left by a killed writer (into the layer; the host never parses the disk).
    ``network_taps``: the host taps of the container's NICs on kvmc networks, in order; each
    NIC is defined with a fixed MAC per position (kvmc.net.plan.defined_mac) and the agent gives
    it the container's own.
    """
    disks = [DiskSpec(path=directory / OVERLAY_FILE, target="vda", backing_path=image_disk, serial=ROOT_SERIAL)]
    for index, (disk, readonly) in enumerate(volume_disks, start=1):
        target = f"vd{chr(ord('a') + index)}"
        if readonly:
            disks.append(DiskSpec(path=ro_volume_overlay(directory, index), target=target, backing_path=disk,
                                  serial=volume_serial(index)))
        else:
            disks.append(DiskSpec(path=disk, target=target, format="raw", serial=volume_serial(index)))
    return VMSpec(
        name=name, uuid=uuid, container_id=container_id, container_name=container_name,
        domain_type=domain_type, memory_mib=memory_mib, vcpus=vcpus,
        kernel=guest.kernel, initrd=guest.initramfs, console_log=directory / "console.log",
        disks=disks, channels=[ChannelSpec(socket=agent_socket)], network=network, shares=list(shares),
        nics=[NicSpec(tap=tap, mac=defined_mac(i)) for i, tap in enumerate(network_taps)],
        tsc_khz=host_tsc_khz(), state_root=state_root, acpi=guest.acpi, extra_cmdline=guest.cmdline,
        tcg_tb_cache_mib=tcg_tb_cache_mib,
    )


def host_tsc_khz(cpuinfo: Path = CPUINFO) -> int | None:
    """The host TSC rate in kHz as /proc/cpuinfo reports it (the first 'cpu MHz' line)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_cmdline(tsc_khz: int | None, extra: tuple[str, ...] = (), acpi: bool = True, tcg: bool = False) -> str:
    """The guest kernel command line; every word is there for a reason given beside it."""
    words = [
        "console=ttyS0",  # the serial console log: boot failures are readable there
        "quiet",  # each console byte is an emulated UART write: keep boot quiet
        "panic=-1",  # a guest panic ends the VM at once instead of hanging it
        "reboot=t",  # a triple fault reboots instantly (on_reboot=destroy ends the VM)
        "i8042.noaux",  # microvm has no PS/2 controller: skip probing for one
        "i8042.nokbd",
        "random.trust_cpu=on",  # RDRAND seeds the RNG at once: no wait for entropy
        # Keep the SMP lock prefixes: patching them out on a 1-vCPU guest took 44-50 ms of
        # every boot under TCG (and is wrong for a guest that gets more vCPUs anyway).
        "noreplace-smp",
    ]
    if tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    if tcg:
        # Under TCG the clocksource watchdog compares the TSC (host time) with jiffies (timer
        # interrupts, late whenever the host is busy), declares the TSC unstable and falls back
        # to refined-jiffies: no high-resolution timers, no tickless idle, so every idle guest
        # took a timer interrupt 250 times a second for ever (docs/platform.md, "Density").
        words.append("tsc=reliable")
    if not acpi:
        # Without ACPI the guest cannot power off, only halt: init and agent end the VM with a
        # reset instead, which on_reboot=destroy turns into the end of the domain.
        words.append("kvmc.exit=reboot")
    return " ".join([*words, *extra])


@lru_cache(maxsize=4)
def _environment(templates_dir: Path, cache_dir: Path | None) -> jinja2.Environment:
    """One environment per templates directory. With ``cache_dir``, compiled templates are kept
    there (jinja2's FileSystemBytecodeCache, checked against the template's source): compiling
    domain.xml.j2 took ~20 ms of every process that renders, a fifth of a hot `kvmc run`'s own
    work; loading its bytecode takes ~1 ms. jinja2 itself is imported here, not with this
    module: most commands (ps, exec, logs, stop, rm) never render and skip its ~17 ms."""
    import jinja2

    bytecode_cache = None
    if cache_dir is not None:
        try:
            cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            bytecode_cache = jinja2.FileSystemBytecodeCache(str(cache_dir))
        except OSError:
            pass  # an unwritable cache only costs the compile
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=jinja2.select_autoescape(["xml", "j2"], default=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        bytecode_cache=bytecode_cache,
    )


def render_domain_xml(spec: VMSpec, templates_dir: Path, cache_dir: Path | None = None) -> str:
    """Render ``templates_dir/domain.xml.j2`` for ``spec`` (``cache_dir``: where compiled
    templates are kept; kvmc passes its cache directory's ``templates`` subdirectory)."""
    if spec.domain_type not in ("kvm", "qemu"):
        raise ValueError(f"domain type must be 'kvm' or 'qemu', not {spec.domain_type!r}")
    return _environment(templates_dir, cache_dir).get_template("domain.xml.j2").render(spec=spec)

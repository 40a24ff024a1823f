"""The libvirt domain XML rendered from a VMSpec (kvmc/domain.py + templates/domain.xml.j2).

Pure: renders the real template and parses the result; no libvirt, no QEMU.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmc.config import REPO_ROOT, Config
from kvmc.domain import (
    AGENT_PORT_NAME,
    ChannelSpec,
    DiskSpec,
    VMSpec,
    host_tsc_khz,
    kernel_cmdline,
    render_domain_xml,
)

TEMPLATES = REPO_ROOT / "templates"
KVMC_NS = "{https://kvmc.dev/xmlns/container/1}"

BASE = Path("/var/lib/kvmc/images/abc/rootfs.raw")
OVERLAY = Path("/var/lib/kvmc/containers/0123/overlay.qcow2")
SOCKET = Path("/var/lib/kvmc/containers/0123/agent.sock")
CONSOLE = Path("/var/lib/kvmc/containers/0123/console.log")
KERNEL = Path("/var/lib/kvmc/guest/vmlinuz")
INITRD = Path("/var/lib/kvmc/guest/initrd.img")


def make_spec(domain_type: str = "qemu", **overrides) -> VMSpec:
    values = dict(
        name="kvmc-0123456789ab",
        uuid="6f1c3f5e-8a5b-4c1e-9d2e-0f3a4b5c6d7e",
        container_id="0123456789ab" + "0" * 52,
        container_name="happy_bellard",
        domain_type=domain_type,
        memory_mib=384,
        vcpus=2,
        kernel=KERNEL,
        initrd=INITRD,
        console_log=CONSOLE,
        disks=[DiskSpec(path=OVERLAY, target="vda", backing_path=BASE)],
        channels=[ChannelSpec(socket=SOCKET)],
        tsc_khz=2596136,
    )
    values.update(overrides)
    return VMSpec(**values)


def render(spec: VMSpec) -> ET.Element:
    return ET.fromstring(render_domain_xml(spec, TEMPLATES))


@pytest.fixture(params=["qemu", "kvm"])
def domain_type(request) -> str:
    return request.param


def test_config_templates_dir_is_the_repo_templates():
    assert Config().templates_dir == TEMPLATES
    assert (TEMPLATES / "domain.xml.j2").is_file()


def test_root_type_attribute(domain_type):
    root = render(make_spec(domain_type))
    assert root.tag == "domain"
    assert root.get("type") == domain_type


def test_identity_memory_and_vcpus(domain_type):
    root = render(make_spec(domain_type))
    assert root.findtext("name") == "kvmc-0123456789ab"
    assert root.findtext("uuid") == "6f1c3f5e-8a5b-4c1e-9d2e-0f3a4b5c6d7e"
    memory = root.find("memory")
    assert memory.get("unit") == "MiB"
    assert memory.text == "384"
    assert root.findtext("vcpu") == "2"
    assert root.find(f"metadata/{KVMC_NS}container/{KVMC_NS}id").text == "0123456789ab" + "0" * 52
    assert root.find(f"metadata/{KVMC_NS}container/{KVMC_NS}name").text == "happy_bellard"


def test_microvm_direct_kernel_boot(domain_type):
    root = render(make_spec(domain_type))
    os_type = root.find("os/type")
    assert os_type.get("machine") == "microvm"
    assert os_type.get("arch") == "x86_64"
    assert os_type.text == "hvm"
    assert root.findtext("os/kernel") == str(KERNEL)
    assert root.findtext("os/initrd") == str(INITRD)
    assert root.findtext("os/cmdline") == make_spec(domain_type).cmdline


def test_cmdline_words_with_tsc():
    root = render(make_spec(tsc_khz=2596136))
    words = root.findtext("os/cmdline").split()
    assert "console=ttyS0" in words
    assert "panic=-1" in words
    assert "tsc_early_khz=2596136" in words


def test_cmdline_without_tsc():
    root = render(make_spec(tsc_khz=None))
    cmdline = root.findtext("os/cmdline")
    assert "console=ttyS0" in cmdline.split()
    assert "panic=-1" in cmdline.split()
    assert "tsc_early_khz" not in cmdline


def test_cmdline_extra_words_come_last():
    spec = make_spec(extra_cmdline=("kvmc.debug=1", "init=/sbin/kvmc-init"))
    words = render(spec).findtext("os/cmdline").split()
    assert words[-2:] == ["kvmc.debug=1", "init=/sbin/kvmc-init"]
    assert kernel_cmdline(None, ("x=1",)).split()[-1] == "x=1"


def test_acpi_feature(domain_type):
    root = render(make_spec(domain_type))
    assert root.find("features/acpi") is not None
    assert "kvmc.exit=reboot" not in root.findtext("os/cmdline").split()


def test_acpi_off_drops_the_feature_and_exits_by_reboot(domain_type):
    # Without ACPI the guest cannot power off: it resets, and on_reboot=destroy ends the VM.
    root = render(make_spec(domain_type, acpi=False))
    assert root.find("features/acpi") is None
    assert root.find("features") is None
    assert root.findtext("on_reboot") == "destroy"
    words = root.findtext("os/cmdline").split()
    assert "kvmc.exit=reboot" in words
    assert kernel_cmdline(None, ("x=1",), acpi=False).split()[-1] == "x=1"


def test_no_usb_no_balloon(domain_type):
    root = render(make_spec(domain_type))
    assert root.find("devices/controller[@type='usb'][@model='none']") is not None
    assert root.find("devices/memballoon[@model='none']") is not None
    assert root.findall("devices/memballoon") == [root.find("devices/memballoon")]


def test_every_virtio_device_has_a_virtio_mmio_address(domain_type):
    spec = make_spec(
        domain_type,
        disks=[
            DiskSpec(path=OVERLAY, target="vda", backing_path=BASE),
            DiskSpec(path=Path("/tmp/seed.raw"), target="vdb", format="raw", readonly=True),
        ],
    )
    root = render(spec)
    disks = root.findall("devices/disk")
    assert len(disks) == 2
    for disk in disks:
        address = disk.find("address")
        assert address is not None and address.get("type") == "virtio-mmio"
        assert disk.find("target").get("bus") == "virtio"
    serial_ctl = root.find("devices/controller[@type='virtio-serial']")
    assert serial_ctl is not None
    assert serial_ctl.find("address").get("type") == "virtio-mmio"
    # No PCI addresses anywhere: microvm has no PCI bus.
    assert root.findall(".//address[@type='pci']") == []


def test_no_graphics_video_or_input(domain_type):
    root = render(make_spec(domain_type))
    for tag in ("graphics", "video", "input"):
        assert root.findall(f".//{tag}") == [], tag


def test_overlay_disk_on_raw_base(domain_type):
    root = render(make_spec(domain_type))
    disk = root.find("devices/disk")
    assert disk.get("type") == "file" and disk.get("device") == "disk"
    driver = disk.find("driver")
    assert driver.get("name") == "qemu"
    assert driver.get("type") == "qcow2"
    assert driver.get("cache") == "writeback"
    assert disk.find("source").get("file") == str(OVERLAY)
    backing = disk.find("backingStore")
    assert backing is not None and backing.get("type") == "file"
    assert backing.find("format").get("type") == "raw"
    assert backing.find("source").get("file") == str(BASE)
    # The chain ends there: an empty backingStore tells libvirt not to probe further.
    assert backing.find("backingStore") is not None
    assert disk.find("target").get("dev") == "vda"
    assert disk.find("readonly") is None


def test_disk_without_backing_and_readonly():
    spec = make_spec(disks=[DiskSpec(path=Path("/tmp/seed.raw"), target="vdb", format="raw", readonly=True)])
    disk = render(spec).find("devices/disk")
    assert disk.find("driver").get("type") == "raw"
    assert disk.find("backingStore") is None
    assert disk.find("readonly") is not None


def test_agent_channel(domain_type):
    root = render(make_spec(domain_type))
    channels = root.findall("devices/channel")
    assert len(channels) == 1
    channel = channels[0]
    assert channel.get("type") == "unix"
    source = channel.find("source")
    assert source.get("mode") == "bind"
    assert source.get("path") == str(SOCKET)
    target = channel.find("target")
    assert target.get("type") == "virtio"
    assert target.get("name") == "org.kvmc.agent" == AGENT_PORT_NAME


def test_serial_console_log(domain_type):
    root = render(make_spec(domain_type))
    serial = root.find("devices/serial")
    assert serial.get("type") == "file"
    assert serial.find("source").get("path") == str(CONSOLE)
    assert serial.find("target").get("port") == "0"


def test_cpu_host_passthrough_only_for_kvm():
    kvm = render(make_spec("kvm"))
    assert kvm.find("cpu").get("mode") == "host-passthrough"
    tcg = render(make_spec("qemu"))
    assert tcg.find("cpu").get("mode") == "custom"  # qemu64 + ARAT, see below


def test_lifecycle_actions_all_destroy(domain_type):
    root = render(make_spec(domain_type))
    for tag in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(tag) == "destroy", tag


def test_emulator(domain_type):
    root = render(make_spec(domain_type, emulator="/opt/qemu/bin/qemu-system-x86_64"))
    assert root.findtext("devices/emulator") == "/opt/qemu/bin/qemu-system-x86_64"


def test_xml_special_characters_are_escaped():
    name = "a<b&c>'\"d"
    text = render_domain_xml(make_spec(container_name=name), TEMPLATES)
    assert "a<b&c" not in text
    root = ET.fromstring(text)
    assert root.findtext("title") == f"kvmc container {name}"
    assert root.find(f"metadata/{KVMC_NS}container/{KVMC_NS}name").text == name


def test_special_characters_in_attribute_paths_are_escaped():
    odd = Path("/tmp/it's a <dir>&/agent.sock")
    root = render(make_spec(channels=[ChannelSpec(socket=odd)]))
    assert root.find("devices/channel/source").get("path") == str(odd)


@pytest.mark.parametrize("bad", ["xen", "KVM", "", "tcg"])
def test_invalid_domain_type(bad):
    with pytest.raises(ValueError, match="domain type"):
        render_domain_xml(make_spec(bad), TEMPLATES)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU
cpu MHz\t\t: {mhz}
cache size\t: 33792 KB

processor\t: 1
cpu MHz\t\t: 1200.000
"""


def test_host_tsc_khz_reads_first_cpu_mhz(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(mhz="2596.136"))
    assert host_tsc_khz(cpuinfo) == 2596136


def test_host_tsc_khz_spaced_like_the_brief(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\ncpu MHz : 2596.136\n")
    assert host_tsc_khz(cpuinfo) == 2596136


@pytest.mark.parametrize("mhz, khz", [("4105.123", 4105123), ("2064.419", 2064419), ("3000.000", 3000000)])
def test_host_tsc_khz_is_exact_for_three_decimals(tmp_path, mhz, khz):
    # cpuinfo gives MHz with three decimals, i.e. an exact kHz count; float truncation must
    # not lose one kHz (int(4105.123 * 1000) == 4105122).
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(mhz=mhz))
    assert host_tsc_khz(cpuinfo) == khz


def test_host_tsc_khz_none_without_cpu_mhz(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: ARM\nBogoMIPS\t: 50.00\n")
    assert host_tsc_khz(cpuinfo) is None


def test_host_tsc_khz_none_for_missing_or_garbled_file(tmp_path):
    assert host_tsc_khz(tmp_path / "absent") is None
    garbled = tmp_path / "cpuinfo"
    garbled.write_text("cpu MHz\t\t: fast\n")
    assert host_tsc_khz(garbled) is None


def test_network_adds_a_virtio_mmio_user_nic_and_none_adds_nothing() -> None:
    assert render(make_spec()).find("devices/interface") is None
    [nic] = render(make_spec(network=True)).findall("devices/interface")
    assert nic.get("type") == "user"
    assert nic.find("model").get("type") == "virtio"
    assert nic.find("address").get("type") == "virtio-mmio"


def test_volume_disks_carry_serials_and_shares_need_shared_memory_and_modern_mmio() -> None:
    from kvmc.domain import ShareSpec, VIRTIOFSD, VIRTIOFSD_RO, container_vm
    from kvmc.guest import GuestArtefacts

    guest = GuestArtefacts(kernel=KERNEL, initramfs=INITRD, kernel_sha256="k", initramfs_sha256="i",
                           agent_sha256="a", kernel_release="6.1")
    spec = container_vm(
        name="kvmc-x", uuid="6f1c3f5e-8a5b-4c1e-9d2e-0f3a4b5c6d7e", container_id="c" * 64, container_name="n",
        directory=OVERLAY.parent, agent_socket=SOCKET, image_disk=BASE, guest=guest, domain_type="qemu",
        memory_mib=256, vcpus=1, state_root="/var/lib/kvmc",
        volume_disks=((Path("/v/a/disk.ext4"), False), (Path("/v/b/disk.ext4"), True)),
        shares=(ShareSpec(Path("/srv/in"), "share1", readonly=True), ShareSpec(Path("/srv/out"), "share2")),
    )
    root = render(spec)
    disks = root.findall("devices/disk")
    assert [(d.find("target").get("dev"), d.findtext("serial")) for d in disks] == [
        ("vda", "kvmc-root"), ("vdb", "vol1"), ("vdc", "vol2")]
    assert disks[1].find("driver").get("type") == "raw"
    # A read-only volume is the read-only backing file of a throwaway layer the guest may write
    # (its ext4 replays a killed writer's journal there); QEMU never opens the volume writable.
    assert disks[2].find("driver").get("type") == "qcow2"
    assert disks[2].find("source").get("file") == str(OVERLAY.parent / "volume2.ro.qcow2")
    assert disks[2].find("backingStore/source").get("file") == "/v/b/disk.ext4"
    assert disks[2].find("backingStore/format").get("type") == "raw"
    assert [d.find("readonly") is not None for d in disks] == [False, False, False]
    fs = root.findall("devices/filesystem")
    assert [(f.find("source").get("dir"), f.find("target").get("dir"), f.find("binary").get("path")) for f in fs] == [
        ("/srv/in", "share1", str(VIRTIOFSD_RO)), ("/srv/out", "share2", str(VIRTIOFSD))]
    assert all(f.find("driver").get("type") == "virtiofs" for f in fs)
    assert root.find("memoryBacking/access").get("mode") == "shared"
    qemu_ns = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    args = [a.get("value") for a in root.findall(f"{qemu_ns}commandline/{qemu_ns}arg")]
    assert args == ["-global", "virtio-mmio.force-legacy=false"]
    assert VIRTIOFSD_RO.exists() and VIRTIOFSD_RO.stat().st_mode & 0o111


def test_plain_vm_keeps_private_memory_and_legacy_mmio() -> None:
    root = render(make_spec(network=True))
    assert root.find("memoryBacking") is None
    assert root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is None


def _qemu_args(root: ET.Element) -> list[str]:
    qemu_ns = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    return [a.get("value") for a in root.findall(f"{qemu_ns}commandline/{qemu_ns}arg")]


def test_template_maps_its_ram_file_shared_and_a_clone_privately_waiting_for_its_state() -> None:
    from dataclasses import replace

    from kvmc.domain import TemplateMemory
    from kvmc.pool import PoolKey, Template, clone_spec

    ram = Path("/dev/shm/kvmc-tmpl-0123456789abcdef.mem")
    template_root = render(make_spec(template_memory=TemplateMemory(ram, 384, shared=True)))
    assert template_root.find("memoryBacking") is None  # libvirt's own syntax cannot name the file
    assert template_root.find("memory").text == "384"
    assert _qemu_args(template_root) == [
        "-object", f"memory-backend-file,id=kvmc-tmpl-ram,size={384 << 20},mem-path={ram},share=on",
        "-machine", "memory-backend=kvmc-tmpl-ram",
    ]

    cold = make_spec(network=True)
    template = Template(id="0123456789abcdef" * 4, key=PoolKey("i", 384, 2, "tcg", "g", "user"),
                        created="now", mem_path=str(ram))
    clone = clone_spec(cold, template)
    assert replace(clone, template_memory=None, incoming_defer=False) == cold  # only the RAM and -incoming differ
    clone_root = render(clone)
    assert _qemu_args(clone_root) == [
        "-object", f"memory-backend-file,id=kvmc-tmpl-ram,size={384 << 20},mem-path={ram},share=off",
        "-machine", "memory-backend=kvmc-tmpl-ram",
        "-incoming", "defer",
    ]
    cold_root = render(cold)
    for element in ("name", "uuid", "memory", "os/cmdline", "devices/interface/mac"):
        assert ET.tostring(clone_root.find(element)) == ET.tostring(cold_root.find(element))


def test_template_memory_must_match_the_vm_and_be_expressible() -> None:
    from kvmc.domain import ShareSpec, TemplateMemory

    with pytest.raises(ValueError, match="must be equal"):
        make_spec(template_memory=TemplateMemory(Path("/dev/shm/t.mem"), 256, shared=False))
    with pytest.raises(ValueError, match="memfd"):
        make_spec(template_memory=TemplateMemory(Path("/dev/shm/t.mem"), 384, shared=False),
                  shares=[ShareSpec(Path("/srv"), "share1")])
    with pytest.raises(ValueError, match="option syntax"):
        TemplateMemory(Path("/dev/shm/a,b.mem"), 384, shared=True)


def test_network_nics_are_unmanaged_taps_after_the_user_mode_nic(domain_type):
    """One virtio-net NIC per kvmc network, on a tap kvmc made (libvirt neither creates nor
    brings it up: managed='no'), with the fixed MAC of its position."""
    from kvmc.domain import NicSpec
    from kvmc.net.plan import defined_mac

    spec = make_spec(domain_type, network=True,
                     nics=[NicSpec("kvt0123456789a0", defined_mac(0)), NicSpec("kvt0123456789a1", defined_mac(1))])
    interfaces = render(spec).findall("devices/interface")
    assert [i.get("type") for i in interfaces] == ["user", "ethernet", "ethernet"]
    assert [i.find("mac").get("address") for i in interfaces] == [
        "52:54:00:12:34:56", "52:54:00:12:34:57", "52:54:00:12:34:58"]
    for nic, tap in zip(interfaces[1:], ("kvt0123456789a0", "kvt0123456789a1")):
        assert nic.find("target").attrib == {"dev": tap, "managed": "no"}
        assert nic.find("model").get("type") == "virtio"
        assert nic.find("address").get("type") == "virtio-mmio"
    assert render(make_spec(domain_type, network=True)).findall("devices/interface[@type='ethernet']") == []


def test_tcg_guests_trust_the_tsc():
    # Under TCG the clocksource watchdog would drop the TSC for refined-jiffies: no tickless idle.
    assert "tsc=reliable" in render(make_spec("qemu")).findtext("os/cmdline").split()
    assert "tsc=reliable" not in render(make_spec("kvm")).findtext("os/cmdline").split()
    assert "noreplace-smp" in render(make_spec("kvm")).findtext("os/cmdline").split()


def test_the_guest_kernels_own_cmdline_words_and_tcg_cpu() -> None:
    from kvmc.domain import container_vm
    from kvmc.guest import GuestArtefacts

    guest = GuestArtefacts(kernel=KERNEL, initramfs=INITRD, kernel_sha256="k", initramfs_sha256="i",
                           agent_sha256="a", kernel_release="6.1", cmdline=("lapic_timer_khz=1000000",))
    spec = container_vm(
        name="kvmc-x", uuid="6f1c3f5e-8a5b-4c1e-9d2e-0f3a4b5c6d7e", container_id="c" * 64, container_name="n",
        directory=OVERLAY.parent, agent_socket=SOCKET, image_disk=BASE, guest=guest, domain_type="qemu",
        memory_mib=256, vcpus=1, state_root="/var/lib/kvmc",
    )
    root = render(spec)
    assert "lapic_timer_khz=1000000" in root.findtext("os/cmdline").split()
    # TCG: qemu64 plus ARAT, or the guest's only timer stops in idle and it never goes tickless.
    assert root.find("cpu").get("mode") == "custom"
    assert root.findtext("cpu/model") == "qemu64"
    assert root.find("cpu/feature[@name='arat']").get("policy") == "require"


def test_tcg_translation_cache_size_only_when_set_and_only_for_tcg():
    assert render(make_spec("qemu")).find("features/tcg") is None
    tcg = render(make_spec("qemu", tcg_tb_cache_mib=4))
    assert tcg.find("features/tcg/tb-cache").text == "4"
    assert tcg.find("features/tcg/tb-cache").get("unit") == "MiB"
    assert tcg.find("features/acpi") is not None
    assert render(make_spec("kvm", tcg_tb_cache_mib=4)).find("features/tcg") is None
    no_acpi = render(make_spec("qemu", tcg_tb_cache_mib=4, acpi=False))
    assert no_acpi.find("features/acpi") is None and no_acpi.find("features/tcg/tb-cache") is not None

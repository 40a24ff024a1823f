#!/usr/bin/env bash
# Build kvmc's guest artefacts into OUTDIR: a kernel, an initramfs with the static guest agent
# (as /init for kvmc's kernel; after busybox's init script, which loads the kernel's virtio
# modules in dependency order, for Debian's), and guest.json naming them with their digests.
#
#   images/build.sh OUTDIR [--kernel debian|kvmc|kvmc-host]
#
# --kernel debian (the default): Debian's linux-image-cloud-amd64, extracted with dpkg-deb,
#   never installed into the host's /boot; virtio drivers are modules loaded by the init.
# --kernel kvmc: kvmc's own kernel (images/kernel/build.sh, tinyconfig + kvmc.config), built
#   into OUTDIR/kernel/ with everything built in: the initramfs is the agent alone (/init).
# --kernel kvmc-host: the same with kvmc-host.config on top (netfilter, bridge, veth...: what
#   Docker Engine needs), the kernel of `kvmc host` VMs only.
#
# The build is cached: it is skipped when the inputs (kernel package version or kernel build
# digest, agent source, init script, this script) hash to the digest in OUTDIR/inputs.sha256.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
usage="usage: images/build.sh OUTDIR [--kernel debian|kvmc|kvmc-host]"
out=${1:?$usage}
shift
flavour=debian
while [ $# -gt 0 ]; do
    case $1 in
        --kernel) flavour=${2:?$usage}; shift 2 ;;
        --kernel=*) flavour=${1#--kernel=}; shift ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
case $flavour in debian|kvmc|kvmc-host) ;; *) echo "images/build.sh: unknown kernel '$flavour' ($usage)" >&2; exit 2 ;; esac
kpkg=${KVMC_KERNEL_PACKAGE:-linux-image-cloud-amd64}
# Which of kvmc's kernel images the guest boots: vmlinux (QEMU enters it at its PVH entry point,
# no decompression) or bzImage (boot protocol + gzip decompressor). See docs/platform.md.
kvmc_image=${KVMC_KVMC_KERNEL_IMAGE:-vmlinux}
# Whether VMs booting kvmc's kernel get ACPI (recorded in guest.json, read into VMSpec.acpi).
# Debian's kernel always does: it finds virtio-mmio devices only through ACPI. kvmc's does not
# (QEMU puts the virtio-mmio devices on the command line; the VM ends by reset): measured under
# TCG, ACPI cost ~25-45 ms of every boot (docs/platform.md, issue 17). The host flavour keeps it
# (a Docker Engine VM that powers off like a machine).
if [ "$flavour" = kvmc ]; then kvmc_acpi_default=false; else kvmc_acpi_default=true; fi
kvmc_acpi=${KVMC_KVMC_KERNEL_ACPI:-$kvmc_acpi_default}
# Modules the guest needs, by name; their dependencies are added from modules.dep (virtiofs
# pulls in fuse).
modules=(virtio_mmio virtio_blk virtio_console virtio_net virtio-rng virtiofs)

need() { command -v "$1" >/dev/null || { echo "images/build.sh: $1 is missing: run 'make setup' (apt-get install $2)" >&2; exit 1; }; }
need dpkg-deb dpkg; need cpio cpio; need depmod kmod; need gcc gcc; need /bin/busybox busybox-static

if [ "$flavour" != debian ]; then
    # The kernel build has its own cache (images/kernel/build.sh); its digest is our input.
    "$here/kernel/build.sh" "$out/kernel" $( [ "$flavour" = kvmc-host ] && echo --host )
    kver_pkg=kvmc-kernel
    kver_deb="$(cat "$out/kernel/inputs.sha256") $kvmc_image acpi=$kvmc_acpi"
    acpi=$kvmc_acpi
    # Command-line words this kernel wants (guest.json "cmdline", appended by kvmc/domain.py):
    # the local APIC timer's rate, fixed at 1 GHz by QEMU and KVM, so that the kernel need
    # not measure it (images/kernel/patches/0002-*, ~100 ms of boot under TCG).
    cmdline='"lapic_timer_khz=1000000"'
else
    # Resolve the versioned kernel package the meta package depends on.
    kver_pkg=$(apt-cache depends "$kpkg" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$kver_pkg" ] || { echo "images/build.sh: cannot resolve $kpkg (run apt-get update)" >&2; exit 1; }
    kver_deb=$(apt-cache policy "$kver_pkg" | awk '/Candidate:/{print $2}')
    acpi=true
    cmdline=
fi

inputs=$( { echo "$flavour $kver_pkg $kver_deb"; cat "$here/build.sh" "$here/initramfs/init" "$here/agent/"*.c "$here/agent/Makefile"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out/inputs.sha256" ] && [ "$(cat "$out/inputs.sha256")" = "$inputs" ] && [ -f "$out/guest.json" ]; then
    echo "guest artefacts up to date in $out"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

if [ "$flavour" = debian ]; then
    echo "==> fetching $kver_pkg ($kver_deb)"
    (cd "$work" && apt-get download -q "$kver_pkg" >/dev/null 2>&1) || { echo "images/build.sh: apt-get download $kver_pkg failed" >&2; exit 1; }
    dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
    kver=$(ls "$work/kernel/lib/modules")
    depmod -b "$work/kernel" "$kver"
else
    kver=$(cat "$out/kernel/kernel.release")
    modules=()  # everything is built in
fi

echo "==> building the agent"
make -s -C "$here/agent" OUT="$work" >/dev/null

echo "==> assembling the initramfs"
root="$work/initramfs"
mkdir -p "$root"/{dev,proc,sys,newroot}
cp "$work/kvmc-agent" "$root/kvmc-agent"
if [ "$flavour" != debian ]; then
    # The agent is /init itself (kvmc-agent --init, run as PID 1 with no arguments): no
    # busybox, no shell. Measured under TCG: ~70 ms less boot, a third of the initramfs.
    ln -s kvmc-agent "$root/init"
else
    # Debian's kernel: busybox insmods the virtio modules, then execs `kvmc-agent --init`.
    mkdir -p "$root"/{bin,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    cp "$here/initramfs/init" "$root/init"
fi
# Dependency order: modules.dep lists "mod: deps..." with the deepest dependency last.
moddir="$work/kernel/lib/modules/$kver"
declare -A seen=()
order=()
add_module() {  # $1: path relative to moddir
    local path=$1 deps dep
    [ -n "${seen[$path]:-}" ] && return
    seen[$path]=1
    deps=$(awk -F': *' -v m="$path" '$1 == m {print $2}' "$moddir/modules.dep")
    for dep in $(echo "$deps" | tr ' ' '\n' | tac); do add_module "$dep"; done
    order+=("$path")
}
for m in "${modules[@]+"${modules[@]}"}"; do
    path=$(awk -F: -v m="/$m.ko" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m {print $1; exit}' "$moddir/modules.dep")
    [ -n "$path" ] || { echo "images/build.sh: module $m not in $kver_pkg" >&2; exit 1; }
    add_module "$path"
done
[ "$flavour" != debian ] || : > "$root/modules.load"
for path in "${order[@]+"${order[@]}"}"; do
    cp "$moddir/$path" "$root/lib/modules/$(basename "$path")"
    basename "$path" >> "$root/modules.load"
done
# kvmc's kernel gets the cpio uncompressed: QEMU loads 1 MB as fast as 0.5 MB, while gunzip
# under TCG costs the guest boot time (~45 ms when busybox was in it). Debian's (with its modules) stays gzip-compressed.
compress="gzip -1"
[ "$flavour" != debian ] && compress=cat
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | $compress > "$work/initramfs.img"

if [ "$flavour" = debian ]; then
    cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
else
    cp "$out/kernel/$kvmc_image" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi
mv "$work/initramfs.img" "$out/initramfs.img"
cat > "$out/guest.json.tmp" <<JSON
{
  "kernel": "vmlinuz",
  "kernel_package": "$kver_pkg $kver_deb",
  "kernel_release": "$kver",
  "kernel_sha256": "$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)",
  "initramfs": "initramfs.img",
  "initramfs_sha256": "$(sha256sum "$out/initramfs.img" | cut -d' ' -f1)",
  "agent_sha256": "$(sha256sum "$work/kvmc-agent" | cut -d' ' -f1)",
  "kernel_flavour": "$flavour",
  "acpi": $acpi,
  "cmdline": [$cmdline],
  "modules": [$( [ ${#order[@]} -eq 0 ] || printf '"%s",' "${order[@]##*/}" | sed 's/,$//')]
}
JSON
mv "$out/guest.json.tmp" "$out/guest.json"
echo "$inputs" > "$out/inputs.sha256"
echo "guest artefacts built in $out: $(du -h "$out/vmlinuz" | cut -f1) kernel, $(du -h "$out/initramfs.img" | cut -f1) initramfs"

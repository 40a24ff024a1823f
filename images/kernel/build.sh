#!/usr/bin/env bash
# Build kvmc's own guest kernel into OUTDIR: `make tinyconfig` + images/kernel/kvmc.config,
# everything built in, from Debian's linux-source-6.1 package (never sources from elsewhere).
# Applies images/kernel/patches/*.patch (patch -p1, in name order) to the unpacked source.
# --host: the host flavour (kvmc host's VMs, which run Docker Engine): kvmc-host.config merged
# after kvmc.config, and moby's check-config.sh must pass on the result.
# Writes OUTDIR/bzImage, OUTDIR/vmlinux (uncompressed ELF with the PVH entry note),
# OUTDIR/config and OUTDIR/kernel.release.
#
# Installs nothing itself. Needs these apt packages (ci/setup-host.sh installs them):
#   linux-source-6.1 gcc make patch bc bison flex libelf-dev libssl-dev xz-utils
# and, for --host, downloads (never installs) docker.io for moby's check-config.sh.
#
# Cached: skipped when sha256(fragments + patches + this script + linux-source package version) equals
# OUTDIR/inputs.sha256. KVMC_KERNEL_BUILD_DIR keeps the build tree there (for iterating on the
# fragment: an existing tree of the same source version is reused, so make rebuilds
# incrementally); by default a temporary directory is used and removed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: images/kernel/build.sh OUTDIR [--host]}
fragments=("$here/kvmc.config")
host_flavour=false
case ${2:-} in
    --host) host_flavour=true; fragments+=("$here/kvmc-host.config") ;;
    "") ;;
    *) echo "usage: images/kernel/build.sh OUTDIR [--host]" >&2; exit 2 ;;
esac
src_pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz

die() { echo "images/kernel/build.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is missing: run 'make setup' (apt-get install $2)"; }
need gcc gcc; need make make; need patch patch; need bc bc; need bison bison; need flex flex; need xz xz-utils
[ -f /usr/include/libelf.h ] || die "libelf.h is missing: run 'make setup' (apt-get install libelf-dev)"
[ -f /usr/include/openssl/ssl.h ] || die "openssl headers are missing: run 'make setup' (apt-get install libssl-dev)"
[ -f "$tarball" ] || die "$tarball is missing: run 'make setup' (apt-get install $src_pkg)"
src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null) || die "$src_pkg is not installed"

patches=("$here"/patches/*.patch)
[ -e "${patches[0]}" ] || patches=()
patches_sum=$(cat "${patches[@]+"${patches[@]}"}" </dev/null | sha256sum | cut -d' ' -f1)
inputs=$( { echo "$src_pkg $src_ver"; cat "${fragments[@]}" "$here/build.sh" "${patches[@]+"${patches[@]}"}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out/inputs.sha256" ] && [ "$(cat "$out/inputs.sha256")" = "$inputs" ] \
        && [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
    echo "kvmc kernel up to date in $out"
    exit 0
fi

if [ -n "${KVMC_KERNEL_BUILD_DIR:-}" ]; then
    work=$KVMC_KERNEL_BUILD_DIR
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
start=$(date +%s)
tree="$work/linux-source-6.1"
# A kept tree is reused only if it is the same source with the same patches applied.
if [ ! -f "$work/source.version" ] || [ "$(cat "$work/source.version")" != "$src_ver patches=$patches_sum" ] || [ ! -d "$tree" ]; then
    echo "==> unpacking $tarball ($src_pkg $src_ver)"
    rm -rf "$tree" "$work/source.version"
    tar -xf "$tarball" -C "$work"
    for p in "${patches[@]+"${patches[@]}"}"; do
        echo "==> applying $(basename "$p")"
        patch -s -p1 -d "$tree" < "$p"
    done
    echo "$src_ver patches=$patches_sum" > "$work/source.version"
fi

# ARCH=x86_64 so that tinyconfig starts from a 64-bit base (ARCH=x86 would give i386).
kmake() { make -s -C "$tree" ARCH=x86_64 "$@"; }
echo "==> tinyconfig + $(for f in "${fragments[@]}"; do basename "$f"; done | paste -sd+)"
kmake tinyconfig >/dev/null
(cd "$tree" && ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null)
kmake olddefconfig >/dev/null

# Every line of the fragment must be in the final .config: a symbol whose dependencies are not
# met is dropped silently by kconfig, and a kernel missing e.g. virtio-blk boots to nothing.
lost=()
while IFS= read -r line; do
    case $line in
        CONFIG_*=*)
            grep -qxF -- "$line" "$tree/.config" || lost+=("$line (final: $(grep -E "^(# )?${line%%=*}[= ]" "$tree/.config" || echo absent))") ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }; sym=${sym%% *}
            ! grep -q "^$sym=" "$tree/.config" || lost+=("$line (final: $(grep "^$sym=" "$tree/.config"))") ;;
    esac
done < <(cat "${fragments[@]}")
if [ ${#lost[@]} -gt 0 ]; then
    printf 'images/kernel/build.sh: option lost in the final .config: %s\n' "${lost[@]}" >&2
    exit 1
fi

# moby's contrib/check-config.sh, as Debian's docker.io (the engine kvmc/docker-host runs)
# ships it, must pass on this .config: a kernel that lacks what it calls "generally necessary"
# gives `kvmc host` a dockerd whose containers have no network. Taken from the package with
# apt-get download + dpkg-deb (never installed). The script also looks at the machine it runs on
# (its cgroup mounts, AppArmor), which says nothing about the guest: a non-zero exit fails the
# build when a CONFIG_ of the "Generally Necessary" section (or overlayfs, overlay2's) is
# missing, and is reported as a note when only the build machine's own state is to blame.
if $host_flavour; then
echo "==> moby check-config.sh (docker.io) on the .config"
(cd "$work" && apt-get download -q docker.io >/dev/null 2>&1) || die "apt-get download docker.io failed (for check-config.sh)"
dpkg-deb --fsys-tarfile "$work"/docker.io_*.deb | tar -x -C "$work" ./usr/share/docker.io/contrib/check-config.sh
rm -f "$work"/docker.io_*.deb
check_rc=0
NO_COLOR=1 bash "$work/usr/share/docker.io/contrib/check-config.sh" "$tree/.config" > "$work/check-config.log" 2>&1 || check_rc=$?
if [ "$check_rc" -ne 0 ]; then
    plain=$(sed 's/\x1b\[[0-9;]*m//g' "$work/check-config.log")
    necessary_missing=$(echo "$plain" | sed -n '/^Generally Necessary:/,/^Optional Features:/p' | grep -E 'CONFIG_[A-Z0-9_]+: missing' || true)
    storage_missing=
    echo "$plain" | grep -q 'CONFIG_OVERLAY_FS: enabled' || storage_missing="CONFIG_OVERLAY_FS: missing (overlay2)"
    if [ -n "$necessary_missing$storage_missing" ]; then
        echo "$necessary_missing$storage_missing" >&2
        die "moby's check-config.sh: the kernel config lacks what dockerd needs (see above)"
    fi
    echo "note: check-config.sh exited $check_rc for this build machine's own state (its cgroup mounts," \
         "AppArmor, key limits); every generally necessary CONFIG_ option is set"
fi
fi

echo "==> make -j$(nproc) bzImage"
kmake -j"$(nproc)" bzImage
mkdir -p "$out"
release=$(kmake kernelrelease)
for f in arch/x86/boot/bzImage vmlinux .config; do
    name=$(basename "$f"); [ "$name" = .config ] && name=config
    cp "$tree/$f" "$out/$name.tmp" && mv "$out/$name.tmp" "$out/$name"
done
echo "$release" > "$out/kernel.release"
echo "$inputs" > "$out/inputs.sha256"
echo "kvmc kernel $release built in $out in $(( $(date +%s) - start )) s:" \
     "bzImage $(stat -c %s "$out/bzImage") bytes, vmlinux $(stat -c %s "$out/vmlinux") bytes"

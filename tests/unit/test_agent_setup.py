"""The agent's container setup RUN items (mount, readonly_root, net, netif, dns), end to end: the real
static agent against a real busybox rootfs, as in test_agent_protocol.py.

Every agent here runs inside its own mount, UTS and network namespaces (``unshare``), with the
rootfs bind-mounted onto itself (so it is a mount point, as /newroot is in the VM) and /proc
mounted in it: the mounts, the read-only remount, the hostname and eth0 never touch the host's.
Needs root, util-linux (unshare) and iproute2 (ip)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.unit.test_agent_protocol import BUSYBOX, Agent, agent_bin, start_agent  # noqa: F401 (fixture)

NET = "10.0.2.15/24,10.0.2.2"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fresh busybox rootfs per test: the tests write into it and remount it."""
    if os.geteuid() != 0:
        pytest.fail("the agent tests chroot and mount, which needs root (as CI and 'make test' run)")
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: apt-get install {package}")
    if not BUSYBOX.exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "busybox-static"], check=True, capture_output=True)
    r = tmp_path / "rootfs"
    (r / "bin").mkdir(parents=True)
    r.chmod(0o755)
    shutil.copy2(BUSYBOX, r / "bin/busybox")
    subprocess.run(["chroot", str(r), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    (r / "proc").mkdir()
    (r / "etc").mkdir()
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (r / "etc/group").write_text("root:x:0:\n")
    return r


@contextmanager
def agent_in_namespaces(
    agent_bin: Path, root: Path, before: str = "", root_opts: str = "", pid1: bool = False
) -> Iterator[Agent]:
    """Start the agent in private namespaces; ``before`` is shell run first (e.g. make eth0),
    ``root_opts`` extra flags for the rootfs mount (e.g. nosuid); ``pid1``: in a PID namespace
    of its own too, as PID 1 (as in the VM)."""
    remount = f'mount -o remount,bind,{root_opts} "$1" && ' if root_opts else ""
    # /run is a tmpfs of the namespace's own: the agent keeps files in its root's /run (in a VM,
    # the initramfs), which here is the host's.
    script = (f'{before}mount -t tmpfs tmpfs /run && mount --bind "$1" "$1" && {remount}'
              f'mount -t proc proc "$1/proc" && shift && exec "$@"')
    pid_ns = ("--pid", "--fork", "--kill-child") if pid1 else ()
    wrapper = ("unshare", "--mount", "--uts", "--net", *pid_ns, "--propagation", "private",
               "sh", "-c", script, "sh", str(root))
    with start_agent(agent_bin, root, wrapper=wrapper) as a:
        yield a


def agent_log(a: Agent) -> str:
    """The agent's stderr, once it is gone (close the connection: in socket mode it then exits)."""
    a.conn.close()
    a.proc.wait(timeout=5)
    return a.proc.stderr.read().decode()  # type: ignore[union-attr]


def proc_mount_options(mounts: str, target: str) -> set[str]:
    """The options of the mount at ``target`` in a /proc/mounts text."""
    for line in mounts.splitlines():
        fields = line.split()
        if fields[1] == target:
            return set(fields[3].split(","))
    raise AssertionError(f"{target} not mounted:\n{mounts}")


def test_tmpfs_mounts_created_with_options(agent_bin: Path, root: Path) -> None:
    (root / "inside/dir").mkdir(parents=True)
    (root / "link").symlink_to("/inside/dir")  # absolute: must resolve inside the rootfs
    mounts = [
        "tmpfs:tmpfs:nosuid,nodev,noexec,mode=0750,size=64m:/data/deep",
        "tmpfs:tmpfs:-:/odd:name",  # TARGET is everything after the third colon
        "tmpfs:tmpfs:ro:/link/sub",
    ]
    script = "cat /proc/mounts; echo hello > /data/deep/f && cat /data/deep/f; stat -c %a /data/deep"
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, err = a.run(["sh", "-c", script], mounts=mounts)
    assert (res.exit_code, res.error, err) == (0, None, b"")
    text = out.decode()
    assert text.endswith("hello\n750\n")
    assert {"rw", "nosuid", "nodev", "noexec", "mode=750", "size=65536k"} <= proc_mount_options(text, "/data/deep")
    assert "rw" in proc_mount_options(text, "/odd:name")
    assert "ro" in proc_mount_options(text, "/inside/dir/sub")
    # The targets were made in the rootfs (and the files went to the tmpfs, now gone).
    assert (root / "data/deep").is_dir() and not (root / "data/deep/f").exists()
    assert (root / "odd:name").is_dir() and (root / "inside/dir/sub").is_dir()


def test_mount_through_proc_magic_link_refused(agent_bin: Path, root: Path) -> None:
    name = f"kvmc-escape-{uuid.uuid4().hex[:8]}"
    (root / "escape").symlink_to("/proc/1/root/tmp")  # PID 1 is the agent, its root the host's /
    with agent_in_namespaces(agent_bin, root, pid1=True) as a:
        res, _, _ = a.run(["true"], mounts=[f"tmpfs:tmpfs:-:/escape/{name}"])
    assert res.exit_code == 126
    assert res.error == f"mount /escape/{name} (tmpfs tmpfs): symlink loop or /proc link in the path"
    assert not Path("/tmp", name).exists()


def test_readonly_root_keeps_mounts_writable(agent_bin: Path, root: Path) -> None:
    script = (
        "touch /newfile; echo rc=$?; touch /scratch/f && echo scratch-ok; "
        "touch /data/f && echo data-ok; grep ' / ' /proc/mounts"
    )
    mounts = ["tmpfs:tmpfs:-:/scratch", "tmpfs:tmpfs:-:/data"]
    with agent_in_namespaces(agent_bin, root, root_opts="nosuid") as a:
        res, out, err = a.run(["sh", "-c", script], mounts=mounts, readonly_root=True)
    assert (res.exit_code, res.error) == (0, None)
    assert b"Read-only file system" in err
    lines = out.decode().splitlines()
    assert lines[:3] == ["rc=1", "scratch-ok", "data-ok"]
    assert {"ro", "nosuid"} <= set(lines[3].split()[3].split(","))  # the root's own flags kept
    # Only the namespace's bind mount went read-only, not the filesystem under it.
    (root / "still-writable").write_text("yes")
    assert not (root / "newfile").exists()


def test_dns_replaces_resolv_conf_symlink(agent_bin: Path, root: Path) -> None:
    (root / "run/resolvconf").mkdir(parents=True)
    (root / "run/resolvconf/resolv.conf").write_text("nameserver 9.9.9.9\n")
    (root / "etc/resolv.conf").symlink_to("../run/resolvconf/resolv.conf")
    (root / "etc/hosts").write_text("image's hosts\n")
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, _ = a.run(["cat", "/etc/resolv.conf"], dns=["10.0.2.3", "2001:db8::1"], readonly_root=True)
    assert (res.exit_code, res.error) == (0, None)
    expected = "nameserver 10.0.2.3\nnameserver 2001:db8::1\n"
    assert out.decode() == expected
    resolv = root / "etc/resolv.conf"
    assert not resolv.is_symlink() and resolv.read_text() == expected and resolv.stat().st_mode & 0o777 == 0o644
    assert (root / "run/resolvconf/resolv.conf").read_text() == "nameserver 9.9.9.9\n"  # not written through
    assert (root / "etc/hosts").read_text() == "image's hosts\n"  # hosts only with net=
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["group", "hosts", "passwd", "resolv.conf"]


@pytest.mark.parametrize("readonly_root", [False, True], ids=["rw", "read-only"])
def test_resolv_conf_and_hosts_are_bound_over_the_images_files(agent_bin: Path, root: Path,
                                                               readonly_root: bool) -> None:
    """Where the image has regular files, the container gets kvmc's resolv.conf, hosts and
    hostname as docker gives them: tmpfs files bind-mounted over the image's, which stay untouched on the
    root disk (no write into it: issue 17). The container can write to them, unless its root
    is read-only; then they are read-only too."""
    (root / "etc/resolv.conf").write_text("image's resolv.conf\n")
    (root / "etc/hosts").write_text("image's hosts\n")
    (root / "etc/hostname").write_text("image's hostname\n")
    script = ("cat /etc/hostname /etc/resolv.conf /etc/hosts; echo '192.0.2.9 extra' >> /etc/hosts && "
              "tail -n 1 /etc/hosts")
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, err = a.run(["sh", "-c", script], dns=["192.0.2.53"], hosts=["192.0.2.7 db"],
                              readonly_root=readonly_root, hostname="box1")
    assert res.error is None
    kvmc_files = ("box1\nnameserver 192.0.2.53\n127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
                  "192.0.2.7 db\n")
    if readonly_root:
        assert (res.exit_code, out.decode()) == (1, kvmc_files)
        assert b"Read-only file system" in err
    else:
        assert (res.exit_code, out.decode()) == (0, kvmc_files + "192.0.2.9 extra\n")
    assert (root / "etc/resolv.conf").read_text() == "image's resolv.conf\n"
    assert (root / "etc/hosts").read_text() == "image's hosts\n"
    assert (root / "etc/hostname").read_text() == "image's hostname\n"
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["group", "hostname", "hosts", "passwd", "resolv.conf"]


@pytest.fixture
def veth() -> None:
    probe = subprocess.run(["unshare", "--net", "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                           capture_output=True, text=True)
    # No skip: the host kernels kvmc supports have veth; a missing one must show as a failure.
    assert probe.returncode == 0, f"this kernel cannot make a veth pair for a fake eth0: {probe.stderr.strip()}"


@pytest.mark.usefixtures("veth")
@pytest.mark.parametrize("preconfigured", [False, True], ids=["fresh", "already-configured"])
def test_net_configures_eth0_and_hosts(agent_bin: Path, root: Path, preconfigured: bool) -> None:
    """eth0 is one end of a veth pair in the agent's network namespace. Already configured =
    a second run (a restarted VM): the same address and default route must not fail."""
    before = "ip link add eth0 type veth peer name eth1 && "
    if preconfigured:
        before += "ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 && "
    shutil.rmtree(root / "etc")  # created when missing
    script = "ip -4 addr show dev eth0; ip route; cat /etc/hosts /etc/resolv.conf; hostname"
    with agent_in_namespaces(agent_bin, root, before=before) as a:
        res, out, err = a.run(["sh", "-c", script], net=NET, dns=["10.0.2.3"], hostname="box1")
    assert (res.exit_code, res.error, err) == (0, None, b"")
    text = out.decode()
    assert "inet 10.0.2.15/24 " in text
    assert preconfigured or "inet 10.0.2.15/24 brd 10.0.2.255 " in text  # `ip addr add` set none
    assert "default via 10.0.2.2 dev eth0" in text
    assert "10.0.2.0/24 dev eth0" in text
    assert ",UP" in text.splitlines()[0]
    assert text.endswith(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n10.0.2.15 box1\n"
        "nameserver 10.0.2.3\nbox1\n"
    )


@pytest.mark.usefixtures("veth")
def test_netif_finds_nic_by_mac_swaps_names_and_sets_mac_and_address(agent_bin: Path, root: Path) -> None:
    """Two NICs probed in the "wrong" order: the network NIC (defined MAC ...:57) came up as
    eth0 and the user-mode one (...:56) as eth1. netif renames them into place before net
    configures eth0, gives the network NIC the container's MAC and address, and /etc/hosts
    names the container by that address."""
    before = ("ip link add eth0 address 52:54:00:12:34:57 type veth peer name p0 && "
              "ip link add eth1 address 52:54:00:12:34:56 type veth peer name p1 && "
              "mount -t sysfs sysfs /sys && ")  # this namespace's NICs in /sys/class/net
    netif = "52:54:00:12:34:57,eth1,02:42:ac:12:00:02,172.18.0.2/16"
    script = "ip -o link show eth0; ip -o link show eth1; ip -4 -o addr; ip route; cat /etc/hosts /etc/resolv.conf"
    with agent_in_namespaces(agent_bin, root, before=before) as a:
        res, out, err = a.run(["sh", "-c", script], net=NET, netifs=[netif], dns=["172.18.0.1", "10.0.2.3"],
                              hostname="box1")
    assert (res.exit_code, res.error, err) == (0, None, b"")
    text = out.decode()
    lines = text.splitlines()
    assert "link/ether 52:54:00:12:34:56" in lines[0] and ",UP" in lines[0]  # eth0: the user-mode NIC
    assert "link/ether 02:42:ac:12:00:02" in lines[1] and ",UP" in lines[1]  # eth1: the container's MAC
    assert "eth0    inet 10.0.2.15/24" in text and "eth1    inet 172.18.0.2/16" in text
    assert "default via 10.0.2.2 dev eth0" in text and "172.18.0.0/16 dev eth1" in text
    assert text.endswith("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n172.18.0.2 box1\n"
                         "nameserver 172.18.0.1\nnameserver 10.0.2.3\n")


@pytest.mark.parametrize(
    ("netif", "error"),
    [
        ("52:54:00:12:34:57,eth1,02:42:ac:12:00:02,172.18.0.2/16",
         "netif: the VM has no network interface with MAC 52:54:00:12:34:57"),
        ("52:54:00:12:34:57,eth1,02:42:ac:12:00:02,172.18.0.2",
         'netif: bad value "52:54:00:12:34:57,eth1,02:42:ac:12:00:02,172.18.0.2" (want MATCHMAC,NAME,MAC,ADDRESS/PREFIX)'),
        ("52:54:00:12:34,eth1,02:42:ac:12:00:02,172.18.0.2/16",
         'netif: bad value "52:54:00:12:34,eth1,02:42:ac:12:00:02,172.18.0.2/16" (want MATCHMAC,NAME,MAC,ADDRESS/PREFIX)'),
    ],
    ids=["no-nic", "no-prefix", "bad-mac"],
)
def test_netif_failure_is_126(agent_bin: Path, root: Path, netif: str, error: str) -> None:
    with agent_in_namespaces(agent_bin, root) as a:
        res, _, _ = a.run(["true"], netifs=[netif])
    assert (res.exit_code, res.error, res.pid) == (126, error, None)


def test_net_without_eth0_fails(agent_bin: Path, root: Path) -> None:
    with agent_in_namespaces(agent_bin, root) as a:  # a new network namespace has only lo
        res, _, _ = a.run(["true"], net=NET)
    assert (res.exit_code, res.error, res.pid) == (126, "net: the VM has no network interface eth0", None)


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ({"mounts": ["nosuchfs:none:-:/bad"]}, "mount /bad (nosuchfs none): No such device"),
        ({"mounts": ["ext4:@kvmc-no-such:ro:/vol"]}, "mount /vol (ext4 @kvmc-no-such): no disk with serial kvmc-no-such"),
        ({"mounts": ["tmpfs:-:/x"]}, 'mount "tmpfs:-:/x": want FSTYPE:SOURCE:OPTIONS:TARGET'),
        ({"mounts": ["tmpfs:tmpfs:-:/ok", "tmpfs:tmpfs:size=bogus:/bad"]}, "mount /bad (tmpfs tmpfs): Invalid argument"),
        ({"dns": ["8.8.8.8\nsearch evil"]}, 'dns: bad address "8.8.8.8\nsearch evil"'),
        ({"net": "10.0.2.15,10.0.2.2"}, 'net: bad value "10.0.2.15,10.0.2.2" (want ADDRESS/PREFIX,GATEWAY)'),
        ({"net": "10.0.2.15/33"}, 'net: bad value "10.0.2.15/33" (want ADDRESS/PREFIX,GATEWAY)'),
    ],
    ids=["fstype", "no-disk", "malformed", "options", "dns", "net-no-prefix", "net-prefix"],
)
def test_setup_failure_is_126(agent_bin: Path, root: Path, items: dict, error: str) -> None:
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, _ = a.run(["echo", "never"], **items)
        assert (res.exit_code, res.error, res.pid, out) == (126, error, None, b"")
        assert a.proc.wait(timeout=5) == 0  # the main process "ran": the agent ends after the ack


def test_setup_items_ignored_for_exec(agent_bin: Path, root: Path) -> None:
    items = {"mounts": ["tmpfs:tmpfs:-:/ignored"], "readonly_root": True, "dns": ["10.0.2.3"], "net": NET}
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, _ = a.run(["sh", "-c", "touch /written && ls /"], proc_id=2, **items)
        assert (res.exit_code, res.error) == (0, None)
        assert b"ignored" not in out.split()
        log = agent_log(a)
    assert "RUN 2: mount, readonly_root, net and dns apply to process 1 only: ignored" in log
    assert (root / "written").exists() and not (root / "etc/resolv.conf").exists()


# ---------- issue 16: ulimits, capabilities, hosts and resolv.conf options, stop signal ----------


def test_ulimits_apply_to_main_and_exec(agent_bin: Path, root: Path) -> None:
    """docker's --ulimit: set before the exec, for process 1 and for execs alike."""
    # Lowered only: this sandbox may lack CAP_SYS_RESOURCE, which raising a hard limit needs.
    limits = ["nofile:100:100", "nproc:500:1000", "core:0:1024"]
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, err = a.run(["sh", "-c", "ulimit -n; ulimit -Hn; ulimit -u; ulimit -Hu; ulimit -c; ulimit -Hc"],
                              proc_id=2, ulimits=limits)
        assert (res.exit_code, res.error, err) == (0, None, b"")
        assert out.decode().split() == ["100", "100", "500", "1000", "0", "2"]  # -c counts 512-byte blocks
        res, out, _ = a.run(["sh", "-c", "ulimit -n"])
        assert out.decode().strip() != "100"  # limits are per RUN: none given, none set


@pytest.mark.parametrize(("item", "error"), [
    ("nofile:200:100", "ulimit nofile=200:100: Invalid argument"),
    ("bogus:1:1", 'ulimit "bogus:1:1": unknown limit bogus'),
    ("nofile:x:1", 'ulimit "nofile:x:1": want NAME:SOFT:HARD (numbers, -1 for unlimited)'),
    ("nofile", 'ulimit "nofile": want NAME:SOFT:HARD'),
])
def test_bad_ulimit_fails_the_start(agent_bin: Path, root: Path, item: str, error: str) -> None:
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, _ = a.run(["echo", "never"], ulimits=[item])
    assert (res.exit_code, res.error, out) == (126, error, b"")


def test_cap_drop_leaves_the_bounding_set(agent_bin: Path, root: Path) -> None:
    net_admin, net_raw = 12, 13
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, _ = a.run(["grep", "-E", "^Cap(Eff|Bnd)", "/proc/self/status"], cap_drop=[net_admin, net_raw])
    assert (res.exit_code, res.error) == (0, None)
    caps = {line.split(":")[0]: int(line.split()[1], 16) for line in out.decode().splitlines()}
    for name in ("CapEff", "CapBnd"):
        assert not caps[name] & (1 << net_admin | 1 << net_raw), (name, hex(caps[name]))
        assert caps[name] & 1  # CAP_CHOWN kept


def test_hosts_search_and_options_without_net(agent_bin: Path, root: Path) -> None:
    """--add-host, --dns-search and --dns-option: /etc/hosts is written even with --network none."""
    with agent_in_namespaces(agent_bin, root) as a:
        res, out, _ = a.run(["cat", "/etc/hosts", "/etc/resolv.conf"], hostname="box1",
                            hosts=["10.0.2.2 host.docker.internal", "192.0.2.7 db db.local"],
                            dns=["192.0.2.53"], dns_search=["example.com", "corp"], dns_options=["ndots:2", "edns0"])
    assert (res.exit_code, res.error) == (0, None)
    assert out.decode() == (
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
        "10.0.2.2 host.docker.internal\n192.0.2.7 db db.local\n"
        "nameserver 192.0.2.53\nsearch example.com corp\noptions ndots:2 edns0\n")


@pytest.mark.parametrize(("items", "error"), [
    ({"hosts": ["not-an-ip db"]}, 'host "not-an-ip db": want IP NAME [NAME...]'),
    ({"hosts": ["192.0.2.1"]}, 'host "192.0.2.1": want IP NAME [NAME...]'),
    ({"hosts": ["192.0.2.1 a\nb"]}, 'host "192.0.2.1 a\nb": bad name "a\nb"'),
    ({"dns_search": ["a b"]}, 'dns_search: bad domain "a b"'),
    ({"dns_options": ["x\nnameserver 1.2.3.4"]}, 'dns_option: bad option "x\nnameserver 1.2.3.4"'),
])
def test_bad_hosts_and_resolver_items_fail(agent_bin: Path, root: Path, items: dict, error: str) -> None:
    with agent_in_namespaces(agent_bin, root) as a:
        res, _, _ = a.run(["true"], **items)
    assert (res.exit_code, res.error) == (126, error)


def test_stop_signal_is_what_shutdown_sends_the_main_process(agent_bin: Path, root: Path) -> None:
    import io
    import signal

    from kvmc.agent import FrameType, ProcessSpec, attach_process

    script = "trap 'echo got-usr1; exit 5' USR1; trap 'echo got-term' TERM; echo ready; while :; do sleep 0.1; done"
    with agent_in_namespaces(agent_bin, root) as a:
        a.conn.run(1, ProcessSpec(args=["sh", "-c", script], stop_signal=int(signal.SIGUSR1)))
        while (f := a.conn.read_frame(5)) is not None and f.type != FrameType.STDOUT:
            pass  # "ready": the traps are set
        a.conn.shutdown(10)
        out = io.BytesIO()
        res = attach_process(a.conn, 1, stdin=None, stdout=out, stderr=io.BytesIO(), timeout=5)
    assert (res.exit_code, out.getvalue()) == (5, b"got-usr1\n")

"""kvmc run, end to end: every test boots real microVMs through libvirt (TCG in CI)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from kvmc.images import add_layer, build_busybox_layout
from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc

pytestmark = pytest.mark.e2e


def test_output_streams_and_exit_code_round_trip(kvmc: Kvmc) -> None:
    proc = kvmc("run", "--rm", DEFAULT_IMAGE, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert proc.stdout == b"out\n"
    assert b"err\n" in proc.stderr and b"out" not in proc.stderr
    assert proc.returncode == 3


def test_image_config_is_honoured(kvmc: Kvmc, config_image: str) -> None:
    proc = kvmc("run", "--rm", config_image)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"cmd:from-image:/home/app:app\n"


def test_image_config_is_overridable(kvmc: Kvmc, config_image: str) -> None:
    proc = kvmc(
        "run", "--rm", "-e", "GREETING=from-flag", "-w", "/tmp/made", "-u", "nobody",
        "--hostname", "box1", config_image, 'echo "$GREETING:$(pwd):$(id -u):$(hostname)"',
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"from-flag:/tmp/made:65534:box1\n"
    proc = kvmc("run", "--rm", "--entrypoint", "echo", config_image, "plain", "args")
    assert proc.stdout == b"plain args\n", proc.stderr


def test_stdin_is_forwarded_with_i(kvmc: Kvmc) -> None:
    data = b"".join(b"line %d\n" % i for i in range(2000))
    proc = kvmc("run", "--rm", "-i", DEFAULT_IMAGE, "sh", "-c", "wc -l; echo done >&2", input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == b"2000"
    assert b"done" in proc.stderr


def test_whiteouts_are_honoured(kvmc: Kvmc, whiteout_image: str) -> None:
    proc = kvmc("run", "--rm", whiteout_image, "sh", "-c",
                "cat /etc/kept /etc/added; test -e /etc/deleted-me && echo STILL-THERE; true")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"kept\nupper\n"


def test_docker_exit_codes(kvmc: Kvmc) -> None:
    missing = kvmc("run", "--rm", DEFAULT_IMAGE, "no-such-command")
    assert missing.returncode == 127
    assert b"no-such-command" in missing.stderr
    not_exec = kvmc("run", "--rm", DEFAULT_IMAGE, "/etc/passwd")
    assert not_exec.returncode == 126
    killed = kvmc("run", "--rm", DEFAULT_IMAGE, "sh", "-c", "kill -9 $$")
    assert killed.returncode == 137


def test_bad_input_is_a_clear_125(kvmc: Kvmc) -> None:
    proc = kvmc("run", "--rm", "no/such-image", "true")
    assert proc.returncode == 125
    assert b'image "no/such-image:latest" not found' in proc.stderr
    proc = kvmc("run", "--no-such-flag", DEFAULT_IMAGE, "true")
    assert proc.returncode == 125
    assert b"--no-such-flag" in proc.stderr
    proc = kvmc("run", "-m", "1k", DEFAULT_IMAGE, "true")
    assert proc.returncode == 125 and b"too small" in proc.stderr
    assert not list((kvmc.data_dir / "containers").glob("*/record.json"))


def test_rm_leaves_nothing_behind(kvmc: Kvmc) -> None:
    containers = kvmc.data_dir / "containers"
    before = set(containers.iterdir()) if containers.exists() else set()  # the session's first run?
    proc = kvmc("run", "--rm", "--name", "ephemeral", DEFAULT_IMAGE, "true")
    assert proc.returncode == 0, proc.stderr
    assert set(containers.iterdir()) - {containers / "names"} == before - {containers / "names"}
    assert not (kvmc.data_dir / "containers/names/ephemeral").exists()
    assert kvmc("inspect", "ephemeral").returncode != 0
    assert not kvmc.domains()


def test_kept_container_is_inspectable_then_removed(kvmc: Kvmc) -> None:
    proc = kvmc("run", "--name", "kept", DEFAULT_IMAGE, "sh", "-c", "echo data > /root/file; exit 5")
    assert proc.returncode == 5
    info = json.loads(kvmc("inspect", "kept", check=True).stdout)[0]
    assert info["Kvmc"]["State"] == "exited" and info["State"]["ExitCode"] == 5
    assert info["Kvmc"]["Accel"] in ("kvm", "tcg") and info["Kvmc"]["MemoryMiB"] == 256
    directory = kvmc.data_dir / "containers" / info["Id"]
    assert (directory / "rootfs.qcow2").exists()
    assert info["Kvmc"]["Domain"] in kvmc.domains()
    assert kvmc("rm", "kept").returncode == 0
    assert not directory.exists()
    assert info["Kvmc"]["Domain"] not in kvmc.domains()


def test_detached_run_and_logs(kvmc: Kvmc) -> None:
    proc = kvmc("run", "-d", "--name", "bg", DEFAULT_IMAGE, "sh", "-c", "echo to-out; echo to-err >&2")
    assert proc.returncode == 0, proc.stderr
    container_id = proc.stdout.decode().strip()
    assert len(container_id) == 64
    for _ in range(600):
        info = json.loads(kvmc("inspect", "bg", check=True).stdout)[0]
        if info["Kvmc"]["State"] == "exited":
            break
    assert info["State"]["ExitCode"] == 0
    logs = kvmc("logs", "bg", check=True)
    assert logs.stdout == b"to-out\n" and logs.stderr == b"to-err\n"
    kvmc("rm", "bg", check=True)


def _hostile_archive(path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    """A docker-save tarball whose single layer holds ``member``."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["evil:1"], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as out:
        for name, blob in (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            out.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("entry", ["../escaped", "/etc/escaped"])
def test_hostile_tarball_is_refused(kvmc: Kvmc, tmp_path, entry: str) -> None:
    member = tarfile.TarInfo(entry)
    member.size = 1
    archive = tmp_path / "evil.tar"
    _hostile_archive(archive, member)
    proc = kvmc("image", "import", str(archive))
    assert proc.returncode == 125
    assert entry.encode() in proc.stderr
    assert b"evil" not in kvmc("images").stdout
    assert not (kvmc.data_dir / "escaped").exists() and not Path("/etc/escaped").exists()


def test_four_concurrent_runs(kvmc: Kvmc) -> None:
    def one(i: int):
        return kvmc("run", "--rm", DEFAULT_IMAGE, "sh", "-c", f"echo run-{i}; exit {i}")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    for i, proc in enumerate(results):
        assert proc.returncode == i, proc.stderr
        assert proc.stdout == f"run-{i}\n".encode()
    assert not kvmc.domains()


def test_vm_size_flags(kvmc: Kvmc) -> None:
    proc = kvmc("run", "--rm", "-m", "512m", "--cpus", "2", DEFAULT_IMAGE, "sh", "-c",
                "nproc; grep MemTotal /proc/meminfo")
    assert proc.returncode == 0, proc.stderr
    cpus, meminfo = proc.stdout.decode().splitlines()
    assert cpus == "2"
    total_kib = int(meminfo.split()[1])
    assert 400 * 1024 < total_kib <= 512 * 1024


def test_failed_start_leaves_nothing_behind(kvmc: Kvmc) -> None:
    """Forcing an accelerator the host cannot run makes the VM fail to start (or boot)."""
    probe = json.loads((kvmc.data_dir / "accel.json").read_text()) if (kvmc.data_dir / "accel.json").exists() else {}
    if any(verdict["accel"] == "kvm" for verdict in probe.get("verdicts", {}).values()):
        pytest.fail("this test needs a host where KVM does not work (as on kvmc's CI machines)")
    # A run dir of its own: /run/kvmc is shared with the other workers' running containers.
    run_dir = Path(tempfile.mkdtemp(prefix="kvmc-failed-start-", dir="/run"))
    isolated = Kvmc(env={**kvmc.env, "KVMC_RUN_DIR": str(run_dir)}, data_dir=kvmc.data_dir)
    try:
        proc = isolated("run", "--accel", "kvm", "--name", "doomed", DEFAULT_IMAGE, "true", timeout=240)
        assert proc.returncode == 125
        assert b"kvmc:" in proc.stderr
        assert not list((kvmc.data_dir / "containers").glob("*/record.json"))
        assert not (kvmc.data_dir / "containers/names/doomed").exists()
        assert not kvmc.domains()
        assert list(run_dir.iterdir()) == []
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # a failed assertion must not leave it in /run


def test_signals_are_forwarded_to_the_process(kvmc: Kvmc) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmc", "run", "--rm", DEFAULT_IMAGE, "sh", "-c",
         "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done"],
        env=kvmc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert out == b"got-term\n", err
    assert proc.returncode == 7


def test_rmi_refuses_an_image_in_use(kvmc: Kvmc, layouts) -> None:
    layout = build_busybox_layout(layouts / "inuse", "latest")
    add_layer(layout, "latest", lambda rootfs: (rootfs / "etc/inuse").write_text("distinct image\n"))
    kvmc("image", "import", str(layout), "--name", "test/inuse:1", check=True)
    kvmc("run", "--name", "user-of-inuse", "test/inuse:1", "true", check=True)
    proc = kvmc("rmi", "test/inuse:1")
    assert proc.returncode == 125 and b"user-of-inuse" in proc.stderr
    kvmc("rm", "user-of-inuse", check=True)
    kvmc("rmi", "test/inuse:1", check=True)

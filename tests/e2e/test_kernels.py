"""Both guest kernels boot a container: Debian's cloud kernel and kvmc's own (images/kernel/).

Whichever the suite runs on (KVMC_KERNEL), the other one keeps a smoke test here: output and
exit code round-trip, and `uname -r` tells the two kernels apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.conftest import DEFAULT_IMAGE, SHARED_DATA, Kvmc

pytestmark = pytest.mark.e2e
# Where "make setup" builds each guest (kvmc.config.GUEST_SUBDIRS; spelled out here so that the
# test states the layout rather than re-deriving it).
GUEST_SUBDIRS = {"debian": "guest", "kvmc": "guest-kvmc"}


def run_under(kvmc: Kvmc, kernel: str, *args: str):
    # KVMC_TEST_GUEST_DIR_KVMC / _DEBIAN: a branch's own guests (see GUEST_DIR in conftest.py).
    guest_dir = Path(os.environ.get(f"KVMC_TEST_GUEST_DIR_{kernel.upper()}") or SHARED_DATA / GUEST_SUBDIRS[kernel])
    if not (guest_dir / "guest.json").is_file():
        pytest.fail(f"no {kernel} guest in {guest_dir}: run 'make setup'")
    env = {**kvmc.env, "KVMC_KERNEL": kernel, "KVMC_GUEST_DIR": str(guest_dir)}
    return Kvmc(env=env, data_dir=kvmc.data_dir)(*args), json.loads((guest_dir / "guest.json").read_text())


@pytest.mark.parametrize("kernel", sorted(GUEST_SUBDIRS))
def test_each_kernel_round_trips_output_and_exit_code(kvmc: Kvmc, kernel: str) -> None:
    proc, guest = run_under(kvmc, kernel, "run", "--rm", DEFAULT_IMAGE, "--",
                            "sh", "-c", "uname -r; echo err >&2; exit 7")
    assert proc.returncode == 7, proc.stderr.decode()
    assert proc.stdout.decode().strip() == guest["kernel_release"]
    assert proc.stderr.decode().endswith("err\n")


def test_the_kernels_differ(kvmc: Kvmc) -> None:
    releases = {}
    for kernel in GUEST_SUBDIRS:
        proc, _ = run_under(kvmc, kernel, "run", "--rm", DEFAULT_IMAGE, "uname", "-r")
        assert proc.returncode == 0, proc.stderr.decode()
        releases[kernel] = proc.stdout.decode().strip()
    assert releases["debian"] != releases["kvmc"], releases
    assert "cloud" in releases["debian"]

"""A guest that misbehaves or stops answering, end to end (issue 15, the host's side). The frame
sprays and malformed payloads are unit tests (tests/unit/test_hostile_guest.py: the monitor
against a scripted agent); here, real VMs: an attached CLI can always be ended, and what the
guest says is labelled as the guest's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc

pytestmark = pytest.mark.e2e

DEAF = "trap '' INT TERM; echo ready; while true; do sleep 1; done"
"""A main process that ignores SIGINT and SIGTERM and says nothing after starting."""


def attach(kvmc: Kvmc, name: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "kvmc", "attach", name], env=kvmc.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)  # attached (the CLI's start-up and the monitor's answer)
    assert proc.poll() is None, proc.communicate()
    return proc


def state(kvmc: Kvmc, name: str) -> dict:
    return json.loads(kvmc("inspect", name, check=True).stdout)[0]


def test_an_attached_cli_can_always_be_ended(kvmc: Kvmc) -> None:
    kvmc("run", "-d", "--name", "deaf", DEFAULT_IMAGE, "sh", "-c", DEAF, check=True)
    try:
        # The first SIGINT is forwarded; the process ignores it and says nothing: the CLI gives
        # up after a few seconds with 130 and leaves the container running.
        cli = attach(kvmc, "deaf")
        began = time.monotonic()
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, err
        assert 4 <= time.monotonic() - began < 15
        assert b"gave up waiting for container deaf after SIGINT" in err and b"kvmc rm -f deaf" in err
        assert state(kvmc, "deaf")["Kvmc"]["State"] == "running"
        # A second SIGTERM ends it at once: 143.
        cli = attach(kvmc, "deaf")
        began = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        cli.send_signal(signal.SIGTERM)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode == 143, err
        assert time.monotonic() - began < 3
        # A guest that does not answer at all (its VM frozen): the same way out.
        subprocess.run(["virsh", "-c", "qemu:///system", "suspend", state(kvmc, "deaf")["Kvmc"]["Domain"]],
                       check=True, capture_output=True)
        cli = attach(kvmc, "deaf")
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, err
    finally:
        kvmc("rm", "-f", "deaf", check=True)


def test_what_the_guest_says_is_labelled_as_the_guests(kvmc: Kvmc) -> None:
    proc = kvmc("run", "--rm", DEFAULT_IMAGE, "no-such-command")
    assert proc.returncode == 127
    assert proc.stderr.rstrip().endswith(b'exec: "no-such-command": executable file not found in $PATH '
                                         b"(reported by the guest agent)")

"""Terminals, end to end (issue 13): `run -it`, `exec -it`, attach and detach, through the kvmc
CLI and through `kvmc serve` with the docker CLI, each on a real pty (tests/e2e/ptys.py) that
the test types into and resizes. Few VMs per test: each boots one (two for the API test).
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.e2e.conftest import DEFAULT_IMAGE, Kvmc
from tests.e2e.docker_clients import docker_binary
from tests.e2e.ptys import Terminal
from tests.e2e.serve import KvmcServe

pytestmark = pytest.mark.e2e
PROMPT = rb"/ # "  # busybox sh as root, PS1 unset
KVMC = [sys.executable, "-m", "kvmc"]


def kvmc_terminal(kvmc: Kvmc, *args: str, rows: int = 24, cols: int = 80) -> Terminal:
    return Terminal([*KVMC, *args], kvmc.env, rows, cols)


def test_run_it_tty_size_keys_resize_ctrl_c_and_exit_code(kvmc: Kvmc) -> None:
    with kvmc_terminal(kvmc, "run", "--rm", "-it", DEFAULT_IMAGE, "sh", rows=30, cols=100) as term:
        term.expect(PROMPT)
        term.send(b"tty; stty size; echo TERM=$TERM\r")
        term.expect(rb"/dev/pts/0\r\n30 100\r\nTERM=xterm\r\n")  # the caller's TERM and size
        term.resize_and_expect(45, 132)  # SIGWINCH to kvmc -> RESIZE -> TIOCSWINSZ in the guest
        mark = term.mark()
        term.send(b"sh -c 'echo running; sleep 60'; echo slept\r")
        # Once the job prints, it is the terminal's foreground (the shell's line editor, which
        # reads keys with ISIG off, is done): ^C typed now is the driver's SIGINT to it.
        term.expect(rb"\r\nrunning\r\n", since=mark)
        term.send(b"\x03")
        term.expect(rb"\^C\r\n" + PROMPT, timeout=20, since=mark)
        term.send(b"exit 7\r")
        assert term.wait() == 7
        assert b"slept" not in term.output[mark:].replace(b"echo slept", b"")
        assert term.settings() == term.settings_before  # raw mode restored (stty -g before == after)


def test_detach_keys_reattach_exec_it_and_logs(kvmc: Kvmc) -> None:
    name = "tty-detach"
    try:
        with kvmc_terminal(kvmc, "run", "-it", "--name", name, DEFAULT_IMAGE, "sh") as term:
            term.expect(PROMPT)
            term.send(b"X=kept; echo marker-$((6*7))\r")
            term.expect(rb"marker-42")
            term.send(b"\x10\x11")  # ctrl-p ctrl-q: docker's detach keys
            assert term.wait(30) == 0
            assert term.settings() == term.settings_before
        assert json.loads(kvmc("inspect", name).stdout)[0]["Kvmc"]["State"] == "running"  # detached, not stopped

        with kvmc_terminal(kvmc, "exec", "-it", name, "sh", rows=20, cols=70) as term:
            term.expect(PROMPT)
            term.send(b"tty; stty size; exit 5\r")
            term.expect(rb"/dev/pts/1\r\n20 70\r\n")  # a terminal of its own, with the caller's size
            assert term.wait() == 5
            assert term.settings() == term.settings_before

        with kvmc_terminal(kvmc, "attach", "--detach-keys", "ctrl-a,x", name) as term:
            term.send(b"echo $X-again\r")  # the same shell: its variable is still set
            term.expect(rb"kept-again\r\n")
            term.send(b"\x01x")
            assert term.wait(30) == 0

        with kvmc_terminal(kvmc, "attach", name) as term:
            term.send(b"exit 3\r")
            assert term.wait() == 3
            assert term.settings() == term.settings_before
        logs = kvmc("logs", name)
        assert b"marker-42\r\n" in logs.stdout and b"kept-again\r\n" in logs.stdout  # one stream, the pty's
        assert logs.stderr == b""
    finally:
        kvmc("rm", "-f", name)


def test_run_d_i_then_attach_with_piped_stdin(kvmc: Kvmc) -> None:
    name = "tty-stdin"
    try:
        started = kvmc("run", "-d", "-i", "--name", name, DEFAULT_IMAGE, "sh")
        assert started.returncode == 0, started.stderr
        attached = kvmc("attach", name, input=b"echo hello from stdin; exit 3\n", timeout=120)
        assert (attached.returncode, attached.stdout) == (3, b"hello from stdin\n"), attached.stderr
    finally:
        kvmc("rm", "-f", name)


def test_create_it_then_start_ai(kvmc: Kvmc) -> None:
    name = "tty-start"
    try:
        assert kvmc("create", "-it", "--name", name, DEFAULT_IMAGE, "sh").returncode == 0
        with kvmc_terminal(kvmc, "start", "-ai", name, rows=27, cols=90) as term:
            term.expect(PROMPT)
            term.send(b"stty size; exit 2\r")
            term.expect(rb"27 90\r\n")  # resized on attach: create's size was this test's, not a terminal's
            assert term.wait() == 2
            assert term.settings() == term.settings_before
    finally:
        kvmc("rm", "-f", name)


def test_terminal_restored_after_a_failed_start_and_a_killed_vm(kvmc: Kvmc) -> None:
    with kvmc_terminal(kvmc, "run", "--rm", "-it", DEFAULT_IMAGE, "nosuchcommand") as term:
        assert term.wait() == 127
        assert "executable file not found" in term.text()
        assert term.settings() == term.settings_before
    refused = kvmc("run", "--rm", "-it", DEFAULT_IMAGE, "true")  # stdin is not a terminal here
    assert refused.returncode == 125 and b"the input device is not a TTY" in refused.stderr
    name = "tty-killed"
    try:
        with kvmc_terminal(kvmc, "run", "-it", "--name", name, DEFAULT_IMAGE, "sh") as term:
            term.expect(PROMPT)
            assert kvmc("kill", name).returncode == 0
            assert term.wait() == 137
            assert term.settings() == term.settings_before
    finally:
        kvmc("rm", "-f", name)


def test_docker_run_it_exec_it_resize_attach_detach(kvmc_serve: KvmcServe) -> None:
    srv = kvmc_serve
    docker = [str(docker_binary())]
    with Terminal([*docker, "run", "--rm", "-it", DEFAULT_IMAGE, "sh"], srv.env, 33, 91) as term:
        term.expect(PROMPT)
        term.send(b"tty; stty size\r")
        term.expect(rb"/dev/pts/0\r\n33 91\r\n")  # ConsoleSize at create
        term.resize_and_expect(40, 120)  # the docker CLI: POST /containers/{id}/resize
        term.send(b"exit 7\r")
        assert term.wait() == 7
        assert term.settings() == term.settings_before
    name = "tty-api"
    try:
        assert srv.docker("run", "-d", "-it", "--name", name, DEFAULT_IMAGE, "sh").returncode == 0
        with Terminal([*docker, "exec", "-it", name, "sh"], srv.env, 21, 71) as term:
            term.expect(PROMPT)
            term.send(b"tty; stty size\r")
            term.expect(rb"/dev/pts/1\r\n21 71\r\n")
            term.resize_and_expect(26, 99)  # POST /exec/{id}/resize
            term.send(b"exit 4\r")
            assert term.wait() == 4
        assert srv.docker("kill", "-s", "WINCH", name).returncode == 0  # to the process; the VM goes on
        with Terminal([*docker, "attach", name], srv.env) as term:
            term.send(b"echo attached-$((2+3))\r")
            term.expect(rb"attached-5\r\n")
            term.send(b"\x10\x11")
            # The stock docker CLI spots the keys itself and ends `attach` with this message
            # and exit code 1 (its `run -it` ends 0); the container runs on either way.
            assert term.wait(30) == 1 and "read escape sequence" in term.text()
        state = srv.docker("inspect", "-f", "{{.State.Status}} {{.Config.Tty}}", name)
        assert state.stdout.strip() == b"running true", state.stderr
        logs = srv.docker("logs", name)
        assert b"attached-5\r\n" in logs.stdout
    finally:
        srv.docker("rm", "-f", name)

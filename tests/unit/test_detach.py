"""docker's detach keys (kvmc/detach.py): parsing and the scanner the engine's relay runs."""

from __future__ import annotations

import pytest

from kvmc.detach import DetachScanner, parse_detach_keys
from kvmc.errors import UsageError


def test_parse_docker_forms() -> None:
    assert parse_detach_keys(None) == parse_detach_keys("") == b"\x10\x11"  # ctrl-p,ctrl-q
    assert parse_detach_keys("ctrl-a,x") == b"\x01x"
    assert parse_detach_keys("ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_") == bytes([0, 27, 28, 29, 30, 31])
    assert parse_detach_keys("CTRL-Z") == b"\x1a"
    for bad in ("ctrl-1", "ctrl-", "abc", "ctrl-p,,ctrl-q", "f1"):
        with pytest.raises(UsageError, match="Invalid detach keys"):
            parse_detach_keys(bad)


def test_scanner_detaches_and_swallows_the_sequence() -> None:
    scan = DetachScanner(b"\x10\x11")
    assert scan.feed(b"ls\r") == (b"ls\r", False)
    assert scan.feed(b"ab\x10\x11cd") == (b"ab", True)  # nothing after the sequence is forwarded


def test_scanner_holds_a_prefix_across_reads_then_releases_a_false_start() -> None:
    scan = DetachScanner(b"\x10\x11")
    assert scan.feed(b"x\x10") == (b"x", False)  # ctrl-p held: it may start the sequence
    assert scan.feed(b"y") == (b"\x10y", False)  # it did not: both reach the process
    assert scan.feed(b"\x10") == (b"", False)
    assert scan.feed(b"\x11") == (b"", True)  # one key per read, as a typist sends them


def test_scanner_restarts_on_a_repeated_first_key() -> None:
    scan = DetachScanner(b"\x10\x11")
    assert scan.feed(b"\x10\x10\x11") == (b"\x10", True)
    scan = DetachScanner(b"\x01x")
    assert scan.feed(b"\x01\x01\x01y") == (b"\x01\x01\x01y", False)

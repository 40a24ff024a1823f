"""The accelerator verdict cache (kvmc/accel.py): one probe per guest kernel, QEMU and host
kernel, however the guests in use alternate. The probe itself boots a VM (e2e tests)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmc import accel
from kvmc.accel import AccelChoice, choose_accel


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Digests of the guests probed; every probe says TCG."""
    probed: list[str] = []

    def probe(hv, guest, work_dir, templates_dir) -> AccelChoice:
        probed.append(guest.digest)
        return AccelChoice("tcg", f"no KVM for {guest.digest}")

    monkeypatch.setattr(accel, "probe_kvm", probe)
    return probed


def _choose(data_dir: Path, digest: str, notices: list[str] | None = None) -> AccelChoice:
    guest = SimpleNamespace(digest=digest)
    return choose_accel("auto", None, guest, data_dir, data_dir, (notices if notices is not None else []).append)


def test_alternating_guests_are_probed_once_each(tmp_path: Path, probes: list[str]) -> None:
    notices: list[str] = []
    for _ in range(3):
        for digest in ("kvmc-kernel", "debian-kernel", "host-kernel"):
            choice = _choose(tmp_path, digest, notices)
            assert (choice.accel, choice.reason) == ("tcg", f"no KVM for {digest}")
    assert probes == ["kvmc-kernel", "debian-kernel", "host-kernel"]
    assert len(notices) == 3  # the fallback is said once per probe, not per run


def test_the_older_single_verdict_file_is_read(tmp_path: Path, probes: list[str]) -> None:
    key = accel._cache_key(SimpleNamespace(digest="old"))
    (tmp_path / "accel.json").write_text(json.dumps({"key": key, "accel": "tcg", "reason": "from before"}))
    assert _choose(tmp_path, "old").reason == "from before"
    assert _choose(tmp_path, "new").reason == "no KVM for new"
    assert _choose(tmp_path, "old").reason == "from before"  # kept when the new one was added
    assert probes == ["new"]


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"verdicts": {"k": "tcg"}}',
                                     '{"verdicts": {"k": {"accel": "warp", "reason": "x"}}}'])
def test_an_unreadable_cache_means_a_probe(tmp_path: Path, probes: list[str], content: str) -> None:
    (tmp_path / "accel.json").write_text(content)
    assert _choose(tmp_path, "g").accel == "tcg"
    assert probes == ["g"]
    assert _choose(tmp_path, "g").accel == "tcg" and probes == ["g"]


def test_the_cache_keeps_the_newest_verdicts(tmp_path: Path, probes: list[str]) -> None:
    for i in range(accel.MAX_VERDICTS + 4):
        _choose(tmp_path, f"g{i}")
    kept = json.loads((tmp_path / "accel.json").read_text())["verdicts"]
    assert len(kept) == accel.MAX_VERDICTS
    _choose(tmp_path, f"g{accel.MAX_VERDICTS + 3}")  # the newest: no probe
    assert len(probes) == accel.MAX_VERDICTS + 4
    _choose(tmp_path, "g0")  # the oldest was dropped
    assert len(probes) == accel.MAX_VERDICTS + 5


@pytest.mark.parametrize("requested", ["kvm", "tcg"])
def test_a_forced_accelerator_is_not_probed(tmp_path: Path, probes: list[str], requested: str) -> None:
    assert choose_accel(requested, None, SimpleNamespace(digest="g"), tmp_path, tmp_path, print).accel == requested
    assert probes == [] and not (tmp_path / "accel.json").exists()

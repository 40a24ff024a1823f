"""Test doubles for kvmc's outside world. ``FakeHypervisor`` (tests/fakes/hypervisor.py) runs
each "VM" as the real agent in private namespaces instead of a QEMU guest.

A test gets one with the ``fake_hypervisor`` fixture; import it together with the fixtures it
builds on (the agent binary, a busybox rootfs from tests/unit/test_agent_setup.py)::

    from tests.fakes import agent_bin, fake_hypervisor, root  # noqa: F401 (fixtures)

    def test_x(fake_hypervisor: FakeHypervisor) -> None: ...

For the engine (whose monitor is a forked process that opens its own hypervisor): pass
``fake_hypervisor.factory()`` as kvmc.context.HostContext's ``hypervisor_factory`` (or, for
code that builds ``Hypervisor(uri)`` itself, monkeypatch that name with it). Every instance it
makes shares the fake's state, which lives in files.

Needs root, util-linux (unshare, setpriv), iproute2 and busybox-static, as the agent tests do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.hypervisor import FakeHypervisor
from tests.unit.test_agent_setup import agent_bin, root  # noqa: F401 (fixtures)

__all__ = ["FakeHypervisor", "agent_bin", "fake_hypervisor", "root"]


@pytest.fixture
def fake_hypervisor(tmp_path: Path, agent_bin: Path, root: Path) -> Iterator[FakeHypervisor]:  # noqa: F811
    """A FakeHypervisor with its state in ``tmp_path/hv``, booting the agent on a fresh busybox
    rootfs (``tmp_path/rootfs``); every domain still running is destroyed afterwards."""
    hv = FakeHypervisor(tmp_path / "hv", root, agent_bin)
    try:
        yield hv
    finally:
        hv.close()

"""The leaves every engine part reaches, built once per process: config, stores, hypervisor.

Why an object of its own: the engine (kvmc/runtime.py), the monitor (kvmc/monitor.py) and
the pool (kvmc/pool/) each need a few of the same leaves (the state store, the hypervisor,
the image store, the guest artefacts, the accelerator choice). Handing them this, and never
the engine itself, keeps the arrows pointing down: a monitor cannot call back into the code
that spawned it, and a test can put a fake hypervisor under all three at once.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kvmc.config import Config
from kvmc.errors import KvmcError
from kvmc.guest import GuestArtefacts, load_guest
from kvmc.images import ImageStore
from kvmc.net.store import NetworkStore
from kvmc.state import StateStore
from kvmc.volumes import VolumeStore

if TYPE_CHECKING:
    from kvmc.accel import AccelChoice
    from kvmc.domain import VMSpec
    from kvmc.hypervisor import Hypervisor


_INHERITED: list[object] = []
"""Hypervisor connections a forked child inherited and must never free (see after_fork)."""


def _stderr_notice(message: str) -> None:
    print(f"kvmc: {message}", file=sys.stderr)


def _libvirt_hypervisor(config: Config) -> Hypervisor:
    from kvmc.hypervisor import Hypervisor

    return Hypervisor(config.libvirt_uri)


@dataclass
class HostContext:
    """Config, stores and the hypervisor of one kvmc process (CLI call, server or monitor)."""

    config: Config
    notice: Callable[[str], None] = _stderr_notice
    """Where kvmc's own remarks go (the accelerator fallback, -v): stderr for the CLI, the
    log for the server."""
    verbose: bool = False
    hypervisor_factory: Callable[[Config], Hypervisor] = _libvirt_hypervisor
    """How to reach libvirt: tests pass a factory of a fake (tests/fakes/hypervisor.py)."""
    monitor_start: str = "fork"
    """How a container's monitor is started: ``fork`` (a CLI: fastest) or ``exec`` (a fresh
    interpreter: the API server, whose other threads may hold locks at fork time)."""
    claim_auto_pools: bool = False
    """Whether runs may claim from the automatic pools (``kvmc serve``'s, for the images it
    runs): True in the server only; the CLI's runs use the pools warmed by hand."""
    _hv: Hypervisor | None = field(default=None, init=False, repr=False)
    _hv_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _guest: GuestArtefacts | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.children: set[int] = set()
        """Monitors this process started with ``exec`` and has not reaped yet."""
        self.images = ImageStore(self.config.images_dir)
        self.state = StateStore(self.config.containers_dir)
        self.volumes = VolumeStore(self.config.volumes_dir)
        self.networks = NetworkStore(self.config.data_dir / "networks")

    @property
    def hv(self) -> Hypervisor:
        """The hypervisor connection, opened on first use (``kvmc ps`` may never need it)."""
        with self._hv_lock:  # a monitor opens it in a thread of its own (connect_hv)
            if self._hv is None:
                self._hv = self.hypervisor_factory(self.config)
            return self._hv

    def connect_hv(self) -> None:
        """Open the hypervisor's connection now, ahead of its first use (a monitor, in a
        thread of its own, while its guest runs); a failure is left to that use to report."""
        try:
            self.hv.connect()
        except KvmcError:
            pass

    @property
    def monitors_from_forkserver(self) -> bool:
        """Whether containers' monitors are forked by the user's fork server (kvmc/forkserver.py):
        when configured, and only over libvirt (a fork server's child cannot inherit a test's
        fake hypervisor)."""
        return self.config.monitor_forkserver and self.hypervisor_factory is _libvirt_hypervisor

    def after_fork(self) -> None:
        """In a forked child (a monitor, a pool refill): leave the parent's libvirt connection
        alone, whose socket the child has closed, and open the child's own on next use.

        Left, not dropped: freeing it would run libvirt's virConnectClose on the closed socket,
        which polls the dead descriptors for ever (measured: a refill child spinning at 60%
        CPU). It is kept referenced for the child's life instead."""
        if self._hv is not None:
            _INHERITED.append(self._hv)
        self._hv = None
        self._hv_lock = threading.Lock()  # a copy of one another thread of the parent might hold

    def reap_children(self) -> None:
        """Collect the exit status of ended monitors (a server lives long: no zombies)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def say(self, message: str) -> None:
        """A remark for -v only."""
        if self.verbose:
            self.notice(message)

    def guest(self, directory: Path | str | None = None) -> GuestArtefacts:
        """The guest artefacts, read once per process (create, accel and pool all need them);
        ``directory``: another guest's (a container's own, ContainerRecord.guest_dir)."""
        if directory:
            return load_guest(Path(directory))
        if self._guest is None:
            self._guest = load_guest(self.config.guest_artefacts_dir)
        return self._guest

    def domain_xml(self, spec: VMSpec) -> str:
        """libvirt's domain XML for ``spec``, from kvmc's templates (compiled ones kept in the
        cache directory: Config.template_cache_dir)."""
        from kvmc.domain import render_domain_xml

        return render_domain_xml(spec, self.config.templates_dir, self.config.template_cache_dir)

    def accel(self, requested: str | None = None) -> AccelChoice:
        from kvmc.accel import choose_accel

        return choose_accel(requested or self.config.accel, self.hv, self.guest(), self.config.data_dir,
                            self.config.templates_dir, self.notice)

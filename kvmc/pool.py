"""Pools of pre-booted, saved VMs that ``run`` claims instead of booting (Kata's VM cache).

A member is a VM booted once to the point where the guest agent waits for its command, then
saved by libvirt (``virDomainSave``) into the member's own directory, together with its qcow2
overlay (save file ~89 MiB for a 128 MiB guest under TCG; ``init_on_free=1`` on the guest
cmdline cut it to 53 MiB but made each pooled run ~0.3 s slower, since every page the container
frees is then zeroed in emulation: kvmc leaves it off). Each member is its own persistent domain: libvirt restores a saved image only under
the name and UUID it was saved with (docs/platform.md).

Claiming is a ``rename()`` of the member's directory into the new container's directory: the
file system makes it atomic, so two concurrent ``run``s can never get the same member; the
loser simply tries the next one. The claimed domain is then redefined with the container's
paths (socket, console log, overlay location) and restored from the save file.

A member records the digests it was made from (image id, guest kernel+initramfs, accel, size):
one made from anything that has since changed is never claimed and is removed by ``pool gc``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from kvmc.agent import AgentConnection
from kvmc.disks import create_overlay
from kvmc.domain import DOMAIN_PREFIX, OVERLAY_FILE, VMSpec, container_vm, render_domain_xml
from kvmc.guest import GuestArtefacts
from kvmc.state import now_iso

MEMBER_FILE = "member.json"
SAVE_FILE = "state.save"
WARMING_PREFIX = ".warming-"
STALE_WARMING_S = 600


@dataclass(frozen=True)
class PoolKey:
    """What a member must match to serve a run: same image, VM size, accelerator and guest."""

    image_id: str
    memory_mib: int
    cpus: int
    accel: str
    guest_digest: str
    network: str = "none"
    """user | none: a NIC is a device, so it is part of what a saved VM is (members saved
    before kvmc had networking have no NIC, hence the default)."""


@dataclass
class Member:
    """One saved VM waiting to be claimed."""

    id: str
    domain: str
    uuid: str
    key: PoolKey
    created: str
    save_bytes: int = 0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "key": asdict(self.key)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Member:
        data = json.loads(text)
        return cls(**{**data, "key": PoolKey(**data["key"])})


def member_vm(member: Member, directory: Path, agent_socket: Path, image_disk: Path, guest: GuestArtefacts,
              state_root: str) -> VMSpec:
    """The VM a member is while it waits in the pool (a claim redefines it, see Runtime.create)."""
    return container_vm(
        name=member.domain, uuid=member.uuid, container_id=member.id, container_name=f"pool-{member.id[:12]}",
        directory=directory, agent_socket=agent_socket, image_disk=image_disk, guest=guest,
        domain_type="kvm" if member.key.accel == "kvm" else "qemu", memory_mib=member.key.memory_mib,
        vcpus=member.key.cpus, state_root=state_root, network=member.key.network == "user",
    )


class Pool:
    """The pool directory (``<data_dir>/pool``) and the operations on it."""

    def __init__(self, runtime) -> None:  # noqa: ANN001 - kvmc.runtime.Runtime (no import cycle)
        self.rt = runtime
        self.root = runtime.config.data_dir / "pool"

    # ---------------------------------------------------------------- members
    def members(self) -> list[tuple[Path, Member]]:
        """Claimable members (warming ones are hidden behind a dot-prefixed directory)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                found.append((path, Member.from_json((path / MEMBER_FILE).read_text())))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # claimed (renamed away) while we listed, or half-removed
        return found

    def key_for(self, image_id: str, memory_mib: int, cpus: int, accel: str, network: str = "user") -> PoolKey:
        return PoolKey(image_id, memory_mib, cpus, accel, self.rt.guest().digest, network)

    def domains(self) -> set[str]:
        return {m.domain for _, m in self.members()} | {
            f"{DOMAIN_PREFIX}pool-{p.name.removeprefix(WARMING_PREFIX)[:16]}"
            for p in (self.root.iterdir() if self.root.is_dir() else []) if p.name.startswith(WARMING_PREFIX)
        }

    # ------------------------------------------------------------------ warm
    def _make_member(self, key: PoolKey, image_disk: Path) -> Member:
        """Boot one VM to agent-ready, save it, and only then make it claimable."""
        member_id = secrets.token_hex(32)
        member = Member(id=member_id, domain=f"{DOMAIN_PREFIX}pool-{member_id[:16]}", uuid=str(uuid.uuid4()),
                        key=key, created=now_iso())
        warming = self.root / f"{WARMING_PREFIX}{member_id}"
        warming.mkdir(parents=True, mode=0o755)
        self.rt.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        sock = self.rt.config.run_dir / f"pool-{member_id[:16]}.agent.sock"
        guest = self.rt.guest()
        try:
            create_overlay(image_disk, warming / OVERLAY_FILE)
            xml = render_domain_xml(member_vm(member, warming, sock, image_disk, guest, str(self.rt.config.data_dir)),
                                    self.rt.config.templates_dir)
            self.rt.hv.define(xml)
            self.rt.hv.start(member.domain)
            with AgentConnection.connect(str(sock), timeout=self.rt.config.boot_timeout_s) as conn:
                conn.wait_ready(self.rt.config.boot_timeout_s)
            self.rt.hv.save(member.domain, warming / SAVE_FILE)
            member.save_bytes = (warming / SAVE_FILE).stat().st_size
            (warming / MEMBER_FILE).write_text(member.to_json())
            os.rename(warming, self.root / member_id)
        except BaseException:
            self.rt.hv.undefine(member.domain)
            shutil.rmtree(warming, ignore_errors=True)
            raise
        finally:
            sock.unlink(missing_ok=True)
        return member

    def warm(self, image_ref: str, size: int, memory_mib: int, cpus: int, accel: str | None,
             progress: Callable[[int, int], None] = lambda done, total: None, network: str = "user") -> list[Member]:
        """Top the pool for (image, size) up to ``size`` ready members; two boots at a time."""
        image = self.rt.images.get(image_ref)
        choice = self.rt.accel(accel)
        key = self.key_for(image.id, memory_mib, cpus, choice.accel, network)
        missing = max(0, size - sum(1 for _, m in self.members() if m.key == key))
        made: list[Member] = []
        progress(0, missing)
        with ThreadPoolExecutor(max_workers=2) as workers:
            for member in workers.map(lambda _: self._make_member(key, image.disk_path), range(missing)):
                made.append(member)
                progress(len(made), missing)
        return made

    # ----------------------------------------------------------------- claim
    def claim(self, key: PoolKey, target: Path) -> Member | None:
        """Atomically take a matching member: its directory becomes ``target``."""
        for path, member in self.members():
            if member.key != key:
                continue
            try:
                os.rename(path, target)
            except OSError:
                continue  # another run claimed it first
            return member
        return None

    def refill_in_background(self, image_id: str, memory_mib: int, cpus: int, accel: str, network: str) -> None:
        """Start a detached ``kvmc pool warm`` for one member; the claiming run never waits."""
        key = self.key_for(image_id, memory_mib, cpus, accel, network)
        subprocess.Popen(
            [sys.executable, "-m", "kvmc", "pool", "warm", image_id, "--size",
             str(1 + sum(1 for _, m in self.members() if m.key == key)),
             "-m", f"{memory_mib}m", "--cpus", str(cpus), "--accel", accel, "--network", network],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    # ---------------------------------------------------------------- remove
    def _remove(self, path: Path, member: Member | None) -> None:
        if member is not None:
            self.rt.hv.undefine(member.domain)
        shutil.rmtree(path, ignore_errors=True)

    def remove(self, image_ref: str | None) -> int:
        """Remove every member (of one image, if given)."""
        image_id = self.rt.images.get(image_ref).id if image_ref else None
        removed = 0
        for path, member in self.members():
            if image_id is None or member.key.image_id == image_id:
                self._remove(path, member)
                removed += 1
        return removed

    def stale(self) -> Iterator[tuple[Path, Member | None]]:
        """Members made from a guest or image that changed, and abandoned warm-ups."""
        guest = self.rt.guest().digest
        live_images = {i.id for i in self.rt.images.list() if i.tags}
        for path, member in self.members():
            if member.key.guest_digest != guest or member.key.image_id not in live_images:
                yield path, member
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(WARMING_PREFIX) and time.time() - path.stat().st_mtime > STALE_WARMING_S:
                    member_id = path.name.removeprefix(WARMING_PREFIX)
                    self.rt.hv.undefine(f"{DOMAIN_PREFIX}pool-{member_id[:16]}")
                    yield path, None

    def gc(self) -> int:
        removed = 0
        for path, member in list(self.stale()):
            self._remove(path, member)
            removed += 1
        return removed

    def summary(self) -> list[dict]:
        """One row per pool key: image, size, ready members, whether it is stale."""
        stale = {m.id for _, m in self.stale() if m is not None}
        tags = {i.id: (i.tags[0] if i.tags else i.short_id) for i in self.rt.images.list()}
        rows: dict[PoolKey, dict] = {}
        for _, member in self.members():
            row = rows.setdefault(member.key, {
                "image": tags.get(member.key.image_id, member.key.image_id[:12]), "image_id": member.key.image_id,
                "memory_mib": member.key.memory_mib, "cpus": member.key.cpus, "accel": member.key.accel,
                "ready": 0, "stale": 0, "save_mib": 0.0,
            })
            row["stale" if member.id in stale else "ready"] += 1
            row["save_mib"] = round(member.save_bytes / (1 << 20), 1)
        return list(rows.values())

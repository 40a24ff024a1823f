"""Pools that ``run`` uses instead of booting: saved VMs (Kata's VM cache) and VM templates.

Two sources of ready VMs behind one protocol (:class:`VMSource`; Kata's VM factory has a
small base with ``direct``, ``template`` and ``cache`` implementations the same way):
saved members (kvmc/pool/saved.py), each claimed by one run, and VM templates
(kvmc/pool/template.py), cloned by any number of runs. Both keep their records in directories
published by rename, keyed by :class:`PoolKey` (kvmc/pool/common.py). Members and templates
record the digests they were made from (image id, guest kernel+initramfs, accel, size,
network): one made from anything that has since changed is never used and is removed by
``pool gc``.

:class:`Pool` is what the engine and the service layer hold: ``claim`` asks the sources in
order, the template first (it is not consumed), then a saved member; the other operations
(warm, list, remove, gc, ``pool ls``) go to one source or to each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from kvmc.context import HostContext
from kvmc.pool.common import (
    STALE_WARMING_S,
    WARMING_PREFIX,
    Offer,
    PoolKey,
    pool_key,
    resolve,
)
from kvmc.pool.saved import MEMBER_FILE, SAVE_FILE, WARM_UP_ID, Member, SavedMembers, member_vm
from kvmc.pool.template import (
    MIGRATION_TIMEOUT_S,
    STATE_FD_NAME,
    TEMPLATE_DISK,
    TEMPLATE_FILE,
    TEMPLATE_RAM_DIR,
    TEMPLATE_STATE,
    TEMPLATES_DIR,
    Template,
    Templates,
    capture_template_state,
    clone_spec,
    load_template_state,
    template_domain,
    template_ram_file,
)

__all__ = [
    "MEMBER_FILE", "MIGRATION_TIMEOUT_S", "SAVE_FILE", "STALE_WARMING_S", "STATE_FD_NAME", "TEMPLATES_DIR",
    "TEMPLATE_DISK", "TEMPLATE_FILE", "TEMPLATE_RAM_DIR", "TEMPLATE_STATE", "WARMING_PREFIX", "WARM_UP_ID",
    "Member", "Offer", "Pool", "PoolKey", "SavedMembers", "Template", "Templates", "VMSource",
    "capture_template_state", "clone_spec", "load_template_state", "member_vm", "template_domain",
    "template_ram_file",
]


class VMSource(Protocol):
    """One kind of pool: what serves a run, and the upkeep ``pool ls/rm/gc`` and ``kvmc gc`` do.

    Warming is each kind's own (:meth:`SavedMembers.warm` tops up a count of consumable
    members, :meth:`Templates.warm` makes the one template of a key): see :class:`Pool`.
    """

    MODE: str
    """``pool ls``'s mode and ``pool rm --mode``'s value: save | template."""

    def offer(self, key: PoolKey, target: Path, auto: bool = True) -> Offer | None:
        """What serves a run of ``key`` whose container directory is to be ``target`` (a
        consumed source renames its record's directory there), or None; ``auto``: the
        automatic pools of ``kvmc serve`` may serve it too."""

    def items(self) -> list[tuple[Path, Any]]:
        """Published records: (directory, record)."""

    def stale(self) -> Iterator[tuple[Path, Any | None]]:
        """Records that must not be used, and abandoned warm-ups (None); finds only."""

    def remove(self, image_id: str | None) -> int:
        """Remove every record (of one image); how many."""

    def gc(self) -> int:
        """Remove what :meth:`stale` finds; how many."""

    def remove_abandoned(self) -> int:
        """Remove only the abandoned warm-ups :meth:`stale` finds; how many."""

    def summary_rows(self, tags: dict[str, str]) -> list[dict]:
        """``pool ls`` rows (``tags``: image id to the name to show)."""

    def domains(self) -> set[str]:
        """libvirt domains this source owns, so that ``kvmc gc`` leaves them alone."""


class Pool:
    """The pool directory (``<data_dir>/pool``): saved members in it, templates under
    ``templates/``, and the operations on them."""

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self.root = host.config.data_dir / "pool"
        self.saved = SavedMembers(host, self.root)
        self.template = Templates(host, self.root / TEMPLATES_DIR)
        self.sources: tuple[VMSource, ...] = (self.template, self.saved)
        """In the order a run asks them: a template is not consumed, so it is preferred."""

    @property
    def templates_root(self) -> Path:
        return self.template.root

    def key_for(self, image_id: str, memory_mib: int, cpus: int, accel: str, network: str = "user") -> PoolKey:
        return pool_key(self.host, image_id, memory_mib, cpus, accel, network)

    # ----------------------------------------------------------------- a run
    def claim(self, key: PoolKey, target: Path, auto: bool = False) -> Offer | None:
        """What serves a run of ``key``, fastest first: a hot member (a hot template clone or
        a restored member waiting paused: a resume), else a ready template (a clone, not
        consumed), else a saved member (a restore); a member is taken atomically and its
        directory becomes ``target``. Stale ones are never offered. ``auto``: the automatic
        pools of ``kvmc serve`` may serve the run too (the API's runs only)."""
        return (self.saved.offer(key, target, auto, hot_only=True) or self.template.offer(key, target, auto)
                or self.saved.offer(key, target, auto))

    def is_hot(self, member: Member | Offer) -> bool:
        """Restored and paused already: a claim resumes it."""
        return self.saved.is_hot(member)

    def member_socket(self, member: Member) -> Path:
        """The agent socket of a member's VM while it is in the pool."""
        return self.saved.socket_for(member.id)

    def take_socket(self, member: Member, agent_socket: Path) -> bool:
        return self.saved.take_socket(member, agent_socket)

    def refill_in_background(self, image_id: str, memory_mib: int, cpus: int, accel: str, network: str,
                             hot: bool = False) -> None:
        self.saved.refill_in_background(image_id, memory_mib, cpus, accel, network, hot)

    def template_for(self, key: PoolKey) -> tuple[Path, Template] | None:
        return self.template.ready(key)

    def start_clone(self, domain: str, clone_xml: str, template_dir: Path) -> None:
        self.template.start_clone(domain, clone_xml, template_dir)

    # ------------------------------------------------------------------ warm
    def warm(self, image_ref: str, size: int, memory_mib: int, cpus: int, accel: str | None,
             progress: Callable[[int, int], None] = lambda done, total: None, network: str = "user",
             hot: bool = False) -> list[Member]:
        """Top the pool for (image, size) up to ``size`` ready members (see SavedMembers.warm)."""
        image, key = resolve(self.host, image_ref, memory_mib, cpus, accel, network)
        return self.saved.warm(key, image.disk_path, size, hot, progress)

    def warm_template(self, image_ref: str, memory_mib: int, cpus: int, accel: str | None,
                      network: str = "user") -> tuple[Template, bool]:
        """The template for (image, size, ...), made if there is none; True if made now."""
        image, key = resolve(self.host, image_ref, memory_mib, cpus, accel, network)
        _, template, made = self.template.warm(key, image.disk_path)
        return template, made

    def warm_hot_clones(self, key: PoolKey, image_disk: Path, size: int, origin: str = "",
                        progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[Template, bool, list[Member]]:
        """Hot template clones of ``key`` up to ``size``, the template made first if there is
        none: (template, made now, clones made now)."""
        directory, template, made = self.template.warm(key, image_disk, origin)
        return template, made, self.saved.warm_clones(key, image_disk, directory, template, size, origin, progress)

    # ---------------------------------------------------------------- upkeep
    def members(self) -> list[tuple[Path, Member]]:
        """Claimable members (the templates directory beside them holds no member.json)."""
        return self.saved.items()

    def templates(self) -> list[tuple[Path, Template]]:
        """Complete templates."""
        return self.template.items()

    def stale(self) -> Iterator[tuple[Path, Member | None]]:
        return self.saved.stale()

    def stale_templates(self) -> Iterator[tuple[Path, Template | None]]:
        return self.template.stale()

    def domains(self) -> set[str]:
        """Domains the pool owns: members, and template VMs while they are being made."""
        return set().union(*(source.domains() for source in self.sources))

    def remove(self, image_ref: str | None, mode: str | None = None) -> tuple[int, int]:
        """Remove every member and template (of one image, of one mode: 'save' or 'template',
        if given): (members, templates)."""
        image_id = self.host.images.get(image_ref).id if image_ref else None
        members, templates = (source.remove(image_id) if mode in (None, source.MODE) else 0
                              for source in (self.saved, self.template))
        return members, templates

    def gc(self) -> tuple[int, int]:
        """Remove stale members and templates: (members, templates)."""
        return self.saved.gc(), self.template.gc()

    def remove_abandoned(self) -> int:
        """Remove the warm-ups whose maker ended (with the VMs they left running); how many."""
        return sum(source.remove_abandoned() for source in self.sources)

    def summary(self) -> list[dict]:
        """One row per pool key, mode and origin (save: ready/stale members; clone: hot template
        clones; template: one template, ready or stale, and the size of its RAM file in tmpfs),
        each saying why it is kept (``pool warm``, or a ``kvmc serve``'s automatic pool with its
        reasons), and a row for each image that server runs but keeps nothing for, saying why."""
        tags = {i.id: (i.tags[0] if i.tags else i.short_id) for i in self.host.images.list()}
        rows = [row for source in (self.saved, self.template) for row in source.summary_rows(tags)]
        from kvmc.pool.auto import annotate, read_states
        from kvmc.vmlife import is_monitor

        for state in read_states(self.root):  # running kvmc serves' automatic pools: what each keeps, and why
            if is_monitor(state.pid):
                rows = annotate(rows, state, tags)
        return rows

"""Saved members (Kata's VM cache): VMs saved at agent-ready, each claimed by one run.

**Save mode** (``kvmc pool warm IMAGE --size N``). A member is a VM booted once to the point
where the guest agent waits for its command, then saved by libvirt (``virDomainSave``) into the
member's own directory, together with its qcow2 overlay (save file ~36 MiB for a 128 MiB guest
with kvmc's kernel under TCG; ``init_on_free=1`` on the guest cmdline shrinks it but makes each
pooled run ~0.3 s slower, since every page the container frees is then zeroed in emulation:
kvmc leaves it off). Each member is its own persistent domain: libvirt restores a saved image
only under the name and UUID it was saved with (docs/platform.md). A member serves one run.

Claiming is a ``rename()`` of the member's directory into the new container's directory: the
file system makes it atomic, so two concurrent ``run``s can never get the same member; the
loser simply tries the next one. The claimed domain is then redefined with the container's
paths (socket, console log, overlay location) and restored from the save file.

**Hot members** (``pool warm IMAGE --hot``; Kata's VM cache keeps its VMs the same way). A
hot member is a saved member that is also restored already, paused, in its own QEMU: a claim
resumes it (milliseconds) instead of restoring it (~0.4 s under TCG, most of it QEMU's start
through libvirt), at the price of the guest's RAM held while it waits. Its save file stays as
the snapshot: if its QEMU is gone (libvirtd or host restarted), the claim restores from it.
Its agent socket is renamed to the claiming container's (a bound unix socket is reached by
its inode, so QEMU never notices) and its paths in libvirt's live definition go stale (QEMU
holds the files open); the persistent definition is the container's, for later starts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvmc.agent import FIRST_WORD_S, AgentConnection, GuestOutput, ProcessResult, ProcessSpec, attach_process, labelled
from kvmc.domain import OVERLAY_FILE, VMSpec
from kvmc.errors import AgentSilent, GuestError
from kvmc.guest import GuestArtefacts
from kvmc.pool.common import (KeyedRecord, Offer, PoolDirectory, PoolKey, disown_warming, own_warming, pool_domain,
                              pool_key, pool_vm, resolve)
from kvmc.pool.template import TEMPLATE_DISK, TEMPLATE_STATE, Template, clone_spec, load_template_state
from kvmc.state import now_iso

MEMBER_FILE = "member.json"
SAVE_FILE = "state.save"
WARM_UP_ID = 2
"""The process id of a hot member's warm-up run (1 is the claiming container's)."""
WARM_UP_IMAGE_ID = 3
"""The process id of the second warm-up run, the image's own ``/bin/true``."""
WARM_UP_IMAGE_ARGS = ["/bin/true"]
"""Run once in each hot member after the agent's warm-up: the claim's process is the image's
code, which TCG translated anew in every claim (``true`` of kvmc/busybox: STARTED to EXIT
25-33 ms, 5-10 ms once busybox's start-up ran in the member). ``true`` because it changes
nothing by definition; an image without one (distroless) just gets no second warm-up."""
WARM_UP_FIRST_WORD_S = FIRST_WORD_S
"""How long a warm-up waits for the agent on its first connection to a just restored VM before
it connects once more (kvmc.agent.FIRST_WORD_S)."""


@dataclass
class Member(KeyedRecord):
    """One saved VM waiting to be claimed."""

    id: str
    domain: str
    uuid: str
    key: PoolKey
    created: str
    save_bytes: int = 0
    origin: str = ""
    """Empty for ``kvmc pool warm``'s, ``auto:<pid>`` for a ``kvmc serve``'s automatic pool."""
    template: str = ""
    """A hot template clone's template id: the member was cloned from it (its RAM maps the
    template's file copy-on-write), not booted and saved, and has no save file."""


def member_vm(member: Member, directory: Path, agent_socket: Path, image_disk: Path, guest: GuestArtefacts,
              state_root: str, tcg_tb_cache_mib: int = 0) -> VMSpec:
    """The VM a member is while it waits in the pool (a claim redefines it, see Runtime.create)."""
    return pool_vm(member.key, name=member.domain, uuid=member.uuid, ident=member.id, label="pool",
                   directory=directory, agent_socket=agent_socket, image_disk=image_disk, guest=guest,
                   state_root=state_root, tcg_tb_cache_mib=tcg_tb_cache_mib)


class SavedMembers(PoolDirectory[Member]):
    """The members in the pool directory (``<data_dir>/pool/<id>/member.json``)."""

    MODE = "save"
    BOOT = "pool"
    TAG = "pool"
    RECORD_FILE = MEMBER_FILE
    RECORD = Member

    def domains(self) -> set[str]:
        """Members' domains (each is persistent while it waits), and warm-ups'."""
        return {m.domain for _, m in self.items()} | super().domains()

    def is_hot(self, member: Member | Offer) -> bool:
        """Restored and paused already: a claim resumes it (an offer has its member's domain)."""
        return self.host.hv.state(member.domain) == "paused"

    # ----------------------------------------------------------------- claim
    def claim(self, key: PoolKey, target: Path, auto: bool = True, hot_only: bool = False) -> Member | None:
        """Atomically take a matching member, a hot one first (only a hot one with
        ``hot_only``; of the automatic pools too with ``auto``): its directory becomes ``target``."""
        found = [(path, m, self.is_hot(m)) for path, m in self.matching(key, auto)]
        for path, member, hot in sorted(found, key=lambda pmh: not pmh[2]):
            if hot_only and not hot:
                continue
            try:
                os.rename(path, target)
            except OSError:
                continue  # another run claimed it first
            return member
        return None

    def offer(self, key: PoolKey, target: Path, auto: bool = True, hot_only: bool = False) -> Offer[Member] | None:
        """A claimed member (consumed: its directory is ``target`` now), hot if it is."""
        member = self.claim(key, target, auto, hot_only)
        return None if member is None else Offer(self.BOOT, member, target, hot=self.is_hot(member))

    def intact(self, member: Member) -> bool:
        """A hot template clone has no save file: once its QEMU is gone it is of no use."""
        return not member.template or self.is_hot(member)

    def take_socket(self, member: Member, agent_socket: Path) -> bool:
        """Move a claimed hot member's agent socket to the container's path; False (and the VM
        destroyed: the claim restores from the save file) if it is gone."""
        try:
            os.rename(self.socket_for(member.id), agent_socket)
            return True
        except OSError:
            self.host.hv.destroy(member.domain)
            return False

    # ------------------------------------------------------------------ warm
    def warm(self, key: PoolKey, image_disk: Path, size: int = 1, hot: bool = False,
             progress: Callable[[int, int], None] = lambda done, total: None, origin: str = "") -> list[Member]:
        """Top the pool for ``key`` (of ``origin``: manual or one server's automatic pool) up
        to ``size`` ready members, two at a time; with ``hot``, ready members that are not hot
        yet are made hot too. Returns the members made or heated now."""
        ready = [(path, m) for path, m in self.matching(key) if m.origin == origin and not m.template]
        cold = [(path, m) for path, m in ready if hot and not self.is_hot(m)][:size]
        missing = max(0, size - len(ready))
        done: list[Member] = []
        progress(0, missing + len(cold))

        def one(job: tuple[Path, Member] | None) -> Member | None:
            if job is None:
                return self._make(self._new(key, origin), image_disk, hot=hot)
            return job[1] if self._heat(job[0], job[1], image_disk) else None

        from concurrent.futures import ThreadPoolExecutor  # only warm-ups need threads

        with ThreadPoolExecutor(max_workers=2) as workers:
            for member in workers.map(one, [*cold, *([None] * missing)]):
                if member is not None:
                    done.append(member)
                progress(len(done), missing + len(cold))
        return done

    def _new(self, key: PoolKey, origin: str = "", template: str = "") -> Member:
        member_id = secrets.token_hex(32)
        return Member(id=member_id, domain=pool_domain(self.TAG, member_id), uuid=str(uuid.uuid4()), key=key,
                      created=now_iso(), origin=origin, template=template)

    def _boot(self, member: Member, directory: Path, agent_socket: Path, image_disk: Path) -> None:
        """Define the member's persistent domain and start it."""
        xml = self.host.domain_xml(self._member_vm(member, directory, agent_socket, image_disk))
        self.host.hv.define(xml)
        self.host.hv.start(member.domain)

    def _member_vm(self, member: Member, directory: Path, agent_socket: Path, image_disk: Path) -> VMSpec:
        """:func:`member_vm` with this host's guest, state root and translation-cache size."""
        config = self.host.config
        return member_vm(member, directory, agent_socket, image_disk, self.host.guest(), str(config.data_dir),
                         tcg_tb_cache_mib=config.tcg_tb_cache_mib)

    def _capture(self, member: Member, directory: Path, image_disk: Path, hot: bool = False) -> bool:  # type: ignore[override]
        """Save the VM into ``directory`` (and with ``hot`` restore it paused): True if hot."""
        self.host.hv.save(member.domain, directory / SAVE_FILE)
        member.save_bytes = (directory / SAVE_FILE).stat().st_size
        if hot:
            self._restore_paused(member, directory, image_disk)
        return hot

    # ------------------------------------------------------------ hot clones
    def warm_clones(self, key: PoolKey, image_disk: Path, template_dir: Path, template: Template, size: int,
                    origin: str = "", progress: Callable[[int, int], None] = lambda done, total: None
                    ) -> list[Member]:
        """Top the hot template clones of ``key`` (of ``origin``) up to ``size``, one at a time
        (a clone takes a fraction of a boot: it is QEMU's start and a device-state load)."""
        ready = [m for _, m in self.matching(key) if m.origin == origin and m.template]
        missing = max(0, size - len(ready))
        done: list[Member] = []
        progress(0, missing)
        for _ in range(missing):
            done.append(self._make_clone(self._new(key, origin, template.id), image_disk, template_dir, template))
            progress(len(done), missing)
        return done

    def _make_clone(self, member: Member, image_disk: Path, template_dir: Path, template: Template) -> Member:
        """A hot template clone: the template's frozen overlay copied as the member's, its
        persistent domain the member's plain one (what a claim's later starts boot), started
        once as a clone of the template (RAM file mapped copy-on-write, device state loaded),
        warmed up and left paused; published by rename only then, removed on any failure.

        What it saves over a hot member: the guest's RAM is the template's shared pages
        until written, where a restored member holds all of it privately (docs/platform.md)."""
        warming = self._warming(member.id)
        warming.mkdir(parents=True, mode=0o755)
        own_warming(warming)
        sock = self.socket_for(member.id)
        try:
            shutil.copyfile(template_dir / TEMPLATE_DISK, warming / OVERLAY_FILE)
            os.chmod(warming / OVERLAY_FILE, 0o644)
            spec = self._member_vm(member, warming, sock, image_disk)
            self.host.hv.define(self.host.domain_xml(spec))
            self.host.hv.create_transient(self.host.domain_xml(clone_spec(spec, template)), paused=True)
            load_template_state(self.host.hv, member.domain, template_dir / TEMPLATE_STATE)
            self._warm_up(member)
            (warming / MEMBER_FILE).write_text(member.to_json())
            disown_warming(warming)
            os.rename(warming, self.root / member.id)
        except BaseException:
            self._release(member.id, unfinished=True)
            shutil.rmtree(warming, ignore_errors=True)
            raise
        return member

    # ------------------------------------------------------------------- hot
    def _restore_paused(self, member: Member, directory: Path, image_disk: Path) -> None:
        """Make a saved member hot: its QEMU started from the save file in ``directory`` (a
        warming directory: claims cannot see it meanwhile), warmed up and left paused."""
        xml = self.host.domain_xml(self._member_vm(member, directory, self.socket_for(member.id), image_disk))
        self.host.hv.restore(directory / SAVE_FILE, xml, paused=True)
        self._warm_up(member)

    def _warm_up(self, member: Member) -> None:
        """Run the agent binary once in a restored member (``kvmc-agent --version``), then pause it.

        Why: under TCG a restored QEMU starts with an empty translation cache, so the first
        fork, chroot and exec in the guest are translated anew on the claiming run's path
        (measured: the claim's RUN to STARTED took 0.15 s without this, 0.08 s with it); after
        this they are cached in the paused QEMU. It runs in the container's root (the binary
        is reached through /proc/self/exe, so any image does) and changes nothing there; the
        claim's RUN still sets the clock and reseeds the RNG. Then the image's own ``/bin/true``
        runs once (WARM_UP_IMAGE_ARGS), which warms the image's start-up code too.
        """
        self.host.hv.resume(member.domain)
        timeout = self.host.config.boot_timeout_s
        try:
            result = self._warm_up_run(member, min(timeout, WARM_UP_FIRST_WORD_S))
        except AgentSilent:
            # Never answered (WARM_UP_FIRST_WORD_S): the same RUN on a new connection. Had the
            # first one reached the agent after all, this one fails (process 2 exists): no
            # warm-up runs twice unseen.
            self.host.say(f"warming up pool member {member.id[:12]}: no answer on the first connection to its "
                          "agent; connecting again")
            result = self._warm_up_run(member, timeout)
        if result.exit_code != 0 or result.error:
            raise GuestError(f"warming up pool member {member.id[:12]} failed: exit {result.exit_code}"
                             + (f": {labelled(result.error)}" if result.error else ""))
        # Whatever it says (not found, or a non-zero exit), it has ended: nothing of it is left
        # for the claim. One that never ends fails the warm-up (AgentSilent), as one must.
        self._warm_up_run(member, timeout, WARM_UP_IMAGE_ID, WARM_UP_IMAGE_ARGS)
        self.host.hv.pause(member.domain)

    def _warm_up_run(self, member: Member, timeout: float, proc_id: int = WARM_UP_ID,
                     args: list[str] | None = None) -> ProcessResult:
        """One connection to the member's agent: run a warm-up process (the agent's own
        ``--version`` unless ``args``) and wait for its end (AgentSilent when the agent says
        nothing for ``timeout`` seconds)."""
        with AgentConnection.connect(str(self.socket_for(member.id)), timeout=self.host.config.boot_timeout_s) as conn:
            conn.run(proc_id, ProcessSpec(args=args or ["/proc/self/exe", "--version"]))
            return attach_process(conn, proc_id, stdin=None, stdout=GuestOutput(0), stderr=GuestOutput(0),
                                  timeout=timeout)

    def _heat(self, path: Path, member: Member, image_disk: Path) -> bool:
        """Make a published saved member hot; False if it was claimed first."""
        warming = self._warming(member.id)
        try:
            os.rename(path, warming)  # hidden from claims while its QEMU starts
        except OSError:
            return False
        try:
            os.utime(warming)  # a warming directory's age and owner are how gc tells an abandoned one
            own_warming(warming)
            self._restore_paused(member, warming, image_disk)
        except BaseException:
            self.host.hv.destroy(member.domain)  # stays a saved member: its save file is intact
            self.socket_for(member.id).unlink(missing_ok=True)
            raise
        finally:
            disown_warming(warming)
            os.rename(warming, path)
        return True

    # ---------------------------------------------------------------- refill
    def refill_in_background(self, image_id: str, memory_mib: int, cpus: int, accel: str, network: str,
                             hot: bool = False) -> None:
        """Warm one replacement member in a detached process; the claiming run never waits.

        In-process code, not a ``kvmc pool warm`` command line: the pool must not depend on
        the CLI's flags. A double fork, so neither a CLI nor the long-lived API server is
        left with a child to reap.
        """
        key = pool_key(self.host, image_id, memory_mib, cpus, accel, network)
        size = 1 + len([m for _, m in self.matching(key, auto=False) if not m.template])
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.waitpid(pid, 0)
            return
        code = 0
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            devnull = os.open(os.devnull, os.O_RDWR)
            self.root.mkdir(parents=True, exist_ok=True)
            log = os.open(self.root / "refill.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(log, 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            self.host.after_fork()
            image, key = resolve(self.host, image_id, memory_mib, cpus, accel, network)
            self.warm(key, image.disk_path, size, hot)
        except BaseException:  # noqa: BLE001 - a forked child must never return into its parent
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)

    # ---------------------------------------------------------------- remove
    def _release(self, ident: str, unfinished: bool) -> None:
        """The member's domain (undefine destroys a hot member's QEMU first) and agent socket."""
        self.host.hv.undefine(self.domain_for(ident))
        self.socket_for(ident).unlink(missing_ok=True)

    # --------------------------------------------------------------- pool ls
    def _fill_row(self, row: dict, member: Member, fresh: bool) -> None:
        """How many of the ready members are hot, and a save file's size."""
        row["hot"] += fresh and self.is_hot(member)
        row["save_mib"] = round(member.save_bytes / (1 << 20), 1)
        if member.template:
            row["template_id"] = member.template[:12]

    def _row(self, member: Member) -> object:
        return member.key, member.origin, bool(member.template)

    def _mode(self, member: Member) -> str:
        return "clone" if member.template else self.MODE

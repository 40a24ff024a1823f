"""Pools that ``run`` uses instead of booting: saved VMs (Kata's VM cache) and VM templates.

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

**Template mode** (``kvmc pool warm IMAGE --template``; Kata's VM templating). One VM per pool
key boots with its RAM in a file on tmpfs (``/dev/shm/kvmc-tmpl-<id16>.mem``, QEMU
memory-backend-file, ``share=on``) to the point where the agent waits; then QEMU is stopped and
only its device state is migrated into ``template.state`` with the ``x-ignore-shared``
capability (the RAM stays in the file), and the VM is destroyed. The template is the RAM file,
the state file and the guest's frozen overlay ``template.qcow2``; it is never consumed. Each
clone copies ``template.qcow2`` as its own overlay (the template's page cache in RAM describes
exactly those blocks), maps the RAM file privately (``share=off``: copy-on-write, so idle clones
share the template's pages), starts paused with ``-incoming defer`` and loads the device state
(QMP ``migrate-incoming``), then resumes. libvirt cannot name the RAM file nor set the
capability, so those go through ``<qemu:commandline>`` and QMP passthrough
(docs/platform.md, "VM templating through libvirt").

Members and templates record the digests they were made from (image id, guest kernel+initramfs,
accel, size, network): one made from anything that has since changed is never used and is
removed by ``pool gc``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import os
import secrets
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from kvmc.agent import AgentConnection, ProcessSpec, attach_process
from kvmc.disks import create_overlay
from kvmc.domain import DOMAIN_PREFIX, OVERLAY_FILE, TemplateMemory, VMSpec, container_vm, render_domain_xml
from kvmc.errors import GuestError, HypervisorError, KvmcError
from kvmc.context import HostContext
from kvmc.guest import GuestArtefacts
from kvmc.state import now_iso

MEMBER_FILE = "member.json"
SAVE_FILE = "state.save"
WARMING_PREFIX = ".warming-"
STALE_WARMING_S = 600

TEMPLATES_DIR = "templates"
TEMPLATE_FILE = "template.json"
TEMPLATE_STATE = "template.state"
TEMPLATE_DISK = "template.qcow2"
TEMPLATE_RAM_DIR = Path("/dev/shm")
"""tmpfs: the template's RAM must be page cache that every clone can map, not disk."""
MIGRATION_TIMEOUT_S = 60.0
WARM_UP_ID = 2
"""The process id of a hot member's warm-up run (1 is the claiming container's)."""
STATE_FD_NAME = "kvmc-state"
_IGNORE_SHARED = {"execute": "migrate-set-capabilities",
                  "arguments": {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}}


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


class _KeyedJson:
    """JSON round trip of a pool dataclass whose ``key`` field is a PoolKey."""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "key": asdict(self.key)}, indent=1)  # type: ignore[call-overload, attr-defined]

    @classmethod
    def from_json(cls, text: str):  # noqa: ANN206 - returns cls
        data = json.loads(text)
        return cls(**{**data, "key": PoolKey(**data["key"])})


@dataclass
class Member(_KeyedJson):
    """One saved VM waiting to be claimed."""

    id: str
    domain: str
    uuid: str
    key: PoolKey
    created: str
    save_bytes: int = 0


@dataclass
class Template(_KeyedJson):
    """One template: RAM file on tmpfs + device state + frozen overlay; serves any number of clones."""

    id: str
    key: PoolKey
    created: str
    mem_path: str
    state_bytes: int = 0

    @property
    def domain(self) -> str:
        """The template VM's (transient) domain, alive only while the template is made."""
        return template_domain(self.id)



def template_domain(template_id: str) -> str:
    return f"{DOMAIN_PREFIX}tmpl-{template_id[:16]}"


def template_ram_file(template_id: str) -> Path:
    return TEMPLATE_RAM_DIR / f"kvmc-tmpl-{template_id[:16]}.mem"


def clone_spec(spec: VMSpec, template: Template) -> VMSpec:
    """The first start of a container cloned from ``template``: the container's own VM, its RAM
    the template's file mapped privately, QEMU waiting for the template's device state."""
    return dataclasses.replace(
        spec, template_memory=TemplateMemory(Path(template.mem_path), spec.memory_mib, shared=False),
        incoming_defer=True)


def _wait_migration(hv, domain: str, timeout: float = MIGRATION_TIMEOUT_S) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = hv.qmp(domain, {"execute": "query-migrate"}) or {}
        if info.get("status") == "completed":
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise HypervisorError(f"migration of VM {domain} {info['status']}: {info.get('error-desc', '')}".strip())
        time.sleep(0.005)
    raise HypervisorError(f"migration of VM {domain} did not complete within {timeout:.0f}s")


def _hand_over(hv, domain: str, fd: int) -> None:  # noqa: ANN001 - kvmc.hypervisor
    """Give QEMU ``fd`` (the state file) as STATE_FD_NAME for ``migrate``/``migrate-incoming fd:``;
    our copy is closed either way."""
    try:
        hv.qmp_with_fd(domain, {"execute": "getfd", "arguments": {"fdname": STATE_FD_NAME}}, fd)
    finally:
        os.close(fd)


def capture_template_state(hv, domain: str, state_file: Path) -> dict:  # noqa: ANN001 - kvmc.hypervisor
    """Stop the template VM and write its device state (not its RAM, which stays in the shared
    file) to ``state_file``. ``fd:`` because libvirt's seccomp sandbox (spawn=deny) kills a
    QEMU that tries ``exec:``; the fd is handed over with the getfd command."""
    hv.qmp(domain, {"execute": "stop"})
    hv.qmp(domain, _IGNORE_SHARED)
    _hand_over(hv, domain, os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    hv.qmp(domain, {"execute": "migrate", "arguments": {"uri": f"fd:{STATE_FD_NAME}"}})
    # Completion also flushes and inactivates QEMU's block nodes: the overlay is consistent now.
    return _wait_migration(hv, domain)


def load_template_state(hv, domain: str, state_file: Path) -> None:  # noqa: ANN001 - kvmc.hypervisor
    """Feed a template's device state to a clone started paused with ``-incoming defer``."""
    hv.qmp(domain, _IGNORE_SHARED)  # must match the stream's, or QEMU refuses the load
    _hand_over(hv, domain, os.open(state_file, os.O_RDONLY))
    hv.qmp(domain, {"execute": "migrate-incoming", "arguments": {"uri": f"fd:{STATE_FD_NAME}"}})
    _wait_migration(hv, domain)


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

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self.root = host.config.data_dir / "pool"

    @property
    def templates_root(self) -> Path:
        return self.root / TEMPLATES_DIR

    # ---------------------------------------------------------------- members
    @staticmethod
    def _published(root: Path, record_file: str, kind: type) -> list:
        """(directory, record) for every published directory under ``root`` (ones still being
        made hide behind a dot prefix), read from ``record_file``."""
        if not root.is_dir():
            return []
        found = []
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                found.append((path, kind.from_json((path / record_file).read_text())))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # claimed or removed while we listed (or not a record's directory)
        return found

    def members(self) -> list[tuple[Path, Member]]:
        """Claimable members (the templates directory beside them holds no member.json)."""
        return self._published(self.root, MEMBER_FILE, Member)

    def key_for(self, image_id: str, memory_mib: int, cpus: int, accel: str, network: str = "user") -> PoolKey:
        return PoolKey(image_id, memory_mib, cpus, accel, self.host.guest().digest, network)

    def domains(self) -> set[str]:
        """Domains the pool owns: members, and template VMs while they are being made."""
        return {m.domain for _, m in self.members()} | {
            f"{DOMAIN_PREFIX}pool-{p.name.removeprefix(WARMING_PREFIX)[:16]}"
            for p in (self.root.iterdir() if self.root.is_dir() else []) if p.name.startswith(WARMING_PREFIX)
        } | {
            template_domain(p.name.removeprefix(WARMING_PREFIX))
            for p in (self.templates_root.iterdir() if self.templates_root.is_dir() else [])
            if p.name.startswith(WARMING_PREFIX)
        }

    def member_socket(self, member: Member) -> Path:
        """The agent socket of a member's VM while it is in the pool."""
        return self.host.config.run_dir / f"pool-{member.id[:16]}.agent.sock"

    def is_hot(self, member: Member) -> bool:
        """Restored and paused already: a claim resumes it."""
        return self.host.hv.state(member.domain) == "paused"

    def _restore_paused(self, member: Member, directory: Path, image_disk: Path) -> None:
        """Make a saved member hot: its QEMU started from the save file in ``directory`` (a
        warming directory: claims cannot see it meanwhile), warmed up and left paused."""
        xml = render_domain_xml(member_vm(member, directory, self.member_socket(member), image_disk, self.host.guest(),
                                          str(self.host.config.data_dir)), self.host.config.templates_dir)
        self.host.hv.restore(directory / SAVE_FILE, xml, paused=True)
        self._warm_up(member)

    def _warm_up(self, member: Member) -> None:
        """Run the agent binary once in a restored member (``kvmc-agent --version``), then pause it.

        Why: under TCG a restored QEMU starts with an empty translation cache, so the first
        fork, chroot and exec in the guest are translated anew on the claiming run's path
        (measured: the claim's RUN to STARTED took 0.15 s without this, 0.08 s with it); after
        this they are cached in the paused QEMU. It runs in the container's root (the binary
        is reached through /proc/self/exe, so any image does) and changes nothing there; the
        claim's RUN still sets the clock and reseeds the RNG.
        """
        self.host.hv.resume(member.domain)
        timeout = self.host.config.boot_timeout_s
        with AgentConnection.connect(str(self.member_socket(member)), timeout=timeout) as conn:
            conn.run(WARM_UP_ID, ProcessSpec(args=["/proc/self/exe", "--version"]))
            result = attach_process(conn, WARM_UP_ID, stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(),
                                    timeout=timeout)
        if result.exit_code != 0 or result.error:
            raise GuestError(f"warming up pool member {member.id[:12]} failed: exit {result.exit_code} "
                             f"{result.error or ''}".strip())
        self.host.hv.pause(member.domain)

    def _heat(self, path: Path, member: Member, image_disk: Path) -> bool:
        """Make a published saved member hot; False if it was claimed first."""
        warming = self.root / f"{WARMING_PREFIX}{member.id}"
        try:
            os.rename(path, warming)  # hidden from claims while its QEMU starts
        except OSError:
            return False
        try:
            os.utime(warming)  # a warming directory's age is how gc tells an abandoned one
            self._restore_paused(member, warming, image_disk)
        except BaseException:
            self.host.hv.destroy(member.domain)  # stays a saved member: its save file is intact
            self.member_socket(member).unlink(missing_ok=True)
            raise
        finally:
            os.rename(warming, path)
        return True

    # ------------------------------------------------------------------ warm
    def _make_member(self, key: PoolKey, image_disk: Path, hot: bool = False) -> Member:
        """Boot one VM to agent-ready, save it (and with ``hot`` restore it paused), and only
        then make it claimable."""
        member_id = secrets.token_hex(32)
        member = Member(id=member_id, domain=f"{DOMAIN_PREFIX}pool-{member_id[:16]}", uuid=str(uuid.uuid4()),
                        key=key, created=now_iso())
        warming = self.root / f"{WARMING_PREFIX}{member_id}"
        warming.mkdir(parents=True, mode=0o755)
        self.host.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        sock = self.member_socket(member)
        guest = self.host.guest()
        try:
            create_overlay(image_disk, warming / OVERLAY_FILE)
            xml = render_domain_xml(member_vm(member, warming, sock, image_disk, guest, str(self.host.config.data_dir)),
                                    self.host.config.templates_dir)
            self.host.hv.define(xml)
            self.host.hv.start(member.domain)
            with AgentConnection.connect(str(sock), timeout=self.host.config.boot_timeout_s) as conn:
                conn.wait_ready(self.host.config.boot_timeout_s)
            self.host.hv.save(member.domain, warming / SAVE_FILE)
            member.save_bytes = (warming / SAVE_FILE).stat().st_size
            if hot:
                self._restore_paused(member, warming, image_disk)
            (warming / MEMBER_FILE).write_text(member.to_json())
            os.rename(warming, self.root / member_id)
        except BaseException:
            self.host.hv.undefine(member.domain)
            shutil.rmtree(warming, ignore_errors=True)
            sock.unlink(missing_ok=True)
            raise
        if not hot:
            sock.unlink(missing_ok=True)
        return member

    def warm(self, image_ref: str, size: int, memory_mib: int, cpus: int, accel: str | None,
             progress: Callable[[int, int], None] = lambda done, total: None, network: str = "user",
             hot: bool = False) -> list[Member]:
        """Top the pool for (image, size) up to ``size`` ready members, two at a time; with
        ``hot``, ready members that are not hot yet are made hot too. Returns the members made
        or heated now."""
        image = self.host.images.get(image_ref)
        choice = self.host.accel(accel)
        key = self.key_for(image.id, memory_mib, cpus, choice.accel, network)
        ready = [(path, m) for path, m in self.members() if m.key == key]
        cold = [(path, m) for path, m in ready if hot and not self.is_hot(m)][:size]
        missing = max(0, size - len(ready))
        done: list[Member] = []
        progress(0, missing + len(cold))

        def one(job: tuple[Path, Member] | None) -> Member | None:
            if job is None:
                return self._make_member(key, image.disk_path, hot)
            return job[1] if self._heat(job[0], job[1], image.disk_path) else None

        from concurrent.futures import ThreadPoolExecutor  # only warm-ups need threads

        with ThreadPoolExecutor(max_workers=2) as workers:
            for member in workers.map(one, [*cold, *([None] * missing)]):
                if member is not None:
                    done.append(member)
                progress(len(done), missing + len(cold))
        return done

    # -------------------------------------------------------------- templates
    def templates(self) -> list[tuple[Path, Template]]:
        """Complete templates."""
        return self._published(self.templates_root, TEMPLATE_FILE, Template)

    def template_for(self, key: PoolKey) -> tuple[Path, Template] | None:
        """The template that serves runs of ``key``, if one is ready (its RAM file still there)."""
        for path, template in self.templates():
            if template.key == key and os.path.exists(template.mem_path):
                return path, template
        return None

    def _make_template(self, key: PoolKey, image_disk: Path) -> Template:
        """Boot the template VM to agent-ready, capture it, destroy it; only then publish it."""
        template_id = secrets.token_hex(32)
        template = Template(id=template_id, key=key, created=now_iso(), mem_path=str(template_ram_file(template_id)))
        warming = self.templates_root / f"{WARMING_PREFIX}{template_id}"
        warming.mkdir(parents=True, mode=0o755)
        self.host.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        sock = self.host.config.run_dir / f"tmpl-{template_id[:16]}.agent.sock"
        try:
            create_overlay(image_disk, warming / OVERLAY_FILE)
            spec = container_vm(
                name=template.domain, uuid=str(uuid.uuid4()), container_id=template_id,
                container_name=f"template-{template_id[:12]}", directory=warming, agent_socket=sock,
                image_disk=image_disk, guest=self.host.guest(), domain_type="kvm" if key.accel == "kvm" else "qemu",
                memory_mib=key.memory_mib, vcpus=key.cpus, state_root=str(self.host.config.data_dir),
                network=key.network == "user",
            )
            spec = dataclasses.replace(spec, template_memory=TemplateMemory(
                Path(template.mem_path), key.memory_mib, shared=True))
            # Transient: nothing of the template VM outlives its capture.
            self.host.hv.create_transient(render_domain_xml(spec, self.host.config.templates_dir))
            with AgentConnection.connect(str(sock), timeout=self.host.config.boot_timeout_s) as conn:
                conn.wait_ready(self.host.config.boot_timeout_s)
            capture_template_state(self.host.hv, template.domain, warming / TEMPLATE_STATE)
            self.host.hv.destroy(template.domain)
            # From now on only ever copied: never opened read-write again.
            os.rename(warming / OVERLAY_FILE, warming / TEMPLATE_DISK)
            for name in (TEMPLATE_DISK, TEMPLATE_STATE):
                os.chmod(warming / name, 0o444)
            template.state_bytes = (warming / TEMPLATE_STATE).stat().st_size
            (warming / TEMPLATE_FILE).write_text(template.to_json())
            os.rename(warming, self.templates_root / template_id)
        except BaseException:
            self.host.hv.destroy(template.domain)
            shutil.rmtree(warming, ignore_errors=True)
            Path(template.mem_path).unlink(missing_ok=True)
            raise
        finally:
            sock.unlink(missing_ok=True)
        return template

    def warm_template(self, image_ref: str, memory_mib: int, cpus: int, accel: str | None,
                      network: str = "user") -> tuple[Template, bool]:
        """The template for (image, size, ...), made if there is none; True if made now."""
        image = self.host.images.get(image_ref)
        choice = self.host.accel(accel)
        key = self.key_for(image.id, memory_mib, cpus, choice.accel, network)
        self.templates_root.mkdir(parents=True, exist_ok=True)
        with (self.templates_root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two concurrent warms make one template
            found = self.template_for(key)
            if found is not None:
                return found[1], False
            return self._make_template(key, image.disk_path), True

    def start_clone(self, domain: str, clone_xml: str, template_dir: Path) -> None:
        """Start ``domain`` as a clone of the template in ``template_dir``, running on return.

        ``clone_xml`` is the live definition of this one start (the domain's persistent
        definition stays the cold one). Any failure leaves the domain shut off.
        """
        state = template_dir / TEMPLATE_STATE
        try:
            template = Template.from_json((template_dir / TEMPLATE_FILE).read_text())
        except (OSError, ValueError, TypeError, KeyError):
            template = None
        if template is None or not state.exists() or not os.path.exists(template.mem_path):
            raise KvmcError(f"the VM template {template_dir.name[:12]} this container was cloned from is gone "
                            "(pool rm or pool gc removed it): remove the container and run it again")
        self.host.hv.create_transient(clone_xml, paused=True)
        try:
            load_template_state(self.host.hv, domain, state)
            self.host.hv.resume(domain)
        except BaseException:
            self.host.hv.destroy(domain)
            raise

    def _remove_template(self, path: Path, template: Template | None) -> None:
        """Remove a template, or (``template`` None) an abandoned one's VM, RAM file and directory."""
        template_id = template.id if template else path.name.removeprefix(WARMING_PREFIX)
        if template is None:
            self.host.hv.destroy(template_domain(template_id))
        template_ram_file(template_id).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    def stale_templates(self) -> Iterator[tuple[Path, Template | None]]:
        """Templates made from a guest or image that changed, and abandoned ones being made."""
        guest = self.host.guest().digest
        live_images = {i.id for i in self.host.images.list() if i.tags}
        for path, template in self.templates():
            if (template.key.guest_digest != guest or template.key.image_id not in live_images
                    or not os.path.exists(template.mem_path)):
                yield path, template
        yield from self._abandoned(self.templates_root)

    # ----------------------------------------------------------------- claim
    def claim(self, key: PoolKey, target: Path) -> Member | None:
        """Atomically take a matching member, a hot one first: its directory becomes ``target``."""
        matching = [(path, m) for path, m in self.members() if m.key == key]
        for path, member in sorted(matching, key=lambda pm: not self.is_hot(pm[1])):
            try:
                os.rename(path, target)
            except OSError:
                continue  # another run claimed it first
            return member
        return None

    def take_socket(self, member: Member, agent_socket: Path) -> bool:
        """Move a claimed hot member's agent socket to the container's path; False (and the VM
        destroyed: the claim restores from the save file) if it is gone."""
        try:
            os.rename(self.member_socket(member), agent_socket)
            return True
        except OSError:
            self.host.hv.destroy(member.domain)
            return False

    def refill_in_background(self, image_id: str, memory_mib: int, cpus: int, accel: str, network: str,
                             hot: bool = False) -> None:
        """Warm one replacement member in a detached process; the claiming run never waits.

        In-process code, not a ``kvmc pool warm`` command line: the pool must not depend on
        the CLI's flags. A double fork, so neither a CLI nor the long-lived API server is
        left with a child to reap.
        """
        key = self.key_for(image_id, memory_mib, cpus, accel, network)
        size = 1 + sum(1 for _, m in self.members() if m.key == key)
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
            self.warm(image_id, size, memory_mib, cpus, accel, network=network, hot=hot)
        except BaseException:  # noqa: BLE001 - a forked child must never return into its parent
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)

    # ---------------------------------------------------------------- remove
    def _remove(self, path: Path, member: Member | None) -> None:
        """Remove a member, or (``member`` None) an abandoned warm-up's domain and directory."""
        short = (member.id if member else path.name.removeprefix(WARMING_PREFIX))[:16]
        self.host.hv.undefine(f"{DOMAIN_PREFIX}pool-{short}")  # destroys a hot member's QEMU first
        (self.host.config.run_dir / f"pool-{short}.agent.sock").unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _abandoned(root: Path) -> Iterator[tuple[Path, None]]:
        """Warm-ups under ``root`` older than any warm-up takes: a crashed ``pool warm``'s."""
        if root.is_dir():
            for path in root.iterdir():
                if path.name.startswith(WARMING_PREFIX) and time.time() - path.stat().st_mtime > STALE_WARMING_S:
                    yield path, None

    def remove(self, image_ref: str | None, mode: str | None = None) -> tuple[int, int]:
        """Remove every member and template (of one image, of one mode: 'save' or 'template',
        if given): (members, templates)."""
        image_id = self.host.images.get(image_ref).id if image_ref else None
        removed = 0
        for path, member in self.members() if mode in (None, "save") else []:
            if image_id is None or member.key.image_id == image_id:
                self._remove(path, member)
                removed += 1
        templates = 0
        for path, template in self.templates() if mode in (None, "template") else []:
            if image_id is None or template.key.image_id == image_id:
                self._remove_template(path, template)
                templates += 1
        return removed, templates

    def stale(self) -> Iterator[tuple[Path, Member | None]]:
        """Members made from a guest or image that changed, and abandoned warm-ups (None).

        Only finds them (``pool ls`` lists through here); :meth:`gc` removes them."""
        guest = self.host.guest().digest
        live_images = {i.id for i in self.host.images.list() if i.tags}
        for path, member in self.members():
            if member.key.guest_digest != guest or member.key.image_id not in live_images:
                yield path, member
        yield from self._abandoned(self.root)

    def gc(self) -> tuple[int, int]:
        """Remove stale members and templates: (members, templates)."""
        removed = 0
        for path, member in list(self.stale()):
            self._remove(path, member)
            removed += 1
        templates = 0
        for path, template in list(self.stale_templates()):
            self._remove_template(path, template)
            templates += 1
        return removed, templates

    def summary(self) -> list[dict]:
        """One row per pool key and mode (save: ready/stale members; template: one template,
        ready or stale, and the size of its RAM file in tmpfs)."""
        stale = {m.id for _, m in self.stale() if m is not None}
        tags = {i.id: (i.tags[0] if i.tags else i.short_id) for i in self.host.images.list()}
        rows: dict[tuple[str, PoolKey], dict] = {}

        def row_for(mode: str, key: PoolKey, ident: str = "") -> dict:
            return rows.setdefault((mode + ident, key), {
                "mode": mode, "image": tags.get(key.image_id, key.image_id[:12]), "image_id": key.image_id,
                "memory_mib": key.memory_mib, "cpus": key.cpus, "accel": key.accel, "network": key.network,
                "ready": 0, "hot": 0, "stale": 0, "save_mib": 0.0, "ram_mib": 0.0,
            })

        for _, member in self.members():
            row = row_for("save", member.key)
            row["stale" if member.id in stale else "ready"] += 1
            row["hot"] += member.id not in stale and self.is_hot(member)
            row["save_mib"] = round(member.save_bytes / (1 << 20), 1)
        stale_templates = {t.id for _, t in self.stale_templates() if t is not None}
        for _, template in self.templates():
            row = row_for("template", template.key, template.id)
            row["stale" if template.id in stale_templates else "ready"] += 1
            row["id"] = template.id[:12]
            row["save_mib"] = round(template.state_bytes / (1 << 20), 2)
            try:  # what the RAM file occupies in tmpfs (the guest pages the template touched)
                row["ram_mib"] = round(os.stat(template.mem_path).st_blocks * 512 / (1 << 20), 1)
            except OSError:
                pass
        return list(rows.values())

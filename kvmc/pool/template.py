"""VM templates (Kata's VM templating): one captured VM per pool key, cloned by every run.

**Template mode** (``kvmc pool warm IMAGE --template``). One VM per pool key boots with its RAM
in a file on tmpfs (``/dev/shm/kvmc-tmpl-<id16>.mem``, QEMU memory-backend-file, ``share=on``)
to the point where the agent waits; then QEMU is stopped and only its device state is migrated
into ``template.state`` with the ``x-ignore-shared`` capability (the RAM stays in the file), and
the VM is destroyed. The template is the RAM file, the state file and the guest's frozen
overlay ``template.qcow2``; it is never consumed. Each clone copies ``template.qcow2`` as its
own overlay (the template's page cache in RAM describes exactly those blocks), maps the RAM
file privately (``share=off``: copy-on-write, so idle clones share the template's pages),
starts paused with ``-incoming defer`` and loads the device state (QMP ``migrate-incoming``),
then resumes. libvirt cannot name the RAM file nor set the capability, so those go through
``<qemu:commandline>`` and QMP passthrough (docs/platform.md, "VM templating through libvirt").
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvmc.domain import OVERLAY_FILE, TemplateMemory, VMSpec
from kvmc.errors import HypervisorError, KvmcError
from kvmc.pool.common import KeyedRecord, Offer, PoolDirectory, PoolKey, pool_domain, pool_vm
from kvmc.state import now_iso

TEMPLATES_DIR = "templates"
TEMPLATE_FILE = "template.json"
TEMPLATE_STATE = "template.state"
TEMPLATE_DISK = "template.qcow2"
TEMPLATE_RAM_DIR = Path("/dev/shm")
"""tmpfs: the template's RAM must be page cache that every clone can map, not disk."""
TEMPLATE_TAG = "tmpl"
MIGRATION_TIMEOUT_S = 60.0
STATE_FD_NAME = "kvmc-state"
_IGNORE_SHARED = {"execute": "migrate-set-capabilities",
                  "arguments": {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}}


@dataclass
class Template(KeyedRecord):
    """One template: RAM file on tmpfs + device state + frozen overlay; serves any number of clones."""

    id: str
    key: PoolKey
    created: str
    mem_path: str
    state_bytes: int = 0
    origin: str = ""
    """Empty for ``kvmc pool warm``'s, ``auto:<pid>`` for a ``kvmc serve``'s automatic pool."""

    @property
    def domain(self) -> str:
        """The template VM's (transient) domain, alive only while the template is made."""
        return template_domain(self.id)


def template_domain(template_id: str) -> str:
    return pool_domain(TEMPLATE_TAG, template_id)


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


class Templates(PoolDirectory[Template]):
    """The templates (``<data_dir>/pool/templates/<id>/template.json``)."""

    MODE = "template"
    BOOT = "template"
    TAG = TEMPLATE_TAG
    RECORD_FILE = TEMPLATE_FILE
    RECORD = Template

    def intact(self, template: Template) -> bool:
        """Its RAM file is still in tmpfs (gone after a host restart)."""
        return os.path.exists(template.mem_path)

    def ready(self, key: PoolKey, auto: bool = True) -> tuple[Path, Template] | None:
        """The template that serves runs of ``key``, if one is ready (its RAM file still there);
        without ``auto``, a manual one only."""
        return next(((path, t) for path, t in self.matching(key, auto) if self.intact(t)), None)

    def offer(self, key: PoolKey, target: Path, auto: bool = True) -> Offer[Template] | None:
        """The ready template of ``key`` to clone; not consumed, and ``target`` is left alone."""
        found = self.ready(key, auto)
        return None if found is None else Offer(self.BOOT, found[1], found[0])

    # ------------------------------------------------------------------ warm
    def warm(self, key: PoolKey, image_disk: Path, origin: str = "") -> tuple[Path, Template, bool]:
        """(directory, template) for ``key``, made (of ``origin``) if there is none; True if made now.
        A manual warm-up never settles for an automatic pool's template, which its server removes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two concurrent warms make one template
            found = self.ready(key, auto=bool(origin))
            if found is not None:
                return found[0], found[1], False
            template_id = secrets.token_hex(32)
            template = Template(id=template_id, key=key, created=now_iso(),
                                mem_path=str(template_ram_file(template_id)), origin=origin)
            return self.root / template_id, self._make(template, image_disk), True

    def _boot(self, template: Template, directory: Path, agent_socket: Path, image_disk: Path) -> None:
        """Create the template VM, its RAM in the shared file; transient: nothing of it outlives
        its capture."""
        spec = pool_vm(template.key, name=template.domain, uuid=str(uuid.uuid4()), ident=template.id,
                       label="template", directory=directory, agent_socket=agent_socket, image_disk=image_disk,
                       guest=self.host.guest(), state_root=str(self.host.config.data_dir),
                       tcg_tb_cache_mib=self.host.config.tcg_tb_cache_mib)
        spec = dataclasses.replace(spec, template_memory=TemplateMemory(
            Path(template.mem_path), template.key.memory_mib, shared=True))
        self.host.hv.create_transient(self.host.domain_xml(spec))

    def _capture(self, template: Template, directory: Path, image_disk: Path) -> bool:  # type: ignore[override]
        """Capture the device state, destroy the VM and freeze the overlay; the VM is gone."""
        capture_template_state(self.host.hv, template.domain, directory / TEMPLATE_STATE)
        self.host.hv.destroy(template.domain)
        # From now on only ever copied: never opened read-write again.
        os.rename(directory / OVERLAY_FILE, directory / TEMPLATE_DISK)
        for name in (TEMPLATE_DISK, TEMPLATE_STATE):
            os.chmod(directory / name, 0o444)
        template.state_bytes = (directory / TEMPLATE_STATE).stat().st_size
        return False

    # ----------------------------------------------------------------- clone
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
        if template is None or not state.exists() or not self.intact(template):
            raise KvmcError(f"the VM template {template_dir.name[:12]} this container was cloned from is gone "
                            "(pool rm or pool gc removed it): remove the container and run it again")
        self.host.hv.create_transient(clone_xml, paused=True)
        try:
            load_template_state(self.host.hv, domain, state)
            self.host.hv.resume(domain)
        except BaseException:
            self.host.hv.destroy(domain)
            raise

    # ---------------------------------------------------------------- remove
    def _release(self, ident: str, unfinished: bool) -> None:
        """The RAM file, and an unfinished template's VM (a finished one has none)."""
        if unfinished:
            self.host.hv.destroy(template_domain(ident))
        template_ram_file(ident).unlink(missing_ok=True)

    # --------------------------------------------------------------- pool ls
    def _row(self, template: Template) -> object:
        return template.id  # one row per template

    def ram_mib(self, template: Template) -> float:
        """What the template's RAM file occupies in tmpfs (the guest pages it touched): paid
        once, whatever the number of clones."""
        try:
            return os.stat(template.mem_path).st_blocks * 512 / (1 << 20)
        except OSError:
            return 0.0

    def _fill_row(self, row: dict, template: Template, fresh: bool) -> None:
        """Its id, the state file's size and what the RAM file occupies in tmpfs."""
        row["id"] = template.id[:12]
        row["save_mib"] = round(template.state_bytes / (1 << 20), 2)
        row["ram_mib"] = round(self.ram_mib(template), 1)


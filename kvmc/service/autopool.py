"""``kvmc serve``'s automatic pools: warm VMs for the images it runs, kept in the background.

The server tells :class:`AutoPool` of every first start of a container it made (and whether
it succeeded); one background thread measures what the pool holds, asks the policy
(kvmc/pool/auto.py) what to trim and what to warm, and does it, one member at a time, so the
API's event loop never waits for a VM. Members and templates it makes carry the server's
origin (``auto:<pid>``): runs through the API may claim them, ``kvmc run`` does not (its runs
use the pools warmed by hand), and ``pool ls`` shows them with the policy's reasons.

A thread, not a child process: a warm-up is libvirt calls and waits on the guest agent, and a
thread can be told to stop between two of them. Stopping (the server's SIGTERM) waits for the
member being made (a warm-up publishes a complete member or removes everything of it), then
removes everything this server's pool holds: its budget is held only while the server runs.
A server killed with SIGKILL leaves its pool behind; the next server removes it as it starts.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from kvmc.context import HostContext
from kvmc.errors import CommandNotFound, CommandNotInvokable
from kvmc.pool import Pool
from kvmc.pool.auto import AutoState, Held, Policy, Use, available_mib, plan, read_states, record_start, state_file, write_state
from kvmc.pool.common import PoolKey, auto_origin, origin_pid, pool_key
from kvmc.state import ContainerRecord, State
from kvmc.vmlife import is_monitor

TICK_S = 5.0
"""How often the policy runs without being woken (trimming idle keys, re-measuring)."""
SETTLE_S = 1.0
"""A refill waits this long after the last start it heard of: a clone's or restore's start is
CPU-heavy under TCG, and on a small host it would slow the very run the pool just served
(which still runs its process, and with --rm removes its container)."""


def policy_of(host: HostContext) -> Policy:
    config = host.config
    return Policy(budget_mib=config.auto_pool_budget_mib(available_mib()), size=config.auto_pool_size,
                  idle_s=config.auto_pool_idle_s, kind=config.auto_pool_kind)


def start_failure_is_the_pools(exc: BaseException) -> bool:
    """Whether a failed start may be the pool's fault: not when the guest ran and reported the
    command missing or not executable (docker's 127/126), which a cold boot would report too."""
    return not isinstance(exc, (CommandNotFound, CommandNotInvokable))


class AutoPool:
    """One server's automatic pool: what it was asked to serve, and the thread that keeps it."""

    def __init__(self, host: HostContext, policy: Policy, log: Callable[[str], None]) -> None:
        self.host = host
        self.policy = policy
        self.log = log
        self.pool = Pool(host)
        self.origin = auto_origin(os.getpid())
        self.uses: dict[PoolKey, Use] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_start = 0.0

    # ---------------------------------------------------------------- server
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvmc-autopool", daemon=True)
        self._thread.start()
        self.log(f"automatic pools: budget {self.policy.budget_mib:.0f} MiB, {self.policy.size} per image, "
                 f"kind {self.policy.kind}, trimmed after {self.policy.idle_s:.0f} s unused")

    def stop(self, timeout: float | None = None) -> None:
        """Let the member being made finish (or fail and clean up), then remove this pool."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        removed = self._remove(lambda origin: origin == self.origin)
        state_file(self.pool.root, os.getpid()).unlink(missing_ok=True)
        if removed:
            self.log(f"automatic pools: removed {removed} member(s)/template(s) as the server stops")

    def started(self, record: ContainerRecord, error: BaseException | None) -> None:
        """A container's first start through the API ended (``error`` None: its process runs).
        Cheap and non-blocking: the thread does the work."""
        key = self.key_of(record)
        if key is None:
            return
        pooled = bool(record.pool_source)
        ok = error is None
        if not ok and not start_failure_is_the_pools(error):
            return
        with self._lock:
            use = record_start(self.uses, key, record.image, pooled, ok, time.time())
            self._last_start = time.monotonic()
        if not ok and pooled:
            self.log(f"automatic pools: a pooled start of {record.image} failed ({use.failures} in a row): {error}")
        self._wake.set()

    def key_of(self, record: ContainerRecord) -> PoolKey | None:
        """The pool key a container's run would claim from, None if it is never pooled (a kvmc
        network's NIC, a volume disk or a virtiofs share: see Runtime.create)."""
        if record.networks or any(m.needs_cold_boot for m in record.mounts):
            return None
        return pool_key(self.host, record.image_id, record.memory_mib, record.cpus, record.accel, record.network)

    # ---------------------------------------------------------------- thread
    def _run(self) -> None:
        try:
            removed = self._remove(lambda origin: origin_pid(origin) is not None
                                   and origin != self.origin and not is_monitor(origin_pid(origin)))
            removed += self.pool.remove_abandoned()  # a member a killed server was making, its VM running
            for state in read_states(self.pool.root):
                if state.pid != os.getpid() and not is_monitor(state.pid):
                    state_file(self.pool.root, state.pid).unlink(missing_ok=True)
            if removed:
                self.log(f"automatic pools: removed {removed} left by a server that is gone")
        except Exception as exc:  # noqa: BLE001 - the pool must never take the server down
            self.log(f"automatic pools: {exc}")
        while not self._stopping.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            while not self._stopping.is_set() and (quiet := time.monotonic() - self._last_start) < SETTLE_S:
                self._stopping.wait(SETTLE_S - quiet)
            if self._stopping.is_set():
                break
            try:
                if self.step():
                    self._wake.set()  # more to do: go on without waiting for the tick
            except Exception as exc:  # noqa: BLE001
                self.log(f"automatic pools: {exc}")

    def step(self) -> bool:
        """One round: measure, plan, trim, warm at most one member. True if it warmed one."""
        held = self.held()
        with self._lock:
            trims, warm = plan(self.uses, held, self.policy, time.time())
            self._publish()
        for trim in trims:
            if self._stopping.is_set():
                return False
            removed = self._remove(lambda origin: origin == self.origin, trim.key)
            self.log(f"automatic pools: removed {removed} of {self._name(trim.key)}: {trim.reason}")
        if warm is None or self._stopping.is_set():
            return False
        try:
            self._warm(warm, held.get(warm, Held()).members + 1)
        except Exception as exc:  # noqa: BLE001 - counted: a key that cannot be warmed is given up
            with self._lock:
                self.uses[warm].failures += 1
            self.log(f"automatic pools: warming {self._name(warm)} failed: {exc}")
            return False
        return True

    def held(self) -> dict[PoolKey, Held]:
        """What this pool holds per key, measured: each member's QEMU PSS, each own template's
        RAM file in tmpfs."""
        held: dict[PoolKey, Held] = {}
        for _, member in self.pool.saved.items():
            if member.origin == self.origin:
                pss = self.host.hv.pss_kib(member.domain)
                held.setdefault(member.key, Held()).members_mib.append(None if pss is None else pss / 1024)
        for _, template in self.pool.template.items():
            if template.origin == self.origin:
                held.setdefault(template.key, Held()).template_mib = self.pool.template.ram_mib(template)
        for key, h in held.items():
            h.has_template = self.pool.template.ready(key) is not None
        for key in self.uses:
            if key not in held and self.pool.template.ready(key) is not None:
                held[key] = Held(has_template=True)
        return held

    def _warm(self, key: PoolKey, size: int) -> None:
        image = self.host.images.get(key.image_id)
        started = time.monotonic()
        if self.policy.kind == "clone":
            template, made, clones = self.pool.warm_hot_clones(key, image.disk_path, size, self.origin)
            what = f"hot template clone{'s' if len(clones) != 1 else ''} (template {template.id[:12]}" \
                   f"{', made now' if made else ''})"
        else:
            self.pool.saved.warm(key, image.disk_path, size, hot=True, origin=self.origin)
            what = "hot member"
        self.log(f"automatic pools: warmed a {what} of {self._name(key)} in {time.monotonic() - started:.1f} s")

    def _remove(self, ours: Callable[[str], bool], key: PoolKey | None = None) -> int:
        """Remove the members and templates whose origin ``ours`` accepts (of ``key`` only, if given)."""
        return sum(source.remove_if(lambda r: ours(r.origin) and (key is None or r.key == key))
                   for source in (self.pool.saved, self.pool.template))

    def _publish(self) -> None:
        """The server's view for ``pool ls`` (lock held)."""
        write_state(self.pool.root, AutoState(pid=os.getpid(), policy=self.policy, uses=list(self.uses.values()),
                                              updated=time.time()))

    def _name(self, key: PoolKey) -> str:
        use = self.uses.get(key)
        return f"{use.image if use else key.image_id[:12]} ({key.memory_mib} MiB)"


def first_start(record: ContainerRecord) -> bool:
    """A container that has never run: its start is a run (docker run), not a restart."""
    return record.state == State.CREATED and not record.started_at


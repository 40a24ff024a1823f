"""The automatic pools' policy: which images ``kvmc serve`` keeps warm VMs for, and how many.

Pure rules over plain data, so they are tested without VMs (tests/unit/test_auto_pool.py);
kvmc/service/autopool.py measures, acts and runs them in the server's background thread.

* **Which**: the pool keys (image, VM size, accelerator, network) of the containers the server
  started (through the API) and whose start succeeded; a key is kept while it was used within
  ``idle_s`` and trimmed after.
* **How many**: ``size`` members per key, one warmed at a time, the most recently used key
  first, each only if the budget holds it.
* **Budget**: what the pool's VMs really cost, measured: the PSS of each member's QEMU (a
  hot template clone's counts its share of the template's RAM pages) plus the tmpfs pages of
  the templates the pool made. A member not measured yet, or not yet made, is reckoned at
  its guest's whole RAM (it could touch all of it); once one is measured, that measure. When
  the measured total passes the budget, the least recently used keys are trimmed.
* **Failures**: a key whose pooled starts fail ``max_failures`` times in a row is no longer
  refilled, and what it holds is removed: a broken pool must not keep failing runs that a
  cold boot would serve.

The server writes its view (:class:`AutoState`) to ``<pool>/auto-<pid>.json`` so that
``kvmc pool ls`` can say what the server keeps and why.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmc.pool.common import PoolKey

AUTO_FILE = "auto-{pid}.json"
"""One per server (two servers may share a state root), in the pool directory."""
MAX_FAILURES = 3


def available_mib(meminfo: str | None = None) -> float:
    """The host's MemAvailable (what can be used without swapping) in MiB."""
    text = Path("/proc/meminfo").read_text() if meminfo is None else meminfo
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Policy:
    budget_mib: float
    size: int = 1
    idle_s: float = 600.0
    kind: str = "clone"
    max_failures: int = MAX_FAILURES


@dataclass
class Use:
    """One pool key the server has run containers of."""

    key: PoolKey
    image: str
    """The reference the runs named, for ``pool ls``."""
    last_used: float
    runs: int = 0
    failures: int = 0
    """Pooled starts that failed in a row."""
    why: str = ""
    """The policy's last word on this key, for ``pool ls``."""


@dataclass
class Held:
    """What the automatic pool holds for one key now."""

    members_mib: list[float | None] = field(default_factory=list)
    """Each ready member's measured PSS (None: not measured)."""
    template_mib: float | None = None
    """The RAM file of the template this pool made for the key (None: it made none)."""
    has_template: bool = False
    """A template of the key is ready (this pool's or one warmed by hand): clones need no new one."""

    @property
    def members(self) -> int:
        return len(self.members_mib)


@dataclass(frozen=True)
class Trim:
    key: PoolKey
    reason: str


def record_start(uses: dict[PoolKey, Use], key: PoolKey, image: str, pooled: bool, ok: bool,
                 now: float) -> Use:
    """Count a container start the server made: a success is a use of its key; a pooled start
    that failed is a failure of its key's pool (a cold one that failed is not the pool's)."""
    use = uses.setdefault(key, Use(key=key, image=image, last_used=now))
    use.image = image
    if ok:
        use.last_used = now
        use.runs += 1
        if pooled:
            use.failures = 0
    elif pooled:
        use.failures += 1
    return use


def member_estimate(key: PoolKey, held: Held | None) -> float:
    """What one more member of ``key`` will cost: the mean of its members measured, else its
    guest's whole RAM."""
    measured = [m for m in (held.members_mib if held else []) if m is not None]
    return sum(measured) / len(measured) if measured else float(key.memory_mib)


def held_cost(key: PoolKey, held: Held) -> float:
    """What a key's members and its template (if this pool made it) cost now."""
    estimate = member_estimate(key, held)
    return sum(estimate if m is None else m for m in held.members_mib) + (held.template_mib or 0.0)


def plan(uses: dict[PoolKey, Use], held: dict[PoolKey, Held], policy: Policy,
         now: float) -> tuple[list[Trim], PoolKey | None]:
    """What to remove now, and the one key to warm a member of next (None: nothing fits or is
    missing). Sets each use's ``why``."""
    trims: list[Trim] = []
    kept: dict[PoolKey, Held] = {}
    for key, h in held.items():
        use = uses.get(key)
        if h.members == 0 and h.template_mib is None:
            continue
        if use is None:
            trims.append(Trim(key, "not run by this server"))
        elif now - use.last_used > policy.idle_s:
            trims.append(Trim(key, f"unused for {now - use.last_used:.0f} s (auto_pool_idle_s {policy.idle_s:.0f})"))
        elif use.failures >= policy.max_failures:
            trims.append(Trim(key, f"pooled starts failed {use.failures} times in a row"))
        else:
            kept[key] = h
    used = sum(held_cost(k, h) for k, h in kept.items())
    for key in sorted(kept, key=lambda k: uses[k].last_used):  # least recently used first
        if used <= policy.budget_mib:
            break
        used -= held_cost(key, kept.pop(key))
        trims.append(Trim(key, f"over budget ({policy.budget_mib:.0f} MiB)"))
    for trim in trims:
        if trim.key in uses:
            uses[trim.key].why = f"trimmed: {trim.reason}"

    warm = None
    for key in sorted(uses, key=lambda k: -uses[k].last_used):  # most recently used first
        use = uses[key]
        if now - use.last_used > policy.idle_s:
            use.why = f"unused for {now - use.last_used:.0f} s: not kept"
            continue
        if use.failures >= policy.max_failures:
            use.why = f"not refilled: pooled starts failed {use.failures} times in a row"
            continue
        if any(t.key == key for t in trims):
            continue
        h = kept.get(key) or held.get(key) or Held()
        if h.members >= policy.size:
            use.why = f"keeping {h.members} of {policy.size}"
            continue
        need = member_estimate(key, h)
        if policy.kind == "clone" and not h.has_template:
            need += key.memory_mib  # the template's RAM file, reckoned whole until measured
        left = policy.budget_mib - used
        if need > left:
            use.why = (f"over budget: one more needs ~{need:.0f} MiB, {max(left, 0):.0f} of "
                       f"{policy.budget_mib:.0f} MiB left")
            continue
        if warm is None:
            warm = key
            use.why = f"warming ({h.members} of {policy.size} ready)"
            used += need
        else:
            use.why = f"waiting to warm ({h.members} of {policy.size} ready)"
    return trims, warm


# --------------------------------------------------------------- pool ls
@dataclass
class AutoState:
    """What one server's automatic pool is doing, as written to ``<pool>/auto-<pid>.json``."""

    pid: int
    policy: Policy
    uses: list[Use]
    updated: float = 0.0

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> AutoState:
        data = json.loads(text)
        uses = [Use(**{**u, "key": PoolKey(**u["key"])}) for u in data["uses"]]
        return cls(pid=data["pid"], policy=Policy(**data["policy"]), uses=uses, updated=data.get("updated", 0.0))


def state_file(root: Path, pid: int) -> Path:
    return root / AUTO_FILE.format(pid=pid)


def write_state(root: Path, state: AutoState) -> None:
    """Publish the server's view atomically (``pool ls`` may read it at any time)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{AUTO_FILE.format(pid=state.pid)}.tmp"
    tmp.write_text(state.to_json())
    os.replace(tmp, state_file(root, state.pid))


def read_states(root: Path) -> list[AutoState]:
    """The views of the servers that wrote one under ``root`` (gone ones included: the caller
    checks their pids)."""
    states = []
    for path in sorted(root.glob(AUTO_FILE.format(pid="*"))) if root.is_dir() else []:
        try:
            states.append(AutoState.from_json(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return states


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def annotate(rows: list[dict], state: AutoState, tags: dict[str, str], now: float | None = None) -> list[dict]:
    """``pool ls`` rows with the automatic pool's reasons: a row of the server's members or
    template says ``auto (serve): last used N ago, R run(s); <policy's word>``, and a key the
    server runs but keeps nothing for gets a row of its own saying why (over budget, failing)."""
    now = time.time() if now is None else now
    by_key = {(u.key.image_id, u.key.memory_mib, u.key.cpus, u.key.accel, u.key.network): u for u in state.uses}
    seen = set()
    for row in rows:
        ident = (row["image_id"], row["memory_mib"], row["cpus"], row["accel"], row["network"])
        use = by_key.get(ident)
        if row.get("origin") == f"auto:{state.pid}" and use is not None:
            row["why"] = f"auto (serve): last used {_ago(now - use.last_used)} ago, {use.runs} run(s); {use.why}"
            seen.add(ident)
    for ident, use in by_key.items():
        if ident in seen:
            continue
        rows.append({
            "mode": "-", "origin": f"auto:{state.pid}", "image": tags.get(use.key.image_id, use.image),
            "image_id": use.key.image_id, "memory_mib": use.key.memory_mib, "cpus": use.key.cpus,
            "accel": use.key.accel, "network": use.key.network, "ready": 0, "hot": 0, "stale": 0,
            "save_mib": 0.0, "ram_mib": 0.0,
            "why": f"auto (serve): last used {_ago(now - use.last_used)} ago, {use.runs} run(s); {use.why}",
        })
    return rows

"""Container events (docker's ``/events``: create, start, die, destroy), seen from the records.

Why from the records and not from the code paths that change them: a container's life is
written by many processes (the CLI, the API server, each container's monitor), so the one
place that sees every change, whoever made it, is the state store. :func:`diff` compares two
snapshots; the API server takes one a few times a second and sends what changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from kvmc.state import ContainerRecord, State


@dataclass(frozen=True)
class Seen:
    """What a snapshot keeps of one container."""

    state: str
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    name: str
    image: str
    labels: tuple[tuple[str, str], ...]
    restart_count: int = 0
    health: str | None = None


@dataclass
class Event:
    """One container event, in docker's terms."""

    action: str
    id: str
    attributes: dict[str, str] = field(default_factory=dict)
    time_ns: int = field(default_factory=time.time_ns)
    type: str = "container"


def snapshot(records: list[ContainerRecord]) -> dict[str, Seen]:
    return {r.id: Seen(str(r.state), r.started_at, r.finished_at, r.exit_code, r.name, r.image,
                       tuple(sorted(r.labels.items())), r.restart_count, r.health.status if r.health else None)
            for r in records}


def diff(before: dict[str, Seen], after: dict[str, Seen],
         exit_code_of_removed: Callable[[str], int] = lambda cid: 137) -> list[Event]:
    """The events between two snapshots, in the order docker sends them for each container.
    A container that ran in ``before`` and is gone in ``after`` died first: its exit code
    comes from ``exit_code_of_removed`` (the state store's tombstone)."""
    events: list[Event] = []
    for cid, now in after.items():
        was = before.get(cid)
        attrs = {**dict(now.labels), "name": now.name, "image": now.image}
        if was is None:
            events.append(Event("create", cid, attrs))
        died = _died(was, now)
        restarted_unseen = died and now.state not in ENDED  # its die came before this start
        if restarted_unseen:
            events.append(Event("die", cid, {**attrs, "exitCode": str(now.exit_code or 0)}))
        started = now.started_at and (was is None or was.started_at != now.started_at)
        if started:
            events.append(Event("start", cid, attrs))
        if died and not restarted_unseen:
            events.append(Event("die", cid, {**attrs, "exitCode": str(now.exit_code or 0)}))
        # docker's action words, for a probe's verdict only (a (re)start's "starting" is none)
        if now.health in ("healthy", "unhealthy") and (was is None or was.health != now.health) \
                and now.state not in ENDED:
            events.append(Event(f"health_status: {now.health}", cid, attrs))
        if was is not None and was.name != now.name:
            events.append(Event("rename", cid, {**attrs, "oldName": was.name}))
    for cid, was in before.items():
        if cid not in after:
            attrs = {**dict(was.labels), "name": was.name, "image": was.image}
            if was.state not in ENDED:  # removed while it ran (rm -f, --rm): it died first
                events.append(Event("die", cid, {**attrs, "exitCode": str(exit_code_of_removed(cid))}))
            events.append(Event("destroy", cid, attrs))
    return events


ENDED = (State.EXITED, State.RESTARTING)
"""A process that is over: for good, or until the restart policy starts it again."""


def _died(was: Seen | None, now: Seen) -> bool:
    """A process ended between the snapshots: the record says it is over (exited, or restarting)
    and was not, or it ended once more (a new finish time). A restart policy that started it again
    before a snapshot saw it restarting leaves a new finish time and one more restart."""
    if now.state in ENDED:
        return was is None or was.state not in ENDED or was.finished_at != now.finished_at
    return was is not None and now.restart_count > was.restart_count and now.finished_at != was.finished_at

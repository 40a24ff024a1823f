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
                       tuple(sorted(r.labels.items()))) for r in records}


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
        started = now.started_at and (was is None or was.started_at != now.started_at)
        if started:
            events.append(Event("start", cid, attrs))
        if now.state == State.EXITED and (was is None or was.state != State.EXITED or was.finished_at != now.finished_at):
            events.append(Event("die", cid, {**attrs, "exitCode": str(now.exit_code or 0)}))
        if was is not None and was.name != now.name:
            events.append(Event("rename", cid, {**attrs, "oldName": was.name}))
    for cid, was in before.items():
        if cid not in after:
            attrs = {**dict(was.labels), "name": was.name, "image": was.image}
            if was.state != State.EXITED:  # removed while it ran (rm -f, --rm): it died first
                events.append(Event("die", cid, {**attrs, "exitCode": str(exit_code_of_removed(cid))}))
            events.append(Event("destroy", cid, attrs))
    return events

"""One report per item for the commands that take several names (rm, stop, volume rm, ...).

docker goes on past a name that fails and exits non-zero at the end; each front door renders
the reports its own way (the CLI prints the ref or the error, the API has one item a call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

from kvmc.errors import KvmcError

T = TypeVar("T")


@dataclass
class ItemReport(Generic[T]):
    """What happened to one named item: its result, or the error that stopped it."""

    ref: str
    result: T | None = None
    error: KvmcError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def for_each(refs: Iterable[str], action: Callable[[str], T]) -> list[ItemReport[T]]:
    """Apply ``action`` to every ref, collecting a report each instead of stopping at the first error."""
    reports: list[ItemReport[T]] = []
    for ref in refs:
        try:
            reports.append(ItemReport(ref, result=action(ref)))
        except KvmcError as exc:
            reports.append(ItemReport(ref, error=exc))
    return reports

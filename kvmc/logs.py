"""Reading a container's json-file log: tail and follow.

The monitor appends one JSON object per output chunk; readers only ever read, so following
is a poll on the file's size until the container has exited and the file is drained.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

POLL_S = 0.1


def _entries(lines: list[str]) -> Iterator[dict]:
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue  # a line being written right now: it is read again on the next poll


def follow_log(path: Path, *, tail: int | None, follow: bool,
               still_running: Callable[[], bool]) -> Iterator[dict]:
    """Yield log entries (``stream``, ``time``, ``log``); with ``follow``, until the end."""
    offset = 0
    first = True
    while True:
        chunk = ""
        if path.exists():
            with path.open() as f:
                f.seek(offset)
                chunk = f.read()
        complete, _, _partial = chunk.rpartition("\n")
        if complete:
            offset += len(complete.encode()) + 1
            lines = complete.split("\n")
            if first and tail is not None:
                lines = list(deque(lines, maxlen=tail)) if tail > 0 else []
            yield from _entries(lines)
        first = False
        if not follow:
            return
        if not still_running():
            follow = False  # one more pass drains what was written before the exit
            continue
        time.sleep(POLL_S)

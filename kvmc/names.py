"""Docker-style generated container names: ``adjective_surname``."""

from __future__ import annotations

import re
import secrets

_ADJECTIVES = (
    "agile brave calm clever eager fervent gentle happy jolly keen lucid merry nimble "
    "quiet quirky serene sharp stoic swift tender upbeat vibrant witty zealous"
).split()
# Pioneers of virtualization and operating systems.
_SURNAMES = (
    "popek goldberg bellard kivity creasy lampson ritchie thompson hopper lovelace "
    "liskov torvalds corbato dijkstra kildall wirth hamilton tanenbaum bugnion rosenblum"
).split()

NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")


def generate_name() -> str:
    return f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_SURNAMES)}"


def valid_name(name: str) -> bool:
    """Docker's rule: ``[a-zA-Z0-9][a-zA-Z0-9_.-]+`` (kvmc also allows one character)."""
    return bool(NAME_RE.fullmatch(name))

"""Entry point of the per-container monitor that keeps a detached container's agent attached.

Why a process of its own: the guest agent's output blocks while no host client reads it, so
a detached container needs a reader that outlives ``kvmc run -d`` (conmon's job for podman).
"""

from __future__ import annotations

import sys

from kvmc.config import load_config
from kvmc.runtime import Runtime


def main() -> None:
    Runtime(load_config()).monitor(sys.argv[1])


if __name__ == "__main__":
    main()

"""The container's process as docker computes it from the image config and ``run`` flags.

Pure functions, no I/O beyond reading an --env-file, so the docker semantics (entrypoint
and cmd merging, env precedence, ``-e NAME`` taking the host's value) are unit-testable.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from kvmc.errors import UsageError
from kvmc.images import ImageConfig


@dataclass
class ProcessOptions:
    """The ``run``/``create`` flags that shape the process."""

    command: list[str] = field(default_factory=list)
    entrypoint: str | list[str] | None = None
    """--entrypoint (one word) or docker's Config.Entrypoint (a list); "" or [""] clears it."""
    env: list[str] = field(default_factory=list)
    env_files: list[Path] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    interactive: bool = False
    tty: bool = False
    """A pseudo-terminal for the process (``exec -t``; a container's is DockerFields.tty)."""


def read_env_file(path: Path) -> list[str]:
    """Docker's --env-file: ``NAME=VALUE`` lines, ``#`` comments and blanks ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read env file {path}: {exc.strerror}") from exc
    return [ln.strip() if "=" not in ln else ln.lstrip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def merge_env(image_env: list[str], overrides: list[str], host_env: Mapping[str, str]) -> list[str]:
    """Image env, then overrides by name; ``NAME`` alone takes the host's value (skipped if unset)."""
    merged: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        merged[key] = value
    for item in overrides:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid environment variable {item!r}: it needs a NAME")
        if not sep:
            if key not in host_env:
                continue
            value = host_env[key]
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def terminal_env(env: list[str], host_env: Mapping[str, str]) -> list[str]:
    """A TTY process's environment: TERM as given, else the caller's TERM (the CLI's
    terminal), else docker's ``xterm``."""
    if any(item.startswith("TERM=") for item in env):
        return env
    return [*env, f"TERM={host_env.get('TERM') or 'xterm'}"]


def build_process(config: ImageConfig, opts: ProcessOptions, host_env: Mapping[str, str] | None = None) -> dict:
    """The process spec kvmc records and sends to the agent (see kvmc.agent.ProcessSpec)."""
    host_env = os.environ if host_env is None else host_env
    command = opts.command
    if opts.entrypoint is not None:
        # docker: --entrypoint replaces the image's entrypoint and drops its cmd.
        entrypoint = [opts.entrypoint] if isinstance(opts.entrypoint, str) else list(opts.entrypoint)
        args = [word for word in entrypoint if word or len(entrypoint) > 1] + command
    else:
        args = list(config.entrypoint or []) + (command or list(config.cmd or []))
    if not args:
        raise UsageError("no command specified: the image has no Cmd or Entrypoint, give one after the image")
    overrides = [e for f in opts.env_files for e in read_env_file(f)] + list(opts.env)
    return {
        "args": args,
        "env": merge_env(list(config.env or []), overrides, host_env),
        "cwd": opts.workdir or config.working_dir or "/",
        "user": opts.user or config.user or None,
        "hostname": opts.hostname,
        "stdin": opts.interactive,
    }


# docker's RAMInBytes grammar: a number, an optional unit, optional "i" and "b" (512m, 1GiB, 2gb).
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgt])?i?b?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size_bytes(value: str, what: str = "--memory") -> int:
    """A memory size in docker's binary units (``512m``, ``1g``, ``1GiB``; bytes when bare)."""
    match = _SIZE_RE.fullmatch(value.strip())
    if not match:
        raise UsageError(f'invalid {what} "{value}": use a size such as 256m or 1g')
    unit = match[2].lower() if match[2] else None
    return int(float(match[1]) * _UNITS[unit])


def parse_memory(value: str) -> int:
    """Docker's --memory (``512m``, ``1g``, ``1GiB``; bytes when bare) in MiB."""
    mib = size_bytes(value) // (1 << 20)
    if mib < 64:
        raise UsageError(f'--memory "{value}" is too small: a kvmc VM needs at least 64m')
    return mib


def parse_cpus(value: str) -> int:
    """Docker's --cpus (may be fractional) as a whole number of vCPUs, rounded up."""
    try:
        amount = float(value)
    except ValueError:
        raise UsageError(f'invalid --cpus "{value}": use a number such as 1 or 2') from None
    if not math.isfinite(amount) or amount <= 0:
        raise UsageError(f'--cpus "{value}" must be greater than 0')
    return max(1, -int(-amount // 1))

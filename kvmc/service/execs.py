"""Exec instances: docker's two-step exec (create, then start) over the engine's one-step exec.

Why instances: docker clients create an exec, start it on a hijacked connection, then read its
exit code with a separate ``GET /exec/{id}/json``. The instances live in the memory of the
process that serves them (as in dockerd), so the exit code is recorded here before the
stream closes, and an instance is forgotten a while after it ended.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from kvmc.errors import Conflict, ExecNotFound, KvmcError, UsageError
from kvmc.process import ProcessOptions

if TYPE_CHECKING:
    from kvmc.service.containers import ContainerService

KEEP_ENDED_S = 600.0


@dataclass
class ExecInstance:
    """One exec: what to run where, and how it ended."""

    id: str
    container_id: str
    options: ProcessOptions
    tty: bool = False
    attach_stdout: bool = True
    attach_stderr: bool = True
    running: bool = False
    started: bool = False
    exit_code: int | None = None
    error: str | None = None
    ended_at: float | None = None
    created_at: float = field(default_factory=time.monotonic)


class ExecService:
    """Create, start and inspect exec instances of running containers."""

    def __init__(self, containers: ContainerService) -> None:
        self.containers = containers
        self._instances: dict[str, ExecInstance] = {}
        self._lock = threading.Lock()

    def create(self, ref: str, options: ProcessOptions, tty: bool = False, attach_stdout: bool = True,
               attach_stderr: bool = True) -> ExecInstance:
        """Register an exec in a running container (refused when it does not run)."""
        record = self.containers.engine.require_running(ref)
        if not options.command:
            raise UsageError("No exec command specified")
        instance = ExecInstance(secrets.token_hex(32), record.id, options, tty, attach_stdout, attach_stderr)
        with self._lock:
            self._forget_old()
            self._instances[instance.id] = instance
        return instance

    def get(self, exec_id: str) -> ExecInstance:
        with self._lock:
            instance = self._instances.get(exec_id)
            if instance is None:  # docker accepts any unambiguous prefix
                found = [i for key, i in self._instances.items() if key.startswith(exec_id)] if exec_id else []
                instance = found[0] if len(found) == 1 else None
        if instance is None:
            raise ExecNotFound(f"No such exec instance: {exec_id}")
        return instance

    def start(self, exec_id: str, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO) -> ExecInstance:
        """Run the exec to its end, relaying its stdio; its exit code is recorded before this
        returns (so a client that reads it right after the stream closes finds it)."""
        instance = self.get(exec_id)
        with self._lock:
            if instance.started:
                raise Conflict(f"exec {exec_id[:12]} has already started")
            instance.started = instance.running = True
        try:
            instance.exit_code = self.containers.exec(instance.container_id, instance.options, stdin, stdout, stderr)
        except KvmcError as exc:
            instance.exit_code, instance.error = exc.exit_code, str(exc)
            raise
        finally:
            instance.running = False
            instance.ended_at = time.monotonic()
        return instance

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, i in self._instances.items() if i.ended_at and now - i.ended_at > KEEP_ENDED_S]:
            del self._instances[key]

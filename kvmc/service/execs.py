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

from kvmc.detach import parse_detach_keys
from kvmc.space import disk_full_errors
from kvmc.errors import Conflict, ExecNotFound, KvmcError, UsageError
from kvmc.monitor import EXEC_ID_MAX
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
    console_size: tuple[int, int] | None = None
    """The TTY's (rows, columns) at start: docker's ConsoleSize (exec create or start)."""
    detach_keys: str | None = None
    privileged: bool = False
    """docker's exec --privileged: every capability, whatever the container's --cap-drop."""
    proc_id: int | None = None
    """The agent's process id once started (what a resize addresses)."""
    running: bool = False
    started: bool = False
    exit_code: int | None = None
    error: str | None = None
    ended_at: float | None = None
    created_at: float = field(default_factory=time.monotonic)


@disk_full_errors(lambda self: self.containers.engine.config.data_dir)
class ExecService:
    """Create, start and inspect exec instances of running containers."""

    def __init__(self, containers: ContainerService) -> None:
        self.containers = containers
        self._instances: dict[str, ExecInstance] = {}
        self._lock = threading.Lock()

    def create(self, ref: str, options: ProcessOptions, tty: bool = False, attach_stdout: bool = True,
               attach_stderr: bool = True, console_size: tuple[int, int] | None = None,
               detach_keys: str | None = None, privileged: bool = False) -> ExecInstance:
        """Register an exec in a running container (refused when it does not run)."""
        record = self.containers.engine.require_running(ref)
        if not options.command:
            raise UsageError("No exec command specified")
        if detach_keys:
            parse_detach_keys(detach_keys)  # refused now, not when it starts
        options.tty = tty
        instance = ExecInstance(secrets.token_hex(32), record.id, options, tty, attach_stdout, attach_stderr,
                                console_size, detach_keys, privileged)
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

    def start(self, exec_id: str, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
              console_size: tuple[int, int] | None = None) -> ExecInstance:
        """Run the exec to its end, relaying its stdio; its exit code is recorded before this
        returns (so a client that reads it right after the stream closes finds it). A caller
        that detached from a TTY exec leaves it running, with no exit code."""
        instance = self.get(exec_id)
        with self._lock:
            if instance.started:
                raise Conflict(f"exec {exec_id[:12]} has already started")
            instance.started = instance.running = True
            # unguessable by the guest (ProcessTable); the ids above EXEC_ID_MAX are health probes
            instance.proc_id = 2 + secrets.randbelow(EXEC_ID_MAX - 1)
        try:
            instance.exit_code = self.containers.exec(
                instance.container_id, instance.options, stdin, stdout, stderr,
                detach_keys=instance.detach_keys, winsize=console_size or instance.console_size,
                proc_id=instance.proc_id, privileged=instance.privileged)
        except KvmcError as exc:
            instance.exit_code, instance.error = exc.exit_code, str(exc)
            raise
        finally:
            instance.running = False
            instance.ended_at = time.monotonic()
        return instance

    def resize(self, exec_id: str, rows: int, cols: int) -> ExecInstance:
        """Set the size of a running TTY exec's terminal."""
        instance = self.get(exec_id)
        with self._lock:
            if not instance.started:  # not yet: the size it starts with (a client may resize
                instance.console_size = (rows, cols) if rows > 0 and cols > 0 else instance.console_size
                return instance       # right after its start request, before it runs)
        if not instance.running or instance.proc_id is None:
            raise Conflict(f"exec {instance.id[:12]} is not running")
        self.containers.engine.resize(instance.container_id, rows, cols, instance.proc_id)
        return instance

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, i in self._instances.items() if i.ended_at and now - i.ended_at > KEEP_ENDED_S]:
            del self._instances[key]

"""Containers: every operation the CLI and the API server share, over the engine.

The rules that used to sit in the CLI live here: which states allow attach, what ``wait``
waits for, where a container's log is and when following it ends, how ``start -a`` and
``restart`` are put together from the engine's steps.
"""

from __future__ import annotations

import signal as signals
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Mapping

from kvmc.space import disk_full_errors
from kvmc.errors import GuestError, ImageNotFound, KvmcError, UsageError
from kvmc.logs import LOG_FILE, LogEntry, parse_log_time, read_log
from kvmc.options import PULL_POLICIES, check_platform, signal_number
from kvmc.service.filters import check as check_filters
from kvmc.service.filters import container_matches
from kvmc.process import ProcessOptions
from kvmc.state import ContainerRecord, State

if TYPE_CHECKING:
    from kvmc.runtime import Console, RunOptions, Runtime, SignalForwarder

WAIT_CONDITIONS = ("not-running", "next-exit", "removed")
PAUSE_REASONS = {"ioerror": "disk full"}
"""Why libvirt says a VM is paused, as kvmc shows it, where it is not the user's own pause:
QEMU stops a VM whose disk write found no space (werror=enospc); its monitor resumes it."""
POLL_S = 0.1


def parse_signal(text: str | int | None, default: int = signals.SIGKILL) -> int:
    """``KILL``, ``SIGKILL``, ``kill`` or ``9`` as a signal number (docker's forms); ``default``
    when none is given."""
    if text is None or text == "":
        return default
    return signal_number(text)


@disk_full_errors(lambda self: self.engine.config.data_dir)
class ContainerService:
    """Containers for both front doors."""

    def __init__(self, engine: Runtime) -> None:
        self.engine = engine
        self.state = engine.state

    # ------------------------------------------------------------------ reads
    def get(self, ref: str) -> ContainerRecord:
        """The container ``ref`` names (name, id or id prefix), as observed: never repairs."""
        return self.engine.observe(self.state.resolve(ref))

    def list(self, all_: bool = False, filters: dict[str, list[str]] | None = None) -> list[ContainerRecord]:
        """Containers, newest first; only live ones unless ``all_`` (or a status filter);
        ``filters`` as docker's (kvmc/service/filters.py)."""
        filters = filters or {}
        check_filters(filters)
        records = [self.engine.observe(r) for r in self.state.list()]
        records = [r for r in records if all_ or "status" in filters or r.is_live]
        if not filters:
            return records
        return [r for r in records if container_matches(r, filters, self.is_paused(r) if r.is_live else False)]

    def inspect(self, ref: str) -> dict:
        """docker's inspect of a container (kvmc/views.py), kvmc's own facts under ``Kvmc``: one
        shape for ``kvmc inspect`` and the API's ``/containers/{id}/json``."""
        return self.inspect_record(self.get(ref))

    def inspect_record(self, record: ContainerRecord) -> dict:
        """:meth:`inspect` of a record already read, with what libvirt and the image say."""
        from kvmc.errors import KvmcError
        from kvmc.views import container_inspect

        vm_state, reason = self.engine.hv.state_reason(record.domain)
        try:
            image_config = self.engine.images.get(record.image_id).config
        except KvmcError:  # an image removed under a container is not an error here
            image_config = None
        return container_inspect(
            record, vm_state=vm_state, log_path=str(self.log_path(record)),
            volume_paths={v: str(self.engine.volumes._dir(v)) for v in record.volume_names},
            image_config=image_config, pid=record.monitor_pid or 0,
            kvmc={"Status": self.status(record, (vm_state, reason)),
                  "VmStateReason": PAUSE_REASONS.get(reason, reason) if reason else reason})

    def vm_states(self, records: list[ContainerRecord]) -> dict[str, tuple[str | None, str | None]]:
        """libvirt's (state, reason) of each running container's VM, by id: reads only, and
        empty when libvirt cannot be reached (the records still say what they know)."""
        try:
            return {r.id: self.engine.hv.state_reason(r.domain) for r in records if r.state == State.RUNNING}
        except KvmcError:
            return {}

    @staticmethod
    def status(record: ContainerRecord, vm: tuple[str | None, str | None] | None = None) -> str:
        """kvmc ps' STATUS: Created, Starting, Running, Paused, Paused (disk full), Exited (N)."""
        if record.state == State.EXITED:
            return f"Exited ({record.exit_code})"
        if record.state == State.RESTARTING:
            return f"Restarting ({record.exit_code})"
        if record.state == State.RUNNING and vm and vm[0] == "paused":
            return f"Paused ({PAUSE_REASONS[vm[1]]})" if vm[1] in PAUSE_REASONS else "Paused"
        return record.state.value.capitalize()

    def log_path(self, record: ContainerRecord):  # noqa: ANN201 - Path
        """The newest file of the container's json-file log (older ones end in .1, .2, ...)."""
        return self.state.container_dir(record.id) / LOG_FILE

    def logs(self, ref: str, *, tail: int | None = None, follow: bool = False, since: str | None = None,
             until: str | None = None) -> Iterator[LogEntry]:
        """The container's log entries, oldest first: the last ``tail`` (None or negative: all),
        those from ``since`` and up to ``until`` (docker's forms: ``10m``, an RFC 3339 time, a
        Unix timestamp; ``0`` or empty: not set); with ``follow``, until the container ends.
        Only reads (kvmc/logs.py), for both front doors."""
        record = self.get(ref)
        now = time.time_ns()
        since_ns = parse_log_time(since, now) if since not in (None, "", "0") else None
        until_ns = parse_log_time(until, now) if until not in (None, "", "0") else None

        def running() -> bool:
            current = self.state.load(record.id)
            return current is not None and self.engine.observe(current).is_live

        return read_log(self.log_path(record), tail=tail if tail is None or tail >= 0 else None, follow=follow,
                        since=since_ns, until=until_ns, still_running=running)

    def size(self, record: ContainerRecord) -> tuple[int, int]:
        """docker's SizeRw and SizeRootFs: what the container wrote (its overlay's allocated
        bytes) and that plus its image."""
        from kvmc.domain import OVERLAY_FILE

        try:
            st = (self.state.container_dir(record.id) / OVERLAY_FILE).stat()
            written = st.st_blocks * 512
        except OSError:
            written = 0
        try:
            image = self.engine.images.get(record.image_id).size
        except KvmcError:
            image = 0
        return written, written + image

    # --------------------------------------------------------------- changes
    def _image_for(self, opts: RunOptions) -> None:
        """docker's --platform (the host's architecture only) and --pull (missing: pull an image
        that is not here; always: pull first; never: only what is here). None: no pulls."""
        check_platform(opts.platform)
        if opts.pull is None:
            return
        if opts.pull not in PULL_POLICIES:
            raise UsageError(f'invalid --pull "{opts.pull}": use missing, always or never')
        if opts.pull == "always":
            self.engine.images.pull(opts.image)
        elif opts.pull == "missing":
            try:
                self.engine.images.get(opts.image)
            except ImageNotFound as missing:
                self.engine.host.notice(f"Unable to find image '{opts.image}' locally")
                try:
                    self.engine.images.pull(opts.image)
                except KvmcError as failed:  # say first what is missing, then why it could not be had
                    raise ImageNotFound(f"{missing.message}, and pulling it failed: {failed.message}",
                                        hint=missing.hint) from failed

    def create(self, opts: RunOptions) -> ContainerRecord:
        self._image_for(opts)
        return self.engine.create(opts)

    def run(self, opts: RunOptions, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
            signals: SignalForwarder | None = None, console: Console | None = None,
            detach_keys: str | None = None,
            created: Callable[[ContainerRecord], None] | None = None) -> tuple[ContainerRecord, int | None]:
        """docker run: (record, exit code); (record, None) once the process runs when detached
        (``-d``), or when the caller detached from its TTY (detach keys). ``created`` hears of the
        container before it starts."""
        self._image_for(opts)
        return self.engine.run(opts, stdin, stdout, stderr, signals, console, detach_keys, created)

    def start(self, ref: str, *, wait_attach: bool = False) -> ContainerRecord:
        """Start a created or stopped container. Without ``wait_attach`` this returns once
        its process runs (raising if it failed); with it, the monitor holds the process until
        a client attaches (:meth:`attach`), as ``start -a`` and docker's attach-then-start do."""
        record = self.state.resolve(ref)
        monitor = self.engine.start(record, wait_attach=wait_attach)
        if wait_attach:
            return record
        return self.engine.wait_started(record, monitor)

    def start_attached(self, ref: str, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
                       signals: SignalForwarder | None = None, console: Console | None = None,
                       detach_keys: str | None = None) -> int | None:
        """``start -a``: start and relay the output until the process exits; its exit code
        (None if the caller detached)."""
        record = self.start(ref, wait_attach=True)
        return self.engine.attach(self.state.load(record.id) or record, stdin, stdout, stderr, signals, console,
                                  detach_keys)

    def attach(self, ref: str, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
               signals: SignalForwarder | None = None, console: Console | None = None,
               detach_keys: str | None = None) -> int | None:
        """Relay a running container's output (and stdin) until it exits; its exit code, or
        None when the caller detached and the container goes on."""
        record = self.engine.require_running(ref)
        return self.engine.attach(record, stdin, stdout, stderr, signals, console, detach_keys)

    def attach_started(self, record: ContainerRecord, stdin: BinaryIO | None, stdout: BinaryIO,
                       stderr: BinaryIO, detach_keys: str | None = None) -> int | None:
        """Attach to a container just started with ``wait_attach`` (its process waits for us)."""
        return self.engine.attach(record, stdin, stdout, stderr, detach_keys=detach_keys)

    def resize(self, ref: str, rows: int, cols: int) -> ContainerRecord:
        """Set the size of a running TTY container's terminal (its process gets SIGWINCH)."""
        return self.engine.resize(ref, rows, cols)

    def exec(self, ref: str, opts: ProcessOptions, stdin: BinaryIO | None, stdout: BinaryIO, stderr: BinaryIO,
             signals: SignalForwarder | None = None, host_env: Mapping[str, str] | None = None, *,
             console: Console | None = None, detach_keys: str | None = None,
             winsize: tuple[int, int] | None = None, proc_id: int | None = None,
             privileged: bool = False, detach: bool = False) -> int | None:
        if not opts.command:
            raise UsageError("exec needs a command")
        return self.engine.exec(ref, opts, stdin, stdout, stderr, signals, host_env, console=console,
                                detach_keys=detach_keys, winsize=winsize, proc_id=proc_id, privileged=privileged,
                                detach=detach)

    def pause(self, ref: str) -> ContainerRecord:
        return self.engine.pause(ref)

    def unpause(self, ref: str) -> ContainerRecord:
        return self.engine.unpause(ref)

    def is_paused(self, record: ContainerRecord) -> bool:
        return self.engine.is_paused(record)

    def stats(self, ref: str) -> tuple[ContainerRecord, dict[str, Any]]:
        return self.engine.stats(ref)

    def top(self, ref: str, ps_args: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
        """The container's processes as docker top gives them: (titles, rows), from the image's
        own ``ps`` run in the guest as root (busybox's prints PID USER TIME COMMAND), without
        the guest kernel's threads, which belong to the VM and not to the container."""
        from kvmc.agent import GuestOutput

        out = GuestOutput(1 << 20)  # the guest's ps: at most 1 MiB of it is kept
        code = self.exec(ref, ProcessOptions(command=["ps", *(ps_args or [])], user="0"), None, out, GuestOutput(0))
        if code != 0:
            raise GuestError("the container's image has no working ps command"
                             + (f" taking {' '.join(ps_args)}" if ps_args else ""))
        lines = out.getvalue().decode(errors="replace").splitlines()
        titles = lines[0].split() if lines else []
        rows = [line.split(None, max(len(titles) - 1, 0)) for line in lines[1:] if line.strip()]
        if titles and titles[-1] in ("COMMAND", "CMD", "ARGS"):
            rows = [row for row in rows if not (len(row) == len(titles) and row[-1].startswith("[")
                                                and row[-1].endswith("]"))]
        return titles, rows

    def stop(self, ref: str, timeout_s: int | None = None, signal: str | int | None = None) -> tuple[ContainerRecord, bool]:
        """(record, whether it was running): docker answers 304 when it was not. ``signal``:
        docker's ``stop --signal`` instead of the container's stop signal."""
        return self.engine.stop(ref, timeout_s, None if signal in (None, "") else parse_signal(signal))

    def restart(self, ref: str, timeout_s: int | None = None) -> ContainerRecord:
        record, _ = self.engine.stop(ref, timeout_s)
        return self.engine.wait_started(record, self.engine.start(record))

    def kill(self, ref: str, signal: str | int | None = None) -> ContainerRecord:
        return self.engine.kill(ref, parse_signal(signal))

    def remove(self, ref: str, force: bool = False) -> ContainerRecord:
        return self.engine.remove(ref, force=force)

    def rename(self, ref: str, new_name: str) -> ContainerRecord:
        record = self.state.resolve(ref)
        with self.state.locked(record.id):
            return self.state.rename(self.state.load(record.id) or record, new_name)

    def reattach_lost(self) -> list[ContainerRecord]:
        """Running containers whose monitor died get a new one (kvmc serve's reconcile)."""
        return self.engine.reattach_lost()

    def prune(self) -> list[ContainerRecord]:
        """Remove every stopped container."""
        return self.engine.prune_containers()

    # ------------------------------------------------------------------ wait
    def wait(self, ref: str, condition: str = "not-running",
             cancelled: Callable[[], bool] = lambda: False) -> int | None:
        """Block until ``condition`` holds; the exit code (None if ``cancelled`` first).

        docker's conditions: ``not-running`` (now, if it is not running), ``next-exit`` (the
        exit after this call, even of a container that is stopped now), ``removed`` (after
        the exit, once the container is gone: its code is read from its tombstone).
        """
        if condition not in WAIT_CONDITIONS:
            raise UsageError(f'invalid condition "{condition}": use one of {", ".join(WAIT_CONDITIONS)}')
        first = self.engine.repair(self.state.resolve(ref))  # its monitor died: a new one records the exit
        baseline = (first.finished_at, first.restart_count)
        with self.state.watch(first.id) as changed:
            while not cancelled():
                current = self.state.load(first.id)
                if current is None:  # removed: every condition holds; its exit code outlives it
                    return self.state.tombstone_exit_code(first.id)
                seen = self.engine.observe(current)
                if condition == "not-running" and not seen.is_live:
                    return seen.exit_code or 0
                # next-exit: an exit after this call, also one the restart policy follows with a restart
                ended = seen.state in (State.EXITED, State.RESTARTING) or seen.restart_count != baseline[1]
                if (condition == "next-exit" and ended and seen.finished_at
                        and (seen.finished_at, seen.restart_count) != baseline):
                    return seen.exit_code or 0
                changed(POLL_S)  # woken by the record's next write, or its removal
        return None

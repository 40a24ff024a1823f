"""Every error kvmc reports, classified by kind, each kind with the exit code docker would give.

Every layer raises a subclass of :class:`KvmcError` with a message that names the problem
and, where there is one, the command that fixes it. Two front doors consume them, and each
maps them once, by ``kind`` and never by message text:

* the CLI prints the message and exits with ``exit_code`` (docker's 125/126/127);
* the API server (kvmc/api) answers with the HTTP status of the ``kind`` (moby's errdefs:
  not found 404, conflict 409, invalid 400, unavailable 503, ...).

All error classes live here, so a front door can see every kind there is.
"""

from __future__ import annotations

NOT_FOUND = "not_found"
CONFLICT = "conflict"
INVALID = "invalid"
UNAVAILABLE = "unavailable"
GUEST = "guest"
NOT_IMPLEMENTED = "not_implemented"
INTERNAL = "internal"


class KvmcError(Exception):
    """kvmc itself failed (docker's exit code 125)."""

    exit_code: int = 125
    kind: str = INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


# ------------------------------------------------------------------ the kinds
class NotFound(KvmcError):
    """A container, image, volume or exec that the caller named does not exist."""

    kind = NOT_FOUND


class Conflict(KvmcError):
    """The request contradicts the object's current state (running, in use, name taken)."""

    kind = CONFLICT


class UsageError(KvmcError):
    """Bad flags, arguments or request fields given by the user (invalid parameter)."""

    kind = INVALID


InvalidArgument = UsageError


class Unavailable(KvmcError):
    """A host service kvmc needs (libvirt, QEMU, a tool, disk space) is missing or refused."""

    kind = UNAVAILABLE


class DiskFull(Unavailable):
    """A write found no space left on its file system (ENOSPC): kvmc/space.py says which and
    how much is free. Nothing half-written is left behind."""


class NotSupported(KvmcError):
    """A Docker feature kvmc does not implement (build, swarm, plugins...)."""

    kind = NOT_IMPLEMENTED


# ------------------------------------------------------------- images, guests
class ImageError(KvmcError):
    """An image is malformed or refused (hostile layer contents)."""

    kind = INVALID


class ImageNotFound(NotFound, ImageError):
    """The named image is not in the local store."""

    kind = NOT_FOUND


class ImageInUse(Conflict, ImageError):
    """An image that a container's disk still backs onto cannot be deleted."""

    kind = CONFLICT


class HypervisorError(Unavailable):
    """libvirt/QEMU is missing, not running, or refused a domain."""


class GuestError(KvmcError):
    """The guest kernel, initramfs or agent is missing or misbehaved."""

    kind = GUEST


class AgentProtocolError(GuestError):
    """The guest agent sent something outside the protocol (oversized or unknown frame)."""


class AgentSilent(GuestError):
    """No frame about a process came from the guest agent within the caller's timeout."""


# ----------------------------------------------------------------- containers
class ContainerNotFound(NotFound):
    """No container matches the given name or id prefix."""


class AmbiguousContainer(ContainerNotFound):
    """An id prefix that matches more than one container: said as such, never as "no such
    container" (``inspect`` falls back to images only for a reference that matches nothing).
    An invalid parameter (400) to API clients, as moby's ErrAmbiguousPrefix."""

    kind = INVALID


class NameInUse(Conflict, UsageError):
    """A container name that another container holds (docker: 409 Conflict)."""

    kind = CONFLICT


class ContainerNotRunning(Conflict):
    """kill, exec, attach or pause of a container that is not running."""


class ContainerRunning(Conflict):
    """start of a running container, or rm of one without force."""


class ExecNotFound(NotFound):
    """No exec instance with that id (API only)."""


class GaveUpWaiting(KvmcError):
    """A terminal attached to a container gave up waiting for it after a signal (exit code
    128 + the signal, as a shell reports a command it killed); the container is left as it is."""

    kind = CONFLICT

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class CommandNotInvokable(KvmcError):
    """The container's command exists but cannot be executed (docker's 126)."""

    exit_code = 126
    kind = INVALID


class CommandNotFound(KvmcError):
    """The container's command does not exist in the image (docker's 127)."""

    exit_code = 127
    kind = INVALID


# -------------------------------------------------------- volumes and ports
class VolumeNotFound(NotFound):
    """No named volume of that name."""


class VolumeInUse(Conflict):
    """The volume is mounted by a container that exists (rm) or runs (a second mount)."""


class PortInUse(Conflict):
    """A host port asked for with -p is taken (by another program or container)."""

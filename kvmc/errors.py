"""Errors kvmc reports to its user, with the exit code docker would give.

Every layer raises a subclass of :class:`KvmcError` with a message that names the problem
and, where there is one, the command that fixes it. The CLI prints the message and exits
with ``exit_code``; nothing else in kvmc decides exit codes.
"""

from __future__ import annotations


class KvmcError(Exception):
    """kvmc itself failed (docker's exit code 125)."""

    exit_code: int = 125

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(KvmcError):
    """Bad flags or arguments given by the user."""


class ImageError(KvmcError):
    """An image is missing, malformed or refused (hostile layer contents)."""


class ImageNotFound(ImageError):
    """The named image is not in the local store."""


class HypervisorError(KvmcError):
    """libvirt/QEMU is missing, not running, or refused a domain."""


class GuestError(KvmcError):
    """The guest kernel, initramfs or agent is missing or misbehaved."""


class AgentProtocolError(GuestError):
    """The guest agent sent something outside the protocol (oversized or unknown frame)."""


class ContainerNotFound(KvmcError):
    """No container matches the given name or id prefix."""


class CommandNotInvokable(KvmcError):
    """The container's command exists but cannot be executed (docker's 126)."""

    exit_code = 126


class CommandNotFound(KvmcError):
    """The container's command does not exist in the image (docker's 127)."""

    exit_code = 127

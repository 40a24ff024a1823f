"""docker's container options beyond the process, parsed and checked once for both front doors.

Restart policies, health checks (kvmc/health.py), labels, --init, DNS and hosts, ulimits,
capabilities, /dev/shm, exposed ports: the CLI parses its flags and the API server its JSON
into one typed :class:`ContainerOptions` with the functions here; the engine (kvmc/runtime.py)
checks it against the image at create, the record keeps it, and kvmc/vmlife.py turns it into the
agent's RUN items (docs/agent-protocol.md). Pure functions, no I/O.

What the flags do in a VM (the docs say the same, README "Container options"):

* ``--init``: the agent is already PID 1 of every VM and reaps every orphan, and the container's
  process is not PID 1 (so it gets default signal dispositions): the flag is accepted and
  recorded, and changes nothing.
* ``--privileged``: a kvmc container's processes run as root with every capability inside their
  own VM, which is the isolation boundary; the flag is recorded (and makes ``--cap-drop`` a no-op,
  as in docker). ``--cap-add`` is recorded: nothing is missing to add. ``--cap-drop`` is enforced:
  the agent drops those capabilities from the bounding set of every process it starts.
"""

from __future__ import annotations

import csv
import ipaddress
import re
import signal as signals
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvmc.errors import UsageError
from kvmc.health import Healthcheck

RESTART_POLICIES = ("no", "always", "unless-stopped", "on-failure")
PULL_POLICIES = ("missing", "always", "never")
DEFAULT_SHM_BYTES = 64 << 20
RESTART_FIRST_DELAY_S = 0.1
RESTART_MAX_DELAY_S = 60.0
RESTART_RESET_AFTER_S = 10.0
"""docker's back-off: 100 ms, doubled after each restart up to a minute, back to 100 ms after a
run of 10 s or more (moby's restartmanager)."""
HOST_GATEWAY = "host-gateway"


# ------------------------------------------------------------------ restart policies
@dataclass(frozen=True)
class RestartPolicy:
    """docker's HostConfig.RestartPolicy: ``no``, ``always``, ``unless-stopped``, ``on-failure``
    (with a maximum retry count, 0 = no maximum)."""

    name: str = "no"
    max_retries: int = 0

    def __str__(self) -> str:
        return f"{self.name}:{self.max_retries}" if self.name == "on-failure" and self.max_retries else self.name

    @classmethod
    def parse(cls, text: str | None) -> RestartPolicy:
        """``--restart``: ``no``, ``always``, ``unless-stopped``, ``on-failure[:N]``."""
        name, sep, count = (text or "no").partition(":")
        if not sep:
            return cls.make(name, 0)
        if name != "on-failure":
            raise UsageError(f"invalid restart policy: maximum retry count cannot be used with restart policy '{name}'")
        if not count.lstrip("-").isdigit():
            raise UsageError(f'invalid restart policy "{text}": the retry count must be a number')
        return cls.make(name, int(count))

    @classmethod
    def make(cls, name: str | None, max_retries: int = 0) -> RestartPolicy:
        """From docker's JSON (Name, MaximumRetryCount); an empty name is ``no``."""
        name = name or "no"
        if name not in RESTART_POLICIES:
            raise UsageError(f"invalid restart policy '{name}': use no, always, unless-stopped or on-failure[:N]")
        if max_retries < 0:
            raise UsageError("invalid restart policy: maximum retry count cannot be negative")
        if max_retries and name != "on-failure":
            raise UsageError(f"invalid restart policy: maximum retry count cannot be used with restart policy '{name}'")
        return cls(name, max_retries)

    @property
    def enabled(self) -> bool:
        return self.name != "no"

    def should_restart(self, exit_code: int, manually_stopped: bool, restart_count: int) -> bool:
        """moby's RestartManager.ShouldRestart: ``always`` whatever happened (a manual stop is
        told apart by whoever asks, see Monitor), ``unless-stopped`` unless stopped by hand,
        ``on-failure`` after a non-zero exit while retries are left."""
        if self.name == "always":
            return True
        if self.name == "unless-stopped":
            return not manually_stopped
        if self.name == "on-failure":
            return exit_code != 0 and (not self.max_retries or restart_count < self.max_retries)
        return False


def restart_delay(previous_s: float, ran_s: float) -> float:
    """The wait before the next restart, given the last one's and how long the process ran."""
    if ran_s >= RESTART_RESET_AFTER_S or previous_s <= 0:
        return RESTART_FIRST_DELAY_S
    return min(previous_s * 2, RESTART_MAX_DELAY_S)


# ------------------------------------------------------------------------- ulimits
ULIMIT_NAMES = ("core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc",
                "rss", "rtprio", "rttime", "sigpending", "stack")
"""go-units' names: what ``--ulimit`` and HostConfig.Ulimits accept."""


@dataclass(frozen=True)
class Ulimit:
    name: str
    soft: int
    hard: int

    def __str__(self) -> str:
        return f"{self.name}={self.soft}:{self.hard}"

    @property
    def agent_item(self) -> str:
        return f"{self.name}:{self.soft}:{self.hard}"

    @classmethod
    def parse(cls, text: str) -> Ulimit:
        """``--ulimit NAME=SOFT[:HARD]`` (go-units' ParseUlimit; -1 is unlimited)."""
        name, sep, values = text.partition("=")
        if not sep or not values:
            raise UsageError(f'invalid ulimit argument "{text}": want NAME=SOFT[:HARD]')
        soft, _, hard = values.partition(":")
        try:
            return cls.make(name, int(soft), int(hard) if hard else int(soft))
        except ValueError:
            raise UsageError(f'invalid ulimit argument "{text}": limits are integers (-1 for unlimited)') from None

    @classmethod
    def make(cls, name: str, soft: int, hard: int) -> Ulimit:
        if name not in ULIMIT_NAMES:
            raise UsageError(f'invalid ulimit type "{name}": use one of {", ".join(ULIMIT_NAMES)}')
        if soft < -1 or hard < -1:
            raise UsageError(f"invalid ulimit {name}: limits are -1 (unlimited) or more")
        if hard != -1 and (soft == -1 or soft > hard):
            raise UsageError(f"invalid ulimit {name}: soft limit {soft} is greater than hard limit {hard}")
        return cls(name, soft, hard)


# -------------------------------------------------------------------- capabilities
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)
"""Linux capabilities by number (linux/capability.h)."""


def normalize_cap(name: str) -> str:
    """``net_admin``, ``CAP_NET_ADMIN`` -> ``CAP_NET_ADMIN`` (docker's canonical form); ``ALL``."""
    upper = name.strip().upper()
    if upper == "ALL":
        return "ALL"
    bare = upper.removeprefix("CAP_")
    if bare not in CAPABILITIES:
        raise UsageError(f'unknown capability: "{name}"')
    return f"CAP_{bare}"


def dropped_caps(cap_add: list[str], cap_drop: list[str]) -> list[int]:
    """The capability numbers a process loses: ``--cap-drop`` less ``--cap-add`` (docker's
    order: dropping ALL and adding some keeps those)."""
    add = {normalize_cap(c) for c in cap_add}
    drop = {normalize_cap(c) for c in cap_drop}
    if "ALL" in add:
        return []
    names = set(f"CAP_{c}" for c in CAPABILITIES) if "ALL" in drop else drop
    return sorted(CAPABILITIES.index(n.removeprefix("CAP_")) for n in names - add)


# ------------------------------------------------------------------ DNS and hosts
def check_ip(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise UsageError(f'{what}: "{text}" is not an IP address') from None


_WORD = re.compile(r"[!-~]+")  # one printable word, as the agent checks it


def check_word(text: str, what: str) -> str:
    if not _WORD.fullmatch(text) or "#" in text:
        raise UsageError(f'invalid {what} "{text}": one word, printable characters only')
    return text


def parse_extra_host(text: str) -> str:
    """``--add-host NAME:IP`` (or ``NAME=IP``, docker 25) in docker's stored form ``NAME:IP``;
    IP may be ``host-gateway`` (the host, as the container reaches it: 10.0.2.2 for kvmc)."""
    sep = "=" if "=" in text else ":"
    name, found, ip = text.partition(sep)
    if not found or not name or not ip:
        raise UsageError(f'invalid --add-host "{text}": want NAME:IP')
    check_word(name, "host name in --add-host")
    if ip != HOST_GATEWAY:
        ip = check_ip(ip, f"invalid --add-host {text}")
    return f"{name}:{ip}"


def hosts_lines(extra_hosts: list[str], gateway: str) -> list[str]:
    """The agent's ``host`` items (``IP NAME``) for docker's ``NAME:IP`` entries."""
    lines = []
    for entry in extra_hosts:
        name, _, ip = entry.partition(":")
        lines.append(f"{gateway if ip == HOST_GATEWAY else ip} {name}")
    return lines


# ------------------------------------------------------------------------- sizes
_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgt])?i?b?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str, what: str) -> int:
    """docker's RAMInBytes: ``64m``, ``1g``, ``512MiB``; bytes when bare."""
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise UsageError(f'invalid {what} "{text}": use a size such as 64m or 1g')
    return int(float(match[1]) * _UNITS[match[2].lower() if match[2] else None])


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, what: str) -> float:
    """Go's time.ParseDuration (``30s``, ``1m30s``, ``500ms``) in seconds; ``0`` is 0."""
    value = text.strip()
    if value in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    while pos < len(value):
        match = _DURATION_PART.match(value, pos)
        if not match:
            raise UsageError(f'invalid {what} "{text}": use a duration such as 30s, 1m30s or 500ms')
        total += float(match[1]) * _DURATION_UNITS[match[2]]
        pos = match.end()
    return total


# ------------------------------------------------------------------------ signals
def signal_number(text: str | int) -> int:
    """``SIGUSR1``, ``usr1``, ``10`` -> 10 (docker's ParseSignal)."""
    if isinstance(text, int):
        number = text
    else:
        name = str(text).strip().upper().removeprefix("SIG")
        try:
            number = int(name) if name.isdigit() else int(getattr(signals, f"SIG{name}"))
        except AttributeError:
            raise UsageError(f'invalid signal "{text}"') from None
    if not 0 < number < signals.NSIG:
        raise UsageError(f'invalid signal "{text}"')
    return number


# ----------------------------------------------------------------------- --mount
@dataclass
class MountSpec:
    """One ``--mount`` in kvmc's own syntax: a ``-v`` spec, a ``--tmpfs`` spec, or the target
    of an anonymous volume (kvmc keeps that path in the container's disk, see docs/api.md)."""

    volume: str | None = None
    tmpfs: str | None = None
    anonymous: str | None = None


_TRUE = ("", "1", "true", "yes")
_FALSE = ("0", "false", "no")


def parse_mount(text: str) -> MountSpec:
    """docker's ``--mount type=volume|bind|tmpfs,source=,target=,readonly,tmpfs-size=,...``."""
    try:
        [fields_] = csv.reader([text])
    except (csv.Error, ValueError):
        raise UsageError(f'invalid --mount "{text}": expected KEY=VALUE fields separated by commas') from None
    kind, source, target, readonly, size, mode = "volume", "", "", False, "", ""
    for item in fields_:
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key == "type":
            kind = value
        elif key in ("source", "src"):
            source = value
        elif key in ("target", "destination", "dst"):
            target = value
        elif key in ("readonly", "ro"):
            if value.lower() not in _TRUE + _FALSE:
                raise UsageError(f'invalid --mount "{text}": readonly takes true or false')
            readonly = value.lower() in _TRUE
        elif key == "tmpfs-size":
            size = str(parse_bytes(value, "tmpfs-size"))
        elif key == "tmpfs-mode":
            if not re.fullmatch(r"[0-7]{1,4}", value):
                raise UsageError(f'invalid --mount "{text}": tmpfs-mode is octal, e.g. 1777')
            mode = value
        elif key in ("bind-propagation", "consistency", "volume-nocopy", "bind-recursive", "volume-driver"):
            continue  # a propagation, a consistency or a driver mean nothing for a VM's disk or share
        else:
            raise UsageError(f'invalid --mount "{text}": unknown field "{key}"')
    if not target:
        raise UsageError(f'invalid --mount "{text}": target is required')
    suffix = ":ro" if readonly else ""
    if kind == "tmpfs":
        if source:
            raise UsageError(f'invalid --mount "{text}": a tmpfs has no source')
        options = ",".join(o for o in (f"size={size}" if size else "", f"mode={mode}" if mode else "") if o)
        return MountSpec(tmpfs=f"{target}:{options}" if options else target)
    if kind == "bind":
        if not source:
            raise UsageError(f'invalid --mount "{text}": a bind mount needs a source')
        return MountSpec(volume=f"{source}:{target}{suffix}")
    if kind == "volume":
        return MountSpec(volume=f"{source}:{target}{suffix}") if source else MountSpec(anonymous=target)
    raise UsageError(f'invalid --mount "{text}": type "{kind}" is not supported by kvmc (volume, bind and tmpfs are)')


# ----------------------------------------------------------------------- platform
def check_platform(text: str | None, host_arch: str = "amd64") -> None:
    """``--platform``: kvmc runs guests of the host's architecture only (no emulated CPUs)."""
    if not text:
        return
    parts = text.lower().split("/")
    os_name, arch = parts[0], parts[1] if len(parts) > 1 else host_arch
    aliases = {"x86_64": "amd64", "x86-64": "amd64"}
    if os_name != "linux" or aliases.get(arch, arch) != host_arch or (len(parts) > 2 and parts[2]):
        raise UsageError(f'platform "{text}" is not supported: kvmc runs linux/{host_arch} guests '
                         "(the host's architecture) only")


# ------------------------------------------------------------------ all of them
@dataclass
class ContainerOptions:
    """docker's container settings beyond the process, as a container record keeps them."""

    restart: RestartPolicy = field(default_factory=RestartPolicy)
    healthcheck: Healthcheck | None = None
    """As asked (``NONE`` test: --no-healthcheck); merged with the image's at create."""
    init: bool | None = None
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    extra_hosts: list[str] = field(default_factory=list)
    """docker's ``NAME:IP`` (IP may be ``host-gateway``)."""
    ulimits: list[Ulimit] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    privileged: bool = False
    shm_size: int | None = None
    """/dev/shm's size in bytes (None: the guest's default tmpfs, half its RAM)."""
    expose: list[str] = field(default_factory=list)
    """``PORT/proto`` the container exposes beyond the image's (``--expose``, Config.ExposedPorts)."""
    publish_all: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.restart, dict):
            self.restart = RestartPolicy(**self.restart)
        if isinstance(self.healthcheck, dict):
            self.healthcheck = Healthcheck.from_dict(self.healthcheck)
        self.ulimits = [u if isinstance(u, Ulimit) else Ulimit(**u) for u in self.ulimits]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ContainerOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> ContainerOptions:
        """Every value valid (the doors parse; the API's JSON may still hold anything)."""
        self.dns = [check_ip(d, "invalid --dns") for d in self.dns]
        self.dns_search = [check_word(d, "--dns-search domain") for d in self.dns_search if d != "."]
        self.dns_options = [check_word(o, "--dns-option") for o in self.dns_options]
        self.extra_hosts = [parse_extra_host(h) for h in self.extra_hosts]
        self.cap_add = [normalize_cap(c) for c in self.cap_add]
        self.cap_drop = [normalize_cap(c) for c in self.cap_drop]
        if self.shm_size is not None and self.shm_size <= 0:
            raise UsageError("--shm-size must be greater than 0")
        if self.healthcheck is not None:
            self.healthcheck.validate()
        return self

    @property
    def dropped_caps(self) -> list[int]:
        return [] if self.privileged else dropped_caps(self.cap_add, self.cap_drop)

"""Health checks as docker runs them: the configuration, and what each probe's result does.

Pure rules (moby's daemon/health.go), no I/O: the container's monitor (kvmc/monitor.py) runs
the probes as execs through the agent and records :class:`Health` with these functions, so the
rules are unit-testable and the same for containers made by either front door.

A check is docker's ``Healthcheck``: ``test`` is ``["CMD", argv...]``, ``["CMD-SHELL", "cmd"]``
(run with ``/bin/sh -c``) or ``["NONE"]`` (disabled, which also turns off the image's own);
durations are seconds here (docker's API speaks nanoseconds), 0 meaning docker's default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvmc.errors import UsageError

DEFAULT_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_START_PERIOD_S = 0.0
DEFAULT_START_INTERVAL_S = 5.0
DEFAULT_RETRIES = 3
MAX_OUTPUT = 4096
"""Longest probe output kept (docker's maxOutputLen)."""
MAX_LOG = 5
"""Results kept in the log (docker's maxLogEntries)."""
MIN_DURATION_S = 0.001
NANOS = 1_000_000_000

STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"
NO_HEALTHCHECK = "none"


@dataclass
class Healthcheck:
    """docker's Config.Healthcheck (durations in seconds; 0 = the default)."""

    test: list[str] = field(default_factory=list)
    interval_s: float = 0.0
    timeout_s: float = 0.0
    start_period_s: float = 0.0
    start_interval_s: float = 0.0
    retries: int = 0

    @property
    def disabled(self) -> bool:
        return not self.test or self.test[0] == "NONE"

    @property
    def command(self) -> list[str]:
        """The probe's argv: ``CMD`` runs its words, ``CMD-SHELL`` its string with /bin/sh -c."""
        kind, rest = self.test[0], self.test[1:]
        if kind == "CMD-SHELL":
            return ["/bin/sh", "-c", " ".join(rest)]
        return list(rest)

    @property
    def interval(self) -> float:
        return self.interval_s or DEFAULT_INTERVAL_S

    @property
    def timeout(self) -> float:
        return self.timeout_s or DEFAULT_TIMEOUT_S

    @property
    def start_period(self) -> float:
        return self.start_period_s or DEFAULT_START_PERIOD_S

    @property
    def start_interval(self) -> float:
        return self.start_interval_s or DEFAULT_START_INTERVAL_S

    @property
    def max_failures(self) -> int:
        return self.retries if self.retries > 0 else DEFAULT_RETRIES

    def validate(self) -> Healthcheck:
        """docker's checks at create (daemon/container.go validateHealthCheck)."""
        if self.test and self.test[0] not in ("NONE", "CMD", "CMD-SHELL"):
            raise UsageError(f'invalid health check type "{self.test[0]}": use CMD, CMD-SHELL or NONE')
        if self.test and self.test[0] != "NONE" and not self.command:
            raise UsageError("the health check has no command")
        for name in ("interval_s", "timeout_s", "start_period_s", "start_interval_s"):
            value = getattr(self, name)
            if value < 0 or 0 < value < MIN_DURATION_S:
                raise UsageError(f"health check {name.removesuffix('_s').replace('_', ' ')} cannot be "
                                 "less than 1ms")
        if self.retries < 0:
            raise UsageError("health check retries cannot be negative")
        return self

    # ------------------------------------------------------------- docker's JSON
    @classmethod
    def from_docker(cls, data: dict[str, Any] | None) -> Healthcheck | None:
        """Config.Healthcheck as docker's API and image configs write it (nanoseconds)."""
        if not data:
            return None

        def seconds(key: str) -> float:
            value = data.get(key) or 0
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"invalid Healthcheck.{key}: expected nanoseconds")
            return value / NANOS

        test = data.get("Test") or []
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if not isinstance(test, list) or not all(isinstance(t, str) for t in test):
            raise UsageError("invalid Healthcheck.Test: expected a list of strings")
        retries = data.get("Retries") or 0
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise UsageError("invalid Healthcheck.Retries: expected an integer")
        return cls(test=list(test), interval_s=seconds("Interval"), timeout_s=seconds("Timeout"),
                   start_period_s=seconds("StartPeriod"), start_interval_s=seconds("StartInterval"),
                   retries=retries)

    def to_docker(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Test": list(self.test)}
        for key, value in (("Interval", self.interval_s), ("Timeout", self.timeout_s),
                           ("StartPeriod", self.start_period_s), ("StartInterval", self.start_interval_s)):
            if value:
                out[key] = int(round(value * NANOS))
        if self.retries:
            out["Retries"] = self.retries
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Healthcheck:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def merge(given: Healthcheck | None, image: Healthcheck | None) -> Healthcheck | None:
    """The container's check: what was asked, its unset fields from the image's (moby's merge).
    None or a ``NONE`` test means no health check."""
    if given is None:
        merged = image
    elif image is None:
        merged = given
    else:
        merged = Healthcheck(
            test=given.test or image.test, interval_s=given.interval_s or image.interval_s,
            timeout_s=given.timeout_s or image.timeout_s, start_period_s=given.start_period_s or image.start_period_s,
            start_interval_s=given.start_interval_s or image.start_interval_s,
            retries=given.retries or image.retries)
    if merged is None or merged.disabled:
        return None
    return merged.validate()


@dataclass
class HealthResult:
    """One probe: docker's HealthcheckResult (times as RFC 3339 text)."""

    start: str
    end: str
    exit_code: int
    output: str


@dataclass
class Health:
    """docker's State.Health: ``starting`` until a probe passes or the failures count."""

    status: str = STARTING
    failing_streak: int = 0
    log: list[HealthResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = [r if isinstance(r, HealthResult) else HealthResult(**r) for r in self.log]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Health:
        return cls(**{k: v for k, v in data.items() if k in ("status", "failing_streak", "log")})

    def to_docker(self) -> dict[str, Any]:
        return {"Status": self.status, "FailingStreak": self.failing_streak,
                "Log": [{"Start": r.start, "End": r.end, "ExitCode": r.exit_code, "Output": r.output}
                        for r in self.log]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def restarted(health: Health | None) -> Health:
    """The health of a container that (re)starts: starting, no failures, the log kept."""
    return Health(STARTING, 0, list(health.log) if health else [])


def record_result(health: Health, result: HealthResult, check: Healthcheck, seconds_since_start: float) -> Health:
    """The health after one probe (moby's handleProbeResult): exit 0 is healthy; a failure
    counts unless the container is still ``starting`` within its start period, and
    ``retries`` failures in a row make it unhealthy."""
    log = (health.log + [result])[-MAX_LOG:]
    if result.exit_code == 0:
        return Health(HEALTHY, 0, log)
    if health.status == STARTING and seconds_since_start < check.start_period:
        return Health(health.status, health.failing_streak, log)
    streak = health.failing_streak + 1
    return Health(UNHEALTHY if streak >= check.max_failures else health.status, streak, log)


def next_probe_in(check: Healthcheck, health: Health, seconds_since_start: float) -> float:
    """Seconds until the next probe (moby's getInterval): the start interval while the
    container is starting within its start period, the interval otherwise."""
    if seconds_since_start < check.start_period and health.status == STARTING:
        return check.start_interval
    return check.interval


def truncate_output(data: bytes) -> str:
    """A probe's combined output as docker keeps it (4096 bytes at most)."""
    return data[:MAX_OUTPUT].decode(errors="replace")

"""docker's ``--filter`` for containers, one implementation for ``kvmc ps`` and ``GET
/containers/json``: label, name, id, status, ancestor, exited, volume, network, health."""

from __future__ import annotations

from kvmc.errors import ImageError, UsageError
from kvmc.images.refs import normalize_name
from kvmc.state import ContainerRecord, State

CONTAINER_FILTERS = ("label", "name", "id", "status", "ancestor", "exited", "volume", "network", "health")
HEALTH_VALUES = ("starting", "healthy", "unhealthy", "none")
STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")


def parse_filter_flags(flags: list[str]) -> dict[str, list[str]]:
    """The CLI's repeated ``--filter KEY=VALUE`` as the API's filter map."""
    filters: dict[str, list[str]] = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep or not key:
            raise UsageError(f'bad format of filter "{flag}" (expected name=value)')
        filters.setdefault(key.strip().lower(), []).append(value)
    return filters


def match_labels(labels: dict[str, str], wanted: list[str]) -> bool:
    """All of ``wanted`` hold: ``k`` means the key is present, ``k=v`` an exact value."""
    for item in wanted:
        key, sep, value = item.partition("=")
        if key not in labels or (sep and labels[key] != value):
            return False
    return True


def docker_status(record: ContainerRecord, paused: bool = False) -> str:
    """docker's State.Status word: created | running | paused | exited (``starting`` is
    running: the start call has returned to its caller)."""
    if record.state == State.RESTARTING:
        return "restarting"
    if record.is_live:
        return "paused" if paused else "running"
    return str(record.state)


def _same_image(wanted: str, record: ContainerRecord) -> bool:
    if record.image_id.startswith(wanted.removeprefix("sha256:")):
        return True
    try:
        return normalize_name(wanted) == normalize_name(record.image)
    except ImageError:
        return False


def check(filters: dict[str, list[str]]) -> None:
    """Refuse filters kvmc does not know, as docker does ("invalid filter 'x'")."""
    for key in filters:
        if key not in CONTAINER_FILTERS:
            raise UsageError(f"invalid filter '{key}'")
    for status in filters.get("status", []):
        if status not in STATUSES:
            raise UsageError(f"invalid filter 'status={status}'")
    for health in filters.get("health", []):
        if health not in HEALTH_VALUES:
            raise UsageError(f"invalid filter 'health={health}': use one of {', '.join(HEALTH_VALUES)}")


def container_matches(record: ContainerRecord, filters: dict[str, list[str]], paused: bool = False) -> bool:
    """Every filter key holds (values of one key are alternatives, as in docker)."""
    for key, values in filters.items():
        if key == "label" and not match_labels(record.labels, values):
            return False
        if key == "name" and not any(v.lstrip("/") in record.name for v in values):
            return False
        if key == "id" and not any(record.id.startswith(v) for v in values):
            return False
        if key == "status" and docker_status(record, paused) not in values:
            return False
        if key == "ancestor" and not any(_same_image(v, record) for v in values):
            return False
        if key == "exited" and (record.state != State.EXITED or str(record.exit_code) not in values):
            return False
        if key == "volume" and not any(v in record.volume_names or any(m.target == v for m in record.mounts)
                                       for v in values):
            return False
        if key == "network":
            names = {record.network, {"user": "bridge"}.get(record.network)} if not record.networks else set()
            names |= {ep.network for ep in record.networks} | {ep.network_id for ep in record.networks}
            if not any(v in names for v in values):
                return False
        if key == "health" and (record.health.status if record.health else "none") not in values:
            return False
    return True

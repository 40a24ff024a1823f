"""What ``kvmc ps``, ``kvmc images`` and ``kvmc stats`` print, as docker's CLI prints it: the same columns, the
same ``--format`` placeholders (``{{.ID}}``, ``{{.Names}}``, ``{{.Status}}``, ``{{.Label "k"}}``,
``{{json .}}``, ``table ...``) and the same words.

Each row is a *context* built from the docker JSON both front doors share (kvmc/views.py), as
docker's CLI builds its containerContext/imageContext from the API's list items; the templates
run through kvmc/gotemplate.py. No I/O here: the CLI passes the records' JSON in.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from kvmc.gotemplate import format_rows
from kvmc.views import human_duration

PS_TABLE = "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
PS_TABLE_SIZE = PS_TABLE + "\t{{.Size}}"
IMAGES_TABLE = "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"
IMAGES_TABLE_DIGESTS = "table {{.Repository}}\t{{.Tag}}\t{{.Digest}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"

PS_HEADERS = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND", "CreatedAt": "CREATED AT",
              "RunningFor": "CREATED", "Ports": "PORTS", "State": "STATE", "Status": "STATUS", "Size": "SIZE",
              "Names": "NAMES", "Labels": "LABELS", "Mounts": "MOUNTS", "Networks": "NETWORKS",
              "LocalVolumes": "LOCAL VOLUMES", "Label": "LABEL"}
STATS_TABLE = "table {{.ID}}\t{{.Name}}\t{{.CPUPerc}}\t{{.MemUsage}}\t{{.MemPerc}}\t{{.NetIO}}\t{{.BlockIO}}\t{{.PIDs}}"
STATS_HEADERS = {"Container": "CONTAINER", "ID": "CONTAINER ID", "Name": "NAME", "CPUPerc": "CPU %",
                 "MemUsage": "MEM USAGE / LIMIT", "MemPerc": "MEM %", "NetIO": "NET I/O", "BlockIO": "BLOCK I/O",
                 "PIDs": "PIDS"}
IMAGES_HEADERS = {"ID": "IMAGE ID", "Repository": "REPOSITORY", "Tag": "TAG", "Digest": "DIGEST",
                  "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "Size": "SIZE", "Containers": "CONTAINERS",
                  "VirtualSize": "VIRTUAL SIZE", "SharedSize": "SHARED SIZE", "UniqueSize": "UNIQUE SIZE"}


_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def _custom_size(size: float, base: float, units: tuple[str, ...], precision: int) -> str:
    """go-units' CustomSize: ``size`` in the largest unit under which it is below ``base``."""
    i = 0
    while size >= base and i < len(units) - 1:
        size /= base
        i += 1
    return f"{size:.{precision}g}{units[i]}"


def human_size(size: float, precision: int = 3) -> str:
    """go-units' HumanSizeWithPrecision: decimal units, ``%.3g`` (``1.23MB``, ``512B``)."""
    return _custom_size(size, 1000.0, _DECIMAL_UNITS, precision)


def bytes_size(size: float) -> str:
    """go-units' BytesSize: binary units, ``%.4g`` (``64.5MiB``, ``256MiB``): docker's memory."""
    return _custom_size(size, 1024.0, _BINARY_UNITS, 4)


def go_time(epoch: float) -> str:
    """Go's time.Time.String() of a UTC time: ``2024-01-02 15:04:05 +0000 UTC``."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def ellipsis(text: str, width: int) -> str:
    """docker's formatter.Ellipsis: cut to ``width`` characters, the last one an ellipsis."""
    return text if len(text) <= width else text[:width - 1] + "…"


class Header:
    """The header row of a ``table`` format: every field is its column title."""

    def __init__(self, titles: dict[str, str]) -> None:
        self._titles = titles

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        title = self._titles.get(name, name.upper())
        if name == "Label":
            return lambda *_args: title
        return title


class ContainerRow:
    """One container as docker ps's ``--format`` sees it (docker's containerContext)."""

    def __init__(self, summary: dict[str, Any], *, trunc: bool = True, now: float | None = None,
                 size: tuple[int, int] | None = None) -> None:
        self.s = summary
        self.trunc = trunc
        self.now = time.time() if now is None else now
        self.size = size

    @property
    def ID(self) -> str:  # noqa: N802 - docker's placeholder names
        return self.s["Id"][:12] if self.trunc else self.s["Id"]

    @property
    def Names(self) -> str:  # noqa: N802
        return ",".join(n.lstrip("/") for n in self.s.get("Names", []))

    @property
    def Image(self) -> str:  # noqa: N802
        return self.s.get("Image", "")

    @property
    def Command(self) -> str:  # noqa: N802
        command = self.s.get("Command", "")
        return json.dumps(ellipsis(command, 20) if self.trunc else command, ensure_ascii=False)

    @property
    def CreatedAt(self) -> str:  # noqa: N802
        return go_time(self.s.get("Created", 0))

    @property
    def RunningFor(self) -> str:  # noqa: N802
        return human_duration(max(0.0, self.now - self.s.get("Created", 0))) + " ago"

    @property
    def Ports(self) -> str:  # noqa: N802
        shown = []
        for p in self.s.get("Ports", []):
            if p.get("PublicPort"):
                shown.append(f"{p.get('IP') or '0.0.0.0'}:{p['PublicPort']}->{p['PrivatePort']}/{p['Type']}")
            else:
                shown.append(f"{p['PrivatePort']}/{p['Type']}")
        return ", ".join(shown)

    @property
    def State(self) -> str:  # noqa: N802
        return self.s.get("State", "")

    @property
    def Status(self) -> str:  # noqa: N802
        return self.s.get("Status", "")

    @property
    def Size(self) -> str:  # noqa: N802
        if self.size is None:
            return "0B"
        rw, virtual = self.size
        return f"{human_size(rw)} (virtual {human_size(virtual)})"

    @property
    def Labels(self) -> str:  # noqa: N802
        return ",".join(f"{k}={v}" for k, v in sorted(self.s.get("Labels", {}).items()))

    def Label(self, name: str) -> str:  # noqa: N802
        return self.s.get("Labels", {}).get(name, "")

    @property
    def Mounts(self) -> str:  # noqa: N802
        names = [m.get("Name") or m.get("Source", "") for m in self.s.get("Mounts", [])]
        return ",".join(ellipsis(n, 15) if self.trunc else n for n in names)

    @property
    def Networks(self) -> str:  # noqa: N802
        return ",".join(sorted(self.s.get("NetworkSettings", {}).get("Networks", {})))

    @property
    def LocalVolumes(self) -> str:  # noqa: N802
        return str(sum(m.get("Type") == "volume" for m in self.s.get("Mounts", [])))

    def to_json(self) -> dict[str, str]:
        """``{{json .}}`` and ``--format json``: every placeholder's value, as docker marshals it."""
        return {name: getattr(self, name) for name in ("Command", "CreatedAt", "ID", "Image", "Labels",
                                                       "LocalVolumes", "Mounts", "Names", "Networks", "Ports",
                                                       "RunningFor", "Size", "State", "Status")}


class ImageRow:
    """One image tag as docker images' ``--format`` sees it (docker's imageContext)."""

    def __init__(self, summary: dict[str, Any], tag: str | None, *, trunc: bool = True, now: float | None = None,
                 containers: int | None = None) -> None:
        self.s = summary
        self.tag = tag
        self.trunc = trunc
        self.now = time.time() if now is None else now
        self.containers = containers

    @property
    def ID(self) -> str:  # noqa: N802
        image_id = self.s["Id"]
        return image_id.removeprefix("sha256:")[:12] if self.trunc else image_id

    @property
    def Repository(self) -> str:  # noqa: N802
        return self.tag.rsplit(":", 1)[0] if self.tag else "<none>"

    @property
    def Tag(self) -> str:  # noqa: N802
        return self.tag.rsplit(":", 1)[1] if self.tag and ":" in self.tag.rsplit("/", 1)[-1] else "<none>"

    @property
    def Digest(self) -> str:  # noqa: N802
        digests = self.s.get("RepoDigests") or []
        return digests[0].split("@", 1)[-1] if digests else "<none>"

    @property
    def CreatedSince(self) -> str:  # noqa: N802
        created = self.s.get("Created") or 0
        return human_duration(max(0.0, self.now - created)) + " ago" if created else "N/A"

    @property
    def CreatedAt(self) -> str:  # noqa: N802
        return go_time(self.s.get("Created") or 0)

    @property
    def Size(self) -> str:  # noqa: N802
        return human_size(self.s.get("Size", 0))

    VirtualSize = Size

    @property
    def SharedSize(self) -> str:  # noqa: N802
        return "N/A"

    @property
    def UniqueSize(self) -> str:  # noqa: N802
        return "N/A"

    @property
    def Containers(self) -> str:  # noqa: N802
        return "N/A" if self.containers is None else str(self.containers)

    def to_json(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ("Containers", "CreatedAt", "CreatedSince", "Digest", "ID",
                                                       "Repository", "SharedSize", "Size", "Tag", "UniqueSize",
                                                       "VirtualSize")}


class StatsRow:
    """One container's stats as docker stats' ``--format`` sees it (docker's statsContext),
    computed from the stats JSON (kvmc/views.py container_stats) as the docker CLI computes it."""

    def __init__(self, stats: dict[str, Any], *, container: str = "", trunc: bool = True) -> None:
        self.s = stats
        self.container = container
        self.trunc = trunc

    @property
    def Container(self) -> str:  # noqa: N802 - docker's placeholder names
        return self.container or self.ID

    @property
    def ID(self) -> str:  # noqa: N802
        return self.s["id"][:12] if self.trunc else self.s["id"]

    @property
    def Name(self) -> str:  # noqa: N802
        return self.s.get("name", "").lstrip("/")

    def cpu_percent(self) -> float:
        """The CPU time used between the two samples, per online CPU's system time (docker's)."""
        cpu, pre = self.s["cpu_stats"], self.s["precpu_stats"]
        cpu_delta = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system_delta = cpu["system_cpu_usage"] - pre["system_cpu_usage"]
        if not pre["system_cpu_usage"] or system_delta <= 0 or cpu_delta <= 0:
            return 0.0
        return cpu_delta / system_delta * cpu["online_cpus"] * 100.0

    @property
    def CPUPerc(self) -> str:  # noqa: N802
        return f"{self.cpu_percent():.2f}%"

    @property
    def MemUsage(self) -> str:  # noqa: N802
        memory = self.s["memory_stats"]
        return f"{bytes_size(memory['usage'])} / {bytes_size(memory['limit'])}"

    @property
    def MemPerc(self) -> str:  # noqa: N802
        memory = self.s["memory_stats"]
        return f"{memory['usage'] / memory['limit'] * 100.0 if memory['limit'] else 0.0:.2f}%"

    @property
    def NetIO(self) -> str:  # noqa: N802
        networks = self.s.get("networks") or {}
        received = sum(n.get("rx_bytes", 0) for n in networks.values())
        sent = sum(n.get("tx_bytes", 0) for n in networks.values())
        return f"{human_size(received)} / {human_size(sent)}"

    @property
    def BlockIO(self) -> str:  # noqa: N802
        entries = (self.s.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
        read = sum(e["value"] for e in entries if e.get("op", "").lower() == "read")
        written = sum(e["value"] for e in entries if e.get("op", "").lower() == "write")
        return f"{human_size(read)} / {human_size(written)}"

    @property
    def PIDs(self) -> str:  # noqa: N802
        return str((self.s.get("pids_stats") or {}).get("current", 0))

    def to_json(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ("BlockIO", "CPUPerc", "Container", "ID", "MemPerc",
                                                       "MemUsage", "Name", "NetIO", "PIDs")}


def render_rows(fmt: str | None, rows: list[Any], default_table: str, headers: dict[str, str]) -> list[str]:
    """docker's ``--format``: a template, ``table TEMPLATE``, ``json`` (one JSON object per
    line) or nothing (the default table)."""
    if fmt == "json":
        return [json.dumps(row.to_json(), ensure_ascii=False) for row in rows]
    return format_rows(fmt or default_table, rows, Header(headers))


def image_filter(summary: dict[str, Any], tags: list[str], filters: dict[str, list[str]]) -> list[str | None]:
    """The tags of an image that docker images' ``--filter`` keeps ([None]: the untagged row):
    ``dangling=true|false``, ``reference=PATTERN`` (fnmatch on name[:tag]), ``label=k[=v]``."""
    from fnmatch import fnmatch

    from kvmc.errors import UsageError
    from kvmc.service.filters import match_labels

    for key in filters:
        if key not in ("dangling", "reference", "label"):
            raise UsageError(f"invalid filter '{key}'")
    rows: list[str | None] = list(tags) or [None]
    for value in filters.get("dangling", []):
        if value.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"invalid filter 'dangling={value}'")
        if (value.lower() in ("true", "1")) != (not tags):
            return []
    if filters.get("label") and not match_labels(summary.get("Labels") or {}, filters["label"]):
        return []
    patterns = filters.get("reference", [])
    if patterns:
        rows = [t for t in rows if t and any(fnmatch(t, p) or fnmatch(t.rsplit(":", 1)[0], p) for p in patterns)]
    return rows

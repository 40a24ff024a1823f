"""The data the store hands out: an image and the parts of its OCI config kvmc runs with.

Plain dataclasses with ``to_dict``/``from_dict`` so the CLI can print JSON (``kvmc image
inspect``) and the store can persist them in ``image.json`` without a schema library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def _str_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _opt_str_list(value: Any) -> list[str] | None:
    # OCI distinguishes "not set" (null) from "set to empty" for Entrypoint/Cmd; keep it.
    return [str(v) for v in value] if isinstance(value, list) else None


@dataclass
class ImageConfig:
    """Execution defaults from the OCI image config (``config`` object of the config blob)."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str | None = None
    healthcheck: dict[str, Any] | None = None
    """The image's HEALTHCHECK as docker writes it (Test, Interval in ns, ...; kvmc/health.py)."""

    @classmethod
    def from_oci(cls, config_blob: dict[str, Any]) -> ImageConfig:
        """Read the fields from a parsed OCI/docker image config blob (``config`` may be null)."""
        c = config_blob.get("config") or {}
        if not isinstance(c, dict):
            c = {}
        labels = c.get("Labels") or {}
        return cls(
            entrypoint=_opt_str_list(c.get("Entrypoint")),
            cmd=_opt_str_list(c.get("Cmd")),
            env=_str_list(c.get("Env")),
            working_dir=str(c.get("WorkingDir") or ""),
            user=str(c.get("User") or ""),
            exposed_ports=sorted(str(k) for k in (c.get("ExposedPorts") or {})),
            volumes=sorted(str(k) for k in (c.get("Volumes") or {})),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
            stop_signal=str(c["StopSignal"]) if c.get("StopSignal") else None,
            healthcheck=dict(c["Healthcheck"]) if isinstance(c.get("Healthcheck"), dict) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Image:
    """An image in the store: its immutable metadata plus the tags currently pointing at it.

    ``size`` is the apparent size of the unpacked root filesystem (what ``docker images``
    shows); ``disk_size`` is the virtual size of ``disk_path``, the read-only ext4 base
    disk that containers overlay.
    """

    id: str
    tags: list[str]
    created: str | None
    size: int
    disk_size: int
    disk_path: Path
    config: ImageConfig
    architecture: str = ""
    os: str = ""
    layers: list[str] = field(default_factory=list)

    @property
    def short_id(self) -> str:
        """First 12 hex digits of the id, as docker prints it."""
        return self.id[:12]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["short_id"] = self.short_id
        data["disk_path"] = str(self.disk_path)
        data["config"] = self.config.to_dict()
        return data

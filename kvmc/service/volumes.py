"""Named volumes: the store's operations with the rules that involve containers (in use)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmc.space import disk_full_errors
from kvmc.errors import VolumeInUse
from kvmc.volumes import DEFAULT_SIZE, Volume

if TYPE_CHECKING:
    from kvmc.runtime import Runtime


@dataclass
class VolumeView:
    """A volume with what the store does not know by itself: its users and allocated size."""

    volume: Volume
    used_by: list[str]
    usage_bytes: int

    def to_dict(self) -> dict:
        return {**self.volume.to_dict(), "used_by": self.used_by}


@disk_full_errors(lambda self: self.engine.config.data_dir)
class VolumeService:
    """Volumes for both front doors."""

    def __init__(self, engine: Runtime) -> None:
        self.engine = engine
        self.store = engine.volumes

    def create(self, name: str, size_bytes: int = DEFAULT_SIZE, exist_ok: bool = False,
               labels: dict[str, str] | None = None, driver: str | None = None) -> Volume:
        """``driver`` None or docker's ``local``: the configured default (config volume_driver)."""
        if driver in (None, "", "local"):
            driver = self.engine.config.volume_driver
        return self.store.create(name, size_bytes, exist_ok=exist_ok, labels=labels, driver=driver)

    def _view(self, volume: Volume) -> VolumeView:
        return VolumeView(volume, self.engine.volume_users(volume.name), self.store.usage_bytes(volume))

    def get(self, name: str) -> VolumeView:
        return self._view(self.store.get(name))

    def list(self) -> list[VolumeView]:
        return [self._view(v) for v in self.store.list()]

    def remove(self, name: str) -> None:
        """Delete a volume and its data; refused while any container (running or not) mounts it."""
        self.store.get(name)
        users = self.engine.volume_users(name)
        if users:
            raise VolumeInUse(f"volume {name} is in use by container(s) {', '.join(users)}: remove them first")
        self.store.remove(name)

    def prune(self) -> list[str]:
        """Delete every volume no container mounts; their names."""
        removed = []
        for view in self.list():
            if not view.used_by:
                self.store.remove(view.volume.name)
                removed.append(view.volume.name)
        return removed

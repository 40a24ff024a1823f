"""Pools of pre-booted VMs: warm, list, remove and collect stale members and templates."""

from __future__ import annotations

from typing import Callable

from kvmc.space import disk_full_errors
from kvmc.context import HostContext
from kvmc.errors import UsageError
from kvmc.network import parse_network

MODES = ("save", "template")


@disk_full_errors(lambda self: self.host.config.data_dir)
class PoolService:
    """kvmc/pool/'s operations with the defaults and checks a front door would otherwise hold."""

    def __init__(self, host: HostContext) -> None:
        self.host = host

    def _pool(self):  # noqa: ANN202 - kvmc.pool.Pool, imported on first use
        from kvmc.pool import Pool

        return Pool(self.host)

    def warm(self, image: str, size: int | None, memory_mib: int | None, cpus: int | None, accel: str | None,
             network: str = "user", hot: bool = False,
             progress: Callable[[int, int], None] = lambda done, total: None) -> list:
        """Members for (image, size): made up to ``size`` (default 2), and heated with ``hot``."""
        return self._pool().warm(image, 2 if size is None else size, memory_mib or self.host.config.memory_mib,
                                 cpus or self.host.config.cpus, accel, progress, parse_network(network), hot)

    def warm_template(self, image: str, memory_mib: int | None, cpus: int | None, accel: str | None,
                      network: str = "user", size: int | None = None, hot: bool = False) -> tuple:
        """(template, made now, hot clones made now) for (image, size). With ``hot``: also
        ``size`` (default 2) hot template clones, made ahead and waiting paused; --size alone
        does not apply (one template serves any number of runs)."""
        if size is not None and not hot:
            raise UsageError("--size does not apply to --template without --hot: one template serves any number "
                             "of runs (--template --hot --size N keeps N clones of it waiting paused)")
        from kvmc.pool.common import resolve

        pool = self._pool()
        image_, key = resolve(self.host, image, memory_mib or self.host.config.memory_mib,
                              cpus or self.host.config.cpus, accel, parse_network(network))
        if not hot:
            _, template, made = pool.template.warm(key, image_.disk_path)
            return template, made, []
        return pool.warm_hot_clones(key, image_.disk_path, 2 if size is None else size)

    def summary(self) -> list[dict]:
        return self._pool().summary()

    def remove(self, image: str | None = None, mode: str | None = None) -> tuple[int, int]:
        if mode not in (None, *MODES):
            raise UsageError(f'--mode must be "save" or "template", not "{mode}"')
        return self._pool().remove(image, mode)

    def gc(self) -> tuple[int, int]:
        return self._pool().gc()

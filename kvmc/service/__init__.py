"""The service layer: the one set of operations both front doors call.

The CLI (kvmc/cli.py) and the Docker API server (kvmc/api/) each parse their input, make one
call here and render the result; every rule about what may happen (is the image in use, may
this volume go, is the container running) lives in these modules or below, never in a front
door. Results are typed (records, dataclasses); errors are kvmc.errors by kind; stdio,
signals and the caller's environment are parameters.

Modules, one resource each (as moby's routers/backends and podman's ContainerEngine):

* ``containers`` - create, run, start, stop, kill, wait, attach, exec, logs, rm, rename, prune
* ``execs``      - docker's exec instances: create, start, inspect
* ``files``      - docker cp: stat, copy out, copy in (tar streams, through the running VM)
* ``images``     - list, inspect, pull, import, tag, rm (refusing images in use), prune
* ``volumes``    - create, list, inspect (with users), rm (refusing volumes in use), prune
* ``networks``   - create, list, inspect (with containers), connect, disconnect, rm (refusing networks in use), prune
* ``pools``      - warm, list, remove, gc of pool members and templates
* ``system``     - info, disk usage, prune, gc
* ``hosts``      - ``kvmc host``: disposable VMs running Docker Engine (create, ls, ssh, rm, gc)
"""

from __future__ import annotations

from kvmc.config import Config
from kvmc.context import HostContext
from kvmc.service.containers import ContainerService
from kvmc.service.execs import ExecService
from kvmc.service.files import FileService
from kvmc.service.hosts import HostService
from kvmc.service.images import ImageService
from kvmc.service.networks import NetworkService
from kvmc.service.pools import PoolService
from kvmc.service.reports import ItemReport, for_each
from kvmc.service.system import SystemService
from kvmc.service.volumes import VolumeService

__all__ = ["ContainerService", "ExecService", "FileService", "HostService", "ImageService", "NetworkService", "ItemReport", "PoolService", "Services", "SystemService",
           "VolumeService", "for_each"]


class Services:
    """Every service over one HostContext: what a front door holds."""

    def __init__(self, host: HostContext) -> None:
        from kvmc.runtime import Runtime

        self.host = host
        self.engine = Runtime(host)
        self.containers = ContainerService(self.engine)
        self.execs = ExecService(self.containers)
        self.files = FileService(self.containers)
        self.images = ImageService(self.engine)
        self.volumes = VolumeService(self.engine)
        self.pools = PoolService(host)
        self.networks = NetworkService(self.engine)
        self.system = SystemService(self.engine)
        self.hosts = HostService(self.containers, self.images, self.volumes)

    @classmethod
    def for_config(cls, config: Config, **host_options: object) -> Services:
        return cls(HostContext(config, **host_options))  # type: ignore[arg-type]

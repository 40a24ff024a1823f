"""``kvmc serve``: the Docker Engine API over kvmc's services.

The server holds what only a resident process can: the exec instances (kvmc/service/execs),
attaches made before their container starts (docker's create → attach → start), and one
watcher that turns changes of the container records into ``/events``. Everything else is a
call into kvmc/service, from a worker thread (the services block; the event loop must not).
The routers (kvmc/api/routes/) only translate HTTP into those calls and results into JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from aiohttp import web

from kvmc.api.http import make_app, ping_routes, run_server
from kvmc.service import Services
from kvmc.service.autopool import AutoPool, first_start, policy_of
from kvmc.state import ContainerRecord
from kvmc.service.events import Event, diff, snapshot

T = TypeVar("T")
WORKER_THREADS = 512
"""Attach, exec, logs and wait each hold a thread while they stream: the default pool (a few
threads on this 2-core host) would let six waiting ``docker run -d`` block the seventh."""
WATCH_INTERVAL_S = 0.25
REATTACH_EVERY = 8
"""Every this many watcher rounds (2 s), running containers whose monitor died get a new one."""
API_KEY = web.AppKey("kvmc_api", object)


@dataclasses.dataclass
class PendingAttach:
    """An attach to a container that has not started: it waits for ``start``."""

    started: asyncio.Future


class Api:
    """The server's state: the services, pending attaches, event subscribers."""

    def __init__(self, services: Services, log: Callable[[str], None]) -> None:
        self.services = services
        self.log = log
        self.pending: dict[str, list[PendingAttach]] = {}
        self.subscribers: set[asyncio.Queue[Event]] = set()
        self.pool = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="kvmc-api")
        self._watcher: asyncio.Task | None = None
        self._boot: asyncio.Task | None = None
        self.autopool: AutoPool | None = None
        """The automatic pools (kvmc/service/autopool.py), None when auto_pool_budget is 0."""

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking service call in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    # ------------------------------------------------------------------ events
    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10000)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.subscribers.discard(queue)

    def publish(self, event: Event) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.subscribers.discard(queue)  # a reader that stopped reading loses its stream

    async def _watch(self) -> None:
        """Diff the records a few times a second: every change, whoever made it, is an event.
        Also reaps the monitors this server started, and replaces those that died."""
        state = self.services.host.state
        before = snapshot(await self.call(state.list))
        rounds = 0
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            rounds += 1
            try:
                self.services.host.reap_children()
                if rounds % REATTACH_EVERY == 0:  # a monitor that died: its container goes on
                    for record in await self.call(self.services.containers.reattach_lost):
                        self.log(f"container {record.name}: its monitor died; a new one re-attached")
                after = snapshot(await self.call(state.list))
                for event in diff(before, after, state.tombstone_exit_code):
                    self.publish(event)
                before = after
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive a bad read
                self.log(f"event watcher: {exc}")

    async def on_startup(self, app: web.Application) -> None:
        self._watcher = asyncio.create_task(self._watch())
        self._boot = asyncio.create_task(self._start_by_policy())
        policy = policy_of(self.services.host)
        if policy.budget_mib > 0:
            self.autopool = AutoPool(self.services.host, policy, self.log)
            self.autopool.start()

    def started(self, record: ContainerRecord, error: BaseException | None = None) -> None:
        """A start through the API ended: a container's first (a run) is what the automatic
        pools learn from."""
        if self.autopool is not None and first_start(record):
            self.autopool.started(record, error)

    async def _start_by_policy(self) -> None:
        """As dockerd does when it starts: containers whose restart policy wants them running
        are started again (their VMs went down with the host or libvirtd). In the background:
        the API answers meanwhile."""
        try:
            reports = await self.call(self.services.system.boot)
        except Exception as exc:  # noqa: BLE001 - the server must serve even if this fails
            self.log(f"restart policies: {exc}")
            return
        for report in reports:
            self.log(f"restart policy: started {report.ref}" if report.ok
                     else f"restart policy: cannot start {report.ref}: {report.error}")

    async def on_cleanup(self, app: web.Application) -> None:
        for task in (self._watcher, self._boot):
            if task is not None:
                task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.autopool is not None:  # waits for a member being made, then removes the pool
            await asyncio.to_thread(self.autopool.stop)


def api_of(request: web.Request) -> Api:
    return request.app[API_KEY]  # type: ignore[return-value]


def build_app(services: Services, log: Callable[[str], None]) -> web.Application:
    """The aiohttp application: every router's routes, the shared Api state."""
    from kvmc.api.routes import containers, execs, images, networks, system, unsupported, volumes

    routes = [*ping_routes()]
    for module in (system, containers, execs, images, volumes, networks, unsupported):
        routes += module.ROUTES
    app = make_app(routes)
    api = Api(services, log)
    app[API_KEY] = api
    app.on_startup.append(api.on_startup)
    app.on_cleanup.append(api.on_cleanup)
    return app


def serve(services: Services, hosts: list[str], log: Callable[[str], None]) -> None:
    """Serve until SIGTERM/SIGINT; containers keep running after the server stops."""
    services.host.monitor_start = "exec"
    services.host.claim_auto_pools = True
    run_server(build_app(services, log), hosts, log)

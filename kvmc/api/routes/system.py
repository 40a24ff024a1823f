"""System: version, info, disk usage and events."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import time

from aiohttp import web

from kvmc.api import shapes
from kvmc.api.http import json_response, json_stream, until_client_gone, write_json_line
from kvmc.api.server import api_of
from kvmc.api.translate import parse_filters, parse_time
from kvmc.service.filters import match_labels
from kvmc.service.events import Event


def _kernel_release() -> str:
    return platform.release()


async def version(request: web.Request) -> web.Response:
    return json_response(shapes.version_json(_kernel_release()))


async def info(request: web.Request) -> web.Response:
    api = api_of(request)
    services = api.services
    records = await api.call(services.containers.list, True)
    images = await api.call(services.images.list)
    running = sum(r.state == "running" for r in records)
    facts = await api.call(services.system.info)
    return json_response(shapes.info_json(
        name=socket.gethostname(), ncpu=os.cpu_count() or 1,
        mem_total=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), kernel_release=_kernel_release(),
        operating_system=f"kvmc microVMs ({facts.accel})", containers=len(records), running=running,
        stopped=len(records) - running, images=len(images), root_dir=facts.data_dir,
        kvmc={"Accelerator": facts.accel, "AcceleratorReason": facts.accel_reason,
              "GuestKernel": facts.kernel_release, "Libvirt": facts.libvirt_uri},
    ))


async def system_df(request: web.Request) -> web.Response:
    api = api_of(request)
    services = api.services
    records = await api.call(services.containers.list, True)
    images = await api.call(services.images.list)
    volumes = await api.call(services.volumes.list)
    used = {r.image_id for r in records}
    return json_response({
        "LayersSize": sum(i.size for i in images),
        "Images": [{**shapes.image_summary(i), "Containers": sum(r.image_id == i.id for r in records)}
                   for i in images if i.id in used or True],
        "Containers": [shapes.container_summary(r) for r in records],
        "Volumes": [{**shapes.volume_json(v.volume, v.volume.path),
                     "UsageData": {"Size": v.usage_bytes, "RefCount": len(v.used_by)}} for v in volumes],
        "BuildCache": [],
    })


def _wanted(event: Event, filters: dict[str, list[str]]) -> bool:
    """docker's event filters: type, container (id or name), event (action), label, image."""
    if filters.get("type") and event.type not in filters["type"]:
        return False
    if filters.get("event") and event.action not in filters["event"]:
        return False
    if filters.get("container") and not any(
            c in (event.id, event.attributes.get("name")) or event.id.startswith(c) for c in filters["container"]):
        return False
    if filters.get("image") and event.attributes.get("image") not in filters["image"]:
        return False
    return not filters.get("label") or match_labels(event.attributes, filters["label"])


async def events(request: web.Request) -> web.StreamResponse:
    """A stream of container events until the client goes (or ``until`` passes)."""
    api = api_of(request)
    filters = parse_filters(request.query.get("filters"))
    until = parse_time(request.query.get("until")) if request.query.get("until") else None
    queue = api.subscribe()
    response = await json_stream(request)
    gone = asyncio.ensure_future(until_client_gone(request))
    try:
        while not gone.done():
            timeout = None if until is None else max(0.0, until - time.time())
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            event = getter.result()
            if _wanted(event, filters):
                await write_json_line(response, shapes.event_json(event.type, event.action, event.id,
                                                                  event.attributes, event.time_ns), end=b"\n")
    finally:
        gone.cancel()
        api.unsubscribe(queue)
    return response


ROUTES = [
    ("GET", "/version", version),
    ("GET", "/info", info),
    ("GET", "/system/df", system_df),
    ("GET", "/events", events),
]

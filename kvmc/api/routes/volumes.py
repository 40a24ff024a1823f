"""Named volumes: create, list, inspect, remove, prune."""

from __future__ import annotations

from aiohttp import web

from kvmc.api import shapes
from kvmc.api.http import ApiError, json_response, read_json
from kvmc.api.server import api_of
from kvmc.api.translate import parse_filters
from kvmc.service.filters import match_labels
from kvmc.errors import Conflict, VolumeNotFound
from kvmc.volumes import DEFAULT_SIZE, VOLUME_DRIVERS, parse_size


def _json(view) -> dict:  # noqa: ANN001 - kvmc.service.volumes.VolumeView
    return {**shapes.volume_json(view.volume, view.volume.path),
            "UsageData": {"Size": view.usage_bytes, "RefCount": len(view.used_by)}}


async def create(request: web.Request) -> web.Response:
    api = api_of(request)
    body = await read_json(request, {}) or {}
    name = body.get("Name") or ""
    if not name:
        import secrets

        name = secrets.token_hex(32)  # docker's anonymous volume
    driver = body.get("Driver") or "local"
    if driver not in ("local", *VOLUME_DRIVERS):
        raise ApiError(400, f'volume driver "{driver}" is not supported by kvmc '
                            f'(local, which is kvmc serve\'s volume_driver, or {", ".join(VOLUME_DRIVERS)})')
    opts = body.get("DriverOpts") or {}
    size = parse_size(str(opts["size"])) if opts.get("size") else DEFAULT_SIZE
    service = api.services.volumes
    try:
        await api.call(service.create, name, size, False, body.get("Labels") or {}, driver)
    except Conflict:
        pass  # docker: creating an existing volume returns it
    return json_response(_json(await api.call(service.get, name)), status=201)


async def list_volumes(request: web.Request) -> web.Response:
    api = api_of(request)
    filters = parse_filters(request.query.get("filters"))
    views = await api.call(api.services.volumes.list)
    if "name" in filters:
        views = [v for v in views if any(n in v.volume.name for n in filters["name"])]
    if "label" in filters:
        views = [v for v in views if match_labels(v.volume.labels, filters["label"])]
    if "dangling" in filters:
        dangling = filters["dangling"][0].lower() in ("1", "true")
        views = [v for v in views if (not v.used_by) == dangling]
    return json_response({"Volumes": [_json(v) for v in views], "Warnings": []})


async def inspect(request: web.Request) -> web.Response:
    api = api_of(request)
    name = request.match_info["name"]
    try:
        return json_response(_json(await api.call(api.services.volumes.get, name)))
    except VolumeNotFound:
        raise ApiError(404, f"get {name}: no such volume") from None


async def remove(request: web.Request) -> web.Response:
    api = api_of(request)
    name = request.match_info["name"]
    try:
        await api.call(api.services.volumes.remove, name)
    except VolumeNotFound:
        raise ApiError(404, f"get {name}: no such volume") from None
    return web.Response(status=204)


async def prune(request: web.Request) -> web.Response:
    api = api_of(request)
    removed = await api.call(api.services.volumes.prune)
    return json_response({"VolumesDeleted": removed, "SpaceReclaimed": 0})


ROUTES = [
    ("GET", "/volumes", list_volumes),
    ("POST", "/volumes/create", create),
    ("POST", "/volumes/prune", prune),
    ("GET", "/volumes/{name}", inspect),
    ("DELETE", "/volumes/{name}", remove),
]

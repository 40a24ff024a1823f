"""Networks: docker's user-defined bridge networks as kvmc networks (kvmc/service/networks.py):
create (with IPAM's subnet and gateway), list, inspect (with the containers on it), connect
and disconnect (created or stopped containers), delete (refused while containers are
attached: 409 naming them, as docker's "has active endpoints") and prune."""

from __future__ import annotations

from aiohttp import web

from kvmc.api.http import ApiError, json_response, read_json
from kvmc.api.server import api_of
from kvmc.api.translate import parse_filters
from kvmc.errors import NotFound
from kvmc.service.filters import match_labels
from kvmc.service.networks import NetworkView


def _json(view: NetworkView) -> dict:
    network = view.network
    ipam = ([{"Subnet": network.subnet, "Gateway": network.gateway}] if network.subnet else [])
    containers = {
        record.id: {"Name": record.name, "EndpointID": ep.network_id[:32] + record.id[:32],
                    "MacAddress": ep.mac if ep.address else "",
                    "IPv4Address": f"{ep.address}/{ep.prefix}" if ep.address else "", "IPv6Address": ""}
        for record, ep in view.containers}
    return {"Name": network.name, "Id": network.id, "Created": network.created, "Scope": "local",
            "Driver": network.driver, "EnableIPv4": True, "EnableIPv6": False,
            "IPAM": {"Driver": "default", "Options": None, "Config": ipam}, "Internal": network.internal,
            "Attachable": network.attachable, "Ingress": False, "ConfigFrom": {"Network": ""},
            "ConfigOnly": False, "Containers": containers, "Options": network.options, "Labels": network.labels}


async def _view(request: web.Request) -> NetworkView:
    api = api_of(request)
    ref = request.match_info["id"]
    try:
        return await api.call(api.services.networks.inspect, ref)
    except NotFound:
        raise ApiError(404, f"network {ref} not found") from None


async def list_networks(request: web.Request) -> web.Response:
    api = api_of(request)
    filters = parse_filters(request.query.get("filters"))
    views = await api.call(api.services.networks.views)
    if "name" in filters:
        views = [v for v in views if any(f in v.network.name for f in filters["name"])]
    if "id" in filters:
        views = [v for v in views if any(v.network.id.startswith(f) for f in filters["id"])]
    if "label" in filters:
        views = [v for v in views if match_labels(v.network.labels, filters["label"])]
    if "driver" in filters:
        views = [v for v in views if v.network.driver in filters["driver"]]
    if "type" in filters:
        views = [v for v in views if ("builtin" if v.network.builtin else "custom") in filters["type"]]
    if "dangling" in filters:
        want = filters["dangling"][0].lower() in ("1", "true")
        views = [v for v in views if not v.network.builtin and (not v.containers) == want]
    return json_response([_json(v) for v in views])


async def inspect(request: web.Request) -> web.Response:
    return json_response(_json(await _view(request)))


async def create(request: web.Request) -> web.Response:
    api = api_of(request)
    body = await read_json(request, {}) or {}
    config = ((body.get("IPAM") or {}).get("Config") or [{}])
    first = config[0] if isinstance(config, list) and config and isinstance(config[0], dict) else {}
    network = await api.call(api.services.networks.create, str(body.get("Name") or ""), body.get("Driver"),
                             body.get("Labels") or {}, bool(body.get("Internal")), bool(body.get("Attachable")),
                             body.get("Options") or {}, first.get("Subnet") or None, first.get("Gateway") or None)
    return json_response({"Id": network.id, "Warning": ""}, status=201)


async def remove(request: web.Request) -> web.Response:
    api = api_of(request)
    view = await _view(request)
    await api.call(api.services.networks.remove, view.network.id)
    return web.Response(status=204)


def _aliases(body: dict) -> list[str]:
    config = body.get("EndpointConfig") or {}
    return [str(a) for a in (config.get("Aliases") or []) if a] if isinstance(config, dict) else []


async def connect(request: web.Request) -> web.Response:
    """A created or stopped container gets one more NIC at its next start; a running one is
    refused (409): its VM cannot get a NIC while it runs."""
    api = api_of(request)
    view = await _view(request)
    body = await read_json(request, {}) or {}
    await api.call(api.services.networks.connect, view.network.id, str(body.get("Container") or ""), _aliases(body))
    return web.Response(status=200)


async def disconnect(request: web.Request) -> web.Response:
    api = api_of(request)
    view = await _view(request)
    body = await read_json(request, {}) or {}
    await api.call(api.services.networks.disconnect, view.network.id, str(body.get("Container") or ""),
                   bool(body.get("Force")))
    return web.Response(status=200)


async def prune(request: web.Request) -> web.Response:
    api = api_of(request)
    return json_response({"NetworksDeleted": await api.call(api.services.networks.prune)})


ROUTES = [
    ("GET", "/networks", list_networks),
    ("POST", "/networks/create", create),
    ("POST", "/networks/prune", prune),
    ("GET", "/networks/{id}", inspect),
    ("DELETE", "/networks/{id}", remove),
    ("POST", "/networks/{id}/connect", connect),
    ("POST", "/networks/{id}/disconnect", disconnect),
]

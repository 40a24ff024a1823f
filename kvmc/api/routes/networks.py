"""Networks: docker's network objects (a registry: kvmc/service/networks.py says what
containers on them get today)."""

from __future__ import annotations

from aiohttp import web

from kvmc.api.http import ApiError, json_response, read_json
from kvmc.api.server import api_of
from kvmc.api.translate import parse_filters
from kvmc.service.filters import match_labels
from kvmc.errors import NotFound
from kvmc.service.networks import Network


def _json(network: Network) -> dict:
    return {"Name": network.name, "Id": network.id, "Created": network.created, "Scope": "local",
            "Driver": network.driver, "EnableIPv4": True, "EnableIPv6": False,
            "IPAM": {"Driver": "default", "Options": None, "Config": []}, "Internal": network.internal,
            "Attachable": network.attachable, "Ingress": False, "ConfigFrom": {"Network": ""},
            "ConfigOnly": False, "Containers": {}, "Options": network.options, "Labels": network.labels}


async def _network(request: web.Request) -> Network:
    api = api_of(request)
    ref = request.match_info["id"]
    try:
        return await api.call(api.services.networks.get, ref)
    except NotFound:
        raise ApiError(404, f"network {ref} not found") from None


async def list_networks(request: web.Request) -> web.Response:
    api = api_of(request)
    filters = parse_filters(request.query.get("filters"))
    networks = await api.call(api.services.networks.list)
    if "name" in filters:
        networks = [n for n in networks if any(f in n.name for f in filters["name"])]
    if "id" in filters:
        networks = [n for n in networks if any(n.id.startswith(f) for f in filters["id"])]
    if "label" in filters:
        networks = [n for n in networks if match_labels(n.labels, filters["label"])]
    if "driver" in filters:
        networks = [n for n in networks if n.driver in filters["driver"]]
    return json_response([_json(n) for n in networks])


async def inspect(request: web.Request) -> web.Response:
    return json_response(_json(await _network(request)))


async def create(request: web.Request) -> web.Response:
    api = api_of(request)
    body = await read_json(request, {}) or {}
    network = await api.call(api.services.networks.create, str(body.get("Name") or ""), body.get("Driver"),
                             body.get("Labels") or {}, bool(body.get("Internal")), bool(body.get("Attachable")),
                             body.get("Options") or {})
    return json_response({"Id": network.id, "Warning": "kvmc networks do not connect containers to each other "
                                                       "yet: each container reaches the host and the outside"},
                         status=201)


async def remove(request: web.Request) -> web.Response:
    api = api_of(request)
    network = await _network(request)
    await api.call(api.services.networks.remove, network.id)
    return web.Response(status=204)


async def connect(request: web.Request) -> web.Response:
    """Accepted for a known network and container: every container has kvmc's one network."""
    api = api_of(request)
    await _network(request)
    body = await read_json(request, {}) or {}
    await api.call(api.services.containers.get, str(body.get("Container") or ""))
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
    ("POST", "/networks/{id}/disconnect", connect),
]

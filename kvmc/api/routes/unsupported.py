"""What kvmc does not implement: a clear 501 naming what to use instead (and the 404s
``docker inspect`` expects while it probes object kinds)."""

from __future__ import annotations

from aiohttp import web

from kvmc.api.http import ApiError, json_response

_INSTEAD = {
    "build": "kvmc does not build images: build with docker, podman or buildah elsewhere, then "
             "'docker load' the saved image here (or 'kvmc image import')",
    "swarm": "kvmc is a single-host engine: swarm, services, nodes, secrets and configs are not supported",
    "plugins": "kvmc has no plugins",
    "commit": "kvmc cannot commit a container: its disk is a VM disk, not layers",
    "search": "kvmc does not search registries: name the image to pull",
    "push": "kvmc does not push images: push from where the image was built",
    "session": "kvmc does not support BuildKit sessions",
}


def _refuse(what: str):  # noqa: ANN202 - an aiohttp handler
    async def handler(request: web.Request) -> web.Response:
        raise ApiError(501, _INSTEAD[what])

    return handler


async def no_plugin(request: web.Request) -> web.Response:
    raise ApiError(404, f"plugin {request.match_info['name']} not found")


async def no_plugins(request: web.Request) -> web.Response:
    return json_response([])


ROUTES = [
    ("POST", "/build", _refuse("build")),
    ("POST", "/build/prune", _refuse("build")),
    ("POST", "/session", _refuse("session")),
    ("POST", "/commit", _refuse("commit")),
    ("GET", "/images/search", _refuse("search")),
    ("POST", "/images/{name:.+}/push", _refuse("push")),
    ("GET", "/plugins", no_plugins),
    ("GET", "/plugins/{name:.+}/json", no_plugin),
    *[(method, f"/{kind}{suffix}", _refuse("swarm"))
      for kind in ("swarm", "services", "nodes", "secrets", "configs", "tasks")
      for method, suffix in (("GET", ""), ("GET", "/{rest:.*}"), ("POST", "/{rest:.*}"), ("DELETE", "/{rest:.*}"))],
]

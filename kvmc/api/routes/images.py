"""Images: list, inspect, pull (images/create), load, tag, remove, history, prune."""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
import tempfile
from pathlib import Path

from aiohttp import web

from kvmc.api import shapes
from kvmc.api.bridge import ResponseOutput
from kvmc.api.http import ApiError, bool_param, json_response, json_stream, write_json_line
from kvmc.api.server import Api, api_of
from kvmc.api.translate import normalize_image_ref, parse_filters, pull_ref
from kvmc.errors import ImageNotFound, KvmcError
from kvmc.images import Image

LOAD_CHUNK = 1 << 20


async def _image(api: Api, ref: str) -> Image:
    try:
        return await api.call(api.services.images.get, ref)
    except ImageNotFound:
        raise ApiError(404, f"No such image: {normalize_image_ref(ref)}") from None


async def list_images(request: web.Request) -> web.Response:
    api = api_of(request)
    filters = parse_filters(request.query.get("filters"))
    images = await api.call(api.services.images.list)
    if "dangling" in filters:
        dangling = filters["dangling"][0].lower() in ("1", "true")
        images = [i for i in images if (not i.tags) == dangling]
    if "reference" in filters:
        wanted = {normalize_image_ref(r) for r in filters["reference"]}
        images = [i for i in images if wanted & {normalize_image_ref(t) for t in i.tags}]
    return json_response([shapes.image_summary(i) for i in images])


async def inspect(request: web.Request) -> web.Response:
    api = api_of(request)
    return json_response(shapes.image_inspect(await _image(api, request.match_info["name"])))


async def history(request: web.Request) -> web.Response:
    api = api_of(request)
    image = await _image(api, request.match_info["name"])
    summary = shapes.image_summary(image)
    return json_response([{"Id": summary["Id"], "Created": summary["Created"], "CreatedBy": "", "Tags": image.tags,
                           "Size": image.size, "Comment": "imported by kvmc"}])


async def create(request: web.Request) -> web.StreamResponse:
    """``docker pull``: skopeo copies the image from its registry; progress as docker's JSON
    lines. A pull that fails before anything was written answers with a plain error."""
    api = api_of(request)
    if request.query.get("fromSrc"):
        raise ApiError(501, "kvmc does not import root filesystem tarballs (docker import): "
                            "use docker load with a docker-save tarball, or kvmc image import")
    source = request.query.get("fromImage", "")
    if not source:
        raise ApiError(400, "fromImage is required")
    ref = pull_ref(source, request.query.get("tag"))
    try:
        image = await api.call(api.services.images.pull, ref)
    except KvmcError as exc:
        text = str(exc)
        missing = any(w in text.lower() for w in ("not found", "unknown", "manifest unknown", "no such host",
                                                   "connection refused", "name unknown", "does not exist"))
        if missing:
            raise ApiError(404, f"pull access denied for {normalize_image_ref(ref).rsplit(':', 1)[0]}, repository "
                                f"does not exist or may require 'docker login': {text}") from None
        raise
    response = await json_stream(request)
    name = normalize_image_ref(ref)
    await write_json_line(response, {"status": f"Pulling from {name.rsplit(':', 1)[0]}",
                                     "id": name.rsplit(":", 1)[-1]})
    for layer in image.layers:
        short = layer.removeprefix("sha256:")[:12]
        await write_json_line(response, {"status": "Pull complete", "progressDetail": {}, "id": short})
    await write_json_line(response, {"status": f"Digest: sha256:{image.id}"})
    await write_json_line(response, {"status": f"Status: Downloaded newer image for {name}"})
    await response.write_eof()
    return response


def _archive_names(path: Path) -> list[str]:
    """The names a docker-save tarball records (manifest.json ``RepoTags``), in the store's form."""
    try:
        with tarfile.open(path, "r:*") as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.load(member) if member is not None else []
    except (tarfile.TarError, KeyError, OSError, EOFError, ValueError):
        return []
    names = []
    for entry in manifest if isinstance(manifest, list) else []:
        for tag in (entry.get("RepoTags") or []) if isinstance(entry, dict) else []:
            try:
                names.append(normalize_image_ref(str(tag)))
            except ValueError:
                continue
    return names


async def load(request: web.Request) -> web.StreamResponse:
    """``docker load``: the body (a docker-save tarball, any size) is streamed to a file first."""
    api = api_of(request)
    fd, name = tempfile.mkstemp(prefix="kvmc-load-", suffix=".tar")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await request.content.read(LOAD_CHUNK):
                out.write(chunk)
        image = await api.call(api.services.images.import_path, path, None)
        # The names this archive gave the image, not the image's other tags: loading an image
        # that is already here under another name must say what was loaded (docker does).
        loaded = [n for n in await api.call(_archive_names, path) if n in image.tags]
    finally:
        path.unlink(missing_ok=True)
    response = await json_stream(request)
    if not bool_param(request, "quiet"):
        await write_json_line(response, {"status": "Loading layer", "progressDetail": {}, "id": image.id[:12]})
    for name in loaded:
        await write_json_line(response, {"stream": f"Loaded image: {name}\n"})
    if not loaded:
        await write_json_line(response, {"stream": f"Loaded image ID: sha256:{image.id}\n"})
    await response.write_eof()
    return response


async def tag(request: web.Request) -> web.Response:
    api = api_of(request)
    image = await _image(api, request.match_info["name"])
    repo = request.query.get("repo", "")
    if not repo:
        raise ApiError(400, "repository name (repo) is required")
    new_name = f"{repo}:{request.query['tag']}" if request.query.get("tag") else repo
    await api.call(api.services.images.tag, image.id, normalize_image_ref(new_name))
    return web.Response(status=201)


async def remove(request: web.Request) -> web.Response:
    api = api_of(request)
    ref = request.match_info["name"]
    await _image(api, ref)
    result = await api.call(api.services.images.remove, ref, bool_param(request, "force"))
    items = [{"Untagged": t} for t in result.untagged]
    if result.deleted:
        items.append({"Deleted": shapes.sha256_id(result.deleted)})
    return json_response(items)


async def prune(request: web.Request) -> web.Response:
    api = api_of(request)
    filters = parse_filters(request.query.get("filters"))
    dangling_only = filters.get("dangling", ["true"])[0].lower() in ("1", "true")
    deleted = await api.call(api.services.images.prune, not dangling_only)
    return json_response({"ImagesDeleted": [{"Deleted": shapes.sha256_id(i)} for i in deleted] or None,
                          "SpaceReclaimed": 0})


async def save(request: web.Request) -> web.StreamResponse:
    """``docker save``: ``/images/{name}/get`` or ``/images/get?names=a&names=b``."""
    api = api_of(request)
    refs = [request.match_info["name"]] if "name" in request.match_info else request.query.getall("names", [])
    if not refs:
        raise ApiError(400, "no image names given")
    for ref in refs:
        await _image(api, ref)  # 404 "No such image" before the stream starts
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    await response.prepare(request)
    out = ResponseOutput(asyncio.get_running_loop(), response)
    await api.call(api.services.images.save, refs, out)
    await response.write_eof()
    return response


ROUTES = [
    ("GET", "/images/json", list_images),
    ("POST", "/images/create", create),
    ("POST", "/images/load", load),
    ("POST", "/images/prune", prune),
    ("GET", "/images/get", save),
    ("GET", "/images/{name:.+}/json", inspect),
    ("GET", "/images/{name:.+}/history", history),
    ("GET", "/images/{name:.+}/get", save),
    ("POST", "/images/{name:.+}/tag", tag),
    ("DELETE", "/images/{name:.+}", remove),
]

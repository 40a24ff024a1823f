"""Containers: create, list, inspect, start, stop, kill, wait, attach, logs, rm and the rest.

Each handler translates docker's request into one kvmc/service call and its result into
docker's JSON (kvmc/api/translate.py and shapes.py hold the translations).
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

from aiohttp import web

from kvmc.api import shapes
from kvmc.api.bridge import STDERR, STDOUT, ResponseOutput, Sink, StreamInput, StreamOutput
from kvmc.api.http import (ApiError, bool_param, early_headers, end_json, hijack, int_param, json_response,
                           read_json, until_client_gone)
from kvmc.api.server import Api, PendingAttach, api_of
from kvmc.api.translate import (create_options, normalize_image_ref, parse_filters,
                                path_stat_header, run_options)
from kvmc.detach import parse_detach_keys
from kvmc.errors import ContainerRunning, ImageNotFound, KvmcError
from kvmc.state import ContainerRecord, State

STREAM_TYPES = {"stdout": STDOUT, "stderr": STDERR}


# ----------------------------------------------------------------- helpers
def _inspect_json(api: Api, record: ContainerRecord) -> dict:
    return api.services.containers.inspect_record(record)


async def _record(request: web.Request) -> ContainerRecord:
    api = api_of(request)
    return await api.call(api.services.containers.get, request.match_info["id"])


# ------------------------------------------------------------------ create
async def create(request: web.Request) -> web.Response:
    api = api_of(request)
    req = create_options(await read_json(request, {}), request.query.get("name"))
    services = api.services
    warnings: list[str] = []
    try:
        record = await api.call(services.containers.create, run_options(req))
    except ImageNotFound:
        raise ApiError(404, f"No such image: {normalize_image_ref(req.image)}") from None
    return json_response({"Id": record.id, "Warnings": warnings}, status=201)


# ------------------------------------------------------------------- reads
async def list_containers(request: web.Request) -> web.Response:
    api = api_of(request)
    filters = parse_filters(request.query.get("filters"))
    records = await api.call(api.services.containers.list, bool_param(request, "all"), filters)
    limit = int_param(request, "limit")
    if limit and limit > 0:
        records = records[:limit]
    now = time.time()
    hv = api.services.engine.hv
    states = await api.call(lambda: {r.id: hv.state(r.domain) for r in records if r.state == State.RUNNING})
    items = [shapes.container_summary(r, now=now, vm_state=states.get(r.id)) for r in records]
    if bool_param(request, "size"):  # docker ps -s: what each wrote, and that with its image
        sizes = await api.call(lambda: [api.services.containers.size(r) for r in records])
        for item, (written, total) in zip(items, sizes):
            item.update(SizeRw=written, SizeRootFs=total)
    return json_response(items)


async def inspect(request: web.Request) -> web.Response:
    api = api_of(request)
    record = await _record(request)
    return json_response(await api.call(_inspect_json, api, record))


# ---------------------------------------------------------------- lifecycle
async def start(request: web.Request) -> web.Response:
    """Start; attaches made before (docker run's order) get the process's first output."""
    api = api_of(request)
    record = await _record(request)
    if record.is_live:
        return web.Response(status=304)
    try:
        await _start(api, record)
    except Exception as exc:
        api.started(record, exc)
        raise
    api.started(record)
    return web.Response(status=204)


async def _start(api: Api, record: ContainerRecord) -> None:
    pending = api.pending.pop(record.id, [])
    service = api.services.containers
    if not pending:
        await api.call(service.start, record.id)
        return
    try:
        started = await api.call(service.start, record.id, wait_attach=True)
    except BaseException as exc:
        for attach in pending:
            if not attach.started.done():
                attach.started.set_exception(exc if isinstance(exc, Exception) else KvmcError("start failed"))
        raise
    for attach in pending:
        if not attach.started.done():
            attach.started.set_result(started)
    await api.call(api.services.engine.wait_started, started)  # raises 125/126/127 failures


async def stop(request: web.Request) -> web.Response:
    api = api_of(request)
    _, was_running = await api.call(api.services.containers.stop, request.match_info["id"], int_param(request, "t"),
                                    request.query.get("signal") or None)
    return web.Response(status=204 if was_running else 304)


async def restart(request: web.Request) -> web.Response:
    api = api_of(request)
    await api.call(api.services.containers.restart, request.match_info["id"], int_param(request, "t"))
    return web.Response(status=204)


async def kill(request: web.Request) -> web.Response:
    api = api_of(request)
    await api.call(api.services.containers.kill, request.match_info["id"], request.query.get("signal") or None)
    return web.Response(status=204)


async def pause(request: web.Request) -> web.Response:
    api = api_of(request)
    await api.call(api.services.containers.pause, request.match_info["id"])
    return web.Response(status=204)


async def unpause(request: web.Request) -> web.Response:
    api = api_of(request)
    await api.call(api.services.containers.unpause, request.match_info["id"])
    return web.Response(status=204)


async def remove(request: web.Request) -> web.Response:
    api = api_of(request)
    ref = request.match_info["id"]
    try:
        await api.call(api.services.containers.remove, ref, bool_param(request, "force"))
    except ContainerRunning:
        record = await _record(request)
        raise ApiError(409, f'cannot remove container "/{record.name}": container is running: stop the '
                            "container before removing or force remove") from None
    return web.Response(status=204)


async def rename(request: web.Request) -> web.Response:
    api = api_of(request)
    name = request.query.get("name", "").lstrip("/")
    await api.call(api.services.containers.rename, request.match_info["id"], name)
    return web.Response(status=204)


async def prune(request: web.Request) -> web.Response:
    api = api_of(request)
    removed = await api.call(api.services.containers.prune)
    return json_response({"ContainersDeleted": [r.id for r in removed], "SpaceReclaimed": 0})


async def resize(request: web.Request) -> web.Response:
    """The TTY's window size (``h`` rows, ``w`` columns): RESIZE to the agent, SIGWINCH in
    the guest. A container without a TTY accepts it and nothing happens (as dockerd)."""
    api = api_of(request)
    rows, cols = int_param(request, "h") or 0, int_param(request, "w") or 0
    await api.call(api.services.containers.resize, request.match_info["id"], rows, cols)
    return web.Response(status=200)


# -------------------------------------------------------------------- wait
async def wait(request: web.Request) -> web.StreamResponse:
    """Headers at once (the CLI starts the container only after them), the body at the end."""
    api = api_of(request)
    condition = request.query.get("condition") or "not-running"
    record = await _record(request)
    response = await early_headers(request)
    gone = threading.Event()
    watcher = asyncio.ensure_future(until_client_gone(request))
    watcher.add_done_callback(lambda _: gone.set())
    try:
        code = await api.call(api.services.containers.wait, record.id, condition, gone.is_set)
    except KvmcError as exc:
        await end_json(response, shapes.wait_json(125, str(exc)))
        return response
    finally:
        watcher.cancel()
    if code is not None:
        current = api.services.engine.state.load(record.id)
        error = current.error if current is not None and current.exit_code in (125, 126, 127) else None
        await end_json(response, shapes.wait_json(code, error))
    return response


# ------------------------------------------------------------------ attach
async def _relay(api: Api, record: ContainerRecord, stdin: io.RawIOBase | None, out: io.RawIOBase,
                 err: io.RawIOBase, just_started: bool, detach_keys: str | None) -> None:
    """The engine's relay (the CLI's) in a worker thread; detach keys end it for a TTY."""
    service = api.services.containers
    if just_started:
        await api.call(service.attach_started, record, stdin, out, err, detach_keys)
    else:
        await api.call(service.attach, record.id, stdin, out, err, None, None, detach_keys)


async def attach(request: web.Request) -> web.StreamResponse:
    api = api_of(request)
    record = await _record(request)
    detach_keys = request.query.get("detachKeys") or None
    if detach_keys:
        parse_detach_keys(detach_keys)  # a 400 before the upgrade, as dockerd
    loop = asyncio.get_running_loop()
    stream = await hijack(request, tty=record.tty)
    want = {name: bool_param(request, name) for name in ("stdin", "stdout", "stderr")}
    out = StreamOutput(loop, stream, STDOUT) if want["stdout"] else Sink()
    err = StreamOutput(loop, stream, STDERR if not record.tty else STDOUT) if want["stderr"] else Sink()
    stdin = StreamInput(loop, stream) if want["stdin"] and record.open_stdin else None
    try:
        if bool_param(request, "logs"):
            for entry in await api.call(lambda: list(api.services.containers.logs(record.id))):
                if want.get(entry.stream):  # the stored log first (docker's logs=1)
                    await stream.write_frame(STREAM_TYPES[entry.stream] if not record.tty else STDOUT, entry.data)
        if record.is_live:
            await _relay(api, record, stdin, out, err, False, detach_keys)
        elif bool_param(request, "stream", True):
            waiter = PendingAttach(loop.create_future())
            api.pending.setdefault(record.id, []).append(waiter)
            started = await waiter.started
            await _relay(api, started, stdin, out, err, True, detach_keys)
    except KvmcError as exc:
        if not stream.closed and record.tty is False:
            await stream.write_frame(STDERR, f"{exc}\n".encode())
    finally:
        pending = api.pending.get(record.id)
        if pending is not None:
            api.pending[record.id] = [p for p in pending if not p.started.done()]
        await stream.close()
    return stream.response


# -------------------------------------------------------------------- logs
async def logs(request: web.Request) -> web.StreamResponse:
    api = api_of(request)
    record = await _record(request)
    tail = request.query.get("tail", "all")
    tail_n = None if tail in ("all", "") else int(tail) if tail.lstrip("-").isdigit() else None
    if tail_n is not None and tail_n < 0:
        tail_n = None
    follow = bool_param(request, "follow")
    streams = {s for s in ("stdout", "stderr") if bool_param(request, s)}
    timestamps = bool_param(request, "timestamps")
    # Checked before the answer starts: a bad since/until is a 400, not a broken stream.
    entries = await api.call(lambda: api.services.containers.logs(
        record.id, tail=tail_n, follow=follow, since=request.query.get("since"), until=request.query.get("until")))
    content_type = "application/vnd.docker.raw-stream" if record.tty else "application/vnd.docker.multiplexed-stream"
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    gone = asyncio.ensure_future(until_client_gone(request))
    done = object()
    try:
        while not gone.done():
            entry = await api.call(next, entries, done)
            if entry is done:
                break
            if entry.stream not in streams:
                continue
            data = entry.data
            if timestamps:
                data = f"{entry.time} ".encode() + data
            if record.tty:
                await response.write(data)
            else:
                stream_id = STREAM_TYPES[entry.stream]
                await response.write(bytes([stream_id, 0, 0, 0]) + len(data).to_bytes(4, "big") + data)
    except ConnectionError:
        pass
    finally:
        gone.cancel()
        entries.close()
    await response.write_eof()
    return response


# ------------------------------------------------------------------ stats
async def stats(request: web.Request) -> web.StreamResponse:
    """The VM's stats JSON (views.container_stats), one sample (``stream=0``) or one a second."""
    api = api_of(request)
    ref = request.match_info["id"]
    stream = bool_param(request, "stream", True) and not bool_param(request, "one-shot")
    record, sample = await api.call(api.services.containers.stats, ref)
    read_at = time.time()
    if not stream:
        previous, previous_at = sample, read_at
        await asyncio.sleep(0.5)  # the CLI computes CPU % from two samples
        record, sample = await api.call(api.services.containers.stats, ref)
        return json_response(shapes.container_stats(record, sample, previous, time.time(), previous_at))
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    previous, previous_at = None, None
    try:
        while True:
            body = shapes.container_stats(record, sample, previous, read_at, previous_at)
            await response.write(json.dumps(body).encode() + b"\n")
            previous, previous_at = sample, read_at
            await asyncio.sleep(1.0)
            record, sample = await api.call(api.services.containers.stats, ref)
            read_at = time.time()
    except (ConnectionError, KvmcError):
        pass
    return response


# -------------------------------------------------------------------- top
async def top(request: web.Request) -> web.Response:
    """``ps`` inside the guest (ContainerService.top); ``ps_args`` are passed to it."""
    api = api_of(request)
    ps_args = request.query.get("ps_args", "").split()
    titles, processes = await api.call(api.services.containers.top, request.match_info["id"], ps_args)
    return json_response({"Titles": titles, "Processes": processes})


# ----------------------------------------------------------------- archive
async def archive_head(request: web.Request) -> web.Response:
    api = api_of(request)
    found = await api.call(api.services.files.stat, request.match_info["id"], request.query.get("path", "/"))
    header = path_stat_header(found.name, found.size, found.mode, found.mtime, found.link_target)
    return web.Response(status=200, headers={"X-Docker-Container-Path-Stat": header})


async def archive_get(request: web.Request) -> web.StreamResponse:
    api = api_of(request)
    ref, path = request.match_info["id"], request.query.get("path", "/")
    found = await api.call(api.services.files.stat, ref, path)
    header = path_stat_header(found.name, found.size, found.mode, found.mtime, found.link_target)
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar",
                                           "X-Docker-Container-Path-Stat": header})
    await response.prepare(request)
    out = ResponseOutput(asyncio.get_running_loop(), response)
    await api.call(api.services.files.copy_out, ref, path, out)
    await response.write_eof()
    return response


async def archive_put(request: web.Request) -> web.Response:
    api = api_of(request)
    ref, path = request.match_info["id"], request.query.get("path", "/")
    loop = asyncio.get_running_loop()

    class In(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def read1(self, size: int = 65536) -> bytes:
            return asyncio.run_coroutine_threadsafe(request.content.read(size if size > 0 else 65536), loop).result()

        read = read1  # type: ignore[assignment]

    await api.call(api.services.files.copy_in, ref, path, In())
    return web.Response(status=200)


async def not_implemented(request: web.Request) -> web.Response:
    raise ApiError(501, "kvmc does not implement this for containers yet (a container is a VM: "
                        "changes and export need the guest's disk, which kvmc does not read on the host)")


ROUTES = [
    ("POST", "/containers/create", create),
    ("GET", "/containers/json", list_containers),
    ("POST", "/containers/prune", prune),
    ("GET", "/containers/{id}/json", inspect),
    ("POST", "/containers/{id}/start", start),
    ("POST", "/containers/{id}/stop", stop),
    ("POST", "/containers/{id}/restart", restart),
    ("POST", "/containers/{id}/kill", kill),
    ("POST", "/containers/{id}/pause", pause),
    ("POST", "/containers/{id}/unpause", unpause),
    ("POST", "/containers/{id}/wait", wait),
    ("POST", "/containers/{id}/attach", attach),
    ("GET", "/containers/{id}/logs", logs),
    ("DELETE", "/containers/{id}", remove),
    ("POST", "/containers/{id}/rename", rename),
    ("POST", "/containers/{id}/resize", resize),
    ("GET", "/containers/{id}/stats", stats),
    ("GET", "/containers/{id}/top", top),
    ("HEAD", "/containers/{id}/archive", archive_head),
    ("GET", "/containers/{id}/archive", archive_get),
    ("PUT", "/containers/{id}/archive", archive_put),
    ("GET", "/containers/{id}/changes", not_implemented),
    ("GET", "/containers/{id}/export", not_implemented),
    ("POST", "/containers/{id}/update", not_implemented),
]

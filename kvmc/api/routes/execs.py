"""Exec instances: create in a running container, start on a hijacked stream, inspect."""

from __future__ import annotations

import asyncio

from aiohttp import web

from kvmc.api import shapes
from kvmc.api.bridge import STDERR, STDOUT, Sink, StreamInput, StreamOutput
from kvmc.api.http import hijack, int_param, json_response, read_json
from kvmc.api.server import api_of
from kvmc.api.translate import InvalidRequest, console_size
from kvmc.errors import KvmcError
from kvmc.process import ProcessOptions


async def create(request: web.Request) -> web.Response:
    api = api_of(request)
    body = await read_json(request, {})
    if not isinstance(body, dict):
        raise InvalidRequest("exec config must be a JSON object")
    cmd = body.get("Cmd") or []
    if isinstance(cmd, str):
        cmd = [cmd]
    user = body.get("User")
    options = ProcessOptions(command=[str(c) for c in cmd], env=[str(e) for e in body.get("Env") or []],
                             workdir=body.get("WorkingDir") or None, user=str(user) if user not in (None, "") else None,
                             interactive=bool(body.get("AttachStdin")))
    instance = await api.call(api.services.execs.create, request.match_info["id"], options, bool(body.get("Tty")),
                              body.get("AttachStdout", True) is not False, body.get("AttachStderr", True) is not False,
                              console_size(body.get("ConsoleSize")), body.get("DetachKeys") or None,
                              bool(body.get("Privileged")))
    return json_response({"Id": instance.id}, status=201)


async def start(request: web.Request) -> web.StreamResponse:
    """Run the exec, relaying its stdio; its exit code is recorded before the stream closes
    (``docker exec`` reads it from ``GET /exec/{id}/json`` right after)."""
    api = api_of(request)
    body = await read_json(request, {}) or {}
    execs = api.services.execs
    instance = await api.call(execs.get, request.match_info["id"])
    size = console_size(body.get("ConsoleSize"))
    if body.get("Detach"):
        asyncio.ensure_future(api.call(execs.start, instance.id, None, Sink(), Sink(), size))
        return web.Response(status=200)
    loop = asyncio.get_running_loop()
    stream = await hijack(request, tty=instance.tty)
    out = StreamOutput(loop, stream, STDOUT) if instance.attach_stdout else Sink()
    err = StreamOutput(loop, stream, STDOUT if instance.tty else STDERR) if instance.attach_stderr else Sink()
    stdin = StreamInput(loop, stream) if instance.options.interactive else None
    try:
        await api.call(execs.start, instance.id, stdin, out, err, size)
    except KvmcError as exc:
        await stream.write_frame(STDOUT if instance.tty else STDERR, f"{exc}\n".encode())
    finally:
        await stream.close()
    return stream.response


async def inspect(request: web.Request) -> web.Response:
    api = api_of(request)
    instance = await api.call(api.services.execs.get, request.match_info["id"])
    return json_response(shapes.exec_json(
        instance.id, instance.container_id, running=instance.running, exit_code=instance.exit_code,
        tty=instance.tty, args=instance.options.command, user=instance.options.user or "",
        open_stdin=instance.options.interactive, open_stdout=instance.attach_stdout,
        open_stderr=instance.attach_stderr, privileged=instance.privileged))


async def resize(request: web.Request) -> web.Response:
    """The exec's TTY window size (``h`` rows, ``w`` columns), as for containers."""
    api = api_of(request)
    rows, cols = int_param(request, "h") or 0, int_param(request, "w") or 0
    await api.call(api.services.execs.resize, request.match_info["id"], rows, cols)
    return web.Response(status=201)


ROUTES = [
    ("POST", "/containers/{id}/exec", create),
    ("POST", "/exec/{id}/start", start),
    ("GET", "/exec/{id}/json", inspect),
    ("POST", "/exec/{id}/resize", resize),
]

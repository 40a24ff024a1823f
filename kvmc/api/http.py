"""HTTP plumbing for ``kvmc serve``: what every Docker Engine API route needs, on aiohttp.

The research behind each choice is in the Docker Engine API research notes (docker-api.md,
cited as "notes §N").
In short, docker's clients are strict about a few things that aiohttp does differently:

- Errors must be ``{"message": ...}`` with ``Content-Type`` exactly ``application/json``: the
  Go client compares the whole header, and aiohttp's ``json_response`` appends a charset
  (notes §4). :func:`json_response` and the error middleware get it right.
- Every route exists unversioned and under ``/v1.24`` … ``/v1.50``; other versions get
  moby's 400 (notes §1).
- ``/wait`` must flush its headers before the body is known, or ``docker run`` deadlocks
  (notes §3.2): :func:`early_headers`.
- Attach and exec take over the connection after ``101 UPGRADED`` and the client half-closes
  its side at once when it has no stdin; aiohttp would then close the whole connection and
  lose all output (notes §6, §7.1). :func:`hijack` handles that; see :class:`_ConnectionTap`.

Disconnects: the server runs with aiohttp's default ``handler_cancellation=False``, so a
client that goes away never cancels a handler half-way through a state change (``docker run
-d`` drops its ``/wait`` at once, a ^C'd ``docker rm`` must still remove). Handlers that
only wait (``/wait``, ``logs -f``, ``/events``) race their work against
:func:`until_client_gone` instead, which also fires when the server is stopping.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import aiohttp
from aiohttp import web

from kvmc import __version__ as KVMC_VERSION
from kvmc.api import API_VERSION, ENGINE_VERSION, MIN_API_VERSION
from kvmc.errors import KvmcError
from kvmc.network import is_loopback_host

# The hijack below relies on how aiohttp 3.14.5 writes a 101 response (no chunk framing, the
# connection left to the handler), on ``request.protocol`` being the transport's protocol
# and on the private ``_message_tail`` buffer (bytes that followed the upgrade request).
# Those are not promises of aiohttp's API: a different version must be re-checked against
# tests/unit/test_api_http.py (the half-close test) before this pin moves.
_AIOHTTP_TESTED = "3.14.5"
if aiohttp.__version__ != _AIOHTTP_TESTED:  # pragma: no cover - guarded by the dependency pin
    raise ImportError(
        f"kvmc.api.http is tested with aiohttp {_AIOHTTP_TESTED}, found {aiohttp.__version__}: "
        "its attach/exec hijack uses aiohttp internals; rerun tests/unit/test_api_http.py and update the pin"
    )

MULTIPLEXED_SINCE = (1, 42)
"""Before API 1.42 moby labelled even multiplexed attach streams ``raw-stream``."""
SERVER_HEADER = f"Docker/{ENGINE_VERSION} (linux) kvmc/{KVMC_VERSION}"
DEFAULT_TCP_PORT = 2375
SHUTDOWN_GRACE_S = 3.0
"""How long a stop waits for running handlers before cancelling them (streams never end)."""
STDIN_BUFFER_LIMIT = 1 << 20
"""Hijacked stdin buffered beyond this pauses reading from the client (back-pressure)."""

JSON = "application/json"
RAW_STREAM = "application/vnd.docker.raw-stream"
MULTIPLEXED_STREAM = "application/vnd.docker.multiplexed-stream"

STDIN, STDOUT, STDERR, SYSTEMERR = 0, 1, 2, 3
"""Stream ids of docker's multiplexed framing (moby pkg/stdcopy)."""
_FRAME_HEADER = struct.Struct(">BxxxI")

STOPPING = web.AppKey("kvmc_stopping", asyncio.Event)
"""Set when the server begins to stop: long-lived streams should end."""
_PREPARED = web.RequestKey("kvmc_prepared_response", web.StreamResponse)
_API_VERSION_KEY = web.RequestKey("kvmc_api_version", str)

log = logging.getLogger("kvmc.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


# ---------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """Raised by handlers for a response with this status and ``{"message": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(ConnectionResetError):
    """The client disconnected; nobody is left to answer (the middleware just closes)."""


class ServeError(KvmcError):
    """``kvmc serve`` cannot listen where it was asked to."""


KIND_STATUS = {
    "not_found": 404,
    "conflict": 409,
    "invalid": 400,
    "unavailable": 503,
    "guest": 500,
    "not_implemented": 501,
    "not_modified": 304,
}
"""kvmc errors carry a ``kind`` class attribute (kvmc/errors.py); this is its HTTP status, as
moby's errdefs map them. Anything else, ``internal`` included, is a 500."""


def status_for(exc: BaseException) -> int:
    """The HTTP status an exception raised by a handler becomes (500 when unknown)."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, web.HTTPException):
        return exc.status
    return KIND_STATUS.get(getattr(exc, "kind", None), 500)


def _message_for(exc: BaseException, status: int) -> str:
    if isinstance(exc, web.HTTPException):
        return {404: "page not found", 405: "method not allowed"}.get(status, exc.reason)
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------- responses

def _dumps(obj: Any) -> bytes:
    """Compact JSON with moby's trailing newline (Go's json.Encoder writes one)."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def json_response(obj: Any, status: int = 200) -> web.Response:
    """A JSON response whose Content-Type is exactly ``application/json`` (no charset)."""
    if status == 304 or status == 204:
        return web.Response(status=status)
    return web.Response(status=status, body=_dumps(obj), headers={"Content-Type": JSON})


def error_response(status: int, message: str) -> web.Response:
    """Docker's error body; 304 (already stopped, already started) has none."""
    return json_response({"message": message}, status)


async def read_json(request: web.Request, default: Any = None) -> Any:
    """The request body as JSON (``default`` when empty); 400 when it is not JSON."""
    raw = await request.read()
    if not raw.strip():
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None


# ---------------------------------------------------------------------------------- versions

def parse_version(text: str) -> tuple[int, ...]:
    """``"1.50"`` -> ``(1, 50)``: API versions compare as numbers per dot-separated part."""
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        raise ApiError(400, f"invalid API version {text!r}") from None


def api_version(request: web.Request) -> str:
    """The API version the client asked for (its ``/vX.Y`` prefix, else the default)."""
    return request.get(_API_VERSION_KEY) or request.match_info.get("version") or API_VERSION


def _check_version(text: str) -> web.Response | None:
    """moby's version middleware: a response refusing ``text``, or None when it is served."""
    version = parse_version(text)
    if version > parse_version(API_VERSION):
        return error_response(400, f"client version {text} is too new. "
                                   f"Maximum supported API version is {API_VERSION}")
    if version < parse_version(MIN_API_VERSION):
        message = (f"client version {text} is too old. Minimum supported API version is "
                   f"{MIN_API_VERSION}, please upgrade your client to a newer version")
        # Clients that old do not parse JSON errors; moby answers them in plain text.
        return web.Response(status=400, text=message + "\n")
    return None


# ---------------------------------------------------------------------------------- the app

@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse unsupported versions and turn every exception into a Docker JSON error."""
    try:
        version = request.match_info.get("version")
        if version is not None:
            refusal = _check_version(version)
            if refusal is not None:
                return refusal
            request[_API_VERSION_KEY] = version
        return await handler(request)
    except Exception as exc:  # noqa: BLE001 - every failure must become an HTTP answer
        return _answer_failure(request, exc)


def _answer_failure(request: web.Request, exc: Exception) -> web.StreamResponse:
    prepared = request.get(_PREPARED)
    if prepared is not None or isinstance(exc, ConnectionError):
        # Headers (or a 101) are out, or the client is gone: no error can be sent any more.
        # Closing the connection tells a streaming client the body ended badly; returning
        # the prepared response keeps aiohttp from writing a second one.
        if not isinstance(exc, ConnectionError):
            log.error("%s %s failed after its response started", request.method, request.path,
                      exc_info=exc)
        transport = request.transport
        if transport is not None:
            transport.close()
        return prepared if prepared is not None else web.Response(status=499)
    status = status_for(exc)
    if status >= 500 and not isinstance(exc, (ApiError, web.HTTPException)):
        # A kvmc error explains itself; anything else is a bug and needs its traceback.
        log.error("%s %s: %s", request.method, request.path, exc,
                  exc_info=None if isinstance(exc, KvmcError) else exc)
    return error_response(status, _message_for(exc, status))


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers moby sends on every response (notes §1); remember that a response started."""
    response.headers["Api-Version"] = API_VERSION
    response.headers["Server"] = SERVER_HEADER
    response.headers["Ostype"] = "linux"
    response.headers["Docker-Experimental"] = "false"
    request[_PREPARED] = response


def make_app(routes: Iterable[tuple[str, str, Handler]]) -> web.Application:
    """An aiohttp app serving ``routes`` unversioned and under ``/v{version}``.

    Paths may hold aiohttp patterns (``/images/{name:.+}/json``: image names contain
    slashes). Bodies above aiohttp's 1 MiB default (image load, archive PUT) must be read
    from ``request.content`` as a stream, not with ``request.read()``.
    """
    app = web.Application(middlewares=[_api_middleware])
    app[STOPPING] = asyncio.Event()
    app.on_response_prepare.append(_on_prepare)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/v{version:[0-9.]+}" + path, handler)
    return app


# ---------------------------------------------------------------------------------- ping

_PING_HEADERS = {
    "Builder-Version": "1",
    "Swarm": "inactive",
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "Content-Type": "text/plain; charset=utf-8",
}


async def ping(request: web.Request) -> web.Response:
    """``GET /_ping``: the CLI's fallback when HEAD fails; body ``OK``."""
    return web.Response(body=b"OK", headers=_PING_HEADERS)


async def ping_head(request: web.Request) -> web.Response:
    """``HEAD /_ping``: what the CLI sends first; headers only, ``Content-Length: 0``
    (aiohttp leaves the length out of an empty HEAD answer unless it is given)."""
    return web.Response(body=b"", headers={**_PING_HEADERS, "Content-Length": "0"})


def ping_routes() -> list[tuple[str, str, Handler]]:
    return [("GET", "/_ping", ping), ("HEAD", "/_ping", ping_head)]


# ---------------------------------------------------------------------------------- query

_FALSE = frozenset({"", "0", "no", "false", "none"})


def bool_param(request: web.Request, name: str, default: bool = False) -> bool:
    """moby's BoolValue: ``""``, 0, no, false, none are false (any case); absent is ``default``."""
    value = request.query.get(name)
    if value is None:
        return default
    return value.strip().lower() not in _FALSE


def int_param(request: web.Request, name: str, default: int | None = None) -> int | None:
    """An integer query parameter; absent or empty is ``default``, garbage is a 400."""
    value = request.query.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f'invalid value for "{name}": "{value}" is not an integer') from None


# ---------------------------------------------------------------------------------- streams

async def json_stream(request: web.Request, status: int = 200) -> web.StreamResponse:
    """A prepared, chunked ``application/json`` response for one JSON object per line
    (pull and load progress, events)."""
    response = web.StreamResponse(status=status, headers={"Content-Type": JSON})
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


async def write_json_line(response: web.StreamResponse, obj: Any, end: bytes = b"\r\n") -> None:
    """One object of a JSON stream; moby's progress streams end each with CRLF."""
    await response.write(json.dumps(obj, separators=(",", ":")).encode() + end)


async def early_headers(request: web.Request) -> web.StreamResponse:
    """``200`` and ``Content-Type: application/json`` on the wire now, the body later.

    For ``/wait``: the CLI starts the container only once these headers arrived (notes §3.2).
    aiohttp's StreamResponse sends its headers during ``prepare()``; finish with
    :func:`end_json`.
    """
    return await json_stream(request)


async def end_json(response: web.StreamResponse, obj: Any) -> None:
    """Write the body of an :func:`early_headers` response and end it."""
    await response.write(_dumps(obj))
    await response.write_eof()


# ---------------------------------------------------------------------------------- connections

class _Inbox:
    """Bytes a hijacked client sent (its stdin), with back-pressure on the socket."""

    def __init__(self, transport: asyncio.Transport, limit: int = STDIN_BUFFER_LIMIT) -> None:
        self._transport = transport
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._paused = False
        self._ready = asyncio.Event()

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def feed(self, data: bytes) -> None:
        if self._eof or not data:
            return
        self._buffer += data
        self._ready.set()
        if len(self._buffer) > self._limit and not self._paused and not self._transport.is_closing():
            self._transport.pause_reading()
            self._paused = True

    def feed_eof(self) -> None:
        self._eof = True
        self._ready.set()

    async def read(self, limit: int) -> bytes:
        while not self._buffer and not self._eof:
            self._ready.clear()
            await self._ready.wait()
        chunk = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        if self._paused and len(self._buffer) <= self._limit // 2 and not self._transport.is_closing():
            self._transport.resume_reading()
            self._paused = False
        return chunk


class _ConnectionTap(asyncio.Protocol):
    """Sits between a connection's transport and aiohttp's protocol for that connection.

    Installed with the public ``transport.set_protocol()`` the first time a handler needs it;
    it forwards everything to aiohttp unchanged, and adds what aiohttp lacks:

    - ``lost``, a future resolved when the connection closes (for :func:`until_client_gone`);
    - after :func:`hijack`, the client's bytes go to an :class:`_Inbox` instead of aiohttp's
      HTTP parser, and **a half-close keeps the connection open**: ``eof_received()``
      returns True, so asyncio stops reading but leaves the write side to us. aiohttp's
      ``RequestHandler.eof_received()`` returns None, which makes asyncio close the whole
      transport the moment ``docker run`` (no ``-i``) calls CloseWrite, and all output of
      the container is lost (notes §7.1). Doing this per connection, after the 101, leaves
      every ordinary request to aiohttp's own handling and patches no aiohttp class.
    - after that EOF nothing reads the socket any more, so a client that then goes away
      entirely would be noticed only at the next write. moby watches for EPOLLHUP; so does
      :meth:`_watch_hangup`. Linux raises it on a unix socket whose peer closed (not on a
      half-close); over TCP a peer's close looks like a half-close until a write fails.
    """

    def __init__(self, inner: asyncio.Protocol, transport: asyncio.Transport) -> None:
        self.inner = inner
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.inbox: _Inbox | None = None
        self._hangup: select.epoll | None = None

    def data_received(self, data: bytes) -> None:
        if self.inbox is not None:
            self.inbox.feed(data)
        else:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inbox is not None:
            self.inbox.feed_eof()
            self._watch_hangup()
            return True
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch_hangup()
        if not self.lost.done():
            self.lost.set_result(None)
        if self.inbox is not None:
            self.inbox.feed_eof()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _watch_hangup(self) -> None:
        """Abort the connection when the client fully closes it (EPOLLHUP), event-driven:
        an epoll set holding only this socket, itself watched by the event loop."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or self._hangup is not None or not hasattr(select, "epoll"):
            return
        watcher = select.epoll()
        try:
            watcher.register(sock.fileno(), 0)  # HUP and ERR are always reported
        except OSError:
            watcher.close()
            return
        self._hangup = watcher
        self.loop.add_reader(watcher.fileno(), self._on_hangup)

    def _on_hangup(self) -> None:
        self._unwatch_hangup()
        self.transport.abort()  # nobody to flush to; connection_lost follows

    def _unwatch_hangup(self) -> None:
        if self._hangup is not None:
            self.loop.remove_reader(self._hangup.fileno())
            self._hangup.close()
            self._hangup = None


def _tap(request: web.Request) -> _ConnectionTap | None:
    """The connection's tap, installed on first use; None when the client is already gone."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    protocol = transport.get_protocol()
    if isinstance(protocol, _ConnectionTap):
        return protocol
    tap = _ConnectionTap(protocol, transport)  # type: ignore[arg-type]
    transport.set_protocol(tap)
    return tap


def client_gone(request: web.Request) -> bool:
    """True once the client's connection closed (a quick check between steps)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def until_client_gone(request: web.Request) -> None:
    """Return when the client disconnects or the server starts stopping.

    For handlers that wait: ``docker run -d`` drops its ``/wait`` at once, ``logs -f`` and
    ``events`` are dropped by ^C, and their waiters must not pile up (notes §7.3).
    """
    tap = _tap(request)
    if tap is None:
        return
    stopping = asyncio.ensure_future(request.app[STOPPING].wait())
    try:
        await asyncio.wait({tap.lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


async def unless_client_gone(request: web.Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes first, cancel it and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone("the client disconnected")
    return task.result()


# ---------------------------------------------------------------------------------- hijack

class _UnframedResponse(web.StreamResponse):
    """A response whose body is written as-is: no chunked encoding, no length.

    For the ``200 OK`` answer to an attach without ``Upgrade`` (old clients): the body is
    the raw stream until the connection closes, as moby writes it. aiohttp's WebSocket
    response turns length handling off the same way.
    """

    _length_check = False


def encode_frame(stream: int, data: bytes) -> bytes:
    """One frame of docker's multiplexed stream: ``[stream,0,0,0,len_be32]`` + data."""
    return _FRAME_HEADER.pack(stream, len(data)) + data


class HijackedStream:
    """An attach/exec connection after the 101: client stdin in, container output out.

    The handler must ``return stream.response`` when done (after :meth:`close`), so aiohttp
    knows the request was answered.
    """

    def __init__(self, request: web.Request, response: web.StreamResponse, tap: _ConnectionTap,
                 inbox: _Inbox, tty: bool) -> None:
        self.request = request
        self.response = response
        self.tty = tty
        self._tap = tap
        self._inbox = inbox
        self._closing = False

    @property
    def closed(self) -> bool:
        """The client is fully gone (or we closed): output is no longer delivered."""
        return self._closing or self._tap.lost.done() or self._tap.transport.is_closing()

    @property
    def stdin_ended(self) -> bool:
        """The client half-closed (stdin EOF) or disconnected, and all its bytes were read."""
        return self._inbox.at_eof

    async def read(self, limit: int = 64 * 1024) -> bytes:
        """The client's next stdin bytes; ``b""`` once it half-closed or disconnected."""
        return await self._inbox.read(limit)

    async def write_frame(self, stream: int, data: bytes) -> None:
        """Send output: an 8-byte ``[stream,0,0,0,len]`` header first unless TTY (raw bytes).

        Output for a client that is gone is dropped (check :attr:`closed` to stop early).
        """
        if not data or self.closed:
            return
        if not self.tty:
            data = encode_frame(stream, data)
        try:
            await self.response.write(data)
        except ConnectionError:
            self._closing = True

    async def close(self) -> None:
        """End the stream: flush what was written, then close the connection.

        Closing is how the client learns the output ended (it waits for EOF, notes §6).
        """
        if self._closing and self._tap.lost.done():
            return
        self._closing = True
        try:
            await self.response.write_eof()
        except ConnectionError:
            pass
        if not self._tap.transport.is_closing():
            self._tap.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed by either side."""
        await asyncio.shield(self._tap.lost)


def stream_content_type(request: web.Request, tty: bool) -> str:
    """moby's choice: multiplexed only for a non-TTY upgrade at API 1.42 or later."""
    if tty or "Upgrade" not in request.headers:
        return RAW_STREAM
    return MULTIPLEXED_STREAM if parse_version(api_version(request)) >= MULTIPLEXED_SINCE else RAW_STREAM


async def hijack(request: web.Request, tty: bool) -> HijackedStream:
    """Answer an attach or exec-start with ``101 UPGRADED`` and take over the connection.

    Without an ``Upgrade`` header (very old clients) the answer is ``200 OK`` with a raw
    stream, as moby does; the stream works the same. The frame format depends only on
    ``tty``: docker's clients demultiplex whenever the container has no TTY.
    """
    tap = _tap(request)
    if tap is None:
        raise ClientGone("the client disconnected before the stream started")
    headers = {"Content-Type": stream_content_type(request, tty)}
    if "Upgrade" in request.headers:
        headers.update({"Connection": "Upgrade", "Upgrade": "tcp"})
        response: web.StreamResponse = _UnframedResponse(status=101, reason="UPGRADED", headers=headers)
    else:
        response = _UnframedResponse(status=200, headers=headers)
    response.force_close()  # a hijacked connection is never reused
    request.protocol.keep_alive(False)
    inbox = _Inbox(tap.transport)
    tap.inbox = inbox
    # Bytes that came right behind the upgrade request were buffered by aiohttp.
    tail = getattr(request.protocol, "_message_tail", b"")
    if tail:
        inbox.feed(bytes(tail))
        request.protocol._message_tail = b""  # type: ignore[attr-defined]
    if not tap.transport.is_reading() and not tap.transport.is_closing():
        tap.transport.resume_reading()  # aiohttp may have paused it while buffering
    await response.prepare(request)
    return HijackedStream(request, response, tap, inbox, tty)


# ---------------------------------------------------------------------------------- listening

@dataclass(frozen=True)
class Host:
    """A parsed ``-H``: ``unix:///path`` or ``tcp://HOST:PORT``."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


_TCP_REFUSAL = ("kvmc serve serves TCP only on loopback: the Docker API gives root on this host "
                "to anyone who reaches it; TLS is not supported")


def parse_host(text: str) -> Host:
    """Parse ``unix:///abs/path`` or ``tcp://HOST[:PORT]`` (loopback only); raise ServeError."""
    if text.startswith("unix://"):
        path = text[len("unix://"):]
        if not path.startswith("/"):
            raise ServeError(f'invalid host "{text}": a unix socket needs an absolute path (unix:///run/x.sock)')
        return Host("unix", path=os.path.normpath(path))
    if text.startswith("tcp://"):
        return _parse_tcp(text)
    raise ServeError(f'invalid host "{text}": use unix:///path or tcp://127.0.0.1:PORT')


def _parse_tcp(text: str) -> Host:
    rest = text[len("tcp://"):].rstrip("/")
    if rest.startswith("["):
        host, _, after = rest[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else after
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        port = int(port_text) if port_text else DEFAULT_TCP_PORT
    except ValueError:
        raise ServeError(f'invalid host "{text}": bad port "{port_text}"') from None
    if not 0 < port < 65536:
        raise ServeError(f'invalid host "{text}": ports are 1-65535')
    if not is_loopback_host(host):
        raise ServeError(f'refusing "{text}": {_TCP_REFUSAL}')
    return Host("tcp", host=host, port=port)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse if a server still answers on it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise ServeError(f"cannot tell whether a server listens on {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ServeError(f"another server listens on {path}: stop it first (or choose another -H)")


def _restrict_socket(path: Path, say: Callable[[str], None]) -> int:
    """Mode 0660 and group ``docker`` when that group exists (docker's convention), else 0600.

    Whoever can connect is root on this host, so without a docker group only root may.
    """
    try:
        gid = grp.getgrnam("docker").gr_gid
    except KeyError:
        os.chmod(path, 0o600)
        return 0o600
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        say(f"cannot give {path} to group docker (not permitted): only its owner may connect")
        os.chmod(path, 0o600)
        return 0o600
    os.chmod(path, 0o660)
    return 0o660


def _bind_unix(path: Path, say: Callable[[str], None]) -> tuple[socket.socket, tuple[int, int]]:
    """A bound (not yet listening) unix socket with its permissions set.

    Permissions are set between bind and listen, so no client can connect while the file
    still has the umask's mode. Returns the socket and the file's (dev, inode) so a stop
    removes only its own file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        _restrict_socket(path, say)
        st = path.lstat()
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock, (st.st_dev, st.st_ino)


async def _check_loopback_resolution(host: Host) -> None:
    """``localhost`` is loopback by name; make sure this host's resolver agrees."""
    if host.host != "localhost":
        return
    infos = await asyncio.get_running_loop().getaddrinfo(host.host, host.port, type=socket.SOCK_STREAM)
    if any(not ipaddress.ip_address(info[4][0]).is_loopback for info in infos):
        raise ServeError(f'refusing "{host}": localhost resolves to a non-loopback address here')


def _stderr(message: str) -> None:
    print(f"kvmc serve: {message}", file=sys.stderr, flush=True)


async def serve(app: web.Application, hosts: list[str], log: Callable[[str], None] | None = None, *,
                stop: asyncio.Event | None = None, ready: Callable[[], None] | None = None,
                shutdown_grace: float = SHUTDOWN_GRACE_S) -> None:
    """Serve ``app`` on every host until SIGTERM/SIGINT (or ``stop`` is set).

    Stopping closes the listeners, tells streams to end (:data:`STOPPING`), gives running
    handlers ``shutdown_grace`` seconds, cancels the rest and removes the unix sockets.
    """
    say = log or _stderr
    parsed = [parse_host(h) for h in hosts]  # all valid, or none served
    for host in parsed:
        await _check_loopback_resolution(host)
    stop = stop or asyncio.Event()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_grace)
    await runner.setup()
    own_files: list[tuple[Path, tuple[int, int]]] = []
    loop = asyncio.get_running_loop()
    signals: list[int] = []
    try:
        for host in parsed:
            await _start_site(runner, host, own_files, say)
            say(f"listening on {host} (Docker Engine API {API_VERSION})")
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (RuntimeError, ValueError):  # not the main thread (tests): ``stop`` only
                continue
            signals.append(sig)
        if ready is not None:
            ready()
        await stop.wait()
        say("stopping")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        app[STOPPING].set()
        await runner.cleanup()
        for path, identity in own_files:
            _remove_own_socket(path, identity)
    say("stopped")


async def _start_site(runner: web.AppRunner, host: Host, own_files: list[tuple[Path, tuple[int, int]]],
                      say: Callable[[str], None]) -> None:
    if host.scheme == "unix":
        sock, identity = _bind_unix(Path(host.path), say)
        own_files.append((Path(host.path), identity))
        await web.SockSite(runner, sock).start()
        return
    try:
        await web.TCPSite(runner, host.host, host.port).start()
    except OSError as exc:
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ServeError(f"cannot listen on {host}: {reason}") from None


def _remove_own_socket(path: Path, identity: tuple[int, int]) -> None:
    """Unlink the socket file if it is still ours (a newer server may have replaced it)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        path.unlink(missing_ok=True)


def run_server(app: web.Application, hosts: list[str], log: Callable[[str], None] | None = None) -> None:
    """Blocking :func:`serve`, for the CLI."""
    asyncio.run(serve(app, hosts, log))

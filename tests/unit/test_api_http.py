"""kvmc.api.http: a real server on a temporary unix socket, driven by raw HTTP bytes.

Raw sockets rather than an HTTP client library, because what is tested is the bytes the
docker clients depend on: exact Content-Type, no body after a HEAD, the 101 and the
multiplexed frames, and above all that output still flows after the client half-closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmc.api import http
from kvmc.api.translate import InvalidRequest
from kvmc.errors import ContainerNotFound, KvmcError

TIMEOUT = 5.0


# ---------------------------------------------------------------------------------- harness

@pytest.fixture
def sock_dir() -> AsyncIterator[Path]:
    """A short directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kvmc-api-", dir="/tmp"))
    yield path  # type: ignore[misc]
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(routes: list, sock: Path) -> AsyncIterator[web.Application]:
    app = http.make_app(http.ping_routes() + routes)
    stop, ready = asyncio.Event(), asyncio.Event()
    messages: list[str] = []
    task = asyncio.create_task(http.serve(app, [f"unix://{sock}"], messages.append, stop=stop, ready=ready.set,
                                          shutdown_grace=0.5))
    await asyncio.wait_for(ready.wait(), TIMEOUT)
    try:
        yield app
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 20))


async def exchange(sock: Path, request: bytes) -> bytes:
    """Send one request (the caller includes ``Connection: close``) and read until EOF."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return data


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n{headers}{length}\r\n").encode() + body


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def decode_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while data:
        stream, size = struct.unpack(">BxxxI", data[:8])
        frames.append((stream, data[8:8 + size]))
        data = data[8 + size:]
    return frames


async def get(sock: Path, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return split(await exchange(sock, request(method, path)))


# ---------------------------------------------------------------------------------- versions, ping

def test_versions_and_common_headers(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"

    async def main() -> None:
        async with serving([], sock):
            for path in ("/_ping", "/v1.50/_ping", "/v1.24/_ping", "/v1.44/_ping"):
                status, headers, body = await get(sock, path)
                assert (status, body) == (200, b"OK"), path
                assert headers["api-version"] == "1.50" and headers["ostype"] == "linux"
                assert headers["docker-experimental"] == "false" and headers["server"].startswith("Docker/")
            status, headers, body = await get(sock, "/v1.51/_ping")
            assert status == 400 and headers["content-type"] == "application/json"
            assert json.loads(body) == {"message": "client version 1.51 is too new. "
                                                   "Maximum supported API version is 1.50"}
            assert headers["api-version"] == "1.50"
            status, headers, body = await get(sock, "/v1.23/_ping")
            assert status == 400 and headers["content-type"].startswith("text/plain")
            assert body.startswith(b"client version 1.23 is too old. Minimum supported API version is 1.24")

    run(main)


def test_ping_get_and_head(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"

    async def main() -> None:
        async with serving([], sock):
            status, headers, body = await get(sock, "/_ping")
            assert body == b"OK" and headers["builder-version"] == "1" and headers["swarm"] == "inactive"
            assert headers["cache-control"] == "no-cache, no-store, must-revalidate" and headers["pragma"] == "no-cache"
            raw = await exchange(sock, request("HEAD", "/v1.50/_ping"))
            status, headers, body = split(raw)
            # the Go client breaks the next request if a HEAD answer carries a body
            assert status == 200 and headers["content-length"] == "0" and raw.endswith(b"\r\n\r\n") and body == b""
            assert headers["api-version"] == "1.50" and headers["swarm"] == "inactive"

    run(main)


# ---------------------------------------------------------------------------------- errors

class KindError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(f"failed with kind {kind}")
        self.kind = kind


@pytest.mark.parametrize("exc, status", [
    (KindError("not_found"), 404), (KindError("conflict"), 409), (KindError("invalid"), 400),
    (KindError("unavailable"), 503), (KindError("guest"), 500), (KindError("not_implemented"), 501),
    (KindError("not_modified"), 304), (KindError("internal"), 500), (KindError("whatever"), 500),
    (ValueError("x"), 500), (http.ApiError(418, "teapot"), 418), (web.HTTPNotFound(), 404),
    (InvalidRequest("bad"), 400), (ContainerNotFound("no such container: x"), 404), (KvmcError("boom"), 500),
])
def test_status_for(exc: Exception, status: int) -> None:
    assert http.status_for(exc) == status


def test_errors_are_docker_json(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"

    def raising(exc: Exception) -> Callable:
        async def handler(request: web.Request) -> web.Response:
            raise exc
        return handler

    routes = [
        ("GET", "/containers/{id}/json", raising(ContainerNotFound("No such container: nosuch"))),
        ("POST", "/containers/{id}/stop", raising(KindError("not_modified"))),
        ("GET", "/bug", raising(RuntimeError("a bug"))),
        ("GET", "/images/{name:.+}/json", _echo_name),
    ]

    async def main() -> None:
        async with serving(routes, sock):
            status, headers, body = await get(sock, "/v1.50/containers/nosuch/json")
            assert status == 404 and headers["content-type"] == "application/json"  # exactly: no charset
            assert json.loads(body) == {"message": "No such container: nosuch"}
            status, headers, body = await get(sock, "/containers/x/stop", "POST")
            assert status == 304 and body == b""
            status, headers, body = await get(sock, "/bug")
            assert status == 500 and json.loads(body) == {"message": "a bug"}
            status, headers, body = await get(sock, "/v1.50/no/such/route")
            assert status == 404 and json.loads(body) == {"message": "page not found"}
            assert headers["content-type"] == "application/json"
            status, headers, body = await get(sock, "/v1.50/images/docker.io/firecow/util:latest/json")
            assert status == 200 and headers["content-type"] == "application/json"
            assert json.loads(body) == {"name": "docker.io/firecow/util:latest"}

    run(main)


async def _echo_name(request: web.Request) -> web.Response:
    return http.json_response({"name": request.match_info["name"]})


# ---------------------------------------------------------------------------------- query

@pytest.mark.parametrize("query, expected", [
    ("", False), ("force=", False), ("force=0", False), ("force=no", False), ("force=False", False),
    ("force=NONE", False), ("force=1", True), ("force=true", True), ("force=yes", True), ("force=anything", True),
])
def test_bool_param_follows_moby(query: str, expected: bool) -> None:
    assert http.bool_param(make_mocked_request("GET", f"/x?{query}"), "force") is expected


def test_bool_param_default_and_int_param() -> None:
    assert http.bool_param(make_mocked_request("GET", "/x"), "stream", default=True) is True
    req = make_mocked_request("GET", "/x?t=3&neg=-1&empty=&bad=x")
    assert http.int_param(req, "t") == 3 and http.int_param(req, "neg") == -1
    assert http.int_param(req, "empty", 10) == 10 and http.int_param(req, "missing") is None
    with pytest.raises(http.ApiError) as info:
        http.int_param(req, "bad")
    assert info.value.status == 400


# ---------------------------------------------------------------------------------- hijack

@settings(database=None)  # no .hypothesis/ directory in the work tree
@given(st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=300)), max_size=8))
def test_frames_round_trip(frames: list[tuple[int, bytes]]) -> None:
    data = b"".join(http.encode_frame(stream, payload) for stream, payload in frames)
    assert decode_frames(data) == frames


def echo_routes(events: dict) -> list:
    """An attach that echoes stdin to stdout frames, then writes to stderr after stdin ended."""

    async def attach(request: web.Request) -> web.StreamResponse:
        tty = http.bool_param(request, "tty")
        stream = await http.hijack(request, tty=tty)
        while chunk := await stream.read():
            await stream.write_frame(http.STDOUT, chunk)
        events["stdin_ended"] = stream.stdin_ended
        await asyncio.sleep(0.2)  # the client's half-close must not have closed the connection
        events["closed_after_eof"] = stream.closed
        await stream.write_frame(http.STDERR, b"bye after eof")
        await stream.close()
        return stream.response

    async def exec_start(request: web.Request) -> web.StreamResponse:
        body = await http.read_json(request)
        stream = await http.hijack(request, tty=bool(body["Tty"]))
        await stream.write_frame(http.STDOUT, json.dumps(body).encode())
        await stream.close()
        return stream.response

    async def quiet(request: web.Request) -> web.StreamResponse:
        stream = await http.hijack(request, tty=False)
        await stream.wait_closed()
        events["closed"] = stream.closed
        await stream.write_frame(http.STDOUT, b"nobody listens")  # must not raise
        await stream.close()
        return stream.response

    return [("POST", "/containers/{id}/attach", attach), ("POST", "/exec/{id}/start", exec_start),
            ("POST", "/containers/{id}/quiet", quiet)]


UPGRADE = "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Type: text/plain\r\n"


async def upgrade(sock: Path, path: str, headers: str = UPGRADE, body: bytes = b"") -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: docker\r\n{headers}{length}\r\n".encode() + body)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return reader, writer, head


def test_hijack_keeps_writing_after_client_half_close(sock_dir: Path) -> None:
    """docker run without -i: CloseWrite right after the 101, output must still arrive."""
    sock, events = sock_dir / "d.sock", {}

    async def main() -> None:
        async with serving(echo_routes(events), sock):
            reader, writer, head = await upgrade(sock, "/v1.50/containers/c1/attach?stream=1&stdout=1&stderr=1")
            lines = head.decode().split("\r\n")
            assert lines[0] == "HTTP/1.1 101 UPGRADED"
            assert "Content-Type: application/vnd.docker.multiplexed-stream" in lines
            assert "Connection: Upgrade" in lines and "Upgrade: tcp" in lines and "Api-Version: 1.50" in lines
            writer.write(b"hello stdin")
            await writer.drain()
            writer.write_eof()  # shutdown(SHUT_WR): the half-close
            rest = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
            assert decode_frames(rest) == [(1, b"hello stdin"), (2, b"bye after eof")]
            writer.close()
        assert events == {"stdin_ended": True, "closed_after_eof": False}

    run(main)


def test_hijack_with_raw_socket_shutdown(sock_dir: Path) -> None:
    """The same with a blocking socket and shutdown(SHUT_WR), as the Go client does it."""
    sock, events = sock_dir / "d.sock", {}

    def client() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(str(sock))
            s.sendall(f"POST /containers/c1/attach?stream=1 HTTP/1.1\r\nHost: d\r\n{UPGRADE}\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 101 UPGRADED\r\n")
            s.sendall(b"abc")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    async def main() -> None:
        async with serving(echo_routes(events), sock):
            data = await asyncio.to_thread(client)
            assert decode_frames(data) == [(1, b"abc"), (2, b"bye after eof")]

    run(main)


def test_hijack_tty_old_api_and_no_upgrade(sock_dir: Path) -> None:
    sock, events = sock_dir / "d.sock", {}

    async def main() -> None:
        async with serving(echo_routes(events), sock):
            # TTY: raw bytes, raw-stream
            reader, writer, head = await upgrade(sock, "/v1.50/containers/c/attach?tty=1")
            assert b"Content-Type: application/vnd.docker.raw-stream\r\n" in head
            writer.write(b"typed")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"typedbye after eof"
            writer.close()
            # before API 1.42 moby says raw-stream even for a multiplexed stream
            reader, writer, head = await upgrade(sock, "/v1.41/containers/c/attach")
            assert b"Content-Type: application/vnd.docker.raw-stream\r\n" in head
            writer.write_eof()
            assert decode_frames(await asyncio.wait_for(reader.read(), TIMEOUT)) == [(2, b"bye after eof")]
            writer.close()
            # no Upgrade header (very old clients): 200 and a raw stream until close
            reader, writer, head = await upgrade(sock, "/containers/c/attach", headers="")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Content-Type: application/vnd.docker.raw-stream\r\n" in head
            assert b"Transfer-Encoding" not in head
            writer.write(b"old")
            writer.write_eof()
            assert decode_frames(await asyncio.wait_for(reader.read(), TIMEOUT)) == [(1, b"old"), (2, b"bye after eof")]
            writer.close()

    run(main)


def test_hijack_after_json_body(sock_dir: Path) -> None:
    """exec start: the JSON body is read first, then the connection is taken over."""
    sock, events = sock_dir / "d.sock", {}

    async def main() -> None:
        async with serving(echo_routes(events), sock):
            body = b'{"Detach":false,"Tty":false}'
            reader, writer, head = await upgrade(
                sock, "/v1.50/exec/e1/start", headers=UPGRADE.replace("text/plain", "application/json"), body=body)
            assert head.startswith(b"HTTP/1.1 101 UPGRADED\r\n")
            [(stream, echoed)] = decode_frames(await asyncio.wait_for(reader.read(), TIMEOUT))
            assert stream == 1 and json.loads(echoed) == json.loads(body)
            writer.close()

    run(main)


def test_hijack_client_disconnect(sock_dir: Path) -> None:
    """A full close (not a half-close) is noticed without writing: EPOLLHUP on the socket."""
    sock, events = sock_dir / "d.sock", {}

    async def main() -> None:
        async with serving(echo_routes(events), sock):
            reader, writer, head = await upgrade(sock, "/containers/c/quiet")
            writer.close()
            await writer.wait_closed()
            for _ in range(50):
                if "closed" in events:
                    break
                await asyncio.sleep(0.05)
        assert events == {"closed": True}

    run(main)


# ---------------------------------------------------------------------------------- streams

def test_early_headers_before_the_body(sock_dir: Path) -> None:
    """/wait: the client must see the headers while the body is not known yet."""
    sock = sock_dir / "d.sock"
    release = asyncio.Event()

    async def wait(request: web.Request) -> web.StreamResponse:
        response = await http.early_headers(request)
        await release.wait()
        await http.end_json(response, {"StatusCode": 0, "Error": None})
        return response

    async def main() -> None:
        async with serving([("POST", "/containers/{id}/wait", wait)], sock):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(request("POST", "/v1.50/containers/c/wait?condition=next-exit"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)  # before release
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Type: application/json\r\n" in head
            release.set()
            status, _, body = split(head + await asyncio.wait_for(reader.read(), TIMEOUT))
            assert json.loads(body) == {"StatusCode": 0, "Error": None}
            writer.close()

    run(main)


def test_json_stream_lines(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"

    async def pull(request: web.Request) -> web.StreamResponse:
        response = await http.json_stream(request)
        await http.write_json_line(response, {"status": "Pulling from library/alpine", "id": "latest"})
        await http.write_json_line(response, {"status": "Status: Downloaded newer image for alpine:latest"})
        await response.write_eof()
        return response

    async def main() -> None:
        async with serving([("POST", "/images/create", pull)], sock):
            status, headers, body = await get(sock, "/v1.50/images/create?fromImage=alpine", "POST")
            assert status == 200 and headers["content-type"] == "application/json"
            assert headers["transfer-encoding"] == "chunked"
            lines = body.split(b"\r\n")
            assert lines[-1] == b"" and [json.loads(x)["status"] for x in lines[:-1]] == [
                "Pulling from library/alpine", "Status: Downloaded newer image for alpine:latest"]

    run(main)


def test_failure_after_headers_closes_the_stream(sock_dir: Path) -> None:
    """Once a stream started no error can be sent: the connection ends without the last chunk."""
    sock = sock_dir / "d.sock"

    async def broken(request: web.Request) -> web.StreamResponse:
        response = await http.json_stream(request)
        await http.write_json_line(response, {"status": "half"})
        raise RuntimeError("broke mid-stream")

    async def main() -> None:
        async with serving([("GET", "/events", broken)], sock):
            raw = await exchange(sock, request("GET", "/events"))
            assert raw.startswith(b"HTTP/1.1 200 OK") and b'{"status":"half"}' in raw
            assert not raw.endswith(b"0\r\n\r\n")

    run(main)


def test_until_client_gone(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"
    seen = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = await http.json_stream(request)
        assert not http.client_gone(request)
        await http.until_client_gone(request)
        assert http.client_gone(request)
        seen.set()
        return response

    async def slow(request: web.Request) -> web.Response:
        await http.unless_client_gone(request, asyncio.sleep(60))
        return http.json_response({})

    async def main() -> None:
        async with serving([("GET", "/events", events), ("GET", "/slow", slow)], sock):
            for path in ("/events", "/slow"):
                reader, writer = await asyncio.open_unix_connection(str(sock))
                writer.write(request("GET", path))
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.close()  # ^C on `docker events` / `docker run -d` dropping /wait
            await asyncio.wait_for(seen.wait(), TIMEOUT)

    run(main)


def test_stop_ends_waiting_handlers(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"
    ended = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = await http.json_stream(request)
        await http.until_client_gone(request)  # returns when the server stops, too
        ended.set()
        return response

    async def main() -> None:
        reader = writer = None
        async with serving([("GET", "/events", events)], sock):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(request("GET", "/events"))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert ended.is_set() and not sock.exists()
        writer.close()

    run(main)


# ---------------------------------------------------------------------------------- listening

@pytest.mark.parametrize("text, host", [
    ("unix:///run/kvmc/docker.sock", http.Host("unix", path="/run/kvmc/docker.sock")),
    ("tcp://127.0.0.1:2375", http.Host("tcp", host="127.0.0.1", port=2375)),
    ("tcp://127.1.2.3", http.Host("tcp", host="127.1.2.3", port=2375)),
    ("tcp://localhost:9999", http.Host("tcp", host="localhost", port=9999)),
    ("tcp://[::1]:2376", http.Host("tcp", host="::1", port=2376)),
])
def test_parse_host(text: str, host: http.Host) -> None:
    assert http.parse_host(text) == host
    assert str(http.parse_host(str(host))) == str(host)


@pytest.mark.parametrize("text, message", [
    ("tcp://0.0.0.0:2375", "only on loopback"),
    ("tcp://:2375", "only on loopback"),
    ("tcp://192.168.1.2:2375", "gives root on this host"),
    ("tcp://[::]:2375", "TLS is not supported"),
    ("tcp://example.com:2375", "only on loopback"),
    ("tcp://127.0.0.1:99999", "ports are 1-65535"),
    ("tcp://127.0.0.1:x", "bad port"),
    ("unix://relative.sock", "absolute path"),
    ("fd://", "invalid host"),
    ("/var/run/docker.sock", "invalid host"),
])
def test_parse_host_refusals(text: str, message: str) -> None:
    with pytest.raises(http.ServeError, match=message):
        http.parse_host(text)


def test_unix_socket_mode_stale_socket_and_cleanup(sock_dir: Path) -> None:
    sock = sock_dir / "sub" / "docker.sock"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # a dead server's file: nothing listens
    stale.close()

    async def main() -> None:
        async with serving([], sock):
            mode = stat.S_IMODE(sock.stat().st_mode)
            try:
                docker_gid = grp.getgrnam("docker").gr_gid
            except KeyError:
                docker_gid = None
            if docker_gid is not None and sock.stat().st_gid == docker_gid:
                assert mode == 0o660
            else:
                assert mode == 0o600
            status, _, _ = await get(sock, "/_ping")
            assert status == 200
            with pytest.raises(http.ServeError, match="another server listens on"):
                await http.serve(http.make_app([]), [f"unix://{sock}"], lambda m: None)
            await asyncio.sleep(0.1)  # let the server see that probe connection come and go
        assert not sock.exists()

    run(main)


def test_refuses_to_replace_a_regular_file(sock_dir: Path) -> None:
    path = sock_dir / "not-a-socket"
    path.write_text("data")
    with pytest.raises(http.ServeError, match="is not a socket"):
        run(lambda: http.serve(http.make_app([]), [f"unix://{path}"], lambda m: None))
    assert path.read_text() == "data"


def test_tcp_loopback_listener(sock_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        app = http.make_app(http.ping_routes())
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(http.serve(app, [f"tcp://127.0.0.1:{port}"], lambda m: None,
                                              stop=stop, ready=ready.set))
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("GET", "/_ping"))
        assert split(await asyncio.wait_for(reader.read(), TIMEOUT))[2] == b"OK"
        writer.close()
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)

    run(main)


def test_sigterm_stops_the_server(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(http.serve(http.make_app([]), [f"unix://{sock}"], lambda m: None, ready=ready.set))
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        os.kill(os.getpid(), 15)
        await asyncio.wait_for(task, TIMEOUT)
        assert not sock.exists()

    run(main)

"""Blocking file objects over a hijacked stream, so the service's own attach and exec code
(the same the CLI runs, kvmc/runtime.py) serves API clients from a worker thread.

Why threads and not an asyncio copy of attach: one relay for both front doors. The service
writes output and reads stdin with plain blocking calls; these objects turn each call into
a coroutine on the server's event loop and wait for it, which also gives backpressure.
"""

from __future__ import annotations

import asyncio
import io

from aiohttp import web

from kvmc.api.http import HijackedStream

STDOUT, STDERR = 1, 2


class StreamOutput(io.RawIOBase):
    """``write`` sends one frame of ``stream`` (1 stdout, 2 stderr) to the client."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: HijackedStream | None, stream_id: int) -> None:
        super().__init__()
        self.loop = loop
        self.stream = stream
        self.stream_id = stream_id

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.stream is not None and data:
            asyncio.run_coroutine_threadsafe(self.stream.write_frame(self.stream_id, bytes(data)), self.loop).result()
        return len(data)


class StreamInput(io.RawIOBase):
    """``read1`` returns the client's next stdin bytes (``b""`` once it half-closed)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: HijackedStream) -> None:
        super().__init__()
        self.loop = loop
        self.stream = stream

    def readable(self) -> bool:
        return True

    def read1(self, size: int = 65536) -> bytes:
        return asyncio.run_coroutine_threadsafe(self.stream.read(size if size > 0 else 65536), self.loop).result()

    read = read1  # type: ignore[assignment]


class ResponseOutput(io.RawIOBase):
    """``write`` sends bytes as the body of a prepared streaming response (docker cp's and
    docker save's tar streams), from a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, response: web.StreamResponse) -> None:
        super().__init__()
        self.loop = loop
        self.response = response

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        asyncio.run_coroutine_threadsafe(self.response.write(bytes(data)), self.loop).result()
        return len(data)


class Sink(io.RawIOBase):
    """Where a stream the client did not ask for goes."""

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return len(data)

"""The /metrics endpoint: Prometheus text (or OpenMetrics) over HTTP, served on the event loop.

prometheus-client's own server takes a thread per connection and never times one out: 200 idle
sockets were 200 threads. Here a connection costs a coroutine; its request must arrive within
`request_timeout_s`, at most `max_connections` are open at once (more get 503 and are closed),
and each scrape is answered, then the connection closed. Rendering runs in a worker thread (a
multiprocess collector reads files). It serves whatever registry it is given, so a supervisor
process can serve the `MultiProcessCollector` registry of its workers the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 << 10  # request line and headers; a scrape sends a few hundred bytes


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, *, request_timeout_s: float = 5.0, max_connections: int = 512):
        self.registry = registry
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the port. Raises OSError."""
        self._server = await asyncio.start_server(self._connection, host.strip("[]"), port, limit=MAX_REQUEST_HEAD)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > self.max_connections:
                await self._respond(writer, "503 Service Unavailable", b"too many connections\n")
                return
            async with asyncio.timeout(self.request_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
            await self._answer(head, writer)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # a silent, slow, broken or oversized request: close the connection
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), self.request_timeout_s)

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            await self._respond(writer, "405 Method Not Allowed", b"GET or HEAD\n", [("Allow", "GET, HEAD")])
            return
        params = parse_qs(urlsplit(target).query)
        body, content_type = await asyncio.get_running_loop().run_in_executor(
            None, self._render, headers.get("accept", ""), params.get("name[]", [])
        )
        extra = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            extra.append(("Content-Encoding", "gzip"))
        await self._respond(writer, "200 OK", body, extra, send_body=method == "GET")

    def _render(self, accept: str, names: list[str]) -> tuple[bytes, str]:
        """Worker thread: the registry (or the named metrics of it) in the format the scraper asked for."""
        encoder, content_type = choose_encoder(accept)
        registry = self.registry.restricted_registry(names) if names else self.registry
        return encoder(registry), content_type

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: str,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
        send_body: bool = True,
    ) -> None:
        lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers or [("Content-Type", "text/plain; charset=utf-8")]]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if send_body else b""))
        async with asyncio.timeout(self.request_timeout_s):  # a scraper that does not read is dropped
            await writer.drain()

"""grpc.health.v1 as gRPC ships it, except that open Watch streams end when the server stops.

A Watch stream never ends by itself; a stopping server would wait its whole grace period for it
(client-side health checking keeps one open per connection). `end_watches()` ends them, after
they have sent NOT_SERVING. Wraps grpcio-health-checking's servicer rather than re-implementing it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer:
    """Registered with `health_pb2_grpc.add_HealthServicer_to_server` like gRPC's own."""

    def __init__(self) -> None:
        self._health = health.aio.HealthServicer()
        self._ended = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        watching = asyncio.ensure_future(self._health.Watch(request, context))
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({watching, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            ended.cancel()
        if watching.done() and not watching.cancelled():
            watching.result()

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await self._health.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        await self._health.enter_graceful_shutdown()

    def end_watches(self) -> None:
        self._ended.set()

    def __getattr__(self, name: str) -> Any:
        """Everything else (Check, List, ...) is gRPC's own."""
        return getattr(self._health, name)

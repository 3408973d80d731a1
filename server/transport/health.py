"""grpc.health.v1 as gRPC ships it, except that open Watch streams end when the server stops.

A Watch stream never ends by itself; a stopping server would wait its whole grace period for it
(client-side health checking keeps one open per connection). `end_watches()` ends them, after
they have sent NOT_SERVING.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._ended = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({watching, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            ended.cancel()
        if watching.done() and not watching.cancelled():
            watching.result()

    def end_watches(self) -> None:
        self._ended.set()

"""Counts the unary calls that gRPC ends before the servicer sees them.

gRPC reads a unary call's message after the call has arrived. If the call's deadline passes (or
its client goes) while the message is still arriving, as a deadline of a few milliseconds on a
busy event loop does, gRPC ends the call itself and no servicer code runs, so nothing would count
it. This interceptor runs for every call as it arrives, in the task gRPC handles it with, and when
that task ends counts a call whose handler never started: as DEADLINE_EXCEEDED, what such a call
nearly always is, under the model label UNREAD (its message, which names the model, never came).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

UNREAD = "(unread)"  # the model label of a call whose message never arrived


class UnreadCallCounter(grpc.aio.ServerInterceptor):
    def __init__(self, count: Callable[[str], None], methods: Collection[str]):
        self._count = count  # called with the method's short name ("Classify")
        self._methods = frozenset(methods)  # full names: "/mobiserve.v1.Classifier/Classify"

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        task = asyncio.current_task()
        if handler is None or handler.unary_unary is None or details.method not in self._methods or task is None:
            return handler
        inner, started = handler.unary_unary, asyncio.Event()

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started.set()
            return await inner(request, context)

        name = details.method.rpartition("/")[2]
        task.add_done_callback(lambda _: None if started.is_set() else self._count(name))
        return handler._replace(unary_unary=behavior)

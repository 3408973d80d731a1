"""The asyncio client: `Client`'s methods as coroutines, on one grpc.aio channel.

Reading files and decoding PIL images happen in a worker thread, so the event loop never
blocks on them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType

import grpc

from mobiserve.client import _health
from mobiserve.client._base import DEFAULT_MAX_IN_FLIGHT, DEFAULT_TOP_K, ClientBase, Priority, StreamState
from mobiserve.client._errors import ModelNotFound, translated
from mobiserve.client._images import ImageLike, image_of, is_cheap
from mobiserve.client._options import ChannelOptions
from mobiserve.client._results import Classification, ModelInfo, classification_of, model_info_of
from mobiserve.client._shrink import check as check_shrink
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc


class AsyncClient(ClientBase):
    """An asyncio client over one grpc.aio channel; `async with AsyncClient(...) as c:`.

    It may be made anywhere, also at import time with no event loop running (as web backends make
    their HTTP clients): its channels open on its first call, in that call's event loop, and it
    then belongs to that loop; a call from another loop raises a RuntimeError that says so,
    rather than gRPC's "attached to a different loop". The settings are `ClientBase`'s.
    """

    _opens_at_once = False
    _loop: asyncio.AbstractEventLoop | None = None

    def _bound(self) -> None:
        """Open the channels in the running loop on the first call; refuse calls from another loop."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._open()
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "mobiserve AsyncClient: this client's channels belong to the event loop of its first call, and "
                "this call runs in another loop. Use one client per event loop: in a web backend, make it in the "
                "app's lifespan (docs/client.md, 'In a web backend')"
            )

    @property
    def _stub(self) -> pb_grpc.ClassifierStub:
        self._bound()
        return next(self._stubs)

    def _channel(self, options: ChannelOptions, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    async def classify(
        self,
        image: ImageLike,
        *,
        top_k: int = DEFAULT_TOP_K,
        model: str | None = None,
        timeout: float | None = None,
        priority: Priority | None = None,
        shrink: str | None = None,
    ) -> Classification:
        """Classify one image. `model` None: the server's default. `priority`: "interactive" or
        "bulk" (None: the call's default, interactive). `shrink`: as in `Client.classify` (done in a
        worker thread). Raises a `MobiserveError`."""
        check_shrink(shrink)
        request = self._request(await _image(image, shrink), top_k, model, uuid.uuid4().hex, priority)
        with translated():
            response = await self._stub.Classify(
                request, timeout=self._timeout(timeout), wait_for_ready=self.wait_for_ready
            )
        return classification_of(response)

    async def classify_many(
        self,
        images: Iterable[ImageLike] | AsyncIterable[ImageLike],
        *,
        top_k: int = DEFAULT_TOP_K,
        model: str | None = None,
        ordered: bool = True,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout: float | None = None,
        priority: Priority | None = None,
        shrink: str | None = None,
    ) -> AsyncIterator[Classification]:
        """`Client.classify_many` as an async generator; `images` may also be an async iterable.

        A plain iterable is iterated on the event loop, so it should not block.
        """
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        check_shrink(shrink)
        state = StreamState(ordered)
        window = asyncio.Semaphore(max_in_flight)

        async def requests() -> AsyncIterator[pb.ClassifyRequest]:
            iterator = _aiter(images)
            index = 0
            while True:
                await window.acquire()  # the backpressure: nothing is read past the window
                try:
                    image = await anext(iterator)
                    request = self._request(await _image(image, shrink), top_k, model, str(index), priority)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    state.failure = exc
                    return
                yield request
                index += 1

        call = self._stub.ClassifyStream(requests(), timeout=timeout, wait_for_ready=self.wait_for_ready)
        try:
            with translated():
                async for response in call:
                    for result in state.answers(response):
                        window.release()
                        yield result
            state.finish()
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        with translated():
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout), wait_for_ready=self.wait_for_ready
            )
        return [model_info_of(m) for m in response.models]

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health (the standard gRPC health service): "SERVING", "NOT_SERVING" (loading,
        draining) or "SERVICE_UNKNOWN"; `service` "" is the whole server. Raises `Unavailable`
        when nothing answers."""
        self._bound()
        try:
            with translated():
                return _health.decode(await self._check(_health.encode(service), timeout=self._timeout(timeout)))
        except ModelNotFound:  # NOT_FOUND: the server knows no such service
            return _health.UNKNOWN_SERVICE

    async def close(self) -> None:
        if self._loop is None:
            return  # never used: nothing was opened
        for channel in [*self._channels, self._health_channel]:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def _image(image: ImageLike, shrink: str | None = None) -> pb.Image:
    return image_of(image, shrink) if is_cheap(image, shrink) else await asyncio.to_thread(image_of, image, shrink)


async def _aiter(images: Iterable[ImageLike] | AsyncIterable[ImageLike]) -> AsyncIterator[ImageLike]:
    if isinstance(images, AsyncIterable):
        async for image in images:
            yield image
    else:
        for image in images:
            yield image

"""The blocking client."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator
from types import TracebackType

import grpc

from mobiserve.client import _health
from mobiserve.client._base import DEFAULT_MAX_IN_FLIGHT, DEFAULT_TOP_K, ClientBase, Priority, StreamState
from mobiserve.client._errors import ModelNotFound, translated
from mobiserve.client._images import ImageLike, image_of
from mobiserve.client._options import ChannelOptions
from mobiserve.client._results import Classification, ModelInfo, classification_of, model_info_of
from mobiserve.client._shrink import check as check_shrink
from mobiserve.v1 import classifier_pb2 as pb


class Client(ClientBase):
    """A blocking client over one gRPC channel; thread-safe; a context manager.

    The settings are `ClientBase`'s: `Client(target, timeout=30, retry=RetryPolicy(), ...)`.
    """

    def _channel(self, options: ChannelOptions, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials, options=options)

    def classify(
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
        "bulk" (None: the call's default, interactive). `shrink` "resize" or "crop": scale the image
        down here, as the server would (same answer; needs Pillow; docs/client.md). Raises a
        `MobiserveError`."""
        check_shrink(shrink)
        request = self._request(image_of(image, shrink), top_k, model, uuid.uuid4().hex, priority)
        with translated():
            response = self._stub.Classify(request, timeout=self._timeout(timeout), wait_for_ready=self.wait_for_ready)
        return classification_of(response)

    def classify_many(
        self,
        images: Iterable[ImageLike],
        *,
        top_k: int = DEFAULT_TOP_K,
        model: str | None = None,
        ordered: bool = True,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout: float | None = None,
        priority: Priority | None = None,
        shrink: str | None = None,
    ) -> Iterator[Classification]:
        """Classify many images over one ClassifyStream, up to `max_in_flight` at a time.

        Yields in input order, or as answers arrive with `ordered=False` (`input_index` tells
        which). At most `max_in_flight` images are read ahead of what the caller has taken, so
        an endless iterator runs in bounded memory. `images` is consumed on a gRPC thread.
        `timeout` bounds the whole stream (default: none; the server still bounds each image).
        A failed image raises its `MobiserveError` (with `input_index`) when its turn comes.
        `priority`: "interactive" or "bulk" (None: the stream's default, bulk: the server serves
        it in its bulk lane, beside interactive calls, and stops reading the stream while that
        lane is full).
        `shrink`: as in `classify`.
        """
        check_shrink(shrink)
        state = StreamState(ordered)
        window = _Window(max_in_flight)

        def requests() -> Iterator[pb.ClassifyRequest]:
            iterator = iter(images)
            index = 0
            while window.acquire():  # blocks gRPC's sending thread: the backpressure
                try:
                    image = next(iterator)
                    request = self._request(image_of(image, shrink), top_k, model, str(index), priority)
                except StopIteration:
                    return
                except Exception as exc:
                    state.failure = exc
                    return
                yield request
                index += 1

        call = self._stub.ClassifyStream(requests(), timeout=timeout, wait_for_ready=self.wait_for_ready)
        try:
            with translated():
                for response in call:
                    for result in state.answers(response):
                        window.release()
                        yield result
            state.finish()
        finally:
            call.cancel()
            window.close()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        with translated():
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout), wait_for_ready=self.wait_for_ready
            )
        return [model_info_of(m) for m in response.models]

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health (the standard gRPC health service): "SERVING", "NOT_SERVING" (loading,
        draining) or "SERVICE_UNKNOWN"; `service` "" is the whole server. Raises `Unavailable`
        when nothing answers."""
        try:
            with translated():
                return _health.decode(self._check(_health.encode(service), timeout=self._timeout(timeout)))
        except ModelNotFound:  # NOT_FOUND: the server knows no such service
            return _health.UNKNOWN_SERVICE

    def close(self) -> None:
        for channel in [*self._channels, self._health_channel]:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Window:
    """A counting semaphore that `close()` opens for good, so a blocked sender never hangs."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {size}")
        self._free = size
        self._closed = False
        self._changed = threading.Condition()

    def acquire(self) -> bool:
        """Wait for a free slot; False once closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._free > 0 or self._closed)
            if self._closed:
                return False
            self._free -= 1
            return True

    def release(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

"""Load-test a mobiserve server from Locust: `ClassifierUser`, a Locust user that calls it.

    from mobiserve.client.locust import ClassifierUser

    class Classify(ClassifierUser):
        images = "images/"                  # a folder; the default is $MOBISERVE_IMAGES
        tasks = [ClassifierUser.classify]   # or classify_stream, or tasks of your own

`pip install "mobiserve[locust]"`, then `locust -f that.py --host 127.0.0.1:50051`. Each user opens
one `Client` (its own connection) and every call it makes is reported to Locust: named by RPC and
model ("Classify int8"), with its response time and size, and the gRPC status name as the failure
(the server's message is logged once per name and status).

Importing this module sets up gRPC's gevent integration, which must come before any gRPC channel
exists. Without it a blocking gRPC call holds Locust's whole event loop, so N users make one call
at a time and report plausible, wrong figures. A channel opened before the import is refused with
an error that says so. See docs/load-testing.md.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # importing Locust patches the standard library for gevent, which must come before init_gevent
    from locust import User, constant
except ImportError as missing:
    raise ModuleNotFoundError(
        "mobiserve.client.locust needs Locust: pip install 'mobiserve[locust]'", name="locust"
    ) from missing

import grpc
import grpc.aio
from grpc._cython import cygrpc  # only to read whether gRPC's gevent integration is on already
from grpc.experimental import gevent as grpc_gevent

from mobiserve.client._client import Client
from mobiserve.client._errors import MobiserveError, error_of_number
from mobiserve.client._options import ChannelOptions, RetryPolicy
from mobiserve.common.datasets import image_files

__all__ = ["IMAGES_ENV", "ClassifierUser", "GeventTooLate", "RpcFailure", "images_folder"]

IMAGES_ENV = "MOBISERVE_IMAGES"
log = logging.getLogger(__name__)


class GeventTooLate(RuntimeError):
    """gRPC channels existed before gRPC's gevent integration could be set up."""


def _channels_exist() -> bool:
    """Whether any gRPC channel object is alive in this process (gc tracks every instance of a
    Python class, so none is missed)."""
    return any(isinstance(o, (grpc.Channel, grpc.aio.Channel)) for o in gc.get_objects())


def _init_gevent() -> None:
    """gRPC's own rule: its gevent integration comes after gevent's patching (importing Locust did
    that) and before any gRPC object. Done once per process; a fork (Locust's `--processes`)
    inherits it."""
    if cygrpc.g_gevent_activated:
        return
    if _channels_exist():
        raise GeventTooLate(
            "gRPC channels were created before mobiserve.client.locust was imported. gRPC's gevent "
            "integration, which lets Locust's users call at the same time (without it each call blocks "
            "them all, so N users make one call at a time), must be set up before any gRPC channel exists. "
            "Import mobiserve.client.locust at the top of the locustfile, before anything that creates a "
            "Client or a channel."
        )
    grpc_gevent.init_gevent()


_init_gevent()


def images_folder(folder: str | os.PathLike[str] | None = None) -> Path:
    """The folder of images to send: `folder`, else $MOBISERVE_IMAGES. Raises SystemExit with a
    message naming what is wrong, so a locustfile that calls it at import stops with one line."""
    if folder is None:
        value = os.environ.get(IMAGES_ENV)
        if not value:
            raise SystemExit(f"{IMAGES_ENV} is not set: set it to a folder of images to send (JPEG, PNG, ...)")
        where = f"{IMAGES_ENV}={value}"
    else:
        value, where = os.fspath(folder), f"images={folder}"
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SystemExit(f"{where}: no such folder")
    if not image_files(path):
        raise SystemExit(f"{where}: no image files in that folder (.jpg, .png, .webp, ...)")
    return path


class RpcFailure(Exception):
    """A failed call as Locust records it. Its repr, which Locust groups failures by, is the gRPC
    status name alone ("NOT_FOUND"): the server's messages vary (counts, indexes) and would split
    one kind of failure into many rows. `details` keeps the message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code.name, details)
        self.code = code
        self.status: str = code.name
        self.details = details

    def __repr__(self) -> str:
        return self.status

    def __str__(self) -> str:
        return f"{self.status}: {self.details}" if self.details else self.status


class _Reporter(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Reports every call on a user's channels to Locust's request event.

    Unary calls are one request each. A ClassifyStream is one request per image, timed from
    when gRPC takes the image from the request iterator to its answer, so its rate counts images.
    """

    def __init__(self, user: ClassifierUser):
        self._user = user

    def report(self, rpc: str, model: str, started: float, length: int, failure: RpcFailure | None) -> None:
        took = time.perf_counter() - started
        name = f"{rpc} {model}" if model else rpc
        if failure is not None and (name, failure.status) not in _told:
            _told.add((name, failure.status))  # Locust shows the status; the server's words, once
            log.warning("%s failed: %s", name, failure)
        self._user.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=took * 1000,
            response_length=length,
            response=None,
            context=self._user.context(),
            exception=failure,
            start_time=time.time() - took,
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        started = time.perf_counter()
        rpc, model = _rpc_name(details.method), getattr(request, "model", "")

        def done(outcome: Any) -> None:  # at once for blocking calls; when it ends for a .future()
            code = outcome.code()
            if code is grpc.StatusCode.OK:
                self.report(rpc, model, started, _size(outcome.result()), None)
            else:
                self.report(rpc, model, started, 0, RpcFailure(code, outcome.details() or ""))

        outcome = continuation(details, request)
        outcome.add_done_callback(done)
        return outcome

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        stream = _Stream(self, _rpc_name(details.method))
        return stream.attach(continuation(details, stream.sending(requests)))


_told: set[tuple[str, str]] = set()  # (name, status) whose first message was logged, in this process


class _Stream:
    """One reported stream: the images in flight by request id, and the call it wraps."""

    def __init__(self, reporter: _Reporter, rpc: str):
        self._reporter = reporter
        self._rpc = rpc
        self._sent: dict[str, tuple[float, str]] = {}  # request id -> (when sent, model)
        self._model = ""
        self._cancelled = False
        self._call: Any = None

    def sending(self, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            self._model = request.model
            self._sent[request.request_id] = (time.perf_counter(), request.model)
            yield request

    def attach(self, call: Any) -> _Stream:
        self._call = call
        return self

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Any:
        try:
            response = next(self._call)
        except grpc.RpcError as exc:
            if not self._cancelled:  # the call failed: so did every image still in flight
                failure = RpcFailure(exc.code(), exc.details() or "")
                for started, model in list(self._sent.values()) or [(time.perf_counter(), self._model)]:
                    self._reporter.report(self._rpc, model, started, 0, failure)
                self._sent.clear()
            raise
        started, model = self._sent.pop(response.request_id, (time.perf_counter(), response.model))
        error = None
        if response.HasField("error"):
            error = RpcFailure(error_of_number(response.error.code, "").code, response.error.message)
        self._reporter.report(self._rpc, model, started, response.ByteSize(), error)
        return response

    def cancel(self) -> bool:
        """The caller gave up on the stream: what was still in flight is not the server's failure."""
        self._cancelled = True
        self._sent.clear()
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:  # the rest of grpc.Call: code(), details(), ...
        return getattr(self._call, name)


def _rpc_name(method: str | bytes) -> str:
    """'/mobiserve.v1.Classifier/Classify' -> 'Classify'."""
    text = method.decode() if isinstance(method, bytes) else method
    return text.rsplit("/", 1)[-1]


def _size(response: Any) -> int:
    return len(response) if isinstance(response, bytes) else int(response.ByteSize())


class _ReportedClient(Client):
    """A `Client` whose channels report every call through the user's `_Reporter`."""

    def __init__(self, reporter: _Reporter, target: str | None, **settings: Any):
        self._reporter = reporter  # before Client.__init__, which opens the channels
        super().__init__(target, **settings)

    def _channel(self, options: ChannelOptions, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        return grpc.intercept_channel(super()._channel(options, credentials), self._reporter)


class ClassifierUser(User):
    """A Locust user that classifies images with mobiserve, one `Client` per user.

    Configure by subclassing: `images` (a folder; None: $MOBISERVE_IMAGES), `top_k`, `model`
    (None: the server's default, asked once per user), `timeout` (seconds, per call; for a
    stream, the whole stream), `stream_length` (images per stream), `retry` (gRPC retries; none
    by default, so a load test sees every refusal). `--host HOST:PORT` is the server (without
    it, $MOBISERVE_TARGET, else 127.0.0.1:50051).

    Like Locust's HttpUser it declares no task itself: `classify` (one image, one Classify call)
    and `classify_stream` (`stream_length` images over one ClassifyStream, pipelined) are the
    tasks to pick, e.g. `tasks = [ClassifierUser.classify]`, or to call from your own. Your
    tasks may use `self.client`, a `mobiserve.client.Client` whose every call is reported; a
    failed call raises its `MobiserveError` after it was reported (the two tasks catch it).
    """

    abstract = True
    wait_time = constant(0)  # a closed loop: each user calls again as soon as it is answered

    images: str | os.PathLike[str] | None = None
    top_k: int = 5
    model: str | None = None
    timeout: float | None = 30.0
    stream_length: int = 8
    retry: RetryPolicy | None = None

    client: Client

    def on_start(self) -> None:
        paths = list(map(str, image_files(images_folder(self.images))))
        random.shuffle(paths)  # users do not all send the same image at the same time
        self._paths = itertools.cycle(paths)
        # its own connection per user (gRPC would otherwise share one among a process's clients)
        options = (("grpc.use_local_subchannel_pool", 1),)
        reporter = _Reporter(self)
        self.client = _ReportedClient(reporter, self.host, timeout=self.timeout, retry=self.retry, options=options)
        if self.model is None:
            self.model = next(m.name for m in self.client.list_models() if m.is_default)

    def on_stop(self) -> None:
        self.client.close()

    def classify(self) -> None:
        """A task: the next image, in one Classify call."""
        try:
            self.client.classify(next(self._paths), top_k=self.top_k, model=self.model)
        except MobiserveError:
            pass  # reported already, with its status

    def classify_stream(self) -> None:
        """A task: the next `stream_length` images over one ClassifyStream, answers as they come."""
        images = itertools.islice(self._paths, self.stream_length)
        try:
            for _ in self.client.classify_many(
                images, top_k=self.top_k, model=self.model, ordered=False, timeout=self.timeout
            ):
                pass
        except MobiserveError:
            pass  # reported already, with its status

"""What the blocking and the asyncio client share: settings, requests, stream bookkeeping."""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from mobiserve.client import _health
from mobiserve.client._errors import InvalidImage, error_of_number
from mobiserve.client._options import DEFAULT_MAX_MESSAGE_BYTES, ChannelOptions, KeepAlive, RetryPolicy, channel_options
from mobiserve.client._results import Classification, classification_of
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "MOBISERVE_TARGET"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_TOP_K = 5
DEFAULT_MAX_IN_FLIGHT = 64
Priority = Literal["interactive", "bulk"]  # the server's lanes (docs/serving.md#priorities)
_PRIORITIES: dict[str | None, pb.Priority.ValueType] = {
    None: pb.PRIORITY_UNSPECIFIED,
    "interactive": pb.PRIORITY_INTERACTIVE,
    "bulk": pb.PRIORITY_BULK,
}


def default_target() -> str:
    """$MOBISERVE_TARGET, else the local default server."""
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


_SCHEME = re.compile(r"^(dns|ipv4|ipv6):(//[^/]*/)?")
_PORT = re.compile(r":(-?\d+)$")


def checked_target(target: str) -> str:
    """`target` itself, once every port in it is 1 to 65535: gRPC would dial port 99999 as 34463."""
    addresses = _SCHEME.sub("", target, count=1)
    if target.startswith("unix:"):
        return target
    for address in addresses.split(","):
        found = _PORT.search(address.strip("/"))
        if found and not 1 <= int(found[1]) <= 65535:
            raise ValueError(f"target {target!r}: port {found[1]} is not 1 to 65535")
    return target


class ClientBase:
    """Settings common to `Client` and `AsyncClient`; each opens its channels in `_channel`.

    `target`: "host:port" (default $MOBISERVE_TARGET, else 127.0.0.1:50051), or several servers
    balanced by gRPC's round_robin: "ipv4:10.0.0.1:50051,10.0.0.2:50051", "dns:///host:port".
    `timeout`: the default deadline of every unary call, in seconds.
    `wait_for_ready`: hold calls while no server is reachable (until their deadline) instead of
    failing at once with `Unavailable`.
    `retry`: gRPC's retry policy (None: no retries). `keepalive`: HTTP/2 pings (None: gRPC's
    default, off). `max_message_bytes`: both directions (the server's default is 64 MiB).
    `load_balancing`: "round_robin" or "pick_first". `credentials`: TLS (None: plaintext).
    `options`: extra gRPC channel arguments; they win over the ones above.
    `connections`: TCP connections to open to each address, calls spread over them in turn. A
    server with several worker processes (`mobiserve serve --workers N`) shares its port among
    them by connection, so one client needs at least N connections to reach every worker.
    """

    _opens_at_once = True  # the channels; the asyncio client waits for its first call, in its event loop

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        wait_for_ready: bool = False,
        retry: RetryPolicy | None = RetryPolicy(),
        keepalive: KeepAlive | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing: str = "round_robin",
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
        connections: int = 1,
    ):
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        self.target = checked_target(target or default_target())
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._max_message_bytes = max_message_bytes
        settings = channel_options(retry, keepalive, max_message_bytes, load_balancing, options)
        if connections > 1:  # channels share their connections unless each keeps its own pool
            settings.append(("grpc.use_local_subchannel_pool", 1))
        # health() must reach a server that is not SERVING too: on a channel that does not watch health
        checking = channel_options(None, keepalive, max_message_bytes, load_balancing, options, watch_health=False)
        self._open = functools.partial(self._open_channels, settings, checking, credentials, connections)
        self._channels: list[Any] = []
        if self._opens_at_once:
            self._open()

    def _open_channels(
        self,
        settings: ChannelOptions,
        checking: ChannelOptions,
        credentials: grpc.ChannelCredentials | None,
        connections: int,
    ) -> None:
        """Open the channels (the blocking client at once, the asyncio one on its first call)."""
        self._channels = [self._channel(settings, credentials) for _ in range(connections)]
        self._stubs = itertools.cycle([pb_grpc.ClassifierStub(c) for c in self._channels])
        self._health_channel = self._channel(checking, credentials)
        self._check = self._health_channel.unary_unary(_health.CHECK)

    def _channel(self, options: ChannelOptions, credentials: grpc.ChannelCredentials | None) -> Any:
        raise NotImplementedError

    @property
    def _stub(self) -> pb_grpc.ClassifierStub:
        """The next connection's stub, in turn (next() on a cycle is atomic: threads may share it)."""
        return next(self._stubs)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _request(
        self, image: pb.Image, top_k: int, model: str | None, request_id: str, priority: Priority | None = None
    ) -> pb.ClassifyRequest:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if priority not in _PRIORITIES:
            raise ValueError(f"priority must be 'interactive', 'bulk' or None, got {priority!r}")
        request = pb.ClassifyRequest(
            model=model or "", images=[image], top_k=top_k, request_id=request_id, priority=_PRIORITIES[priority]
        )
        size = request.ByteSize()
        if size > self._max_message_bytes:
            # refused here: the server would refuse it too, after gRPC had retried the upload
            raise InvalidImage(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"image 0: the request is {size / 2**20:.1f} MiB, over the {self._max_message_bytes / 2**20:.1f} MiB "
                "message limit (max_message_bytes); send the encoded file rather than raw pixels",
            )
        return request


@dataclass
class StreamState:
    """One `classify_many`: matches answers to inputs and releases them in order, or as they come.

    Request ids are the inputs' positions. A local failure (an unreadable file, an iterator that
    raises) ends the request stream; it is raised once everything sent before it was answered.
    """

    ordered: bool
    next_index: int = 0
    held: dict[int, pb.ClassifyResponse] = field(default_factory=dict)
    failure: BaseException | None = None

    def answers(self, response: pb.ClassifyResponse) -> Iterator[Classification]:
        """The results this response makes ready; raises for a failed one when its turn comes."""
        index = int(response.request_id)
        if not self.ordered:
            yield self._result(index, response)
            return
        self.held[index] = response
        while self.next_index in self.held:
            yield self._result(self.next_index, self.held.pop(self.next_index))
            self.next_index += 1

    def finish(self) -> None:
        if self.failure is not None:
            raise self.failure

    @staticmethod
    def _result(index: int, response: pb.ClassifyResponse) -> Classification:
        if response.HasField("error"):
            raise error_of_number(response.error.code, response.error.message, index)
        return classification_of(response, index)

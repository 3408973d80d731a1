"""mobiserve's client library: a typed, thin layer over the Classifier gRPC service.

    from mobiserve.client import Client

    with Client("127.0.0.1:50051") as client:
        result = client.classify("cat.jpg")
        print(result.top.name, result.top.score)

`AsyncClient` has the same methods as coroutines. Errors are `MobiserveError` subclasses that
carry the gRPC code and the server's message. See docs/client.md.
"""

from mobiserve.client._aio import AsyncClient
from mobiserve.client._base import DEFAULT_TARGET, TARGET_ENV, Priority, default_target
from mobiserve.client._client import Client
from mobiserve.client._errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    InvalidImage,
    MobiserveError,
    ModelNotFound,
    Overloaded,
    ServerError,
    Unavailable,
)
from mobiserve.client._images import ImageLike
from mobiserve.client._options import KeepAlive, RetryPolicy
from mobiserve.client._results import Classification, ClassScore, ModelInfo, Timing

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Classification",
    "ClassScore",
    "Client",
    "DEFAULT_TARGET",
    "DeadlineExceeded",
    "ImageLike",
    "InvalidArgument",
    "InvalidImage",
    "KeepAlive",
    "MobiserveError",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "Priority",
    "RetryPolicy",
    "ServerError",
    "TARGET_ENV",
    "Timing",
    "Unavailable",
    "default_target",
]

"""What the client returns: plain frozen dataclasses, built from the response messages.

Callers get typed attributes and `dataclasses.asdict` for JSON, never protobuf objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mobiserve.v1 import classifier_pb2 as pb


@dataclass(frozen=True)
class ClassScore:
    index: int  # model output index
    wnid: str  # WordNet id, e.g. "n01440764"
    name: str  # human-readable class name
    score: float  # softmax probability


@dataclass(frozen=True)
class Timing:
    """Where the time went on the server (see the proto's `Timing`)."""

    queue_us: int
    preprocess_us: int
    inference_us: int
    batch_size: int
    lane: str = ""  # the server's lane that served it: "interactive" or "bulk" ("": not said)


_LANES = {pb.PRIORITY_INTERACTIVE: "interactive", pb.PRIORITY_BULK: "bulk"}


@dataclass(frozen=True)
class Classification:
    """One image's answer: `classes` is most probable first."""

    classes: tuple[ClassScore, ...]
    model: str  # the model that answered
    timing: Timing
    request_id: str
    input_index: int = 0  # position in classify_many's input (0 for classify)

    @property
    def top(self) -> ClassScore:
        return self.classes[0]


@dataclass(frozen=True)
class ModelInfo:
    """A served model, as ListModels describes it."""

    name: str
    version: str
    is_default: bool
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_name: str
    num_classes: int
    preprocessing: str
    max_batch_size: int
    max_queue_delay_ms: float
    instances: int
    intra_op_threads: int
    path: str  # the model file's name (its full path if the server exposes paths)
    max_queue_size: int
    sha256: str = ""  # of the model file; empty from servers that do not report it


def classification_of(response: pb.ClassifyResponse, input_index: int = 0) -> Classification:
    """The answer to a one-image request."""
    t = response.timing
    return Classification(
        classes=tuple(ClassScore(c.index, c.wnid, c.name, c.score) for c in response.results[0].classes),
        model=response.model,
        timing=Timing(t.queue_us, t.preprocess_us, t.inference_us, t.batch_size, _LANES.get(t.lane, "")),
        request_id=response.request_id,
        input_index=input_index,
    )


def model_info_of(message: pb.ModelInfo) -> ModelInfo:
    values = {f.name: getattr(message, f.name) for f in dataclasses.fields(ModelInfo)}
    values["input_shape"] = tuple(message.input_shape)
    return ModelInfo(**values)

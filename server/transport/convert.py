"""proto <-> domain conversions, so the servicer stays a few lines per RPC."""

from __future__ import annotations

from pathlib import PurePath

from mobiserve.server.errors import InvalidInput
from mobiserve.server.processing.preprocess import INPUT_SIZE, PREPROCESSING
from mobiserve.server.serving import Classified, ImageInput, RawTensor, Servable
from mobiserve.v1 import classifier_pb2 as pb


def images_of(request: pb.ClassifyRequest) -> list[ImageInput]:
    images: list[ImageInput] = []
    for i, image in enumerate(request.images):
        kind = image.WhichOneof("data")
        if kind == "encoded":
            images.append(image.encoded)
        elif kind == "tensor":
            t = image.tensor
            images.append(RawTensor(tuple(t.shape), t.dtype, t.data))
        else:
            raise InvalidInput(f"image {i}: neither 'encoded' nor 'tensor' is set")
    return images


def response_of(request: pb.ClassifyRequest, result: Classified) -> pb.ClassifyResponse:
    t = result.timing
    return pb.ClassifyResponse(
        request_id=request.request_id,
        model=result.model,
        results=[
            pb.Classification(
                classes=[pb.Class(index=c.index, wnid=c.wnid, name=c.name, score=c.score) for c in classes]
            )
            for classes in result.results
        ],
        timing=pb.Timing(
            queue_us=t.queue_us, preprocess_us=t.preprocess_us, inference_us=t.inference_us, batch_size=t.batch_size
        ),
    )


def model_info(model: Servable, is_default: bool, *, sha256: str = "", full_path: bool = False) -> pb.ModelInfo:
    """full_path: the model's path on this machine, which only an operator's opt-in reveals;
    by default its file name (and sha256) say which model is served."""
    c = model.config
    return pb.ModelInfo(
        name=c.name,
        version=c.version,
        is_default=is_default,
        input_name=model.model.input_name,
        input_shape=[-1, 3, INPUT_SIZE, INPUT_SIZE],
        input_dtype="float32",
        output_name=model.model.output_name,
        num_classes=model.model.num_classes,
        preprocessing=PREPROCESSING,
        max_batch_size=c.max_batch_size,
        max_queue_delay_ms=c.max_queue_delay_ms,
        instances=c.instances,
        intra_op_threads=c.intra_op_threads,
        path=c.path if full_path else PurePath(c.path).name,
        max_queue_size=c.max_queue_size,
        sha256=sha256,
    )

"""proto <-> domain conversions, so the servicer stays a few lines per RPC."""

from __future__ import annotations

from pathlib import PurePath

from mobiserve.common.labels import Labels
from mobiserve.server.errors import InvalidInput
from mobiserve.server.serving import BULK, LEAST_URGENT, Classified, ImageInput, ModelDescription, RawTensor
from mobiserve.server.transport.sizes import ERROR_BYTES, FIELD, MAX_ID_BYTES, NUMBER, longest_labels
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


def level_of(priority: int) -> int:
    """A mobiserve.v1 Priority as a priority level (serving.lane_of; 0: the RPC's default)."""
    if priority == pb.PRIORITY_UNSPECIFIED:
        return 0
    if priority == pb.PRIORITY_INTERACTIVE:
        return 1
    if priority == pb.PRIORITY_BULK:
        return LEAST_URGENT
    raise InvalidInput(
        f"priority is {priority}; give 0 (PRIORITY_UNSPECIFIED: the call's default), "
        "1 (PRIORITY_INTERACTIVE) or 2 (PRIORITY_BULK)"
    )


def response_of(request_id: str, result: Classified, top_k: int) -> pb.ClassifyResponse:
    t = result.timing
    return pb.ClassifyResponse(
        request_id=request_id,
        model=result.model,
        results=[
            pb.Classification(classes=[pb.Class(index=c.index, wnid=c.wnid, name=c.name, score=c.score) for c in top])
            for top in result.top(top_k)
        ],
        timing=pb.Timing(
            queue_us=t.queue_us,
            preprocess_us=t.preprocess_us,
            inference_us=t.inference_us,
            batch_size=t.batch_size,
            lane=pb.PRIORITY_BULK if t.lane == BULK else pb.PRIORITY_INTERACTIVE,
        ),
    )


def model_info(d: ModelDescription, is_default: bool, full_path: bool = False) -> pb.ModelInfo:
    """full_path: the model's path on this machine, which only an operator's opt-in reveals;
    by default its file name (and sha256) say which model is served."""
    return pb.ModelInfo(
        name=d.name,
        version=d.version,
        is_default=is_default,
        input_name=d.input_name,
        input_shape=list(d.input_shape),
        input_dtype=d.input_dtype,
        output_name=d.output_name,
        num_classes=d.num_classes,
        preprocessing=d.preprocessing,
        max_batch_size=d.max_batch_size,
        max_queue_delay_ms=d.max_queue_delay_ms,
        instances=d.instances,
        intra_op_threads=d.intra_op_threads,
        path=d.path if full_path else PurePath(d.path).name,
        max_queue_size=d.max_queue_size,
        sha256=d.sha256,
        priority_levels=d.priority_levels,
        interactive_levels=d.interactive_levels,
        default_priority_level=d.default_priority_level,
        bulk_max_queue_size=d.bulk_max_queue_size,
        bulk_max_batch_size=d.bulk_max_batch_size,
        bulk_min_share=d.bulk_min_share,
    )


def answer_bytes(images: int, top_k: int, model: str, labels: Labels) -> int:
    """At most how big the answer to a request with `images` and `top_k` is (transport/sizes.py)."""
    wnid, name = longest_labels(labels)
    per_class = FIELD + NUMBER + FIELD + wnid + FIELD + name + 5  # index, wnid, name, float score
    echoed = FIELD + MAX_ID_BYTES + FIELD + len(model.encode())
    return echoed + images * (FIELD + top_k * per_class) + FIELD + 5 * NUMBER + FIELD + ERROR_BYTES

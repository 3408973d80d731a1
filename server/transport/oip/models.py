"""A served model as the Open Inference Protocol describes it, face by face (names.py): metadata,
Triton's model configuration (what perf_analyzer and Triton's example clients read before they
send anything), statistics and the repository index."""

from __future__ import annotations

from pathlib import Path

from mobiserve.inference import grpc_service_pb2 as pb
from mobiserve.server.metrics import ModelStatistics
from mobiserve.server.serving import ModelDescription, ModelRegistry
from mobiserve.server.transport.oip.names import Face, every_name
from mobiserve.server.transport.oip.tensors import BYTES, FP32, Tensor, input_tensor, output_tensors

PLATFORM = "onnxruntime_onnx"  # Triton's name for what runs the model
BACKEND = "onnxruntime"
_CONFIG_TYPES = {FP32: pb.TYPE_FP32, BYTES: pb.TYPE_STRING, "UINT8": pb.TYPE_UINT8}


def model_metadata(d: ModelDescription, face: Face) -> pb.ModelMetadataResponse:
    def tensor(t: Tensor) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))

    properties = {"num_classes": str(d.num_classes), "network": d.name}
    if face.image:
        properties["preprocessing"] = d.preprocessing
    return pb.ModelMetadataResponse(
        name=face.name or d.name,
        versions=[d.version],
        platform=PLATFORM,
        inputs=[tensor(input_tensor(d, face.image))],
        outputs=[tensor(t) for t in output_tensors(d)],
        properties=properties,
    )


def model_ready(registry: ModelRegistry, model: str, version: str) -> bool:
    """Whether served model `model` is served in `version`, read as ModelInfer and ModelMetadata
    read them: no name is the default model, no version the one served."""
    served = registry.models.get(model or registry.default)
    return served is not None and version in ("", served.description.version)


def model_config(d: ModelDescription, face: Face) -> pb.ModelConfig:
    """Dims leave out the batch dimension (max_batch_size > 0). The network's input is NCHW,
    which Triton's image clients check before they preprocess for it."""
    given, (output,) = input_tensor(d, face.image), output_tensors(d)
    return pb.ModelConfig(
        name=face.name or d.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=d.max_batch_size,
        input=[
            pb.ModelInput(
                name=given.name,
                data_type=_CONFIG_TYPES[given.datatype],
                format=pb.ModelInput.FORMAT_NONE if face.image else pb.ModelInput.FORMAT_NCHW,
                dims=list(given.shape[1:]),
            )
        ],
        output=[
            pb.ModelOutput(name=output.name, data_type=_CONFIG_TYPES[output.datatype], dims=list(output.shape[1:]))
        ],
        instance_group=[pb.ModelInstanceGroup(name=d.name, count=d.instances, kind=pb.ModelInstanceGroup.KIND_CPU)],
        default_model_filename=Path(d.path).name,
        dynamic_batching=dynamic_batching(d),
    )


def dynamic_batching(d: ModelDescription) -> pb.ModelDynamicBatching:
    """The batching and priority settings in Triton's terms: each level's queue policy is its
    lane's (levels 1 .. interactive_levels: the interactive lane). An expired request is refused
    (REJECT), and a request's own `timeout` is honoured. default_priority_level 0 means: by RPC,
    ModelInfer level 1, ModelStreamInfer the last level (docs/serving.md#priorities)."""

    def policy(max_queue_size: int) -> pb.ModelQueuePolicy:
        return pb.ModelQueuePolicy(
            timeout_action=pb.ModelQueuePolicy.REJECT, allow_timeout_override=True, max_queue_size=max_queue_size
        )

    return pb.ModelDynamicBatching(
        max_queue_delay_microseconds=round(d.max_queue_delay_ms * 1000),
        priority_levels=d.priority_levels,
        default_priority_level=d.default_priority_level,
        default_queue_policy=policy(d.max_queue_size),
        priority_queue_policy={
            level: policy(d.max_queue_size if level <= d.interactive_levels else d.bulk_max_queue_size)
            for level in range(1, d.priority_levels + 1)
        },
    )


def model_statistics(d: ModelDescription, s: ModelStatistics, name: str = "") -> pb.ModelStatistics:
    """Counts and times in the protocol's terms: inference_count counts images, execution_count
    batches; success/fail/queue/compute count requests (queue: the longest wait of its images;
    compute_input: preprocessing; compute_infer: the run time of the batches it rode in). Both
    faces of a model share its batcher, so they report the same figures, under their own name."""

    def duration(count: int, seconds: float) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=count, ns=round(seconds * 1e9))

    return pb.ModelStatistics(
        name=name or d.name,
        version=d.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inferences,
        execution_count=s.executions,
        inference_stats=pb.InferStatistics(
            success=duration(s.success, s.success_s),
            fail=duration(s.fail, s.fail_s),
            queue=duration(s.queue, s.queue_s),
            compute_input=duration(s.queue, s.preprocess_s),
            compute_infer=duration(s.queue, s.compute_s),
            compute_output=duration(s.queue, 0.0),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b.size,
                compute_input=duration(b.count, 0.0),
                compute_infer=duration(b.count, b.seconds),
                compute_output=duration(b.count, 0.0),
            )
            for b in s.batches
        ],
    )


def repository_index(models: list[ModelDescription], ready: bool) -> pb.RepositoryIndexResponse:
    """Both faces of every served model, READY once the server is (there is nothing to load on
    demand: every model is loaded at start)."""
    versions = {d.name: d.version for d in models}
    state = "READY" if ready else "UNAVAILABLE"
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(name=face.name, version=versions[face.model], state=state)
            for face in every_name(versions)
        ]
    )

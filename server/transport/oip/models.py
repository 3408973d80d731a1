"""A served model as the Open Inference Protocol describes it: metadata, Triton's model
configuration (what perf_analyzer reads before it sends anything) and statistics."""

from __future__ import annotations

from pathlib import Path

from mobiserve.inference import grpc_service_pb2 as pb
from mobiserve.server.metrics import ModelStatistics
from mobiserve.server.serving import ModelDescription, ModelRegistry
from mobiserve.server.transport.oip.tensors import BYTES, FP32, Tensor, input_tensors, output_tensors

PLATFORM = "onnxruntime_onnx"  # Triton's name for what runs the model
BACKEND = "onnxruntime"
_CONFIG_TYPES = {FP32: pb.TYPE_FP32, BYTES: pb.TYPE_STRING, "UINT8": pb.TYPE_UINT8}


def model_metadata(d: ModelDescription) -> pb.ModelMetadataResponse:
    def tensor(t: Tensor) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))

    return pb.ModelMetadataResponse(
        name=d.name,
        versions=[d.version],
        platform=PLATFORM,
        inputs=[tensor(t) for t in input_tensors(d)],
        outputs=[tensor(t) for t in output_tensors(d)],
        properties={"preprocessing": d.preprocessing, "num_classes": str(d.num_classes)},
    )


def model_ready(registry: ModelRegistry, name: str, version: str) -> bool:
    """Whether `name` is served in `version`, read as ModelInfer and ModelMetadata read them: no
    name is the default model, no version the one served."""
    model = registry.models.get(name or registry.default)
    return model is not None and version in ("", model.description.version)


def model_config(d: ModelDescription) -> pb.ModelConfig:
    """Dims leave out the batch dimension (max_batch_size > 0); both inputs are optional: a
    request gives one of them."""
    (preprocessed, encoded), (output,) = input_tensors(d), output_tensors(d)
    return pb.ModelConfig(
        name=d.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=d.max_batch_size,
        input=[
            pb.ModelInput(
                name=preprocessed.name,
                data_type=_CONFIG_TYPES[preprocessed.datatype],
                format=pb.ModelInput.FORMAT_NCHW,
                dims=list(preprocessed.shape[1:]),
                optional=True,
            ),
            pb.ModelInput(
                name=encoded.name,
                data_type=_CONFIG_TYPES[encoded.datatype],
                dims=list(encoded.shape[1:]),
                optional=True,
            ),
        ],
        output=[
            pb.ModelOutput(name=output.name, data_type=_CONFIG_TYPES[output.datatype], dims=list(output.shape[1:]))
        ],
        instance_group=[pb.ModelInstanceGroup(name=d.name, count=d.instances, kind=pb.ModelInstanceGroup.KIND_CPU)],
        default_model_filename=Path(d.path).name,
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=round(d.max_queue_delay_ms * 1000)),
    )


def model_statistics(d: ModelDescription, s: ModelStatistics) -> pb.ModelStatistics:
    """Counts and times in the protocol's terms: inference_count counts images, execution_count
    batches; success/fail/queue/compute count requests (queue: the longest wait of its images;
    compute_input: preprocessing; compute_infer: the run time of the batches it rode in)."""

    def duration(count: int, seconds: float) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=count, ns=round(seconds * 1e9))

    return pb.ModelStatistics(
        name=d.name,
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

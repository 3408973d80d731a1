"""The Open Inference Protocol (KServe v2 gRPC) through Triton's own client, tritonclient.

The server is a `mobiserve serve` process, as a team's tritonclient code would meet it. (This
process could also host one: mobiserve keeps its `inference` stubs out of protobuf's default
descriptor pool, where tritonclient's live; see scripts/gen-protos.sh.) Results are checked
against the same server's `Classify` on the sample's images, and statistics against its /metrics.
"""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from mobiserve.common.labels import Labels
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import SYNSETS, ServerProcess, card_pipeline, free_port, require, serve

MODEL = "int8"  # the network: its own FP32 input
IMAGES = "int8_image"  # its image face: encoded image files
SERVICE = "inference.GRPCInferenceService"
QUEUE_LIMIT = 16  # images: the overload test fills it
FAST_SAMPLE = 24  # images compared with Classify in the fast path; the slow test takes all


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def oip_server(int8_model: Path, metrics_port: int) -> Iterator[ServerProcess]:
    proc = serve(
        "--workers",
        "1",  # one process: its statistics, its batches shared by both protocols
        "--model",
        f"{MODEL}={int8_model}",
        "--synsets",
        str(require(SYNSETS)),
        "--max-queue-size",
        str(QUEUE_LIMIT),
        "--metrics-port",
        str(metrics_port),
    )
    yield proc
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.log[-2000:]


@pytest.fixture(scope="module")
def client(oip_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=oip_server.target) as c:
        yield c


@pytest.fixture(scope="module")
def classifier(oip_server: ServerProcess) -> Iterator[pb_grpc.ClassifierStub]:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(oip_server.target, options=options) as ch:
        yield pb_grpc.ClassifierStub(ch)


@pytest.fixture(scope="module")
def labels() -> Labels:
    return Labels.load(require(SYNSETS))


def encoded_input(*images: bytes) -> triton.InferInput:
    tensor = triton.InferInput("encoded_image", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
    return tensor


def fp32_input(batch: np.ndarray) -> triton.InferInput:
    return tensor_input("input", batch, "FP32")


def tensor_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    return triton.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array)


def parse_classes(result: triton.InferResult, name: str = "output") -> list[list[tuple[float, int, str]]]:
    """The classification extension's "score:index:label" strings, per image."""
    rows = result.as_numpy(name)
    assert rows is not None
    parsed = []
    for row in rows:
        parsed.append([(float(s), int(i), label) for s, i, label in (e.decode().split(":", 2) for e in row)])
    return parsed


def classify_top5(classifier: pb_grpc.ClassifierStub, *images: bytes) -> list[list[int]]:
    response = classifier.Classify(
        pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=b) for b in images], top_k=5), timeout=60
    )
    return [[c.index for c in r.classes] for r in response.results]


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


def metric(port: int, name: str, default: float | None = None, **labels: str) -> float:
    """One sample of the server's /metrics, summed over the label sets that match (`default`
    when there is none yet, if given)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total, found = total + float(m.group(2)), True
    if not found and default is not None:
        return default
    assert found, f"no sample {name}{labels} in /metrics"
    return total


# --- health, metadata, configuration ------------------------------------------------------------


def test_live_ready_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    assert meta.name == "mobiserve" and meta.version
    assert {"classification", "model_configuration", "statistics"} <= set(meta.extensions)


def test_each_model_is_a_network_and_its_image_face(client: triton.InferenceServerClient) -> None:
    """The network under its own name with its one tensor input, as Triton serves a network; the
    JPEG path under NAME_image, listed beside it and described the same way."""
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "1", "READY"), (IMAGES, "1", "READY")]
    for name, (tensor, datatype, shape) in {
        MODEL: ("input", "FP32", [-1, 3, 224, 224]),
        IMAGES: ("encoded_image", "BYTES", [-1, 1]),
    }.items():
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        assert meta.name == name and list(meta.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [(tensor, datatype, shape)]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output", "FP32", [-1, 1000])]


def triton_parse_model(
    meta: tpb.ModelMetadataResponse, config: tpb.model__config__pb2.ModelConfig
) -> tuple[int, str, str, int, int, int, int, str]:
    """The checks Triton's image_client.py and grpc_image_client.py make in `parse_model` before
    they send anything, written again here: one input of 3 dimensions (plus batch), FORMAT_NCHW or
    FORMAT_NHWC, one FP32 output that is a vector. Returns what they take from the model."""
    assert len(meta.inputs) == 1, f"expecting 1 input, got {len(meta.inputs)}"
    assert len(meta.outputs) == 1, f"expecting 1 output, got {len(meta.outputs)}"
    assert len(config.input) == 1, f"expecting 1 input in model configuration, got {len(config.input)}"
    image, output, image_config = meta.inputs[0], meta.outputs[0], config.input[0]
    assert output.datatype == "FP32", output.datatype
    batched = config.max_batch_size > 0
    assert sum(1 for dim in list(output.shape)[int(batched) :] if dim > 1) <= 1, "expecting the output to be a vector"
    assert len(image.shape) == 3 + int(batched), list(image.shape)
    formats = tpb.model__config__pb2.ModelInput
    assert image_config.format in (formats.FORMAT_NCHW, formats.FORMAT_NHWC), image_config.format
    dims = list(image.shape)[int(batched) :]
    c, h, w = dims if image_config.format == formats.FORMAT_NCHW else (dims[2], dims[0], dims[1])
    return config.max_batch_size, image.name, output.name, c, h, w, image_config.format, image.datatype


def inception_scaled(path: Path, c: int, h: int, w: int) -> np.ndarray:
    """image_client.py's preprocessing with `-s INCEPTION`: RGB, resized to w x h, to [-1, 1], CHW."""
    pixels = np.asarray(Image.open(path).convert("RGB").resize((w, h), Image.Resampling.BILINEAR), np.float32)
    assert c == 3
    return (pixels / 127.5 - 1).transpose(2, 0, 1)


def test_triton_image_clients_find_the_network_and_its_image_face(
    client: triton.InferenceServerClient,
    classifier: pb_grpc.ClassifierStub,
    oip_server: ServerProcess,
    sample_images: list[Path],
) -> None:
    """The calls Triton's image_client.py makes (`-m int8`, sync, `-a` and `--streaming`) and
    ensemble_image_client.py makes (`-m int8_image`), with their checks: each prints PASS here."""
    meta, config = client.get_model_metadata(MODEL), client.get_model_config(MODEL).config
    max_batch, input_name, output_name, c, h, w, _, datatype = triton_parse_model(meta, config)
    assert (max_batch, input_name, output_name, (c, h, w), datatype) == (32, "input", "output", (3, 224, 224), "FP32")
    images = sample_images[:4]
    batch = np.stack([inception_scaled(p, c, h, w) for p in images])
    logits = client.infer(MODEL, [tensor_input(input_name, batch, datatype)]).as_numpy(output_name)
    assert logits is not None

    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]] = queue.Queue()
    inputs, outputs = (
        [tensor_input(input_name, batch, datatype)],
        [triton.InferRequestedOutput(output_name, class_count=2)],
    )
    results = [client.infer(MODEL, inputs, request_id="1", outputs=outputs)]
    client.async_infer(
        MODEL, inputs, lambda result, error: answers.put((result, error)), request_id="2", outputs=outputs
    )
    with triton.InferenceServerClient(url=oip_server.target) as streaming:
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)))
        streaming.async_stream_infer(MODEL, inputs, request_id="3", outputs=outputs)
        for _ in range(2):
            result, error = answers.get(timeout=60)
            assert error is None and result is not None, error
            results.append(result)
        streaming.stop_stream()
    assert sorted(r.get_response().id for r in results) == ["1", "2", "3"]
    for result in results:
        classes = parse_classes(result, output_name)
        assert len(classes) == len(images) and all(len(row) == 2 for row in classes)
        assert [row[0][1] for row in classes] == [int(np.argmax(row)) for row in logits]

    # ensemble_image_client.py: one input (the file's bytes, [batch, 1]), every output asked for
    meta, config = client.get_model_metadata(IMAGES), client.get_model_config(IMAGES).config
    assert len(meta.inputs) == 1 and len(config.input) == 1
    files = np.stack([np.array([p.read_bytes()], dtype=bytes) for p in images[: config.max_batch_size]])
    tensor = triton.InferInput(meta.inputs[0].name, list(files.shape), "BYTES")
    tensor.set_data_from_numpy(files)
    result = client.infer(
        IMAGES, [tensor], outputs=[triton.InferRequestedOutput(o.name, class_count=3) for o in meta.outputs]
    )
    (name,) = [o.name for o in meta.outputs]
    want = classify_top5(classifier, *(p.read_bytes() for p in images))
    assert [[i for _, i, _ in row] for row in parse_classes(result, name)] == [row[:3] for row in want]


def test_model_config_is_what_perf_analyzer_reads(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config(MODEL).config
    assert config.name == MODEL and config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    dims = [(i.name, i.data_type, list(i.dims), i.format) for i in config.input]
    assert dims == [
        ("input", tpb.model__config__pb2.TYPE_FP32, [3, 224, 224], tpb.model__config__pb2.ModelInput.FORMAT_NCHW)
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [1000])]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    images = client.get_model_config(IMAGES).config
    assert images.name == IMAGES and images.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in images.input] == [
        ("encoded_image", tpb.model__config__pb2.TYPE_STRING, [1])
    ]
    assert [(o.name, list(o.dims)) for o in images.output] == [("output", [1000])]


def test_unknown_model_is_not_found(client: triton.InferenceServerClient, jpeg: bytes) -> None:
    for call in (
        partial(client.get_model_metadata, "no-such-model"),
        partial(client.get_model_config, "no-such-model"),
        partial(client.infer, "no-such-model", [encoded_input(jpeg)]),
        partial(client.infer, "no-such-model_image", [encoded_input(jpeg)]),
    ):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert status_of(e.value) == "StatusCode.NOT_FOUND" and "no-such-model" in e.value.message()


# --- inference -----------------------------------------------------------------------------------


def test_jpeg_bytes_give_classify_top5(
    client: triton.InferenceServerClient, classifier: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    for path in sample_images[:FAST_SAMPLE]:
        data = path.read_bytes()
        result = client.infer(
            IMAGES, [encoded_input(data)], outputs=[triton.InferRequestedOutput("output", class_count=5)]
        )
        (classes,) = parse_classes(result)
        assert [i for _, i, _ in classes] == classify_top5(classifier, data)[0], path.name


def test_output_tensor_is_the_models_raw_output(
    client: triton.InferenceServerClient, classifier: pb_grpc.ClassifierStub, jpeg: bytes
) -> None:
    result = client.infer(IMAGES, [encoded_input(jpeg)], request_id="logits-1")
    logits = result.as_numpy("output")
    assert logits is not None and logits.dtype == np.float32 and logits.shape == (1, 1000)
    assert result.get_response().id == "logits-1" and result.get_response().model_name == IMAGES
    assert list(np.argsort(-logits[0])[:5]) == classify_top5(classifier, jpeg)[0]
    probabilities = np.exp(logits[0] - logits[0].max())
    probabilities /= probabilities.sum()
    score = classifier.Classify(pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=jpeg)], top_k=1)).results[0]
    assert probabilities[score.classes[0].index] == pytest.approx(score.classes[0].score, rel=1e-4)


def test_class_count_gives_score_index_label(client: triton.InferenceServerClient, labels: Labels, jpeg: bytes) -> None:
    result = client.infer(IMAGES, [encoded_input(jpeg)], outputs=[triton.InferRequestedOutput("output", class_count=3)])
    raw = result.get_response().outputs
    assert [(t.datatype, list(t.shape)) for t in raw] == [("BYTES", [1, 3])]
    (classes,) = parse_classes(result)
    logits = client.infer(IMAGES, [encoded_input(jpeg)]).as_numpy("output")
    assert logits is not None
    assert [i for _, i, _ in classes] == list(np.argsort(-logits[0])[:3])
    for score, index, label in classes:
        assert label == labels.names[index]
        assert score == pytest.approx(float(logits[0][index]), abs=1e-5)


def test_a_batch_of_images_in_one_request(
    client: triton.InferenceServerClient, classifier: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    images = [p.read_bytes() for p in sample_images[:8]]
    result = client.infer(IMAGES, [encoded_input(*images)], outputs=[triton.InferRequestedOutput("output", 5)])
    assert [[i for _, i, _ in c] for c in parse_classes(result)] == classify_top5(classifier, *images)
    logits = client.infer(IMAGES, [encoded_input(*images)]).as_numpy("output")
    assert logits is not None and logits.shape == (8, 1000)


def test_fp32_tensors_give_classify_top5(
    client: triton.InferenceServerClient, classifier: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    batch = np.stack([card_pipeline(p) for p in sample_images[:4]]).astype(np.float32)
    assert batch.shape == (4, 3, 224, 224)
    result = client.infer(MODEL, [fp32_input(batch)], outputs=[triton.InferRequestedOutput("output", 5)])
    got = [[i for _, i, _ in c] for c in parse_classes(result)]
    tensors = [pb.Image(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=t.tobytes())) for t in batch]
    want = classifier.Classify(pb.ClassifyRequest(model=MODEL, images=tensors, top_k=5)).results
    assert got == [[c.index for c in r.classes] for r in want]


def test_typed_contents_are_accepted(oip_server: ServerProcess, jpeg: bytes) -> None:
    """`contents` instead of raw bytes, sent with tritonclient's own protocol messages."""
    tensor = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    with grpc.insecure_channel(oip_server.target) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        fp32 = tpb.ModelInferRequest(model_name=MODEL)
        fp32.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224]).contents.fp32_contents.extend(
            tensor.ravel().tolist()
        )
        typed = np.frombuffer(stub.ModelInfer(fp32, timeout=30).raw_output_contents[0], dtype="<f4")
        raw = tpb.ModelInferRequest(model_name=MODEL, raw_input_contents=[tensor.tobytes()])
        raw.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224])
        assert np.array_equal(typed, np.frombuffer(stub.ModelInfer(raw, timeout=30).raw_output_contents[0], "<f4"))
        encoded = tpb.ModelInferRequest(model_name=IMAGES)
        encoded.inputs.add(name="encoded_image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([jpeg] * 2)
        response = stub.ModelInfer(encoded, timeout=30)
        assert list(response.outputs[0].shape) == [2, 1000]


def test_request_parameters(client: triton.InferenceServerClient, jpeg: bytes) -> None:
    result = client.infer(IMAGES, [encoded_input(jpeg)], priority=3, timeout=10_000_000, request_id="p-1")
    assert result.get_response().id == "p-1"
    with pytest.raises(InferenceServerException) as e:  # 1 µs: over before the image is decoded
        client.infer(IMAGES, [encoded_input(jpeg)], timeout=1)
    assert status_of(e.value) == "StatusCode.DEADLINE_EXCEEDED"


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "make", "words"),
    [
        (IMAGES, lambda jpeg: [encoded_input(jpeg, b"not an image", jpeg)], "image 1"),
        (MODEL, lambda jpeg: [fp32_input(np.zeros((1, 3, 200, 200), np.float32))], "shape [1, 3, 200, 200]"),
        (MODEL, lambda jpeg: [tensor_input("input", np.zeros((1, 3, 224, 224), np.float64), "FP64")], "got FP64"),
        (
            IMAGES,
            lambda jpeg: [tensor_input("encoded_image", np.zeros((1, 1), np.float32), "FP32")],
            "is BYTES, got FP32",
        ),
        (IMAGES, lambda jpeg: [tensor_input("pixels", np.array([[jpeg]], np.object_), "BYTES")], "no input 'pixels'"),
        (MODEL, lambda jpeg: [encoded_input(jpeg)], "'encoded_image' is the input of the model 'int8_image'"),
        (
            IMAGES,
            lambda jpeg: [fp32_input(np.zeros((1, 3, 224, 224), np.float32))],
            "'input' is the input of the model 'int8'",
        ),
        (MODEL, lambda jpeg: [fp32_input(np.zeros((1, 3, 224, 224), np.float32)), encoded_input(jpeg)], "2 inputs"),
    ],
    ids=[
        "corrupt-image",
        "wrong-shape",
        "wrong-datatype",
        "bytes-as-fp32",
        "unknown-input",
        "image-to-the-network",
        "tensor-to-the-image-face",
        "two-inputs",
    ],
)
def test_bad_input_is_invalid_argument(
    client: triton.InferenceServerClient,
    jpeg: bytes,
    model: str,
    make: Callable[[bytes], list[triton.InferInput]],
    words: str,
) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, make(jpeg))
    assert status_of(e.value) == "StatusCode.INVALID_ARGUMENT"
    assert words in e.value.message() and len(e.value.message()) < 300
    assert client.is_server_ready()


BAD_UTF8 = b"\xff\xfe-not-utf8"


def with_raw_field(request: tpb.ModelInferRequest, number: int, value: bytes) -> bytes:
    """The request's wire bytes plus a length-delimited field: invalid UTF-8 in a string field,
    which protobuf's Python API refuses to write."""
    data: bytes = request.SerializeToString()
    return data + bytes([number << 3 | 2, len(value)]) + value


def jpeg_request(jpeg: bytes, request_id: str = "") -> tpb.ModelInferRequest:
    request = tpb.ModelInferRequest(model_name=IMAGES, id=request_id)
    request.inputs.add(name="encoded_image", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(jpeg)
    return request


def test_undecodable_requests_are_invalid_argument_and_counted(
    oip_server: ServerProcess, metrics_port: int, jpeg: bytes
) -> None:
    """Invalid UTF-8 in the model name or id, or a corrupt message: INVALID_ARGUMENT naming the
    message, counted; any other method's request too; the next good request is answered."""
    before = metric(metrics_port, "mobiserve_requests_total", 0.0, method="ModelInfer", code="INVALID_ARGUMENT")
    with grpc.insecure_channel(oip_server.target) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # raw bytes both ways
        metadata = ch.unary_unary("/inference.GRPCInferenceService/ModelMetadata")
        corrupt = bytes([3 << 3 | 2, 100]) + b"short"  # a field longer than the message
        for call, data in [
            (infer, with_raw_field(jpeg_request(jpeg), 1, BAD_UTF8)),
            (infer, with_raw_field(jpeg_request(jpeg), 3, BAD_UTF8)),
            (infer, corrupt),
            (metadata, with_raw_field(tpb.ModelMetadataRequest(), 1, BAD_UTF8)),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                call(data, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert "not a valid Model" in (e.value.details() or ""), e.value.details()
        good = tpb.ModelInferResponse.FromString(infer(jpeg_request(jpeg, "good").SerializeToString(), timeout=30))
        assert good.id == "good" and list(good.outputs[0].shape) == [1, 1000]
    after = metric(metrics_port, "mobiserve_requests_total", method="ModelInfer", code="INVALID_ARGUMENT")
    assert after - before == 3


def test_an_undecodable_message_in_a_stream_gets_an_error_answer_and_the_stream_goes_on(
    oip_server: ServerProcess, jpeg: bytes
) -> None:
    sent = [
        jpeg_request(jpeg, "good-1").SerializeToString(),
        with_raw_field(jpeg_request(jpeg, "bad-model"), 1, BAD_UTF8),
        with_raw_field(jpeg_request(jpeg), 3, BAD_UTF8),
        jpeg_request(jpeg, "good-2").SerializeToString(),
    ]
    with grpc.insecure_channel(oip_server.target) as ch:
        stream = ch.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=tpb.ModelStreamInferResponse.FromString,
        )
        answers = {a.infer_response.id: a for a in stream(iter(sent), timeout=60)}
    assert set(answers) == {"good-1", "bad-model", "\ufffd\ufffd-not-utf8", "good-2"}
    for request_id, answer in answers.items():
        if request_id.startswith("good"):
            assert not answer.error_message and list(answer.infer_response.outputs[0].shape) == [1, 1000]
        else:
            assert "not a valid ModelInferRequest" in answer.error_message, answer


def test_unknown_output_and_bad_class_count(client: triton.InferenceServerClient, jpeg: bytes) -> None:
    for output, words in ((triton.InferRequestedOutput("probs"), "no output 'probs'"),
                          (triton.InferRequestedOutput("output", class_count=1001), "1000 classes")):  # fmt: skip
        with pytest.raises(InferenceServerException) as e:
            client.infer(IMAGES, [encoded_input(jpeg)], outputs=[output])
        assert status_of(e.value) == "StatusCode.INVALID_ARGUMENT" and words in e.value.message()


async def test_full_queue_is_resource_exhausted(oip_server: ServerProcess, sample_images: list[Path]) -> None:
    """Requests of QUEUE_LIMIT images at once: while one holds the queue, the others are refused."""
    images = [p.read_bytes() for p in sample_images[:QUEUE_LIMIT]]
    async with triton_aio.InferenceServerClient(url=oip_server.target) as c:
        outcomes = await asyncio.gather(
            *(c.infer(IMAGES, [encoded_input(*images)], client_timeout=60) for _ in range(4)), return_exceptions=True
        )
    refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
    assert refused and len(refused) < len(outcomes)
    for exc in refused:
        assert status_of(exc) == "StatusCode.RESOURCE_EXHAUSTED" and "overloaded" in exc.message()


# --- streams -------------------------------------------------------------------------------------


def test_stream_answers_every_request_and_goes_on_after_an_error(
    oip_server: ServerProcess, classifier: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]] = queue.Queue()
    images = {f"s{i}": p.read_bytes() for i, p in enumerate(sample_images[:6])}
    images["bad"] = b"\xff\xd8 broken jpeg"
    with triton.InferenceServerClient(url=oip_server.target) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        for request_id, data in images.items():
            c.async_stream_infer(
                IMAGES, [encoded_input(data)], request_id=request_id, outputs=[triton.InferRequestedOutput("output", 5)]
            )
        got = [answers.get(timeout=60) for _ in images]
        c.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "image 0" in errors[0].message()
    results = {r.get_response().id: r for r, _ in got if r is not None}
    assert set(results) == set(images) - {"bad"}
    for request_id, result in results.items():
        assert [i for _, i, _ in parse_classes(result)[0]] == classify_top5(classifier, images[request_id])[0]


# --- statistics and metrics ----------------------------------------------------------------------


def test_statistics_agree_with_metrics(client: triton.InferenceServerClient, metrics_port: int, jpeg: bytes) -> None:
    before = client.get_inference_statistics(MODEL).model_stats[0]
    client.infer(IMAGES, [encoded_input(jpeg, jpeg, jpeg)])
    client.infer(MODEL, [fp32_input(np.zeros((1, 3, 224, 224), np.float32))])
    (stats,) = client.get_inference_statistics(MODEL).model_stats
    (face,) = client.get_inference_statistics(IMAGES).model_stats  # one batcher: the same figures
    assert face.name == IMAGES and face.inference_count == stats.inference_count
    assert stats.name == MODEL and stats.version == "1"
    assert stats.inference_count - before.inference_count == 4
    assert stats.inference_stats.success.count - before.inference_stats.success.count == 2
    assert stats.execution_count - before.execution_count in (2, 3, 4)  # 3 images ride in one batch or more
    assert stats.last_inference > 0
    assert stats.inference_count == metric(metrics_port, "mobiserve_images_total", model=MODEL)
    assert stats.execution_count == metric(metrics_port, "mobiserve_inference_duration_seconds_count", model=MODEL)
    queue_s = metric(metrics_port, "mobiserve_queue_duration_seconds_sum", model=MODEL)
    assert stats.inference_stats.queue.ns == pytest.approx(queue_s * 1e9, rel=1e-6, abs=1e3)
    infer_s = metric(metrics_port, "mobiserve_inference_duration_seconds_sum", model=MODEL)
    assert sum(b.compute_infer.ns for b in stats.batch_stats) == pytest.approx(infer_s * 1e9, rel=1e-6, abs=1e3)
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    every = client.get_inference_statistics().model_stats
    assert [s.name for s in every] == [MODEL]
    ok = metric(metrics_port, "mobiserve_requests_total", model=MODEL, method="ModelInfer", code="OK")
    assert ok >= 2


# --- the rest of the server covers the protocol --------------------------------------------------


def test_reflection_and_health_cover_the_service(oip_server: ServerProcess) -> None:
    with grpc.insecure_channel(oip_server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
        assert SERVICE in {s.name for s in listed.list_services_response.service}
        assert described.file_descriptor_response.file_descriptor_proto
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_drain_answers_what_the_stream_sent_then_ends_it(int8_model: Path, sample_images: list[Path]) -> None:
    """SIGTERM mid-stream: every request the server read is answered, then the stream ends with
    UNAVAILABLE (send the rest elsewhere) and the process exits 0."""
    proc = serve("--model", f"{MODEL}={int8_model}", "--synsets", str(require(SYNSETS)))
    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]] = queue.Queue()
    images = [p.read_bytes() for p in sample_images[:12]]
    try:
        with triton.InferenceServerClient(url=proc.target) as c:
            c.start_stream(callback=lambda result, error: answers.put((result, error)))
            for i, data in enumerate(images):
                c.async_stream_infer(IMAGES, [encoded_input(data)], request_id=str(i))
            got = [answers.get(timeout=60)]  # the stream is being served
            proc.signal(signal.SIGTERM)
            while got[-1][1] is None and len(got) <= len(images):
                got.append(answers.get(timeout=60))
            *answered, (_, end) = got
            assert end is not None and status_of(end) == "StatusCode.UNAVAILABLE", end
            assert answered and all(r is not None and e is None for r, e in answered)
            ids = [r.get_response().id for r, _ in answered if r is not None]
            assert len(set(ids)) == len(ids) and set(ids) <= {str(i) for i in range(len(images))}
            c.stop_stream()
        assert proc.wait(60) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_every_sample_image_agrees_with_classify(
    client: triton.InferenceServerClient, classifier: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    for start in range(0, len(sample_images), 8):
        images = [p.read_bytes() for p in sample_images[start : start + 8]]
        result = client.infer(IMAGES, [encoded_input(*images)], outputs=[triton.InferRequestedOutput("output", 5)])
        assert [[i for _, i, _ in c] for c in parse_classes(result)] == classify_top5(classifier, *images)


@pytest.mark.slow
async def test_one_batch_carries_both_protocols(int8_model: Path, sample_images: list[Path]) -> None:
    """A Classify and a ModelInfer arriving together ride in one batch: the batchers are shared."""
    proc = await asyncio.to_thread(
        serve,
        *("--workers", "1"),  # one process: the two connections could land on two workers' batchers
        *("--model", f"{MODEL}={int8_model}", "--max-batch-size", "4", "--max-queue-delay-ms", "2000"),
    )
    images = [p.read_bytes() for p in sample_images[:4]]
    try:
        async with (
            triton_aio.InferenceServerClient(url=proc.target) as c,
            grpc.aio.insecure_channel(proc.target) as ch,
        ):
            request = pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=b) for b in images[:2]], top_k=5)
            classified, inferred = await asyncio.gather(
                pb_grpc.ClassifierStub(ch).Classify(request, timeout=30),
                c.infer(IMAGES, [encoded_input(*images[2:])], outputs=[triton.InferRequestedOutput("output", 5)]),
            )
            assert classified.timing.batch_size == 4
            assert len(parse_classes(inferred)) == 2
            (stats,) = (await c.get_inference_statistics(MODEL)).model_stats
        assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(4, 1)]
        assert stats.inference_count == 4 and stats.execution_count == 1
    finally:
        await asyncio.to_thread(proc.stop)

"""Base fixtures: the shared models and images (../shared), and a real server on 127.0.0.1:0.

The models and images are never copied into the project; a test that needs them fails loudly
when they are absent rather than skipping, so a broken checkout cannot pass silently.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from mobiserve.client.bench.baseline import card_preprocess
from mobiserve.server.app import App, create_app
from mobiserve.server.config import ModelConfig, ServerConfig
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

SHARED = Path(os.environ.get("MOBISERVE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
INT8 = SHARED / "models" / "mobilenetv2-12-int8.onnx"
FP32 = SHARED / "models" / "mobilenetv2-12-fp32-dequant.onnx"
SYNSETS = SHARED / "data" / "imagenet-synsets.txt"
SAMPLE = SHARED / "data" / "imagenet-sample"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (tests read ../shared beside the project; see README)")
    return path


@pytest.fixture(scope="session")
def int8_model() -> Path:
    return require(INT8)


@pytest.fixture(scope="session")
def fp32_model() -> Path:
    return require(FP32)


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    images = sorted(require(SAMPLE).glob("*.JPEG"))
    if len(images) < 500:
        pytest.fail(f"expected the 515-image sample in {SAMPLE}, found {len(images)}")
    return images


@pytest.fixture(scope="session")
def jpeg(sample_images: list[Path]) -> bytes:
    return sample_images[0].read_bytes()


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def model_config(path: Path, name: str = "int8", **knobs: object) -> ModelConfig:
    return ModelConfig(name=name, path=str(path), synsets=str(require(SYNSETS)), **knobs).resolved()  # type: ignore[arg-type]


async def start_server(*models: ModelConfig, **settings: object) -> App:
    """A real server on an ephemeral 127.0.0.1 port, models loaded and warm."""
    app = await create_app(ServerConfig(models=models, host="127.0.0.1", port=0, **settings))  # type: ignore[arg-type]
    await app.load()
    return app


@pytest_asyncio.fixture(scope="session")
async def server(int8_model: Path) -> AsyncIterator[App]:
    """The shared int8 server for tests that do not change its settings."""
    app = await start_server(model_config(int8_model, max_batch_size=32))
    yield app
    await app.stop(grace_s=5)


@pytest_asyncio.fixture(scope="session")
async def channel(server: App) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(channel)


def card_pipeline(path_or_bytes: Path | bytes) -> np.ndarray:
    """The model card's preprocessing, written out plainly with Pillow: the reference we must match."""
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return card_preprocess(data)


def request_of(*images: bytes, **fields: object) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[pb.Image(encoded=b) for b in images], **fields)  # type: ignore[arg-type]

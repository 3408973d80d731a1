"""Base fixtures: the shared models and images (../shared), and a real server on 127.0.0.1:0.

The models and images are never copied into the project; a test that needs them fails loudly
when they are absent rather than skipping, so a broken checkout cannot pass silently. What tests
import (paths, request builders, the reference pipeline, server starters) is in helpers.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from mobiserve.server.app import App
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import FP32, INT8, SAMPLE, model_config, require, start_server


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

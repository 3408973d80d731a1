"""The server reproduces the card's pipeline: same top-1 on >= 99% of the sample, accuracy >= 0.83."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import INT8, SYNSETS, card_pipeline, request_of

pytestmark = pytest.mark.slow  # real processes or whole-sample sweeps


def reference_top1(images: list[Path]) -> dict[str, int]:
    """The card's pipeline run in-process with plain Pillow + onnxruntime, batch of 1."""
    session = ort.InferenceSession(str(INT8), providers=["CPUExecutionProvider"])
    return {p.name: int(np.argsort(-session.run(None, {"input": card_pipeline(p)[None]})[0][0])[0]) for p in images}


async def test_server_matches_the_card_pipeline(stub: pb_grpc.ClassifierStub, sample_images: list[Path]) -> None:
    reference = await asyncio.to_thread(reference_top1, sample_images)
    gate = asyncio.Semaphore(32)

    async def classify(path: Path) -> tuple[str, int]:
        async with gate:
            r = await stub.Classify(request_of(path.read_bytes()), timeout=120)
            return path.name, r.results[0].classes[0].index

    served = dict(await asyncio.gather(*(classify(p) for p in sample_images)))
    agreement = np.mean([served[k] == reference[k] for k in reference])
    index = {line.split()[0]: i for i, line in enumerate(SYNSETS.read_text().splitlines())}
    accuracy = np.mean([served[k] == index[k.split("_")[0]] for k in served])
    print(f"agreement={agreement:.4f} top1={accuracy:.4f} n={len(served)}")
    assert agreement >= 0.99
    assert accuracy >= 0.83

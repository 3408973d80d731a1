"""The runtime's sessions: small batches take the spinning session when it is free, and it
answers exactly like the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mobiserve.common.labels import Labels
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.model import SMALL_BATCH, Model
from mobiserve.server.runtime.session import SessionTuning

from helpers import SYNSETS


@pytest.fixture(scope="module")
def model(int8_model: Path) -> Model:
    return Model(int8_model, Labels.load(SYNSETS), SessionTuning(intra_op_threads=2))


def test_small_batches_take_the_spinning_session_only_when_it_is_free(model: Model) -> None:
    spinning = model._spinning
    assert spinning is not None
    for size in range(1, SMALL_BATCH + 1):
        with model._session(size) as session:
            assert session is spinning
    with model._session(SMALL_BATCH + 1) as session:
        assert session is not spinning  # larger batches: a regular session
    with model._session(1) as first, model._session(1) as second:
        assert first is spinning and second is not spinning  # busy: the next small batch goes elsewhere


def test_small_batches_score_the_same_on_either_session(model: Model, sample_images: list[Path]) -> None:
    crops = [preprocess_encoded(p.read_bytes(), ImageLimits()) for p in sample_images[:8]]
    for crop in crops:
        quick = model.infer([crop])  # the spinning session is free: it takes the batch
        with model._session(1):  # now it is busy: a regular session does
            regular = model.infer([crop])
        assert np.array_equal(quick.logits, regular.logits)
        assert np.array_equal(quick.order, regular.order)

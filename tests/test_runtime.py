"""The runtime's sessions: the spinning small-batch session answers exactly like the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import SYNSETS

from mobiserve.server.processing.labels import Labels
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning


def test_small_batches_score_the_same_on_either_session(int8_model: Path, sample_images: list[Path]) -> None:
    model = Model(int8_model, Labels.load(SYNSETS), SessionTuning(intra_op_threads=2))
    crops = [preprocess_encoded(p.read_bytes(), ImageLimits()) for p in sample_images[:8]]
    for crop in crops:
        quick = model.infer([crop])  # the spinning session is free: it takes the batch
        with model._spinning_busy:  # now it is busy: a regular session does
            regular = model.infer([crop])
        assert np.array_equal(quick.probabilities, regular.probabilities)
        assert np.array_equal(quick.order, regular.order)

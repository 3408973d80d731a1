"""The runtime's sessions: small batches take the spinning session when it is free, and it
answers exactly like the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mobiserve.common.labels import Labels
from mobiserve.server.cores import CORES_ENV, _cpu_quota, available_cores
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


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, a pod limit of 1500m
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
        ({}, None),  # no cgroup files: not limited as far as we can tell
    ],
)
def test_the_containers_cpu_quota_is_read_from_cgroup_v2_or_v1(
    tmp_path: Path, files: dict[str, str], cores: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cpu_quota(tmp_path) == cores


def test_the_cores_a_worker_is_given_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CORES_ENV, "3")
    assert available_cores() == 3

"""The runtime's sessions: small batches take the spinning all-core session when it and its
cores are free, larger ones the wide session only while no other worker needs the cores, work
that may not widen (bulk work) never takes either, and every session answers exactly like the
others; the ledger the workers share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mobiserve.common.labels import Labels
from mobiserve.server.cores import CORES_ENV, CoreLedger, _cpu_quota, available_cores, shared_slots
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.model import SMALL_BATCH, Model
from mobiserve.server.runtime.session import SessionTuning

from helpers import SYNSETS

CORES = 2


@pytest.fixture(scope="module")
def model(int8_model: Path) -> Model:
    return Model(int8_model, Labels.load(SYNSETS), SessionTuning(intra_op_threads=2))


@pytest.fixture(scope="module")
def worker(int8_model: Path) -> tuple[Model, CoreLedger]:
    """Worker 0 of two on CORES cores: one thread under load, all cores for lone requests; and
    worker 1's view of the ledger they share."""
    slots = shared_slots(2)
    ledger = CoreLedger(CORES, slots, 0)
    model = Model(int8_model, Labels.load(SYNSETS), SessionTuning(intra_op_threads=1), 1, CORES, ledger)
    return model, CoreLedger(CORES, slots, 1)


def test_small_batches_take_the_spinning_session_only_when_it_is_free(model: Model) -> None:
    spinning = model._lone
    assert spinning is not None and model._wide is None  # as wide as the batch sessions: no third one
    for size in range(1, SMALL_BATCH + 1):
        with model._session(size) as session:
            assert session is spinning
    with model._session(SMALL_BATCH + 1) as session:
        assert session is not spinning  # larger batches: a regular session
    with model._session(1) as first, model._session(1) as second:
        assert first is spinning and second is not spinning  # busy: the next small batch goes elsewhere


def test_a_worker_takes_the_all_core_path_only_while_the_other_workers_leave_the_cores_free(
    worker: tuple[Model, CoreLedger],
) -> None:
    model, other = worker
    assert model._lone is not None and model._wide is not None
    with model._session(1) as session:
        assert session is model._lone  # idle server: a lone request on all cores
        assert not other.free_for(1)  # ... which the other worker now sees
    other.clear(0)
    with model._session(SMALL_BATCH + 1) as session:
        assert session is model._wide  # the only busy worker: its batches on all cores too
    other.clear(0)
    for size in (1, SMALL_BATCH + 1):  # bulk work never widens, idle cores or not
        with model._session(size, widen=False) as session:
            assert session is not model._lone and session is not model._wide
    other.clear(0)
    with other.running(1):  # the other worker runs a batch on its core
        for size in (1, SMALL_BATCH + 1):
            with model._session(size) as session:
                assert session is not model._lone and session is not model._wide
                assert other.others() == 1  # this worker: on its one core
    other.clear(0)
    other.clear(1)


def test_small_batches_score_the_same_on_either_session(model: Model, sample_images: list[Path]) -> None:
    crops = [preprocess_encoded(p.read_bytes(), ImageLimits()) for p in sample_images[:8]]
    for crop in crops:
        quick = model.infer([crop])  # the spinning session is free: it takes the batch
        with model._session(1):  # now it is busy: a regular session does
            regular = model.infer([crop])
        assert np.array_equal(quick.logits, regular.logits)
        assert np.array_equal(quick.order, regular.order)


def test_every_path_of_a_worker_scores_the_same(worker: tuple[Model, CoreLedger], sample_images: list[Path]) -> None:
    model, other = worker
    crops = [preprocess_encoded(p.read_bytes(), ImageLimits()) for p in sample_images[:4]]
    other.clear(0)
    alone_small, alone_batch = model.infer(crops[:1]), model.infer(crops)  # the all-core sessions
    with other.running(1):
        busy_small, busy_batch = model.infer(crops[:1]), model.infer(crops)  # the one-thread session
    assert np.array_equal(alone_small.logits, busy_small.logits)
    assert np.array_equal(alone_batch.logits, busy_batch.logits)
    assert np.array_equal(alone_batch.logits[:1], alone_small.logits)


def test_the_ledger_counts_the_threads_each_worker_runs() -> None:
    slots = shared_slots(3)
    a, b, c = (CoreLedger(4, slots, i) for i in range(3))
    assert a.free_for(4) and a.others() == 0
    with b.running(2), c.running(1):
        assert a.others() == 3 and a.free_for(1) and not a.free_for(2)
        with a.running(1):
            assert b.others() == 2 and not b.free_for(1)  # b's own 2 count too
    b.clear(1)  # what the supervisor does for a worker that died: not busy any more
    c.clear(2)
    a.clear(0)
    assert a.others() == 0 and a.free_for(4)


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

"""Chaos against a real `mobiserve serve` process: a soak with everything mixed, and SIGTERM under load.

The soak runs MOBISERVE_SOAK_SECONDS (default 30) of 64 streams and 16 unary callers mixing good
images, corrupt bytes, decompression bombs, tiny deadlines, unknown models and streams cancelled
midway. Every answer must carry the right status (good images the same class as when sent
alone), every message of a completed stream is answered exactly once, and the server's resident
memory grows by less than 10% between the first and last third of the run.

    MOBISERVE_SOAK_SECONDS=600 pytest tests/test_soak.py   # the long run
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from mobiserve.server.transport.calls import SHUTTING_DOWN
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

import helpers
from helpers import SYNSETS, png_bomb, request_of

pytestmark = pytest.mark.slow  # real processes or whole-sample sweeps

SOAK_SECONDS = float(os.environ.get("MOBISERVE_SOAK_SECONDS", "30"))
STREAMS, UNARY_CALLERS = 64, 16
STREAM_WINDOW = 4  # messages each client stream keeps in flight
WARM_UP_ANSWERS = 1000  # memory is sampled once the server has warmed up (its RSS climbs ~15% over the first ~1000)
MESSAGE_KINDS = ("good", "good", "good", "corrupt", "truncated", "bomb")
UNARY_KINDS = (*MESSAGE_KINDS, "tiny_deadline", "unknown_model")
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
# grpcio's asyncio client reports this instead of the server's status when the server ends a
# stream while the client is still writing (grpc/grpc#36066): the stream did end, the status is lost.
# It happens when the server shuts down, and when a stream deadline fires on the server a moment
# before it does on the client (the grpc-timeout header is rounded).
GRPC_CLIENT_WRITE_RACE = "Internal error from Core"


@dataclass
class Inputs:
    good: list[bytes]
    expected: list[int]  # top-1 of each good image, asked alone
    bomb: bytes = field(default_factory=png_bomb)

    def request(self, kind: str, rng: random.Random, request_id: str) -> tuple[pb.ClassifyRequest, int | None]:
        """A request of this kind, and the top-1 its answer must have (None: an error is expected)."""
        i = rng.randrange(len(self.good))
        if kind in ("good", "tiny_deadline"):
            return request_of(self.good[i], request_id=request_id), self.expected[i]
        if kind == "unknown_model":
            return request_of(self.good[i], request_id=request_id, model="no-such-model"), None
        data = {"corrupt": rng.randbytes(2000), "truncated": self.good[i][: len(self.good[i]) // 3], "bomb": self.bomb}[
            kind
        ]
        return request_of(data, request_id=request_id), None


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    answers: int = 0
    warm: asyncio.Event = field(default_factory=asyncio.Event)

    def answered(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.answers += 1
        if self.answers >= WARM_UP_ANSWERS:
            self.warm.set()

    def check_message(self, kind: str, expected: int | None, response: pb.ClassifyResponse, may_expire: bool) -> None:
        """may_expire: the stream's deadline is short, so DEADLINE_EXCEEDED is a right answer too."""
        if may_expire and response.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]:
            kind = f"{kind}:expired"
        elif expected is not None:
            if response.HasField("error"):
                self.problems.append(f"{kind} {response.request_id}: error {response.error}")
            elif response.results[0].classes[0].index != expected:
                self.problems.append(
                    f"{kind} {response.request_id}: top-1 {response.results[0].classes[0].index} != {expected}"
                )
        elif response.error.code != INVALID.value[0]:
            self.problems.append(f"{kind} {response.request_id}: expected INVALID_ARGUMENT, got {response}")
        self.answered(f"stream:{kind}")


@pytest_asyncio.fixture
async def process(int8_model: Path) -> AsyncIterator[helpers.ServerProcess]:
    proc = await asyncio.to_thread(
        helpers.serve, "--model", f"int8={int8_model}", "--synsets", str(SYNSETS), "--log-level", "INFO"
    )
    try:
        yield proc
    finally:
        proc.kill()


async def reference(stub: pb_grpc.ClassifierStub, sample_images: list[Path]) -> Inputs:
    good = [p.read_bytes() for p in sample_images[:16]]
    expected = [(await stub.Classify(request_of(b), timeout=60)).results[0].classes[0].index for b in good]
    return Inputs(good, expected)


async def unary_caller(stub: pb_grpc.ClassifierStub, inputs: Inputs, tally: Tally, seed: int, until: float) -> None:
    rng, loop, n = random.Random(seed), asyncio.get_running_loop(), 0
    while loop.time() < until:
        kind = rng.choice(UNARY_KINDS)
        request, expected = inputs.request(kind, rng, f"u{seed}-{n}")
        n += 1
        timeout = rng.uniform(0.001, 0.05) if kind == "tiny_deadline" else 60
        try:
            response = await stub.Classify(request, timeout=timeout)
            code = OK
        except grpc.aio.AioRpcError as e:
            code = e.code()
        allowed = {
            "tiny_deadline": {OK, grpc.StatusCode.DEADLINE_EXCEEDED},
            "unknown_model": {grpc.StatusCode.NOT_FOUND},
        }.get(kind, {OK} if expected is not None else {INVALID})
        if code not in allowed:
            tally.problems.append(f"unary {kind} {request.request_id}: {code}")
        elif code == OK and expected is not None and response.results[0].classes[0].index != expected:
            tally.problems.append(f"unary {kind} {request.request_id}: wrong top-1")
        tally.answered(f"unary:{kind}:{code.name}")


async def stream_session(
    stub: pb_grpc.ClassifierStub, inputs: Inputs, tally: Tally, rng: random.Random, sid: str
) -> None:
    """One stream: complete it, cancel it midway, or give it a deadline too short to finish."""
    style = rng.choice(("complete", "complete", "cancel", "deadline"))
    call = stub.ClassifyStream(timeout=rng.uniform(0.05, 0.5) if style == "deadline" else 120)
    count = rng.randint(2, 24)
    cancel_after = rng.randint(1, count - 1) if style == "cancel" else None
    sent: dict[str, tuple[str, int | None]] = {}
    answered: Counter[str] = Counter()
    window = asyncio.Semaphore(STREAM_WINDOW)

    async def write() -> None:
        for i in range(count):
            await window.acquire()
            kind = rng.choice(MESSAGE_KINDS)
            request, expected = inputs.request(kind, rng, f"{sid}-{i}")
            sent[request.request_id] = (kind, expected)
            await call.write(request)
        await call.done_writing()

    writer = asyncio.create_task(write())
    try:
        while (response := await call.read()) != grpc.aio.EOF:
            assert isinstance(response, pb.ClassifyResponse)
            if response.request_id not in sent:
                tally.problems.append(f"stream {sid}: answer to unknown request {response.request_id!r}")
                continue
            answered[response.request_id] += 1
            tally.check_message(*sent[response.request_id], response, may_expire=style == "deadline")
            window.release()
            if cancel_after is not None and sum(answered.values()) >= cancel_after:
                call.cancel()
                break
        code = await call.code()
    except grpc.aio.AioRpcError as e:
        code = e.code()
        if style == "deadline" and code == grpc.StatusCode.INTERNAL and e.details() == GRPC_CLIENT_WRITE_RACE:
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # the server's end of the call came first; see above
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    if [rid for rid, n in answered.items() if n > 1]:
        tally.problems.append(f"stream {sid}: answered more than once: {answered}")
    expected_end = {
        "complete": {OK},
        "cancel": {grpc.StatusCode.CANCELLED},
        "deadline": {OK, grpc.StatusCode.DEADLINE_EXCEEDED},
    }
    if code not in expected_end[style]:
        tally.problems.append(f"stream {sid} ({style}) ended {code}")
    if style == "complete" and set(answered) != set(sent):
        tally.problems.append(f"stream {sid}: {len(sent) - len(answered)} of {len(sent)} messages never answered")
    tally.answered(f"stream-end:{style}:{code.name}")


async def stream_worker(stub: pb_grpc.ClassifierStub, inputs: Inputs, tally: Tally, seed: int, until: float) -> None:
    rng, loop, n = random.Random(seed), asyncio.get_running_loop(), 0
    while loop.time() < until:
        await stream_session(stub, inputs, tally, rng, f"s{seed}-{n}")
        n += 1


async def sample_rss(server: helpers.ServerProcess, tally: Tally, samples: list[int], until: float) -> None:
    """Measurement, not synchronisation: RSS every 0.2 s from warm-up to the end of the run."""
    await tally.warm.wait()
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        samples.append(server.rss_bytes())
        await asyncio.sleep(0.2)


@pytest.mark.timeout(SOAK_SECONDS + 300)
async def test_soak_chaos_every_request_answered_right_and_memory_flat(
    process: helpers.ServerProcess, sample_images: list[Path]
) -> None:
    async with grpc.aio.insecure_channel(process.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        inputs = await reference(stub, sample_images)
        tally, rss = Tally(), list[int]()
        until = asyncio.get_running_loop().time() + SOAK_SECONDS
        await asyncio.gather(
            *(unary_caller(stub, inputs, tally, seed, until) for seed in range(UNARY_CALLERS)),
            *(stream_worker(stub, inputs, tally, 1000 + seed, until) for seed in range(STREAMS)),
            sample_rss(process, tally, rss, until),
        )
        # still healthy afterwards
        assert (await stub.Classify(request_of(inputs.good[0]), timeout=60)).results[0].classes[
            0
        ].index == inputs.expected[0]
    assert not tally.problems, f"{len(tally.problems)} problems, first: {tally.problems[:10]}"
    # the chaos really happened: every kind of trouble was exercised
    seen = " ".join(tally.outcomes)
    for needle in (
        "stream:good",
        "stream:bomb",
        "stream:corrupt",
        "unary:tiny_deadline:DEADLINE_EXCEEDED",
        "stream-end:cancel:CANCELLED",
        "stream-end:deadline:DEADLINE_EXCEEDED",
        "unary:unknown_model:NOT_FOUND",
    ):
        assert needle in seen, (needle, tally.outcomes)
    third = len(rss) // 3
    assert third >= 5, f"too few memory samples: {len(rss)}"
    first, last = statistics.mean(rss[:third]), statistics.mean(rss[-third:])
    growth = (last - first) / first
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s: {tally.answers} answers, RSS {first / 2**20:.0f} -> {last / 2**20:.0f} MiB "
        f"({growth:+.1%}); {dict(tally.outcomes.most_common(8))}"
    )
    assert growth < 0.10, f"server RSS grew {growth:.1%}: {first / 2**20:.0f} -> {last / 2**20:.0f} MiB"
    process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait) == 0
    # gRPC logs a write that lost the race with a call's deadline (the client has its status): benign
    errors = [
        line for line in process.lines if "level=ERROR" in line and "ExecuteBatchError raised in core" not in line
    ]
    assert not errors, errors[:5]


@pytest.mark.timeout(300)
async def test_sigterm_under_load_answers_everything_accepted_then_exits_0(
    process: helpers.ServerProcess, jpeg: bytes
) -> None:
    """Callers keep sending through the signal. Each call ends OK or with a clean refusal
    (UNAVAILABLE: shutting down or connection refused), never cancelled or lost; streams answer
    every message the server read; work in flight at the signal is answered OK; exit code 0."""
    signalled = asyncio.Event()
    answered_after_signal = Counter[str]()
    problems: list[str] = []
    answers = 0
    enough = asyncio.Event()

    def refusal_ok(e: grpc.aio.AioRpcError, writing: bool = False) -> bool:
        details = e.details() or ""
        if writing and e.code() == grpc.StatusCode.INTERNAL and details == GRPC_CLIENT_WRITE_RACE:
            return True
        return e.code() == grpc.StatusCode.UNAVAILABLE and (SHUTTING_DOWN in details or "connect" in details.lower())

    def count(kind: str) -> None:
        nonlocal answers
        answers += 1
        if answers >= 100:
            enough.set()
        if signalled.is_set():
            answered_after_signal[kind] += 1

    async def unary(stub: pb_grpc.ClassifierStub, n: int) -> None:
        for i in range(10_000):  # bounded; ends at the first refusal
            try:
                response = await stub.Classify(request_of(jpeg, request_id=f"u{n}-{i}"), timeout=120)
            except grpc.aio.AioRpcError as e:
                if not refusal_ok(e):
                    problems.append(f"unary u{n}-{i}: {e.code()} {e.details()}")
                return
            assert response.request_id == f"u{n}-{i}" and len(response.results[0].classes) == 5
            count("unary")

    async def stream(stub: pb_grpc.ClassifierStub, n: int) -> None:
        call = stub.ClassifyStream(timeout=120)
        window, answered, sent = asyncio.Semaphore(STREAM_WINDOW), Counter[str](), 0

        async def write() -> None:
            nonlocal sent
            for i in range(10_000):  # bounded; ends when the server ends the stream
                await window.acquire()
                await call.write(request_of(jpeg, request_id=f"s{n}-{i}"))
                sent += 1

        writer = asyncio.create_task(write())
        try:
            while (response := await call.read()) != grpc.aio.EOF:
                assert isinstance(response, pb.ClassifyResponse)
                if response.HasField("error"):
                    problems.append(f"stream s{n}: error answer {response.error}")
                answered[response.request_id] += 1
                count("stream")
                window.release()
            problems.append(f"stream s{n} ended OK while the client was still sending")
        except grpc.aio.AioRpcError as e:
            if not refusal_ok(e, writing=True):
                problems.append(f"stream s{n}: ended {e.code()} {e.details()}")
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if any(v > 1 for v in answered.values()):
            problems.append(f"stream s{n}: a message answered twice")

    async with grpc.aio.insecure_channel(process.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        callers = [asyncio.create_task(unary(stub, n)) for n in range(32)]
        callers += [asyncio.create_task(stream(stub, n)) for n in range(8)]
        await asyncio.wait_for(enough.wait(), 120)  # under load, by count of answers
        signalled.set()
        process.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*callers), 180)
    assert not problems, problems[:10]
    assert answered_after_signal["unary"] > 0 and answered_after_signal["stream"] > 0, (
        f"nothing in flight was answered after the signal: {answered_after_signal}"
    )
    assert await asyncio.to_thread(process.wait) == 0
    log = process.log
    for event in ("event=signal signal=SIGTERM", "event=draining", "event=model_unloaded", "event=stopped"):
        assert event in log, log[-3000:]

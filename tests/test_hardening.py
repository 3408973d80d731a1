"""What a red team found, each kept from coming back: against real `mobiserve serve` processes
(memory, threads, sockets, signals) and real in-process servers, over real gRPC and raw sockets.

Every test here bounds its own time; the ones past ~5 s are marked slow.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from mobiserve.server.app import App
from mobiserve.server.transport.errorlog import ErrorLog
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import (
    SYNSETS,
    ServerProcess,
    free_port,
    model_config,
    poll_until,
    request_of,
    serve,
    start_server,
    tcp_connections,
    threads_of,
)

# The client's connection preface: the HTTP/2 magic and an empty SETTINGS frame, then nothing.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def wait_until(condition: object, timeout: float, interval: float = 0.1) -> bool:
    """Poll a condition (a callable) until it holds or `timeout` passes; its last value."""
    assert callable(condition)
    end = time.monotonic() + timeout
    while not (held := bool(condition())) and time.monotonic() < end:
        time.sleep(interval)
    return held


# -------------------------------------------------------------------------------- connections

IDLE_S, KEEPALIVE_S, AGE_S = 1.0, 1.0, 6.0


@pytest_asyncio.fixture(scope="module")
async def limited(int8_model: Path) -> AsyncIterator[ServerProcess]:
    """A server with short connection limits, so the tests see them act in seconds."""
    proc = await asyncio.to_thread(
        serve,
        "--model",
        f"int8={int8_model}",
        "--synsets",
        str(SYNSETS),
        "--max-connection-idle",
        str(IDLE_S),
        "--keepalive-time",
        str(KEEPALIVE_S),
        "--keepalive-timeout",
        str(KEEPALIVE_S),
        "--max-connection-age",
        str(AGE_S),
        "--max-connection-age-grace",
        "2",
    )
    try:
        yield proc
    finally:
        proc.kill()


def closed_by_peer(sock: socket.socket) -> bool:
    """Read what the server sent (SETTINGS, GOAWAY); True once it closed the connection."""
    try:
        while data := sock.recv(65536):
            del data
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_connections_that_only_send_the_preface_are_closed_when_idle(limited: ServerProcess) -> None:
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
            s.sendall(H2_PREFACE)
            s.setblocking(False)
            socks.append(s)
        open_ = set(range(len(socks)))

        def all_closed() -> bool:
            open_.difference_update({i for i in open_ if closed_by_peer(socks[i])})
            return not open_

        # closed by the idle limit, well before the age limit could have done it
        assert wait_until(all_closed, AGE_S * 0.9 - 1), f"{len(open_)} of 200 idle connections still open"
    finally:
        for s in socks:
            s.close()


STALLED_CLIENT = textwrap.dedent(
    """
    import sys, time, grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    channel = grpc.insecure_channel(sys.argv[1])
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    next(watch)
    print("watching", flush=True)
    time.sleep(600)
    """
)


def test_a_peer_that_stops_answering_is_cut_off_even_with_a_call_open(limited: ServerProcess) -> None:
    """A client frozen with a call open (as a vanished host looks): the kernel still acknowledges
    TCP, so only the server's keepalive pings find it; the open call keeps the idle limit away."""
    client = subprocess.Popen([sys.executable, "-c", STALLED_CLIENT, limited.target], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "watching"

        (peer,) = {r for loc, r, st in tcp_connections(limited.port) if loc == limited.port and st == "ESTABLISHED"}
        client.send_signal(signal.SIGSTOP)
        states = lambda: {st for loc, r, st in tcp_connections(limited.port) if r == peer}
        # keepalive time + timeout, with room; the age limit would only act after AGE_S
        assert wait_until(lambda: "ESTABLISHED" not in states(), AGE_S * 0.9 - 1), states()
    finally:
        client.kill()
        client.wait(30)


@pytest.mark.slow
async def test_max_connection_age_moves_clients_to_new_connections_without_failing_calls(
    limited: ServerProcess, jpeg: bytes
) -> None:
    ports: set[int] = set()
    calls = 0
    async with grpc.aio.insecure_channel(limited.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        end = asyncio.get_running_loop().time() + AGE_S * 1.1 + 2
        while asyncio.get_running_loop().time() < end:
            await stub.Classify(request_of(jpeg), timeout=30)  # every call succeeds
            calls += 1
            ports |= {loc for loc, r, st in tcp_connections(limited.port) if r == limited.port and st == "ESTABLISHED"}
            await asyncio.sleep(0.05)
    assert calls > 20
    assert len(ports) >= 2, f"one connection for {AGE_S * 1.1 + 2:.0f} s with a {AGE_S:.0f} s age limit: {ports}"


def test_connection_flags_and_toml_keys_reach_the_grpc_server(tmp_path: Path, int8_model: Path) -> None:
    from mobiserve.common.command import build_parser
    from mobiserve.server.cli import _server_config
    from mobiserve.server.config import ServerConfig, load_toml
    from mobiserve.server.transport.connections import connection_options

    flags = ["--max-connection-idle", "120", "--max-connection-age", "600", "--max-connection-age-grace", "15"]
    flags += ["--keepalive-time", "30", "--keepalive-timeout", "5", "--min-ping-interval", "8"]
    config = _server_config(build_parser().parse_args(["serve", "--model", str(int8_model), *flags]))
    options = dict(connection_options(config))
    assert options["grpc.max_connection_idle_ms"] == 120_000
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 15_000
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 8_000

    toml = tmp_path / "server.toml"
    toml.write_text(f'[server]\nmax_connection_age_s = 90\n\n[[models]]\nname = "m"\npath = "{int8_model}"\n')
    assert dict(connection_options(load_toml(toml)))["grpc.max_connection_age_ms"] == 90_000

    # the defaults: idle connections are closed, the age limit is off, client pings at the
    # client library's default rate (every 5 minutes) are well within what the server allows
    from mobiserve.client._options import KeepAlive

    defaults = dict(connection_options(ServerConfig(models=config.models)))
    assert defaults["grpc.max_connection_idle_ms"] > 0
    assert "grpc.max_connection_age_ms" not in defaults
    assert defaults["grpc.http2.min_ping_interval_without_data_ms"] <= KeepAlive().time_ms
    with pytest.raises(ValueError, match="keepalive_time_s must be positive"):
        ServerConfig(models=config.models, keepalive_time_s=0)


# ---------------------------------------------------------------------- what is echoed back


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("16 KiB model name", grpc.StatusCode.NOT_FOUND, "not found; this server serves: int8"),
        ("1 MiB dtype", grpc.StatusCode.INVALID_ARGUMENT, "tensor dtype must be 'uint8' or 'float32'"),
        ("100k-value shape", grpc.StatusCode.INVALID_ARGUMENT, "uint8 tensor must have shape [H, W, 3]"),
    ],
)
async def test_huge_client_strings_are_quoted_short_in_status_messages(
    stub: pb_grpc.ClassifierStub,
    jpeg: bytes,
    caplog: pytest.LogCaptureFixture,
    case: str,
    code: grpc.StatusCode,
    words: str,
) -> None:
    requests = {
        "16 KiB model name": request_of(jpeg, model="m" * 16384, request_id="r" * 100_000),
        "1 MiB dtype": pb.ClassifyRequest(images=[pb.Image(tensor=pb.Tensor(shape=[8, 8, 3], dtype="x" * (1 << 20)))]),
        "100k-value shape": pb.ClassifyRequest(
            images=[pb.Image(tensor=pb.Tensor(shape=[1] * 100_000, dtype="uint8"))], request_id="r" * 100_000
        ),
    }
    with caplog.at_level(logging.DEBUG, logger="mobiserve"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Classify(requests[case], timeout=30)
        call = stub.ClassifyStream(timeout=30)
        await call.write(requests[case])
        answer = await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    details = err.value.details() or ""
    assert err.value.code() == code, details[:200]
    assert words in details and len(details) < 300, details[:400]
    assert "..." in details  # says it was cut, and how long the value was
    assert answer.error.code == code.value[0] and answer.error.message == details
    lines = [r.getMessage() for r in caplog.records if "event=request_failed" in r.getMessage()]
    assert all(len(line) < 1000 for line in lines), [len(line) for line in lines]  # (throttled: maybe none)


def test_a_huge_request_id_is_cut_in_the_log_line(caplog: pytest.LogCaptureFixture) -> None:
    errors = ErrorLog(logging.getLogger("mobiserve.test.hardening"))
    with caplog.at_level(logging.DEBUG, logger="mobiserve.test.hardening"):
        errors.failed(grpc.StatusCode.NOT_FOUND, "no such model", model="m", method="Classify", request_id="r" * 10**6)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "request_id='rrrr" in line and "(1000000 characters)" in line and len(line) < 300, line[:400]


# ------------------------------------------------------------------- requests protobuf rejects


def with_raw_field(request: pb.ClassifyRequest, number: int, value: bytes) -> bytes:
    """The request's wire bytes plus a length-delimited field: how a client writes invalid UTF-8
    into a string field (protobuf's Python API refuses to)."""
    assert len(value) < 128
    return request.SerializeToString() + bytes([number << 3 | 2, len(value)]) + value


BAD_UTF8 = b"\xff\xfe-not-utf8"
CORRUPT = bytes([4 << 3 | 2, 100]) + b"short"  # a field longer than the message


def counted(app: App, code: str, method: str, model: str = "int8") -> float:
    labels = {"model": model, "method": method, "code": code}
    return app.metrics.registry.get_sample_value("mobiserve_requests_total", labels) or 0.0


async def test_undecodable_requests_are_invalid_argument_counted_and_quiet(
    server: App, channel: grpc.aio.Channel, jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    classify = channel.unary_unary("/mobiserve.v1.Classifier/Classify")  # raw bytes both ways
    before = (
        counted(server, "INVALID_ARGUMENT", "Classify"),
        counted(server, "INVALID_ARGUMENT", "Classify", "(unknown)"),
    )
    bad_id = with_raw_field(request_of(jpeg), 4, BAD_UTF8)
    bad_model = with_raw_field(request_of(jpeg), 1, BAD_UTF8)
    with caplog.at_level(logging.DEBUG, logger="mobiserve"):
        codes = []
        for data in [bad_id] * 200 + [bad_model, CORRUPT]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await classify(data, timeout=30)
            codes.append(err.value.code())
            details = err.value.details() or ""
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert "not a valid ClassifyRequest" in details
    after = (
        counted(server, "INVALID_ARGUMENT", "Classify"),
        counted(server, "INVALID_ARGUMENT", "Classify", "(unknown)"),
    )
    assert after[0] - before[0] == 201 and after[1] - before[1] == 1  # the bad model name is no model
    records = [r for r in caplog.records if r.levelno >= logging.DEBUG]
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage()[:200] for r in records][:3]
    assert len([r for r in records if "event=request_failed" in r.getMessage()]) < 20  # throttled, not 202


async def test_an_undecodable_message_in_a_stream_gets_an_error_answer_and_the_stream_goes_on(
    channel: grpc.aio.Channel, jpeg: bytes
) -> None:
    stream = channel.stream_stream(
        "/mobiserve.v1.Classifier/ClassifyStream", response_deserializer=pb.ClassifyResponse.FromString
    )
    call = stream(timeout=60)
    sent = {
        "good-1": request_of(jpeg, request_id="good-1").SerializeToString(),
        "bad-model": with_raw_field(request_of(jpeg, request_id="bad-model"), 1, BAD_UTF8),
        "\ufffd\ufffd-not-utf8": with_raw_field(request_of(jpeg), 4, BAD_UTF8),
        "": CORRUPT,
        "good-2": request_of(jpeg, request_id="good-2").SerializeToString(),
    }
    for data in sent.values():
        await call.write(data)
    await call.done_writing()
    answers = {a.request_id: a async for a in call}
    assert await call.code() == grpc.StatusCode.OK
    assert set(answers) == set(sent)
    for request_id, answer in answers.items():
        if request_id.startswith("good"):
            assert not answer.HasField("error") and len(answer.results) == 1
        else:
            assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer.error
            assert "not a valid ClassifyRequest" in answer.error.message


# ------------------------------------------------------------------------------------- drain


@pytest.mark.slow
async def test_callers_that_keep_sending_do_not_hold_a_draining_server_open(int8_model: Path, jpeg: bytes) -> None:
    """200 callers that resend at once whatever is refused, through SIGTERM with a 60 s grace:
    the server exits once what it accepted is answered, not when the callers fall silent (they
    never do) or the grace runs out; every call ends OK or UNAVAILABLE (retryable), none CANCELLED."""
    proc = await asyncio.to_thread(
        serve, "--model", f"int8={int8_model}", "--synsets", str(SYNSETS), "--grace-period", "60"
    )
    outcomes: Counter[str] = Counter()
    signalled = asyncio.Event()
    exited = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(proc.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)

            async def caller() -> None:
                for _ in range(100_000):  # bounded; ends when the server is gone
                    if exited.is_set():
                        return
                    try:
                        await stub.Classify(request_of(jpeg), timeout=30)
                        outcomes["OK after signal" if signalled.is_set() else "OK"] += 1
                    except grpc.aio.AioRpcError as e:
                        outcomes[e.code().name] += 1
                        await asyncio.sleep(0.001)  # and send it again

            callers = [asyncio.create_task(caller()) for _ in range(200)]
            while outcomes["OK"] < 200:  # under load, by count
                await asyncio.sleep(0.05)
            signalled.set()
            sent_at = time.monotonic()
            proc.signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 60)
            took = time.monotonic() - sent_at
            exited.set()
            await asyncio.wait_for(asyncio.gather(*callers), 60)
    finally:
        proc.kill()
    print(f"\nexit {took:.2f} s after SIGTERM; {dict(outcomes)}")
    assert code == 0, proc.log[-2000:]
    assert "event=grace_expired" not in proc.log
    assert took < 15, f"exit {took:.1f} s after SIGTERM with callers still sending"  # the grace is 60 s
    assert outcomes["UNAVAILABLE"] > 0 and outcomes["CANCELLED"] == 0, outcomes
    assert set(outcomes) <= {"OK", "OK after signal", "UNAVAILABLE"}, outcomes


# ---------------------------------------------------------------------------- metrics endpoint


@pytest.mark.slow
async def test_idle_metrics_connections_take_no_thread_and_are_closed(int8_model: Path) -> None:
    metrics_port = free_port()
    proc = await asyncio.to_thread(
        serve,
        "--workers",
        "1",  # the process that serves the metrics is the one that counts the requests
        "--model",
        f"int8={int8_model}",
        "--synsets",
        str(SYNSETS),
        "--metrics-port",
        str(metrics_port),
    )
    socks: list[socket.socket] = []
    try:
        before = threads_of(proc.pid)
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
            s.setblocking(False)
            socks.append(s)
        await asyncio.sleep(1)  # time for a thread per connection to appear, if one would
        during = threads_of(proc.pid)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        open_ = set(range(len(socks)))

        def all_closed() -> bool:
            open_.difference_update({i for i in open_ if closed_by_peer(socks[i])})
            return not open_

        closed = await asyncio.to_thread(wait_until, all_closed, 20)
    finally:
        for s in socks:
            s.close()
        proc.kill()
    print(f"\nserver threads: {before}, with 200 idle metrics connections: {during}")
    assert during - before < 5, f"{before} threads, {during} with 200 idle metrics connections"
    assert "mobiserve_requests_total" in page  # served while they sat there
    assert closed, f"{len(open_)} of 200 idle metrics connections still open after 20 s"


# -------------------------------------------------------------------------------- ListModels


async def test_list_models_names_the_model_file_and_its_sha256_not_its_path(
    stub: pb_grpc.ClassifierStub, int8_model: Path
) -> None:
    (info,) = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
    assert info.path == int8_model.name and str(int8_model.parent) not in info.path
    assert info.sha256 == hashlib.sha256(int8_model.read_bytes()).hexdigest()


async def test_an_operator_can_opt_in_to_full_model_paths(int8_model: Path) -> None:
    from mobiserve.common.command import build_parser
    from mobiserve.server.cli import _server_config

    parse = lambda *flags: _server_config(build_parser().parse_args(["serve", "--model", str(int8_model), *flags]))
    assert not parse().expose_model_paths and parse("--expose-model-paths").expose_model_paths
    app = await start_server(model_config(int8_model), expose_model_paths=True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            (info,) = (await pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)).models
    finally:
        await app.stop(grace_s=5)
    assert info.path == str(int8_model) and info.sha256


# ------------------------------------------------------------------------------------- memory

MiB = 1 << 20


def rss_mib(server: ServerProcess) -> float:
    return server.rss_bytes() / MiB


@pytest.mark.slow
async def test_failed_requests_do_not_keep_their_payload(int8_model: Path, jpeg: bytes) -> None:
    """50 undecodable 20 MiB images (unary, then in one stream), then 10 s idle: the server's
    memory is back within 150 MB of where it was before them."""
    proc = await asyncio.to_thread(serve, "--model", f"int8={int8_model}", "--synsets", str(SYNSETS))
    bad = b"not an image" + bytes(20 * MiB)  # refused as soon as no decoder recognises its header
    options = [("grpc.max_send_message_length", 64 * MiB)]
    try:
        async with grpc.aio.insecure_channel(proc.target, options=options) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            for _ in range(20):  # warm: the allocator's and gRPC's buffers for a valid load
                await stub.Classify(request_of(jpeg), timeout=30)
            before = rss_mib(proc)
            codes = Counter[str]()
            for i in range(25):
                try:
                    await stub.Classify(request_of(bad, request_id=f"u{i}"), timeout=60)
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
            call = stub.ClassifyStream(timeout=120)
            for i in range(25):
                await call.write(request_of(bad, request_id=f"s{i}"))
            await call.done_writing()
            codes.update(grpc.StatusCode.INVALID_ARGUMENT.name for a in [a async for a in call] if a.HasField("error"))
            await asyncio.sleep(10)
            after = rss_mib(proc)
    finally:
        proc.kill()
    print(f"\nRSS {before:.0f} MiB, after 50 bad 20 MiB requests and 10 s idle: {after:.0f} MiB")
    assert codes == {"INVALID_ARGUMENT": 50}, codes
    assert after - before < 150, f"RSS {before:.0f} -> {after:.0f} MiB"


# ------------------------------------------------------------------------------------ deadlines


async def test_every_call_with_an_expired_deadline_is_counted_once_and_none_is_computed(
    int8_model: Path, jpeg: bytes
) -> None:
    """600 calls with a 5 ms deadline on an idle server: each one the server sees is counted
    exactly once (also those gRPC ends while their message is still arriving, before any servicer
    code runs: without that, only 274 of 600 were counted), as OK only when it computed and sent
    an answer, else as DEADLINE_EXCEEDED. What the server cannot know is an answer sent in time by
    its clock that reaches the client after the client's deadline: the client counts that one as
    DEADLINE_EXCEEDED. How many of each there are is a race the machine's speed decides, so only
    what holds whatever the speed is asserted."""
    app = await start_server(model_config(int8_model))
    registry = app.metrics.registry

    def counted() -> dict[str, float]:
        samples = [s for family in registry.collect() if family.name == "mobiserve_requests" for s in family.samples]
        totals: Counter[str] = Counter()
        for s in samples:
            if s.name == "mobiserve_requests_total" and s.labels["method"] == "Classify":
                totals[s.labels["code"]] += s.value
        return dict(totals)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            await stub.Classify(request_of(jpeg), timeout=30)
            inferred = registry.get_sample_value("mobiserve_batch_size_images_sum", {"model": "int8"}) or 0.0
            codes: Counter[str] = Counter()

            async def one() -> None:
                try:
                    await stub.Classify(request_of(jpeg), timeout=0.005)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

            for _ in range(60):
                await asyncio.gather(*(one() for _ in range(10)))
            # the server counts a call when it ends there, which may be after the client gave up
            seen = lambda: sum(counted().values()) - 1  # noqa: E731
            await poll_until(lambda: app.calls.gate.idle and seen() >= 0.95 * 600, timeout_s=10)
        after = counted()
        now_inferred = registry.get_sample_value("mobiserve_batch_size_images_sum", {"model": "int8"}) or 0.0
    finally:
        await app.stop(grace_s=5)
    assert sum(codes.values()) == 600 and set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes
    assert set(after) <= {"OK", "DEADLINE_EXCEEDED"}, after
    server_ok = after.get("OK", 0) - 1  # the warm-up call was the one OK before
    # each call counted at most once; all but the few whose deadline passed before they left
    # the client (the server never saw those; on a loop shared with other servers, a few percent)
    assert 0.95 * 600 <= server_ok + after.get("DEADLINE_EXCEEDED", 0) <= 600
    # every answer the client got was counted OK, and every call counted OK was computed
    assert codes["OK"] <= server_ok <= now_inferred - inferred
    # an answer computed for a call whose deadline passed meanwhile is counted as what it was
    assert now_inferred - inferred <= server_ok + after.get("DEADLINE_EXCEEDED", 0)


NEVER_READS = """
import asyncio, sys
import grpc
from mobiserve.v1 import classifier_pb2 as pb, classifier_pb2_grpc as pb_grpc

async def main(target, path):
    image = pb.Image(encoded=open(path, "rb").read())
    stub = pb_grpc.ClassifierStub(grpc.aio.insecure_channel(target))
    calls = [stub.ClassifyStream() for _ in range(100)]
    for call in calls:
        for i in range(20):
            await call.write(pb.ClassifyRequest(images=[image], request_id=str(i)))
    print("written", flush=True)
    await asyncio.sleep(600)  # never reads; killed by the test

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
def test_streams_that_never_read_then_vanish_leave_no_memory_behind(
    int8_model: Path, sample_images: list[Path]
) -> None:
    """Three rounds of 100 streams that send 20 images each, never read, and whose client is
    killed: the server's RSS settles instead of climbing round after round."""
    server = serve("--workers", "1", "--model", f"int8={int8_model}", "--synsets", str(SYNSETS))  # RSS of one process
    try:
        start, after = server.rss_bytes() / MiB, []
        for _ in range(3):
            client = subprocess.Popen(
                [sys.executable, "-c", NEVER_READS, server.target, str(sample_images[0])],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert client.stdout is not None and client.stdout.readline().strip() == "written"
            time.sleep(2)
            client.kill()
            client.wait(30)
            time.sleep(5)  # the server notices, and gives back what it freed once idle
            after.append(server.rss_bytes() / MiB)
    finally:
        server.stop()
    print(f"\nRSS {start:.0f} MiB, after each round: {', '.join(f'{a:.0f}' for a in after)} MiB")
    assert after[-1] - start < 150 and after[-1] - after[0] < 40, (start, after)

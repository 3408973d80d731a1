"""Load generation: closed-loop (fixed concurrency) and open-loop (Poisson arrivals) steps.

Load comes from `processes` spawned worker processes, each one asyncio loop calling the generated
grpc.aio stubs directly (one channel per process, requests built once up front), so the client is
cheap and a single Python interpreter's GIL is not the limit. Each worker reports its own CPU time.

Timing is careful in the way perf_analyzer is: every worker connects and sends one probe request
first; then all start together on a shared monotonic clock, run `warmup_s` unmeasured, and only
requests *completing* inside the measurement window count (`--requests N`: the first N issued after
the warm-up). Open-loop latency is measured from each request's *scheduled* arrival, so a client
that falls behind shows up as latency (and as `lag_max_ms`), not as a flattering lower rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import queue
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mobiserve.bench.cpu import Cost, Probe, per_image_ms
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

TENSOR_INPUTS = 64  # distinct float32 inputs per worker in --tensor mode (600 KB each)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.enable_http_proxy", 0),
]
_READY_TIMEOUT_S = 180.0  # spawn + imports + reading the images, on a loaded machine
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_LANE_NAMES = {v: pb.Priority.Name(v).removeprefix("PRIORITY_").lower() for v in pb.Priority.values()} | {0: "unsaid"}


class BenchError(RuntimeError):
    """A user-facing failure of the harness; the message says what went wrong."""


@dataclass(frozen=True)
class Workload:
    """What every request looks like and where it goes."""

    target: str
    images: tuple[str, ...]  # image files; their bytes are sent as-is unless `tensor`
    mode: str = "unary"  # unary | stream
    tensor: bool = False  # send float32 [3, 224, 224] model inputs, preprocessed once by the server's code
    batch: int = 1  # images per request
    model: str = ""  # empty: the server's default
    timeout_s: float = 30.0
    connections: int = 1  # per load process, unary calls over them in turn (a --workers server spreads connections)
    # or, in stream mode, one stream on each
    priority: int = 0  # mobiserve.v1 Priority of every request (0: the RPC's default)


@dataclass(frozen=True)
class Load:
    """One step: a closed loop at `concurrency` requests in flight, or an open loop at `rate` requests/s."""

    concurrency: int = 0
    rate: float = 0.0
    duration_s: float | None = 10.0  # measure this long ...
    requests: int | None = None  # ... or this many requests
    warmup_s: float = 2.0
    processes: int = 1

    @property
    def closed(self) -> bool:
        return self.rate <= 0


@dataclass
class StepResult:
    """One step's figures; flat so that it is also one CSV row."""

    server: str  # which server was measured: mobiserve, unbatched, ...
    loop: str  # closed | open
    mode: str  # unary | stream
    inputs: str  # jpeg | tensor
    concurrency: int
    rate: float  # offered requests/s (open loop)
    batch: int
    processes: int
    window_s: float
    requests: int  # measured: ok + errors
    ok: int
    images: int  # images in ok requests
    req_s: float
    img_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    queue_ms: float  # server-side means from the responses' `timing`
    preprocess_ms: float
    inference_ms: float
    batch_size: float
    client_cpu_s: float
    client_cpu_pct: float  # of window x cores
    server_cpu_pct: float | None  # of window x cores, when the harness started the server
    lag_max_ms: float  # open loop: how late the client sent its latest request
    errors: dict[str, int] = field(default_factory=dict)
    lanes: dict[str, int] = field(default_factory=dict)  # answered requests by the lane that served them
    # where the server's CPU went, per image (when the harness started the server): ms CPU per
    # image in all and by thread role (cpu.ROLES), and GIL-held ms per image (with --gil)
    cpu_ms_img: float | None = None
    cpu_roles_ms_img: dict[str, float] = field(default_factory=dict)
    gil_pct: float | None = None  # of the window, some thread held the GIL
    gil_ms_img: float | None = None
    gil_roles_ms_img: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ parent side


@dataclass
class _Sync:
    """Shared between the parent and its workers."""

    results: Any  # mp.Queue of ("ready" | "done" | "error", worker, payload)
    go: Any  # mp.Event: all workers ready, `start` is set
    start: Any  # mp.Value("d"): monotonic time the load starts (warm-up first)
    tickets: Any  # mp.Value("q"): measured requests left to issue (closed loop, --requests)
    progress: Any  # mp.Value("q"): measured requests completed (--requests progress bar)


@dataclass(frozen=True)
class _Share:
    """One worker's part of a step."""

    index: int
    callers: tuple[int, ...]  # closed loop: global caller ids (spread the inputs among callers)
    stride: int  # closed loop: total callers
    rate: float  # open loop: this worker's arrivals per second
    requests: int | None  # open loop with --requests: this worker's measured arrivals


@dataclass
class _Records:
    start: np.ndarray
    done: np.ndarray
    code: np.ndarray
    queue_us: np.ndarray
    preprocess_us: np.ndarray
    inference_us: np.ndarray
    batch_size: np.ndarray
    measured: np.ndarray
    lag: np.ndarray
    lane: np.ndarray  # the Priority of the lane that served it (timing.lane; 0: not said)
    cpu_s: float  # this process's CPU time over its measurement window


def run_step(
    workload: Workload,
    load: Load,
    server: str,
    cores: int,
    probe: Probe | None = None,
    label: str = "",
    progress: bool = True,
) -> StepResult:
    """Run one step from `load.processes` spawned workers and return its figures; `probe` reads
    the server process over the measurement window (CPU by thread role, GIL). `progress`: a
    progress bar on a terminal (off for callers that draw their own)."""
    return run_together([(workload, load)], server, cores, probe, label, progress)[0]


def run_together(
    parts: Sequence[tuple[Workload, Load]],
    server: str,
    cores: int,
    probe: Probe | None = None,
    label: str = "",
    progress: bool = True,
) -> list[StepResult]:
    """Run several loads at once (e.g. a unary caller beside bulk streams), each from its own
    spawned workers, all on one clock and measured over the same window; one result per part,
    the server's cost (`probe`) in each."""
    from tqdm import tqdm  # the bench extra's; imported when the harness runs, not when it registers

    load = parts[0][1]
    if len(parts) > 1 and not all(ld.duration_s for _, ld in parts):
        raise BenchError("loads run together are measured over a duration, not a request count")
    ctx = mp.get_context("spawn")
    sync = _Sync(ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), ctx.Value("q", load.requests or 0), ctx.Value("q", 0))
    shares = [(part, share) for part, (_, ld) in enumerate(parts) for share in _shares(ld)]
    workers = [
        ctx.Process(target=_worker, args=(parts[part][0], parts[part][1], share, sync, k), daemon=True)
        for k, (part, share) in enumerate(shares)
    ]
    try:
        for w in workers:
            w.start()
        _collect(sync, workers, "ready", _READY_TIMEOUT_S)
        t_warm = time.monotonic() + 0.1
        t_start = t_warm + load.warmup_s
        sync.start.value = t_warm
        sync.go.set()
        total = load.duration_s or load.requests or 0
        with tqdm(
            total=total,
            unit="s" if load.duration_s else "req",
            desc=label,
            leave=False,
            disable=None if progress else True,
            bar_format="{desc} {bar} {n:.0f}/{total:.0f} {unit} [{elapsed}]",
        ) as bar:

            def tick() -> None:
                bar.n = min(total, max(0.0, time.monotonic() - t_start)) if load.duration_s else sync.progress.value
                bar.refresh()

            cost = None
            _wait_until(t_start, tick)
            if probe is not None:
                probe.start()
            if load.duration_s:
                t_end = t_start + load.duration_s
                _wait_until(t_end, tick)
                cost = probe.stop() if probe is not None else None
            records = _collect(sync, workers, "done", None, tick)
            if not load.duration_s:
                t_end = time.monotonic()
                cost = probe.stop() if probe is not None else None
    except BaseException:
        for w in workers:
            if w.pid is not None:  # started
                w.kill()
        raise
    finally:
        for w in workers:
            if w.pid is not None:
                w.join(timeout=10)
                if w.is_alive():
                    w.kill()
    return [
        _summarise(
            [r for (p, _), r in zip(shares, records) if p == part],
            workload,
            ld,
            server,
            cores,
            t_start,
            cost,
            t_end - t_start,
        )
        for part, (workload, ld) in enumerate(parts)
    ]


def _shares(load: Load) -> list[_Share]:
    if load.closed:
        processes = max(1, min(load.processes, load.concurrency))
        sizes = [load.concurrency // processes + (k < load.concurrency % processes) for k in range(processes)]
        firsts = np.cumsum([0, *sizes])
        return [
            _Share(k, tuple(range(firsts[k], firsts[k] + n)), load.concurrency, 0.0, None) for k, n in enumerate(sizes)
        ]
    processes = max(1, load.processes)
    requests = load.requests or 0
    return [
        _Share(
            k,
            (),
            0,
            load.rate / processes,
            requests // processes + (k < requests % processes) if load.requests else None,
        )
        for k in range(processes)
    ]


def _wait_until(when: float, tick: Callable[[], None]) -> None:
    while (left := when - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
        tick()


def _collect(
    sync: _Sync, workers: list[Any], kind: str, timeout: float | None, tick: Callable[[], None] = lambda: None
) -> list[Any]:
    """Wait for every worker's `kind` message; a worker error or death is a BenchError."""
    got: dict[int, Any] = {}
    end = None if timeout is None else time.monotonic() + timeout
    while len(got) < len(workers):
        try:
            what, index, payload = sync.results.get(timeout=0.1)
        except queue.Empty:
            tick()
            dead = [k for k, w in enumerate(workers) if k not in got and not w.is_alive()]
            if dead:
                try:  # its message may have arrived just before it exited
                    what, index, payload = sync.results.get(timeout=1)
                except queue.Empty:
                    raise BenchError(f"client process {dead[0]} died (exit code {workers[dead[0]].exitcode})") from None
            elif end is not None and time.monotonic() > end:
                raise BenchError(f"client processes not {kind} after {timeout:.0f} s") from None
            else:
                continue
        if what == "error":
            raise BenchError(f"client process {index}: {payload}")
        got[index] = payload
    return [got[k] for k in range(len(workers))]


def _summarise(
    records: list[_Records],
    workload: Workload,
    load: Load,
    server: str,
    cores: int,
    t_start: float,
    cost: Cost | None,
    server_window_s: float,
) -> StepResult:
    cat = {f.name: np.concatenate([getattr(r, f.name) for r in records]) for f in fields(_Records) if f.name != "cpu_s"}
    if load.duration_s:  # the requests that completed inside the window
        window = load.duration_s
        selected = (cat["done"] >= t_start) & (cat["done"] <= t_start + window)
    else:  # the first N issued after the warm-up, from the first one's start to the last one's end
        selected = cat["measured"]
        window = float(cat["done"][selected].max() - cat["start"][selected].min()) if selected.any() else 0.0
    ok = selected & (cat["code"] == 0)
    n_ok = int(ok.sum())
    nan = float("nan")
    latency_ms = (cat["done"] - cat["start"])[ok] * 1000
    p50, p90, p95, p99 = np.percentile(latency_ms, [50, 90, 95, 99]) if n_ok else [nan] * 4

    def mean(name: str, scale: float = 1.0) -> float:
        return round(float(cat[name][ok].mean()) * scale, 3) if n_ok else nan

    def per_s(n: float) -> float:
        return round(n / window, 2) if window > 0 else 0.0

    def pct_of_cores(cpu_s: float | None, seconds: float) -> float | None:
        return None if cpu_s is None or seconds <= 0 else round(100 * cpu_s / (seconds * cores), 1)

    client_cpu_s = sum(r.cpu_s for r in records)
    errors = Counter(_CODE_NAMES.get(int(c), str(int(c))) for c in cat["code"][selected & ~ok])
    return StepResult(
        server=server,
        loop="closed" if load.closed else "open",
        mode=workload.mode,
        inputs="tensor" if workload.tensor else "jpeg",
        concurrency=load.concurrency,
        rate=load.rate,
        batch=workload.batch,
        processes=len(records),
        window_s=round(window, 3),
        requests=int(selected.sum()),
        ok=n_ok,
        images=n_ok * workload.batch,
        req_s=per_s(n_ok),
        img_s=per_s(n_ok * workload.batch),
        p50_ms=round(float(p50), 3),
        p90_ms=round(float(p90), 3),
        p95_ms=round(float(p95), 3),
        p99_ms=round(float(p99), 3),
        max_ms=round(float(latency_ms.max()), 3) if n_ok else nan,
        mean_ms=round(float(latency_ms.mean()), 3) if n_ok else nan,
        queue_ms=mean("queue_us", 1e-3),
        preprocess_ms=mean("preprocess_us", 1e-3),
        inference_ms=mean("inference_us", 1e-3),
        batch_size=mean("batch_size"),
        client_cpu_s=round(client_cpu_s, 3),
        client_cpu_pct=pct_of_cores(client_cpu_s, window) or 0.0,
        server_cpu_pct=pct_of_cores(cost.cpu_s if cost else None, server_window_s),
        **_cost_fields(cost, n_ok * workload.batch),
        lag_max_ms=round(float(cat["lag"][selected].max()) * 1000, 3) if selected.any() else 0.0,
        errors=dict(sorted(errors.items())),
        lanes=dict(sorted(Counter(_LANE_NAMES.get(int(v), str(int(v))) for v in cat["lane"][ok]).items())),
    )


def _cost_fields(cost: Cost | None, images: int) -> dict[str, Any]:
    """The server's cost per image over a window that answered `images`."""
    if cost is None or not images:
        return {}
    out: dict[str, Any] = {
        "cpu_ms_img": round(1000 * cost.cpu_s / images, 3),
        "cpu_roles_ms_img": per_image_ms(cost.by_role_s, images),
    }
    if cost.gil is not None:
        out["gil_pct"] = round(100 * cost.gil.held, 1)
        out["gil_ms_img"] = round(1000 * cost.gil.held_s / images, 3)
        out["gil_roles_ms_img"] = per_image_ms(cost.gil.by_role_s, images)
    return out


# ------------------------------------------------------------------------------------ worker side

_Outcome = tuple[int, "pb.Timing | None"]  # status code number (0: OK), the server's timing
_Call = Callable[[pb.ClassifyRequest], Awaitable[_Outcome]]


def _worker(workload: Workload, load: Load, share: _Share, sync: _Sync, worker: int) -> None:
    """Process entry point: report ("ready"), wait for the start signal, run, report ("done")."""
    try:
        sync.results.put(("done", worker, asyncio.run(_work(workload, load, share, sync, worker))))
    except BaseException as exc:  # everything goes back to the parent, which explains and stops
        sync.results.put(("error", worker, _describe(exc)))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"the server answered the probe request with {exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


async def _work(workload: Workload, load: Load, share: _Share, sync: _Sync, worker: int) -> _Records:
    requests = build_requests(workload)
    # channels share one connection unless each keeps its own subchannel pool
    options = [*CHANNEL_OPTIONS, *([("grpc.use_local_subchannel_pool", 1)] if workload.connections > 1 else [])]
    async with contextlib.AsyncExitStack() as channels:
        stubs = []
        for _ in range(workload.connections):
            channel = await channels.enter_async_context(grpc.aio.insecure_channel(workload.target, options=options))
            try:
                await asyncio.wait_for(channel.channel_ready(), 30)
            except TimeoutError:
                raise BenchError(f"cannot connect to {workload.target} within 30 s") from None
            stubs.append(pb_grpc.ClassifierStub(channel))
            await stubs[-1].Classify(requests[0], timeout=max(workload.timeout_s, 60))  # connection and server warm
        sync.results.put(("ready", worker, None))
        await asyncio.get_running_loop().run_in_executor(None, sync.go.wait)
        t_warm = sync.start.value
        t_start = t_warm + load.warmup_s
        t_end = t_start + load.duration_s if load.duration_s else None
        streams = [_Stream(stub, workload.timeout_s) for stub in stubs] if workload.mode == "stream" else []
        call: _Call = _turns(streams) if streams else _unary(stubs, workload.timeout_s)
        recorder = _Recorder(sync if load.requests else None)
        cpu_start = asyncio.create_task(_cpu_at(t_start))
        cpu_end = asyncio.create_task(_cpu_at(t_end)) if t_end is not None else None
        await _sleep_until(t_warm)
        if load.closed:
            await _closed_loop(call, requests, share, recorder, sync, t_start, t_end)
        else:
            await _open_loop(call, requests, share, recorder, t_warm, t_start, t_end)
        cpu_s = (await cpu_end if cpu_end else time.process_time()) - await cpu_start
        for stream in streams:
            await stream.close()
    return recorder.records(cpu_s)


def build_requests(workload: Workload) -> list[pb.ClassifyRequest]:
    """Requests built once: `batch` consecutive inputs each, cycling through all inputs."""
    if workload.tensor:
        images = [
            pb.Image(tensor=pb.Tensor(shape=list(x.shape), dtype="float32", data=x.tobytes()))
            for x in model_inputs(workload.images[:TENSOR_INPUTS])
        ]
    else:
        images = [pb.Image(encoded=Path(p).read_bytes()) for p in workload.images]
    count = -(-len(images) // workload.batch)
    return [
        pb.ClassifyRequest(
            model=workload.model,
            images=[images[(j * workload.batch + k) % len(images)] for k in range(workload.batch)],
            priority=pb.Priority.ValueType(workload.priority),
        )
        for j in range(count)
    ]


def model_inputs(paths: Sequence[str]) -> list[np.ndarray]:
    """float32 [3, 224, 224] inputs made by the server's own preprocessing and normalisation."""
    from mobiserve.server.processing.normalize import assemble
    from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded

    limits = ImageLimits()
    return [assemble([preprocess_encoded(Path(p).read_bytes(), limits)])[0] for p in paths]


class _Recorder:
    """Per-request records, kept in plain lists (cheap appends) until the end."""

    def __init__(self, sync: _Sync | None):
        self._progress = sync.progress if sync is not None else None
        self._rows: list[tuple[float, float, int, int, int, int, int, bool, float, int]] = []

    def add(self, start: float, outcome: _Outcome, measured: bool, lag: float = 0.0) -> None:
        done = time.monotonic()
        code, t = outcome
        if t is None:
            self._rows.append((start, done, code, 0, 0, 0, 0, measured, lag, 0))
        else:
            self._rows.append(
                (start, done, code, t.queue_us, t.preprocess_us, t.inference_us, t.batch_size, measured, lag, t.lane)
            )
        if measured and self._progress is not None:
            with self._progress.get_lock():
                self._progress.value += 1

    def records(self, cpu_s: float) -> _Records:
        cols = list(zip(*self._rows)) if self._rows else [()] * 10
        dtypes = ("f8", "f8", "i4", "i8", "i8", "i8", "i8", "?", "f8", "i4")
        names = [f.name for f in fields(_Records) if f.name != "cpu_s"]
        return _Records(**{n: np.array(c, dtype=d) for n, c, d in zip(names, cols, dtypes)}, cpu_s=cpu_s)


async def _closed_loop(
    call: _Call,
    requests: list[pb.ClassifyRequest],
    share: _Share,
    recorder: _Recorder,
    sync: _Sync,
    t_start: float,
    t_end: float | None,
) -> None:
    """Each caller keeps one request in flight: send, wait for the answer, send the next."""

    def ticket() -> bool:
        with sync.tickets.get_lock():
            if sync.tickets.value <= 0:
                return False
            sync.tickets.value -= 1
            return True

    async def caller(i: int) -> None:
        while True:
            now = time.monotonic()
            if t_end is not None:
                if now >= t_end:
                    return
                measured = True  # the parent keeps those that complete inside the window
            else:
                measured = now >= t_start
                if measured and not ticket():
                    return
            recorder.add(now, await call(requests[i % len(requests)]), measured)
            i += share.stride

    await asyncio.gather(*(caller(g) for g in share.callers))


async def _open_loop(
    call: _Call,
    requests: list[pb.ClassifyRequest],
    share: _Share,
    recorder: _Recorder,
    t_warm: float,
    t_start: float,
    t_end: float | None,
) -> None:
    """Poisson arrivals at `share.rate`, whatever the answers do; latency counts from the scheduled time."""
    rng = random.Random(share.index)
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: pb.ClassifyRequest, scheduled: float, measured: bool, lag: float) -> None:
        recorder.add(scheduled, await call(request), measured, lag)

    arrival, sent, measured_sent = t_warm, share.index * 997, 0
    while True:
        arrival += rng.expovariate(share.rate)
        measured = arrival >= t_start
        if t_end is not None and arrival >= t_end:
            break
        if t_end is None and measured:
            if measured_sent >= (share.requests or 0):
                break
            measured_sent += 1
        await _sleep_until(arrival)
        task = asyncio.create_task(one(requests[sent % len(requests)], arrival, measured, time.monotonic() - arrival))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    await asyncio.gather(*tasks)


def _turns(calls: Sequence[_Call]) -> _Call:
    turn = itertools.cycle(calls)

    async def call(request: pb.ClassifyRequest) -> _Outcome:
        return await next(turn)(request)

    return call


def _unary(stubs: list[pb_grpc.ClassifierStub], timeout: float) -> _Call:
    turn = itertools.cycle(stubs)

    async def call(request: pb.ClassifyRequest) -> _Outcome:
        try:
            response = await next(turn).Classify(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code().value[0], None
        return 0, response.timing

    return call


class _Stream:
    """One pipelined ClassifyStream carrying all of this process's requests, matched by request_id.

    Writes are serialised (grpc.aio allows one writer); a broken stream fails its pending requests
    with its status and the next request opens a new one.
    """

    def __init__(self, stub: pb_grpc.ClassifierStub, timeout: float):
        self._stub = stub
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._seq = 0
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[_Outcome]] = {}

    async def __call__(self, request: pb.ClassifyRequest) -> _Outcome:
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        async with self._lock:
            if self._call is None:
                self._call = self._stub.ClassifyStream()
                self._pending = {}
                self._reader = asyncio.create_task(self._read(self._call, self._pending))
            self._seq += 1
            request.request_id = str(self._seq)  # the write below serialises it before anyone else can change it
            self._pending[request.request_id] = future
            try:
                await self._call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the reader reports the stream's status to every pending request
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            return grpc.StatusCode.DEADLINE_EXCEEDED.value[0], None

    async def _read(self, call: Any, pending: dict[str, asyncio.Future[_Outcome]]) -> None:
        code = grpc.StatusCode.UNKNOWN.value[0]
        try:
            async for response in call:
                future = pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    failed = response.HasField("error")
                    future.set_result((response.error.code, None) if failed else (0, response.timing))
        except grpc.aio.AioRpcError as exc:
            code = exc.code().value[0]
        finally:
            if self._call is call:
                self._call = None
            for future in pending.values():
                if not future.done():
                    future.set_result((code, None))

    async def close(self) -> None:
        async with self._lock:
            call, reader = self._call, self._reader
            if call is not None:
                await call.done_writing()
        if reader is not None:
            await reader


async def _sleep_until(when: float) -> None:
    """Yields even when already late, so that a client behind schedule still runs its requests."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))


async def _cpu_at(when: float) -> float:
    await _sleep_until(when)
    return time.process_time()

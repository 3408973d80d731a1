"""A rolling update and a scale-out, simulated with real processes: what docs/deploy.md promises
for Kubernetes, checked without a cluster.

Replicas are `mobiserve serve` processes on their own loopback addresses (127.0.0.2, .3, .4) and
one port, as pods share a container port; each serves its own /metrics, which tells what it
answered. One long-lived `AsyncClient` (round_robin and the default retries) keeps 32 callers
busy throughout. The replicas are replaced one by one as a rollout does it (SIGTERM, the drain,
exit 0, a new process on the same address, SERVING, then traffic), and a fourth one is added,
as a scale-out adds a ready pod. Asserted: no call failed, every replica (old and new) answered
calls, the added one within --max-connection-age and a few seconds.

The client reaches the replicas through a real DNS answer (dnslib on 127.0.0.1) standing in for
the headless Service, not a fixed `ipv4:` list: a fixed list cannot grow, so no client could
ever learn of the added replica. During the rollout the answer keeps every address, the
draining one too, as a client that has not re-resolved yet sees it: the client learns only what
the servers tell it (their drain, a closed port, a new process taking the address).

The client is the library's default: it watches each replica's health (gRPC's client-side health
checking), so round_robin leaves a replica the moment its drain turns it NOT_SERVING. Without a
cluster's moving parts (readiness probes, endpoint updates, preStop), what happens is the
servers' and the client's alone.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from PIL import Image

from mobiserve.client import AsyncClient, MobiserveError

import helpers
from helpers import INT8, SYNSETS, ServerProcess

pytestmark = pytest.mark.slow

NAME = "replicas.mobiserve.test"
REPLICAS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
ADDED = "127.0.0.5"
CALLERS = 32
AGE_S, AGE_GRACE_S = 3.0, 5.0  # --max-connection-age, --max-connection-age-grace
GRACE_S = 10.0  # --grace-period: the longest a drain may take
# gRPC re-resolves a name at most every 30 s by default; a test cannot wait that long (with the
# manifests' 120 s age it hardly matters: docs/deploy.md).
RESOLVE_OFTEN = [("grpc.dns_min_time_between_resolutions_ms", 1000)]


class Endpoints(BaseResolver):
    """The headless Service's DNS: an A record for each address listed now (TTL 0)."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.addresses = list(addresses)

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        question = request.q
        if question.qtype == QTYPE.A and str(question.qname).rstrip(".") == NAME:
            for address in self.addresses:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=0))
        return reply  # anything else (AAAA, other names): no record


@contextmanager
def dns(endpoints: Endpoints) -> Iterator[int]:
    """A DNS server on 127.0.0.1 (UDP) answering from `endpoints`; yields its port."""
    server = DNSServer(endpoints, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield int(server.server.server_address[1])
    finally:
        server.stop()
        server.server.server_close()


def common_port() -> int:
    """A port free on every address used here (each replica binds its own address)."""
    for _ in range(20):
        port = helpers.free_port(REPLICAS[0])
        with ExitStack() as held:
            try:
                for address in (*REPLICAS[1:], ADDED):
                    held.enter_context(socket.create_server((address, port)))
            except OSError:
                continue
        return port
    raise AssertionError("no port free on all of 127.0.0.2-5")


@dataclass
class Replica:
    address: str
    metrics_port: int
    process: ServerProcess

    def answered(self) -> int:
        """Classify calls this process answered OK, by its own count."""
        return int(
            helpers.metric(self.address, self.metrics_port, "mobiserve_requests_total", method="Classify", code="OK")
        )


def start_replica(address: str, port: int) -> Replica:
    metrics_port = helpers.free_port(address)
    process = helpers.serve(
        *("--port", str(port), "--metrics-port", str(metrics_port)),
        *("--model", f"int8={helpers.require(INT8)}", "--synsets", str(SYNSETS)),
        *("--max-connection-age", str(AGE_S), "--max-connection-age-grace", str(AGE_GRACE_S)),
        *("--grace-period", str(GRACE_S)),
        # four servers and the client share this machine's cores: one thread each
        *("--instances", "1", "--intra-op-threads", "1", "--preprocess-threads", "1"),
        host=address,
    )
    return Replica(address, metrics_port, process)


@dataclass
class Load:
    """Steady load: CALLERS callers, each one call at a time, all the time."""

    client: AsyncClient
    image: bytes
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # "CODE: message" -> count
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, what): events and failures
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.note("load started")
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(CALLERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _caller(self) -> None:
        while not self._stop.is_set():
            try:
                await self.client.classify(self.image, timeout=30)
                self.ok += 1
            except MobiserveError as exc:
                self.failed[f"{exc.code.name}: {exc.message}"] += 1
                self.note(f"call failed: {exc.code.name}")

    def note(self, what: str) -> None:
        self.timeline.append((time.monotonic(), what))

    def story(self) -> str:
        """The timeline, each line in seconds since the load started."""
        start = self.timeline[0][0] if self.timeline else 0.0
        return "\n".join(f"  {t - start:7.2f} s  {what}" for t, what in self.timeline)


async def until(what: str, condition: Any, timeout: float, interval: float = 0.2) -> float:
    """Poll `condition` (blocking, run in a thread) until true; the seconds it took. Fails on timeout."""
    start = time.monotonic()
    while not await asyncio.to_thread(condition):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def small_jpeg() -> bytes:
    """A real JPEG, small enough that decoding it costs little next to the model."""
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (120, 90, 60)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.timeout(240)
async def test_rolling_update_and_scale_out_under_load_fail_no_call() -> None:
    port = common_port()
    endpoints = Endpoints(REPLICAS)
    replicas = list(await asyncio.gather(*(asyncio.to_thread(start_replica, a, port) for a in REPLICAS)))
    everyone = list(replicas)
    answered: dict[str, int] = {}  # "ADDRESS old|new" -> calls it answered (an old one: just before its SIGTERM)
    report: dict[str, float] = {}
    try:
        with dns(endpoints) as dns_port:
            target = f"dns://127.0.0.1:{dns_port}/{NAME}:{port}"
            async with AsyncClient(target, options=RESOLVE_OFTEN) as client:
                load = Load(client, small_jpeg())
                load.start()
                try:
                    for old in replicas:  # every replica takes its share
                        await until(f"traffic to {old.address}", lambda r=old: r.answered() > 0, 20)
                    await asyncio.sleep(2)  # steady load
                    t0 = time.monotonic()
                    for i, old in enumerate(replicas):
                        answered[f"{old.address} old"] = old.answered()
                        old.process.signal()
                        load.note(f"SIGTERM {old.address}")
                        drain_start = time.monotonic()
                        code = await asyncio.to_thread(old.process.wait, GRACE_S + 30)
                        report[f"drain {old.address} s"] = time.monotonic() - drain_start
                        load.note(f"{old.address} exited {code}")
                        assert code == 0, old.process.log[-3000:]
                        new = await asyncio.to_thread(start_replica, old.address, port)
                        replicas[i] = new
                        load.note(f"new {new.address} serving")
                        everyone.append(new)
                        report[f"traffic to new {new.address} s"] = await until(
                            f"traffic to the new {new.address}", lambda r=new: r.answered() > 0, 20
                        )
                    report["rollout s"] = time.monotonic() - t0

                    # Scale-out: the new replica is ready, so it joins the DNS answer. Clients
                    # re-resolve when a connection closes; --max-connection-age closes them all.
                    added = await asyncio.to_thread(start_replica, ADDED, port)
                    everyone.append(added)
                    endpoints.addresses.append(ADDED)
                    load.note(f"{ADDED} added to the DNS answer")
                    report[f"traffic to added {ADDED} s"] = await until(
                        f"traffic to the added {ADDED}", lambda: added.answered() > 0, AGE_S * 1.1 + 5
                    )
                    await asyncio.sleep(1)
                finally:
                    await load.stop()
                for r in [*replicas, added]:
                    answered[f"{r.address} new"] = r.answered()
    finally:
        for r in everyone:
            r.process.kill()

    failed = sum(load.failed.values())
    print(f"\ncalls OK {load.ok}, failed {failed}; answered per replica {answered}; {report}")
    assert all(n > 0 for n in answered.values()), answered
    # each call OK was answered once; old replicas were read before their drain ended
    assert sum(answered.values()) <= load.ok
    assert not failed, f"{failed} of {load.ok + failed} calls failed: {dict(load.failed)}; when:\n{load.story()}"

"""`mobiserve serve --workers N`: worker processes on one port, and the supervisor that keeps them.

Real processes on 127.0.0.1: the supervisor and its spawned workers, a client with several
connections (the kernel spreads connections, not calls, over the workers), the metrics of all
workers on the supervisor's one port, a worker killed under load, a drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobiserve.client import AsyncClient, Client, MobiserveError
from mobiserve.server.cores import machine_cores
from mobiserve.server.runtime.session import default_instances, default_intra_op_threads, default_lone_threads

from helpers import INT8, SYNSETS, ServerProcess, free_port, metric, poll_until, serve

pytestmark = pytest.mark.slow
WORKERS = 2


@pytest.fixture
def supervised() -> Iterator[tuple[ServerProcess, int]]:
    metrics_port = free_port()
    server = serve(
        "--model", f"int8={INT8}", "--synsets", str(SYNSETS), "--workers", str(WORKERS),
        "--metrics-port", str(metrics_port), "--grace-period", "10",
    )  # fmt: skip
    yield server, metrics_port
    server.stop()


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"event=worker_started worker=(\d+) pid=(\d+)", server.log)}


def established_owners(port: int, pids: list[int]) -> Counter[int]:
    """How many established connections to `port` each of `pids` holds (their sockets' inodes)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    owners: Counter[int] = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if local_port == port and state == "01" and inode in inodes:
                owners[inodes[inode]] += 1
    return owners


def test_workers_share_one_port_and_their_metrics_add_up(supervised: tuple[ServerProcess, int], jpeg: bytes) -> None:
    server, metrics_port = supervised
    pids = list(worker_pids(server).values())
    assert len(pids) == WORKERS and server.log.count("event=worker_serving") == WORKERS
    for index in range(WORKERS):  # each worker listens only once its models are loaded, as documented
        events = re.findall(rf"worker={index} event=(\w+)", server.log)
        assert [e for e in events if e in ("model_loaded", "worker_listening", "worker_serving")][:3] == [
            "model_loaded",
            "worker_listening",
            "worker_serving",
        ], events
    # each on its share of the cores under load, and on the server's cores for lone requests
    share = max(1, machine_cores() // WORKERS)
    threads, lone = default_intra_op_threads(default_instances(share), share), default_lone_threads(machine_cores())
    assert server.log.count(f"intra_op_threads={threads} lone_threads={lone} ") == WORKERS, server.log
    # the kernel hands each connection to a worker at random: with 8, all landed on one worker in
    # about 1 run of 100; with 32 that takes about 2 in 4 billion
    with Client(server.target, connections=32) as client:
        assert client.health() == "SERVING"
        answers = [client.classify(jpeg) for _ in range(40)]
        owners = established_owners(server.port, pids)
    assert len({a.top.index for a in answers}) == 1
    assert set(owners) == set(pids), owners  # the kernel gave every worker connections
    # every worker's samples on the supervisor's one endpoint (prometheus-client's multiprocess mode)
    assert metric("127.0.0.1", metrics_port, "mobiserve_requests_total", model="int8", code="OK") == 40
    assert metric("127.0.0.1", metrics_port, "mobiserve_model_ready", model="int8") == WORKERS  # one per pid
    assert metric("127.0.0.1", metrics_port, "mobiserve_worker_restarts_total") == 0


def test_a_killed_worker_is_restarted_and_the_others_keep_serving(
    supervised: tuple[ServerProcess, int], jpeg: bytes
) -> None:
    server, metrics_port = supervised
    victim = worker_pids(server)[0]
    with Client(server.target, connections=8) as client:
        for _ in range(8):
            client.classify(jpeg)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        outcomes: Counter[str] = Counter()
        while time.monotonic() - killed < 60 and server.log.count("event=worker_serving") < WORKERS + 1:
            try:
                client.classify(jpeg, timeout=5)
                outcomes["OK"] += 1
            except MobiserveError as exc:
                outcomes[exc.code.name] += 1
        back_s = time.monotonic() - killed
        assert server.log.count("event=worker_serving") == WORKERS + 1, server.log[-2000:]
        after = [client.classify(jpeg) for _ in range(16)]  # the restarted worker's connections too
    print(f"\nworker back in {back_s:.1f} s; meanwhile {dict(outcomes)}")
    assert outcomes["OK"] > 0 and set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes  # the other worker served
    assert len(after) == 16
    assert re.search(rf"event=worker_exited worker=0 pid={victim} code=-9", server.log)
    assert worker_pids(server)[0] != victim
    assert metric("127.0.0.1", metrics_port, "mobiserve_worker_restarts_total") == 1
    assert metric("127.0.0.1", metrics_port, "mobiserve_model_ready", model="int8") == WORKERS  # the dead one's gone


async def test_sigterm_drains_every_worker_and_answers_every_call_it_accepted(
    supervised: tuple[ServerProcess, int], jpeg: bytes
) -> None:
    server, _ = supervised
    outcomes: Counter[str] = Counter()
    signalled = asyncio.Event()

    async def caller(client: AsyncClient) -> None:
        while True:
            try:
                await client.classify(jpeg, timeout=30)
                outcomes["OK"] += 1
            except MobiserveError as exc:
                outcomes[exc.code.name] += 1
                if signalled.is_set():
                    return  # refused once the drain began: this caller is done
                raise

    async with AsyncClient(server.target, connections=8) as client:
        callers = [asyncio.create_task(caller(client)) for _ in range(16)]
        await poll_until(lambda: outcomes["OK"] >= 16, timeout_s=60)  # the load is under way
        before = outcomes["OK"]
        signalled.set()
        server.signal(signal.SIGTERM)
        done, pending = await asyncio.wait(callers, timeout=30)
        for task in pending:
            task.cancel()
    code = await asyncio.to_thread(server.wait, 60)
    assert not pending and all(t.exception() is None for t in done)
    assert code == 0 and server.log.count("event=worker_stopped") == WORKERS
    assert re.findall(r"event=worker_stopped pid=\d+ code=(\S+)", server.log) == ["0"] * WORKERS
    assert before > 0 and set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes  # nothing accepted was lost

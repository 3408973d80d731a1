"""The obvious alternative to mobiserve, for `mobiserve bench --compare-unbatched`.

A plain grpc.aio server speaking the same proto with the same preprocessing and postprocessing,
that answers each request with its own onnxruntime call: no batcher. Requests run whole
(decode, crop, normalise, infer) in a thread pool of one thread per core, sharing one session with
the server's default tuning. Measured beside the batched server, it shows what batching buys.

Run: python -m mobiserve.bench.unbatched --model PATH --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mobiserve.common.labels import IMAGENET_SYNSETS, Labels
from mobiserve.server import threads as os_threads
from mobiserve.server.config import ModelConfig
from mobiserve.server.cores import available_cores
from mobiserve.server.metrics import Metrics
from mobiserve.server.processing.preprocess import ImageLimits
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning
from mobiserve.server.serving import (
    INTERACTIVE,
    Classified,
    ImageInput,
    ModelRegistry,
    Timing,
    check_count,
    describe,
    run_whole,
)
from mobiserve.server.transport.calls import CallHandling
from mobiserve.server.transport.servicer import ClassifierServicer, register

NAME = "unbatched"
log = logging.getLogger("mobiserve.bench.unbatched")


class UnbatchedModel:
    """A `Servable` with no batcher: each request runs whole (preprocess + one onnxruntime call)
    in one worker thread. Served by mobiserve's own servicer, so transport, errors and streams are
    identical and only the batching differs."""

    def __init__(self, model: Model, threads: int, limits: ImageLimits = ImageLimits(), max_images: int = 256):
        self.model = model
        self.limits = limits
        self.max_images = max_images
        config = ModelConfig(
            name=NAME,
            path=model.path,
            max_batch_size=1,
            instances=threads,
            intra_op_threads=model.tuning.intra_op_threads,
            max_queue_size=0,
        )
        self.description = describe(config, model)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="request", initializer=os_threads.name_current)

    @property
    def name(self) -> str:
        return NAME

    async def classify(
        self, images: Sequence[ImageInput], deadline: float | None = None, lane: str = INTERACTIVE, wait: bool = False
    ) -> Classified:
        """Every request alike: no lanes (the pool's queue is first come, first served)."""
        check_count(images, self.max_images)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._classify, images, deadline, time.perf_counter()
        )

    def has_room(self, lane: str) -> bool:
        return True  # the pool's queue is unbounded

    async def room(self, lane: str) -> None:
        """Always room: the pool's queue is unbounded."""

    def _classify(self, images: Sequence[ImageInput], deadline: float | None, arrived: float) -> Classified:
        waited = time.perf_counter() - arrived  # for a free worker thread
        started = time.perf_counter()
        scores, prepared_s = run_whole(self.model, images, self.limits, deadline)
        took = time.perf_counter() - started - prepared_s
        timing = Timing(int(waited * 1e6), int(prepared_s * 1e6), int(took * 1e6), len(images))
        return Classified(NAME, scores, timing, self.model.labels)


async def serve(model_path: str, host: str, port: int, threads: int, intra_op_threads: int) -> None:
    model = Model(model_path, Labels.load(IMAGENET_SYNSETS), SessionTuning(intra_op_threads=intra_op_threads))
    model.warm_up(1)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.so_reuseport", 0)])
    os_threads.name_grpc_poller()
    handling = CallHandling(Metrics(), default_timeout_s=30.0, model_names=[NAME])
    handling.registry = ModelRegistry([UnbatchedModel(model, threads)], NAME)
    register(ClassifierServicer(handling), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("event=listening address=%s:%d", host, port)  # the lines the harness waits for, as mobiserve's
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("event=serving port=%d models=%s", port, NAME)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)


def main() -> None:
    cores = available_cores()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="ONNX file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--threads", type=int, default=cores, help="requests handled at once (default: cores)")
    p.add_argument("--intra-op-threads", type=int, default=cores, help="onnxruntime threads (default: cores)")
    args = p.parse_args()
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s level=%(levelname)s %(message)s")
    asyncio.run(serve(args.model, args.host, args.port, args.threads, args.intra_op_threads))


if __name__ == "__main__":
    main()

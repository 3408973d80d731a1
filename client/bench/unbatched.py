"""The obvious alternative to mobiserve, for `mobiserve bench --compare-unbatched`.

A plain grpc.aio server speaking the same proto with the same preprocessing and postprocessing,
that answers each request with its own onnxruntime call: no batcher. Requests run whole
(decode, crop, normalise, infer) in a thread pool of one thread per core, sharing one session with
the server's default tuning. Measured beside the batched server, it shows what batching buys.

Run: python -m mobiserve.client.bench.unbatched --model PATH --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mobiserve.server.config import IMAGENET_SYNSETS
from mobiserve.server.errors import InvalidInput
from mobiserve.server.processing.labels import Labels
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded, preprocess_tensor
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning, available_cores
from mobiserve.server.serving import DEFAULT_TOP_K, ClassScore, Classified, ImageInput, RawTensor, Timing
from mobiserve.server.transport.convert import images_of, response_of
from mobiserve.server.transport.status import status_of
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

NAME = "unbatched"


class UnbatchedServicer(pb_grpc.ClassifierServicer):
    def __init__(self, model: Model, threads: int, limits: ImageLimits = ImageLimits()):
        self.model = model
        self.limits = limits
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="request")

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        try:
            return await self._answer(request)
        except Exception as exc:
            await context.abort(*status_of(exc))
            raise

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Every request answered as soon as it is done, like mobiserve's stream (without its window)."""
        answers: asyncio.Queue[pb.ClassifyResponse | None] = asyncio.Queue()

        async def answer(request: pb.ClassifyRequest) -> None:
            try:
                response = await self._answer(request)
            except Exception as exc:
                code, message = status_of(exc)
                response = pb.ClassifyResponse(request_id=request.request_id, error=pb.Error(code=code.value[0], message=message))
            answers.put_nowait(response)

        handlers: set[asyncio.Task[None]] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    handlers.add(task)
                    task.add_done_callback(handlers.discard)
            finally:
                await asyncio.gather(*handlers, return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
            for task in list(handlers):
                task.cancel()

    async def _answer(self, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
        arrived = time.perf_counter()
        images = images_of(request)
        if not images:
            raise InvalidInput("request has no images")
        result = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._classify, images, request.top_k or DEFAULT_TOP_K, arrived
        )
        return response_of(request, result)

    def _classify(self, images: list[ImageInput], top_k: int, arrived: float) -> Classified:
        """Worker thread: the whole request, with one onnxruntime call for all its images."""
        started = time.perf_counter()
        items = [self._prepare(i, image) for i, image in enumerate(images)]
        prepared = time.perf_counter()
        scores = self.model.infer(items)
        done = time.perf_counter()
        labels = self.model.labels
        results = [
            [ClassScore(int(i), labels.wnids[i], labels.names[i], float(p[i])) for i in order[:top_k]]
            for p, order in zip(scores.probabilities, scores.order)
        ]
        timing = Timing(int((started - arrived) * 1e6), int((prepared - started) * 1e6), int((done - prepared) * 1e6), len(items))
        return Classified(NAME, results, timing)

    def _prepare(self, index: int, image: ImageInput) -> np.ndarray:
        try:
            if isinstance(image, RawTensor):
                return preprocess_tensor(image.shape, image.dtype, image.data, self.limits)
            return preprocess_encoded(image, self.limits)
        except InvalidInput as exc:
            raise InvalidInput(f"image {index}: {exc}") from None


async def serve(model_path: str, host: str, port: int, threads: int, intra_op_threads: int) -> None:
    model = Model(model_path, Labels.load(IMAGENET_SYNSETS), SessionTuning(intra_op_threads=intra_op_threads))
    model.warm_up(1)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.so_reuseport", 0)])
    pb_grpc.add_ClassifierServicer_to_server(UnbatchedServicer(model, threads), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
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
    asyncio.run(serve(args.model, args.host, args.port, args.threads, args.intra_op_threads))


if __name__ == "__main__":
    main()

"""onnxruntime session tuning for Xeon-class CPUs.

How to choose (docs/performance.md has the measurements):
- `instances` sessions run batches concurrently; each has its own intra-op pool of
  `intra_op_threads` threads. instances x threads should equal the cores you give the model.
  MobileNetV2 stops scaling at about 4 threads per batch, so the default is one instance per
  4 cores (at least one), with the cores split evenly among instances. With one worker per core
  (the default) that is one session of one thread: the cheapest CPU per image.
- `lone_threads`: the all-core path (runtime/model.py): a lone request on an idle server runs on
  this many threads, by default all the server's cores up to 4 (past that a batch of one gets no
  faster), whatever the worker's share.
- inter-op threads = 1 and sequential execution: MobileNetV2 is a chain, there is no branch
  parallelism to exploit, and extra pools only fight for cores.
- spinning off by default: preprocessing threads share the cores, and a spinning intra-op pool
  would steal their time between batches. Turn it on for a model alone on dedicated cores.
- graph optimisation level ALL (constant folding, fusions, NCHWc layouts on AVX2/AVX-512).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

from mobiserve.server.cores import available_cores, machine_cores

CORES_PER_INSTANCE = 4


def default_instances(cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // CORES_PER_INSTANCE)


def default_intra_op_threads(instances: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // instances)


def default_lone_threads(cores: int | None = None) -> int:
    return max(1, min(cores or machine_cores(), CORES_PER_INSTANCE))


@dataclass(frozen=True)
class SessionTuning:
    intra_op_threads: int
    inter_op_threads: int = 1
    allow_spinning: bool = False
    optimization: str = "all"  # disable | basic | extended | all

    def options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        spin = "1" if self.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return opts


def open_session(path: str, tuning: SessionTuning) -> ort.InferenceSession:
    return ort.InferenceSession(path, tuning.options(), providers=["CPUExecutionProvider"])

"""Server reflection, so that grpcurl and friends need no .proto: every served service's file in
one descriptor pool. The Open Inference Protocol's stubs live in a pool of their own
(scripts/gen-protos.sh says why), the others in the default one."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2


def enable_reflection(server: grpc.aio.Server, services: Sequence[ServiceDescriptor]) -> None:
    pool = descriptor_pool.DescriptorPool()
    for file in dict.fromkeys([*(s.file for s in services), reflection_pb2.DESCRIPTOR]):
        pool.AddSerializedFile(file.serialized_pb)
    names = (*(s.full_name for s in services), reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=pool)

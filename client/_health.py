"""The standard gRPC health service (`grpc.health.v1.Health/Check`), without its package.

`HealthCheckRequest {string service = 1}` and `HealthCheckResponse {ServingStatus status = 1}`
have the same wire form as protobuf's own `StringValue` and `Int32Value`, so those serialise
them: the thin client needs neither grpcio-health-checking nor generated stubs, and adds no
`grpc.health.v1` symbols to the descriptor pool that a server in the same process registers.
"""

from __future__ import annotations

from google.protobuf.wrappers_pb2 import Int32Value, StringValue

CHECK = "/grpc.health.v1.Health/Check"
STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}  # HealthCheckResponse.ServingStatus
UNKNOWN_SERVICE = "SERVICE_UNKNOWN"  # also what a NOT_FOUND answer (a service the server does not know) means


def encode(service: str) -> bytes:
    return StringValue(value=service).SerializeToString()


def decode(data: bytes) -> str:
    return STATUSES.get(Int32Value.FromString(data).value, "UNKNOWN")

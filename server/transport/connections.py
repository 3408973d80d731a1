"""The gRPC server's connection limits: idle and age limits, keepalive pings, ping enforcement,
calls open at once.

gRPC's own defaults keep a connection forever (no idle or age limit), ping a silent peer only
after 2 hours and wait a minute for the answer, and refuse client pings more often than every 5
minutes. For an inference server that means idle or half-open connections pile up, and a client
behind a NAT that pings every 30 s gets GOAWAY `too_many_pings`. docs/operations.md gives the
reasons for each default; everything here is a core channel argument, so gRPC enforces it.
"""

from __future__ import annotations

from mobiserve.server.config import ServerConfig

# A connection must finish its TLS and HTTP/2 handshake in this time (gRPC's default: 120 s).
# A real client takes milliseconds; a socket that connects and sends nothing is closed quickly.
HANDSHAKE_TIMEOUT_S = 10.0
# Calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; gRPC's default:
# unlimited). gRPC core counts a stream until the server has let go of its call, so a client that
# opens streams and resets them at once (HTTP/2 "rapid reset") holds at most this many: core
# refuses the rest (RST_STREAM REFUSED_STREAM) before they cost the event loop anything. Streams
# the server is still letting go of count too, and gRPC's Python client does not retry a refused
# stream: so the limit sits well above what one connection of a well-behaved client runs (256 let
# a client with 200 calls in flight see a refusal now and then).
MAX_STREAMS_PER_CONNECTION = 1024


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Core channel arguments for `grpc.aio.server(options=...)`; a limit of 0 is left out (none)."""
    c = config
    options = [
        ("grpc.server_handshake_timeout_ms", _ms(HANDSHAKE_TIMEOUT_S)),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # server pings: how a peer that vanished without closing (half-open) is found
        ("grpc.keepalive_time_ms", _ms(c.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(c.keepalive_timeout_s)),
        # gRPC core times a keepalive ping out after ping_timeout (1 min by default), not after
        # keepalive_timeout alone: both are set so the documented timeout holds
        ("grpc.http2.ping_timeout_ms", _ms(c.keepalive_timeout_s)),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a quiet stream
        # client pings: allowed this often, with or without calls; faster earns strikes, then GOAWAY
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(c.min_ping_interval_s)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if c.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", _ms(c.max_connection_idle_s)))
    if c.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", _ms(c.max_connection_age_s)))
        if c.max_connection_age_grace_s:
            options.append(("grpc.max_connection_age_grace_ms", _ms(c.max_connection_age_grace_s)))
    return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))

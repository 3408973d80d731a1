"""Whether a server speaks TLS: asked only after a plaintext call failed, to say why."""

from __future__ import annotations

import re
import socket
import ssl

_HOST_PORT = re.compile(r"^\[?(?P<host>[^\[\]]+?)\]?:(?P<port>\d+)$")


def speaks_tls(target: str, timeout: float = 3.0) -> bool:
    """True when `target` (a plain host:port) completes a TLS handshake, or refuses one with a TLS
    alert (a server that wants a client certificate): a plaintext gRPC call there only sees the
    connection closed. False for anything else, including targets of several addresses."""
    found = _HOST_PORT.match(target)
    if found is None:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the question is only whether it speaks TLS
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((found["host"], int(found["port"])), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=found["host"]),
        ):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in str(exc).upper()
    except OSError:
        return False

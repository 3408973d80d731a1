"""Binding the server's port: one clear line when it cannot, and whether the address is exposed."""

from __future__ import annotations

import errno
import ipaddress
import socket

import grpc


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Add the listening port (TLS with `credentials`); returns the port bound (port 0: a free one).
    Raises OSError, in one line, when the port is in use or the address is not on this machine."""
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc's way of saying the bind failed
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {address}: the port is in use or the address is not on this machine")
    return int(bound)


def check_bindable(host: str, port: int) -> None:
    """Refuse a port in use (or an address not on this machine) with our own one-line error: gRPC
    would also print its own `add_port.cc` error line first. A later race is still caught by gRPC."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return  # gRPC says what is wrong with the name
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                    raise OSError(f"cannot bind {host}:{port}: {exc.strerror}") from None
                raise


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host`."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"

"""The server's TLS credentials from the configured PEM files, checked first.

gRPC itself says only "Failed to bind" about a certificate and key that do not match, or a file
that is not PEM; Python's ssl reads them first and says which file is wrong and how."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from mobiserve.server.config import ServerConfig


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """Server TLS; with a client CA, mutual TLS (clients must present a certificate it signed).
    None without a certificate: plain text. Raises OSError on a missing or mismatched file."""
    if not config.tls_cert:
        return None
    if not config.tls_key:
        raise OSError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as exc:
        raise OSError(
            f"{config.tls_cert} and {config.tls_key} are not a matching PEM certificate and key: {exc}"
        ) from None
    if config.tls_client_ca:
        try:
            check.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as exc:
            raise OSError(f"{config.tls_client_ca} is not a PEM CA certificate: {exc}") from None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

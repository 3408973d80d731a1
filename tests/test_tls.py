"""TLS and mutual TLS on the gRPC port, with a CA and certificates made here (nothing checked in).

A client that does not trust the server's CA, a plain-text client, and (mutual TLS) a client with
no certificate or one from another CA are all refused; the right client is served.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mobiserve.server.app import App
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import SYNSETS, cli, model_config, request_of, start_server

MOBISERVE = str(Path(sys.executable).parent / "mobiserve")


@dataclass(frozen=True)
class Issued:
    """PEM bytes of a certificate and its key, and where they were written."""

    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    folder: Path,
    cn: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (no issuer) or a leaf certificate for 127.0.0.1/localhost signed by `issuer`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer[0].subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = folder / f"{cn}.crt", folder / f"{cn}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return Issued(cert_pem, key_pem, cert_path, key_path), cert, key


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued  # signed by the CA
    rogue_ca: Issued
    rogue_client: Issued  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = issue(folder, "test-ca")
    server, _, _ = issue(folder, "server", (ca_cert, ca_key), ExtendedKeyUsageOID.SERVER_AUTH)
    client, _, _ = issue(folder, "client", (ca_cert, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_ca, rogue_cert, rogue_key = issue(folder, "rogue-ca")
    rogue_client, _, _ = issue(folder, "rogue-client", (rogue_cert, rogue_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca, server, client, rogue_ca, rogue_client)


@pytest_asyncio.fixture(scope="module")
async def tls_server(int8_model: Path, pki: Pki) -> AsyncIterator[App]:
    app = await start_server(
        model_config(int8_model), tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path)
    )
    yield app
    await app.stop(grace_s=5)


@pytest_asyncio.fixture(scope="module")
async def mtls_server(int8_model: Path, pki: Pki) -> AsyncIterator[App]:
    app = await start_server(
        model_config(int8_model),
        tls_cert=str(pki.server.cert_path),
        tls_key=str(pki.server.key_path),
        tls_client_ca=str(pki.ca.cert_path),
    )
    yield app
    await app.stop(grace_s=5)


async def classify(app: App, credentials: grpc.ChannelCredentials | None, jpeg: bytes) -> grpc.StatusCode:
    """One Classify over a fresh channel: the status it ended with."""
    target = f"127.0.0.1:{app.port}"
    channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    async with channel:
        try:
            response = await pb_grpc.ClassifierStub(channel).Classify(request_of(jpeg), timeout=30)
        except grpc.aio.AioRpcError as e:
            return e.code()
        assert len(response.results[0].classes) == 5
        return grpc.StatusCode.OK


def creds(ca: Issued, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert, private_key=client.key, certificate_chain=client.cert
    )


async def test_tls_serves_a_client_that_trusts_the_ca(tls_server: App, pki: Pki, jpeg: bytes) -> None:
    assert await classify(tls_server, creds(pki.ca), jpeg) == grpc.StatusCode.OK


async def test_tls_refuses_plain_text_and_untrusting_clients(tls_server: App, pki: Pki, jpeg: bytes) -> None:
    assert await classify(tls_server, None, jpeg) == grpc.StatusCode.UNAVAILABLE
    assert await classify(tls_server, creds(pki.rogue_ca), jpeg) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_a_client_with_a_certificate_from_the_ca(mtls_server: App, pki: Pki, jpeg: bytes) -> None:
    assert await classify(mtls_server, creds(pki.ca, pki.client), jpeg) == grpc.StatusCode.OK


async def test_mtls_refuses_clients_without_the_right_certificate(mtls_server: App, pki: Pki, jpeg: bytes) -> None:
    assert await classify(mtls_server, creds(pki.ca), jpeg) == grpc.StatusCode.UNAVAILABLE  # no certificate
    assert await classify(mtls_server, creds(pki.ca, pki.rogue_client), jpeg) == grpc.StatusCode.UNAVAILABLE
    assert await classify(mtls_server, None, jpeg) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (
            ["--tls-cert", "{server.cert_path}", "--tls-key", "{rogue_client.key_path}"],
            "not a matching PEM certificate and key",
        ),
        (
            [
                "--tls-cert",
                "{server.cert_path}",
                "--tls-key",
                "{server.key_path}",
                "--tls-client-ca",
                "{server.key_path}",
            ],
            "not a PEM CA certificate",
        ),
        (["--tls-client-ca", "{ca.cert_path}"], "needs --tls-cert and --tls-key"),
        (["--tls-cert", "{server.cert_path}"], "go together"),
    ],
)
def test_bad_tls_files_are_a_one_line_startup_error(int8_model: Path, pki: Pki, flags: list[str], words: str) -> None:
    args = [f.format(**vars(pki)) for f in flags]
    done = subprocess.run(
        [MOBISERVE, "serve", "--port", "0", "--model", str(int8_model), "--synsets", str(SYNSETS), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    usage = words in ("needs --tls-cert and --tls-key", "go together")  # flags that do not go together: exit 2
    assert done.returncode == (2 if usage else 1), done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mobiserve: error:") and words in last, done.stderr


async def test_the_commands_speak_tls_and_say_so_when_a_plaintext_call_meets_it(
    tls_server: App, mtls_server: App, pki: Pki, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    tls, mtls = (f"127.0.0.1:{app.port}" for app in (tls_server, mtls_server))
    image = str(sample_images[0])
    trust = ["--tls-ca", str(pki.ca.cert_path)]
    mine = ["--tls-cert", str(pki.client.cert_path), "--tls-key", str(pki.client.key_path)]

    async def run(*args: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(cli, capsys, *args)

    code, out, err = await run("classify", image, "--target", tls, *trust)
    assert code == 0 and image in out, err
    assert await run("health", "--target", mtls, *trust, *mine) == (0, "SERVING\n", "")
    code, out, err = await run("models", "--target", mtls, *trust, *mine, "--json")
    assert code == 0 and '"name": "int8"' in out, err

    for target in (tls, mtls):  # plaintext against TLS: one line that says so and what to give
        code, out, err = await run("classify", image, "--target", target)
        assert (code, out) == (1, "") and len(err.splitlines()) == 1, err
        assert f"server {target} speaks TLS" in err and "--tls-ca" in err, err
        code, out, err = await run("health", "--target", target, "--timeout", "10")
        assert code == 1 and "speaks TLS" in out, out
    code, out, err = await run("classify", image, "--target", tls, *trust, "--tls-cert", str(pki.client.cert_path))
    assert (code, out, err) == (2, "", "mobiserve: error: --tls-cert and --tls-key go together\n")

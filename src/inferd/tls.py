"""TLS for the REST and gRPC ports, optionally mutual.

Two sources, as TF Serving and the usual servers take them: ``--ssl_config_file``, TF Serving's
text-format ``SSLConfig`` holding the PEM *text* of the key, certificate and client CA, or
``--tls_cert``/``--tls_key``/``--tls_ca`` naming PEM *files*, with ``--tls_client_verify``.
Either one applies to both ports. The key never reaches a log or an error message.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import text_format

from inferd.errors import ConfigError

if TYPE_CHECKING:
    import grpc

    from inferd.config import ServerConfig


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The server's PEM certificate chain and key; with ``client_verify``, clients must present a
    certificate that chains to ``client_ca``."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes = b""
    client_verify: bool = False

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for the HTTP port (TLS 1.2 or later).

        Raises:
            ConfigError: the key or a certificate is not valid PEM, or they do not match.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The ssl module loads a key only from a file: write both to a private folder (mode 0700)
        # that is removed as soon as they are read.
        with tempfile.TemporaryDirectory(prefix="inferd-tls-") as folder:
            cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            cert_path.write_bytes(self.cert_chain)
            key_path.touch(mode=0o600)
            key_path.write_bytes(self.private_key)
            try:
                context.load_cert_chain(cert_path, key_path, password=_refuse_password)
            except ssl.SSLError as exc:
                raise ConfigError(
                    f"TLS: cannot use the server certificate and key ({exc.reason or exc}); "
                    "expected an unencrypted PEM key and the PEM certificate that matches it"
                ) from exc
        if self.client_ca:
            try:  # the PEM blocks are ASCII; text around them (a bundle's comments) may not be
                context.load_verify_locations(cadata=self.client_ca.decode("ascii", errors="ignore"))
            except ssl.SSLError as exc:
                raise ConfigError(f"TLS: the client CA is not valid PEM ({exc.reason or exc})") from exc
        context.verify_mode = ssl.CERT_REQUIRED if self.client_verify else ssl.CERT_NONE
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """The same settings as gRPC server credentials."""
        import grpc

        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca or None,
            require_client_auth=self.client_verify,
        )


async def abort_closed_connections(server_state: Any, period_s: float = 0.05) -> None:
    """Run while uvicorn shuts down over TLS: abort each connection it has closed once nothing
    is left to send on it.

    Closing a TLS connection sends close_notify and waits, up to 30 s, for the client's; a client
    that keeps an idle kept-alive connection open (any connection pool) never answers, and
    uvicorn waits for that connection before it exits. A closed connection carries no response,
    so dropping it loses nothing.
    """
    while True:
        for connection in list(server_state.connections):
            transport = connection.transport
            if transport.is_closing() and not transport.get_write_buffer_size():
                transport.abort()
        await asyncio.sleep(period_s)


def _refuse_password() -> bytes:
    raise ConfigError("TLS: the server key is encrypted; inferd needs an unencrypted PEM key")


def tls_settings(config: ServerConfig) -> TlsSettings | None:
    """The TLS settings ``config`` asks for, or None for plain HTTP and gRPC. The key and
    certificates are checked here, so that a bad one stops the server before it opens a port.

    Raises:
        ConfigError: the flags conflict, a file cannot be read, or the PEM data is unusable.
    """
    by_paths = config.tls_cert or config.tls_key or config.tls_ca or config.tls_client_verify
    if config.ssl_config_file and by_paths:
        raise ConfigError(
            "give either --ssl_config_file or --tls_cert/--tls_key/--tls_ca/--tls_client_verify"
        )
    if config.ssl_config_file:
        settings = _from_ssl_config(Path(config.ssl_config_file))
    elif by_paths:
        if not (config.tls_cert and config.tls_key):
            raise ConfigError("TLS needs both --tls_cert and --tls_key (PEM files)")
        settings = TlsSettings(
            _read(config.tls_cert, "--tls_cert"),
            _read(config.tls_key, "--tls_key"),
            _read(config.tls_ca, "--tls_ca") if config.tls_ca else b"",
            config.tls_client_verify,
        )
    else:
        return None
    if settings.client_verify and not settings.client_ca:
        raise ConfigError(
            "mutual TLS (client_verify) needs the CA that signs client certificates: "
            "custom_ca in --ssl_config_file, or --tls_ca"
        )
    settings.ssl_context()
    return settings


def _from_ssl_config(path: Path) -> TlsSettings:
    from inferd._proto import ssl_config_pb2

    message = ssl_config_pb2.SSLConfig()
    try:
        text_format.Parse(path.read_text(), message)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--ssl_config_file {path}: {exc}") from exc
    except text_format.ParseError as exc:
        # The parser's message quotes the offending line, which may hold the key: only an unknown
        # field's message (which quotes no line) is passed on.
        detail = str(exc) if "has no field named" in str(exc) else "syntax error"
        raise ConfigError(
            f"--ssl_config_file {path}: not a text-format SSLConfig "
            f"(server_key, server_cert, custom_ca, client_verify): line {exc.GetLine()}, "
            f"column {exc.GetColumn()}: {detail}"
        ) from None
    missing = [name for name in ("server_key", "server_cert") if not getattr(message, name).strip()]
    if missing:
        raise ConfigError(f"--ssl_config_file {path}: {' and '.join(missing)} must hold PEM text")
    return TlsSettings(
        message.server_cert.encode(),
        message.server_key.encode(),
        message.custom_ca.encode(),
        message.client_verify,
    )


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from exc

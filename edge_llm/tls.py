"""TLS on both ports: a certificate and its key (PEM), and optionally the CA whose client
certificates every connection must show (mTLS; a certificate's subject then names its caller).

The files are re-read on SIGHUP: new connections get the new certificate (gRPC asks for it
before each handshake; the HTTP side's SSLContext is loaded again in place), and streams already
open keep theirs. Files that no longer read keep the ones loaded before, and the log says why.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)


class TlsError(ValueError):
    """A certificate, key or CA file cannot be used; the message names it."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


def _pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read the TLS {what} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"the TLS {what} {path} is not PEM (no '-----BEGIN' line)")
    return data


class Tls:
    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._current = self._read()
        self._fresh: grpc.ServerCertificateConfiguration | None = None

    def _read(self) -> grpc.ServerCertificateConfiguration:
        f = self.files
        cert, key = _pem(f.cert, "certificate"), _pem(f.key, "key")
        ca = _pem(f.client_ca, "client CA") if f.client_ca else None
        # What grpc would only find at the first handshake: a key that is not the certificate's,
        # a CA file that does not parse.
        probe = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            probe.load_cert_chain(f.cert, f.key)
        except ssl.SSLError as e:
            raise TlsError(
                f"the TLS key {f.key} does not fit {f.cert}, or is invalid: {e}"
            ) from None
        if f.client_ca:
            try:
                probe.load_verify_locations(f.client_ca)
            except ssl.SSLError as e:
                raise TlsError(f"the TLS client CA {f.client_ca} is not valid: {e}") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current,
            self._next_certificate,
            require_client_authentication=self.files.client_ca is not None,
        )

    def _next_certificate(self) -> grpc.ServerCertificateConfiguration | None:
        """Asked by grpc before each handshake: a new configuration once after a reload."""
        fresh, self._fresh = self._fresh, None
        return fresh

    def http_options(self) -> dict[str, Any]:
        """uvicorn.Config's TLS settings."""
        f = self.files
        options: dict[str, Any] = {"ssl_certfile": str(f.cert), "ssl_keyfile": str(f.key)}
        if f.client_ca:
            options |= {"ssl_ca_certs": str(f.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options

    def reload(self, http: ssl.SSLContext | None) -> None:
        try:
            fresh = self._read()
            if http is not None:
                http.load_cert_chain(self.files.cert, self.files.key)
                if self.files.client_ca:
                    http.load_verify_locations(self.files.client_ca)
        except (TlsError, ssl.SSLError, OSError) as e:
            log.error("TLS files not re-read (%s); keeping the ones loaded before", e)
            return
        self._current = self._fresh = fresh
        log.info("TLS certificate re-read from %s", self.files.cert)

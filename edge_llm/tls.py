"""TLS on both ports: a certificate and its key (PEM), and optionally the CA whose client
certificates every connection must show (mTLS; a certificate's subject then names its caller,
on either port: `subject` spells it as gRPC does, and the HTTP side puts it in the ASGI
scope's TLS extension).

The files are re-read on SIGHUP: new connections get the new certificate and CA (gRPC asks
for them before each handshake; on HTTP each handshake switches to the newest SSLContext), and
streams already open keep theirs. Files that no longer read keep the ones loaded before, and
the log says why.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

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
        self._grpc, self._http = self._read()
        self._fresh: grpc.ServerCertificateConfiguration | None = None

    def _read(self) -> tuple[grpc.ServerCertificateConfiguration, ssl.SSLContext]:
        f = self.files
        cert, key = _pem(f.cert, "certificate"), _pem(f.key, "key")
        ca = _pem(f.client_ca, "client CA") if f.client_ca else None
        http = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            http.load_cert_chain(f.cert, f.key)
        except ssl.SSLError as e:
            raise TlsError(
                f"the TLS key {f.key} does not fit {f.cert}, or is invalid: {e}"
            ) from None
        if f.client_ca:
            try:
                http.load_verify_locations(f.client_ca)
            except ssl.SSLError as e:
                raise TlsError(f"the TLS client CA {f.client_ca} is not valid: {e}") from None
            http.verify_mode = ssl.CERT_REQUIRED
        http.set_alpn_protocols(["http/1.1"])
        http.sni_callback = self._switch
        configuration = grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca
        )
        return configuration, http

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc,
            self._next_certificate,
            require_client_authentication=self.files.client_ca is not None,
        )

    def _next_certificate(self) -> grpc.ServerCertificateConfiguration | None:
        """Asked by grpc before each handshake: a new configuration once after a reload."""
        fresh, self._fresh = self._fresh, None
        return fresh

    def http_options(self) -> dict[str, Any]:
        """uvicorn.Config's TLS settings: the SSLContext, and protocols that hand the client's
        certificate to the app."""
        return {
            "ssl_context_factory": lambda _config, _default: self._http,
            "http": _ClientCertificateHttp,
            "ws": _ClientCertificateWebSocket,
        }

    def _switch(self, connection: ssl.SSLObject, _server_name: str | None, _: Any) -> None:
        """The SNI callback, called at each HTTP handshake (with or without SNI): the newest
        SSLContext takes over. Reloading a context in place could add a CA, never remove one."""
        if connection.context is not self._http:
            connection.context = self._http

    def reload(self) -> None:
        try:
            self._grpc, self._http = self._read()
        except (TlsError, OSError) as e:
            log.error("TLS files not re-read (%s); keeping the ones loaded before", e)
            return
        self._fresh = self._grpc
        log.info("TLS certificate re-read from %s", self.files.cert)


_RFC2253_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "street",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
}


def subject(peercert: dict[str, Any]) -> str:
    """A verified certificate's subject (`ssl.SSLObject.getpeercert()`) as gRPC spells it in
    its auth context's x509_subject: RFC 2253, the most specific part first, special and
    non-ASCII bytes escaped. One certificate is then one caller on both ports."""
    parts = []
    for rdn in reversed(peercert.get("subject", ())):
        parts.append("+".join(f"{_attribute(k)}={_escape(v)}" for k, v in reversed(rdn)))
    return ",".join(parts)


def _attribute(name: str) -> str:
    if name[:1].isdigit():  # an OID OpenSSL has no name for; gRPC dumps its value as DER
        return name
    return _RFC2253_NAMES.get(name, name)


def _escape(value: str) -> str:
    out = []
    data = value.encode()
    for i, byte in enumerate(data):
        c = chr(byte)
        if c in ',+"\\<>;' or (i == 0 and c in " #") or (i == len(data) - 1 and c == " "):
            out.append("\\" + c)
        elif byte < 0x20 or byte >= 0x7F:
            out.append(f"\\{byte:02X}")
        else:
            out.append(c)
    return "".join(out)


class _ClientCertificate:
    """The app of one TLS connection: its verified client certificate's subject in each
    scope, as the ASGI TLS extension's client_cert_name."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app, self.name = app, name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"] = {
            **(scope.get("extensions") or {}),
            "tls": {"client_cert_name": self.name},
        }
        await self.app(scope, receive, send)


def _with_client_certificate(protocol: Any, transport: asyncio.BaseTransport) -> None:
    connection = transport.get_extra_info("ssl_object")
    certificate = connection.getpeercert() if connection is not None else None
    if certificate:  # only a verified one is given
        protocol.app = _ClientCertificate(protocol.app, subject(certificate))


class _ClientCertificateHttp(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _with_client_certificate(self, transport)


class _ClientCertificateWebSocket(WebSocketsSansIOProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _with_client_certificate(self, transport)

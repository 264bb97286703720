"""TLS on both ports with real certificates (a CA made here): gRPC, the openai SDK over HTTPS,
client certificates (mTLS), grpcurl as the README shows it, and SIGHUP swapping the
certificate while a stream goes on."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import ServeProcess, start_server
from test_health_reflection import grpcurl
from websockets.sync.client import connect as ws_connect

from edge_llm import tls
from edge_llm.config import ConfigError, load_config
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

TOKEN = "tls-test-token-0123456789abcdef"


class Pki:
    """A CA, and certificates it signs, as PEM files in a directory."""

    def __init__(self, directory: Path, name: str = "edge-llm test CA") -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._sign(self.name, self.key.public_key(), ca=True)
        self.ca = self._write(f"{name}.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _sign(self, subject: x509.Name, public_key, ca: bool = False, sans=()) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def issue(
        self, common_name: str, server: bool = False, organization: str = "edge-llm tests"
    ) -> tuple[Path, Path]:
        """(certificate, key) for a server on 127.0.0.1/localhost, or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        sans = (
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            if server
            else []
        )
        cert = self._sign(subject, key.public_key(), sans=sans)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (
            self._write(f"{common_name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{common_name}.key", key_pem),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"kiosk {TOKEN}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(tiny_model: Path, pki: Pki, tokens: Path) -> Iterator[Server]:
    cert, key = pki.issue("server-a", server=True)
    srv = start_server(tiny_model, tls_cert=str(cert), tls_key=str(key), auth_tokens=str(tokens))
    yield srv
    srv.stop(drain=0)


def auth() -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKEN}"),)


def auth_header() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def credentials(pki: Pki, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    """Channel credentials that check the server against pki's CA, with a client's
    (certificate, key) if given."""
    cert, key = (client[0].read_bytes(), client[1].read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, cert)


def served_certificate(port: int, ca: Path, alpn: str) -> str:
    """The common name of the certificate a fresh TLS connection to the port is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        cert = conn.getpeercert()
    return dict(pair[0] for pair in cert["subject"])["commonName"]  # type: ignore[index]


def test_tls_settings_go_together() -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config({"tls_cert": "/c.pem"}, env={})
    with pytest.raises(ConfigError, match=r"tls_client_ca \(mTLS\) needs tls_cert"):
        load_config({"tls_client_ca": "/ca.pem"}, env={})
    # Client certificates are an authentication of their own: no tokens needed.
    config = {"host": "0.0.0.0", "tls_cert": "/c", "tls_key": "/k", "tls_client_ca": "/ca"}
    assert load_config({**config, "http_listen": "0.0.0.0:8080"}, env={}).exposed


def test_a_certificate_subject_is_spelled_as_grpc_spells_it() -> None:
    # What grpc's auth context gave as x509_subject for these subjects (cryptography-made
    # certificates, read back by ssl's getpeercert); tests below compare the two live.
    seen = {
        (
            (("countryName", "DE"),),
            (("organizationName", 'Doe, Jane+Co <x>;"q"\\'),),
            (("organizationalUnitName", "ou1"),),
            (("organizationalUnitName", "ou2"),),
            (("commonName", " #h\u00e9llo w\u00f6rld= "),),
        ): r"CN=\ #h\C3\A9llo w\C3\B6rld=\ ,OU=ou2,OU=ou1,O=Doe\, Jane\+Co \<x\>\;\"q\"\\,C=DE",
        (
            (("commonName", "a"), ("userId", "u1")),
            (("emailAddress", "a@b.c"),),
            (("serialNumber", "123"),),
            (("domainComponent", "example"),),
        ): "DC=example,serialNumber=123,emailAddress=a@b.c,UID=u1+CN=a",
        ((("commonName", "tab\there\x01"),),): r"CN=tab\09here\01",
    }
    for subject, spelled in seen.items():
        assert tls.subject({"subject": subject}) == spelled


def test_unusable_tls_files_are_refused_with_their_name(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.issue("server-x", server=True)
    other_cert, _ = pki.issue("server-y", server=True)
    with pytest.raises(tls.TlsError, match=f"cannot read the TLS certificate {tmp_path}"):
        tls.Tls(tls.TlsFiles(tmp_path / "none.pem", key))
    (tmp_path / "junk.pem").write_text("not pem")
    with pytest.raises(tls.TlsError, match="is not PEM"):
        tls.Tls(tls.TlsFiles(cert, tmp_path / "junk.pem"))
    with pytest.raises(tls.TlsError, match="does not fit"):
        tls.Tls(tls.TlsFiles(other_cert, key))
    result = subprocess.run(
        [sys.executable, "-m", "edge_llm", "serve", "--tls-cert", str(other_cert),
         "--tls-key", str(key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "does not fit" in result.stderr
    assert "Traceback" not in result.stderr


def test_grpc_over_tls(secured: Server, pki: Pki) -> None:
    target = f"127.0.0.1:{secured.port}"
    with grpc.secure_channel(target, credentials(pki)) as channel:
        info = pb_grpc.EdgeLLMStub(channel).GetInfo(pb.GetInfoRequest(), metadata=auth())
        assert info.model.name
    with grpc.insecure_channel(target) as plain:  # a client that does not speak TLS
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.EdgeLLMStub(plain).GetInfo(pb.GetInfoRequest(), metadata=auth(), timeout=10)
        assert refused.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


def test_the_openai_sdk_over_https(secured: Server, pki: Pki) -> None:
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)))
    client = openai.OpenAI(
        base_url=f"https://127.0.0.1:{secured.http_port}/v1",
        api_key=TOKEN,
        http_client=http,
        max_retries=0,
    )
    answer = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.choices[0].finish_reason
    with pytest.raises(httpx.HTTPError):  # plain HTTP to a TLS port
        httpx.get(f"http://127.0.0.1:{secured.http_port}/health", timeout=10)


def test_grpcurl_as_the_readme_shows(secured: Server, pki: Pki) -> None:
    cmd = [grpcurl(), "-cacert", str(pki.ca), "-H", f"authorization: Bearer {TOKEN}"]
    listed = subprocess.run(
        [*cmd, f"127.0.0.1:{secured.port}", "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "edge_llm.v1.EdgeLLM" in listed.stdout


def test_client_certificates_are_required_and_name_the_caller_on_both_ports(
    tiny_model: Path, pki: Pki, tokens: Path, tmp_path: Path
) -> None:
    cert, key = pki.issue("server-m", server=True)
    tls_files = {"tls_cert": str(cert), "tls_key": str(key), "tls_client_ca": str(pki.ca)}
    srv = start_server(tiny_model, **tls_files)
    try:
        target = f"127.0.0.1:{srv.port}"
        # A subject with characters RFC 2253 escapes: each port must spell it the same way.
        kiosk = pki.issue("kiösk-1", organization="Doe, Jane+Co <shop>")
        with grpc.secure_channel(target, credentials(pki, kiosk)) as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            assert stub.GetInfo(pb.GetInfoRequest()).model.name
            made = stub.CreateSession(pb.CreateSessionRequest(title="kiosk-1's")).session
        # The certificate's subject names the caller: another certificate, another owner.
        other = pki.issue("kiosk-3")
        with grpc.secure_channel(target, credentials(pki, other)) as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            with pytest.raises(grpc.RpcError) as hidden:
                stub.GetSession(pb.GetSessionRequest(id=made.id))
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        sessions = f"https://127.0.0.1:{srv.http_port}/api/sessions"
        with httpx.Client(verify=client_context(pki, kiosk), timeout=30) as http:
            assert made.id in {s["id"] for s in http.get(sessions).json()["sessions"]}
            assert http.get(f"{sessions}/{made.id}").json()["title"] == "kiosk-1's"
        with httpx.Client(verify=client_context(pki, other), timeout=30) as http:
            assert made.id not in {s["id"] for s in http.get(sessions).json()["sessions"]}
            assert http.get(f"{sessions}/{made.id}").status_code == 404
        # The page's WebSocket: the certificate names its caller too.
        for client, answer in ((other, "error"), (kiosk, "done")):
            url = f"wss://127.0.0.1:{srv.http_port}/api/chat"
            with ws_connect(
                url,
                ssl=client_context(pki, client),
                subprotocols=["edge-llm"],  # type: ignore[list-item]
                additional_headers={"Origin": f"https://127.0.0.1:{srv.http_port}"},
            ) as ws:
                turn = {"type": "send", "session_id": made.id, "content": "Hi", "max_tokens": 2}
                ws.send(json.dumps(turn))
                while (frame := json.loads(ws.recv(timeout=120)))["type"] in ("start", "delta"):
                    pass
                assert frame["type"] == answer, frame
                assert answer == "done" or frame["status"] == 404
        # The CLI with a client certificate (and the CA to check the server's).
        generated = subprocess.run(
            [sys.executable, "-m", "edge_llm", "generate", "Hi", "--max-tokens", "4",
             "--address", target, "--tls-ca", str(pki.ca), "--tls-cert", str(kiosk[0]),
             "--tls-key", str(kiosk[1])],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        assert_refused(srv, pki, [None, Pki(tmp_path, "a stranger's CA").issue("intruder")])
    finally:
        srv.stop(drain=0)
    # With tokens as well: a connection needs the certificate, a call the token as well.
    srv = start_server(tiny_model, auth_tokens=str(tokens), **tls_files)
    try:
        https = f"https://127.0.0.1:{srv.http_port}/api/info"
        with pytest.raises(httpx.HTTPError):
            httpx.get(https, verify=client_context(pki), headers=auth_header(), timeout=10)
        with httpx.Client(verify=client_context(pki, pki.issue("kiosk-2")), timeout=30) as http:
            assert http.get(https).status_code == 401
            assert http.get(https, headers=auth_header()).is_success
    finally:
        srv.stop(drain=0)


def client_context(pki: Pki, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client:
        context.load_cert_chain(*client)
    return context


def assert_refused(
    srv: Server | ServeProcess, pki: Pki, clients: list[tuple[Path, Path] | None]
) -> None:
    """Each client (None: no certificate) is refused at the handshake on both ports."""
    for client in clients:
        with grpc.secure_channel(f"127.0.0.1:{srv.port}", credentials(pki, client)) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.EdgeLLMStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
            assert refused.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        with pytest.raises(httpx.HTTPError):
            httpx.get(
                f"https://127.0.0.1:{srv.http_port}/health",
                verify=client_context(pki, client),
                timeout=10,
            )


def test_sighup_replaces_the_client_ca(tiny_model: Path, pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.issue("server-r", server=True)
    live_ca = tmp_path / "clients.pem"
    live_ca.write_bytes(pki.ca.read_bytes())
    serve = ServeProcess(
        tiny_model,
        *("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(live_ca)),
    )
    try:
        serve.wait_for_log("ready:")
        before = pki.issue("kiosk-before")
        assert_accepted(serve, pki, before)
        successor = Pki(tmp_path, "the successor CA")
        live_ca.write_bytes(successor.ca.read_bytes())
        serve.proc.send_signal(signal.SIGHUP)
        serve.wait_for_log("TLS certificate re-read")
        # The CA taken out is trusted no more, on either port; the new one's clients are.
        assert_refused(serve, pki, [before])
        after = successor.issue("kiosk-after")
        assert_accepted(serve, pki, after)
    finally:
        serve.kill()


def assert_accepted(srv: ServeProcess, pki: Pki, client: tuple[Path, Path]) -> None:
    """The client is served on both ports (the server's certificate is pki's)."""
    with grpc.secure_channel(f"127.0.0.1:{srv.port}", credentials(pki, client)) as channel:
        assert pb_grpc.EdgeLLMStub(channel).GetInfo(pb.GetInfoRequest(), timeout=60).model.name
    info = f"https://127.0.0.1:{srv.http_port}/api/info"
    assert httpx.get(info, verify=client_context(pki, client), timeout=60).is_success


def test_sighup_swaps_the_certificate_and_streams_go_on(
    tiny_model: Path, pki: Pki, tokens: Path, tmp_path: Path
) -> None:
    cert, key = pki.issue("server-before", server=True)
    live_cert, live_key = tmp_path / "server.crt", tmp_path / "server.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    serve = ServeProcess(
        tiny_model,
        *("--tls-cert", str(live_cert), "--tls-key", str(live_key)),
        *("--auth-tokens", str(tokens)),
    )
    try:
        serve.wait_for_log("ready:")
        assert served_certificate(serve.port, pki.ca, "h2") == "server-before"
        assert served_certificate(serve.http_port or 0, pki.ca, "http/1.1") == "server-before"
        with grpc.secure_channel(f"127.0.0.1:{serve.port}", credentials(pki)) as channel:
            request = pb.GenerateRequest(max_tokens=200, temperature=0)
            request.messages.add(role="user", content="Write a long story about a lighthouse.")
            stream = pb_grpc.EdgeLLMStub(channel).Generate(request, metadata=auth())
            next(stream)  # it streams
            new_cert, new_key = pki.issue("server-after", server=True)
            live_cert.write_bytes(new_cert.read_bytes())
            live_key.write_bytes(new_key.read_bytes())
            serve.proc.send_signal(signal.SIGHUP)
            serve.wait_for_log("TLS certificate re-read")
            assert served_certificate(serve.port, pki.ca, "h2") == "server-after"
            assert served_certificate(serve.http_port or 0, pki.ca, "http/1.1") == "server-after"
            *_, last = stream  # the stream opened before goes on to its end
            assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    finally:
        serve.kill()

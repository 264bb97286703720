"""Who is calling: bearer tokens from a file (`auth_tokens`), one name per token.

The file holds a name and a token per line (`kiosk-1 3q2+7w...`; `#` starts a comment). It
must be readable by its owner only (mode 0600): a token is a password. It is re-read on SIGHUP;
a file that no longer reads keeps the tokens loaded before, and says why in the log. A token
is never logged; a presented one is compared with every known token in constant time.

When the configured file does not exist the server makes one with a token of its own (the
container's first start), and prints it once as a ready-to-open URL, as Jupyter does.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from edge_llm.types import UnauthenticatedError

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
GENERATED_NAME = "admin"
# A WebSocket cannot carry an Authorization header from a browser: the page offers the token as
# a subprotocol, "bearer.<base64url of the token>" (as Kubernetes does), beside this one.
WS_SUBPROTOCOL = "edge-llm"
WS_TOKEN_PREFIX = "bearer."


class AuthError(ValueError):
    """The token file cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Caller:
    """Whoever made a request: a token's name, or "" when the server asks for none."""

    name: str


ANONYMOUS = Caller("")


def read_tokens(path: Path) -> dict[str, bytes]:
    """name -> token, from a file only its owner may read."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        raise AuthError(f"cannot read the token file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(
            f"the token file {path} may be read by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"tokens are passwords: chmod 600 {path}"
        )
    tokens: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = re.sub(r"(^|\s)#.*", "", line).split()  # a comment: "#" after a space
        if not words:
            continue
        where = f"{path}, line {number}"
        if len(words) != 2:
            raise AuthError(f"{where}: expected a name and a token separated by a space")
        name, token = words
        if len(token) < MIN_TOKEN_CHARS:
            raise AuthError(
                f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} "
                "characters; make one with: openssl rand -base64 32"
            )
        if name in tokens:
            raise AuthError(f"{where}: {name!r} has a token already; one line per name")
        if token.encode() in tokens.values():
            raise AuthError(f"{where}: {name!r} has the same token as another name")
        tokens[name] = token.encode()
    return tokens


def make_token_file(path: Path) -> str:
    """A new file with one generated token for GENERATED_NAME; returns the token."""
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise AuthError(f"cannot create the token file {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(
            "# edge-llm tokens: a name and a token per line (made by the server at its first "
            "start).\n"
            f"{GENERATED_NAME} {token}\n"
        )
    return token


class Tokens:
    """The tokens in force; reload() swaps them whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.made: str | None = None  # a token this start generated, to show once
        if not path.exists():
            self.made = make_token_file(path)
        self._tokens = read_tokens(path)
        if not self._tokens:  # at start-up, surely a mistake; on a reload, revoking them all
            raise AuthError(f"the token file {path} has no tokens; add a line: NAME TOKEN")

    @property
    def names(self) -> list[str]:
        return sorted(self._tokens)

    def reload(self) -> None:
        try:
            tokens = read_tokens(self.path)
        except AuthError as e:
            log.error("%s; keeping the %d tokens loaded before", e, len(self._tokens))
            return
        self._tokens = tokens  # one assignment: a call sees the old tokens or the new
        if not tokens:
            log.warning("tokens re-read from %s: none, so every call is refused", self.path)
            return
        log.info("tokens re-read from %s: %s", self.path, ", ".join(sorted(tokens)))

    def caller(self, presented: str) -> Caller | None:
        """The name whose token this is, or None. Every token is compared, whatever matches."""
        given = presented.encode()
        found = None
        for name, token in self._tokens.items():
            if hmac.compare_digest(given, token):
                found = name
        return None if found is None else Caller(found)


def check(tokens: Tokens | None, presented: str) -> Caller:
    """The caller a presented token names; UnauthenticatedError if it names none. Without
    tokens (auth_tokens unset) everyone is ANONYMOUS."""
    if tokens is None:
        return ANONYMOUS
    if not presented:
        raise UnauthenticatedError(
            "this server needs a token: send `authorization: Bearer TOKEN` (gRPC metadata, or "
            "the HTTP header; the openai SDK's api_key); its tokens are in its auth_tokens file"
        )
    caller = tokens.caller(presented)
    if caller is None:
        raise UnauthenticatedError(
            "the token sent is not one this server knows: check it against the server's "
            "auth_tokens file (was it removed, or mistyped?)"
        )
    return caller


def identify(tokens: Tokens | None, presented: str, certificate_subject: str | None) -> Caller:
    """The caller: a token's name; else a verified client certificate's subject (mTLS)."""
    caller = check(tokens, presented)
    if caller == ANONYMOUS and certificate_subject:
        return Caller(certificate_subject)
    return caller


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value ("" if there is none)."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def ws_token(subprotocols: list[str]) -> str:
    """The token a page offered as a WebSocket subprotocol ("" if none, or malformed)."""
    for offered in subprotocols:
        if offered.startswith(WS_TOKEN_PREFIX):
            encoded = offered.removeprefix(WS_TOKEN_PREFIX)
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (ValueError, UnicodeDecodeError):
                return ""
    return ""

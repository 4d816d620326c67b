"""Password and SCRAM-SHA-256 mechanics for both directions; no policy, no I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field

SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_PLUS_MECHANISM = "SCRAM-SHA-256-PLUS"
MAX_SCRAM_ITERATIONS = 1_000_000  # a server asking for more is refused (CPU DoS, CVE-2026-6669 class)
MAX_NONCE_LENGTH = 1024


class ScramError(Exception):
    """A SCRAM exchange failed or a peer sent a malformed SCRAM message."""


def md5_password(password: str, user: str, salt: bytes) -> bytes:
    """The md5 PasswordMessage payload: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return md5_from_secret("md5" + inner, salt)


def md5_from_secret(secret: str, salt: bytes) -> bytes:
    """Same, starting from a stored 'md5<hex>' secret instead of the password."""
    return b"md5" + hashlib.md5(secret[3:].encode("ascii") + salt).hexdigest().encode("ascii")


def _hi(password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def saslprep(password: str) -> str:
    """SASLprep (RFC 4013) as PostgreSQL applies it: on any failure the password is used as is."""
    if password.isascii():
        return password
    import stringprep
    import unicodedata
    mapped = []
    for ch in password:
        if stringprep.in_table_b1(ch):          # commonly mapped to nothing
            continue
        mapped.append(" " if stringprep.in_table_c12(ch) else ch)  # non-ASCII space -> space
    text = unicodedata.normalize("NFKC", "".join(mapped))
    if not text:
        return password
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
                  stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
                  stringprep.in_table_c9, stringprep.in_table_a1)
    if any(check(ch) for ch in text for check in prohibited):
        return password
    if any(stringprep.in_table_d1(ch) for ch in text):   # bidi rules (RFC 3454 section 6)
        if any(stringprep.in_table_d2(ch) for ch in text):
            return password
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            return password
    return text


@dataclass(frozen=True)
class ScramSecret:
    """A stored SCRAM-SHA-256 verifier: SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> "ScramSecret | None":
        match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)", text)
        if not match:
            return None
        try:
            stored, server = base64.b64decode(match.group(3)), base64.b64decode(match.group(4))
            secret = cls(int(match.group(1)), base64.b64decode(match.group(2)), stored, server)
        except ValueError:
            return None
        if len(stored) != 32 or len(server) != 32 or secret.iterations < 1:
            return None  # PostgreSQL treats such a string as a plain password, not a verifier
        return secret

    @classmethod
    def from_password(cls, password: str, iterations: int = 4096, salt: bytes | None = None) -> "ScramSecret":
        salt = salt or os.urandom(16)
        salted = _hi(saslprep(password).encode("utf-8"), salt, iterations)
        return cls(iterations, salt, _h(_hmac(salted, b"Client Key")), _hmac(salted, b"Server Key"))

    def encode(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
        return f"SCRAM-SHA-256${self.iterations}:{b64(self.salt)}${b64(self.stored_key)}:{b64(self.server_key)}"


def _attrs(message: str) -> dict[str, str]:
    out = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        out[part[0]] = part[2:]
    return out


class ScramClient:
    """pgrelay logging in to a server with SCRAM-SHA-256.

    Either a password is known, or `client_key` (from a client's SCRAM proof, pass-through)
    plus the stored ServerKey are; the latter lets pgrelay log in without the plaintext.
    """

    def __init__(self, password: str | None = None, client_key: bytes | None = None,
                 server_key: bytes | None = None, channel_binding: bytes | None = None):
        self.password = password
        self.client_key = client_key
        self.server_key = server_key
        self.nonce = base64.b64encode(os.urandom(18)).decode("ascii")
        self.cbind = channel_binding
        self.gs2 = "p=tls-server-end-point,," if channel_binding is not None else "n,,"
        self.first_bare = f"n=,r={self.nonce}"
        self.expected_signature: bytes | None = None

    @property
    def mechanism(self) -> str:
        return SCRAM_PLUS_MECHANISM if self.cbind is not None else SCRAM_MECHANISM

    def first_message(self) -> bytes:
        return (self.gs2 + self.first_bare).encode("ascii")

    def final_message(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode("ascii")
        except UnicodeDecodeError:
            raise ScramError("server-first-message is not ASCII") from None
        attrs = _attrs(text)
        nonce, salt_b64, iters = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if not nonce or salt_b64 is None or iters is None:
            raise ScramError("server-first-message lacks nonce, salt or iteration count")
        if len(nonce) > MAX_NONCE_LENGTH or not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise ScramError("server nonce does not extend the client nonce")
        if not iters.isdigit() or not 1 <= int(iters) <= MAX_SCRAM_ITERATIONS:
            raise ScramError(f"unacceptable SCRAM iteration count {iters[:20]!r}")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError:
            raise ScramError("bad SCRAM salt") from None
        cbind_input = self.gs2.encode("ascii") + (self.cbind or b"")
        without_proof = f"c={base64.b64encode(cbind_input).decode('ascii')},r={nonce}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode("ascii")
        if self.password is not None:
            salted = _hi(saslprep(self.password).encode("utf-8"), salt, int(iters))
            client_key = _hmac(salted, b"Client Key")
            server_key = _hmac(salted, b"Server Key")
        elif self.client_key is not None and self.server_key is not None:
            client_key, server_key = self.client_key, self.server_key
        else:
            raise ScramError("no password or SCRAM keys for this server login")
        signature = _hmac(_h(client_key), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.expected_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode("ascii")

    def verify_final(self, server_final: bytes) -> None:
        try:
            attrs = _attrs(server_final.decode("ascii"))
        except UnicodeDecodeError:
            raise ScramError("server-final-message is not ASCII") from None
        if "e" in attrs:
            raise ScramError(f"server reported SCRAM error: {attrs['e'][:100]}")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            raise ScramError("bad server signature encoding") from None
        if self.expected_signature is None or not hmac.compare_digest(signature, self.expected_signature):
            raise ScramError("invalid server signature")

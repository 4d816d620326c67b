"""Password and SCRAM-SHA-256 mechanics for both directions; no policy, no I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_PLUS_MECHANISM = "SCRAM-SHA-256-PLUS"
MAX_SCRAM_ITERATIONS = 100_000  # a server asking for more is refused (CPU DoS, CVE-2026-6669; libpq caps alike)
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


class DerivedSecrets:
    """SCRAM verifiers derived from plaintext secrets (auth_file or auth_query), kept so that a login
    attempt does not cost a PBKDF2 run (scram_iterations rounds, milliseconds of CPU in the event loop)
    before the client has proved anything. The salt of such a verifier is deterministic, so the
    verifier for (user, password, salt, iterations) never changes.

    One entry per (user, salt, iterations), holding the password it was derived from: a changed
    password replaces it. Least recently used entries go beyond `maxsize`. The relay starts a new
    cache on every reload. Nothing here is ever logged; repr shows only the size.
    """

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[str, bytes, int], tuple[bytes, ScramSecret]] = OrderedDict()

    def get(self, user: str, password: str, salt: bytes, iterations: int) -> ScramSecret:
        key = (user, salt, iterations)
        encoded = password.encode("utf-8")
        entry = self._entries.get(key)
        if entry is not None and hmac.compare_digest(entry[0], encoded):
            self._entries.move_to_end(key)
            return entry[1]
        secret = ScramSecret.from_password(password, iterations, salt)
        self._entries[key] = (encoded, secret)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return secret

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<DerivedSecrets: {len(self._entries)} of {self.maxsize}>"


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
                 server_key: bytes | None = None, channel_binding: bytes | None = None,
                 expect: "ScramSecret | None" = None):
        self.password = password
        self.expect = expect  # with pass-through keys: the verifier they belong to
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
        if not iters.isdigit() or int(iters) < 1:
            raise ScramError(f"unacceptable SCRAM iteration count {iters[:20]!r}")
        if int(iters) > MAX_SCRAM_ITERATIONS:
            raise ScramError(f"unacceptable SCRAM iteration count {iters[:20]}: over pgrelay's limit of "
                             f"{MAX_SCRAM_ITERATIONS}, refused as a CPU denial of service")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError:
            raise ScramError("bad SCRAM salt") from None
        if self.expect is not None and (salt != self.expect.salt or int(iters) != self.expect.iterations):
            raise ScramError("the server's SCRAM secret differs from the one the client authenticated "
                             "against; pass-through needs identical secrets")
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
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
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


def _parse_gs2(data: bytes) -> tuple[str, str, str]:
    """(cbind flag, gs2 header, client-first-message-bare) of a client-first-message."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("client-first-message is not UTF-8") from None
    parts = text.split(",", 2)
    if len(parts) != 3:
        raise ScramError("malformed client-first-message")
    flag, authzid, bare = parts
    if authzid:
        raise ScramError("authorization identities are not supported")
    if not (flag in ("n", "y") or flag.startswith("p=")):
        raise ScramError("malformed GS2 channel-binding flag")
    return flag, f"{flag},{authzid},", bare


class ScramServer:
    """pgrelay verifying a client's SCRAM-SHA-256(-PLUS) login against a stored verifier.

    With `secret=None` (unknown user) it runs the same exchange against a mock verifier and
    fails at the end, so an unknown user looks exactly like a wrong password.
    """

    def __init__(self, secret: ScramSecret | None, mock_salt: bytes, mock_iterations: int,
                 channel_binding: bytes | None = None):
        self.known = secret is not None
        self.secret = secret or ScramSecret(mock_iterations, mock_salt, os.urandom(32), os.urandom(32))
        self.cbind_data = channel_binding
        self.nonce = ""
        self.client_first_bare = ""
        self.server_first = ""
        self.gs2 = ""
        self.client_key: bytes | None = None

    def first(self, mechanism: str, data: bytes) -> bytes:
        """Take the SASLInitialResponse data; return server-first-message."""
        flag, self.gs2, bare = _parse_gs2(data)
        if mechanism == SCRAM_PLUS_MECHANISM:
            if flag != "p=tls-server-end-point" or self.cbind_data is None:
                raise ScramError("channel binding type not supported")
        elif flag.startswith("p="):
            raise ScramError("channel binding requested without SCRAM-SHA-256-PLUS")
        elif flag == "y" and self.cbind_data is not None:
            # The client thinks we offered no channel binding, but we did (PLUS): a downgrade.
            raise ScramError("SCRAM channel binding negotiation error")
        attrs = _attrs(bare)
        client_nonce = attrs.get("r", "")
        if not client_nonce or len(client_nonce) > MAX_NONCE_LENGTH or any(c in client_nonce for c in ", ") \
                or not client_nonce.isprintable():
            raise ScramError("client-first-message has a missing or invalid nonce")
        if "m" in attrs:
            raise ScramError("SCRAM extensions are not supported")
        self.client_first_bare = bare
        self.nonce = client_nonce + base64.b64encode(os.urandom(18)).decode("ascii")
        salt = base64.b64encode(self.secret.salt).decode("ascii")
        self.server_first = f"r={self.nonce},s={salt},i={self.secret.iterations}"
        return self.server_first.encode("ascii")

    def final(self, data: bytes) -> bytes:
        """Check client-final-message; return server-final-message or raise ScramError."""
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ScramError("client-final-message is not ASCII") from None
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            raise ScramError("client-final-message lacks a proof")
        attrs = _attrs(without_proof)
        if attrs.get("r") != self.nonce:
            raise ScramError("client-final-message nonce does not match")
        expected_cbind = self.gs2.encode("ascii")
        if self.gs2.startswith("p="):
            expected_cbind += self.cbind_data or b""
        try:
            cbind = base64.b64decode(attrs.get("c", ""), validate=True)
            proof = base64.b64decode(proof_attr, validate=True)
        except ValueError:
            raise ScramError("malformed base64 in client-final-message") from None
        if not hmac.compare_digest(cbind, expected_cbind):
            raise ScramError("SCRAM channel binding check failed")
        if len(proof) != 32:
            raise ScramError("malformed SCRAM proof")
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode("utf-8")
        signature = _hmac(self.secret.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not self.known or not hmac.compare_digest(_h(client_key), self.secret.stored_key):
            raise ScramError("password authentication failed")
        self.client_key = client_key
        server_signature = _hmac(self.secret.server_key, auth_message)
        return f"v={base64.b64encode(server_signature).decode('ascii')}".encode("ascii")


def mock_salt(key: bytes, user: str) -> bytes:
    """A stable per-user salt for unknown users, so repeated probes see consistent values."""
    return hmac.new(key, user.encode("utf-8"), hashlib.sha256).digest()[:16]


# Signature algorithms whose hash is not SHA-256, as DER-encoded OIDs (RFC 5929: tls-server-end-point
# hashes the certificate with the signature's hash, SHA-256 for MD5/SHA-1).
_SIG_HASHES = {
    bytes.fromhex("06092a864886f70d01010c"): "sha384",   # sha384WithRSAEncryption
    bytes.fromhex("06092a864886f70d01010d"): "sha512",   # sha512WithRSAEncryption
    bytes.fromhex("06082a8648ce3d040303"): "sha384",     # ecdsa-with-SHA384
    bytes.fromhex("06082a8648ce3d040304"): "sha512",     # ecdsa-with-SHA512
}


def tls_server_end_point(cert_der: bytes) -> bytes:
    """Channel binding data for a certificate (type tls-server-end-point)."""
    name, last = "sha256", -1
    for oid, hash_name in _SIG_HASHES.items():
        at = cert_der.rfind(oid)
        if at > last:
            name, last = hash_name, at
    return hashlib.new(name, cert_der).digest()


def verify_plain(password: str, secret: str | None, user: str, derived: "DerivedSecrets | None" = None) -> bool:
    """Check a cleartext password against a stored secret (plaintext, md5 or SCRAM). With `derived`,
    a SCRAM check reuses the verifier last derived for this user, salt and password (clients that
    always send a cleartext password, such as serverless HTTP requests, then cost no PBKDF2 run)."""
    if secret is None or not password:
        return False
    if secret.startswith("md5") and len(secret) == 35:
        computed = "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()
        return hmac.compare_digest(computed, secret)
    scram = ScramSecret.parse(secret)
    if scram is not None:
        if derived is not None:
            computed = derived.get(user, password, scram.salt, scram.iterations)
        else:
            computed = ScramSecret.from_password(password, scram.iterations, scram.salt)
        return hmac.compare_digest(computed.stored_key, scram.stored_key)
    return hmac.compare_digest(password.encode("utf-8"), secret.encode("utf-8"))


def md5_expected(secret: str | None, user: str, salt: bytes) -> bytes | None:
    """The md5 response a client must send for this secret, or None if md5 cannot work with it."""
    if secret is None or ScramSecret.parse(secret) is not None:
        return None
    if secret.startswith("md5") and len(secret) == 35:
        return md5_from_secret(secret, salt)
    return md5_password(secret, user, salt)

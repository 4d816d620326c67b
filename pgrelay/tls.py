"""TLS contexts for client and server connections built from settings, and the non-blocking handshake."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from gevent import get_hub

from .auth import tls_server_end_point
from .errors import ConfigError

CLIENT_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SERVER_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
ALPN = "postgresql"
_PROTOCOLS = {"tlsv1.0": ssl.TLSVersion.TLSv1, "tlsv1.1": ssl.TLSVersion.TLSv1_1,
              "tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


def _apply_protocols(ctx: ssl.SSLContext, protocols: str, setting: str) -> None:
    """PgBouncer's tls_protocols: secure (= tlsv1.2,tlsv1.3), all, legacy, or a list of versions."""
    words = {w.strip().lower() for w in protocols.replace(",", " ").split() if w.strip()}
    if not words or words & {"secure", "default"}:
        words = (words - {"secure", "default"}) | {"tlsv1.2", "tlsv1.3"}
    if words & {"all", "legacy"}:
        words = (words - {"all", "legacy"}) | set(_PROTOCOLS)
    unknown = words - set(_PROTOCOLS)
    if unknown:
        raise ConfigError(f"{setting}: unknown TLS protocol {sorted(unknown)[0]!r}")
    versions = sorted(_PROTOCOLS[w] for w in words)
    try:
        ctx.minimum_version = versions[0]
        ctx.maximum_version = versions[-1]
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def _apply_ciphers(ctx: ssl.SSLContext, ciphers: str, setting: str) -> None:
    if ciphers and ciphers.lower() not in ("default", "fast", "normal", "secure"):
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(f"{setting}: {exc}") from None


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards clients: the mode, the context, and our certificate's channel-binding data."""

    mode: str
    context: ssl.SSLContext | None
    cbind: bytes | None

    @property
    def enabled(self) -> bool:
        return self.context is not None

    @property
    def required(self) -> bool:
        return self.mode in ("require", "verify-ca", "verify-full")


def client_tls(config) -> ClientTLS:
    mode = config.client_tls_sslmode
    if mode == "disable":
        return ClientTLS(mode, None, None)
    if not config.client_tls_cert_file or not config.client_tls_key_file:
        raise ConfigError(f"client_tls_sslmode = {mode} needs client_tls_cert_file and client_tls_key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(config.client_tls_cert_file, config.client_tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load client_tls_cert_file/client_tls_key_file: {exc}") from None
    if config.client_tls_ca_file:
        try:
            ctx.load_verify_locations(config.client_tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load client_tls_ca_file: {exc}") from None
    if mode in ("verify-ca", "verify-full"):
        if not config.client_tls_ca_file:
            raise ConfigError(f"client_tls_sslmode = {mode} needs client_tls_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif config.client_tls_ca_file:
        ctx.verify_mode = ssl.CERT_OPTIONAL  # lets auth_type=cert check a certificate if one is sent
    _apply_protocols(ctx, config.client_tls_protocols, "client_tls_protocols")
    _apply_ciphers(ctx, config.client_tls_ciphers, "client_tls_ciphers")
    ctx.set_alpn_protocols([ALPN])
    ctx.options |= ssl.OP_NO_COMPRESSION
    with open(config.client_tls_cert_file, "rb") as f:
        pem = f.read().decode("ascii", "replace")
    cbind = tls_server_end_point(ssl.PEM_cert_to_DER_cert(pem[pem.index("-----BEGIN CERTIFICATE-----"):]))
    return ClientTLS(mode, ctx, cbind)


@dataclass(frozen=True)
class ServerTLS:
    mode: str
    context: ssl.SSLContext | None

    @property
    def required(self) -> bool:
        return self.mode in ("require", "verify-ca", "verify-full")


def server_tls(config) -> ServerTLS:
    mode = config.server_tls_sslmode
    if mode == "disable":
        return ServerTLS(mode, None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = mode == "verify-full"
    if mode in ("verify-ca", "verify-full"):
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            if config.server_tls_ca_file:
                ctx.load_verify_locations(config.server_tls_ca_file)
            else:
                ctx.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load server_tls_ca_file: {exc}") from None
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if config.server_tls_cert_file:
        try:
            ctx.load_cert_chain(config.server_tls_cert_file, config.server_tls_key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load server_tls_cert_file/server_tls_key_file: {exc}") from None
    _apply_protocols(ctx, config.server_tls_protocols, "server_tls_protocols")
    _apply_ciphers(ctx, config.server_tls_ciphers, "server_tls_ciphers")
    return ServerTLS(mode, ctx)


def handshake(sslsock: ssl.SSLSocket, rw, ww) -> None:
    """Complete a TLS handshake on a non-blocking socket, waiting on its watchers (greenlet only)."""
    hub = get_hub()
    while True:
        try:
            sslsock.do_handshake()
            return
        except ssl.SSLWantReadError:
            hub.wait(rw)
        except ssl.SSLWantWriteError:
            hub.wait(ww)


def peer_cbind(sslsock: ssl.SSLSocket) -> bytes | None:
    """Channel-binding data of the server certificate a TLS connection presented."""
    der = sslsock.getpeercert(binary_form=True)
    return tls_server_end_point(der) if der else None

"""TLS for nodewatch's HTTP edges: the coordinator's server context, the client contexts of the
agent and the CLI, and one-line explanations of handshake failures.

Contexts are built once, when a process starts; a file that is missing, unreadable, not PEM, or
a key that does not belong to its certificate raises :class:`TlsSetupError` naming the key.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nodewatch.errors import ConfigError

__all__ = ["TlsFailure", "TlsSetupError", "client_context", "explain_tls_failure",
           "probe_handshake", "server_context"]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsSetupError(ConfigError):
    """A TLS setting that cannot work: ``key`` is the setting, ``what`` what is expected."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__(f"{key}: {what}")
        self.key = key
        self.what = what


def _readable(key: str, path: str, kind: str) -> None:
    try:
        Path(path).open("rb").close()
    except OSError as exc:
        why = (exc.strerror or type(exc).__name__).lower()
        raise TlsSetupError(key, f"cannot read {path} ({why}); expected {kind}") from None


def _load_verify(context: ssl.SSLContext, key: str, path: str) -> None:
    _readable(key, path, "a PEM CA bundle")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise TlsSetupError(key, f"{path} holds no PEM certificate; expected a PEM CA bundle"
                            ) from None


def _no_password() -> bytes:
    # Without this callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("encrypted")


def _load_chain(context: ssl.SSLContext, keys: tuple[str, str], cert: str, key: str) -> None:
    cert_key, key_key = keys
    if key and not cert:
        raise TlsSetupError(key_key, f"set without {cert_key}; expected both (or only "
                                     f"{cert_key}, holding certificate and key)")
    _readable(cert_key, cert, "a PEM certificate")
    if key:
        _readable(key_key, key, "a PEM private key")
    # Parse the certificate alone first, so that a bad certificate is not blamed on the key.
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except ssl.SSLError:
        raise TlsSetupError(cert_key, f"{cert} holds no PEM certificate; expected a PEM "
                                      "certificate") from None
    where, what = (key_key, key) if key else (cert_key, cert)
    try:
        context.load_cert_chain(cert, key or None, password=_no_password)
    except ValueError:
        raise TlsSetupError(where, f"{what} is an encrypted private key; expected an "
                                   "unencrypted PEM key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSetupError(where, f"{what} does not match the certificate in {cert} "
                                       f"({cert_key}); expected that certificate's private key"
                                ) from None
        if not key:
            raise TlsSetupError(cert_key, f"{cert} holds no private key; expected {key_key}, "
                                          "or the key in the certificate file") from None
        raise TlsSetupError(key_key, f"{key} holds no usable PEM private key; expected the "
                                     f"private key of {cert}") from None


def server_context(tls_cert: str, tls_key: str, tls_client_ca: str) -> ssl.SSLContext | None:
    """The coordinator's context from ``tls_cert``/``tls_key``, TLS 1.2 at least; with
    ``tls_client_ca`` every client must present a certificate signed by that CA."""
    if not tls_cert:
        if tls_key or tls_client_ca:
            key = "coordinator.tls_key" if tls_key else "coordinator.tls_client_ca"
            raise TlsSetupError(key, "requires coordinator.tls_cert (the server certificate)")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, ("coordinator.tls_cert", "coordinator.tls_key"), tls_cert, tls_key)
    if tls_client_ca:
        _load_verify(context, "coordinator.tls_client_ca", tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str, cert: str, key: str,
                   keys: tuple[str, str, str] = ("agent.tls_ca", "agent.tls_cert",
                                                 "agent.tls_key")) -> ssl.SSLContext | None:
    """A verifying client context: ``ca`` replaces the system CAs, ``cert``/``key`` is the
    client certificate for mutual TLS. None when nothing is set (the library default)."""
    if not (ca or cert or key):
        return None
    # PROTOCOL_TLS_CLIENT verifies the certificate and the hostname; with ``ca`` only that CA
    # is trusted, without it the system's.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    if ca:
        _load_verify(context, keys[0], ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert or key:
        _load_chain(context, (keys[1], keys[2]), cert, key)
    return context


@dataclass(frozen=True, slots=True)
class TlsFailure:
    """Why a TLS handshake with the coordinator failed, for one readable line."""

    kind: str  # "untrusted", "client_cert_required", "client_cert_rejected", "other"
    detail: str

    def describe(self, url: str) -> str:
        if self.kind == "untrusted":
            return f"cannot verify the TLS certificate of {url}: {self.detail}"
        if self.kind == "client_cert_required":
            return f"{url} requires a client certificate and none was presented{self.detail}"
        if self.kind == "client_cert_rejected":
            return f"{url} rejected the client certificate{self.detail}"
        return f"TLS handshake with {url} failed: {self.detail}"


def _ssl_error_in(exc: BaseException | None) -> ssl.SSLError | None:
    """The innermost ssl.SSLError behind a client library's exception, if any. aiohttp's
    wrappers are SSLErrors themselves but keep the real one in .certificate_error/.os_error;
    urllib keeps it in .reason."""
    found: ssl.SSLError | None = None
    for _ in range(8):
        if exc is None:
            break
        if isinstance(exc, ssl.SSLError):
            found = exc
        inner = next((value for value in (getattr(exc, name, None) for name in
                                          ("certificate_error", "os_error", "reason"))
                      if isinstance(value, BaseException) and value is not exc), None)
        exc = inner or exc.__cause__ or exc.__context__
    return found


def explain_tls_failure(exc: BaseException) -> TlsFailure | None:
    """Classify a failed request whose cause is TLS; None when TLS is not the cause."""
    error = _ssl_error_in(exc)
    if error is None:
        return None
    if isinstance(error, ssl.SSLCertVerificationError):
        return TlsFailure("untrusted", getattr(error, "verify_message", None)
                          or "certificate verify failed")
    reason = (error.reason or "").upper()
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return TlsFailure("client_cert_required", "")
    if any(word in reason for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "DECRYPT_ERROR",
                                       "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED")):
        return TlsFailure("client_cert_rejected", f" ({reason.lower().replace('_', ' ')})")
    if "WRONG_VERSION_NUMBER" in reason:
        return TlsFailure("other", "the server does not speak TLS on this port (http?)")
    return TlsFailure("other", reason.lower() or str(error))


def probe_handshake(url: str, context: ssl.SSLContext | None, *, presents_certificate: bool,
                    timeout: float = 2.0) -> TlsFailure | None:
    """Blocking diagnosis after a request to an https ``url`` failed without a TLS reason.

    An asyncio server (the coordinator) that rejects a client certificate closes the
    connection without sending its TLS alert, so the client sees only "disconnected". This
    repeats the handshake and one ``GET /healthz`` on a plain socket: a handshake that
    completes followed by a close without any answer means the client certificate (or its
    absence) was refused. None when TLS is not the problem (or the server is unreachable).
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return None
    context = context or ssl.create_default_context()
    host = parts.hostname
    try:
        raw = socket.create_connection((host, parts.port or 443), timeout=timeout)
    except (OSError, ValueError):  # unreachable, or a port that is not a number
        return None
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                        "\r\n".encode())
            answered = bool(tls.recv(1))
    except ssl.SSLError as exc:
        failure = explain_tls_failure(exc)
        if failure is None or failure.kind != "other" or "EOF" not in str(exc):
            return failure
        answered = False  # closed during the handshake: TLS 1.2 refusing the certificate
    except (ConnectionResetError, BrokenPipeError):
        answered = False
    except OSError:
        return None
    finally:
        raw.close()
    if answered:
        return None
    closed = ": it closed the TLS connection without answering"
    if presents_certificate:
        return TlsFailure("client_cert_rejected", closed)
    return TlsFailure("client_cert_required", closed)

"""TLS and bearer tokens on the wire: server credentials, and the one way every client channel is opened.

Servers serve TLS when a certificate and key are configured; clients use TLS when a CA is configured, and
present their own certificate when they have one. A client's token travels as `authorization: Bearer <token>`
metadata on every call, added by a channel interceptor, so that every stub on the channel sends it (the SDK's
clients and the services' calls to each other alike). `forwarding(token)` lets one caller's token replace the
process's own for the calls made within it (the gateway forwards its caller's token, never its own).
"""

from __future__ import annotations

import contextlib
import contextvars
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from rlhf.runtime import requestids
from rlhf.runtime.config import SecurityConfig, client_service_config

# The token the calls made in the current context send instead of the process's own; "" sends none.
_FORWARDED: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlhf_forwarded_token", default=None)


class TlsConfigError(ValueError):
    """A TLS file is missing or unreadable; the message names the variable and the path."""


def _read(path: str, variable: str) -> bytes:
    try:
        return pathlib.Path(path).expanduser().read_bytes()
    except OSError as error:
        raise TlsConfigError(
            f"{variable}={path}: cannot read it ({error.strerror}); fix the path or unset it"
        ) from None


def server_credentials(security: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of a server (None: plaintext, when no certificate and key are configured)."""
    if not security.server_tls:
        if security.cert_file or security.key_file:
            raise TlsConfigError("RLHF_TLS_CERT_FILE and RLHF_TLS_KEY_FILE must be set together")
        return None
    pair = (_read(security.key_file, "RLHF_TLS_KEY_FILE"), _read(security.cert_file, "RLHF_TLS_CERT_FILE"))
    roots = _read(security.ca_file, "RLHF_TLS_CA_FILE") if security.ca_file else None
    if security.require_client_cert and roots is None:
        raise TlsConfigError("RLHF_TLS_REQUIRE_CLIENT_CERT needs RLHF_TLS_CA_FILE (the CA of client certificates)")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=security.require_client_cert
    )


def channel_credentials(security: SecurityConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials of a client (None: plaintext, when no CA is configured)."""
    if not security.client_tls:
        return None
    roots = _read(security.ca_file, "RLHF_TLS_CA_FILE")
    key = cert = None
    if security.cert_file and security.key_file:
        key = _read(security.key_file, "RLHF_TLS_KEY_FILE")
        cert = _read(security.cert_file, "RLHF_TLS_CERT_FILE")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)


def client_environment(security: SecurityConfig) -> dict[str, str]:
    """The environment variables that give a child process (a training worker) this process's client
    settings: its calls to the other services then carry the same token and TLS."""
    return {
        "RLHF_TOKEN": security.token,
        "RLHF_TLS_CA_FILE": security.ca_file,
        "RLHF_TLS_CERT_FILE": security.cert_file,
        "RLHF_TLS_KEY_FILE": security.key_file,
        "RLHF_TLS_SERVER_NAME": security.server_name,
    }


@contextlib.contextmanager
def forwarding(token: str) -> Iterator[None]:
    """Calls made inside send `token` (or none when it is "") instead of the process's own token."""
    reset = _FORWARDED.set(token)
    try:
        yield
    finally:
        _FORWARDED.reset(reset)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def _with_token(details: Any, own_token: str, make: Callable[..., Any]) -> Any:
    forwarded = _FORWARDED.get()
    token = own_token if forwarded is None else forwarded
    request_id = requestids.current()  # passed on to the service called (rlhf.runtime.requestids)
    if not token and not request_id:
        return details
    replaced = ("authorization", requestids.METADATA_KEY)
    metadata = [(k, v) for k, v in (details.metadata or ()) if k not in replaced]
    if token:
        metadata.append(("authorization", bearer(token)))
    if request_id:
        metadata.append((requestids.METADATA_KEY, request_id))
    return make(details, metadata)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _with_token(details, self._token, _Details)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _aio_details(details: grpc.aio.ClientCallDetails, metadata: list[tuple[str, str]]) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
    )


class _AioToken:
    """Adds the bearer token to every call of a grpc.aio channel (one class per call kind: grpc.aio tells
    interceptors apart by their base class)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return _with_token(details, self._token, _aio_details)


class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def _options(security: SecurityConfig, options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    if not any(name == "grpc.service_config" for name, _ in options):  # calls spread over replicas (round robin)
        options = [*options, ("grpc.service_config", client_service_config())]
    if security.client_tls and security.server_name:
        return [*options, ("grpc.ssl_target_name_override", security.server_name)]
    return options


def open_channel(
    address: str, options: list[tuple[str, Any]], security: SecurityConfig | None = None, forwards: bool = False
) -> grpc.Channel:
    """A blocking channel to `address`: TLS when a CA is configured, the token on every call when one is.
    `forwards`: calls may send a forwarded token (`forwarding`) even when the process has none of its own."""
    security = security or SecurityConfig()
    credentials = channel_credentials(security)
    options = _options(security, options)
    if credentials is None:
        opened = grpc.insecure_channel(address, options=options)
    else:
        opened = grpc.secure_channel(address, credentials, options=options)
    if not (security.token or forwards):
        return opened  # nothing to add: no interceptor in the way of streams
    return grpc.intercept_channel(opened, _SyncToken(security.token))


def open_aio_channel(
    address: str,
    options: list[tuple[str, Any]],
    security: SecurityConfig | None = None,
    forwards: bool = False,
    request_ids: bool = False,
) -> grpc.aio.Channel:
    """The grpc.aio twin of `open_channel`. `request_ids`: every call carries the request id of the context it
    is made in (a service's channels to the others: rlhf.runtime.requestids)."""
    security = security or SecurityConfig()
    credentials = channel_credentials(security)
    options = _options(security, options)
    token = security.token
    interceptors = None
    if token or forwards or request_ids:
        interceptors = [_AioUnaryUnary(token), _AioUnaryStream(token), _AioStreamUnary(token), _AioStreamStream(token)]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)

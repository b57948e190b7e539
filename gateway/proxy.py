"""The proxy listener's request handler: authenticate, forward, stream back (PRODUCT.md §3-§4).

It runs on aiohttp's low-level server (no router, no middleware: the fewest steps per request).
The upstream is reached through `UpstreamPool`, a lean HTTP/1.1 client; WebSocket upgrades
are handed to `gateway.websocket`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict

from gateway.accesslog import AccessLog
from gateway.auth import Authenticator, AuthError, Identity
from gateway.config import Settings
from gateway.errors import (
    BadGateway,
    Forbidden,
    GatewayError,
    GatewayTimeout,
    InvalidRequest,
    InvalidToken,
    NotFound,
    problem_response,
)
from gateway.headers import (
    client_response_headers,
    identity_headers,
    is_trusted,
    request_id,
    upstream_request_headers,
)
from gateway.metrics import RequestMetrics
from gateway.own import OwnEndpoints
from gateway.refusals import refusal_error
from gateway.upstream import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout
from gateway.websocket import WebSocketRelay, is_websocket_upgrade
from gateway.wire import SmallResponse, UnsafeHeader
from quota.limiter import Admission, Limiter, Refusal

# Paths the gateway answers itself on the proxy listener; never forwarded.
OWN_PREFIX = "/_gateway/"

# Request bodies up to this size are read first, so a request on a stale pooled connection
# can be replayed on a fresh one; larger bodies stream and are never replayed.
REPLAYABLE_BODY = 64 * 1024
# Responses up to this size are read whole and written in one call (the fast path).
SMALL_RESPONSE = 256 * 1024
STREAM_CHUNK = 64 * 1024


@dataclass(slots=True)
class Outcome:
    """What the access log and metrics need to know about one request."""

    status: int = 0
    identity: Identity | None = None
    route: str = "authenticated"
    upstream_duration: float | None = None
    error: str | None = None
    admission: Admission | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    usage_report: str | None = None


class ProxyHandler:
    def __init__(self, settings: Settings, authenticator: Authenticator, pool: UpstreamPool,
                 websockets: WebSocketRelay, metrics: RequestMetrics, access_log: AccessLog,
                 limiter: Limiter | None = None, own: OwnEndpoints | None = None) -> None:
        self._settings = settings
        self._limiter = limiter
        self._own = own
        self._auth = authenticator
        self._pool = pool
        self._websockets = websockets
        self._metrics = metrics
        self._log = access_log
        self._type_base = settings.server.problem_type_base
        self._trusted = settings.listen.trusted_proxies
        self._default_plan = settings.default_plan
        self._loop = asyncio.get_event_loop()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = self._loop
        started = loop.time()
        rid = request_id(request.raw_headers)
        outcome = Outcome()
        try:
            response = await self._handle(request, rid, outcome)
        except GatewayError as error:
            outcome.error = error.suffix
            response = problem_response(error, self._type_base, rid)
        except asyncio.CancelledError:
            # The client went away, or the upstream failed mid-body (then nothing is billed).
            self._complete(outcome, 502 if outcome.error == "upstream-mid-body" else 499)
            raise
        outcome.status = response.status
        self._complete(outcome, response.status)
        self._record(request, rid, outcome, loop.time() - started)
        return response

    def _complete(self, outcome: Outcome, status: int) -> None:
        admission = outcome.admission
        if admission is not None and self._limiter is not None:
            outcome.admission = None
            self._limiter.complete(admission, status, outcome.request_bytes, outcome.response_bytes,
                                   outcome.usage_report)

    async def _handle(self, request: web.BaseRequest, rid: str, outcome: Outcome) -> web.StreamResponse:
        target = _origin_form(request.raw_path)
        path = target.split("?", 1)[0]
        if path.startswith(OWN_PREFIX) or path == OWN_PREFIX[:-1]:
            outcome.route = "gateway"
            if self._own is None:
                raise NotFound("no such gateway endpoint")
            return await self._own.handle(request, path, self._authenticate)
        identity: Identity | None = None
        if self._auth.is_public(path):
            outcome.route = "public"
        else:
            identity = outcome.identity = await self._authenticate(request)
            if self._limiter is not None:
                try:
                    admission = await self._limiter.admit(identity.tenant, identity.plan, request.method, path)
                except Refusal as refusal:
                    raise refusal_error(refusal) from None
                outcome.admission = admission
                outcome.route = admission.compiled.route
        identity_hdrs = () if identity is None else identity_headers(
            identity.tenant, identity.plan or self._default_plan, identity.subject)
        peer = request.remote
        headers = upstream_request_headers(
            request.raw_headers, peer=peer, trusted_peer=is_trusted(peer, self._trusted),
            scheme=request.scheme, request_id=rid, identity=identity_hdrs,
        )
        if is_websocket_upgrade(request):
            outcome.route = "websocket"
            return await self._websockets.relay(request, target, headers, rid)
        return await self._forward(request, target, headers, rid, outcome)

    async def _authenticate(self, request: web.BaseRequest) -> Identity:
        values = request.headers.getall("Authorization", ())
        try:
            if len(values) > 1:
                raise AuthError("malformed", "more than one Authorization header", token_presented=True)
            return await self._auth.authenticate(values[0] if values else None)
        except AuthError as exc:
            self._metrics.auth_failure(exc.reason)
            if exc.status == 403:
                raise Forbidden(exc.detail) from None
            raise InvalidToken(exc.detail, token_presented=exc.token_presented) from None

    async def _forward(self, request: web.BaseRequest, target: str, headers: list[tuple[str, str]],
                       rid: str, outcome: Outcome) -> web.StreamResponse:
        body, length = await _request_body(request, outcome)
        sent = self._loop.time()
        try:
            upstream = await self._pool.request(request.method, target, headers, body, content_length=length)
        except UpstreamTimeout:
            raise GatewayTimeout("the upstream did not answer in time") from None
        except UpstreamError:
            raise BadGateway("the upstream could not be reached or answered badly") from None
        outcome.upstream_duration = self._loop.time() - sent
        try:
            return await self._respond(request, upstream, rid, outcome)
        finally:
            upstream.release()

    async def _respond(self, request: web.BaseRequest, upstream: UpstreamResponse, rid: str,
                       outcome: Outcome) -> web.StreamResponse:
        headers, outcome.usage_report = client_response_headers(upstream.headers, rid)
        admission = outcome.admission
        status, length = upstream.status, upstream.content_length
        bodyless = request.method == "HEAD" or status in (204, 304) or status < 200
        body: bytes | None = None
        if not bodyless and length is not None and length <= SMALL_RESPONSE:
            try:
                body = await upstream.read()
            except UpstreamTimeout:
                raise GatewayTimeout("the upstream stalled while sending its response") from None
            except UpstreamError:
                raise BadGateway("the upstream failed while sending its response") from None
            outcome.response_bytes = len(body)
            try:
                return SmallResponse(request, status, upstream.reason, headers, body,  # type: ignore[return-value]
                                     "" if admission is None else admission.head_lines)
            except (UnsafeHeader, UnicodeEncodeError):
                pass  # aiohttp's own checks decide what becomes of such a response, below
        if admission is not None:
            headers.extend(admission.headers)
        if body is not None:
            return web.Response(status=status, reason=upstream.reason, body=body, headers=CIMultiDict(headers))
        response = web.StreamResponse(status=status, reason=upstream.reason, headers=CIMultiDict(headers))
        if length is not None:
            response.content_length = length
        elif not bodyless and request.version >= (1, 1):
            response.enable_chunked_encoding()
        await response.prepare(request)
        if bodyless:
            await response.write_eof()
            return response
        try:
            async for chunk in upstream:
                outcome.response_bytes += len(chunk)
                await response.write(chunk)
        except UpstreamError as exc:
            # Headers are gone already: abort, so the client never mistakes a cut body for a whole one.
            outcome.error = "upstream-mid-body"
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from exc
        await response.write_eof()
        return response

    def _record(self, request: web.BaseRequest, rid: str, outcome: Outcome, duration: float) -> None:
        identity = outcome.identity
        plan = None if identity is None else (identity.plan or self._default_plan)
        self._metrics.observe(request.method, outcome.status, plan, outcome.route, duration,
                              outcome.upstream_duration)
        if not self._log.enabled:
            return
        self._log.write(
            request_id=rid, tenant=None if identity is None else identity.tenant, method=request.method,
            path=request.raw_path, route=outcome.route, status=outcome.status, duration=duration,
            upstream_duration=outcome.upstream_duration, remote=request.remote, error=outcome.error,
        )


def _origin_form(raw_target: str) -> str:
    """The request-target to send upstream: origin-form, absolute-form reduced to its path."""
    if raw_target.startswith("/") or raw_target == "*":
        return raw_target
    parts = urlsplit(raw_target)
    if parts.scheme in ("http", "https") and parts.netloc:
        path = raw_target[len(parts.scheme) + 3 + len(parts.netloc):] or "/"
        return path if path.startswith("/") else "/" + path
    raise InvalidRequest("the request-target must be a path or an absolute http(s) URL")


async def _request_body(request: web.BaseRequest,
                        outcome: Outcome) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
    """The body to forward: small ones read whole (replayable), others streamed; bytes counted."""
    if not request.body_exists:
        return None, None
    length = request.content_length
    if length is not None and length <= REPLAYABLE_BODY:
        body = await request.read()
        outcome.request_bytes = len(body)
        return body, length
    return _counted(request.content.iter_chunked(STREAM_CHUNK), outcome), length


async def _counted(chunks: AsyncIterator[bytes], outcome: Outcome) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        outcome.request_bytes += len(chunk)
        yield chunk

"""The proxy listener's request handler: authenticate, forward, stream back (PRODUCT.md §3-§4).

It runs on aiohttp's low-level server (no router, no middleware: the fewest steps per request).
The upstream is reached through `UpstreamPool`, a lean HTTP/1.1 client; WebSocket upgrades
are handed to `gateway.proxy.websocket`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from gateway.auth.tokens import Authenticator, AuthError, Identity
from gateway.config.settings import Settings
from gateway.errors import (
    BadGateway,
    Forbidden,
    GatewayError,
    GatewayTimeout,
    InvalidRequest,
    InvalidToken,
    NotFound,
    RequestTimeout,
    UpstreamBusy,
    problem_response,
)
from gateway.metrics import RequestMetrics
from gateway.proxy.accesslog import AccessLog
from gateway.proxy.headers import (
    client_response_headers,
    identity_headers,
    is_trusted,
    request_id,
    upstream_request_headers,
)
from gateway.proxy.own_endpoints import OwnEndpoints
from gateway.proxy.refusals import refusal_error
from gateway.proxy.response import SmallResponse, UnsafeHeader
from gateway.proxy.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamPoolBusy,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.proxy.websocket import WebSocketRelay, is_websocket_upgrade
from metering.paths import UnsafePath
from metering.paths import readings as path_readings
from quota.limiter import Admission, Limiter, Refusal

log = logging.getLogger("cosmos_gateway.proxy")

# Paths the gateway answers itself on the proxy listener; never forwarded.
OWN_PREFIX = "/_gateway/"
# A path is the gateway's own when any reading of it is under OWN_PREFIX, in any case: nothing that some
# server could take for a /_gateway/ path goes upstream.
_OWN = re.compile(r"/_gateway(?:/|\Z)", re.IGNORECASE)
# The answer to a fault of the gateway's own; details go to the log only.
_INTERNAL_ERROR = GatewayError("the gateway could not complete the request; the log has the details "
                               "under the X-Request-Id of this answer")

# Request bodies up to this size are read first, so a request on a stale pooled connection
# can be replayed on a fresh one; larger bodies stream and are never replayed.
REPLAYABLE_BODY = 64 * 1024
# Responses up to this size are read whole and written in one call (the fast path).
SMALL_RESPONSE = 256 * 1024


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
    # The whole request went to the upstream (or is going, in one write): from here on the upstream may
    # act on it. Until then a request that fails or is abandoned gives all its units back (PRODUCT.md §5).
    delivered: bool = False


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
        response: web.StreamResponse | None = None
        settle = 500  # an exit without a response (any other BaseException) gives the units back
        try:
            response = await self._handle(request, rid, outcome)
        except GatewayError as error:
            outcome.error = error.suffix
            response = problem_response(error, self._type_base, rid)
            if _expects_continue(request) and not request.content.is_eof():
                response.force_close()  # a refused upload's body was never asked for: nothing can follow it
        except asyncio.CancelledError:
            # The client went away, or the upstream failed mid-body (then nothing is billed).
            settle = 502 if outcome.error == "upstream-mid-body" else 499
            raise
        except Exception:
            # A fault of the gateway's, not of the input: a 500 like every other error of ours, the
            # traceback in the log and only the request id in the answer.
            log.exception("request %s (%s): unexpected error", rid, request.method)
            outcome.error = "internal"
            response = problem_response(_INTERNAL_ERROR, self._type_base, rid)
            response.force_close()  # where the fault left the request's body is unknown: nothing may follow
        finally:
            # Every exit settles the admission: counted, or its units given back.
            self._complete(outcome, settle if response is None else response.status)
        outcome.status = response.status
        self._record(request, rid, outcome, loop.time() - started)
        return response

    def _complete(self, outcome: Outcome, status: int) -> None:
        admission = outcome.admission
        if admission is not None and self._limiter is not None:
            outcome.admission = None
            try:
                if not outcome.delivered:  # client gone, body timeout, upstream unreachable or busy
                    self._limiter.abandon(admission)
                    return
                self._limiter.complete(admission, status, outcome.request_bytes, outcome.response_bytes,
                                       outcome.usage_report)
            except Exception:  # the answer stands; what could not be recorded is in the log
                log.exception("could not record the outcome (status %d) of an admitted request", status)

    async def _handle(self, request: web.BaseRequest, rid: str, outcome: Outcome) -> web.StreamResponse:
        target = _origin_form(request.raw_path)
        path = target.split("?", 1)[0]
        try:
            spelled = path_readings(path)  # public paths, meters and guards match these, never the raw path
        except UnsafePath as exc:
            raise InvalidRequest("the request path cannot be read safely",
                                 [{"field": "path", "message": str(exc)}]) from None
        if _is_own(spelled):
            outcome.route = "gateway"
            if self._own is None:
                raise NotFound("no such gateway endpoint")
            return await self._own.handle(request, spelled[0], self._authenticate)
        identity: Identity | None = None
        if self._auth.is_public(spelled):
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
            identity.tenant, self._plan_of(identity, outcome.admission), identity.subject)
        peer = request.remote
        headers = upstream_request_headers(
            request.raw_headers, peer=peer, trusted_peer=is_trusted(peer, self._trusted),
            scheme=request.scheme, request_id=rid, identity=identity_hdrs,
        )
        if is_websocket_upgrade(request):
            outcome.route = "websocket"
            outcome.delivered = True  # the upstream is dialled and sent the upgrade first
            return await self._websockets.relay(request, target, headers, rid)
        return await self._forward(request, target, headers, rid, outcome)

    def _plan_of(self, identity: Identity, admission: Admission | None) -> str | None:
        """The tenant's effective plan (an operator's or Stripe's choice, else the token's claim, else the
        default plan), as the limiter resolved it for this request."""
        if admission is not None:
            return admission.compiled.plan
        return identity.plan or self._default_plan

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
        if "Expect" in request.headers:  # answered here (`_request_body`), so never sent on
            headers = [header for header in headers if header[0].lower() != "expect"]
        try:
            body, length = await _request_body(request, outcome, self._settings.listen.body_timeout)
            if body is None or isinstance(body, bytes):
                outcome.delivered = True  # at hand whole, written in one call; a stream sets it at its end
            sent = self._loop.time()
            upstream = await self._pool.request(request.method, target, headers, body, content_length=length)
        except BodyTimeout:
            return self._body_timed_out(request, outcome, rid)
        except UpstreamPoolBusy:
            outcome.delivered = False
            raise UpstreamBusy("no upstream connection was free in time") from None
        except UpstreamConnectError:
            outcome.delivered = False
            raise BadGateway("the upstream could not be reached") from None
        except UpstreamTimeout:
            raise GatewayTimeout("the upstream did not answer in time") from None
        except UpstreamError:
            raise BadGateway("the upstream could not be reached or answered badly") from None
        outcome.upstream_duration = self._loop.time() - sent
        try:
            return await self._respond(request, upstream, rid, outcome)
        finally:
            upstream.release()

    def _body_timed_out(self, request: web.BaseRequest, outcome: Outcome, rid: str) -> web.StreamResponse:
        """408, then the connection closed; the upstream got no whole request, so the units are given back."""
        outcome.error = "body-timeout"
        self._complete(outcome, 408)  # not delivered: every unit is given back
        problem = problem_response(RequestTimeout("the request body stalled for longer than body_timeout"),
                                   self._type_base, rid)
        response = _FinalResponse(request.protocol, status=problem.status, body=problem.body,
                                  headers=problem.headers)
        response.force_close()
        return response

    async def _respond(self, request: web.BaseRequest, upstream: UpstreamResponse, rid: str,
                       outcome: Outcome) -> web.StreamResponse:
        # Where else a response's headers are touched: the map in gateway/proxy/headers.py.
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
        try:
            identity = outcome.identity
            plan = None if identity is None else (identity.plan or self._default_plan)
            self._metrics.observe(request.method, outcome.status, plan, outcome.route, duration,
                                  outcome.upstream_duration)
            if self._log.enabled:
                self._log.record(rid, None if identity is None else identity.tenant, request.method,
                                 request.raw_path, outcome.route, outcome.status, duration,
                                 outcome.upstream_duration, request.remote, None, outcome.error)
        except Exception:  # metrics and the access log never cost the client its answer
            log.exception("request %s: could not record metrics or the access log line", rid)


def _is_own(spelled: tuple[str, ...]) -> bool:
    for reading in spelled:
        if _OWN.match(reading) is not None:
            return True
    return False


def _origin_form(raw_target: str) -> str:
    """The request-target to send upstream: origin-form, absolute-form reduced to its path."""
    if raw_target.startswith("/") or raw_target == "*":
        return raw_target
    parts = urlsplit(raw_target)
    if parts.scheme in ("http", "https") and parts.netloc:
        path = raw_target[len(parts.scheme) + 3 + len(parts.netloc):] or "/"
        return path if path.startswith("/") else "/" + path
    raise InvalidRequest("the request-target must be a path or an absolute http(s) URL")


class BodyTimeout(Exception):
    """The client paused longer than `listen.body_timeout` within its request body."""


class _FinalResponse(web.Response):
    """A response after which the connection closes at once. aiohttp would first read (and drop) the
    rest of an unread request body for up to its lingering_time: for a body that stalled, in vain."""

    def __init__(self, protocol: RequestHandler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handler = protocol

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        self._handler.force_close()  # the transport flushes the response, then closes


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def _request_body(request: web.BaseRequest, outcome: Outcome,
                        gap: float) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
    """The body to forward, as sent (never inflated): small ones read whole (replayable), others
    streamed; bytes counted; each wait for more of it at most `gap` seconds (else BodyTimeout)."""
    if not request.body_exists:
        return None, None
    content = request.content
    if not content.is_eof() and request.version >= (1, 1) and _expects_continue(request):
        # Admitted (authenticated, within quota): now the client may send the body.
        transport = request.transport
        if transport is not None:
            transport.write(_CONTINUE)
    length = request.content_length
    if length is not None and length <= REPLAYABLE_BODY:
        if content.is_eof():  # the common case: the body came with the head
            body = content.read_nowait()
        else:
            parts = []
            while chunk := await _next_chunk(content, gap):
                parts.append(chunk)
            body = b"".join(parts)
        outcome.request_bytes = len(body)
        return body, length
    return _Counted(content, outcome, gap), length


class _Counted:
    """A streamed request body, its bytes counted. A class, not an async generator: mypyc compiles none."""

    __slots__ = ("_content", "_done", "_gap", "_outcome")

    def __init__(self, content: StreamReader, outcome: Outcome, gap: float) -> None:
        self._content = content
        self._outcome = outcome
        self._gap = gap
        self._done = False

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        chunk = await _next_chunk(self._content, self._gap)
        if chunk:
            self._outcome.request_bytes += len(chunk)
            return chunk
        self._done = True
        self._outcome.delivered = True  # the whole body is handed to the upstream connection
        raise StopAsyncIteration


async def _next_chunk(content: StreamReader, gap: float) -> bytes:
    """What has come of the body since the last call (b"" at its end), waiting at most `gap` seconds."""
    chunk = content.read_nowait()
    if chunk or content.is_eof():
        return chunk  # no timer for what is there already
    try:
        async with asyncio.timeout(gap):
            return await content.readany()
    except TimeoutError:
        raise BodyTimeout(f"no body bytes for {gap} s") from None


def _expects_continue(request: web.BaseRequest) -> bool:
    expect = request.headers.get("Expect")
    return expect is not None and expect.strip().lower() == "100-continue"

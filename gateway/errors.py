"""Errors the gateway itself answers, each with its HTTP status, as RFC 9457 problem+json.

GatewayError              500 internal                (itself: a fault of the gateway's, never bad input;
│                                                      the outermost handlers answer it, the log has the trace)
├── InvalidRequest        400 invalid-request
├── InvalidToken          401 invalid-token
├── SubscriptionInactive  402 subscription-inactive
├── Forbidden             403 forbidden
├── NotFound              404 not-found
├── MethodNotAllowed      405 method-not-allowed      (admin API)
├── RequestTimeout        408 request-timeout         (a request body paused longer than listen.body_timeout)
├── NoStripeCustomer      409 no-stripe-customer      (Stripe's billing portal: the tenant has no Stripe customer)
├── LinkGone              410 link-gone               (the usage page: a link used already, or expired)
├── PayloadTooLarge       413 payload-too-large       (admin API, Stripe webhooks)
├── RateLimited           429 rate-limited
├── QuotaExceeded         429 quota-exceeded
├── BadGateway            502 bad-gateway
├── LimiterUnavailable    503 limiter-unavailable
├── DatabaseUnavailable   503 database-unavailable    (admin API, /_gateway/usage, Stripe webhooks)
├── Overloaded            503 overloaded              (a connection beyond listen.max_connections)
├── UpstreamBusy          503 upstream-busy           (no upstream connection free within pool_timeout)
├── WebhooksNotConfigured 503 webhooks-not-configured (Stripe webhooks: no secret, or no API key for a thin event)
├── StripeUnavailable     503 stripe-unavailable      (Stripe webhooks: a thin event's data could not be read;
│                                                      the billing portal: Stripe unreachable, late or failing)
├── StripeDryRun          503 stripe-dry-run          (the billing portal while billing.stripe.mode is dry_run)
└── GatewayTimeout        504 gateway-timeout
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from aiohttp import web

PROBLEM_JSON = "application/problem+json"
WWW_AUTHENTICATE = 'Bearer realm="cosmos-gateway"'


class GatewayError(Exception):
    status: ClassVar[int] = 500
    suffix: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, type_base: str) -> dict[str, Any]:
        return {
            "type": type_base + self.suffix,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


class InvalidRequest(GatewayError):
    status, suffix, title = 400, "invalid-request", "Invalid request"

    def __init__(self, detail: str, errors: list[dict[str, str]] | None = None, **extra: Any) -> None:
        super().__init__(detail, errors=errors or [], **extra)


class InvalidToken(GatewayError):
    status, suffix, title = 401, "invalid-token", "Invalid or missing token"

    def __init__(self, detail: str, *, token_presented: bool) -> None:
        challenge = WWW_AUTHENTICATE + (', error="invalid_token"' if token_presented else "")
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class SubscriptionInactive(GatewayError):
    status, suffix, title = 402, "subscription-inactive", "Subscription inactive"


class Forbidden(GatewayError):
    status, suffix, title = 403, "forbidden", "Forbidden"


class NotFound(GatewayError):
    status, suffix, title = 404, "not-found", "Not found"


class MethodNotAllowed(GatewayError):
    status, suffix, title = 405, "method-not-allowed", "Method not allowed"


class RequestTimeout(GatewayError):
    status, suffix, title = 408, "request-timeout", "Request timeout"


class NoStripeCustomer(GatewayError):
    status, suffix, title = 409, "no-stripe-customer", "No Stripe customer"


class LinkGone(GatewayError):
    status, suffix, title = 410, "link-gone", "Link expired or used"


class PayloadTooLarge(GatewayError):
    status, suffix, title = 413, "payload-too-large", "Payload too large"


class RateLimited(GatewayError):
    status, suffix, title = 429, "rate-limited", "Rate limit exceeded"


class QuotaExceeded(GatewayError):
    status, suffix, title = 429, "quota-exceeded", "Quota exceeded"


class BadGateway(GatewayError):
    status, suffix, title = 502, "bad-gateway", "Bad gateway"


class LimiterUnavailable(GatewayError):
    status, suffix, title = 503, "limiter-unavailable", "Limiter unavailable"


class DatabaseUnavailable(GatewayError):
    status, suffix, title = 503, "database-unavailable", "Database unavailable"


class Overloaded(GatewayError):
    """The worker holds `listen.max_connections` connections: a new one is answered this and closed."""

    status, suffix, title = 503, "overloaded", "Too many connections"

    def __init__(self, detail: str = "the gateway is at its connection limit; try again", **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": "1"}, **extra)


class UpstreamBusy(GatewayError):
    status, suffix, title = 503, "upstream-busy", "Upstream busy"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": "1"}, **extra)


class WebhooksNotConfigured(GatewayError):
    status, suffix, title = 503, "webhooks-not-configured", "Webhooks not configured"


class StripeUnavailable(GatewayError):
    status, suffix, title = 503, "stripe-unavailable", "Stripe unavailable"


class StripeDryRun(GatewayError):
    status, suffix, title = 503, "stripe-dry-run", "Stripe is in dry run"


class GatewayTimeout(GatewayError):
    status, suffix, title = 504, "gateway-timeout", "Gateway timeout"


def problem_response(error: GatewayError, type_base: str, request_id: str | None = None) -> web.Response:
    """The problem+json response for an error (X-Request-Id set when known)."""
    headers = dict(error.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.Response(status=error.status, body=problem_body(error, type_base), content_type=PROBLEM_JSON,
                        headers=headers)


def problem_body(error: GatewayError, type_base: str) -> bytes:
    """The problem+json document of an error, for writers that are not aiohttp responses."""
    return json.dumps(error.body(type_base), separators=(",", ":")).encode()

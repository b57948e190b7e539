"""`POST /_gateway/webhooks/stripe` on the proxy listener (PRODUCT.md §8): the HTTP half of the Stripe webhooks.

    events = StripeEventProcessor(secret=..., sessions=..., plans_by_lookup_key=..., known_plans=...)
    webhook = StripeWebhook(events, directory=directory, problem_type_base=settings.server.problem_type_base)
    OwnEndpoints(..., stripe_webhook=webhook.handle)

The body (at most 1 MiB: 413 beyond) and its Stripe-Signature header(s) go to billing_sync's
StripeEventProcessor, which verifies, decides and applies the event in one transaction. Its answer is
sent as JSON; what it refuses becomes problem+json here (400 for unsigned or malformed bodies; 503
`webhooks-not-configured` / `stripe-unavailable`), and a SQL store that is down or restarting a 503
`database-unavailable` (Stripe retries later). The tenant it changed is announced through the
TenantDirectory after the commit, so this instance applies it before the answer.
"""

from __future__ import annotations

import logging

from aiohttp import web

from billing_sync.stripe_events import WebhookRefused
from billing_sync.subscriptions import StripeEventProcessor
from gateway.config.settings import ServerSettings
from gateway.errors import (
    DatabaseUnavailable,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    StripeUnavailable,
    WebhooksNotConfigured,
    problem_response,
)
from metering.sql_errors import store_unavailable
from quota.tenants import TenantDirectory

log = logging.getLogger("cosmos_gateway.webhooks")

MAX_BODY_BYTES = 1 << 20
# billing_sync's refusals by problem type: the gateway's error of the same type, status and title.
_REFUSALS: dict[str, type[GatewayError]] = {
    cls.suffix: cls for cls in (InvalidRequest, WebhooksNotConfigured, StripeUnavailable)}


class StripeWebhook:
    """The aiohttp handler of Stripe's webhook deliveries; `handle` is what OwnEndpoints calls."""

    def __init__(self, events: StripeEventProcessor, *, directory: TenantDirectory,
                 problem_type_base: str = ServerSettings.problem_type_base) -> None:
        self._events = events
        self._directory = directory
        self._type_base = problem_type_base

    async def handle(self, request: web.BaseRequest) -> web.Response:
        try:
            self._events.require_secret()  # before the body: without a secret nothing is read
            body = await _read_body(request)
            received = await self._events.receive(body, request.headers.getall("Stripe-Signature", ()))
        except WebhookRefused as refused:
            return problem_response(as_gateway_error(refused), self._type_base)
        except GatewayError as error:
            return problem_response(error, self._type_base)
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            log.exception("stripe webhook: the SQL store failed; Stripe will retry")
            return problem_response(DatabaseUnavailable("the SQL store is unavailable"), self._type_base)
        if received.tenant is not None:
            try:
                await self._directory.announce(received.tenant)
            except Exception:  # committed: the directory's periodic reload applies it within seconds
                log.exception("stripe webhook: could not announce the change of tenant %s", received.tenant)
        return web.json_response(received.answer)


def as_gateway_error(refused: WebhookRefused) -> GatewayError:
    """billing_sync's refusal as the gateway error of its problem type (a 500 for a type it never uses)."""
    return _REFUSALS.get(refused.suffix, GatewayError)(refused.detail, **refused.extra)


async def _read_body(request: web.BaseRequest) -> bytes:
    """The raw body, at most MAX_BODY_BYTES (Stripe signs the bytes as sent)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _body_too_large()
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _body_too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes")

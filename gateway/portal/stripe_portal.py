"""Stripe's customer portal: `POST /v1/billing_portal/sessions` for a tenant's customer (PRODUCT.md §6a, §10).

Invoices, PDFs, payment methods and plan changes stay Stripe's; the gateway only opens the door. The call goes
through the real `stripe` library's async client, configured as the sync worker's (`billing.stripe.api_base`,
the key from STRIPE_API_KEY, no retries of the library's own), with a deadline, and at most MAX_CONCURRENT at
once per process (a tenant can call it): more wait QUEUE_SECONDS for a turn, then 503 `overloaded`.

Stripe's answers become the gateway's errors here, once: unreachable, late, rate-limited or failing (5xx) is a
503 `stripe-unavailable` with Retry-After; a refusal (an unknown customer, no portal configuration, a bad key)
is a 502 `bad-gateway` that says what Stripe said: it is the operator's to fix, not the caller's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import stripe

from billing_sync.settings import StripeSettings
from gateway.errors import BadGateway, Overloaded, StripeDryRun, StripeUnavailable

log = logging.getLogger("cosmos_gateway.portal")
STRIPE_SECONDS = 10.0  # the whole call, connection included
MAX_CONCURRENT = 8
QUEUE_SECONDS = 5.0
STRIPE_PORTAL_ORIGIN = "https://billing.stripe.com"  # where Stripe's portal sessions live
_RETRY = {"Retry-After": "2"}
_TRANSIENT = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError, stripe.IdempotencyError)


class StripePortal:
    """Creates billing portal sessions; `aclose()` closes its HTTP client."""

    def __init__(self, settings: StripeSettings, return_url: str | None, *,
                 http_client: stripe.HTTPClient | None = None, timeout: float = STRIPE_SECONDS) -> None:
        self._return_url = return_url
        self._timeout = timeout
        self._turns = asyncio.Semaphore(MAX_CONCURRENT)
        self.dry_run = settings.mode == "dry_run" or not settings.api_key
        self._http: stripe.HTTPClient | None = None
        self._client: stripe.StripeClient | None = None
        if not self.dry_run:
            self._http = http_client or stripe.AIOHTTPClient(timeout=timeout)
            bases: Any = {"api": settings.api_base} if settings.api_base else {}
            self._client = stripe.StripeClient(settings.api_key, base_addresses=bases, max_network_retries=0,
                                               http_client=self._http)
        # The page's form is answered with a redirect to the session's URL: the page's CSP must allow it.
        self.origins = (STRIPE_PORTAL_ORIGIN,) + ((_origin(settings.api_base),) if settings.api_base else ())

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close_async()

    async def session_url(self, customer: str) -> str:
        """A new portal session of `customer`: its URL. Raises the gateway's errors (see the module)."""
        if self._client is None:
            raise StripeDryRun("Stripe's billing portal is not available while billing.stripe.mode is dry_run")
        params: dict[str, Any] = {"customer": customer}
        if self._return_url is not None:
            params["return_url"] = self._return_url
        try:
            async with asyncio.timeout(QUEUE_SECONDS):
                await self._turns.acquire()
        except TimeoutError:
            raise Overloaded("too many billing portal sessions are being opened at once; try again") from None
        try:
            async with asyncio.timeout(self._timeout):
                session = await self._client.v1.billing_portal.sessions.create_async(params=params)  # type: ignore[arg-type]
        except TimeoutError:
            log.warning("billing portal for %s: Stripe did not answer within %.0f s", customer, self._timeout)
            raise StripeUnavailable("Stripe did not answer in time; try again shortly", headers=dict(_RETRY)) from None
        except _TRANSIENT as exc:
            log.warning("billing portal for %s: Stripe unavailable (%s)", customer, _said(exc))
            raise StripeUnavailable("Stripe could not be reached or failed; try again shortly",
                                    headers=dict(_RETRY)) from None
        except stripe.StripeError as exc:
            log.warning("billing portal for %s: Stripe refused (%s)", customer, _said(exc))
            raise BadGateway(f"Stripe refused to open the billing portal: {_said(exc)}") from None
        finally:
            self._turns.release()
        url = getattr(session, "url", None)
        if not isinstance(url, str) or urlsplit(url).scheme not in ("https", "http"):
            raise BadGateway("Stripe's answer held no portal URL")
        return url


def _said(exc: stripe.StripeError) -> str:
    """Stripe's own message, short: it names the problem (`No such customer: 'cus_…'`) and holds no secret."""
    error = getattr(exc, "error", None)
    message = getattr(error, "message", None) or exc.user_message or type(exc).__name__
    return str(message)[:300]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"

"""The limiter's refusals as the problem+json errors of PRODUCT.md §4 (one place for the mapping).

Where else headers are touched: the map in gateway/proxy/headers.py.
"""

from __future__ import annotations

from gateway.errors import (
    Forbidden,
    GatewayError,
    LimiterUnavailable,
    QuotaExceeded,
    RateLimited,
    SubscriptionInactive,
)
from metering.clock import rfc3339
from quota.limiter import Refusal
from quota.usage_view import number


def refusal_error(refusal: Refusal) -> GatewayError:
    retry = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else {}
    retry.update(refusal.headers)  # RateLimit-Policy and RateLimit on a 429
    if refusal.kind == "rate":
        return RateLimited(refusal.detail, headers=retry, tenant=refusal.tenant, retry_after=refusal.retry_after,
                           **{"violated-policies": ["burst"]})
    if refusal.kind == "quota":
        return QuotaExceeded(refusal.detail, headers=retry, tenant=refusal.tenant, meter=refusal.meter,
                             limit=number(refusal.limit), used=number(refusal.used),
                             resets_at=rfc3339(refusal.resets_at),
                             **{"violated-policies": [refusal.meter]})
    if refusal.kind == "subscription_inactive":
        return SubscriptionInactive(refusal.detail, tenant=refusal.tenant,
                                    subscription_status=refusal.subscription_status)
    if refusal.kind == "unavailable":
        return LimiterUnavailable(refusal.detail, headers=retry)
    return Forbidden(refusal.detail, tenant=refusal.tenant)


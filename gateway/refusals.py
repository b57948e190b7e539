"""The limiter's refusals as the problem+json errors of PRODUCT.md §4 (one place for the mapping)."""

from __future__ import annotations

from datetime import UTC

from gateway.errors import (
    Forbidden,
    GatewayError,
    LimiterUnavailable,
    QuotaExceeded,
    RateLimited,
    SubscriptionInactive,
)
from quota.limiter import Refusal


def refusal_error(refusal: Refusal) -> GatewayError:
    retry = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else None
    if refusal.kind == "rate":
        return RateLimited(refusal.detail, headers=retry, tenant=refusal.tenant, retry_after=refusal.retry_after,
                           **{"violated-policies": ["burst"]})
    if refusal.kind == "quota":
        resets_at = refusal.resets_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if refusal.resets_at else None
        return QuotaExceeded(refusal.detail, headers=retry, tenant=refusal.tenant, meter=refusal.meter,
                             limit=_number(refusal.limit), used=_number(refusal.used), resets_at=resets_at,
                             **{"violated-policies": [refusal.meter]})
    if refusal.kind == "subscription_inactive":
        return SubscriptionInactive(refusal.detail, tenant=refusal.tenant,
                                    subscription_status=refusal.subscription_status)
    if refusal.kind == "unavailable":
        return LimiterUnavailable(refusal.detail, headers=retry)
    return Forbidden(refusal.detail, tenant=refusal.tenant)


def _number(value: float | None) -> float | int | None:
    """Counters are whole numbers: show 100, not 100.0."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value

"""Reading a Stripe webhook delivery: its signature, its event envelope, the subscription it carries (pure).

Everything here is client input checked field by field; what cannot be used raises WebhookRefused, which
the gateway answers as problem+json (billing_sync knows nothing of HTTP).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe

SUBSCRIPTION_EVENTS = frozenset({
    "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted"})
_MAX_ID = 255  # the width of the Stripe id columns
_MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime can hold
_MAX_SIGNATURE_HEADER = 4096
_SIGNATURE_TIME = re.compile(r"[0-9]{1,12}")
_SIGNATURE_V1 = re.compile(r"[0-9a-f]{64}")  # a hex HMAC-SHA256, as Stripe writes it


class WebhookRefused(Exception):
    """A delivery answered with other than 2xx (Stripe retries it): the problem type's `suffix`, `title`,
    `status` and `detail` as PRODUCT.md §4 spells them, plus `extra` fields (`errors` of a 400)."""

    def __init__(self, status: int, suffix: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.suffix, self.title, self.detail, self.extra = status, suffix, title, detail, extra


def invalid(field: str, message: str) -> WebhookRefused:
    """A 400 `invalid-request` naming the field."""
    return WebhookRefused(400, "invalid-request", "Invalid request", f"{field}: {message}",
                          errors=[{"field": field, "message": message}])


def not_configured(detail: str) -> WebhookRefused:
    """A 503: the gateway lacks what the delivery needs (a secret, the API key); Stripe retries for days."""
    return WebhookRefused(503, "webhooks-not-configured", "Webhooks not configured", detail)


@dataclass(frozen=True, slots=True)
class Event:
    """The envelope of a Stripe event: what every type has.

    `object` is `data.object` of a v1 (snapshot) event; of a v2 event (`"object": "v2.core.event"`,
    whose `created` is an RFC 3339 string) it is the whole event: its `data` and `related_object`.
    """

    id: str
    type: str
    created: int
    object: Any
    v2: bool = False


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a `customer.subscription.*` event says about the subscription."""

    id: str
    customer_id: str
    status: str
    lookup_keys: tuple[str, ...]
    tenant_id: Any  # metadata.tenant_id of the subscription, else of an expanded customer; unchecked


def parse_event(payload: str) -> Event:
    """The event envelope of a webhook body; raises a 400 problem naming the bad field."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise invalid("body", "not valid JSON") from None
    if not isinstance(data, dict):
        raise invalid("body", "not a JSON object")
    event_id, event_type, created = data.get("id"), data.get("type"), data.get("created")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= _MAX_ID:
        raise invalid("id", "must be a non-empty string")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 128:
        raise invalid("type", "must be a non-empty string")
    if data.get("object") == "v2.core.event":
        return Event(event_id, event_type, _v2_created(created), data, v2=True)
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created <= _MAX_TIMESTAMP:
        raise invalid("created", "must be a Unix timestamp")
    inner = data.get("data")
    return Event(event_id, event_type, created, inner.get("object") if isinstance(inner, dict) else None)


def _v2_created(created: Any) -> int:
    """A v2 event's `created` ("2024-09-26T17:46:22.134Z") as a Unix timestamp."""
    parsed = None
    if isinstance(created, str) and len(created) <= 40:
        try:
            parsed = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise invalid("created", "must be an RFC 3339 time with a zone")
    return int(parsed.timestamp())


def parse_subscription(event: Event) -> Subscription:
    """The subscription carried by a `customer.subscription.*` event; raises a 400 problem if it is unusable."""
    obj = event.object
    if not isinstance(obj, dict):
        raise invalid("data.object", "must be a subscription object")
    sub_id, status, customer = obj.get("id"), obj.get("status"), obj.get("customer")
    if not isinstance(sub_id, str) or not 0 < len(sub_id) <= _MAX_ID:
        raise invalid("data.object.id", "must be a subscription id")
    # The customer is an id, or the customer object when the sender expanded it.
    customer_metadata = customer.get("metadata") if isinstance(customer, dict) else None
    customer_id = customer.get("id") if isinstance(customer, dict) else customer
    if not isinstance(customer_id, str) or not 0 < len(customer_id) <= _MAX_ID:
        raise invalid("data.object.customer", "must be a customer id")
    if event.type == "customer.subscription.deleted":
        status = "canceled"
    if not isinstance(status, str) or not 0 < len(status) <= 32:
        raise invalid("data.object.status", "must be a subscription status")
    tenant_id = _metadata(obj.get("metadata"))
    if tenant_id is None:
        tenant_id = _metadata(customer_metadata)
    return Subscription(sub_id, customer_id, status, _lookup_keys(obj.get("items")), tenant_id)


def _metadata(metadata: Any) -> Any:
    # Stripe cannot store an empty metadata value; treat one like an absent key.
    value = metadata.get("tenant_id") if isinstance(metadata, dict) else None
    return None if value in (None, "") else value


def _lookup_keys(items: Any) -> tuple[str, ...]:
    rows = items.get("data") if isinstance(items, dict) else None
    keys = []
    for item in rows if isinstance(rows, list) else ():
        price = item.get("price") if isinstance(item, dict) else None
        key = price.get("lookup_key") if isinstance(price, dict) else None
        if isinstance(key, str):
            keys.append(key)
    return tuple(keys)


def verify_signature(payload: str, header: str, secrets: Sequence[str], *, now: float, tolerance: int) -> None:
    """Raise a 400 problem unless the Stripe-Signature `header` signs `payload` with one of `secrets`, at
    most `tolerance` seconds before `now`.

    Several secrets: while Stripe rolls an endpoint's secret, a delivery carries a `v1` signature per secret
    and the operator configures the new secret next to the old one; a match with either is enough.

    The header is client input: it is parsed here first (visible ASCII, `t=<digits>`, `v1=<64 hex>`),
    and only its well-formed parts, rebuilt, reach stripe's verifier, whose own parser would take
    Unicode digits or a 5,000-digit `t`, and whose comparison raises TypeError for non-ASCII text.
    """
    timestamp, signatures = _parse_signature(header)
    canonical = ",".join([f"t={timestamp}", *(f"v1={signature}" for signature in signatures)])
    if not any(_signed_with(payload, canonical, secret) for secret in secrets):
        raise invalid("Stripe-Signature", "does not match the body and the webhook secret")
    if timestamp < now - tolerance:
        raise invalid("Stripe-Signature", f"signed more than {tolerance} seconds ago")


def _signed_with(payload: str, canonical: str, secret: str) -> bool:
    try:
        # Tolerance None: stripe would measure the age with time.time(); ours uses the injected clock.
        stripe.WebhookSignature.verify_header(payload, canonical, secret, tolerance=None)
    except (stripe.SignatureVerificationError, ValueError, TypeError):
        return False
    return True


def _parse_signature(header: str) -> tuple[int, list[str]]:
    """The timestamp and the v1 signatures of a Stripe-Signature header; a 400 problem if it has none."""
    if len(header) > _MAX_SIGNATURE_HEADER or not header.isascii() or not header.isprintable():
        raise invalid("Stripe-Signature", "is not a Stripe signature header (visible ASCII, at most 4 KiB)")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.partition("=")
        if name == "t" and timestamp is None and _SIGNATURE_TIME.fullmatch(value):
            timestamp = int(value)
        elif name == "v1" and _SIGNATURE_V1.fullmatch(value):
            signatures.append(value)
    if timestamp is None or not signatures:
        raise invalid("Stripe-Signature", "is not a Stripe signature header (t=<unix time>,v1=<hex signature>)")
    return timestamp, signatures

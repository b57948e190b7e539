"""HMAC-signed values any worker process of one configuration can read: the console's sessions
(gateway/console/session.py) and the usage page's links and sessions (gateway/portal/tokens.py).

Worker processes share their ports (SO_REUSEPORT), so nothing is kept in a process: a value carries its
fields as base64url JSON and a MAC over a purpose and that payload, with a key each worker derives alike from
the configured secrets. The purpose inside the MAC keeps one kind of value from passing for another; the label
of the key keeps the console's values and the portal's apart.

    signer = Signer(derive_key(b"my label v1", ["admin:ops:token…", "hs256:…"]))
    payload = pack(["acme", 1_800_000_000, "id"])
    mac = signer.mac("session", payload)          # bytes; b64(mac) for text
    fields = unpack(payload)                      # the list back, or None for anything malformed
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from typing import Any


def derive_key(label: bytes, material: Sequence[str]) -> bytes:
    """The signing key of `label`: the same for the same secrets (in this order), another once one changes.

    Without any secret it is random, so values hold in the process that made them only.
    """
    if not material:
        return secrets.token_bytes(32)
    return hmac.new(label, "\n".join(material).encode(), hashlib.sha256).digest()


def b64(data: bytes) -> str:
    """base64url without padding (cookies and URLs)."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    """The bytes of b64(); binascii.Error (a ValueError) for text that is not base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def random_id() -> str:
    """128 random bits as text: a session's nonce, a link's id."""
    return b64(secrets.token_bytes(16))


def pack(fields: list[Any]) -> str:
    """The payload of a signed value: its fields as compact JSON, base64url."""
    return b64(json.dumps(fields, separators=(",", ":")).encode())


def unpack(payload: str) -> list[Any] | None:
    """The fields of a payload, or None for anything that is not a packed list (any client bytes)."""
    try:
        fields = json.loads(unb64(payload))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        return None
    return fields if isinstance(fields, list) else None


class Signer:
    """MACs of (purpose, payload) with one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mac(self, purpose: str, payload: str) -> bytes:
        return hmac.new(self._key, f"{purpose}|{payload}".encode(), hashlib.sha256).digest()

    def text_mac(self, purpose: str, payload: str) -> str:
        return b64(self.mac(purpose, payload))

    def matches(self, purpose: str, payload: str, presented: str) -> bool:
        """Whether `presented` is the text MAC of (purpose, payload), compared in constant time."""
        return hmac.compare_digest(presented.encode(), self.text_mac(purpose, payload).encode())

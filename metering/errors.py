"""The one configuration error, naming the dotted config key, and the checks every config parser repeats.

ConfigError (ValueError)   "meters.api_calls.match.path: must start with '/'"

Raised by every layer that reads configuration (metering, quota, billing_sync and gateway.config), so
`cosmos-gateway` reports any of them the same way; this module stays gateway-agnostic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

# What a Redis call can raise when Redis is down, slow or failing: every package catches exactly these.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)


class ConfigError(ValueError):
    """A bad configuration value; `key` is the dotted path of the offending key (None: the file as a whole)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def kind_of(value: Any) -> str:
    """A short description of a config value for messages ("got a list")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text}" if len(text) <= 40 else f"a number of {len(text)} digits"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) <= 80 else "a long string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def expect_mapping(value: Any, key: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    """`value` as a mapping whose keys are all in `allowed`; otherwise an error naming the key."""
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {kind_of(value)}")
    allowed = set(allowed)
    for name in value:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value

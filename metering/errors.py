"""Configuration errors of the metering and quota policy, each naming the dotted config key.

ConfigurationError (ValueError)   "meters.api_calls.match.path: must start with '/'"

The gateway wraps these into its own config error at start-up; this layer stays gateway-agnostic.
The two helpers below are the checks every parser of `meters:` and `plans:` repeats.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

# What a Redis call can raise when Redis is down, slow or failing: every package catches exactly these.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)


class ConfigurationError(ValueError):
    """A bad `meters:` or `plans:` entry; `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# The design note calls it this; one class, two names, so both spellings keep working.
MeterConfigError = ConfigurationError


def kind_of(value: Any) -> str:
    """A short description of a config value for messages ("got a list")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
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
        raise ConfigurationError(key, f"expected a mapping, got {kind_of(value)}")
    allowed = set(allowed)
    for name in value:
        if name not in allowed:
            raise ConfigurationError(f"{key}.{name}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value

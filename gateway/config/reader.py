"""Typed reads of one mapping of the raw config; each problem raises ConfigError naming the dotted key."""

from __future__ import annotations

from typing import Any

from metering.errors import ConfigError, kind_of


class Section:
    """Reads one mapping of the raw config, tracking the dotted key path for error messages."""

    def __init__(self, raw: Any, path: str, allowed: set[str]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path, f"expected a mapping, got {kind_of(raw)}")
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        self.raw = raw
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def string(self, name: str, default: str | None, *, nullable: bool = False) -> str | None:
        value = self.raw.get(name, default)
        if value is None:
            if nullable or (default is None and name not in self.raw):
                return None
            raise ConfigError(self.key(name), "must not be null")
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), f"expected a non-empty string, got {kind_of(value)}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0, maximum: float | None = None,
               exclusive_min: bool = False) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(self.key(name), f"expected a number, got {kind_of(value)}")
        if value < minimum or (exclusive_min and value == minimum):
            op = ">" if exclusive_min else ">="
            raise ConfigError(self.key(name), f"must be {op} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.key(name), f"must be <= {maximum}, got {value}")
        return float(value)

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"expected an integer, got {kind_of(value)}")
        if value < minimum:
            raise ConfigError(self.key(name), f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.key(name), f"must be <= {maximum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"expected true or false, got {kind_of(value)}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw.get(name, default)
        if value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def string_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw.get(name, list(default))
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"expected a list of strings, got {kind_of(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.key(name)}[{i}]", f"expected a non-empty string, got {kind_of(item)}")
        return tuple(value)

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(self.key(name), f"expected a mapping, got {kind_of(value)}")
        return value

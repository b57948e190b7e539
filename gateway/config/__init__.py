"""Configuration: the typed Settings (`settings`), read from YAML and the environment (`parse`), with the
metering policy built once (`policy`), and shown with secrets masked (`effective`)."""

from gateway.config.effective import effective_config
from gateway.config.parse import load_settings, parse_host_port, parse_settings
from gateway.config.settings import SECRET_ENV, HostPort, Policy, Settings
from metering.errors import ConfigError

__all__ = ["SECRET_ENV", "ConfigError", "HostPort", "Policy", "Settings", "effective_config", "load_settings",
           "parse_host_port", "parse_settings"]

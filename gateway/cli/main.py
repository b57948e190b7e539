"""The `cosmos-gateway` command (PRODUCT.md §1)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Literal

from gateway.config import ConfigError, HostPort, Settings, effective_config, load_settings, parse_host_port

EXIT_CONFIG = 2
EXIT_DATABASE = 1  # `db upgrade`: the database is unreachable, or at a schema newer than this code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosmos-gateway",
                                     description="CosmosBuilder metering and quota gateway")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="FILE", help="YAML config (default: $GATEWAY_CONFIG)")
        return sub

    serve = command("serve", "run the proxy and admin listeners")
    serve.add_argument("--workers", type=_workers, default=None, metavar="N",
                       help="worker processes sharing the ports, or auto: one per CPU core "
                            "(default: server.workers)")

    database = command("db", "SQL store maintenance")
    database.add_argument("action", choices=["upgrade"], help="upgrade: apply the Alembic migrations")

    command("check-config", "validate the config and print it with secrets masked")

    sync = command("sync", "run the billing sync worker (Redis buckets -> ledger -> Stripe Billing Meters)")
    sync.add_argument("--once", action="store_true",
                      help="one full pass; exit 0 when every closed bucket is sent or parked")
    sync.add_argument("--metrics-listen", type=_host_port, default=None, metavar="HOST:PORT",
                      help="serve this worker's /metrics and /healthz there")

    rec = command("reconcile", "compare what the ledger sent with Stripe's meter event summaries")
    rec.add_argument("--period", default=None, metavar="YYYY-MM", help="calendar month, UTC (default: this one)")

    command("demo", "everything on loopback for a first look, with sample traffic that runs into a quota")

    token = command("token", "mint a development JWT with the HS256 secret")
    token.add_argument("--tenant", required=True)
    token.add_argument("--plan", default=None)
    token.add_argument("--ttl", type=_positive_int, default=3600, metavar="SECONDS")
    token.add_argument("--scope", default=None)
    token.add_argument("--subject", default=None)
    return parser


def _host_port(text: str) -> HostPort:
    try:
        return parse_host_port(text, "--metrics-listen")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int | Literal["auto"]:
    if text == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Alembic 1.18+ logs a "setup plugin" line per built-in plugin on import: noise in every command's output.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    env = dict(os.environ)
    if args.command == "demo":
        # The demo signs its own tokens; it needs no secret from the operator.
        env.setdefault("GATEWAY_JWT_HS256_SECRET", secrets.token_urlsafe(32))
    try:
        settings = load_settings(args.config, env)
    except ConfigError as exc:
        print(f"cosmos-gateway: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    handler = {"serve": _serve, "db": _db, "check-config": _check_config, "token": _token, "sync": _sync,
               "reconcile": _reconcile, "demo": _demo}[args.command]
    return handler(settings, args)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.cli.devservices import DevServiceError, resolved
    from gateway.server import serve
    from metering.migrate import MigrationError

    workers = settings.server.workers if args.workers is None else args.workers
    try:
        # Development services (`make run`) are started here, so the server only ever sees a complete config.
        with resolved(settings) as complete:
            return serve(complete, workers)
    except (DevServiceError, OSError, MigrationError) as exc:
        print(f"cosmos-gateway: cannot start: {exc}", file=sys.stderr)
        return 1


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from metering.migrate import MigrationError, upgrade

    try:
        upgrade(settings.database.url)
    except MigrationError as exc:  # unreachable, or migrated by a newer gateway: nothing was changed
        print(f"cosmos-gateway: db upgrade: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    print("database is at the latest schema revision")
    return 0


def _sync(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.cli.billing import run_sync

    return run_sync(settings, once=args.once, metrics_listen=args.metrics_listen)


def _reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.cli.billing import run_reconcile

    return run_reconcile(settings, args.period)


def _demo(settings: Settings, _: argparse.Namespace) -> int:
    from gateway.cli.demo import run_demo

    return run_demo(settings)


def _check_config(settings: Settings, _: argparse.Namespace) -> int:
    import yaml

    source = f" from {settings.source}" if settings.source else ""
    print(f"# effective configuration{source} (secrets masked)")
    print(yaml.safe_dump(json.loads(json.dumps(effective_config(settings))), sort_keys=False), end="")
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.auth.mint import mint_token

    secret = settings.auth.hs256_secret
    if secret is None or "HS256" not in settings.auth.algorithms:
        print("cosmos-gateway: token: no HS256 secret configured (set GATEWAY_JWT_HS256_SECRET and allow "
              "HS256 in auth.algorithms); tokens for public-key setups come from your identity provider",
              file=sys.stderr)
        return EXIT_CONFIG
    print(mint_token(
        secret, tenant=args.tenant, tenant_claim=settings.auth.tenant_claim, plan=args.plan, ttl=args.ttl,
        scope=args.scope, issuer=settings.auth.issuer, audience=settings.auth.audience, subject=args.subject,
        plan_claim=settings.auth.plan_claim or "plan",
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rotating secrets without refusing anything that is valid (issue 14 §5), through real gateway processes.

Each rotation is the operator's runbook of docs/operations.md, "Rotating secrets", step by step: a secret
comes from the environment, so a step is a (rolling) restart with the new environment, over the same SQLite
file and Redis; JWKS keys are the exception: the gateway follows its IdP's key set without a restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import stripe

from gateway.cli.devservices import RedisProcess
from tests.gateway.jwt_helpers import JwksServer, rsa_pair
from tests.support import GatewayProcess, Upstream, eventually, is_, running_gateway

OLD_WEBHOOK_SECRET = "whsec_old_0123456789abcdefABCDEF"
NEW_WEBHOOK_SECRET = "whsec_new_fedcba9876543210FEDCBA"
OLD_ADMIN_TOKEN = "old-admin-token-0123456789abcdef"
NEW_ADMIN_TOKEN = "new-admin-token-fedcba9876543210"
WEBHOOK = "/_gateway/webhooks/stripe"

_event_ids = iter(range(1, 1_000_000))


def subscription_event(tenant: str) -> str:
    number = next(_event_ids)
    return json.dumps({
        "id": f"evt_rotation_{number}", "object": "event", "type": "customer.subscription.created",
        "created": int(time.time()) - 5,
        "data": {"object": {"id": f"sub_{tenant}", "object": "subscription", "status": "active",
                            "customer": f"cus_{tenant}", "metadata": {"tenant_id": tenant},
                            "items": {"data": [{"price": {"lookup_key": "professional_monthly"}}]}}}})


def stripe_signature(body: str, *secrets: str) -> str:
    """The Stripe-Signature header as Stripe sends it: one `v1` per secret of the endpoint (two during a roll)."""
    timestamp = int(time.time())
    signatures = [stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)
                  .split(",", 1)[1] for secret in secrets]
    return ",".join([f"t={timestamp}", *signatures])


async def deliver(http: aiohttp.ClientSession, gateway: GatewayProcess, tenant: str, *secrets: str) -> int:
    body = subscription_event(tenant)
    async with http.post(f"http://127.0.0.1:{gateway.proxy_port}{WEBHOOK}", data=body,
                         headers={"Stripe-Signature": stripe_signature(body, *secrets),
                                  "Content-Type": "application/json"}) as response:
        await response.read()
        return response.status


async def admin_status(http: aiohttp.ClientSession, gateway: GatewayProcess, token: str) -> int:
    async with http.get(f"http://127.0.0.1:{gateway.admin_port}/admin/plans",
                        headers={"Authorization": f"Bearer {token}"}) as response:
        await response.read()
        return response.status


async def tenant_plan(http: aiohttp.ClientSession, gateway: GatewayProcess, tenant: str, token: str) -> Any:
    async with http.get(f"http://127.0.0.1:{gateway.admin_port}/admin/tenants/{tenant}",
                        headers={"Authorization": f"Bearer {token}"}) as response:
        return (await response.json()).get("plan") if response.status == 200 else response.status


async def test_stripe_webhook_secret_roll_refuses_no_delivery_stripe_signs(
        upstream: Upstream, redis_server: RedisProcess, tmp_path: Path) -> None:
    """Stripe rolls the endpoint's secret: from then on it signs every delivery with the new and the old secret
    until the old one expires, then with the new one only. The operator deploys STRIPE_WEBHOOK_SECRET="new,old",
    and later "new": every delivery Stripe sends on the way is accepted, and a stranger's never."""
    def gateway(secrets: str) -> Any:
        return running_gateway(upstream.url, redis_server.url, tmp_path, env={"STRIPE_WEBHOOK_SECRET": secrets},
                               admin={"tokens": f"ops:{NEW_ADMIN_TOKEN}"})

    stranger = "whsec_stranger_00000000000000000"
    async with aiohttp.ClientSession() as http:
        with gateway(OLD_WEBHOOK_SECRET) as before:
            assert await deliver(http, before, "t-before", OLD_WEBHOOK_SECRET) == 200
            # Stripe rolled: both signatures, the gateway still knows only the old secret.
            assert await deliver(http, before, "t-rolled", NEW_WEBHOOK_SECRET, OLD_WEBHOOK_SECRET) == 200
            assert await deliver(http, before, "t-early", NEW_WEBHOOK_SECRET) == 400
        with gateway(f"{NEW_WEBHOOK_SECRET}, {OLD_WEBHOOK_SECRET}") as during:
            assert await deliver(http, during, "t-both", NEW_WEBHOOK_SECRET, OLD_WEBHOOK_SECRET) == 200
            assert await deliver(http, during, "t-old-only", OLD_WEBHOOK_SECRET) == 200  # sent before the roll
            assert await deliver(http, during, "t-new-only", NEW_WEBHOOK_SECRET) == 200  # the old one expired
            assert await deliver(http, during, "t-stranger", stranger) == 400
            assert await deliver(http, during, "t-stranger-2", stranger, "whsec_other_1111111111111111") == 400
        with gateway(NEW_WEBHOOK_SECRET) as after:
            assert await deliver(http, after, "t-after", NEW_WEBHOOK_SECRET) == 200
            assert await deliver(http, after, "t-retired", OLD_WEBHOOK_SECRET) == 400
            for tenant in ("t-before", "t-rolled", "t-both", "t-old-only", "t-new-only", "t-after"):
                assert await tenant_plan(http, after, tenant, NEW_ADMIN_TOKEN) == "professional", tenant
            for tenant in ("t-early", "t-stranger", "t-stranger-2", "t-retired"):
                assert await tenant_plan(http, after, tenant, NEW_ADMIN_TOKEN) == 404, tenant


async def test_admin_token_rotation_keeps_both_tokens_valid_during_the_switch(
        upstream: Upstream, redis_server: RedisProcess, tmp_path: Path) -> None:
    """GATEWAY_ADMIN_TOKENS="ci-old:…,ci-new:…" while clients move to the new token; then "ci-new:…" only.
    The audit names which token made each change, so the operator sees when the old one is no longer used."""
    def gateway(tokens: str) -> Any:
        return running_gateway(upstream.url, redis_server.url, tmp_path, env={"GATEWAY_ADMIN_TOKENS": tokens})

    async with aiohttp.ClientSession() as http:
        with gateway(f"ci-old:{OLD_ADMIN_TOKEN}") as before:
            assert await admin_status(http, before, OLD_ADMIN_TOKEN) == 200
            assert await admin_status(http, before, NEW_ADMIN_TOKEN) == 401
        with gateway(f"ci-old:{OLD_ADMIN_TOKEN},ci-new:{NEW_ADMIN_TOKEN}") as during:
            for token, tenant in ((OLD_ADMIN_TOKEN, "by-old"), (NEW_ADMIN_TOKEN, "by-new")):
                url = f"http://127.0.0.1:{during.admin_port}/admin/tenants/{tenant}"
                async with http.put(url, json={"plan": "enterprise"},
                                    headers={"Authorization": f"Bearer {token}"}) as response:
                    assert response.status == 201, await response.text()
            async with http.get(f"http://127.0.0.1:{during.admin_port}/admin/audit",
                                headers={"Authorization": f"Bearer {NEW_ADMIN_TOKEN}"}) as response:
                entries = (await response.json())["entries"]
            assert {(e["tenant"], e["actor"]) for e in entries} >= {("by-old", "token:ci-old"),
                                                                       ("by-new", "token:ci-new")}
        with gateway(f"ci-new:{NEW_ADMIN_TOKEN}") as after:
            assert await admin_status(http, after, NEW_ADMIN_TOKEN) == 200
            assert await admin_status(http, after, OLD_ADMIN_TOKEN) == 401


async def test_jwks_key_rotation_needs_no_restart(upstream: Upstream, redis_server: RedisProcess,
                                                  tmp_path: Path) -> None:
    """The IdP publishes its next key next to the current one, signs with it, then retires the old key: one gateway
    process, never restarted, accepts every token signed by a published key and refuses the retired key's."""
    current, following = rsa_pair("key-2026-11"), rsa_pair("key-2026-12")
    jwks = JwksServer(keys=[current.jwk()])
    await jwks.start()
    auth = {"algorithms": ["RS256"], "hs256_secret": None, "jwks_url": jwks.url,
            "jwks_cache_seconds": 1, "jwks_min_refetch_seconds": 1}
    try:
        async with aiohttp.ClientSession() as http:
            with running_gateway(upstream.url, redis_server.url, tmp_path, auth=auth) as gateway:
                async def status(key: Any) -> int:
                    async with http.get(f"http://127.0.0.1:{gateway.proxy_port}/api/chains",
                                        headers={"Authorization": f"Bearer {key.sign()}"}) as response:
                        await response.read()
                        return response.status

                assert await status(current) == 200
                jwks.keys = [current.jwk(), following.jwk()]  # published ahead of use
                await eventually(lambda: is_(status(following), 200), "the next key to be accepted")
                assert await status(current) == 200  # tokens of the current key still in circulation
                jwks.keys = [following.jwk()]  # retired once its tokens expired
                await eventually(lambda: is_(status(current), 401), "the retired key to be refused")
                assert await status(following) == 200
                assert gateway.process is not None and gateway.process.poll() is None  # the same process all along
    finally:
        await jwks.close()


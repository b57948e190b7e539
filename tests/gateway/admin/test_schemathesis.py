"""Schemathesis against the admin API's own OpenAPI document, on a real `cosmos-gateway serve` (PRODUCT.md §4, §6).

Every operation in `GET /admin/openapi.json` gets requests generated from the document: valid ones
(positive), ones that break it (negative), and valid ones without credentials. No answer may be a 5xx,
and every error must be problem+json. Bounded and seeded: `FUZZ_EXAMPLES` (as `make fuzz` sets it)
raises the number of examples per operation and mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from gateway.cli.devservices import RedisProcess
from tests.fuzz.profile import EXAMPLES
from tests.support import GatewayProcess, config_dict

ADMIN_TOKEN = "ops-schemathesis-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROBLEM = "application/problem+json"
PER_MODE = min(EXAMPLES, 1000) if EXAMPLES else 25


@pytest.fixture(scope="module")
def admin_gateway(redis_process: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir: Path = tmp_path_factory.mktemp("schemathesis")
    # The upstream is never dialled: the admin listener answers everything itself.
    config = config_dict("http://127.0.0.1:9", redis_process.url, f"sqlite+aiosqlite:///{workdir / 'gateway.db'}")
    process = GatewayProcess(config, workdir, env={"GATEWAY_ADMIN_TOKENS": f"ops:{ADMIN_TOKEN}"})
    try:
        yield process.start()
    finally:
        process.stop()


def _problems(response: schemathesis.Response, label: str) -> list[str]:
    """What is wrong with one answer: a 5xx, or an error that is not problem+json."""
    found = []
    content_type = (response.headers.get("content-type") or [""])[0]  # wire form: lower-cased name -> values
    if response.status_code >= 500:
        found.append(f"{label}: {response.status_code} {response.text[:300]}")
    elif response.status_code >= 400 and not content_type.startswith(PROBLEM):
        found.append(f"{label}: {response.status_code} is not problem+json: {content_type!r}")
    return found


def _exercise(operation: schemathesis.APIOperation, mode: GenerationMode, headers: dict[str, str], base_url: str,
              session: requests.Session) -> list[str]:
    """Run one operation's generated cases in one mode; the distinct problems found."""
    seen: list[str] = []
    label_mode = mode.value + ("" if headers else ", no credentials")

    @settings(max_examples=PER_MODE, derandomize=not EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError):
            return  # requests refuses to send it; nothing reached the gateway
        label = f"{case.method} {case.formatted_path} ({label_mode})"
        seen.extend(_problems(response, label))
        if not headers and case.formatted_path != "/admin/openapi.json":
            seen.extend([] if response.status_code == 401 else [f"{label}: {response.status_code}, not 401"])

    run()
    return list(dict.fromkeys(seen))


def test_admin_api_never_answers_5xx(admin_gateway: GatewayProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{admin_gateway.admin_url}/admin/openapi.json", headers=AUTH, timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    failures: list[str] = []
    with requests.Session() as session:
        for operation in operations:
            for mode, headers in ((GenerationMode.POSITIVE, AUTH), (GenerationMode.NEGATIVE, AUTH),
                                  (GenerationMode.POSITIVE, {})):
                # The tenant's own endpoints in the document are the proxy listener's (their `servers`).
                base = admin_gateway.url if operation.path.startswith("/_gateway/") else admin_gateway.admin_url
                failures += _exercise(operation, mode, headers, base, session)
    assert admin_gateway.process is not None and admin_gateway.process.poll() is None, "the gateway died"
    assert not failures, "\n".join(failures)

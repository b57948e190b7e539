"""One real `cosmos-gateway serve` child process for the fuzz suite, a recording upstream, and the
invariants every fuzzed exchange is held to (PRODUCT.md §3 "Hostile input", §4):

- the gateway never answers 5xx (the upstream here never fails, and Redis is up), and stays alive;
- every error the gateway answers itself is application/problem+json with an X-Request-Id;
- what reaches the upstream carries the gateway's own forwarding, request id and identity headers
  only, once each, in their own spelling: no client-sent `X-Cosmos-*`, forwarding, hop-by-hop or
  framing header in any spelling (`_` for `-` included), and at most one framing header;
- a request without identity reached the upstream only on a public path, however it was spelled;
- a body forwarded is the body sent, byte for byte;
- a complete request is answered, an incomplete one is not left hanging, and afterwards the gateway
  serves a plain request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote

import pytest
from hypothesis import event, note

from gateway.cli.devservices import RedisProcess
from tests.fuzz.strategies import Probe
from tests.rawhttp import Exchange, Received, RecordingUpstream, exchange
from tests.support import GatewayProcess, running_gateway

HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer",
              "proxy-authenticate", "proxy-authorization"}
IDENTITY = {"x-cosmos-tenant": "X-Cosmos-Tenant", "x-cosmos-plan": "X-Cosmos-Plan",
            "x-cosmos-subject": "X-Cosmos-Subject"}
TENANT_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
FORWARDED_RE = re.compile(r'for=127\.0\.0\.1;proto=http(;host=([!#$%&\'*+.^_`|~0-9A-Za-z-]+|"([^"\\]|\\.)*"))?',
                          re.DOTALL)
EXCHANGE_TIMEOUT = 6.0  # > listen.body_timeout and header_timeout below: the gateway gives up first


@dataclass
class FuzzTarget:
    process: GatewayProcess
    upstream: RecordingUpstream

    @property
    def port(self) -> int:
        return self.process.proxy_port

    def check(self, probe: Probe) -> tuple[Exchange, list[Received]]:
        """Send one probe and hold the exchange to every invariant; then a plain request must work."""
        note(f"{probe.note}: {probe.raw[:3000]!r}")
        self.upstream.take()
        result = exchange(self.port, probe.raw, timeout=EXCHANGE_TIMEOUT, head_request=probe.head_request,
                          wait_close=EXCHANGE_TIMEOUT if probe.pipelined else 0.0)
        received = self.upstream.take()
        answer = result.response
        event("no answer" if answer is None else f"{answer.status} {'upstream' if answer.from_upstream else 'own'}")
        assert self.process.process is not None and self.process.process.poll() is None, "the gateway died"
        check_answer(probe, result, received)
        for request in received:
            check_forwarded(request, injectable=probe.injectable)
        self.still_serves()
        return result, received

    def still_serves(self) -> None:
        after = exchange(self.port, b"GET /status/after HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
                         timeout=EXCHANGE_TIMEOUT)
        assert after.response is not None and after.response.status == 200, ("no longer serving", after.raw[:300])
        assert after.response.from_upstream
        for request in self.upstream.take():
            check_forwarded(request)


def check_answer(probe: Probe, result: Exchange, received: list[Received]) -> None:
    response = result.response
    if response is None:
        assert not probe.complete, ("a complete request got no answer", result.raw[:300])
        assert result.closed, "an incomplete request was left hanging past every timeout"
        return
    # 505 is the one 5xx of the gateway's own that a client can cause: an HTTP/2+ request line.
    version_refused = response.status == 505 and not response.from_upstream and response.is_problem
    assert response.status < 500 or version_refused, (response.status, response.body[:300])
    if not response.from_upstream:
        if response.status >= 400:
            assert response.is_problem, ("not problem+json", response.status, response.headers, response.body[:200])
            assert response.header("x-request-id"), "a problem without X-Request-Id"
        assert b"Traceback" not in response.body
    elif probe.body is not None and response.status == 200:
        assert [r.body for r in received] == [probe.body], "the body was not forwarded byte-exact"


def public_path(raw_path: str) -> bool:
    """Whether every reading of the path (raw, percent-decoded, backslashes as `/`, `;params` dropped,
    dot-segments resolved) is one of the test config's public paths (`/health`, `/status/**`)."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    decoded = unquote(path, errors="replace")
    for reading in (path, decoded, decoded.replace("\\", "/")):
        segments: list[str] = []
        for segment in reading.split("/"):
            segment = segment.split(";", 1)[0]
            if segment in ("", "."):
                continue
            if segment == "..":
                if segments:
                    segments.pop()
                continue
            segments.append(segment)
        canonical = "/" + "/".join(segments)
        if not (canonical == "/health" or canonical == "/status" or canonical.startswith("/status/")):
            return False
    return True


def check_forwarded(request: Received, *, injectable: bool = False) -> None:
    by_name: dict[str, list[tuple[str, str]]] = {}
    for raw_name, raw_value in request.headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        normalized = name.lower().replace("_", "-")
        by_name.setdefault(normalized, []).append((name, value))
        assert injectable or normalized != "x-injected", ("a header was injected", request.headers)
        if "_" in name:
            assert not normalized.startswith(("x-cosmos-", "x-forwarded-")) and normalized not in (
                HOP_BY_HOP | {"forwarded", "content-length", "x-request-id"}), (
                "a client-sent underscore spelling reached the upstream", name, value)
    assert by_name.pop("x-forwarded-for") == [("X-Forwarded-For", "127.0.0.1")]
    assert by_name.pop("x-forwarded-proto") == [("X-Forwarded-Proto", "http")]
    [(name, forwarded)] = by_name.pop("forwarded")
    # One element (the peer is not a trusted proxy), its host a token or one whole quoted-string.
    assert name == "Forwarded" and FORWARDED_RE.fullmatch(forwarded), forwarded
    host = by_name.pop("x-forwarded-host", [])
    assert [n for n, _ in host] in ([], ["X-Forwarded-Host"]), host
    [(name, rid)] = by_name.pop("x-request-id")
    assert name == "X-Request-Id" and REQUEST_ID_RE.fullmatch(rid), rid
    for hop in HOP_BY_HOP - {"transfer-encoding"}:
        assert hop not in by_name, ("a hop-by-hop header reached the upstream", by_name[hop])
    framing = by_name.get("content-length", []) + by_name.get("transfer-encoding", [])
    assert len(framing) <= 1 and all(n in ("Content-Length", "Transfer-Encoding") for n, _ in framing), framing
    identity = {n: by_name.pop(n, []) for n in IDENTITY}
    for normalized, spelled in IDENTITY.items():
        assert [n for n, _ in identity[normalized]] in ([], [spelled]), identity
    cosmos = [n for n in by_name if n.startswith("x-cosmos-")]
    assert not cosmos, ("a client-sent X-Cosmos-* header reached the upstream", cosmos)
    if identity["x-cosmos-tenant"]:
        [(_, tenant)] = identity["x-cosmos-tenant"]
        assert TENANT_RE.fullmatch(tenant), tenant
    else:
        assert not identity["x-cosmos-plan"] and not identity["x-cosmos-subject"], identity
        assert public_path(request.raw_path), ("reached the upstream without a token", request.raw_path)


@pytest.fixture(scope="package")
def fuzz_target(redis_process: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    upstream = RecordingUpstream()
    upstream.start()
    try:
        with running_gateway(
            upstream.url, redis_process.url, tmp_path_factory.mktemp("fuzz"),
            listen={"header_timeout": 2, "body_timeout": 1},
            # The fuzzer's many valid tokens must not run into the rate limit, or little would be forwarded.
            plans={"starter": {"rate": {"per_second": 1_000_000, "burst": 1_000_000}}},
        ) as process:
            yield FuzzTarget(process, upstream)
    finally:
        upstream.close()

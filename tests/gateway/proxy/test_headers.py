"""The header rules as pure functions (fast, no servers)."""

from __future__ import annotations

import ipaddress

from gateway.proxy.headers import (
    client_response_headers,
    connection_tokens,
    identity_headers,
    is_trusted,
    request_id,
    upstream_request_headers,
)


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [k.lower() for k, _ in headers]


def test_connection_tokens_are_collected_from_every_connection_header() -> None:
    raw = [(b"Connection", b"keep-alive, X-A"), (b"connection", b" x-b ,"), (b"X-A", b"1")]
    assert connection_tokens(raw) == {b"keep-alive", b"x-a", b"x-b"}


def test_request_id_kept_or_generated() -> None:
    assert request_id([(b"X-Request-Id", b"a.b_c-1")]) == "a.b_c-1"
    for bad in (b"", b"a b", b"x" * 129, b"\xff"):
        generated = request_id([(b"x-request-id", bad)])
        assert generated != bad.decode("latin-1") and len(generated) == 24
    assert request_id([]) != request_id([])


def test_upstream_headers_drop_hop_by_hop_framing_identity_and_set_forwarding() -> None:
    raw = [
        (b"Host", b"api.example"), (b"Connection", b"close, X-Private"), (b"X-Private", b"p"),
        (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5"), (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"), (b"X-Cosmos-Tenant", b"evil"), (b"x-cosmos-anything", b"1"),
        (b"X-Forwarded-For", b"1.2.3.4"), (b"Forwarded", b"for=1.2.3.4"), (b"Accept", b"*/*"),
        (b"Set-Cookie", b"no"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2"),
    ]
    out = upstream_request_headers(raw, peer="10.0.0.9", trusted_peer=False, scheme="http", request_id="rid",
                                   identity=identity_headers("acme", "starter", "sub-1"))
    lowered = names(out)
    for gone in ("connection", "x-private", "transfer-encoding", "content-length", "te", "upgrade",
                 "x-cosmos-anything"):
        assert gone not in lowered
    assert [v for k, v in out if k == "Cookie"] == ["a=1", "b=2"]
    assert dict(out)["X-Forwarded-For"] == "10.0.0.9"
    assert dict(out)["Forwarded"] == "for=10.0.0.9;proto=http;host=api.example"
    assert dict(out)["X-Forwarded-Host"] == "api.example"
    assert [v for k, v in out if k.lower() == "x-cosmos-tenant"] == ["acme"]
    assert dict(out)["X-Request-Id"] == "rid"


def test_trusted_peer_keeps_client_chain_in_front() -> None:
    raw = [(b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2"), (b"X-Forwarded-Proto", b"https"),
           (b"Forwarded", b'for="[2001:db8::1]"'), (b"X-Forwarded-Host", b"public.example")]
    out = dict(upstream_request_headers(raw, peer="::1", trusted_peer=True, scheme="http", request_id="r"))
    assert out["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2, ::1"
    assert out["Forwarded"] == 'for="[2001:db8::1]", for="[::1]";proto=http'
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "public.example"


def test_is_trusted() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert is_trusted("10.1.2.3", nets) and is_trusted("::1", nets)
    assert not is_trusted("11.0.0.1", nets) and not is_trusted("garbage", nets) and not is_trusted(None, nets)
    assert not is_trusted("10.1.2.3", ())


def test_client_response_headers() -> None:
    raw = [("Set-Cookie", "a=1"), ("Connection", "X-Secret"), ("X-Secret", "s"), ("Keep-Alive", "timeout=1"),
           ("Content-Length", "10"), ("Set-Cookie", "b=2"), ("X-Cosmos-Usage", "chains=1"),
           ("x-cosmos-usage", "storage_gb=2"), ("X-Request-Id", "upstream-made")]
    out, usage = client_response_headers(raw, "rid")
    assert out == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Request-Id", "rid")]
    assert usage == "chains=1, storage_gb=2"


def test_headers_named_by_a_later_connection_header_are_dropped_too() -> None:
    raw = [(b"X-Early", b"1"), (b"Host", b"h"), (b"X-Request-Id", b"client-made"), (b"Connection", b"x-early"),
           (b"Accept", b"*/*")]
    out = upstream_request_headers(raw, peer="10.0.0.9", trusted_peer=False, scheme="http", request_id="rid")
    assert "x-early" not in names(out) and "connection" not in names(out)
    assert [v for k, v in out if k.lower() == "x-request-id"] == ["rid"]
    assert dict(out)["Accept"] == "*/*"
    # A Connection header naming only what is dropped anyway changes nothing.
    plain = upstream_request_headers([(b"Host", b"h"), (b"Connection", b"keep-alive")], peer="10.0.0.9",
                                     trusted_peer=False, scheme="http", request_id="rid")
    assert [k for k, _ in plain] == ["Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host",
                                     "Forwarded", "X-Request-Id"]
    response, _ = client_response_headers([("X-Early", "1"), ("Connection", "keep-alive, X-Early"), ("A", "b")], "r")
    assert response == [("A", "b"), ("X-Request-Id", "r")]


def test_underscore_spellings_of_identity_forwarding_hop_by_hop_and_framing_are_dropped() -> None:
    # WSGI/CGI servers read `_` as `-`: each of these would be HTTP_X_COSMOS_TENANT & co. upstream.
    raw = [
        (b"Host", b"h"), (b"X_Cosmos_Tenant", b"evil"), (b"x_cosmos_plan", b"evil"), (b"X-Cosmos_Subject", b"evil"),
        (b"X_Forwarded_For", b"6.6.6.6"), (b"x_forwarded_host", b"evil"), (b"X_Forwarded_Proto", b"https"),
        (b"X_Request_Id", b"spoof"), (b"Content_Length", b"5"), (b"Transfer_Encoding", b"chunked"),
        (b"Keep_Alive", b"1"), (b"Proxy_Authorization", b"x"), (b"Connection", b"x_private"), (b"X-Private", b"p"),
        (b"X_Private", b"p"), (b"X_Custom", b"kept"),
    ]
    for trusted in (False, True):
        out = upstream_request_headers(raw, peer="10.0.0.9", trusted_peer=trusted, scheme="http", request_id="rid",
                                       identity=identity_headers("acme", "starter", "sub-1"))
        assert out == [
            ("Host", "h"), ("X_Custom", "kept"), ("X-Forwarded-For", "10.0.0.9"), ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "h"), ("Forwarded", "for=10.0.0.9;proto=http;host=h"), ("X-Request-Id", "rid"),
            ("X-Cosmos-Tenant", "acme"), ("X-Cosmos-Plan", "starter"), ("X-Cosmos-Subject", "sub-1"),
        ]
    assert connection_tokens([(b"Connection", b"X_A, x-b")]) == {b"x-a", b"x-b"}


def test_forwarded_host_is_quoted_safely_and_the_cache_stays_small() -> None:
    from gateway.proxy import headers

    def element(host: bytes) -> str:
        out = upstream_request_headers([(b"Host", host)], peer="10.0.0.9", trusted_peer=False, scheme="http",
                                       request_id="r")
        return dict(out)["Forwarded"]

    assert element(b"api.example") == "for=10.0.0.9;proto=http;host=api.example"
    assert element(b"api.example:8443") == 'for=10.0.0.9;proto=http;host="api.example:8443"'
    assert element(b'a"b\\c') == 'for=10.0.0.9;proto=http;host="a\\"b\\\\c"'
    assert element(b"caf\xe9\tx") == 'for=10.0.0.9;proto=http;host="caf\xe9\tx"'
    # A quoted-string ends at the first unescaped `"`: nothing after the host can be read as a new parameter.
    assert element(b'x";for=1.2.3.4') == 'for=10.0.0.9;proto=http;host="x\\";for=1.2.3.4"'
    headers._cached_forwarded_element.cache_clear()
    for i in range(50):
        element(b"h" * 5000 + str(i).encode())  # long client-chosen hosts are never kept
    assert headers._cached_forwarded_element.cache_info().currsize == 0
    element(b"short.example")
    assert headers._cached_forwarded_element.cache_info().currsize == 1
    assert headers._cached_forwarded_element.cache_info().maxsize == 4096


def test_request_id_with_a_trailing_newline_is_not_sane() -> None:
    assert request_id([(b"X-Request-Id", b"abc\n")]) != "abc\n"


def test_the_header_name_cache_is_bounded_and_answers_as_the_rules_do() -> None:
    """What each request header name is (passed, dropped, forwarding, Host) is remembered per name as sent:
    bounded in entries and name length, evicting one at a time, and the same answer cached or not."""
    from gateway.proxy import headers

    raw = [(b"Host", b"h"), (b"X_Forwarded_For", b"6.6.6.6"), (b"X-Cosmos-Tenant", b"evil"), (b"Accept", b"*/*"),
           (b"Connection", b"x-private"), (b"X-Private", b"p"), (b"Forwarded", b"for=1.1.1.1")]

    def forwarded(trusted: bool) -> list[tuple[str, str]]:
        return upstream_request_headers(raw, peer="10.0.0.9", trusted_peer=trusted, scheme="http", request_id="r")

    headers._NAME_KINDS.clear()
    cold = forwarded(True), forwarded(False)
    assert len(headers._NAME_KINDS) == len(raw)
    assert (forwarded(True), forwarded(False)) == cold  # from the cache now
    assert [name for name, _ in cold[1]] == ["Host", "Accept", "X-Forwarded-For", "X-Forwarded-Proto",
                                             "X-Forwarded-Host", "Forwarded", "X-Request-Id"]
    assert dict(cold[0])["Forwarded"] == "for=1.1.1.1, for=10.0.0.9;proto=http;host=h"
    # A flood of names: the oldest go first, one at a time; long names are never kept.
    for i in range(headers._NAME_KINDS_MAX + 500):
        upstream_request_headers([(b"X-Flood-%d" % i, b"v"), (b"Y" * 65 + b"%d" % i, b"v")], peer="10.0.0.9",
                                 trusted_peer=False, scheme="http", request_id="r")
    assert len(headers._NAME_KINDS) == headers._NAME_KINDS_MAX
    assert b"X-Flood-0" not in headers._NAME_KINDS and b"X-Flood-%d" % (headers._NAME_KINDS_MAX + 499) in \
        headers._NAME_KINDS
    assert all(len(name) <= headers._NAME_KINDS_LENGTH for name in headers._NAME_KINDS)
    assert (forwarded(True), forwarded(False)) == cold  # evicted or not, the same answer

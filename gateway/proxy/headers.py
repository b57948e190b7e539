"""Header rules of the proxy (PRODUCT.md §3), as pure functions over raw header lists.

Raw headers are `(name, value)` pairs of bytes in the order the peer sent them, so repeated
headers (two `Set-Cookie`) survive. Names are compared lower-cased, and on requests with `_` read
as `-`: WSGI and CGI servers map both to `HTTP_X_COSMOS_TENANT`, so `X_Cosmos_Tenant` is an identity
header to an upstream app as much as `X-Cosmos-Tenant` is.

Where headers are touched, in the order a request meets them (change one, check the others):

    gateway/proxy/headers.py   (here) which headers pass each way: `upstream_request_headers` (hop-by-hop,
                               framing and client identity dropped; forwarding, X-Request-Id and the
                               token's `identity_headers` set), `client_response_headers` (the same drops
                               back, X-Cosmos-Usage taken out for the limiter, X-Request-Id set)
    gateway/proxy/upstream.py  `UpstreamPool._head`: the request head as bytes (Host added if absent,
                               the framing line appended, CR/LF/NUL refused)
    quota/compile.py           the RateLimit / RateLimit-Policy texts, built once per compiled check;
                               `quota.limiter.Admission` fills in the values per response
    gateway/proxy/handler.py   `_respond`: the choice of writer, and where the RateLimit headers join
                               (pre-formatted `head_lines` for a small response, `headers` otherwise)
    gateway/proxy/response.py  `serialize`: a small response's head in one buffer (Content-Length,
                               Content-Type, Date and Connection added as aiohttp would)
    gateway/proxy/refusals.py  a refusal's Retry-After and RateLimit headers on the problem+json answer
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import re
from collections.abc import Iterable, Sequence

RawHeaders = Sequence[tuple[bytes, bytes]]
Headers = list[tuple[str, str]]

# RFC 9110 §7.6.1 plus the names older intermediaries treat as hop-by-hop.
HOP_BY_HOP = frozenset({
    b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade",
    b"trailer", b"proxy-authenticate", b"proxy-authorization",
})
# The proxy sets these itself; whatever the client sent is replaced or merged.
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
IDENTITY_PREFIX = b"x-cosmos-"
REQUEST_ID = b"x-request-id"
USAGE_REPORT = b"x-cosmos-usage"

# Removed from requests before forwarding (the request id is the gateway's own, set separately).
_REQUEST_DROP = HOP_BY_HOP | FRAMING | {REQUEST_ID}

_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Hosts up to this long (a DNS name and a port) have their Forwarded element cached; longer ones
# are built each time, so the cache stays bounded in bytes as well as in entries.
_CACHED_HOST_LENGTH = 261


def connection_tokens(headers: RawHeaders) -> frozenset[bytes]:
    """Header names a `Connection` header declares hop-by-hop (lower-cased, `_` read as `-`)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower().replace(b"_", b"-") for t in value.split(b",") if t.strip())
    return frozenset(names)


def request_id(headers: RawHeaders) -> str:
    """The client's X-Request-Id when sane, else a fresh one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID:
            if _REQUEST_ID_RE.fullmatch(value):
                return value.decode("ascii")
            break
    return _next_request_id()


# A random prefix per process and a counter: unique across processes and instances like a random id,
# without a getrandom() syscall on every request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))


def _next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


def is_trusted(peer: str | None, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if not trusted or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def _forwarded_element(peer: str, scheme: str, host: str | None) -> str:
    """This hop's `Forwarded` element (RFC 7239)."""
    if host is not None and len(host) > _CACHED_HOST_LENGTH:
        return _build_forwarded_element(peer, scheme, host)
    return _cached_forwarded_element(peer, scheme, host)


def _build_forwarded_element(peer: str, scheme: str, host: str | None) -> str:
    node = f"for={_forwarded_node(peer)};proto={scheme}"
    if host and _TOKEN_RE.fullmatch(host.encode("latin-1")):
        node += f";host={host}"
    elif host:
        # A quoted-string (RFC 9110 §5.6.4): `\` and `"` escaped; the parser has refused CTLs already,
        # and every other byte (obs-text included) may stand in one as it is.
        node += ';host="' + host.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return node


# The same few (peer, scheme, host) values recur, so each element is built once; entries are
# bounded in number here and in size by _CACHED_HOST_LENGTH (client-chosen hosts beyond it are not cached).
_cached_forwarded_element = functools.lru_cache(maxsize=4096)(_build_forwarded_element)


def _forwarded_node(peer: str) -> str:
    # RFC 7239 §6: IPv6 addresses are bracketed and the whole value quoted.
    return f'"[{peer}]"' if ":" in peer else peer


def upstream_request_headers(
    raw: RawHeaders,
    *,
    peer: str | None,
    trusted_peer: bool,
    scheme: str,
    request_id: str,
    identity: Iterable[tuple[str, str]] = (),
) -> Headers:
    """The headers to send upstream: hop-by-hop, framing and client identity headers removed,
    forwarding headers set, `X-Request-Id` and the verified identity added."""
    headers = _request_headers(raw, None, peer, trusted_peer, scheme, request_id, identity)
    if headers is None:  # a Connection header names further hop-by-hop headers: drop those too
        headers = _request_headers(raw, connection_tokens(raw), peer, trusted_peer, scheme, request_id, identity)
    assert headers is not None
    return headers


# What a request header name is to the proxy. The rules depend on the name alone, so each name's answer
# is kept (client input: bounded in entries, and only short names): a dict lookup per header instead of
# lowering and testing it against each rule.
_PASS, _HOST, _XFF, _FORWARDED, _XF_PROTO, _XF_HOST, _DROP, _CONNECTION = range(8)
_FORWARDING_KIND = {b"x-forwarded-for": _XFF, b"forwarded": _FORWARDED, b"x-forwarded-proto": _XF_PROTO,
                    b"x-forwarded-host": _XF_HOST}
# name as sent -> (kind, the name as str for passed headers, the name lower-cased with `_` read as `-`)
_NameKind = tuple[int, str, bytes]
_NAME_KINDS: dict[bytes, _NameKind] = {}
_NAME_KINDS_MAX = 1024
_NAME_KINDS_LENGTH = 64


def _name_kind(name: bytes) -> _NameKind:
    lower = name.lower()
    if b"_" in lower:  # the name an upstream WSGI/CGI server would read
        lower = lower.replace(b"_", b"-")
        if lower in FORWARDING:  # never the gateway's own, nor a trusted proxy's: dropped
            return _DROP, "", lower
    if lower in _REQUEST_DROP:
        return (_CONNECTION if lower == b"connection" else _DROP), "", lower
    if lower.startswith(IDENTITY_PREFIX):
        return _DROP, "", lower
    if lower in FORWARDING:
        return _FORWARDING_KIND[lower], "", lower
    return (_HOST if lower == b"host" else _PASS), name.decode("latin-1"), lower


def _remembered_kind(name: bytes) -> _NameKind:
    kind = _name_kind(name)
    if len(name) <= _NAME_KINDS_LENGTH:
        if len(_NAME_KINDS) >= _NAME_KINDS_MAX:
            del _NAME_KINDS[next(iter(_NAME_KINDS))]  # the oldest: one at a time
        _NAME_KINDS[name] = kind
    return kind


def _request_headers(raw: RawHeaders, named: frozenset[bytes] | None, peer: str | None, trusted_peer: bool,
                     scheme: str, request_id: str, identity: Iterable[tuple[str, str]]) -> Headers | None:
    """`upstream_request_headers`, also dropping the headers a Connection header `named`; None (with `named`
    None) if a Connection header names a header not dropped anyway (possibly one already passed), so that
    the caller starts over with those names."""
    out: Headers = []
    xff: list[str] = []
    forwarded: list[str] = []
    client_proto = client_host = host = None
    kinds = _NAME_KINDS
    for name, value in raw:
        kind, text, lower = kinds.get(name) or _remembered_kind(name)
        if kind == _DROP or (named is not None and lower in named):
            continue
        if kind == _PASS:
            out.append((text, value.decode("latin-1")))
        elif kind == _HOST:
            host = value.decode("latin-1")
            out.append((text, host))
        elif kind == _CONNECTION:
            if named is None and not connection_tokens(((name, value),)) <= _REQUEST_DROP:
                return None
        elif trusted_peer:  # a forwarding header: kept in front of ours only from a trusted proxy
            if kind == _XFF:
                xff.append(value.decode("latin-1"))
            elif kind == _FORWARDED:
                forwarded.append(value.decode("latin-1"))
            elif kind == _XF_PROTO:
                client_proto = value.decode("latin-1")
            else:
                client_host = value.decode("latin-1")
    peer = peer or "unknown"
    xff.append(peer)
    proto = client_proto or scheme
    fwd_host = client_host or host
    forwarded.append(_forwarded_element(peer, scheme, host))
    out.append(("X-Forwarded-For", ", ".join(xff)))
    out.append(("X-Forwarded-Proto", proto))
    if fwd_host:
        out.append(("X-Forwarded-Host", fwd_host))
    out.append(("Forwarded", ", ".join(forwarded)))
    out.append(("X-Request-Id", request_id))
    out.extend(identity)
    return out


# Never passed to the client either (the gateway re-frames the body and sets its own request id); as str,
# the way the upstream client delivers names.
_RESPONSE_DROP = frozenset(name.decode() for name in _REQUEST_DROP)
_USAGE_REPORT_STR = USAGE_REPORT.decode()


def client_response_headers(raw: Sequence[tuple[str, str]], request_id: str) -> tuple[Headers, str | None]:
    """The upstream's response headers for the client, and its usage report (if any).

    Hop-by-hop and framing headers are removed (the server re-frames the body)."""
    drop = _RESPONSE_DROP
    out: Headers = []
    usage: str | None = None
    for name, value in raw:
        lower = name.lower()
        if lower == _USAGE_REPORT_STR:
            usage = value if usage is None else f"{usage}, {value}"
            continue
        if lower in drop:
            if lower == "connection":  # it may name further hop-by-hop headers
                named = {t.strip().lower() for t in value.split(",")} - {""}
                if not named <= drop:
                    drop = drop | named
            continue
        out.append((name, value))
    if drop is not _RESPONSE_DROP:  # a Connection header came after headers it names: filter again
        out = [(name, value) for name, value in out if name.lower() not in drop]
    out.append(("X-Request-Id", request_id))
    return out, usage


def identity_headers(tenant: str, plan: str | None, subject: str | None) -> list[tuple[str, str]]:
    """`X-Cosmos-*` headers from a verified token (values were validated by the authenticator)."""
    headers = [("X-Cosmos-Tenant", tenant)]
    if plan:
        headers.append(("X-Cosmos-Plan", plan))
    if subject:
        headers.append(("X-Cosmos-Subject", subject))
    return headers

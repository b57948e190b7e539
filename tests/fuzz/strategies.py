"""Hypothesis strategies for raw HTTP/1.1 requests: request lines, headers, framing, tokens, bodies.

Each strategy yields a `Probe`: the bytes to send, whether the request is complete on the wire (so
an answer is owed), and what the upstream must have received when it was forwarded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.support import AUDIENCE, ISSUER, SECRET

PCHAR = "abcXYZ019-._~!$&'()*+,;=:@/%?"  # path characters, `%` and `?` included
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PATHS = ["/api/x", "/api/chains", "/api/chains/c1/deployments", "/status/x", "/status", "/health",
         "/_gateway/usage", "/_gateway/usage/history", "/admin/tenants", "/metrics", "/"]
PUBLIC_PATHS = ["/status/x", "/health", "/status/a/b"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PRI", "FOO",
           "get", "M-SEARCH", "PROPFIND"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/3.0", b"", b"http/1.1",
            b"HTTP/1.1 ", b"HTTP/11", b"HTTP/1.01", b"HTTP/"]
# Names the gateway treats specially (identity, forwarding, hop-by-hop, framing, its own request id).
SENSITIVE = ["X-Cosmos-Tenant", "X-Cosmos-Plan", "X-Cosmos-Subject", "X-Cosmos-Usage", "X-Cosmos-Other",
             "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Request-Id",
             "Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive", "Proxy-Connection", "TE",
             "Trailer", "Proxy-Authorization", "Proxy-Authenticate", "Host", "Authorization", "Expect",
             "Content-Encoding", "Cookie", "Upgrade"]


@dataclass
class Probe:
    raw: bytes
    complete: bool = True  # the head and any body are whole: the gateway owes an answer
    body: bytes | None = None  # the body the upstream must receive when the request is forwarded
    head_request: bool = False
    injectable: bool = False  # the head sends `X-Injected` as a header line of its own (so it may arrive)
    pipelined: bool = False  # several requests: read until the gateway closes
    note: str = ""


# --------------------------------------------------------------------------- tokens


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: Any, payload: Any, secret: str = SECRET) -> str:
    """An HS256 JWS over the JSON of header and payload, whatever their types (NaN and ±inf allowed)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def valid_claims(tenant: str = "acme") -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "org_id": tenant, "iat": now, "exp": now + 3600}


def valid_token(tenant: str = "acme") -> str:
    return sign({"alg": "HS256", "typ": "JWT"}, valid_claims(tenant))


json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=2**63 - 5, max_value=2**63 + 5), st.integers(min_value=10**30),
    st.integers(max_value=-(10**30)),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 5e-324, 1e400 * 0]),
    st.text(max_size=30), st.text(alphabet=st.characters(min_codepoint=0x80), max_size=10),
    st.sampled_from(["", " ", "acme\r\nX-Injected: 1", "acme\x00", "a" * 65, "../x", "ACME", "acme:evil",
                     "\u2028", "\U0001f600", "\x85", "\xa0", "caf\xe9"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)
HEADER_FIELDS = ["alg", "typ", "kid", "crit", "jku", "x5u", "jwk", "x5c", "b64", "cty", "zip"]
CLAIM_FIELDS = ["iss", "aud", "sub", "org_id", "iat", "exp", "nbf", "plan", "scope", "jti", "azp"]


@st.composite
def mutated_tokens(draw: st.DrawFn) -> tuple[str, str]:
    """A token with one or more fields of its JOSE header or claims changed (re-signed, so the signature
    holds), or its bytes changed without re-signing; and a word saying what was done."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    claims = valid_claims(draw(st.sampled_from(["acme", "globex", "t-1", "a.b_c:d"])))
    how = draw(st.sampled_from(["claims", "claims", "header", "bytes", "shape", "whole"]))
    if how in ("claims", "header"):
        target = claims if how == "claims" else header
        fields = CLAIM_FIELDS if how == "claims" else HEADER_FIELDS
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(fields))
            if draw(st.integers(0, 4)) == 0:
                target.pop(name, None)
            else:
                target[name] = draw(json_values)
        return sign(header, claims), f"{how}: header={header!r} claims={claims!r}"
    if how == "whole":  # not an object at all, or a JSON text that is not what it seems
        whole = draw(json_values)
        return sign(header, whole) if draw(st.booleans()) else sign(whole, claims), "whole"
    token = valid_token()
    if how == "bytes":
        data = bytearray(token.encode())
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0x20, 0xFF).filter(lambda b: b != 0x7F))
        return data.decode("latin-1"), "bytes"
    parts = token.split(".")
    shape = draw(st.sampled_from(["drop", "extra", "empty", "pad", "space", "repeat"]))
    if shape == "drop":
        parts.pop(draw(st.integers(0, 2)))
    elif shape == "extra":
        parts.append(draw(st.text(alphabet=TCHAR, max_size=10)))
    elif shape == "empty":
        parts[draw(st.integers(0, 2))] = ""
    elif shape == "pad":
        parts[draw(st.integers(0, 2))] += "=="
    elif shape == "space":
        return token[:10] + " " + token[10:], "space"
    else:
        parts[1] = parts[1] * draw(st.integers(2, 50))
    return ".".join(parts), shape


# --------------------------------------------------------------------------- pieces of a head


@st.composite
def spellings(draw: st.DrawFn, name: str) -> str:
    """`name` with its case changed and some `-` turned into `_` (as WSGI servers would read it alike)."""
    out = []
    for ch in name:
        if ch == "-" and draw(st.booleans()):
            out.append("_")
        elif ch.isalpha() and draw(st.integers(0, 3)) == 0:
            out.append(ch.swapcase())
        else:
            out.append(ch)
    return "".join(out)


header_names = st.one_of(
    st.sampled_from(SENSITIVE).flatmap(spellings),
    st.text(alphabet=TCHAR, min_size=1, max_size=20),
).map(lambda s: s.encode("latin-1"))
raw_header_names = st.one_of(header_names, header_names, header_names, st.binary(min_size=1, max_size=12))
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.encode),
    st.binary(max_size=40),
    st.sampled_from([b"", b" ", b"\t", b"close", b"chunked", b"100-continue", b"keep-alive, X-Cosmos-Tenant",
                     b"X_Cosmos_Tenant, x_forwarded_for", b"127.0.0.1", b"for=1.2.3.4", b"gzip", b"\xff\xfe",
                     b"a\r\nX-Injected: 1", b"a\x00b", b"a\nb", b"a\rb", b"websocket", b"upgrade"]),
)
raw_headers = st.lists(st.tuples(raw_header_names, header_values), max_size=8)


def head(method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    line = method + b" " + target + (b" " + version if version else b"")
    return b"\r\n".join([line, *(n + b": " + v for n, v in headers)]) + b"\r\n\r\n"


def base_headers(path: str, authorization: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"Host", b"gw.test"), (b"Connection", b"close")]
    if authorization is not None and not path.startswith(("/status", "/health")):
        headers.append((b"Authorization", b"Bearer " + authorization.encode("latin-1")))
    return headers


# --------------------------------------------------------------------------- whole requests


@st.composite
def request_lines(draw: st.DrawFn) -> Probe:
    """Methods, targets with any bytes, versions, separators."""
    # Mostly plausible lines with one odd part, so that the odd part is what the gateway has to judge.
    method = draw(st.one_of(st.just(b"GET"), st.sampled_from(METHODS).map(str.encode),
                            st.binary(min_size=1, max_size=8)) if draw(st.integers(0, 3)) == 0 else st.just(b"GET"))
    base = draw(st.sampled_from([*PATHS, "*", "http://gw.test/api/x", "https://gw.test/status/x", "//x", "",
                                 "http://[::1]/status/x", "gw.test:80"]))
    suffix = draw(st.one_of(
        st.just(b""), st.binary(max_size=20), st.text(alphabet=PCHAR, max_size=20).map(str.encode),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(str.encode),
        st.sampled_from([b"/../api/x", b"/..;/api/x", b"/%2e%2e/api/x", b"%00", b"?a=1&a=2", b"#frag",
                         b"\r\nX-Injected: 1", b"\nX-Injected: 1", b"%zz", b"/%2F..", b"\\..\\api"]),
    ))
    version = draw(st.sampled_from(VERSIONS) if draw(st.integers(0, 2)) == 0 else st.just(b"HTTP/1.1"))
    path = base.encode() + suffix
    headers = base_headers(base if base.startswith("/") else "/api/x", valid_token())
    return Probe(head(method, path, version, headers), head_request=method == b"HEAD",
                 note="request line")


@st.composite
def header_sets(draw: st.DrawFn) -> Probe:
    """Any header names and values, the sensitive names in every spelling, on public and metered paths."""
    path = draw(st.sampled_from(["/status/x", "/health", "/api/x", "/api/chains"]))
    headers = base_headers(path, valid_token())
    extra = draw(raw_headers)
    at = draw(st.integers(0, len(headers)))
    headers[at:at] = extra
    method = draw(st.sampled_from([b"GET", b"DELETE", b"HEAD", b"OPTIONS"]))
    return Probe(head(method, path.encode(), b"HTTP/1.1", headers), head_request=method == b"HEAD",
                 injectable=True, note="headers")


def chunked(chunks: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


CONTENT_LENGTHS = [b"0", b"5", b"-1", b"+5", b"5,5", b"5, 6", b" 5", b"0x5", b"1e3", b"99999999999999999999",
                   b"18446744073709551616", b"", b"5 5", b"\xff"]
TRANSFER_CODINGS = [b"chunked", b"Chunked", b"chunked, chunked", b"gzip, chunked", b"identity", b"identity, chunked",
                    b"chunked, identity", b" chunked", b"chunked\t", b"xchunked", b"chunked;q=1", b"", b"\xffchunked"]
BROKEN_CHUNKS = [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhello0\r\n\r\n", b"5\nhello\n0\n\n", b"-5\r\nhello\r\n0\r\n\r\n",
                 b"ffffffffffffffffff\r\nx\r\n0\r\n\r\n", b"5;ext=1\r\nhello\r\n0\r\n\r\n",
                 b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"5 \r\nhello\r\n0\r\n\r\n",
                 b"5\r\nhel", b"3\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"\r\n0\r\n\r\n", b"5\r\nhello\r\n"]


@st.composite
def framings(draw: st.DrawFn) -> Probe:
    """Content-Length and Transfer-Encoding alone, together, repeated, obfuscated; chunked bodies whole and
    broken."""
    path = draw(st.sampled_from(["/status/x", "/api/x"]))
    headers = base_headers(path, valid_token())
    method = draw(st.sampled_from([b"POST", b"PUT", b"GET"]))
    kind = draw(st.sampled_from(["length", "chunked", "odd-length", "odd-coding", "both", "broken-chunks"]))
    body_bytes = draw(st.binary(max_size=300))
    expect = draw(st.integers(0, 5)) == 0
    if expect:
        headers.append((b"Expect", b"100-continue"))
    if kind == "length":
        headers.append((b"Content-Length", str(len(body_bytes)).encode()))
        return Probe(head(method, path.encode(), b"HTTP/1.1", headers) + body_bytes, body=body_bytes,
                     note="content-length")
    if kind == "chunked":
        pieces = draw(st.lists(st.binary(min_size=1, max_size=80), max_size=5))
        headers.append((b"Transfer-Encoding", b"chunked"))
        return Probe(head(method, path.encode(), b"HTTP/1.1", headers) + chunked(pieces), body=b"".join(pieces),
                     note="chunked")
    if kind == "odd-length":
        for _ in range(draw(st.integers(1, 2))):
            headers.append((draw(spellings("Content-Length")).encode(), draw(st.sampled_from(CONTENT_LENGTHS))))
    elif kind == "odd-coding":
        for _ in range(draw(st.integers(1, 2))):
            headers.append((draw(spellings("Transfer-Encoding")).encode(), draw(st.sampled_from(TRANSFER_CODINGS))))
    elif kind == "both":
        headers.append((b"Content-Length", draw(st.sampled_from(CONTENT_LENGTHS))))
        headers.append((b"Transfer-Encoding", draw(st.sampled_from(TRANSFER_CODINGS))))
    else:
        headers.append((b"Transfer-Encoding", b"chunked"))
    body = draw(st.sampled_from(BROKEN_CHUNKS)) if draw(st.booleans()) else body_bytes
    # Whether an odd framing ends where it claims to cannot be told in general: no answer is owed, but
    # the gateway must still not hang (the exchange has a deadline) nor crash.
    return Probe(head(method, path.encode(), b"HTTP/1.1", headers) + body, complete=False, note=kind)


@st.composite
def token_requests(draw: st.DrawFn) -> Probe:
    token, how = draw(mutated_tokens())
    path = draw(st.sampled_from(["/api/x", "/api/chains", "/_gateway/usage"]))
    scheme = draw(st.sampled_from([b"Bearer ", b"Bearer ", b"bearer ", b"Bearer  ", b"Basic ", b""]))
    headers = [(b"Host", b"gw.test"), (b"Connection", b"close"),
               (b"Authorization", scheme + token.encode("latin-1"))]
    return Probe(head(b"GET", path.encode(), b"HTTP/1.1", headers), note=f"token {how}")


@st.composite
def bodies(draw: st.DrawFn) -> Probe:
    """Bodies of any bytes under any content coding: forwarded byte-exact, never decoded."""
    path = draw(st.sampled_from(["/status/x", "/api/x"]))
    headers = base_headers(path, valid_token())
    body = draw(st.one_of(st.binary(max_size=2000), st.sampled_from([
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage", b"\x1f\x8b" + b"\x00" * 20, b"x\x9c\x00", b"BZh9"])))
    coding = draw(st.sampled_from([None, b"gzip", b"deflate", b"br", b"zstd", b"identity", b"gzip, gzip", b"x"]))
    if coding is not None:
        headers.append((b"Content-Encoding", coding))
    if draw(st.booleans()):
        headers.append((b"Content-Length", str(len(body)).encode()))
        raw = head(b"POST", path.encode(), b"HTTP/1.1", headers) + body
    else:
        headers.append((b"Transfer-Encoding", b"chunked"))
        raw = head(b"POST", path.encode(), b"HTTP/1.1", headers) + (chunked([body]) if body else b"0\r\n\r\n")
    return Probe(raw, body=body, note=f"body coding={coding!r}")


@st.composite
def pipelines(draw: st.DrawFn) -> Probe:
    """Two or three requests in one write: each is judged (and authenticated) on its own."""
    parts = draw(st.lists(st.one_of(header_sets(), request_lines(), token_requests()), min_size=2, max_size=3))
    raws = [p.raw.replace(b"\r\nConnection: close", b"", 1) for p in parts[:-1]] + [parts[-1].raw]
    return Probe(b"".join(raws), complete=True, head_request=parts[0].head_request,
                 injectable=any(p.injectable for p in parts), pipelined=True, note="pipeline")

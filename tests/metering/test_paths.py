"""The path rule (PRODUCT.md §3 "Hostile input"): canonical form, readings, refusals, and properties over
generated spellings: no spelling escapes a meter or leaves the public paths, and every server model's
reading of a path is among the gateway's readings."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering.meters import DEFAULT_METERS, MeterMatcher, compile_glob
from metering.paths import UnsafePath, canonical, canonical_glob, readings

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
PUBLIC = [compile_glob(p) for p in ("/health", "/status/**")]


def is_public(path: str) -> bool:
    """As the gateway decides it: every reading under some public glob, exact case."""
    return all(any(p.fullmatch(reading) for p in PUBLIC) for reading in readings(path))


# ------------------------------------------------------------------ canonical form


@pytest.mark.parametrize("path, expected", [
    ("/", "/"),
    ("/api/chains/c1", "/api/chains/c1"),
    ("/api/chains/", "/api/chains"),
    ("//api//chains//", "/api/chains"),
    ("/%61pi/%63hains", "/api/chains"),
    ("/api/%7e%2D%5f%2e", "/api/~-_."),
    ("/api/a%2fb", "/api/a%2Fb"),  # reserved: kept encoded, hex upper-cased
    ("/api/%c3%a9", "/api/%C3%A9"),
    ("/api/a|b", "/api/a%7Cb"),  # not allowed raw: encoded
    ("/api/chains;v=1/c1;x", "/api/chains/c1"),
    ("/api/chains/c1/./deployments/.", "/api/chains/c1/deployments"),
    ("/api/chains/c1/x/../deployments", "/api/chains/c1/deployments"),
    ("/../../api", "/api"),
    ("/status/..;/api/chains", "/api/chains"),
    ("/api/a%3Bb", "/api/a%3Bb"),
    ("/.well-known/x", "/.well-known/x"),
    ("/...", "/..."),
    ("/api/100%25", "/api/100%25"),
    ("*", "*"),
])
def test_canonical_form(path: str, expected: str) -> None:
    assert canonical(path) == expected


@pytest.mark.parametrize("path, expected", [
    ("/api/chains", ("/api/chains",)),
    ("/status/..;/api/chains", ("/api/chains", "/status/../api/chains", "/status/..;/api/chains")),
    ("/status/..%3b/api/chains", ("/status/..%3B/api/chains", "/api/chains", "/status/../api/chains")),
    ("/status/..%2fapi/chains", ("/status/..%2Fapi/chains", "/api/chains", "/status/../api/chains")),
    ("/api/chains/c1/deployments%3Fx", ("/api/chains/c1/deployments%3Fx", "/api/chains/c1/deployments")),
    ("/a//../b", ("/b", "/a/b", "/a/../b")),
    ("/api/c1;x", ("/api/c1", "/api/c1;x")),
    ("/api/a%3Ab", ("/api/a%3Ab", "/api/a:b")),  # a server that decodes first sees a ':'
])
def test_readings(path: str, expected: tuple[str, ...]) -> None:
    assert readings(path) == expected


@pytest.mark.parametrize("path, why", [
    ("api/chains", "start with '/'"),
    ("/api/%2e%2e/x", "encoded dot-segment"),
    ("/api/%2E", "encoded dot-segment"),
    ("/api/.%2e/x", "encoded dot-segment"),
    ("/api/%2e%2e;x/y", "encoded dot-segment"),
    ("/api/%2e%2e%3Bx/y", "encoded dot-segment"),
    ("/api/x%2F%2e%2e%2Fy", "encoded dot-segment"),  # a dot-segment once %2F is a separator
    ("/api/%2e%2e%3Fx", "encoded dot-segment"),  # ... once %3F ends the path
    ("/api/a\\b", "backslash"),
    ("/api/a%5cb", "encoded backslash"),
    ("/api/%zz", "invalid percent-encoding"),
    ("/api/%4", "invalid percent-encoding"),
    ("/api/x%", "invalid percent-encoding"),
    ("/api/%u002e", "invalid percent-encoding"),
    ("/api/a\x00b", "control character"),
    ("/api/%00", "encoded control character"),
    ("/api/%0D%0A", "encoded control character"),
    ("/api/%7f", "encoded control character"),
    ("/api/%252e%252e/x", "twice"),
    ("/api/%252F", "twice"),
    ("/api/%2541", "twice"),
    ("/api/%25%34%31", "twice"),  # a double encoding spelled with encoded unreserved digits
    ("/api/%C0%AE%C0%AE/x", "not UTF-8"),  # overlong '.', which lenient decoders read as dots
    ("/api/%ff", "not UTF-8"),
    ("/api/\udcff", "not UTF-8"),
    ("/api/chains#x", "fragment"),
])
def test_unsafe_paths_are_refused(path: str, why: str) -> None:
    with pytest.raises(UnsafePath, match=re.escape(why)):
        readings(path)


def test_unsafe_path_is_a_value_error_with_a_message_for_the_client() -> None:
    with pytest.raises(ValueError, match=r"^the path"):
        readings("/%zz")


@pytest.mark.parametrize("pattern, expected", [
    ("/api/**", "/api/**"),
    ("/api/chains/", "/api/chains"),
    ("//api//chains", "/api/chains"),
    ("/%61pi/*/%2fx", "/api/*/%2Fx"),
    ("/", "/"),
])
def test_canonical_glob(pattern: str, expected: str) -> None:
    assert canonical_glob(pattern) == expected


@pytest.mark.parametrize("pattern", ["api", "/a%zz", "/a%4"])
def test_bad_globs(pattern: str) -> None:
    with pytest.raises(ValueError):
        canonical_glob(pattern)


def test_meters_match_any_reading_in_any_case_public_needs_every_reading_in_exact_case() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    deployment = ("api_calls", "chain_deployments")
    for path in ("/API/chains/c1/Deployments", "/api/chains/c1/deployments%3bx", "/api%2Fchains/c1/deployments"):
        assert tuple(m.name for m in matcher.request_meters("POST", path)) == deployment, path
    assert is_public("/status/ok") and is_public("/health/") and is_public("/status/x/../y")
    assert not is_public("/Status/ok")
    assert not is_public("/health;jsessionid=1")  # as sent, Werkzeug routes /health;jsessionid=1
    assert not is_public("/api/../status/x")  # resolved it is public, routed as it came it is not


# ------------------------------------------------------------------ properties over spellings

UNRESERVED_EXTRA = "-._~"
SAFE_SEGMENT = st.text(alphabet="abcxyz019-_~", min_size=1, max_size=6)


def _encode(char: str, upper: bool) -> str:
    text = f"%{ord(char):02x}"
    return text.upper() if upper else text


@st.composite
def spelled_segment(draw: st.DrawFn, segment: str, change_case: bool, params: bool = True) -> str:
    """One segment spelled oddly: unreserved characters percent-encoded, case changed, path parameters."""
    out = []
    for char in segment:
        if change_case and char.isalpha() and draw(st.booleans()):
            char = char.swapcase()
        if draw(st.integers(0, 3)) == 0:
            out.append(_encode(char, draw(st.booleans())))
        else:
            out.append(char)
    spelled = "".join(out)
    if not params:
        return spelled
    return spelled + draw(st.sampled_from(["", "", ";", ";x", ";v=1", ";a;b", "%3B", "%3bx=1", ";%2e"]))


# Between segments: nothing, an empty segment, '.', or a climb out of a throw-away segment.
FILLERS = ["", "", "", "/", "/.", "/x/..", "/x;y/..", "/x/..;", "/.;p", "/x/y/../.."]


@st.composite
def spelling(draw: st.DrawFn, path: str, *, change_case: bool = False, odd: bool = True) -> str:
    """`path` (canonical, no dot-segments) spelled in one of the ways servers read alike; `odd=False`:
    only the spellings every server reads alike (encoded unreserved characters, `//`, a trailing `/`)."""
    segments = path.strip("/").split("/")
    out = draw(st.sampled_from(["", "", "/"]))  # a leading '//'
    for index, segment in enumerate(segments):
        separator = "/"
        if odd and index > 0 and draw(st.integers(0, 5)) == 0:
            separator = draw(st.sampled_from(["%2F", "%2f"]))
        filler = draw(st.sampled_from(FILLERS if odd else ["", "/"]))
        out += filler + separator + draw(spelled_segment(segment, change_case, odd))
    out += draw(st.sampled_from(["", "", "/", "/.", "//", "/x/..", "/;x"] if odd else ["", "/", "//"]))
    return out


METERED = [
    ("POST", "/api/chains/c1/deployments", "chain_deployments"),
    ("POST", "/api/chains/c1/deployments", "api_calls"),
    ("GET", "/api/chains", "api_calls"),
    ("GET", "/api", "api_calls"),
]


@PROPERTY
@given(data=st.data(), case=st.sampled_from(METERED))
def test_no_spelling_of_a_metered_path_escapes_its_meter(data: st.DataObject, case: tuple[str, str, str]) -> None:
    method, path, meter = case
    spelled = data.draw(spelling(path, change_case=True))
    matcher = MeterMatcher(DEFAULT_METERS)
    try:
        found = [m.name for m in matcher.request_meters(method, spelled)]
    except UnsafePath:
        return  # refused with 400: not served at all
    assert meter in found, (spelled, readings(spelled))


def test_spellings_are_mostly_accepted() -> None:
    """The property above would hold trivially if every spelling were refused."""
    seen: list[str] = []
    refused: list[str] = []

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(spelling("/api/chains/c1/deployments", change_case=True))
    def collect(spelled: str) -> None:
        seen.append(spelled)
        try:
            readings(spelled)
        except UnsafePath:
            refused.append(spelled)

    collect()
    assert len(refused) <= len(seen) * 0.3, refused[:10]


PROTECTED = ["/api/chains", "/api/chains/c1/deployments", "/admin/tenants", "/healthz", "/statusx"]
ESCAPES = ["..", "..;", "..;x=1", "..%3B", "..%3bx", "..%2F", "%2e%2e", ".%2E", "x/../..", "./.."]
PUBLIC_PREFIXES = ["/status", "/status/x", "/status;", "/status;x", "/health", "/health/", "/status/ok/y"]


@st.composite
def escape(draw: st.DrawFn) -> str:
    """A public prefix, enough climbs out of it, then a spelling of a protected path."""
    prefix = draw(st.sampled_from(PUBLIC_PREFIXES))
    depth = len([segment for segment in prefix.split("/") if segment])
    climbs = draw(st.lists(st.sampled_from(ESCAPES), min_size=depth, max_size=depth + 2))
    target = draw(spelling(draw(st.sampled_from(PROTECTED))))
    return prefix + "".join("/" + climb for climb in climbs) + target


@PROPERTY
@given(escape())
def test_no_spelling_of_a_protected_path_is_public(spelled: str) -> None:
    try:
        assert not is_public(spelled), (spelled, readings(spelled))
    except UnsafePath:
        pass


@PROPERTY
@given(st.sampled_from(["/health", "/status", "/status/ok", "/status/db/x"]).flatmap(
    lambda path: spelling(path, odd=False)))
def test_spellings_every_server_reads_alike_keep_a_public_path_public(spelled: str) -> None:
    """(With `;params`, dot-segments or an encoded slash a path is public only when every reading is.)"""
    assert is_public(spelled), (spelled, readings(spelled))


PATH_CHARS = st.sampled_from([
    *"/aZ09.-_~;=:@!$&'()*+,%|{}\"<>^`[]\\#é\x00\t",
    "%2e", "%2E", "%2f", "%2F", "%3b", "%3B", "%3F", "%23", "%25", "%5c", "%00", "%41", "%c3%a9", "%c0",
    "..", "//", "/..", "/.", "/x",
])
ANY_PATH = st.lists(PATH_CHARS, max_size=24).map(lambda parts: "/" + "".join(parts))
ODD_SEGMENTS = ["a", "B", "", ".", "..", "..;", "a;x", "a%2Fb", "%61", ";p", "c%3Bd", "e%3Ff"]
SEGMENT_PATH = st.lists(st.sampled_from(ODD_SEGMENTS), max_size=8).map(lambda segments: "/" + "/".join(segments))


@PROPERTY
@given(st.one_of(ANY_PATH, st.text(max_size=40), st.text(max_size=40).map(lambda t: "/" + t),
                 st.binary(max_size=40).map(lambda b: "/" + b.decode("latin-1"))))
def test_any_input_gives_readings_or_unsafe_path_only(path: str) -> None:
    try:
        found = readings(path)
    except UnsafePath:
        return
    assert found and len(set(found)) == len(found)
    for reading in found:
        assert reading == "*" or (reading.startswith("/") and "//" not in reading
                                  and (reading == "/" or not reading.endswith("/"))), (path, found)
        assert reading.isascii() and "\\" not in reading and "#" not in reading
    assert ";" not in found[0]


@PROPERTY
@given(st.one_of(ANY_PATH, st.sampled_from(PROTECTED).flatmap(lambda p: spelling(p, change_case=True)), escape()))
def test_canonicalisation_is_idempotent(path: str) -> None:
    try:
        first = canonical(path)
    except UnsafePath:
        return
    assert canonical(first) == first
    assert readings(first)[0] == first


# ------------------------------------------------------------------ servers' readings are among ours


def _merge_resolve(segments: list[str], *, resolve: bool = True) -> str:
    out: list[str] = []
    for segment in segments:
        if not segment:
            continue
        if resolve and segment == "..":
            if out:
                out.pop()
        elif not resolve or segment != ".":
            out.append(segment)
    return "/" + "/".join(out)


def werkzeug(path: str) -> str:
    """Decodes the whole path (`%2F` too), keeps `;`, merges slashes, routes dot-segments as they are."""
    return _merge_resolve(unquote(path).split("/"), resolve=False)


def nginx(path: str) -> str:
    """Decodes, merges slashes, resolves dot-segments; `;` is an ordinary character."""
    return _merge_resolve(unquote(path).split("/"))


def tomcat(path: str) -> str:
    """Strips `;params` of each raw segment, then decodes (`%2F` is refused: not modelled), merges, resolves."""
    return _merge_resolve([unquote(segment.split(";", 1)[0]) for segment in path.split("/")])


def envoy(path: str) -> str:
    """Resolves dot-segments as RFC 3986 says (empty segments count), then merges slashes; `;` is an ordinary
    character; the upstream behind it decodes."""
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return unquote(_merge_resolve(out, resolve=False))


def decode_first(path: str) -> str:
    """Decodes everything first, then parses: a decoded `?` or `#` ends the path, `;` starts parameters."""
    text = re.split(r"[?#]", unquote(path), maxsplit=1)[0]
    return _merge_resolve([segment.split(";", 1)[0] for segment in text.split("/")])


def _among_ours(path: str) -> None:
    try:
        found = readings(path)
    except UnsafePath:
        return
    if path == "*":
        return
    decoded = {unquote(reading) for reading in found}
    models = [werkzeug, nginx, envoy, decode_first] + ([] if "%2f" in path.lower() else [tomcat])
    for model in models:
        assert model(path) in decoded, (model.__name__, path, model(path), found)


@PROPERTY
@given(SEGMENT_PATH)
def test_every_servers_reading_of_odd_segments_is_among_ours(path: str) -> None:
    _among_ours(path)


@PROPERTY
@given(st.one_of(ANY_PATH, st.sampled_from(PROTECTED).flatmap(spelling), escape()))
def test_every_servers_reading_of_any_path_is_among_ours(path: str) -> None:
    _among_ours(path)

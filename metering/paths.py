"""How a request path is read for matching (PRODUCT.md §3 "Hostile input"): canonical form and readings.

Public paths, meters and guards never look at the raw path: an odd spelling must not help the caller,
whatever server sits behind the gateway. A path is turned into its *readings*, each one the path as
some plausible server would route it, in a canonical form:

- percent-encoded unreserved characters (ALPHA DIGIT - . _ ~) decoded, other percent-encodings with
  upper-case hex digits, characters that are not allowed raw in a path percent-encoded;
- empty segments (`//`, a trailing `/`) dropped, then dot-segments resolved (RFC 3986 §5.2.4).

The readings differ where servers differ:

- path parameters: `;…` of each segment stripped (Tomcat, Jetty, Spring; the canonical reading), or
  kept as part of the segment (Werkzeug, nginx), or a `%3B` taken for `;` as well, and `%3F` / `%23`
  for the end of the path (servers that decode before they parse);
- an encoded slash `%2F`: part of a segment, or a separator (servers that decode before routing);
- dot-segments resolved after `//` is merged (nginx, Tomcat), or before (RFC 3986: `/a//../b` is
  `/a/b`), or left as they are (servers that route the path as it came).

The first reading is the canonical form: parameters stripped, `%2F` kept, dot-segments resolved. A meter
or guard applies when any reading matches, a path is public only when every reading is. The path
forwarded upstream is never rewritten.

A path that cannot be read safely raises `UnsafePath`: an encoded dot-segment (`%2e`, `.%2E`, also
with `;params`), a backslash raw or encoded (`%5C`), invalid percent-encoding (`%zz`, `%4`, a trailing
`%`), a control character raw or encoded (NUL included), double encoding (`%25` followed by two hex
digits: a second decoding would turn `%252e` into a dot), percent-encoded bytes that are not UTF-8
(such as the overlong `%C0%AE`), a raw `#`, or a path not starting with `/`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Reserved characters a decoding server would see raw: RFC 3986 sub-delims but ';', ':' and '@' (pchar).
_SUB_DELIMS = frozenset("!$&'()*+,=:@")

# A path with nothing to normalise: non-empty segments of unreserved characters and sub-delims other
# than ';', none of them '.' or '..', perhaps a trailing '/'. Most real paths; one regex match decides.
_SIMPLE = re.compile(r"/|(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9\-._~!$&'()*+,=:@]+)+/?")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_RAW_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\#]")
_ENCODED_CONTROL = re.compile(r"%(?:[01][0-9A-Fa-f]|7[Ff])")
_ENCODED_BACKSLASH = re.compile(r"%5[Cc]")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
_NON_ASCII = re.compile(r"%[89A-Fa-f][0-9A-Fa-f]|[^\x00-\x7f]")
# A segment of one or two dots, one of them encoded, in any reading: after a '/' or an encoded one,
# before a '/', an encoded one, parameters (';', '%3B'), an encoded '?' or '#', or the end.
_ENCODED_DOT_SEGMENT = re.compile(r"(?:/|%2F)(?:%2E(?:\.|%2E)?|\.%2E)(?=/|%2F|;|%3B|%3F|%23|\Z)", re.IGNORECASE)
# Encoded ASCII that a server decoding first would see as something else: all but the unreserved.
_ENCODED_RESERVED = re.compile(r"%(?:2[0-9A-Ca-cFf]|3[A-Fa-f]|40|5[BbDdEe]|60|7[B-Db-d])")
# What the canonical form rewrites: a percent-encoding, or a character that may not stand raw in a path.
_REWRITE = re.compile(r"%[0-9A-Fa-f]{2}|[^A-Za-z0-9\-._~!$&'()*+,;=:@%/]")
_SUB_DELIM_ENCODED = re.compile("|".join(f"%{ord(c):02X}" for c in sorted(_SUB_DELIMS)))
_ENCODED_END = re.compile(r"%3F|%23")  # '?' and '#', upper-case once normalised
_PARAMS = re.compile(r";|%3B")

# A reading is (encoded slash a separator or not, parameter mode, dot-segment mode).
_LITERAL, _STRIP, _DECODE = 0, 1, 2  # ';' literal; raw ';' starts params; decoded first, then parsed
# `//` merged, then dot-segments resolved (nginx, Tomcat); resolved with the empty segments (RFC 3986
# §5.2.4: `/a//../b` is `/a/b`), then merged; merged only (servers that route the path as it came).
_MERGE_FIRST, _RFC, _UNRESOLVED = 0, 1, 2


def _rewritten(text: str) -> str:
    if text[0] != "%":
        return "".join(f"%{octet:02X}" for octet in text.encode("utf-8"))
    char = chr(int(text[1:], 16))
    return char if char in UNRESERVED else text.upper()


# Every percent-encoding, in each spelling of its hex digits, and what the canonical form makes of it.
_PERCENT_FORMS: dict[str, str] = {
    f"%{hi}{lo}": _rewritten(f"%{hi}{lo}") for hi in "0123456789abcdefABCDEF" for lo in "0123456789abcdefABCDEF"}


class UnsafePath(ValueError):
    """A path that cannot be read safely; the message says why (safe to show the client)."""


def readings(path: str) -> tuple[str, ...]:
    """The readings of a raw path (no query), the canonical form first, no duplicates; or UnsafePath.

    `*` (the asterisk-form of OPTIONS) is its own only reading.
    """
    if _SIMPLE.fullmatch(path) is not None:
        return (path[:-1] if len(path) > 1 and path[-1] == "/" else path,)
    if path == "*":
        return (path,)
    _check(path)
    # Normalised once for every reading: decoding unreserved characters adds no delimiter, and the only
    # dot-segments it could make (encoded ones) were refused.
    normal = _normalise(path)
    if _DOUBLE.search(normal):  # made by decoding unreserved characters: %25%34%31 is %2541
        raise UnsafePath("the path is percent-encoded twice")
    modes = (_STRIP,) + ((_LITERAL,) if ";" in normal else ()) + (
        (_DECODE,) if _ENCODED_RESERVED.search(normal) else ())  # the others would be the same as _STRIP
    found: list[str] = []
    for split_slash in (False, True) if "%2F" in normal else (False,):
        for mode in modes:
            segments = _segments(normal, split_slash, mode)
            ways: tuple[int, ...]
            if "." in segments or ".." in segments:
                ways = (_MERGE_FIRST, _RFC, _UNRESOLVED) if "" in segments else (_MERGE_FIRST, _UNRESOLVED)
            else:
                ways = (_UNRESOLVED,)  # nothing to resolve: all three are the same
            for how in ways:
                reading = _join(segments, how)
                if reading not in found:
                    found.append(reading)
    return tuple(found)


def canonical(path: str) -> str:
    """The canonical form of a raw path: its first reading."""
    return readings(path)[0]


def canonical_glob(pattern: str) -> str:
    """A path glob in the canonical form its paths are matched in: percent-encodings as in a reading,
    empty segments (`//`, a trailing `/`) dropped; `*` and `**` kept. ValueError on a bad glob."""
    if not pattern.startswith("/"):
        raise ValueError("must start with '/'")
    if _BAD_PERCENT.search(pattern):
        raise ValueError("invalid percent-encoding")
    return "/" + "/".join(_normalise(segment) for segment in pattern.split("/") if segment)


def _check(path: str) -> None:
    """UnsafePath for a raw path that cannot be read safely."""
    if not path.startswith("/"):
        raise UnsafePath("the path must start with '/'")
    raw = _RAW_UNSAFE.search(path)
    if raw is not None:
        what = {"\\": "a backslash", "#": "a fragment ('#')"}.get(raw.group(), "a control character")
        raise UnsafePath(f"the path contains {what}")
    if "%" in path:
        if _BAD_PERCENT.search(path):
            raise UnsafePath("the path has invalid percent-encoding ('%' not followed by two hex digits)")
        if _ENCODED_CONTROL.search(path):
            raise UnsafePath("the path contains an encoded control character")
        if _ENCODED_BACKSLASH.search(path):
            raise UnsafePath("the path contains an encoded backslash")
        if _DOUBLE.search(path):
            raise UnsafePath("the path is percent-encoded twice")
        if _ENCODED_DOT_SEGMENT.search(path):
            raise UnsafePath("the path contains an encoded dot-segment")
    if _NON_ASCII.search(path):
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeError:
            raise UnsafePath("the path's percent-encoded bytes are not UTF-8") from None


def _segments(normal: str, split_slash: bool, mode: int) -> list[str]:
    """The segments of a normalised path in one reading; empty and dot-segments still there."""
    if mode == _DECODE:
        normal = _SUB_DELIM_ENCODED.sub(_decoded, _ENCODED_END.split(normal, 1)[0])
    pieces = normal[1:].split("/")
    if split_slash:
        pieces = [part for piece in pieces for part in piece.split("%2F")]
    if mode == _STRIP:
        return [piece.split(";", 1)[0] for piece in pieces]
    if mode == _DECODE:
        return [_PARAMS.split(piece, 1)[0] for piece in pieces]
    return pieces


def _decoded(match: re.Match[str]) -> str:
    return chr(int(match.group()[1:], 16))


def _join(segments: list[str], how: int) -> str:
    if how == _UNRESOLVED:
        return "/" + "/".join(filter(None, segments))
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment != "." and (segment or how == _RFC):
            out.append(segment)
    return "/" + "/".join(filter(None, out))


def _normalise(text: str) -> str:
    """Percent-encodings of unreserved characters decoded, the others upper-cased; characters that may
    not stand raw in a path percent-encoded (as UTF-8). '/' and ';' are kept."""
    return _REWRITE.sub(_rewrite, text) if "%" in text or _REWRITE.search(text) else text


def _rewrite(match: re.Match[str]) -> str:
    text = match.group()
    return _PERCENT_FORMS.get(text) or _rewritten(text)

"""The one-call response writer: the framing rules aiohttp would apply, as pure functions."""

from __future__ import annotations

import re

import pytest

from gateway.proxy.response import UnsafeHeader, http_date, serialize

HEADERS = [("Content-Type", "application/json"), ("Date", "Tue, 01 Dec 2026 10:00:00 GMT"), ("X-A", "1")]


def head(data: bytes) -> list[str]:
    return data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")


def test_keep_alive_http11_adds_only_the_length() -> None:
    data = serialize((1, 1), 200, "OK", HEADERS, b'{"a":1}', keep_alive=True)
    assert head(data) == ["HTTP/1.1 200 OK", "Content-Type: application/json", "Date: Tue, 01 Dec 2026 10:00:00 GMT",
                          "X-A: 1", "Content-Length: 7"]
    assert data.endswith(b'\r\n\r\n{"a":1}')


def test_the_gateways_own_lines_follow_the_upstreams_headers() -> None:
    data = serialize((1, 1), 200, "OK", HEADERS, b"x", keep_alive=True,
                     head_lines='RateLimit-Policy: "burst";q=5;w=1\r\nRateLimit: "burst";r=4;t=1\r\n')
    assert head(data)[3:] == ["X-A: 1", 'RateLimit-Policy: "burst";q=5;w=1', 'RateLimit: "burst";r=4;t=1',
                              "Content-Length: 1"]


@pytest.mark.parametrize(("version", "keep_alive", "connection"), [
    ((1, 1), False, "Connection: close"),
    ((1, 0), True, "Connection: keep-alive"),
    ((1, 0), False, None),
    ((1, 1), True, None),
])
def test_connection_header_follows_version_and_keep_alive(version: tuple[int, int], keep_alive: bool,
                                                          connection: str | None) -> None:
    lines = head(serialize(version, 200, "OK", HEADERS, b"x", keep_alive=keep_alive))
    assert lines[0] == f"HTTP/{version[0]}.{version[1]} 200 OK"
    assert [line for line in lines if line.startswith("Connection")] == ([connection] if connection else [])


def test_date_and_content_type_are_added_when_missing() -> None:
    lines = head(serialize((1, 1), 201, "Created", [("x-b", "2")], b"body", keep_alive=True))
    assert "Content-Type: application/octet-stream" in lines
    dates = [line for line in lines if line.startswith("Date: ")]
    assert len(dates) == 1 and re.fullmatch(r"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", dates[0])
    # An empty body gets no invented type; names are matched without regard to case.
    lines = head(serialize((1, 1), 200, "OK", [("content-type", "text/plain"), ("DATE", "x")], b"", keep_alive=True))
    assert [line for line in lines if line.lower().startswith(("content-type", "date"))] == [
        "content-type: text/plain", "DATE: x"]
    assert "Content-Length: 0" in head(serialize((1, 1), 200, "OK", [], b"", keep_alive=True))


@pytest.mark.parametrize(("reason", "headers"), [
    ("OK\r\nX-Injected: 1", []),
    ("OK", [("X-A", "1\r\nX-Injected: 1")]),
    ("OK", [("X-A\n", "1")]),
    ("OK", [("X-A", "1\r")]),
])
def test_line_breaks_in_reason_or_headers_are_refused(reason: str, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(UnsafeHeader):
        serialize((1, 1), 200, reason, headers, b"", keep_alive=True)


def test_http_date_is_an_imf_fixdate() -> None:
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", http_date())

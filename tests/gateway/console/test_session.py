"""gateway/console/session.py: signed, expiring, stateless sessions and their CSRF tokens."""

from __future__ import annotations

from gateway.console.session import MAX_COOKIE_CHARS, SESSION_SECONDS, Sessions, session_key

TOKENS = (("ops", "ops-token-0123456789abcdef"),)


def test_a_session_round_trips_until_it_expires() -> None:
    keys = Sessions(session_key(TOKENS, None))
    value, session = keys.issue("token:ops", 1000.0)
    assert session.expires == 1000 + SESSION_SECONDS
    assert keys.read(value, 1000.0 + SESSION_SECONDS - 1) == session
    assert keys.read(value, 1000.0 + SESSION_SECONDS) is None


def test_a_jwt_session_ends_with_the_token() -> None:
    keys = Sessions(session_key(TOKENS, None))
    value, session = keys.issue("jwt:alice", 1000.0, not_after=1300.0)
    assert session.expires == 1300 and keys.read(value, 1299) is not None and keys.read(value, 1300) is None


def test_every_worker_derives_the_same_key_and_a_rotated_token_ends_sessions() -> None:
    assert session_key(TOKENS, "s") == session_key(TOKENS, "s")
    value, _ = Sessions(session_key(TOKENS, "s")).issue("token:ops", 0)
    assert Sessions(session_key(TOKENS, "s")).read(value, 1) is not None
    assert Sessions(session_key((("ops", "a-new-token-0123456789"),), "s")).read(value, 1) is None
    assert Sessions(session_key(TOKENS, "other")).read(value, 1) is None
    assert session_key((), None) != session_key((), None)  # no secret at all: random per process


def test_forged_and_malformed_cookies_are_no_session() -> None:
    keys = Sessions(session_key(TOKENS, None))
    value, _ = keys.issue("token:ops", 0)
    payload, signature = value.split(".")
    other, _ = keys.issue("token:admin", 0)
    for bad in (None, "", ".", "abc", f"{payload}.", f"{other.split('.')[0]}.{signature}", f"{payload}.@@@",
                "x" * (MAX_COOKIE_CHARS + 1), f"{payload}x.{signature}", "e30." + signature):
        assert keys.read(bad, 1) is None, bad


def test_csrf_tokens_belong_to_their_session() -> None:
    keys = Sessions(session_key(TOKENS, None))
    _, first = keys.issue("token:ops", 0)
    _, second = keys.issue("token:ops", 0)
    token = keys.csrf_token(first.nonce)
    assert keys.csrf_ok(first.nonce, token)
    assert not keys.csrf_ok(second.nonce, token)
    for bad in (None, "", "x" * 200, token[:-1], token + "a", "é" * 10):
        assert not keys.csrf_ok(first.nonce, bad)

"""The usage page's signed links, sessions and CSRF tokens (pure)."""

from __future__ import annotations

from gateway.portal.tokens import LINK_SECONDS, MAX_TOKEN_CHARS, SESSION_SECONDS, PortalTokens, portal_key

NOW = 1_800_000_000.0
KEY = portal_key(["admin:ops:token-0123456789abcdef", "hs256-secret", None])


def test_a_link_says_whose_and_until_when() -> None:
    tokens = PortalTokens(KEY)
    text, signed = tokens.link("acme", NOW)
    assert signed.tenant == "acme" and signed.expires == NOW + LINK_SECONDS and len(signed.id) >= 20
    assert tokens.read_link(text, NOW + LINK_SECONDS - 1) == signed
    assert tokens.read_link(text, NOW + LINK_SECONDS) is None  # expired
    assert tokens.link("acme", NOW)[1].id != signed.id  # each link its own id (its one use in Redis)


def test_every_worker_of_a_configuration_reads_the_others_links() -> None:
    text, signed = PortalTokens(KEY).link("acme", NOW)
    same = portal_key([None, "hs256-secret", "admin:ops:token-0123456789abcdef"])  # order does not matter
    assert PortalTokens(same).read_link(text, NOW) == signed
    rotated = portal_key(["admin:ops:token-rotated-0123456789", "hs256-secret"])
    assert PortalTokens(rotated).read_link(text, NOW) is None  # a changed secret ends every link
    assert portal_key([None, ""]) != portal_key([None, ""])  # no secret at all: a key per process


def test_forged_and_odd_values_are_no_link() -> None:
    tokens = PortalTokens(KEY)
    text, _ = tokens.link("acme", NOW)
    head, payload, mac = text.split(".")
    other, _ = tokens.link("globex", NOW)
    for bad in ("", "p1", "p1..", f"{head}.{payload}.{mac[:-2]}AA", f"{head}.{other.split('.')[1]}.{mac}",
                f"s1.{payload}.{mac}", text + "x" * MAX_TOKEN_CHARS, "p1.%%%.x", "\u00e9" * 40):
        assert tokens.read_link(bad, NOW) is None, bad
    assert tokens.read_link(None, NOW) is None


def test_a_session_is_not_a_link_and_its_csrf_token_is_its_own() -> None:
    tokens = PortalTokens(KEY)
    link, _ = tokens.link("acme", NOW)
    cookie, session = tokens.session("acme", NOW)
    assert tokens.read_session(link, NOW) is None and tokens.read_link(cookie, NOW) is None
    assert tokens.read_session(cookie, NOW + SESSION_SECONDS - 1) == session
    assert tokens.read_session(cookie, NOW + SESSION_SECONDS) is None
    csrf = tokens.csrf_token(session)
    assert tokens.csrf_ok(session, csrf)
    _, another = tokens.session("acme", NOW)
    assert not tokens.csrf_ok(another, csrf) and not tokens.csrf_ok(session, None)
    assert not tokens.csrf_ok(session, csrf + "x" * 200)

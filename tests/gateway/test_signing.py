"""gateway/signing.py: the signed values of the console and of the usage page (pure)."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st

from gateway.signing import Signer, derive_key, pack, unpack

KEY = derive_key(b"test label v1", ["admin:ops:token-0123456789abcdef"])


@hypothesis.given(fields=st.lists(st.one_of(st.text(max_size=50), st.integers(), st.booleans()), max_size=5))
def test_fields_come_back_as_packed(fields: list[object]) -> None:
    assert unpack(pack(fields)) == fields


@hypothesis.given(payload=st.text(max_size=300))
def test_unpack_of_any_client_text_is_a_list_or_none(payload: str) -> None:
    fields = unpack(payload)
    assert fields is None or isinstance(fields, list)


@hypothesis.given(presented=st.text(max_size=100))
def test_only_the_mac_itself_matches(presented: str) -> None:
    signer = Signer(KEY)
    genuine = signer.text_mac("session", "payload")
    assert signer.matches("session", "payload", presented) == (presented == genuine)


def test_purpose_label_and_secrets_each_change_the_mac() -> None:
    mac = Signer(KEY).text_mac("session", "payload")
    assert Signer(KEY).text_mac("csrf", "payload") != mac
    assert Signer(derive_key(b"other label v1", ["admin:ops:token-0123456789abcdef"])).text_mac(
        "session", "payload") != mac
    assert Signer(derive_key(b"test label v1", ["admin:ops:rotated-0123456789"])).text_mac(
        "session", "payload") != mac
    assert derive_key(b"test label v1", []) != derive_key(b"test label v1", [])  # no secret: random per process

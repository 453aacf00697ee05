"""Secret parsing and formatting (docs/protocol.md §1), including mtg's own test vector."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtgworkers.protocol.errors import ProtocolError
from mtgworkers.protocol.secret import Secret, SecretError

# mtglib/secret_test.go
VECTOR_KEY = bytes.fromhex("d11c6cbbd9efe7fed5bc0db220b09665")
VECTOR_HOST = "google.com"
VECTOR_HEX = "eed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d"
VECTOR_B64 = "7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t"

ONLY_EE = "only FakeTLS 'ee' secrets"


@pytest.mark.parametrize("text", [VECTOR_HEX, VECTOR_B64, VECTOR_HEX.upper()])
def test_parse_vector(text: str) -> None:
    secret = Secret.parse(text)
    assert secret.key == VECTOR_KEY
    assert secret.host == VECTOR_HOST
    assert secret.host_bytes == b"google.com"
    assert secret.is_valid()


def test_format_vector() -> None:
    secret = Secret(VECTOR_KEY, VECTOR_HOST)
    assert secret.hex() == VECTOR_HEX
    assert secret.base64() == VECTOR_B64
    assert secret.to_bytes() == bytes.fromhex(VECTOR_HEX)
    assert Secret.parse(secret.hex()) == secret
    assert Secret.parse(secret.base64()) == secret


# Every string mtg's TestIncorrectSecret rejects, with the message we give for it.
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("aaa", f"incorrect first byte of secret: 0x69 ({ONLY_EE} are supported)"),
        (
            "d11c6cbbd9efe7fed5bc0db220b09665",
            "incorrect first byte of secret: 0xd1 "
            f"(legacy 16-byte secrets are not supported: {ONLY_EE})",
        ),
        (
            "ddd11c6cbbd9efe7fed5bc0db220b09665",
            "incorrect first byte of secret: 0xdd "
            f"(legacy 'dd' secrets are not supported: {ONLY_EE})",
        ),
        ("+ueJ0q91t5XOnFYP8Xac3A", "incorrect secret format: illegal base64 data at input byte 0"),
        (
            "eed11c6cbbd9efe7fed5bc0db220b09665",
            "hostname cannot be empty (the secret must end with the fronting host name)",
        ),
        (
            "eed11c6cbbd9efe7fed5bc0db220b096",
            f"secret has incorrect length 15 (legacy 16-byte secrets are not supported: {ONLY_EE})",
        ),
        (
            "ed11c6cbbd9efe7fed5bc0db220b09665",
            "incorrect secret format: illegal base64 data at input byte 32",
        ),
        ("", "secret is empty"),
        ("+**", "incorrect secret format: illegal base64 data at input byte 0"),
        ("ee", "secret is truncated, length=1"),
        (
            "efd11c6cbbd9efe7fed5bc0db220b09665",
            f"incorrect first byte of secret: 0xef ({ONLY_EE} are supported)",
        ),
    ],
)
def test_rejected(text: str, message: str) -> None:
    with pytest.raises(SecretError) as info:
        Secret.parse(text)
    assert str(info.value) == message
    assert isinstance(info.value, ProtocolError)


def test_dd_secret_in_base64_is_explained() -> None:
    dd = base64.urlsafe_b64encode(b"\xdd" + VECTOR_KEY).rstrip(b"=").decode()
    with pytest.raises(SecretError, match="legacy 'dd' secrets are not supported"):
        Secret.parse(dd)


def test_key_of_16_bytes_ee_but_no_room_for_host() -> None:
    with pytest.raises(SecretError, match=r"^secret has incorrect length 1\b"):
        Secret.parse("ee11")


# -- Go decoder rules that Python's own decoders do not follow ---------------------------


def test_hex_with_spaces_is_not_hex() -> None:
    # bytes.fromhex would take this; Go's hex decoder does not, nor does base64 (space).
    spaced = " ".join(VECTOR_HEX[i : i + 2] for i in range(0, len(VECTOR_HEX), 2))
    assert bytes.fromhex(spaced) == bytes.fromhex(VECTOR_HEX)
    with pytest.raises(SecretError, match="illegal base64 data at input byte 2"):
        Secret.parse(spaced)


def test_hex_is_tried_first() -> None:
    # Valid as both hex and base64: must be read as hex.
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    text = "ee" + key.hex() + "abcd"
    secret = Secret.parse(text)
    assert secret.key == key
    assert secret.host_bytes == b"\xab\xcd"
    assert secret.hex() == text


def test_base64_padding_is_rejected() -> None:
    with pytest.raises(SecretError, match="illegal base64 data at input byte 36"):
        Secret.parse(VECTOR_B64 + "=")
    padded = base64.urlsafe_b64encode(b"\xee" + VECTOR_KEY + b"google.co").decode()
    assert padded.endswith("=")
    with pytest.raises(SecretError, match="illegal base64 data"):
        Secret.parse(padded)


def test_standard_alphabet_is_rejected() -> None:
    standard = base64.b64encode(bytes.fromhex(VECTOR_HEX)).decode()
    assert "+" in standard
    with pytest.raises(SecretError, match=f"input byte {standard.index('+')}"):
        Secret.parse(standard)
    with pytest.raises(SecretError, match="input byte 3"):
        Secret.parse(VECTOR_B64[:3] + "/" + VECTOR_B64[4:])


def test_base64_skips_cr_lf_like_go() -> None:
    text = VECTOR_B64[:10] + "\r\n" + VECTOR_B64[10:] + "\n"
    assert Secret.parse(text) == Secret(VECTOR_KEY, VECTOR_HOST)


def test_base64_lone_trailing_char_is_rejected() -> None:
    with pytest.raises(SecretError, match=f"input byte {len(VECTOR_B64)}"):
        Secret.parse(VECTOR_B64 + "A")


def test_base64_non_zero_trailing_bits_are_ignored_like_go() -> None:
    # 26 bytes -> 35 characters whose last one carries 2 unused bits; Go ignores them.
    secret = Secret(VECTOR_KEY, "google.co")
    text = secret.base64()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(text[-1])
    assert len(text) == 35 and last & 0b11 == 0
    assert Secret.parse(text[:-1] + alphabet[last | 0b01]) == secret
    assert Secret.parse(text[:-1] + alphabet[last | 0b11]) == secret


def test_non_ascii_reports_byte_offset() -> None:
    with pytest.raises(SecretError, match="input byte 1"):
        Secret.parse("7é")


def test_only_newlines_is_truncated() -> None:
    with pytest.raises(SecretError, match="secret is truncated, length=0"):
        Secret.parse("\n")


# -- the object itself -----------------------------------------------------------------


def test_repr_does_not_reveal_key() -> None:
    secret = Secret(VECTOR_KEY, VECTOR_HOST)
    for text in (repr(secret), str(secret), f"{secret}"):
        assert VECTOR_KEY.hex() not in text
        assert VECTOR_B64[:22] not in text
        assert repr(VECTOR_KEY) not in text
        assert "google.com" in text


def test_frozen() -> None:
    secret = Secret(VECTOR_KEY, VECTOR_HOST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        secret.host = "example.com"  # type: ignore[misc]


def test_bad_key_length_is_refused() -> None:
    with pytest.raises(SecretError):
        Secret(b"short", "example.com")


def test_is_valid() -> None:
    assert not Secret(bytes(16), "example.com").is_valid()
    assert not Secret(VECTOR_KEY, "").is_valid()
    zero = Secret.parse("ee" + "00" * 16 + b"example.com".hex())  # parses, but is not valid
    assert not zero.is_valid()


def test_generate() -> None:
    first = Secret.generate("example.com")
    second = Secret.generate("example.com")
    assert first.host == "example.com"
    assert len(first.key) == 16
    assert first.key != second.key
    assert first.is_valid()
    assert Secret.parse(first.base64()) == first
    assert Secret.parse(first.hex()) == first


def test_raw_host_bytes_round_trip() -> None:
    raw = b"\xee" + VECTOR_KEY + b"\xff\xfeho\x00st"
    secret = Secret.parse(raw.hex())
    assert secret.host_bytes == b"\xff\xfeho\x00st"
    assert secret.to_bytes() == raw
    assert Secret.parse(secret.base64()).to_bytes() == raw


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=1, max_size=64))
def test_round_trip_property(key: bytes, host: bytes) -> None:
    raw = b"\xee" + key + host
    by_hex = Secret.parse(raw.hex())
    by_b64 = Secret.parse(base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    assert by_hex == by_b64
    assert by_hex.key == key
    assert by_hex.host_bytes == host
    assert by_hex.to_bytes() == raw
    assert Secret.parse(by_hex.hex()) == by_hex
    assert Secret.parse(by_hex.base64()) == by_hex


@given(st.text(max_size=80))
def test_parse_fuzz_text(text: str) -> None:
    try:
        secret = Secret.parse(text)
    except SecretError:
        return
    assert len(secret.key) == 16
    assert secret.host_bytes


@given(st.text(alphabet="0123456789abcdefABCDEF-_+/=\r\n xyzXYZ", max_size=80))
def test_parse_fuzz_near_valid(text: str) -> None:
    try:
        secret = Secret.parse(text)
    except SecretError:
        return
    assert secret.to_bytes()[0] == 0xEE

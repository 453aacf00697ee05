from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from mtgworkers.protocol.obfs2 import (
    FRAME_LEN,
    TAG_ABRIDGED,
    TAG_INTERMEDIATE,
    TAG_PADDED,
    TAGS,
    Obfs2Error,
    dc_number,
    generate_dc_frame,
    parse_client_frame,
)
from tests.support.vectors import MTG_VECTORS

SNAPSHOT = MTG_VECTORS / "client-handshake-snapshot-4529d55776e2d427.json"


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _ctr(key: bytes, iv: bytes) -> Cipher[modes.CTR]:
    return Cipher(algorithms.AES(key), modes.CTR(iv))


def _client_frame(secret: bytes, tag: bytes, dc: int) -> tuple[bytes, CipherContext, CipherContext]:
    """What a Telegram client does: returns (wire frame, client encryptor, client decryptor)."""
    plain = bytearray(os.urandom(FRAME_LEN))
    plain[56:60] = tag
    plain[60:62] = dc.to_bytes(2, "little", signed=True)
    enc = _ctr(hashlib.sha256(bytes(plain[8:40]) + secret).digest(), bytes(plain[40:56]))
    encryptor = enc.encryptor()
    encrypted = encryptor.update(bytes(plain))
    rev = bytes(plain[8:56])[::-1]
    decryptor = _ctr(hashlib.sha256(rev[:32] + secret).digest(), rev[32:]).decryptor()
    return bytes(plain[:56]) + encrypted[56:], encryptor, decryptor


# --- client frame -----------------------------------------------------------------------------


def test_mtg_snapshot_vector() -> None:
    data = json.loads(SNAPSHOT.read_text())
    secret = _b64(data["secret"])
    frame = _b64(data["frame"])
    assert len(secret) == 16
    assert len(frame) == FRAME_LEN

    hs = parse_client_frame(frame, secret)

    assert hs.tag == TAG_PADDED
    assert hs.dc == 2 == data["dc"]
    assert dc_number(hs.dc) == 2
    # client -> proxy continues at keystream offset 64
    assert hs.decryptor.update(_b64(data["decrypted"]["cipher"])) == _b64(data["decrypted"]["text"])
    assert _b64(data["decrypted"]["cipher"]) == b"abcdefg"
    # proxy -> client starts at keystream offset 0
    assert hs.encryptor.update(_b64(data["encrypted"]["text"])) == _b64(data["encrypted"]["cipher"])
    assert _b64(data["encrypted"]["text"]) == bytes(range(1, 11))


def test_snapshot_wrong_secret_is_rejected() -> None:
    data = json.loads(SNAPSHOT.read_text())
    secret = bytearray(_b64(data["secret"]))
    secret[0] ^= 1
    with pytest.raises(Obfs2Error, match=r"unsupported connection type: [0-9a-f]{8}$"):
        parse_client_frame(_b64(data["frame"]), bytes(secret))


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("dc", [1, 2, 5, 203, -2, -4, 0, 10002, -10004, 32767, -32768])
def test_all_tags_and_signed_dc(tag: bytes, dc: int) -> None:
    secret = os.urandom(16)
    frame, client_enc, client_dec = _client_frame(secret, tag, dc)

    hs = parse_client_frame(frame, secret)

    assert hs.tag == tag
    assert hs.dc == dc
    payload = os.urandom(100)
    assert hs.decryptor.update(client_enc.update(payload)) == payload
    assert client_dec.update(hs.encryptor.update(payload)) == payload


def test_accepts_bytearray_and_memoryview() -> None:
    secret = os.urandom(16)
    frame, _, _ = _client_frame(secret, TAG_INTERMEDIATE, 4)
    assert parse_client_frame(bytearray(frame), secret).dc == 4
    assert parse_client_frame(memoryview(frame), secret).dc == 4


def test_bad_tag_message() -> None:
    secret = os.urandom(16)
    frame, _, _ = _client_frame(secret, b"\x01\x02\x03\x04", 2)
    with pytest.raises(Obfs2Error) as exc:
        parse_client_frame(frame, secret)
    assert str(exc.value) == "unsupported connection type: 01020304"


@pytest.mark.parametrize("length", [0, 1, 63, 65, 128])
def test_wrong_frame_length(length: int) -> None:
    with pytest.raises(Obfs2Error):
        parse_client_frame(os.urandom(length), os.urandom(16))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(0, 2), (1, 1), (2, 2), (-2, 2), (5, 5), (-5, 5), (203, 203), (10002, 10002), (-10002, 10002)],
)
def test_dc_number(raw: int, expected: int) -> None:
    assert dc_number(raw) == expected


@given(frame=st.binary(min_size=0, max_size=80), key=st.binary(min_size=16, max_size=16))
def test_fuzz_only_obfs2_error(frame: bytes, key: bytes) -> None:
    try:
        hs = parse_client_frame(frame, key)
    except Obfs2Error:
        return
    assert len(frame) == FRAME_LEN
    assert hs.tag in TAGS


@given(
    frame=st.binary(min_size=FRAME_LEN, max_size=FRAME_LEN), key=st.binary(min_size=16, max_size=16)
)
def test_fuzz_random_frames(frame: bytes, key: bytes) -> None:
    try:
        hs = parse_client_frame(frame, key)
    except Obfs2Error as exc:
        assert str(exc).startswith("unsupported connection type: ")
    else:
        assert hs.tag in TAGS


# --- DC frame ---------------------------------------------------------------------------------


def _dc_side(wire: bytes) -> tuple[bytes, CipherContext, CipherContext]:
    """What a Telegram DC does with our frame: (decrypted frame, DC decryptor, DC encryptor)."""
    dc_decryptor = _ctr(wire[8:40], wire[40:56]).decryptor()
    plain = dc_decryptor.update(wire)
    rev = wire[8:56][::-1]
    dc_encryptor = _ctr(rev[:32], rev[32:48]).encryptor()
    return plain, dc_decryptor, dc_encryptor


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("dc", [1, 2, 4, 203, 10002, -2])
def test_dc_frame_decodes_like_a_dc(tag: bytes, dc: int) -> None:
    wire, encryptor, decryptor = generate_dc_frame(dc, tag)

    assert len(wire) == FRAME_LEN
    plain, dc_decryptor, dc_encryptor = _dc_side(wire)
    assert plain[56:60] == tag
    assert int.from_bytes(plain[60:62], "little", signed=True) == dc

    upstream = os.urandom(333)
    assert dc_decryptor.update(encryptor.update(upstream)) == upstream
    downstream = os.urandom(444)
    assert decryptor.update(dc_encryptor.update(downstream)) == downstream


def test_dc_frame_keys_are_unhashed_and_wire_layout() -> None:
    randomness = bytes(range(1, 65))
    wire, _, _ = generate_dc_frame(3, TAG_ABRIDGED, urandom=lambda n: randomness[:n])

    plain = bytearray(randomness)
    plain[56:60] = TAG_ABRIDGED
    plain[60:62] = (3).to_bytes(2, "little")
    encrypted = _ctr(randomness[8:40], randomness[40:56]).encryptor().update(bytes(plain))
    assert wire == bytes(plain[:56]) + encrypted[56:]


@pytest.mark.parametrize(
    "bad_prefix",
    [
        b"\xef\x00\x00\x00\x01\x01\x01\x01",
        b"HEAD\x01\x01\x01\x01",
        b"POST\x01\x01\x01\x01",
        b"GET \x01\x01\x01\x01",
        b"OPTI\x01\x01\x01\x01",
        b"\x16\x03\x01\x02\x01\x01\x01\x01",
        b"\xdd\xdd\xdd\xdd\x01\x01\x01\x01",
        b"\xee\xee\xee\xee\x01\x01\x01\x01",
        b"\x01\x02\x03\x04\x00\x00\x00\x00",
    ],
)
def test_dc_frame_forbidden_prefixes_are_regenerated(bad_prefix: bytes) -> None:
    good = b"\x01\x02\x03\x04\x05\x06\x07\x08" + os.urandom(56)
    bad = bad_prefix + os.urandom(56)
    supply = iter([bad, bad, good])
    requested: list[int] = []

    def urandom(n: int) -> bytes:
        requested.append(n)
        return next(supply)

    wire, _, _ = generate_dc_frame(2, TAG_PADDED, urandom=urandom)

    assert requested == [64, 64, 64]
    assert wire[:56] == good[:56]


def test_dc_frame_allowed_prefixes_are_kept() -> None:
    # Near misses of the forbidden list must not be rejected.
    frame = b"\xee\xee\xee\xef\x00\x00\x00\x01" + bytes(56)
    wire, _, _ = generate_dc_frame(2, TAG_PADDED, urandom=lambda n: frame)
    assert wire[:8] == frame[:8]


def test_dc_frame_random_frames_never_forbidden() -> None:
    for _ in range(2000):
        wire, _, _ = generate_dc_frame(2, TAG_PADDED)
        assert wire[0] != 0xEF
        assert wire[4:8] != bytes(4)
        assert wire[:4] not in (b"HEAD", b"POST", b"GET ", b"OPTI", TAG_PADDED, TAG_INTERMEDIATE)


@pytest.mark.parametrize(
    "tag", [b"", b"\xdd\xdd\xdd", b"\x00\x00\x00\x00", b"\xdd\xdd\xdd\xdd\xdd"]
)
def test_dc_frame_bad_tag(tag: bytes) -> None:
    with pytest.raises(Obfs2Error):
        generate_dc_frame(2, tag)


@pytest.mark.parametrize("dc", [32768, -32769, 100000])
def test_dc_frame_bad_dc(dc: int) -> None:
    with pytest.raises(Obfs2Error):
        generate_dc_frame(dc, TAG_PADDED)


def test_client_to_dc_end_to_end() -> None:
    """Client frame in, DC frame out, payload re-encrypted both ways as the relay would."""
    secret = os.urandom(16)
    client_frame, client_enc, client_dec = _client_frame(secret, TAG_INTERMEDIATE, -4)
    hs = parse_client_frame(client_frame, secret)
    wire, dc_enc, dc_dec = generate_dc_frame(dc_number(hs.dc), hs.tag)
    _, telegram_dec, telegram_enc = _dc_side(wire)

    up = os.urandom(1000)
    assert telegram_dec.update(dc_enc.update(hs.decryptor.update(client_enc.update(up)))) == up
    down = os.urandom(1000)
    assert client_dec.update(hs.encryptor.update(dc_dec.update(telegram_enc.update(down)))) == down

from __future__ import annotations

from savegame.format import hashing


def test_digest_is_xxh3_128_hex_and_deterministic() -> None:
    d = hashing.digest(b"savegame")
    assert len(d) == 32 and int(d, 16) >= 0
    assert d == hashing.digest(memoryview(b"savegame"))
    assert hashing.ALGORITHM == "xxh3-128"


def test_digest_changes_with_any_flipped_bit() -> None:
    data = bytearray(b"\x00" * 64)
    base = hashing.digest(bytes(data))
    for i in range(0, 64 * 8, 37):
        data[i // 8] ^= 1 << (i % 8)
        assert hashing.digest(bytes(data)) != base
        data[i // 8] ^= 1 << (i % 8)


def test_incremental_hasher_equals_one_shot_digest() -> None:
    h = hashing.new()
    for part in (b"ab", b"", b"cdef"):
        h.update(part)
    assert h.hexdigest() == hashing.digest(b"abcdef")


def test_file_hash_depends_on_header_digests_and_their_order() -> None:
    a, b = hashing.digest(b"a"), hashing.digest(b"b")
    base = hashing.file_hash(b"hdr", [a, b])
    assert base == hashing.file_hash(b"hdr", [a, b])
    assert base != hashing.file_hash(b"hdR", [a, b])
    assert base != hashing.file_hash(b"hdr", [b, a])
    assert base != hashing.file_hash(b"hdr", [a])


def test_file_hash_refuses_a_digest_that_is_not_hex_with_a_typed_error() -> None:
    import pytest

    from savegame import errors

    for bad in ("zz" * 16, "0" * 31, "A" * 32):
        with pytest.raises(errors.IntegrityError) as info:
            hashing.file_hash(b"hdr", [bad], path="/ckpt/rank-00000.safetensors")
        assert info.value.path == "/ckpt/rank-00000.safetensors"

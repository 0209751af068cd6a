"""Upload compression (top-k, QSGD) and the messages that carry it."""

import math
import struct

import numpy as np
import pytest

from fedscalar.algorithms.compression import (
    QSGD,
    Compressor,
    TopK,
    dense,
    levels,
    make_compressor,
    pack_codes,
    unpack_codes,
)
from fedscalar.messages import (
    DeltaReply,
    MessageError,
    QuantizedDeltaReply,
    SeedProbabilities,
    SeedReply,
    SeedSync,
    SparseDeltaReply,
    decode,
    encode,
    packed_size,
)

# --------------------------------------------------------------------------- messages


def _same(a, b):
    assert type(a) is type(b)
    for field in a.__dataclass_fields__:
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray)
            assert y.dtype == x.dtype
            assert y.shape == x.shape
            np.testing.assert_array_equal(x, y)
        elif isinstance(x, float):
            assert np.float32(x) == np.float32(y)
        else:
            assert x == y


SPARSE = SparseDeltaReply(
    5, 0.25, 10, np.array([0, 3, 9], np.uint32), np.array([1.5, -2.0, 0.125], np.float32)
)
# 5 codes x 3 bits = 15 bits -> 2 bytes
QUANT = QuantizedDeltaReply(2, 1.5, 5, 3, 0.75, bytes([0xF5, 0x21]))
SEED_REPLY = SeedReply(4, 0.5, (7, 2**32 - 1), np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5)
SEED_SYNC = SeedSync(3, 1, np.array([1, 4, 10], np.uint32), np.array([0.5, -1.0, 3.0], np.float32))
PROBS = SeedProbabilities(1, np.array([0.5, 0.25, 0.25, 0.0], np.float32))

# Sizes from the documented layouts, counted by hand:
#   sparse: u8 tag + u32 round + f32 loss + u32 n + u32 c = 17, then 4 + 4 per entry
#   quantised: u8 + u32 + f32 + u32 + u8 bits + f32 scale = 18, then ceil(n*bits/8)
#   seed reply: u8 + u32 + f32 + u8 K + u8 P = 11, then 4K indices + 4KP scalars
#   seed sync: u8 + u32 + u32 c = 9, then 8 per key
#   probabilities: u8 + u32 + u32 n = 9, then 4 per seed
CASES = [
    pytest.param(SPARSE, 17 + 8 * 3, id="sparse"),
    pytest.param(QUANT, 18 + math.ceil(5 * 3 / 8), id="quantized"),
    pytest.param(SEED_REPLY, 11 + 4 * 2 + 4 * 2 * 3, id="seed-reply"),
    pytest.param(SEED_SYNC, 13 + 8 * 3, id="seed-sync"),
    pytest.param(PROBS, 9 + 4 * 4, id="probabilities"),
]


@pytest.mark.parametrize(("msg", "size"), CASES)
def test_round_trip_and_size(msg, size):
    data = encode(msg)
    assert len(data) == size
    _same(msg, decode(data))


def test_round_trip_types():
    back = decode(encode(SPARSE))
    assert back.indices.dtype == np.uint32 and back.values.dtype == np.float32
    assert back.size == 10 and back.round == 5
    back = decode(encode(QUANT))
    assert back.bits == 3 and back.scale == 0.75 and back.codes == bytes([0xF5, 0x21])
    back = decode(encode(SEED_REPLY))
    assert back.indices == (7, 2**32 - 1)
    assert back.scalars.dtype == np.float32 and back.scalars.shape == (2, 3)
    back = decode(encode(SEED_SYNC))
    assert back.keys.dtype == np.uint32 and back.values.dtype == np.float32
    back = decode(encode(PROBS))
    assert back.probabilities.dtype == np.float32


def test_empty_sparse_and_seed_sync_round_trip():
    empty = SparseDeltaReply(0, 0.0, 4, np.zeros(0, np.uint32), np.zeros(0, np.float32))
    assert len(encode(empty)) == 17
    _same(empty, decode(encode(empty)))
    sync = SeedSync(1, 0, np.zeros(0, np.uint32), np.zeros(0, np.float32))
    assert len(encode(sync)) == 13
    with pytest.raises(MessageError, match="from round 1 to 1"):
        decode(encode(sync)[:5] + struct.pack("<I", 1) + encode(sync)[9:])
    _same(sync, decode(encode(sync)))


def test_sparse_header_bytes():
    data = encode(SPARSE)
    assert data[:17] == struct.pack("<BIfII", 8, 5, 0.25, 10, 3)
    assert data[17:29] == struct.pack("<3I", 0, 3, 9)
    assert data[29:] == struct.pack("<3f", 1.5, -2.0, 0.125)


def test_quantized_header_bytes():
    data = encode(QUANT)
    assert data == struct.pack("<BIfIBf", 9, 2, 1.5, 5, 3, 0.75) + bytes([0xF5, 0x21])


def test_quantized_encode_checks_code_length():
    with pytest.raises(MessageError):
        encode(QuantizedDeltaReply(0, 0.0, 5, 3, 1.0, bytes(3)))


@pytest.mark.parametrize(("msg", "size"), CASES)
def test_every_truncation_rejected(msg, size):
    data = encode(msg)
    for cut in range(len(data)):
        with pytest.raises(MessageError):
            decode(data[:cut])


@pytest.mark.parametrize(("msg", "size"), CASES)
def test_trailing_bytes_rejected(msg, size):
    with pytest.raises(MessageError, match="trailing"):
        decode(encode(msg) + b"\x00")


def _sparse_bytes(n, indices, values=None):
    values = [1.0] * len(indices) if values is None else values
    return (
        struct.pack("<BIfII", 8, 0, 0.0, n, len(indices))
        + struct.pack(f"<{len(indices)}I", *indices)
        + struct.pack(f"<{len(values)}f", *values)
    )


def test_sparse_bytes_helper_is_valid():
    msg = decode(_sparse_bytes(5, [1, 4], [2.0, 3.0]))
    np.testing.assert_array_equal(msg.indices, [1, 4])
    np.testing.assert_array_equal(msg.values, [2.0, 3.0])


@pytest.mark.parametrize(
    ("n", "indices"),
    [
        (5, [1, 1]),  # repeated
        (5, [0, 2, 2, 4]),  # repeated in the middle
        (3, [0, 3]),  # last index == size
        (3, [7]),  # single index beyond the size
        (3, [0, 1, 2, 3]),  # more entries than the size
    ],
)
def test_sparse_malformed_rejected(n, indices):
    with pytest.raises(MessageError):
        decode(_sparse_bytes(n, indices))


def test_sparse_more_entries_than_size_rejected_before_reading():
    # header claims 4 entries for a vector of 3; the check fires even without a body
    with pytest.raises(MessageError, match="4 entries"):
        decode(struct.pack("<BIfII", 8, 0, 0.0, 3, 4))


@pytest.mark.parametrize(("n", "indices"), [(5, [2, 1]), (3, [5, 1])])
def test_sparse_decreasing_indices_rejected(n, indices):
    with pytest.raises(MessageError):
        decode(_sparse_bytes(n, indices))


def _quant_bytes(n, bits, codes=None):
    codes = bytes(packed_size(n, bits)) if codes is None else codes
    return struct.pack("<BIfIBf", 9, 0, 0.0, n, bits, 1.0) + codes


@pytest.mark.parametrize("bits", [0, 1, 17, 32, 255])
def test_quantized_bits_out_of_range_rejected(bits):
    with pytest.raises(MessageError, match="bits"):
        decode(_quant_bytes(4, bits))


@pytest.mark.parametrize("bits", [2, 16])
def test_quantized_bits_at_range_ends_accepted(bits):
    msg = decode(_quant_bytes(4, bits))
    assert msg.bits == bits and len(msg.codes) == packed_size(4, bits)


def _sync_bytes(keys):
    c = len(keys)
    return (
        struct.pack("<BIII", 11, 1, 0, c)
        + struct.pack(f"<{c}I", *keys)
        + struct.pack(f"<{c}f", *([1.0] * c))
    )


def test_seed_sync_repeated_key_rejected():
    assert decode(_sync_bytes([1, 2, 3])).keys.tolist() == [1, 2, 3]
    with pytest.raises(MessageError, match="increasing"):
        decode(_sync_bytes([1, 3, 3]))


def test_seed_sync_decreasing_keys_rejected():
    with pytest.raises(MessageError):
        decode(_sync_bytes([5, 3]))


def _probs_bytes(values):
    n = len(values)
    return struct.pack("<BII", 12, 0, n) + np.asarray(values, "<f4").tobytes()


@pytest.mark.parametrize(
    "values",
    [
        [0.5, -0.1, 0.6],
        [0.5, float("nan"), 0.5],
        [0.5, float("inf"), 0.5],
        [0.0, 0.0, 0.0],
        [],
    ],
    ids=["negative", "nan", "inf", "all-zero", "empty"],
)
def test_seed_probabilities_invalid_rejected(values):
    with pytest.raises(MessageError, match="probabilities"):
        decode(_probs_bytes(values))


def test_seed_probabilities_with_some_zeros_accepted():
    msg = decode(_probs_bytes([0.0, 2.0, 0.0]))
    np.testing.assert_array_equal(msg.probabilities, [0.0, 2.0, 0.0])


def test_seed_reply_truncated_scalars_rejected():
    data = struct.pack("<BIfBB", 10, 0, 0.0, 1, 2) + struct.pack("<I", 3) + struct.pack("<f", 1.0)
    with pytest.raises(MessageError, match="truncated"):
        decode(data)


# --------------------------------------------------------------------------- code packing


@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(1000 + bits)
    for n in (1, 7, 37):
        codes = rng.integers(0, 2**bits, n).astype(np.uint32)
        data = pack_codes(codes, bits)
        assert len(data) == packed_size(n, bits) == math.ceil(n * bits / 8)
        np.testing.assert_array_equal(unpack_codes(data, n, bits), codes)


def test_pack_by_hand():
    # code i occupies bits 2i..2i+1: 1 -> bit0, 2 -> bit3, 3 -> bits 4,5
    assert pack_codes(np.array([1, 2, 3, 0]), 2) == bytes([0b00111001])
    assert pack_codes(np.array([1, 2, 3]), 2) == bytes([0x39])  # zero padding
    # 5=101 -> bits 0,2; 6=110 -> bits 4,5; 7=111 -> bits 6,7,8
    assert pack_codes(np.array([5, 6, 7]), 3) == bytes([0xF5, 0x01])
    assert pack_codes(np.array([0xABCD]), 16) == bytes([0xCD, 0xAB])
    np.testing.assert_array_equal(unpack_codes(bytes([0xF5, 0x01]), 3, 3), [5, 6, 7])
    np.testing.assert_array_equal(unpack_codes(bytes([0x39]), 4, 2), [1, 2, 3, 0])


def test_levels():
    assert [levels(b) for b in (2, 3, 4, 8, 16)] == [1, 3, 7, 127, 32767]


# --------------------------------------------------------------------------- top-k


def test_topk_by_hand():
    v = np.array([0.1, -3.0, 2.0, 0.5], np.float32)
    tk = TopK(0.5)
    reply = tk.compress(7, 1.25, v, np.random.default_rng(0))
    assert isinstance(reply, SparseDeltaReply)
    assert reply.round == 7 and reply.loss == 1.25 and reply.size == 4
    assert reply.indices.dtype == np.uint32 and reply.values.dtype == np.float32
    assert reply.indices.tolist() == [1, 2]
    assert reply.values.tolist() == [-3.0, 2.0]
    np.testing.assert_array_equal(dense(reply, 4), [0.0, -3.0, 2.0, 0.0])
    assert len(encode(reply)) == tk.max_bytes(4) == 17 + 8 * 2
    _same(reply, decode(encode(reply)))


@pytest.mark.parametrize(
    ("fraction", "n", "k"),
    [(0.5, 4, 2), (0.3, 4, 2), (0.25, 4, 1), (0.01, 4, 1), (1.0, 4, 4), (0.1, 95, 10)],
)
def test_topk_count(fraction, n, k):
    assert TopK(fraction).count(n) == k
    v = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert TopK(fraction).compress(0, 0.0, v, None).indices.size == k


def test_topk_keeps_largest_magnitudes():
    rng = np.random.default_rng(5)
    v = rng.standard_normal(50).astype(np.float32)
    reply = TopK(0.2).compress(0, 0.0, v, rng)
    expected = np.sort(np.argsort(-np.abs(v))[:10])
    np.testing.assert_array_equal(reply.indices, expected)
    np.testing.assert_array_equal(reply.values, v[expected])
    dropped = np.setdiff1d(np.arange(50), expected)
    assert np.abs(v[expected]).min() >= np.abs(v[dropped]).max()
    out = dense(reply, 50)
    np.testing.assert_array_equal(out[expected], v[expected])
    assert not out[dropped].any()


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_topk_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        TopK(fraction)


# --------------------------------------------------------------------------- QSGD


def _codes(reply):
    return unpack_codes(reply.codes, reply.size, reply.bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qsgd_values_on_grid(bits):
    rng = np.random.default_rng(bits)
    v = rng.standard_normal(40).astype(np.float32)
    reply = QSGD(bits).compress(3, 0.5, v, rng)
    assert isinstance(reply, QuantizedDeltaReply)
    assert reply.round == 3 and reply.size == 40 and reply.bits == bits
    L = 2 ** (bits - 1) - 1
    scale = float(np.abs(v).max())
    assert reply.scale == scale
    codes = _codes(reply).astype(np.int64)
    assert codes.min() >= 0 and codes.max() <= 2 * L
    out = dense(reply, 40)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (codes - L) * scale / L, rtol=1e-6, atol=0)
    # stochastic rounding picks one of the two grid points around each value
    level = np.abs(v.astype(np.float64)) / scale * L
    mag = np.abs(codes - L)
    assert np.all((mag == np.floor(level)) | (mag == np.ceil(level)))
    assert np.all(np.sign(codes - L) * np.sign(v) >= 0)
    assert len(encode(reply)) == QSGD(bits).max_bytes(40) == 18 + math.ceil(40 * bits / 8)


def test_qsgd_by_hand():
    # bits=3: L=3, scale=2 -> grid step 2/3; -2 -> code 0, 0 -> code 3, 2/3*k exact
    v = np.array([-2.0, 0.0, 2.0, np.float32(2 / 3)], np.float32)
    reply = QSGD(3).compress(0, 0.0, v, np.random.default_rng(0))
    assert reply.scale == 2.0
    assert _codes(reply).tolist() == [0, 3, 6, 4]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_qsgd_max_entry_code_exact(bits):
    rng = np.random.default_rng(bits)
    L = levels(bits)
    for sign in (1.0, -1.0):
        v = rng.standard_normal(9).astype(np.float32)
        v[4] = sign * (np.abs(v).max() + 1.0)
        reply = QSGD(bits).compress(0, 0.0, v, rng)
        assert reply.scale == float(abs(v[4]))
        assert _codes(reply)[4] == (2 * L if sign > 0 else 0)
        np.testing.assert_array_max_ulp(dense(reply, 9)[4], v[4], maxulp=1)


def test_qsgd_max_entry_exact_power_of_two():
    v = np.array([0.3, -4.0, 1.0], np.float32)
    for bits in (2, 3, 8):
        assert dense(QSGD(bits).compress(0, 0.0, v, np.random.default_rng(0)), 3)[1] == -4.0


def test_qsgd_max_entry_dense_bit_exact():
    v = np.array([3.0871227, -1.0, 0.5], np.float32)
    out = dense(QSGD(3).compress(0, 0.0, v, np.random.default_rng(0)), 3)
    assert out[0] == v[0]


@pytest.mark.parametrize("bits", [2, 4])
def test_qsgd_unbiased(bits):
    rng = np.random.default_rng(42)
    v = np.array([0.3, -0.7, 1.0, 0.05, -0.999, 0.5, 0.0, -0.2], np.float32)
    q = QSGD(bits)
    draws = 4000
    total = np.zeros(v.size, np.float64)
    seen = set()
    for _ in range(draws):
        out = dense(q.compress(0, 0.0, v, rng), v.size)
        total += out
        seen.add(float(out[0]))
    mean = total / draws
    L = levels(bits)
    scale = 1.0
    # each entry takes one of two grid points scale/L apart: variance <= (scale/L)^2 / 4
    stderr = math.sqrt((scale / L) ** 2 / 4 / draws)
    np.testing.assert_allclose(mean, v, rtol=0, atol=5 * stderr)
    # rounding is genuinely random: 0.3 lands on both neighbouring grid points
    assert len(seen) == 2


@pytest.mark.parametrize("bits", [2, 5, 16])
def test_qsgd_zero_vector(bits):
    reply = QSGD(bits).compress(0, 0.0, np.zeros(6, np.float32), np.random.default_rng(0))
    assert reply.scale == 0.0
    assert _codes(reply).tolist() == [levels(bits)] * 6
    out = dense(reply, 6)
    np.testing.assert_array_equal(out, np.zeros(6))


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_qsgd_rejects_bad_bits(bits):
    with pytest.raises(ValueError):
        QSGD(bits)


def test_qsgd_round_trip_through_bytes():
    rng = np.random.default_rng(9)
    v = rng.standard_normal(13).astype(np.float32)
    reply = QSGD(5).compress(1, 0.0, v, rng)
    back = decode(encode(reply))
    np.testing.assert_array_equal(dense(back, 13), dense(reply, 13))


# --------------------------------------------------------------------------- dense()


def test_dense_size_mismatch():
    with pytest.raises(ValueError):
        dense(SPARSE, 9)
    with pytest.raises(ValueError):
        dense(QuantizedDeltaReply(0, 0.0, 4, 2, 1.0, bytes([0x55])), 5)
    with pytest.raises(ValueError):
        dense(DeltaReply(0, 0.0, np.zeros(3, np.float32)), 4)


def test_dense_of_sparse_and_delta():
    np.testing.assert_array_equal(dense(SPARSE, 10), [1.5, 0, 0, -2.0, 0, 0, 0, 0, 0, 0.125])
    values = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(dense(DeltaReply(0, 0.0, values), 2), values)


def test_dense_quantized_by_hand():
    # bits=2, L=1: codes [0,1,2,1] -> [-1,0,1,0] * scale; packed 0b01_10_01_00 = 0x64
    reply = QuantizedDeltaReply(0, 0.0, 4, 2, 0.5, bytes([0x64]))
    np.testing.assert_array_equal(dense(reply, 4), [-0.5, 0.0, 0.5, 0.0])


@pytest.mark.parametrize(
    ("bits", "codes"),
    [
        (2, bytes([0x03])),  # L=1: code 3 > 2
        (3, bytes([0x07, 0x00])),  # L=3: code 7 > 6 in slot 0 (4 codes, 12 bits)
        (3, bytes([0x00, 0x0E])),  # L=3: code 7 in slot 3 (bits 9..11)
    ],
)
def test_dense_code_above_2L(bits, codes):
    reply = QuantizedDeltaReply(0, 0.0, 4, bits, 1.0, codes)
    decode(encode(reply))  # the wire format itself does not police code values
    with pytest.raises(ValueError, match="code above"):
        dense(reply, 4)


def test_dense_not_a_delta():
    with pytest.raises(TypeError):
        dense(SEED_SYNC, 3)


def test_make_compressor():
    assert isinstance(make_compressor("fedavg-topk", 0.1, 4), TopK)
    q = make_compressor("fedavg-qsgd", 0.1, 4)
    assert isinstance(q, QSGD) and q.bits == 4
    plain = make_compressor("fedavg", 0.1, 4)
    assert type(plain) is Compressor
    v = np.array([1.0, 2.0], np.float32)
    assert isinstance(plain.compress(0, 0.0, v, None), DeltaReply)
    assert plain.max_bytes(2) == 13 + 8

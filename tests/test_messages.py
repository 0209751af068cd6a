import numpy as np
import pytest

from fedscalar.messages import (
    CatchUp,
    DeltaReply,
    GlobalUpdate,
    MessageError,
    ScalarReply,
    StateMessage,
    TrainRequest,
    WeightsMessage,
    catch_up_size,
    decode,
    encode,
    state_size,
)


def _update(rnd, k=1, p=5):
    rng = np.random.default_rng(rnd)
    return GlobalUpdate(
        rnd,
        1e-3,
        tuple(int(s) for s in rng.integers(0, 2**32, k)),
        rng.standard_normal((k, p)).astype(np.float32),
    )


def _same(a, b):
    assert type(a) is type(b)
    for field in a.__dataclass_fields__:
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        elif isinstance(x, tuple) and x and isinstance(x[0], GlobalUpdate):
            for u, v in zip(x, y, strict=True):
                _same(u, v)
        elif x is None:
            assert y is None
        elif isinstance(x, float):
            assert np.float32(x) == np.float32(y)
        else:
            assert x == y


@pytest.mark.parametrize(
    "msg",
    [
        TrainRequest(7, 0.01, (123, 2**32 - 1)),
        ScalarReply(3, 2.5, np.arange(10, dtype=np.float32).reshape(2, 5)),
        _update(4, k=3, p=2),
        CatchUp((_update(2), _update(3), _update(4))),
        WeightsMessage(1, 0.1, np.linspace(-1, 1, 33, dtype=np.float32)),
        DeltaReply(1, 0.7, np.ones(5, np.float32)),
        StateMessage(9, np.arange(7, dtype=np.float32), None),
        StateMessage(9, np.arange(7, dtype=np.float32), np.ones(7, np.float32)),
    ],
)
def test_round_trip(msg):
    _same(decode(encode(msg)), msg)


def test_scalar_only_sizes_for_k1_p5():
    """DeComFL/HiSo with K=1, P=5: <= 16 B down (plus catch-up) and <= 32 B up."""
    assert len(encode(TrainRequest(1, 1e-3, (42,)))) == 14
    assert len(encode(ScalarReply(1, 0.5, np.zeros((1, 5), np.float32)))) == 31
    assert len(encode(CatchUp((_update(1), _update(2))))) == 11 + 2 * 28
    assert len(encode(_update(1))) == 35


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "empty"),
        (b"\x63", "unknown message tag"),
        (encode(TrainRequest(1, 0.1, (1, 2)))[:-1], "truncated"),
        (encode(TrainRequest(1, 0.1, (1,))) + b"\x00", "trailing"),
        (encode(CatchUp((_update(1),)))[:-4], "catch-up of 1 rounds needs"),
    ],
)
def test_malformed_input_is_rejected(data, match):
    with pytest.raises(MessageError, match=match):
        decode(data)


def test_catch_up_must_be_consecutive():
    with pytest.raises(MessageError, match="consecutive"):
        encode(CatchUp((_update(1), _update(3))))


def test_size_helpers_match_real_encodings():
    for rounds in (1, 3, 17):
        msg = CatchUp(tuple(_update(r, k=2, p=3) for r in range(1, rounds + 1)))
        assert catch_up_size(rounds, 2, 3) == len(encode(msg))
    for h in (None, np.ones(11, np.float32)):
        msg = StateMessage(1, np.zeros(11, np.float32), h)
        assert state_size(11, h is not None) == len(encode(msg))


def test_each_class_has_the_layout_protocol_md_specifies():
    """Tag, name and fixed header of every message, read from docs/protocol.md section 5."""
    import re
    import struct
    from pathlib import Path

    from fedscalar import messages

    spec = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    section = spec.split("## 5. Messages", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| [^|]+ \| `([^`]+)`", section, re.MULTILINE)
    assert len(rows) == len(messages._BY_TAG) == 14
    width = {"u8": 1, "u32": 4, "f32": 4}
    for tag, name, layout in rows:
        cls = messages._BY_TAG[int(tag)]
        assert cls.__name__ == name
        fixed = 0
        for field in layout.split(","):
            kind, *rest = field.split()
            if kind not in width or (rest and rest[0] == "x"):
                break
            fixed += width[kind]
        body = struct.calcsize(cls.BODY) if hasattr(cls, "BODY") else 0
        assert fixed == 1 + struct.calcsize(cls.HEAD) + body, name


def test_a_plugin_message_type_encodes_once_registered():
    import struct
    from dataclasses import dataclass
    from typing import ClassVar

    from fedscalar.messages import register_message

    @dataclass(frozen=True)
    class Vote:
        TAG: ClassVar[int] = 200
        HEAD: ClassVar[str] = "<Ib"
        round: int
        sign: int

        def _write(self) -> bytes:
            return struct.pack(self.HEAD, self.round, self.sign)

        @classmethod
        def _read(cls, r):
            return cls(*r.unpack(cls.HEAD, "header"))

    with pytest.raises(TypeError, match="not a message"):
        encode(Vote(3, -1))
    register_message(Vote)
    assert decode(encode(Vote(3, -1))) == Vote(3, -1) and len(encode(Vote(3, -1))) == 6
    with pytest.raises(MessageError, match="trailing"):
        decode(encode(Vote(3, -1)) + b"\0")

    @dataclass(frozen=True)
    class Clash:
        TAG: ClassVar[int] = 2  # ScalarReply's

    with pytest.raises(ValueError, match="ScalarReply's"):
        register_message(Clash)

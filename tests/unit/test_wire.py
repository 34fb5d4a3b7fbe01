"""fabric.wire: every encoder round-trips through decode; decode rejects junk with WireError only."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import wire

# ---------------------------------------------------------------------------------------------
# Round trips


def test_message_numbers_and_arity_are_stable() -> None:
    # The numbers are the protocol: changing one breaks every peer still running the old code.
    assert (wire.HELLO, wire.WELCOME, wire.REFUSED, wire.TLP, wire.IRQ, wire.REG, wire.REG_ACK,
            wire.CTL, wire.CTL_REP, wire.EVENT, wire.DROPPED, wire.CREDIT, wire.WASTED, wire.VMEXIT,
            wire.VMENTRY, wire.INJECT, wire.POSTED) == (1, 2, 3, 10, 11, 20, 21, 30, 31, 32, 40, 41, 42,
                                                         50, 51, 52, 53)
    assert set(wire.MESSAGE_NAMES) == set(wire._ARITY)
    assert wire.PROTOCOL_VERSION == 1
    assert wire.MAX_DATA_FRAME < wire.MAX_CONTROL_FRAME
    # The biggest TLP (4 KiB payload, 4DW header, prefix, digest) fits a data frame.
    assert len(wire.tlp(bytes(4096 + 24), 2**64 - 1, 2**63 - 1)) <= wire.MAX_DATA_FRAME


ENCODED = [
    (wire.hello("tok", "d0"), [wire.HELLO, wire.PROTOCOL_VERSION, "tok", "d0"]),
    (wire.welcome("d0", {"role": "device", "buses": [1, 1]}),
     [wire.WELCOME, wire.PROTOCOL_VERSION, "d0", {"role": "device", "buses": [1, 1]}]),
    (wire.refused("nope"), [wire.REFUSED, "nope"]),
    (wire.tlp(b"\x00" * 12), [wire.TLP, b"\x00" * 12, None, 0]),
    (wire.tlp(b"\x01\x02", 7, 123456789), [wire.TLP, b"\x01\x02", 7, 123456789]),
    (wire.irq(3, 0x41, 0x0100, 99, 12), [wire.IRQ, 3, 0x41, 0x0100, 99, 12]),
    (wire.irq(3, 0x41, None, 0), [wire.IRQ, 3, 0x41, None, 0, -1]),
    (wire.reg(5, "window.set", {"base": 1, "size": 2, "rid": 3}),
     [wire.REG, 5, "window.set", {"base": 1, "size": 2, "rid": 3}]),
    (wire.reg_ack(5, True, None), [wire.REG_ACK, 5, True, None]),
    (wire.reg_ack(6, False, "bad"), [wire.REG_ACK, 6, False, "bad"]),
    (wire.ctl(1, "d0", "status", {}), [wire.CTL, 1, "d0", "status", {}]),
    (wire.ctl_rep(1, True, {"x": [1, 2]}), [wire.CTL_REP, 1, True, {"x": [1, 2]}]),
    (wire.event("g1", "breach", {"n": 1}), [wire.EVENT, "g1", "breach", {"n": 1}]),
    (wire.dropped("oversized", 4), [wire.DROPPED, "oversized", 4]),
    (wire.credit(1500), [wire.CREDIT, 1500]),
    (wire.wasted(2, 64), [wire.WASTED, 2, 64]),
    (wire.batch([b"a", b"b"]), [wire.BATCH, [b"a", b"b"]]),
    (wire.vmexit("", 3, "cpuid", {"leaf": 1}), [wire.VMEXIT, "", 3, "cpuid", {"leaf": 1}]),
    (wire.vmentry("g1", 3, True, [1, 2, 3, 4]), [wire.VMENTRY, "g1", 3, True, [1, 2, 3, 4]]),
    (wire.inject("g1", 0, 0x41, 0x101, 5), [wire.INJECT, "g1", 0, 0x41, 0x101, 5]),
    (wire.posted(1, [[0x41, 0x101, 5]]), [wire.POSTED, 1, [[0x41, 0x101, 5]]]),
]


@pytest.mark.parametrize("frame, expected", ENCODED, ids=[wire.MESSAGE_NAMES[e[0]] + str(i) for i, (_, e) in enumerate(ENCODED)])
def test_encoder_roundtrip(frame: bytes, expected: list) -> None:
    assert type(frame) is bytes
    assert wire.decode(frame) == expected


def test_every_message_type_has_an_encoder_under_test() -> None:
    assert {e[0] for _, e in ENCODED} == set(wire._ARITY)


def test_bin_and_str_stay_distinct() -> None:
    # use_bin_type: a TLP's bytes come back as bytes, a name as str (the type checks rely on it).
    msg = wire.decode(wire.tlp(b"abc"))
    assert type(msg[1]) is bytes
    msg = wire.decode(wire.hello("abc", "n"))
    assert type(msg[2]) is str


texts = st.text(max_size=20)
ints = st.integers(-(2**63), 2**64 - 1)
leaves = st.none() | st.booleans() | ints | texts | st.binary(max_size=20) | st.floats(allow_nan=False)
values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                      max_leaves=12)
maps = st.dictionaries(texts, values, max_size=4)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_encoders_roundtrip_property(data) -> None:
    t = data.draw(texts)
    n = data.draw(ints)
    m = data.draw(maps)
    v = data.draw(values)
    raw = data.draw(st.binary(max_size=4200))
    origin = data.draw(st.none() | ints)
    b = data.draw(st.booleans())
    cases = [
        (wire.hello(t, t[::-1]), [1, 1, t, t[::-1]]),
        (wire.welcome(t, m), [2, 1, t, m]),
        (wire.refused(t), [3, t]),
        (wire.tlp(raw, origin, n), [10, raw, origin, n]),
        (wire.irq(n, n, origin, n, n), [11, n, n, origin, n, n]),
        (wire.reg(n, t, m), [20, n, t, m]),
        (wire.reg_ack(n, b, v), [21, n, b, v]),
        (wire.ctl(n, t, t, m), [30, n, t, t, m]),
        (wire.ctl_rep(n, b, v), [31, n, b, v]),
        (wire.event(t, t, m), [32, t, t, m]),
        (wire.dropped(t, n), [40, t, n]),
        (wire.credit(n), [41, n]),
        (wire.wasted(n, n), [42, n, n]),
    ]
    for frame, expected in cases:
        assert wire.decode(frame) == expected


@pytest.mark.parametrize("bad", [object(), 1 << 70, -(1 << 64), {1: {2}}])
def test_failed_encode_does_not_poison_the_shared_packer(bad) -> None:
    # The encoders share one autoreset Packer: a failed pack must not leave bytes behind.
    with pytest.raises((TypeError, OverflowError, ValueError)):
        wire.event("n", "k", {"x": [1, 2, bad]})
    assert wire.decode(wire.dropped("x", 1)) == [wire.DROPPED, "x", 1]


# ---------------------------------------------------------------------------------------------
# decode rejects junk with WireError only


@pytest.mark.parametrize("frame", [
    b"",
    b"\xc1",                                   # never-used msgpack byte
    b"\x94",                                   # truncated array
    msgpack.packb([1, 1, "t", "n"]) + b"\x00",  # trailing data
    msgpack.packb(None),
    msgpack.packb(1),
    msgpack.packb("HELLO"),
    msgpack.packb(b"\x01\x01"),
    msgpack.packb({"type": 1}),
    msgpack.packb([]),
    msgpack.packb([99, 1, 2]),                 # unknown type
    msgpack.packb([-1]),
    msgpack.packb(["1", 1, "t", "n"]),         # type as a string
    msgpack.packb([True, 1, "t", "n"]),        # bool is not an int here (True == 1)
    msgpack.packb([1.0, 1, "t", "n"]),
    msgpack.packb([None, 1, "t", "n"]),
    msgpack.packb([[1], 1, "t", "n"]),
    msgpack.packb([1, 1, "t"]),                # wrong arity
    msgpack.packb([1, 1, "t", "n", "x"]),
    msgpack.packb([10, b""]),
    msgpack.packb([11, 0, 0, None, 0]),
    msgpack.packb([3]),
    b"\x91" * 5000 + b"\xc0",                  # nesting deeper than the unpacker's stack
    b"\xdd\xff\xff\xff\xff",                   # array header claiming 4G elements
    b"\xc6\x7f\xff\xff\xff",                   # bin header claiming 2 GiB
    b"\x81\x91\x01\xc0",                       # map with an unhashable (array) key
], ids=lambda f: f[:12].hex() or "empty")
def test_decode_rejects(frame: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(frame)


@pytest.mark.parametrize("frame", [None, "text", 12, [1, 1, "t", "n"], object()])
def test_decode_rejects_non_buffers(frame) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(frame)  # type: ignore[arg-type]


def test_decode_rejects_oversized_containers() -> None:
    too_long = msgpack.packb([wire.EVENT, "n", "k", {"a": list(range((1 << 16) + 1))}])
    with pytest.raises(wire.WireError):
        wire.decode(too_long)
    big_bin = msgpack.packb([wire.TLP, bytes(wire.MAX_CONTROL_FRAME + 1), None, 0])
    with pytest.raises(wire.WireError):
        wire.decode(big_bin)


def test_decode_accepts_buffer_types() -> None:
    frame = wire.dropped("x", 1)
    assert wire.decode(bytearray(frame)) == wire.decode(memoryview(frame)) == [40, "x", 1]


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(wire.WireError, ValueError)


def _decode_or_wire_error(frame) -> None:
    try:
        msg = wire.decode(frame)
    except wire.WireError:
        return
    assert type(msg) is list and type(msg[0]) is int and len(msg) == wire._ARITY[msg[0]]


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_decode_random_bytes_only_wire_error(frame: bytes) -> None:
    _decode_or_wire_error(frame)


@settings(max_examples=500, deadline=None)
@given(kind=st.sampled_from(sorted(wire._ARITY)) | ints, rest=st.lists(values, max_size=7),
       tail=st.binary(max_size=3))
def test_decode_random_arrays_only_wire_error(kind, rest, tail: bytes) -> None:
    frame = msgpack.packb([kind, *rest], use_bin_type=True)
    _decode_or_wire_error(frame)
    _decode_or_wire_error(frame + tail)
    _decode_or_wire_error(frame[:-1])


# ---------------------------------------------------------------------------------------------
# Typed views


def test_as_hello() -> None:
    h = wire.as_hello(wire.decode(wire.hello("tok", "d0")))
    assert h == wire.Hello(1, "tok", "d0") and h.token == "tok" and h.name == "d0"


@pytest.mark.parametrize("msg", [
    [1, "1", "tok", "d0"], [1, True, "tok", "d0"], [1, 1.0, "tok", "d0"], [1, 1, b"tok", "d0"],
    [1, 1, "tok", None], [1, 1, 5, "d0"], [1, None, "tok", "d0"],
])
def test_as_hello_type_checks(msg: list) -> None:
    with pytest.raises(wire.WireError):
        wire.as_hello(msg)


def test_as_ctl() -> None:
    c = wire.as_ctl(wire.decode(wire.ctl(9, "d0", "status", {"a": 1})))
    assert c == wire.Ctl(9, "d0", "status", {"a": 1})


@pytest.mark.parametrize("msg", [
    [30, "9", "d0", "op", {}], [30, False, "d0", "op", {}], [30, 9, b"d0", "op", {}],
    [30, 9, "d0", 1, {}], [30, 9, "d0", "op", []], [30, 9, "d0", "op", None], [30, 9.0, "d0", "op", {}],
])
def test_as_ctl_type_checks(msg: list) -> None:
    with pytest.raises(wire.WireError):
        wire.as_ctl(msg)


def test_as_reg() -> None:
    r = wire.as_reg(wire.decode(wire.reg(4, "ir.enable", {"on": True})))
    assert r == wire.Reg(4, "ir.enable", {"on": True})


@pytest.mark.parametrize("msg", [
    [20, "4", "op", {}], [20, True, "op", {}], [20, 4, None, {}], [20, 4, b"op", {}],
    [20, 4, "op", [("on", True)]], [20, 4, "op", "on"],
])
def test_as_reg_type_checks(msg: list) -> None:
    with pytest.raises(wire.WireError):
        wire.as_reg(msg)


def test_check_tlp() -> None:
    assert wire.check_tlp(wire.decode(wire.tlp(b"\x01", 5, 6))) == (b"\x01", 5, 6)
    assert wire.check_tlp(wire.decode(wire.tlp(b"\x01"))) == (b"\x01", None, 0)
    for bad in ([10, "x", None, 0], [10, b"x", "o", 0], [10, b"x", True, 0], [10, b"x", None, None],
                [10, b"x", None, 1.5], [10, bytearray(b"x"), None, 0]):
        with pytest.raises(wire.WireError):
            wire.check_tlp(bad)


typed_fields = st.lists(st.one_of(values, ints, texts, maps, st.binary(max_size=8)), min_size=4, max_size=4)


@settings(max_examples=500, deadline=None)
@given(typed_fields)
def test_typed_views_only_wire_error(fields: list) -> None:
    # Right arity, any field values: the views raise WireError or return well-typed tuples.
    shapes = ((wire.as_hello, wire.HELLO, (int, str, str)), (wire.as_reg, wire.REG, (int, str, dict)),
              (wire.check_tlp, wire.TLP, (bytes, (int, type(None)), int)),
              (wire.as_ctl, wire.CTL, (int, str, str, dict)))
    for view, kind, types in shapes:
        msg = [kind, *fields[:len(types)]]
        try:
            out = view(msg)
        except wire.WireError:
            continue
        for value, t in zip(out, types):
            assert type(value) in (t if isinstance(t, tuple) else (t,)), (view.__name__, out)


def test_batch_roundtrip_and_refusals() -> None:
    frames = [wire.tlp(bytes(range(16)), 5, 6), wire.event("d0", "ready", {}), wire.credit(3)]
    raw = wire.batch(frames)
    assert raw[:2] == wire.BATCH_PREFIX and wire.unbatch(raw) == frames
    assert wire.unbatch(wire.batch(frames * 21 + [frames[0]])) == frames * 21 + [frames[0]]   # 64
    for bad in ([frames[0]],                          # one frame is not a batch
                frames * 22,                          # 66 > BATCH_MAX
                [frames[0], "text"],                  # not bytes
                [frames[0], wire.batch(frames)]):     # nested
        with pytest.raises(wire.WireError):
            wire.unbatch(wire._packb([wire.BATCH, bad]))
    with pytest.raises(wire.WireError):
        wire.unbatch(wire._packb([wire.BATCH, 7]))


def test_decode_is_the_same_on_both_sides_of_its_64_kib_fast_path() -> None:
    """Up to 64 KiB decode lets msgpack bound lengths by the buffer (no looser than its own
    limits); above, its explicit limits apply: an array of more than 65,536 items is refused."""
    for size in (wire._SMALL - 1, wire._SMALL, wire._SMALL + 1):
        n = size - len(wire.ctl_rep(7, True, b"x" * 1000)) + 1000    # bin 16 or 32: fixed headers
        frame = wire.ctl_rep(7, True, b"x" * n)
        assert len(frame) == size, (len(frame), size)
        assert wire.decode(frame) == [wire.CTL_REP, 7, True, b"x" * n]
    big = msgpack.packb([wire.CTL_REP, 7, True, [None] * (wire._SMALL + 1)])
    with pytest.raises(wire.WireError, match="not msgpack"):
        wire.decode(big)

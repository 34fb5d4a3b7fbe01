"""fabric.tlp: round trips, canonical decoding, known vectors, malformed input, constructors.

Bit layouts under test are the ASCII maps in ``fabric/tlp.py``.  The vectors in
``test_digest_vectors`` are the cocotbext-pcie 0.2.16 outputs recorded in
shared/reference/pcie-tlp-config-siov.md section 1.5; the PASID prefix vectors come from the
PCIe Base Specification 6.20.2.1 Table 6-15 (PMR = DW bit 23, ER = bit 22, bits 21:20 reserved).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.bdf import Bdf
from fabric.tlp import (
    MSI_ADDR_HI,
    MSI_ADDR_LO,
    PASID_PREFIX_BYTE0,
    CplStatus,
    Tlp,
    TlpAttr,
    TlpError,
    TlpType,
    peek,
    prefix_pasid,
    stamp_completer,
    stamp_requester,
)

T = TlpType
MEM_TYPES = (T.MEM_READ, T.MEM_READ_64, T.MEM_WRITE, T.MEM_WRITE_64)
WRITES = (T.MEM_WRITE, T.MEM_WRITE_64)
FIRST_CONTIG = (0xF, 0xE, 0xC, 0x8)
LAST_CONTIG = (0x1, 0x3, 0x7, 0xF)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# ---------------------------------------------------------------------------------------------
# Strategy: every valid TLP of every supported kind


def _lengths(hi: int = 1024):
    return st.one_of(st.integers(1, 4), st.integers(1, hi))


@st.composite
def tlps(draw, types=st.sampled_from(list(TlpType)), prefixes: bool = True, digests: bool = True):
    t = draw(types)
    rnd = draw(st.randoms(use_true_random=False))
    td = draw(st.booleans()) if digests else False
    common = dict(
        requester_id=draw(st.integers(0, 0xFFFF)),
        td=td,
        digest=draw(st.integers(0, 0xFFFF_FFFF)) if td else None,
        ep=draw(st.booleans()),
    )
    if t in MEM_TYPES:
        write = t in WRITES
        length = draw(_lengths())
        offset = draw(st.integers(0, (0x1000 - length * 4) // 4)) * 4
        if t in (T.MEM_READ_64, T.MEM_WRITE_64):
            page = draw(st.one_of(st.just(1 << 20), st.integers(1 << 20, (1 << 52) - 1)))
        else:
            page = draw(st.integers(0, (1 << 20) - 1))
        address = page << 12 | offset
        th = draw(st.booleans())
        at = draw(st.integers(0, 2))
        if th and not write:  # BE bits carry ST[7:0]
            fbe, lbe = draw(st.integers(0, 15)), draw(st.integers(0, 15))
        elif length == 1:
            fbe, lbe = draw(st.integers(0, 15)), 0
        elif length == 2 and address & 7 == 0:
            fbe, lbe = draw(st.integers(1, 15)), draw(st.integers(1, 15))
        else:
            fbe, lbe = draw(st.sampled_from(FIRST_CONTIG)), draw(st.sampled_from(LAST_CONTIG))
        pasid = draw(st.none() | st.integers(0, 0xF_FFFF)) if prefixes else None
        return Tlp(
            t, **common,
            tag=draw(st.integers(0, 0xFF if write else 0x3FF)),
            tc=draw(st.integers(0, 7)), attr=draw(st.integers(0, 7)), at=at, th=th,
            ln=draw(st.booleans()), length=length, first_be=fbe, last_be=lbe, address=address,
            ph=draw(st.integers(0, 3)) if th else 0,
            data=rnd.randbytes(length * 4) if write else b"",
            pasid=pasid,
            pmr=pasid is not None and draw(st.booleans()),
            er=pasid is not None and not write and at != 2 and draw(st.booleans()),
        )
    if t in (T.CFG_READ_0, T.CFG_WRITE_0):
        return Tlp(
            t, **common,
            tag=draw(st.integers(0, 0x3FF)), length=1, first_be=draw(st.integers(0, 15)),
            address=draw(st.integers(0, 0x3FF)) * 4, completer_id=draw(st.integers(0, 0xFFFF)),
            data=rnd.randbytes(4) if t == T.CFG_WRITE_0 else b"",
        )
    la = draw(st.integers(0, 0x7F))
    if t == T.CPL:
        length, status, bc = 0, draw(st.sampled_from(list(CplStatus))), draw(st.integers(1, 4096))
    else:
        length, status = draw(_lengths()), CplStatus.SC
        bc = draw(st.integers(max(1, length * 4 - (la & 3) - 3), 4096))
    return Tlp(
        t, **common,
        tag=draw(st.integers(0, 0x3FF)), tc=draw(st.integers(0, 7)), attr=draw(st.integers(0, 7)),
        ln=draw(st.booleans()), length=length, completer_id=draw(st.integers(0, 0xFFFF)),
        status=status, bcm=draw(st.booleans()), byte_count=bc, lower_address=la,
        data=rnd.randbytes(length * 4),
    )


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=600, deadline=None)
@given(tlps())
def test_roundtrip(x):
    wire = x.pack()
    assert Tlp.unpack(wire) == x
    assert Tlp.unpack(bytearray(wire)) == x
    assert Tlp.unpack(memoryview(wire)) == x
    hdr = 16 if x.type in (T.MEM_READ_64, T.MEM_WRITE_64) else 12
    assert len(wire) == (4 if x.pasid is not None else 0) + hdr + len(x.data) + (4 if x.td else 0)
    assert wire[4 if x.pasid is not None else 0] == x.type
    assert prefix_pasid(wire) == x.pasid


@settings(max_examples=300, deadline=None)
@given(tlps())
def test_peek_agrees_with_unpack(x):
    wire = x.pack()
    b0, off, ident, key = peek(wire)
    assert b0 == x.type and off == (4 if x.pasid is not None else 0)
    if x.type in MEM_TYPES:
        assert (ident, key) == (x.requester_id, x.address)
    elif x.type in (T.CFG_READ_0, T.CFG_WRITE_0):
        assert ident == x.requester_id
        assert (key >> 16, key & 0xFFFF) == (x.completer_id, x.address)
    else:
        assert (ident, key) == (x.requester_id, x.completer_id)


@settings(max_examples=300, deadline=None)
@given(tlps(), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_stamps_rewrite_only_their_field(x, rid, cid):
    wire = x.pack()
    assert Tlp.unpack(stamp_requester(wire, rid)) == dataclasses.replace(x, requester_id=rid)
    if x.is_completion():
        assert Tlp.unpack(stamp_completer(wire, cid)) == dataclasses.replace(x, completer_id=cid)
    else:
        with pytest.raises(TlpError, match="not a completion"):
            stamp_completer(wire, cid)


def _mutations(wire: bytes, data) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "byte", "truncate", "extend", "splice"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(wire) * 8 - 1))
        return wire[: i // 8] + bytes([wire[i // 8] ^ (0x80 >> (i % 8))]) + wire[i // 8 + 1:]
    if kind == "byte":
        i = data.draw(st.integers(0, len(wire) - 1))
        return wire[:i] + bytes([data.draw(st.integers(0, 255))]) + wire[i + 1:]
    if kind == "truncate":
        return wire[: data.draw(st.integers(0, len(wire) - 1))]
    if kind == "extend":
        return wire + data.draw(st.binary(min_size=1, max_size=8))
    i = data.draw(st.integers(0, 16))
    return data.draw(st.binary(max_size=20)) + wire[i:]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tlps(), st.data())
def test_decoding_is_canonical_under_mutation(x, data):
    """Every header bit is a field or a checked reserved bit: whatever unpack accepts, pack
    reproduces byte for byte.  Nothing but TlpError may escape unpack, peek or the stamps."""
    wire = _mutations(x.pack(), data)
    try:
        y = Tlp.unpack(wire)
    except TlpError:
        pass
    else:
        assert y.pack() == wire
        assert peek(wire)[0] == y.type
    try:
        peek(wire)
        stamp_requester(wire, 0x1234)
        prefix_pasid(wire)
    except TlpError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40) | st.tuples(st.sampled_from(
    [0x00, 0x20, 0x40, 0x60, 0x04, 0x44, 0x0A, 0x4A, 0x91, 0x30, 0x02]), st.binary(max_size=40))
    .map(lambda p: bytes([p[0]]) + p[1]))
def test_random_bytes_never_escape_tlp_error(wire):
    try:
        assert Tlp.unpack(wire).pack() == wire
    except TlpError:
        pass
    for fn in (peek, prefix_pasid):
        try:
            fn(wire)
        except TlpError:
            pass


# ---------------------------------------------------------------------------------------------
# Known vectors


def test_digest_vectors():
    """shared/reference digest section 1.5 (cocotbext-pcie 0.2.16 output), byte for byte."""
    mwr = Tlp.mem_write(0x1_0000_0004, h("11 22 33 44 55"), 0x0113, tag=5)
    assert mwr.pack() == h("60000002 0113051f 00000001 00000004 11223344 55000000")
    assert (mwr.type, mwr.length, mwr.first_be, mwr.last_be) == (T.MEM_WRITE_64, 2, 0xF, 0x1)

    cfg = Tlp.cfg_read(Bdf(1, 0, 0), 0x10, 0x0000)
    assert cfg.pack() == h("04000001 0000000f 01000010")

    cpld = Tlp.completion(cfg, Bdf(1, 0, 0), data=h("86 80 34 12"))
    assert cpld.pack() == h("4a000001 01000004 00000000 86803412")
    assert (cpld.byte_count, cpld.lower_address) == (4, 0)

    mrd = Tlp.mem_read(0x1000, 8, tag=1)
    assert mrd.pack() == h("00000002 000001ff 00001000")

    for wire in ("60000002 0113051f 00000001 00000004 11223344 55000000", "04000001 0000000f 01000010",
                 "4a000001 01000004 00000000 86803412", "00000002 000001ff 00001000"):
        assert Tlp.unpack(h(wire)).pack() == h(wire)
    assert Tlp.unpack(h("60000002 0113051f 00000001 00000004 11223344 55000000")) == mwr


def test_dw0_bit_positions():
    """Digest 1.2: tag 0x3ff, attr 7, TC5, AT=2, EP, len 1 -> DW0 bits 0x..dc7801.  cocotbext
    recorded it as a MWr (0x40dc7801), but Tag[9:8] are reserved on posted requests (2.2.6.2),
    so the same DW0 bits are checked on a MRd."""
    t = Tlp(T.MEM_READ, tag=0x3FF, attr=TlpAttr.IDO | TlpAttr.RO | TlpAttr.NS, tc=5, at=2, ep=True,
            length=1, first_be=0xF, address=0x1000)
    assert t.pack()[:4] == h("00dc7801")
    with pytest.raises(TlpError, match=r"Tag\[9:8\] are reserved on posted"):
        Tlp(T.MEM_WRITE, tag=0x3FF, length=1, first_be=0xF, data=bytes(4)).pack()
    single = {  # one field at a time -> exactly its DW0 bit(s)
        "tag": (0x200, 0x00800000), "tc": (7, 0x00700000), "ln": (True, 0x00020000),
        "th": (True, 0x00010000), "td": (True, 0x00008000), "ep": (True, 0x00004000),
        "at": (1, 0x00000400),
    }
    for field, (value, bits) in single.items():
        extra = {"digest": 0} if field == "td" else {}
        x = dataclasses.replace(Tlp(T.MEM_READ, length=1, address=0x1000), **{field: value}, **extra)
        assert int.from_bytes(x.pack()[:4], "big") == bits | 1, field  # | Length=1
    for attr, bits in ((TlpAttr.IDO, 0x00040000), (TlpAttr.RO, 0x00002000), (TlpAttr.NS, 0x00001000)):
        x = Tlp(T.MEM_READ, attr=attr, length=1, address=0x1000)
        assert int.from_bytes(x.pack()[:4], "big") == bits | 1
    x = Tlp(T.MEM_READ, tag=0x100, length=1, address=0x1000)
    assert int.from_bytes(x.pack()[:4], "big") == 0x00080001


def test_length_1024_encodes_as_zero():
    t = Tlp.mem_write(0x2000, bytes(range(256)) * 16)
    assert t.length == 1024 and t.pack()[:4] == h("40000000")
    assert Tlp.unpack(t.pack()) == t
    c = Tlp.completion(Tlp.mem_read(0x2000, 4096), 0x100, data=bytes(4096))
    assert c.byte_count == 4096 and c.pack()[4:8] == h("01000000")
    assert Tlp.unpack(c.pack()) == c


@pytest.mark.parametrize(
    "pasid,pmr,er,dw",
    [
        (0x00000, False, False, 0x91000000),
        (0xFFFFF, False, False, 0x910FFFFF),
        (0x12345, True, False, 0x91812345),
        (0x12345, False, True, 0x91412345),
        (0x12345, True, True, 0x91C12345),
    ],
)
def test_pasid_prefix_layout(pasid, pmr, er, dw):
    """PCIe 6.20.2.1 Table 6-15: byte 1 bit 7 = PMR, bit 6 = ER, bits 5:4 reserved,
    byte 1 bits 3:0 .. byte 3 = PASID[19:0].  cocotbext has no prefix support, so this table
    is the oracle for the prefix DW."""
    t = Tlp.mem_read(0x1000, 4, pasid=pasid, pmr=pmr, er=er)
    wire = t.pack()
    assert wire[:4] == dw.to_bytes(4, "big")
    assert wire[0] == PASID_PREFIX_BYTE0
    assert wire[4:] == dataclasses.replace(t, pasid=None, pmr=False, er=False).pack()
    assert Tlp.unpack(wire) == t and prefix_pasid(wire) == pasid
    assert peek(wire) == (T.MEM_READ, 4, 0, 0x1000)


# ---------------------------------------------------------------------------------------------
# Malformed input: each must raise TlpError naming the problem

MALFORMED = [
    ("", "empty buffer"),
    ("400000", "truncated"),
    ("00000001 0000000f", "truncated header"),
    ("20000001 0000000f 00000001", "truncated header"),
    # unsupported types are named
    ("30000000 00000020 00000000 00000000", r"0x30 \(Msg "),
    ("74000001 00000020 00000000 00000000 00000000", r"MsgD"),
    ("02000001 0000000f 00000cf8", "IORd"),
    ("42000001 0000000f 00000cf8 00000000", "IOWr"),
    ("05000001 0000000f 01000010", "CfgRd1"),
    ("0b000000 01000004 00000000", "CplLk"),
    ("4c000001 0000000f 00001000 00000000", "FetchAdd"),
    ("4e000002 0000000f 00001000 00000000 00000000", "CAS"),
    ("01000001 0000000f 00001000", "MRdLk"),
    ("1f000000 00000000 00000000", "reserved/undefined"),
    ("24000001 0000000f 01000010 00000000", "reserved/undefined"),
    ("a0000000 00000000 00000000", "reserved Fmt"),
    ("e0000000 00000000 00000000", "reserved Fmt"),
    # prefixes
    ("90000000 00000001 0000000f 00001000", "TPH End-End"),
    ("80000000 00000001 0000000f 00001000", "MR-IOV Local"),
    ("92000000 00000001 0000000f 00001000", "IDE End-End"),
    ("9e000000 00000001 0000000f 00001000", "VendPrefixE0"),
    ("93000000 00000001 0000000f 00001000", "reserved End-End"),
    ("87000000 00000001 0000000f 00001000", "reserved Local"),
    ("91000005 91000005 00000001 0000000f 00001000", "duplicate PASID prefix"),
    ("91000005 90000000 00000001 0000000f 00001000", "TPH End-End"),
    ("91100005 00000001 0000000f 00001000", "reserved bits 21:20"),
    ("91200005 00000001 0000000f 00001000", "reserved bits 21:20"),
    ("91000005", "without a TLP header"),
    ("91000005 04000001 0000000f 01000010", "only permitted on memory requests"),
    ("91000005 0a000000 01000004 00000000", "only permitted on memory requests"),
    ("91400005 40000001 0000000f 00001000 11223344", "ER .* reserved"),
    ("91400005 00000801 0000000f 00001000", "ER .* reserved"),
    # framing: buffer length vs Length/TD
    ("40000002 000000ff 00001000 11223344", "buffer is 16 bytes but the header says 20"),
    ("40000001 0000000f 00001000 11223344 00", "buffer is 17 bytes"),
    ("40008001 0000000f 00001000 11223344", "says 20"),
    ("00000001 0000000f 00001000 00000000", "buffer is 16 bytes but the header says 12"),
    ("44000001 0000000f 01000010", "says 16"),
    ("4a000001 01000004 00000000", "says 16"),
    # memory request rules
    ("40080001 0000000f 00001000 11223344", r"Tag\[9:8\] are reserved on posted"),
    ("40800001 0000000f 00001000 11223344", r"Tag\[9:8\] are reserved on posted"),
    ("00000001 000000ff 00001000", "last_be=0xf; must be 0 for a 1 DW"),
    ("00000002 000000f0 00001000", "both must be non-zero"),
    ("00000002 0000000f 00001000", "both must be non-zero"),
    ("00000003 000000f5 00001000", "not contiguous"),
    ("00000002 000000f5 00001004", "not contiguous"),
    ("00000002 000000ff 00000ffc", "crosses a 4 KiB boundary"),
    ("00000000 000000ff 00000004", "crosses a 4 KiB boundary"),
    ("00000001 0000000f 00001001", "requires TH=1"),
    ("00000c01 0000000f 00001000", "AT=11b is reserved"),
    ("20000001 0000000f 00000000 00001000", "below 4 GiB"),
    ("60000001 0000000f 00000000 fee00000 00000000", "below 4 GiB"),
    # configuration request rules
    ("04000002 0000000f 01000010", "must have length 1"),
    ("04000001 000000ff 01000010", "last_be=0xf; must be 0"),
    ("04100001 0000000f 01000010", "tc=1 must be 0"),
    ("04002001 0000000f 01000010", "attr=2 must be 0"),
    ("04040001 0000000f 01000010", "IDO is reserved"),
    ("04000401 0000000f 01000010", "at=1 must be 0"),
    ("04010001 0000000f 01000010", "th=True must be 0"),
    ("04020001 0000000f 01000010", "ln=True must be 0"),
    ("04000001 0000000f 01001010", "reserved bits of DW2"),
    ("04000001 0000000f 01000011", "reserved bits of DW2"),
    # completion rules
    ("0a000000 01006004 00000000", "Completion Status 011b is reserved"),
    ("0a000000 0100a004 00000000", "Completion Status 101b is reserved"),
    ("0a000000 0100e004 00000000", "Completion Status 111b is reserved"),
    ("0a000000 01000004 00000080", "reserved bit 7"),
    ("0a000001 01000004 00000000", "Length field of a Cpl without data is reserved"),
    ("0a010000 01000004 00000000", "TH is reserved for completions"),
    ("0a000800 01000004 00000000", "AT must be 00b"),
    ("4a000001 01002004 00000000 86803412", "UR completions carry no data"),
    ("4a000002 01000004 00000000 86803412 00000000", "exceeds byte_count=4"),
    ("4a000002 01000001 00000003 86803412 00000000", "exceeds byte_count=1"),
]


@pytest.mark.parametrize("wire,message", MALFORMED, ids=[m[0][:28] for m in MALFORMED])
def test_malformed_rejected(wire, message):
    with pytest.raises(TlpError, match=message):
        Tlp.unpack(h(wire))


def test_malformed_is_a_value_error():
    assert issubclass(TlpError, ValueError)


@pytest.mark.parametrize(
    "wire",
    [
        "00000002 000000a5 00001000",            # QW-aligned 2 DW: non-contiguous BEs allowed
        "00000001 00000005 00001000",            # 1 DW: non-contiguous allowed
        "00000001 00000000 00001000",            # zero-length read
        "40000001 00000000 00001000 00000000",   # zero-length write
        "00010001 000000ab 00001003",            # MRd with TH: BE bits are ST[7:0], PH 3
        "00000000 000000ff 00000000",            # 1024 DW read of a whole page
        "0a000000 01002000 00000000",            # UR, byte count 0 = 4096
        "0a000000 01004004 00000000",            # CRS
        "0a000000 01008004 00000000",            # CA
        "4a000001 01000001 00000003 00000044",   # 1 byte at lower address 3
        "4a008001 01000004 00000000 12345678 0badcafe",  # TD + digest
        "91c12345 00000001 0000000f 00001000",   # PASID prefix with PMR and ER on MRd
    ],
)
def test_edge_cases_accepted(wire):
    assert Tlp.unpack(h(wire)).pack() == h(wire)


@pytest.mark.parametrize(
    "wire,message",
    [
        ("", "truncated TLP: 0 bytes"),
        ("40000002 000000ff 00001000 11223344", "buffer is 16 bytes but the header says 20"),
        ("90000000 00000001 0000000f 00001000", "TPH End-End"),
        ("91000005 04000001 0000000f 01000010", "only permitted on memory requests"),
        ("30000000 00000020 00000000 00000000", "Msg"),
        ("91000005 91000005 00000001 0000000f 00001000", "duplicate PASID"),
    ],
)
def test_peek_rejects_bad_framing(wire, message):
    with pytest.raises(TlpError, match=message):
        peek(h(wire))


def test_peek_and_stamp_layouts():
    cfg = Tlp.cfg_write(0x0208, 0x44, 0xDEADBEEF, 0x0010, tag=7, first_be=0x3).pack()
    assert peek(cfg) == (T.CFG_WRITE_0, 0, 0x0010, 0x0208_0044)
    stamped = stamp_requester(cfg, Bdf(0, 3, 1))
    assert stamped[4:6] == h("0019") and stamped[:4] == cfg[:4] and stamped[6:] == cfg[6:]
    cpl = Tlp.completion(Tlp.cfg_read(0x0100, 0, 0x0008, tag=9), 0x0100, CplStatus.UR).pack()
    assert peek(cpl) == (T.CPL, 0, 0x0008, 0x0100)
    assert stamp_requester(cpl, 0xABCD)[8:10] == h("abcd")
    assert stamp_completer(cpl, 0x0101)[4:6] == h("0101")
    w = Tlp.mem_write(0x1_2345_6788, b"\x01", 0x0300, pasid=0x77).pack()
    assert peek(w) == (T.MEM_WRITE_64, 4, 0x0300, 0x1_2345_6788)
    assert stamp_requester(w, 0x0301)[8:10] == h("0301") and w[:4] == h("91000077")
    with pytest.raises(TlpError, match="out of range"):
        stamp_requester(w, 0x10000)


def test_prefix_pasid():
    assert prefix_pasid(Tlp.mem_read(0x1000, 4).pack()) is None
    assert prefix_pasid(Tlp.mem_read(0x1000, 4, pasid=0xABCDE, pmr=True).pack()) == 0xABCDE
    with pytest.raises(TlpError, match="TPH"):
        prefix_pasid(h("90000000 00000001 0000000f 00001000"))
    with pytest.raises(TlpError, match="empty"):
        prefix_pasid(b"")


# ---------------------------------------------------------------------------------------------
# pack() validates fields

MWR = Tlp(T.MEM_WRITE, length=1, first_be=0xF, address=0x1000, data=bytes(4))
MRD = Tlp(T.MEM_READ, length=1, first_be=0xF, address=0x1000)
CFG = Tlp(T.CFG_READ_0, length=1, first_be=0xF, address=0x10, completer_id=0x100)
CPL = Tlp(T.CPL, completer_id=0x100, byte_count=4)

BAD_FIELDS = [
    (MWR, dict(requester_id=0x10000), r"requester_id=0x10000 out of range \(expected 0x0..0xffff\)"),
    (MWR, dict(requester_id=-1), "requester_id=-0x1 out of range"),
    (MWR, dict(requester_id=Bdf(1, 0, 0)), "requester_id must be an int"),
    (MRD, dict(tag=0x400), "tag=0x400 out of range"),
    (MWR, dict(tc=8), "tc=0x8 out of range"),
    (MWR, dict(attr=8), "attr=0x8 out of range"),
    (MWR, dict(at=3), "AT=11b is reserved"),
    (MWR, dict(ph=1), "requires TH=1"),
    (MWR, dict(th=True, ph=4), "ph=0x4 out of range"),
    (MWR, dict(th=2), "th must be a bool"),
    (MWR, dict(pasid=1 << 20), "pasid=0x100000 out of range"),
    (MWR, dict(pmr=True), "pmr/er set without a PASID"),
    (MWR, dict(pasid=1, er=True), "ER .* reserved"),
    (MRD, dict(pasid=1, er=True, at=2), "ER .* reserved"),
    (MWR, dict(digest=5), "digest=0x5 given but TD=0"),
    (MWR, dict(td=True), "TD=1 but digest is None"),
    (MWR, dict(td=True, digest=1 << 32), "digest=0x100000000 out of range"),
    (MWR, dict(data=bytes(3)), "length=1 DW but data is 3 bytes"),
    (MWR, dict(data="abcd"), "data must be bytes"),
    (MWR, dict(length=0, data=b""), "length=0"),
    (MWR, dict(length=1025), "length=0x401 out of range"),
    (MRD, dict(data=bytes(4)), "a read request carries no data"),
    (MRD, dict(address=0x1002), "must be DW aligned"),
    (MRD, dict(address=1 << 32), "address=0x100000000 out of range"),
    (MRD, dict(type=T.MEM_READ_64, address=0x1000), "below 4 GiB; requesters must use the 3DW form MRd32"),
    (MRD, dict(type=T.MEM_READ_64, address=1 << 64), "out of range"),
    (MRD, dict(first_be=0x10), "first_be=0x10 out of range"),
    (MRD, dict(length=2, first_be=0xF, last_be=0), "both must be non-zero"),
    (MRD, dict(address=0x1FFC, length=2, last_be=0xF), "crosses a 4 KiB boundary"),
    (MRD, dict(completer_id=1), "completer_id=1 must be 0/False .not carried by memory requests"),
    (MRD, dict(byte_count=4), "byte_count=4 must be 0"),
    (MRD, dict(status=CplStatus.UR), "status="),
    (CFG, dict(address=0x1000), r"address \(register offset\)=0x1000 out of range"),
    (CFG, dict(address=0x12), "register offset 0x12 must be DW aligned"),
    (CFG, dict(completer_id=0x10000), "completer_id .target.=0x10000 out of range"),
    (CFG, dict(length=2), "must have length 1"),
    (CFG, dict(tc=1), "configuration request restriction"),
    (CFG, dict(attr=TlpAttr.IDO), "IDO is reserved"),
    (CFG, dict(pasid=5), "only permitted on memory requests"),
    (CFG, dict(type=T.CFG_WRITE_0), "data is 0 bytes; CfgWr0 carries exactly 4"),
    (CPL, dict(byte_count=0), "byte_count=0x0 out of range .expected 0x1..0x1000"),
    (CPL, dict(byte_count=4097), "byte_count=0x1001 out of range"),
    (CPL, dict(lower_address=0x80), "lower_address=0x80 out of range"),
    (CPL, dict(status=3), "status=3 is reserved"),
    (CPL, dict(length=1), "Length field of a Cpl without data is reserved"),
    (CPL, dict(data=bytes(4)), "Cpl carries no data"),
    (CPL, dict(first_be=0xF), "first_be=15 must be 0/False .not carried by completions"),
    (CPL, dict(address=0x1000), "not carried by completions"),
    (CPL, dict(th=True), "TH is reserved for completions"),
    (CPL, dict(type=T.CPL_DATA, status=CplStatus.CA, length=1, data=bytes(4)), "CA completions carry no data"),
    (CPL, dict(type=T.CPL_DATA, length=2, data=bytes(8)), "exceeds byte_count=4"),
    (CPL, dict(type=0x30), "is not a supported TlpType"),
    (CPL, dict(type="CPL"), "is not a supported TlpType"),
    (CPL, dict(type=[0x0A]), "is not a supported TlpType"),
]


@pytest.mark.parametrize("base,changes,message", BAD_FIELDS, ids=[str(b[1]) for b in BAD_FIELDS])
def test_pack_validates_fields(base, changes, message):
    base.pack()  # the base itself is valid
    with pytest.raises(TlpError, match=message):
        dataclasses.replace(base, **changes).pack()


# ---------------------------------------------------------------------------------------------
# Constructors and queries


@st.composite
def spans(draw, max_bytes: int = 4096):
    """(address, nbytes) that do not cross 4 KiB, biased to the edges of the 4 GiB line."""
    page = draw(st.sampled_from([0, 0xFFFFF, 0x100000, 0xFFFF_FFFF_FFFFF]) | st.integers(0, (1 << 52) - 1))
    off = draw(st.integers(0, 0xFFF))
    nbytes = draw(st.integers(1, min(max_bytes, 0x1000 - off)))
    return page << 12 | off, nbytes


@settings(max_examples=400, deadline=None)
@given(spans(), st.randoms(use_true_random=False), st.integers(0, 0xFFFF), st.none() | st.integers(0, 0xFFFFF))
def test_mem_write_covers_exactly_the_bytes(span, rnd, rid, pasid):
    address, n = span
    data = rnd.randbytes(n)
    t = Tlp.mem_write(address, data, rid, tag=3, pasid=pasid)
    assert t.type == (T.MEM_WRITE if address < 1 << 32 else T.MEM_WRITE_64)
    assert t.address == address & ~3 and t.length == ((address & 3) + n + 3) // 4
    assert t.payload_bytes() == data and t.byte_address() == address
    assert t.byte_enable_mask() == ((1 << n) - 1) << (address & 3)
    assert t.data == bytes(address & 3) + data + bytes(t.length * 4 - n - (address & 3))
    assert t.is_posted() and not t.is_non_posted() and not t.is_completion()
    assert Tlp.unpack(t.pack()) == t


@settings(max_examples=400, deadline=None)
@given(spans(), st.integers(0, 0xFFFF), st.integers(0, 0x3FF))
def test_mem_read_and_its_completion(span, rid, tag):
    address, n = span
    t = Tlp.mem_read(address, n, rid, tag=tag, tc=2, attr=TlpAttr.RO)
    assert t.type == (T.MEM_READ if address < 1 << 32 else T.MEM_READ_64)
    assert t.byte_address() == address and t.byte_enable_mask() == ((1 << n) - 1) << (address & 3)
    assert t.is_non_posted()
    payload = bytes(t.length * 4)
    c = Tlp.completion(t, 0x0100, data=payload)
    assert (c.type, c.byte_count, c.lower_address) == (T.CPL_DATA, n, address & 0x7F)
    assert (c.requester_id, c.tag, c.tc, c.attr) == (rid, tag, 2, TlpAttr.RO)
    assert len(c.payload_bytes()) == n and c.byte_address() == address & 0x7F
    assert c.byte_enable_mask() == ((1 << n) - 1) << (address & 3)
    ur = Tlp.completion(t, 0x0100, CplStatus.UR)
    assert (ur.type, ur.byte_count, ur.lower_address, ur.data) == (T.CPL, n, address & 0x7F, b"")
    for x in (c, ur):
        assert Tlp.unpack(x.pack()) == x


@pytest.mark.parametrize(
    "fbe,lbe,length,expected",
    [  # PCIe 2.3.1.1 Table 2-40
        (0b1001, 0, 1, 4), (0b1111, 0, 1, 4), (0b0101, 0, 1, 3), (0b1010, 0, 1, 3), (0b0011, 0, 1, 2),
        (0b0110, 0, 1, 2), (0b1100, 0, 1, 2), (0b0001, 0, 1, 1), (0b1000, 0, 1, 1), (0b0000, 0, 1, 1),
        (0b1111, 0b1111, 4, 16), (0b1111, 0b0111, 4, 15), (0b1110, 0b0001, 3, 8), (0b1000, 0b0001, 4, 10),
        (0b1100, 0b0011, 2, 4), (0b0101, 0b1010, 2, 8),
    ],
)
def test_completion_byte_count_table(fbe, lbe, length, expected):
    req = Tlp(T.MEM_READ, requester_id=8, length=length, first_be=fbe, last_be=lbe, address=0x1000)
    cpl = Tlp.completion(req, 0x100, data=bytes(4 * length))
    assert cpl.byte_count == expected


@pytest.mark.parametrize("fbe,la", [(0b0000, 0x04), (0b0001, 0x04), (0b0110, 0x05), (0b0100, 0x06), (0b1000, 0x07)])
def test_completion_lower_address_table(fbe, la):
    """Table 2-41.  0x1004 with BE 0110b must give 0x05: cocotbext's get_lower_address returns
    0x04 (operator-precedence bug), and gives offset 3 for a zero-length read (spec: 0)."""
    req = Tlp(T.MEM_READ, length=1, first_be=fbe, address=0x1004)
    assert Tlp.completion(req, 0x100, data=bytes(4)).lower_address == la


def test_zero_length_read_completion():
    flush = Tlp(T.MEM_READ, requester_id=0x10, length=1, first_be=0, address=0x2000)
    c = Tlp.completion(flush, 0x100, data=bytes(4))
    assert (c.byte_count, c.lower_address, c.length) == (1, 0, 1)
    assert flush.byte_address() == 0x2000 and flush.byte_enable_mask() == 0


def test_mrd_with_th_implies_full_byte_enables():
    req = Tlp(T.MEM_READ, length=2, first_be=0x4, last_be=0x2, address=0x1000, th=True, ph=1)  # ST 0x24
    req.pack()
    c = Tlp.completion(req, 0x100, data=bytes(8))
    assert (c.byte_count, c.lower_address) == (8, 0)
    assert req.byte_enable_mask() == 0xFF


def test_cfg_constructors_and_completions():
    rd = Tlp.cfg_read(Bdf(2, 1, 3), 0x104, Bdf(0, 0, 0), tag=0x2AA, first_be=0xC)
    assert (rd.completer_id, rd.address, rd.length, rd.last_be, rd.tag) == (0x020B, 0x104, 1, 0, 0x2AA)
    assert rd.pack() == h("04800001 0000aa0c 020b0104")
    cpl = Tlp.completion(rd, Bdf(2, 1, 3), data=h("00 00 34 12"))
    assert (cpl.type, cpl.byte_count, cpl.lower_address, cpl.tag) == (T.CPL_DATA, 4, 0, 0x2AA)
    assert cpl.payload_bytes() == h("00 00 34 12")
    crs = Tlp.completion(rd, 0x020B, CplStatus.CRS)
    assert (crs.type, crs.status, crs.byte_count, crs.data) == (T.CPL, CplStatus.CRS, 4, b"")

    wr = Tlp.cfg_write(0x0100, 0x04, 0x0000_0406, first_be=0x3)
    assert wr.data == h("06 04 00 00") and wr.payload_bytes() == h("06 04")
    assert wr.byte_enable_mask() == 0x3 and wr.is_non_posted()
    done = Tlp.completion(wr, 0x0100)
    assert (done.type, done.byte_count, done.length) == (T.CPL, 4, 0)
    assert Tlp.unpack(done.pack()) == done

    with pytest.raises(TlpError, match="must be DW aligned"):
        Tlp.cfg_read(0x100, 0x06)
    with pytest.raises(TlpError, match=r"out of range"):
        Tlp.cfg_read(0x100, 0x1000)
    with pytest.raises(TlpError, match="does not fit in a DW"):
        Tlp.cfg_write(0x100, 0, 1 << 32)


@pytest.mark.parametrize(
    "req,kwargs,message",
    [
        (MWR, dict(), "posted request; it gets no completion"),
        (CPL, dict(), "completions are never completed"),
        (CFG, dict(), "must carry data"),
        (CFG, dict(status=CplStatus.UR, data=bytes(4)), "UR completion carries no data"),
        (CFG, dict(status=3), "status 3 is reserved"),
        (CFG, dict(data=bytes(3)), "whole DWs"),
        (Tlp.cfg_write(0x100, 0, 1), dict(data=bytes(4)), "Cpl without data"),
        (MRD, dict(data=bytes(8)), "exceeds byte_count=4"),
    ],
)
def test_completion_rejects(req, kwargs, message):
    with pytest.raises(TlpError, match=message):
        Tlp.completion(req, 0x100, **kwargs)


@pytest.mark.parametrize(
    "address,n,message",
    [
        (0xFFF, 2, "crosses a 4 KiB boundary"),
        (0x1000, 4097, "1..4096 bytes"),
        (0x1000, 0, "1..4096 bytes"),
        ((1 << 64) - 2, 4, "outside the 64-bit space"),
        (-4, 4, "outside the 64-bit space"),
    ],
)
def test_mem_constructors_reject(address, n, message):
    with pytest.raises(TlpError, match=message):
        Tlp.mem_read(address, n)
    with pytest.raises(TlpError, match=message):
        Tlp.mem_write(address, bytes(n))


def test_constructor_field_errors():
    with pytest.raises(TlpError, match=r"Tag\[9:8\]"):
        Tlp.mem_write(0x1000, b"x", tag=0x100)
    with pytest.raises(TlpError, match="pasid"):
        Tlp.mem_read(0x1000, 4, pasid=1 << 20)
    with pytest.raises(TlpError, match="pmr/er set without a PASID"):
        Tlp.mem_read(0x1000, 4, pmr=True)
    assert Tlp.mem_read(0x1000, 4, Bdf(3, 0, 1)).requester_id == 0x0301


def test_names_and_str():
    msi = Tlp(T.MEM_WRITE_64, requester_id=0x0101, tag=5, address=0xFEE00000, length=1, first_be=0xF,
              data=bytes(4), pasid=5)
    assert str(msi) == "MWr64 01:00.1 tag 5 addr 0xfee00000 len 1 [pasid 0x5]"
    assert MSI_ADDR_LO <= msi.address <= MSI_ADDR_HI
    w = Tlp.mem_write(0xFEE0_0004, b"\x41\x00", 0x0208, tag=1, pasid=0x10, pmr=True)
    assert str(w) == "MWr32 02:01.0 tag 1 addr 0xfee00004 len 1 be 3/0 [pasid 0x10 pmr]"
    rd = Tlp.cfg_read(0x0100, 0x10, tag=2)
    assert str(rd) == "CfgRd0 00:00.0 tag 2 -> 01:00.0 reg 0x010 be f"
    assert str(Tlp.cfg_write(0x0100, 0x4, 0x406)) == "CfgWr0 00:00.0 tag 0 -> 01:00.0 reg 0x004 be f data 0x00000406"
    assert str(Tlp.completion(rd, 0x0100, CplStatus.UR)) == "Cpl 01:00.0 -> 00:00.0 tag 2 UR bc 4 la 0x00 len 0"
    r = Tlp.mem_read(0x1_0000_0000, 64, 0x10, tc=3, attr=TlpAttr.RO | TlpAttr.NS)
    r.ep = True
    assert str(r) == "MRd64 00:02.0 tag 0 addr 0x100000000 len 16 tc 3 attr NS|RO EP"
    names = {t: Tlp(t).fmt_type_name() for t in TlpType}
    assert names == {T.MEM_READ: "MRd32", T.MEM_READ_64: "MRd64", T.MEM_WRITE: "MWr32",
                     T.MEM_WRITE_64: "MWr64", T.CFG_READ_0: "CfgRd0", T.CFG_WRITE_0: "CfgWr0",
                     T.CPL: "Cpl", T.CPL_DATA: "CplD"}


def test_flow_control_classes():
    posted = {t for t in TlpType if Tlp(t).is_posted()}
    non_posted = {t for t in TlpType if Tlp(t).is_non_posted()}
    completions = {t for t in TlpType if Tlp(t).is_completion()}
    assert posted == {T.MEM_WRITE, T.MEM_WRITE_64}
    assert non_posted == {T.MEM_READ, T.MEM_READ_64, T.CFG_READ_0, T.CFG_WRITE_0}
    assert completions == {T.CPL, T.CPL_DATA}


def test_enum_encodings():
    assert {t.name: t.value for t in TlpType} == {
        "MEM_READ": 0x00, "MEM_READ_64": 0x20, "MEM_WRITE": 0x40, "MEM_WRITE_64": 0x60,
        "CFG_READ_0": 0x04, "CFG_WRITE_0": 0x44, "CPL": 0x0A, "CPL_DATA": 0x4A}
    assert [int(s) for s in CplStatus] == [0, 1, 2, 4]
    assert (TlpAttr.NS, TlpAttr.RO, TlpAttr.IDO) == (1, 2, 4)
    assert (PASID_PREFIX_BYTE0, MSI_ADDR_LO, MSI_ADDR_HI) == (0x91, 0xFEE0_0000, 0xFEEF_FFFF)


# ---------------------------------------------------------------------------------------------
# The fast paths of pack()/unpack() (per-kind packers and decoders) agree with the reference
# paths: validate() + _pack_checked() for pack, _unpack_general() for unpack


class FakeInt:
    """An integer that is not an ``int`` (like a numpy integer): shifts, ORs and compares as
    one, ``struct`` takes it (``__index__``), ``validate()`` refuses it."""

    def __init__(self, v: int):
        self.v = v

    def __index__(self):
        return self.v

    def __repr__(self):
        return f"FakeInt({self.v})"

    def __hash__(self):
        return hash(self.v)

    def __bool__(self):
        return bool(self.v)


def _fake_op(op):
    return lambda a, b: FakeInt(op(a.v, b.v if isinstance(b, FakeInt) else b))


def _fake_rop(op):
    return lambda a, b: FakeInt(op(b, a.v))


for _name, _op in (("lshift", lambda a, b: a << b), ("rshift", lambda a, b: a >> b), ("or", lambda a, b: a | b),
                   ("and", lambda a, b: a & b), ("add", lambda a, b: a + b), ("sub", lambda a, b: a - b),
                   ("mul", lambda a, b: a * b), ("xor", lambda a, b: a ^ b)):
    setattr(FakeInt, f"__{_name}__", _fake_op(_op))
    setattr(FakeInt, f"__r{_name}__", _fake_rop(_op))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(FakeInt, f"__{_name}__", (lambda n: lambda a, b: getattr(a.v, f"__{n}__")(
        b.v if isinstance(b, FakeInt) else b))(_name))

ODD_VALUES = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0x1000, 0x1001,
              0xFFFF, 0x10000, 0xF_FFFF, 0x10_0000, 0xFFFF_FFFC, 1 << 32, 1 << 64, True, False, 0.0, 1.0,
              None, b"", bytearray(), b"\0\0\0\0", bytearray(4), "x", TlpAttr.RO, TlpAttr(0),
              CplStatus.UR, CplStatus.SC, T.MEM_READ, FakeInt(0), FakeInt(1), FakeInt(0x100)]
FIELDS = [f.name for f in dataclasses.fields(Tlp)]


@st.composite
def plain_tlps(draw):
    """Valid TLPs as the lab's constructors make them (the kinds the fast paths take)."""
    kind = draw(st.sampled_from(["mwr", "mrd", "cfgrd", "cfgwr", "cpl", "cpld"]))
    rid, tag = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFF))
    page = draw(st.sampled_from([0, 0xFEE00, 0xFFFFF, 0x100000]) | st.integers(0, (1 << 52) - 1))
    off = draw(st.integers(0, 0xFFF))
    address, n = page << 12 | off, draw(st.integers(1, min(64, 0x1000 - off)))
    pasid = draw(st.none() | st.integers(0, 0xF_FFFF))
    pmr = pasid is not None and draw(st.booleans())
    if kind == "mwr":
        return Tlp.mem_write(address, draw(st.binary(min_size=n, max_size=n)), rid, tag=tag, pasid=pasid, pmr=pmr)
    er = pasid is not None and draw(st.booleans())
    mrd = Tlp.mem_read(address, n, rid, tag=tag, pasid=pasid, pmr=pmr, er=er)
    if kind == "mrd":
        return mrd
    target, reg = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0x3FF)) * 4
    fbe = draw(st.integers(0, 15))
    if kind == "cfgrd":
        return Tlp.cfg_read(target, reg, rid, tag=tag, first_be=fbe)
    cfgwr = Tlp.cfg_write(target, reg, draw(st.integers(0, 0xFFFF_FFFF)), rid, tag=tag, first_be=fbe)
    if kind == "cfgwr":
        return cfgwr
    cid = draw(st.integers(0, 0xFFFF))
    mrd = dataclasses.replace(mrd, pasid=None, pmr=False, er=False)
    if kind == "cpld":
        return Tlp.completion(mrd, cid, data=draw(st.binary(min_size=mrd.length * 4, max_size=mrd.length * 4)))
    if draw(st.booleans()):
        return Tlp.completion(cfgwr, cid)
    return Tlp.completion(mrd, cid, draw(st.sampled_from([CplStatus.UR, CplStatus.CRS, CplStatus.CA])))


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except TlpError as e:
        return "TlpError", str(e)
    except Exception as e:  # noqa: BLE001 - compared, not swallowed
        return type(e).__name__, None


def _typed(x: Tlp) -> list:
    return [(f, type(getattr(x, f)), getattr(x, f)) for f in FIELDS]


def _reference_pack(x: Tlp):
    ref = _outcome(x.validate)
    if ref[0] != "ok":
        return ref
    return _outcome(x._pack_checked)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain_tlps() | tlps(), st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(ODD_VALUES)
                                                  | st.integers(-2, 1 << 65)), max_size=3))
def test_pack_fast_paths_agree_with_validate(x, changes):
    """pack() returns bytes exactly when validate() passes, and then _pack_checked()'s bytes;
    otherwise it raises validate()'s error.  (One exception: validate() takes 0.0/1.0 for a flag,
    which _pack_checked() cannot shift -- a TypeError there, so either outcome is allowed.)"""
    for field, value in changes:
        setattr(x, field, value)
    ref = _reference_pack(x)
    got = _outcome(x.pack)
    if ref[0] == "TypeError" and _outcome(x.validate)[0] == "ok":
        return
    assert got == ref


@settings(max_examples=800, deadline=None)
@given(plain_tlps())
def test_plain_tlps_roundtrip_with_field_types(x):
    wire = x.pack()
    assert wire == x._pack_checked()
    for buf in (wire, bytearray(wire), memoryview(wire)):
        y = Tlp.unpack(buf)
        assert _typed(y) == _typed(x) == _typed(Tlp._unpack_general(buf))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain_tlps() | tlps(), st.data())
def test_unpack_fast_paths_agree_with_general(x, data):
    """Whatever the wire, unpack() and _unpack_general() give the same TLP (field types
    included) or the same error."""
    wire = _mutations(x.pack(), data)
    for buf in (wire, bytearray(wire), memoryview(wire)):
        got, ref = _outcome(Tlp.unpack, buf), _outcome(Tlp._unpack_general, buf)
        if got[0] == ref[0] == "ok":
            assert _typed(got[1]) == _typed(ref[1])
        else:
            assert got == ref


def _plain_bases() -> list[Tlp]:
    """One TLP per path of the per-kind packers and decoders (the bench's kinds among them)."""
    mrd = Tlp.mem_read(0x1000_0000, 64, 0x0100, tag=5)
    cfgwr = Tlp.cfg_write(0x0101, 0x004, 0x0000_0006, 0x0000, tag=8)
    return [
        Tlp.mem_write(0xFEE0_0000, b"\x21\x00\x00\x00", 0x0101),
        Tlp.mem_write(0x100_0010_0040, bytes(range(16)), 0x0101),
        Tlp.mem_write(0x100_0010_0041, bytes(range(9)), 0x0101, tag=0xFF, pasid=0x1234, pmr=True),
        Tlp.mem_write(0x2FFA, b"\x01\x02\x03\x04\x05\x06", 0xFFFF),
        mrd,
        Tlp.mem_read(0x1_0000_0FFC, 4, 0x0203, tag=0xFF),
        Tlp.mem_read(0x1002, 5, 0x0203, pasid=0xF_FFFF, er=True),
        Tlp.mem_read(0x1_0000_1006, 2, 0x0203, pasid=0, pmr=True, er=True),
        Tlp.completion(mrd, 0x0000, CplStatus.SC, bytes(range(64))),
        Tlp.completion(Tlp.mem_read(0x1003, 1), 0xFFFF, data=bytes(4)),
        Tlp.completion(mrd, 0x0100, CplStatus.CA),
        Tlp.completion(cfgwr, 0x0101),
        Tlp.cfg_read(0x0101, 0x040, 0x0000, tag=7),
        Tlp.cfg_read(0xFFFF, 0xFFC, 0xFFFF, tag=0xFF, first_be=0),
        cfgwr,
    ]


def test_pack_fast_paths_agree_field_by_field():
    for base in _plain_bases():
        assert base.pack() == base._pack_checked()
        for field in FIELDS:
            for value in ODD_VALUES:
                x = dataclasses.replace(base)
                setattr(x, field, value)
                ref, got = _reference_pack(x), _outcome(x.pack)
                if ref[0] == "TypeError" and _outcome(x.validate)[0] == "ok":
                    continue
                assert got == ref, (base, field, value)


def test_unpack_fast_paths_agree_byte_by_byte():
    for base in _plain_bases():
        wire = base.pack()
        for i in range(min(len(wire), 24)):
            for value in range(256):
                buf = wire[:i] + bytes([value]) + wire[i + 1:]
                got, ref = _outcome(Tlp.unpack, buf), _outcome(Tlp._unpack_general, buf)
                if got[0] == ref[0] == "ok":
                    assert _typed(got[1]) == _typed(ref[1]), (base, i, value)
                else:
                    assert got == ref, (base, i, value)
        for n in range(len(wire) + 5):  # truncated / extended
            buf = (wire + bytes(5))[:n]
            for b in (buf, bytearray(buf), memoryview(buf)):
                got, ref = _outcome(Tlp.unpack, b), _outcome(Tlp._unpack_general, b)
                assert (got[0], _typed(got[1]) if got[0] == "ok" else got) == \
                    (ref[0], _typed(ref[1]) if ref[0] == "ok" else ref)


# -- mem_write_raw: a CPU store's bytes without a Tlp object ------------------------------------

@settings(max_examples=400, deadline=None)
@given(address=st.one_of(st.integers(0, (1 << 32) - 1), st.integers(1 << 32, (1 << 64) - 1),
                         st.integers(0xFFFF_F000, 0x1_0000_0FFF)),
       data=st.one_of(st.binary(min_size=1, max_size=80), st.sampled_from([bytes(4096), b"\x01" * 4])),
       requester_id=st.one_of(st.just(0), st.integers(0, 0xFFFF)))
def test_mem_write_raw_is_mem_write_packed_or_declines(address, data, requester_id) -> None:
    from fabric.tlp import mem_write_raw
    raw = mem_write_raw(address, data, requester_id)
    fits = (address % 4 == 0 and len(data) % 4 == 0 and (address & 0xFFF) + len(data) <= 0x1000)
    if not fits:
        assert raw is None          # anything else goes through Tlp.mem_write
        return
    assert raw == Tlp.mem_write(address, data, requester_id).pack()
    assert Tlp.unpack(raw).data == data


def test_mem_write_raw_declines_what_it_does_not_cover() -> None:
    from fabric.tlp import mem_write_raw
    assert mem_write_raw(0x1000, bytearray(4)) is None              # not bytes
    assert mem_write_raw(-4, bytes(4)) is None
    assert mem_write_raw(1 << 64, bytes(4)) is None
    assert mem_write_raw(0x1000, bytes(4), 0x10000) is None
    assert mem_write_raw(0x1000, b"") is None
    assert mem_write_raw(0xFFC, bytes(8)) is None                   # crosses a 4 KiB page

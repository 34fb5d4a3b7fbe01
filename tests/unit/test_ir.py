"""fabric.ir: IRTE codec, MSI codecs and the interrupt-remapping unit (faults 0x20..0x26)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.bdf import Bdf
from fabric.dmar import FaultLog, FaultReason, dmar_line
from fabric.ir import (
    RSVD_POSTED,
    RSVD_REMAPPED,
    SQ_MASKS,
    CompatMsi,
    InterruptRemapper,
    IrFault,
    Irte,
    Passthrough,
    Posted,
    Remapped,
    compose_compat,
    compose_remappable,
    decode_compat,
    decode_remappable,
    irte_dest,
)

U128 = (1 << 128) - 1
DEV = 0x0100          # 01:00.0
DEV_FN1 = 0x0101      # 01:00.1

# ---------------------------------------------------------------------------------------------
# IRTE codec


def _bits(raw: int, hi: int, lo: int) -> int:
    return (raw >> lo) & ((1 << (hi - lo + 1)) - 1)


def test_remapped_known_bits_xapic() -> None:
    e = Irte.remapped(0x41, 3, DEV_FN1, trigger_mode=1, delivery_mode=1, dest_mode=1,
                      redir_hint=1, fpd=True)
    raw = e.pack()
    assert _bits(raw, 0, 0) == 1 and _bits(raw, 1, 1) == 1           # P, FPD
    assert _bits(raw, 2, 2) == 1 and _bits(raw, 3, 3) == 1           # DM, RH
    assert _bits(raw, 4, 4) == 1 and _bits(raw, 7, 5) == 1           # TM, DLM
    assert _bits(raw, 15, 15) == 0                                   # IM: remapped
    assert _bits(raw, 23, 16) == 0x41
    assert _bits(raw, 47, 40) == 3                                   # xAPIC ID in 47:40
    assert _bits(raw, 63, 32) == 0x300 == irte_dest(3, eim=False)    # Linux IRTE_DEST
    assert _bits(raw, 79, 64) == DEV_FN1
    assert _bits(raw, 81, 80) == 0 and _bits(raw, 83, 82) == 1       # SQ=0, SVT=1
    assert e.apic_dest(eim=False) == 3


def test_remapped_known_bits_x2apic() -> None:
    e = Irte.remapped(0xEC, 0x12345, DEV, eim=True)
    raw = e.pack()
    assert _bits(raw, 63, 32) == 0x12345 == irte_dest(0x12345, eim=True)
    assert e.apic_dest(eim=True) == 0x12345
    assert raw == (0x12345 << 32) | (0xEC << 16) | 1 | (DEV << 64) | (1 << 82)


def test_linux_irte_dest() -> None:
    assert irte_dest(0xFF, False) == 0xFF00
    with pytest.raises(ValueError):
        irte_dest(0x100, False)
    assert irte_dest(0x100, True) == 0x100


def test_posted_known_bits() -> None:
    pda = 0x1234_5678_9ABC_DEC0
    e = Irte.posted(0x31, pda, DEV, urgent=True, sq=3, svt=1)
    raw = e.pack()
    assert _bits(raw, 0, 0) == 1 and _bits(raw, 15, 15) == 1 and _bits(raw, 14, 14) == 1
    assert _bits(raw, 23, 16) == 0x31
    assert _bits(raw, 63, 38) == (pda >> 6) & ((1 << 26) - 1)       # PDA[31:6]
    assert _bits(raw, 127, 96) == pda >> 32                          # PDA[63:32]
    assert _bits(raw, 81, 80) == 3
    assert Irte.unpack(raw).pda == pda


def test_bytes_are_little_endian() -> None:
    e = Irte.remapped(0x41, 3, DEV_FN1)
    b = e.to_bytes()
    assert len(b) == 16
    assert b[0] == 0x01 and b[2] == 0x41 and b[5] == 3 and b[8:10] == bytes([0x01, 0x01])
    assert Irte.from_bytes(b) == e
    with pytest.raises(ValueError):
        Irte.from_bytes(b[:15])


def test_bdf_accepted_as_sid() -> None:
    assert Irte.remapped(0x41, 1, Bdf(1, 0, 1)).sid == DEV_FN1


@st.composite
def irtes(draw) -> Irte:
    mode = draw(st.integers(0, 1))
    common = dict(present=draw(st.booleans()), fpd=draw(st.booleans()),
                  avail=draw(st.integers(0, 15)), vector=draw(st.integers(0, 255)),
                  sid=draw(st.integers(0, 0xFFFF)), sq=draw(st.integers(0, 3)),
                  svt=draw(st.integers(0, 3)))
    if mode == 0:
        return Irte(mode=0, dest_mode=draw(st.integers(0, 1)), redir_hint=draw(st.integers(0, 1)),
                    trigger_mode=draw(st.integers(0, 1)), delivery_mode=draw(st.integers(0, 7)),
                    dest_id=draw(st.integers(0, 0xFFFFFFFF)),
                    rsvd=draw(st.integers(0, U128)) & RSVD_REMAPPED, **common)
    return Irte(mode=1, urgent=draw(st.booleans()),
                pda=draw(st.integers(0, (1 << 58) - 1)) << 6,
                rsvd=draw(st.integers(0, U128)) & RSVD_POSTED, **common)


@given(irtes())
def test_irte_roundtrip(e: Irte) -> None:
    assert Irte.unpack(e.pack()) == e
    assert Irte.from_bytes(e.to_bytes()) == e


@given(st.integers(0, U128))
def test_any_raw_value_roundtrips(raw: int) -> None:
    assert Irte.unpack(raw).pack() == raw


@pytest.mark.parametrize("kwargs", [
    dict(vector=256),
    dict(dest_id=1 << 32),
    dict(sid=0x10000),
    dict(sq=4),
    dict(mode=0, pda=0x40),              # posted field in remapped format
    dict(mode=1, dest_id=1),             # remapped field in posted format
    dict(mode=1, pda=0x1001),            # not 64-byte aligned
    dict(mode=0, rsvd=1),                # bit 0 is not a reserved position
    dict(mode=1, rsvd=1 << 14),          # URG is not reserved in the posted format
])
def test_irte_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        Irte(**kwargs)


def test_reserved_bits_set() -> None:
    ok = Irte.remapped(0x41, 3, DEV)
    assert not ok.reserved_bits_set(eim=False) and not ok.reserved_bits_set(eim=True)
    for bit in (12, 13, 14, 24, 31, 84, 100, 127):
        bad = Irte.unpack(ok.pack() | 1 << bit)
        assert bad.reserved_bits_set(eim=True), bit
    # SVT=3 is a reserved encoding
    assert Irte.remapped(0x41, 3, DEV, svt=3).reserved_bits_set(eim=False)
    # EIME=0: DST bits outside 15:8 (IRTE 39:32, 63:48) are reserved; EIME=1 uses all 32
    x2 = Irte.remapped(0x41, 0x10003, DEV, eim=True)
    assert x2.reserved_bits_set(eim=False) and not x2.reserved_bits_set(eim=True)
    low = Irte.remapped(0x41, 0x03, DEV, eim=True)           # DST = 3 (bits 39:32)
    assert low.reserved_bits_set(eim=False)
    posted = Irte.posted(0x41, 0x1000, DEV)
    assert not posted.reserved_bits_set(eim=False)
    for bit in (2, 7, 12, 13, 24, 37, 84, 95):
        assert Irte.unpack(posted.pack() | 1 << bit).reserved_bits_set(eim=False), bit


# ---------------------------------------------------------------------------------------------
# MSI codecs


def test_compose_remappable_known_vectors() -> None:
    # 0xFEE, handle[14:0] in 19:5, format bit 4, SHV bit 3, handle[15] bit 2
    assert compose_remappable(5) == (0xFEE000B8, 0, 0)
    assert compose_remappable(0x8000) == (0xFEE0001C, 0, 0)
    assert compose_remappable(0xFFFF, 3) == (0xFEEFFFFC, 0, 3)
    assert compose_remappable(5, shv=False) == (0xFEE000B0, 0, 0)
    with pytest.raises(ValueError):
        compose_remappable(0x10000)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.booleans())
def test_remappable_roundtrip(handle: int, sub: int, shv: bool) -> None:
    lo, hi, data = compose_remappable(handle, sub, shv)
    assert hi == 0
    m = decode_remappable(lo, data)
    assert (m.handle, m.subhandle, m.shv) == (handle, sub, shv)
    assert m.index == (handle + sub if shv else handle)
    assert m.remappable and m.base_ok and m.data_rsvd == 0


def test_compose_compat_known_vectors() -> None:
    assert compose_compat(1, 0x41) == (0xFEE01000, 0, 0x41)
    lo, hi, data = compose_compat(0xFF, 0x30, dest_mode=1, redir_hint=1, delivery_mode=1,
                                  trigger_mode=1, level_assert=1)
    assert lo == 0xFEEFF00C and hi == 0 and data == 0xC130
    # 15-bit extended destination ID in addr[11:5]; IOMMU fault-event MSI uses addr_hi
    assert compose_compat(0x1FF, 0x41, ext_dest_id=True) == (0xFEEFF020, 0, 0x41)
    assert compose_compat(0x1FF, 0x41, dmar=True) == (0xFEEFF000, 0x100, 0x41)
    with pytest.raises(ValueError):
        compose_compat(0x100, 0x41)
    with pytest.raises(ValueError):
        compose_compat(0x8000, 0x41, ext_dest_id=True)


@given(dest=st.integers(0, 0x7FFF), vector=st.integers(0, 255), dm=st.integers(0, 1),
       rh=st.integers(0, 1), dlm=st.integers(0, 7), tm=st.integers(0, 1),
       la=st.integers(0, 1), dmar=st.booleans())
def test_compat_roundtrip(dest, vector, dm, rh, dlm, tm, la, dmar) -> None:
    lo, hi, data = compose_compat(dest, vector, dm, rh, dlm, tm, level_assert=la,
                                  ext_dest_id=not dmar, dmar=dmar)
    m = decode_compat(lo, hi, data)
    assert isinstance(m, CompatMsi) and m.base_ok and not m.remappable
    assert (m.vector, m.dest_mode, m.redir_hint, m.delivery_mode, m.trigger_mode,
            m.level_assert) == (vector, dm, rh, dlm, tm, la)
    assert m.apic_id(ext_dest_id=not dmar, dmar=dmar) == dest


# ---------------------------------------------------------------------------------------------
# The remapper: success paths


def _ir(**kw) -> InterruptRemapper:
    kw.setdefault("enabled", True)
    return InterruptRemapper(**kw)


def _msg(handle: int, sub: int = 0, shv: bool = True) -> tuple[int, int]:
    lo, hi, data = compose_remappable(handle, sub, shv)
    return hi << 32 | lo, data


def test_ir_disabled_passes_through() -> None:
    ir = InterruptRemapper()
    lo, _hi, data = compose_compat(7, 0x41, dest_mode=1, delivery_mode=1, trigger_mode=1,
                                   redir_hint=1)
    assert ir.remap(DEV, lo, data) == Passthrough(7, 0x41, 1, 1, 1, 1)
    # extended destination ID only when the platform honours it
    lo, _hi, data = compose_compat(0x123, 0x41, ext_dest_id=True)
    assert ir.remap(DEV, lo, data).dest_id == 0x23
    ir.ext_dest_id = True
    assert ir.remap(DEV, lo, data).dest_id == 0x123
    assert ir.fault_log.totals == {}


def test_remapped_xapic() -> None:
    ir = _ir()
    e = Irte.remapped(0x41, 3, DEV_FN1, trigger_mode=1, dest_mode=1, redir_hint=1)
    ir.write_irte(5, e)
    r = ir.remap(DEV_FN1, *_msg(5))
    assert r == Remapped(5, e, 3, 0x41, 1, 0, 1, 1)
    assert r is ir.remap(DEV_FN1, *_msg(5))          # pre-built, shared result


def test_remapped_x2apic() -> None:
    ir = _ir(eim=True)
    ir.write_irte(0x8001, Irte.remapped(0x41, 0x12345, DEV, eim=True))
    r = ir.remap(DEV, *_msg(0x8001))
    assert isinstance(r, Remapped) and r.dest_id == 0x12345 and r.index == 0x8001


def test_posted() -> None:
    ir = _ir()
    e = Irte.posted(0x31, 0xABC0, DEV, urgent=True)
    ir.write_irte(9, e)
    assert ir.remap(DEV, *_msg(9)) == Posted(9, e, 0x31, 0xABC0, True)


def test_multi_msi_subhandles() -> None:
    ir = _ir()
    for i in range(4):
        ir.write_irte(0x10 + i, Irte.remapped(0x50 + i, 1, DEV))
    for i in range(4):
        r = ir.remap(DEV, *_msg(0x10, i))
        assert isinstance(r, Remapped) and r.index == 0x10 + i and r.vector == 0x50 + i


def test_shv_clear_ignores_data() -> None:
    ir = _ir()
    ir.write_irte(4, Irte.remapped(0x41, 1, DEV))
    addr, _ = _msg(4, shv=False)
    r = ir.remap(DEV, addr, 0xFFFF_8041)             # IO-APIC style data, high bits too
    assert isinstance(r, Remapped) and r.index == 4


# ---------------------------------------------------------------------------------------------
# Faults: one test (at least) per reason


def _only_record(ir: InterruptRemapper):
    recs = ir.fault_log.pending()
    assert len(recs) == 1, recs
    return recs[0]


@pytest.mark.parametrize("addr, data, why", [
    ((1 << 32) | 0xFEE000B8, 0, "addr_hi"),           # addr_hi != 0
    (0xFED000B8, 0, "0xFEE"),                          # addr[31:20] != 0xFEE
    (0xFEE000B8, 0x0001_0000, "data[31:16]"),          # SHV with data[31:16] != 0
])
def test_fault_0x20_variants(addr: int, data: int, why: str) -> None:
    ir = _ir()
    ir.write_irte(5, Irte.remapped(0x41, 3, DEV))
    r = ir.remap(DEV, addr, data)
    assert isinstance(r, IrFault) and r.reason == FaultReason.IR_REQ_RSVD
    assert r.index == 0 and why in r.detail and (r.addr, r.data) == (addr, data)
    rec = _only_record(ir)
    assert dmar_line(rec) == (
        "DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x0 [fault reason 0x20] "
        "Detected reserved fields in the decoded interrupt-remapped request")


def test_fault_0x20_ignores_fpd_and_compat_addr_hi() -> None:
    ir = _ir(cfi=True)
    r = ir.remap(DEV, (1 << 32) | 0xFEE01000, 0x41)   # compat format, but addr_hi set
    assert isinstance(r, IrFault) and r.reason == 0x20


def test_fault_0x21_index_beyond_table() -> None:
    ir = _ir(entries=256)
    ir.write_irte(255, Irte.remapped(0x41, 1, DEV))
    assert isinstance(ir.remap(DEV, *_msg(255)), Remapped)
    r = ir.remap(DEV, *_msg(256))
    assert isinstance(r, IrFault) and r.reason == FaultReason.IR_INDEX_OVER and r.index == 256
    r = ir.remap(DEV, *_msg(250, 6))                  # handle + sub-handle past the end
    assert r.reason == 0x21 and r.index == 256
    assert dmar_line(ir.fault_log.pending()[0]) == (
        "DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x100 [fault reason 0x21] "
        "Interrupt index exceeded the interrupt-remapping table size")


def test_fault_0x21_no_16_bit_wrap() -> None:
    ir = _ir()                                        # 65536 entries
    ir.write_irte(0, Irte.remapped(0x41, 1, DEV))
    r = ir.remap(DEV, *_msg(0xFFFF, 1))               # would alias entry 0 with a uint16 index
    assert isinstance(r, IrFault) and r.reason == 0x21 and r.index == 0x10000


def test_fault_0x22_not_present() -> None:
    ir = _ir()
    r = ir.remap(DEV, *_msg(7))
    assert isinstance(r, IrFault) and r.reason == FaultReason.IR_ENTRY_P and r.index == 7
    ir.write_irte(8, Irte.remapped(0x41, 1, DEV).pack() & ~1)   # P cleared, rest kept
    assert ir.remap(DEV, *_msg(8)).reason == 0x22
    assert [dmar_line(x) for x in ir.fault_log.pending()] == [
        "DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x7 [fault reason 0x22] "
        "Present field in the IRTE entry is clear",
        "DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x8 [fault reason 0x22] "
        "Present field in the IRTE entry is clear",
    ]


def test_fault_0x23_irta_not_programmed() -> None:
    ir = _ir(table_size_log2_minus1=None)
    assert ir.table_size is None and not ir.irta_programmed
    ir.write_irte(5, Irte.remapped(0x41, 1, DEV))
    r = ir.remap(DEV, *_msg(5))
    assert isinstance(r, IrFault) and r.reason == FaultReason.IR_ROOT_INVAL and r.index == 5
    assert dmar_line(_only_record(ir)) == (
        "DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x5 [fault reason 0x23] "
        "Error accessing interrupt-remapping table pointed by IRTA_REG")
    ir.set_irta(15)
    assert isinstance(ir.remap(DEV, *_msg(5)), Remapped)
    ir.set_table(None)
    assert ir.remap(DEV, *_msg(5)).reason == 0x23


def test_fault_0x24_reserved_bits() -> None:
    ir = _ir()
    ir.write_irte(1, Irte.remapped(0x41, 1, DEV).pack() | 1 << 100)
    ir.write_irte(2, Irte.remapped(0x41, 1, DEV, svt=3))
    ir.write_irte(3, Irte.remapped(0x41, 0x10001, DEV, eim=True))   # DST beyond 47:40
    ir.write_irte(4, Irte.posted(0x41, 0x40, DEV).pack() | 1 << 90)
    for i in (1, 2, 3, 4):
        r = ir.remap(DEV, *_msg(i))
        assert isinstance(r, IrFault) and r.reason == FaultReason.IR_IRTE_RSVD, i
    assert dmar_line(ir.fault_log.pending()[0]) == (
        "DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x1 [fault reason 0x24] "
        "Detected reserved fields in the IRTE entry")
    # reserved bits in a not-present entry do not matter: that is 0x22
    ir.write_irte(5, (1 << 100) | 0)
    assert ir.remap(DEV, *_msg(5)).reason == 0x22
    # the x2APIC destination becomes legal once EIME is set (cached entries re-decoded)
    ir.set_eim(True)
    r = ir.remap(DEV, *_msg(3))
    assert isinstance(r, Remapped) and r.dest_id == 0x10001


def test_fault_0x25_compat_blocked() -> None:
    ir = _ir()
    lo, _hi, data = compose_compat(3, 0x41)
    r = ir.remap(DEV, lo, data)
    assert isinstance(r, IrFault) and r.reason == FaultReason.IR_REQ_COMPAT and r.index == 0
    assert dmar_line(_only_record(ir)) == (
        "DMAR: [INTR-REMAP] Request device [01:00.0] fault index 0x0 [fault reason 0x25] "
        "Blocked a compatibility format interrupt request")
    ir.set_cfi(True)
    assert ir.remap(DEV, lo, data) == Passthrough(3, 0x41, 0, 0, 0, 0)
    ir.set_eim(True)                                   # CFI is ignored in x2APIC mode
    assert ir.remap(DEV, lo, data).reason == 0x25


# Requests from 01:00.0 .. 01:00.7, 01:01.0 and 02:00.0 against IRTE.SID = 01:00.0
SIDS = [0x0100 + fn for fn in range(8)] + [0x0108, 0x0200]


@pytest.mark.parametrize("sq, allowed", [
    (0, {0x0100}),                                    # all 16 bits
    (1, {0x0100, 0x0104}),                            # ignore bit 2
    (2, {0x0100, 0x0102, 0x0104, 0x0106}),            # ignore bits 2:1
    (3, set(range(0x0100, 0x0108))),                  # ignore bits 2:0 (HPET workaround)
])
def test_fault_0x26_svt1_sq(sq: int, allowed: set[int]) -> None:
    ir = _ir()
    ir.write_irte(5, Irte.remapped(0x41, 3, DEV, svt=1, sq=sq))
    for sid in SIDS:
        r = ir.remap(sid, *_msg(5))
        if sid in allowed:
            assert isinstance(r, Remapped), (sq, hex(sid))
        else:
            assert isinstance(r, IrFault) and r.reason == FaultReason.IR_SID_ERR, (sq, hex(sid))
            assert r.detail == "sid" and r.sid == sid
    assert SQ_MASKS[sq] == (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)[sq]
    assert ir.fault_log.totals[0x26] == len(SIDS) - len(allowed)


def test_fault_0x26_line() -> None:
    ir = _ir()
    ir.write_irte(5, Irte.remapped(0x41, 3, DEV))
    ir.remap(DEV_FN1, *_msg(5))
    assert dmar_line(_only_record(ir)) == (
        "DMAR: [INTR-REMAP] Request device [01:00.1] fault index 0x5 [fault reason 0x26] "
        "Blocked an interrupt request due to source-id verification failure")


def test_svt2_bus_range() -> None:
    ir = _ir()
    ir.write_irte(5, Irte.remapped(0x41, 3, (2 << 8) | 3, svt=2))   # buses 2..3, Linux encoding
    for bus, ok in ((1, False), (2, True), (3, True), (4, False)):
        r = ir.remap(bus << 8 | 0x1F, *_msg(5))
        assert isinstance(r, Remapped) is ok, bus
        if not ok:
            assert r.reason == 0x26 and r.detail == "bus"
    ir.write_irte(6, Irte.remapped(0x41, 3, (3 << 8) | 2, svt=2))   # start > end: empty
    assert ir.remap(0x0300, *_msg(6)).reason == 0x26


def test_svt0_no_verification() -> None:
    ir = _ir()
    ir.write_irte(5, Irte.remapped(0x41, 3, 0, svt=0))
    assert all(isinstance(ir.remap(sid, *_msg(5)), Remapped) for sid in (0, 0x0100, 0xFFFF))


# ---------------------------------------------------------------------------------------------
# Fault recording policy


def test_fpd_blocks_but_suppresses_recording() -> None:
    ir = _ir()
    ir.write_irte(5, Irte.remapped(0x41, 3, DEV, fpd=True))
    r = ir.remap(DEV_FN1, *_msg(5))
    assert isinstance(r, IrFault) and r.reason == 0x26
    assert ir.fault_log.pending() == [] and ir.fault_log.totals == {}
    assert ir.fault_log.suppressed == {FaultReason.IR_SID_ERR: 1}
    # FPD in a not-present entry qualifies 0x22 too (QEMU applies FPD before the P check)
    ir.write_irte(6, 0b10)
    assert ir.remap(DEV, *_msg(6)).reason == 0x22
    assert ir.fault_log.suppressed[0x22] == 1 and ir.fault_log.pending() == []
    # request-level faults have no IRTE, so nothing can suppress them
    ir.remap(DEV, 0xFED00000, 0)
    assert ir.fault_log.totals == {0x20: 1}


def test_do_fault_false_probes_silently() -> None:
    ir = _ir()
    r = ir.remap(DEV, *_msg(5), do_fault=False)
    assert isinstance(r, IrFault) and r.reason == 0x22
    assert ir.fault_log.totals == {} and ir.fault_log.suppressed == {}


def test_log_overflow_through_remapper() -> None:
    log = FaultLog(2)
    ir = _ir(fault_log=log)
    for i in range(5):
        ir.remap(DEV, *_msg(i))
    assert len(log.pending()) == 2 and log.pfo and log.overflow == 3
    assert log.totals == {FaultReason.IR_ENTRY_P: 5}
    assert [r.index for r in log.drain()] == [0, 1]
    ir.remap(DEV, *_msg(9))
    assert [r.index for r in log.pending()] == [9]


def test_fault_record_detail() -> None:
    ir = _ir()
    ir.remap(DEV, 0xFED00000, 0x41)
    rec = _only_record(ir)
    assert rec.kind == "intr" and rec.source_id == DEV
    assert rec.detail == {"addr": 0xFED00000, "data": 0x41, "check": "addr[31:20] != 0xFEE"}


# ---------------------------------------------------------------------------------------------
# Lab PASID-check hook (capability pasid_ir)


def test_pasid_check_hook() -> None:
    ir = _ir()
    ir.write_irte(5, Irte.remapped(0x41, 3, DEV), pasid=0x42)
    ir.write_irte(6, Irte.remapped(0x41, 3, DEV))
    assert ir.expected_pasid(5) == 0x42 and ir.expected_pasid(6) is None
    # capability off: no entry takes a PASID-tagged request (0x26), untagged ones pass
    r = ir.remap(DEV, *_msg(6), pasid=0x7)
    assert isinstance(r, IrFault) and r.reason == 0x26 and r.detail == "pasid"
    assert isinstance(ir.remap(DEV, *_msg(6)), Remapped)
    ir.pasid_check = True
    assert isinstance(ir.remap(DEV, *_msg(5), pasid=0x42), Remapped)
    for bad in (0x7, None):
        r = ir.remap(DEV, *_msg(5), pasid=bad)
        assert isinstance(r, IrFault) and r.reason == 0x26 and r.detail == "pasid"
    # an entry without an expected PASID accepts only requests without one: a PASID-tagged
    # request (an ADI sharing the RID) may not use the RID-only entries of that RID
    assert isinstance(ir.remap(DEV, *_msg(6)), Remapped)
    r = ir.remap(DEV, *_msg(6), pasid=0x7)
    assert isinstance(r, IrFault) and r.reason == 0x26 and r.detail == "pasid"
    # rewriting the entry without a PASID drops the side-table value
    ir.write_irte(5, Irte.remapped(0x41, 3, DEV))
    assert ir.expected_pasid(5) is None


# ---------------------------------------------------------------------------------------------
# Table management


def test_table_management() -> None:
    ir = _ir()
    e = Irte.remapped(0x41, 3, DEV)
    ir.write_irte(5, e)
    assert ir.read_irte(5) == e.pack() and ir.irte(5) == e and ir.table == {5: e.pack()}
    with pytest.raises(TypeError):
        ir.table[6] = 1  # type: ignore[index]
    ir.clear_irte(5)
    assert ir.read_irte(5) == 0 and ir.remap(DEV, *_msg(5)).reason == 0x22
    ir.write_irte(5, e)
    ir.write_irte(5, 0)
    assert 5 not in ir.table
    assert ir.invalidate() == 1 and ir.invalidate(5) == 2 and ir.iec_invalidations == 2
    for bad in (-1, 0x10000):
        with pytest.raises(ValueError):
            ir.write_irte(bad, e)
    with pytest.raises(ValueError):
        ir.write_irte(1, 1 << 128)
    for bad in (1, 3, 0x20000):
        with pytest.raises(ValueError):
            ir.set_table(bad)
    with pytest.raises(ValueError):
        ir.set_irta(16)
    ir.set_irta(7)
    assert ir.table_size == 256


def test_enable_disable() -> None:
    ir = InterruptRemapper()
    assert not ir.enabled and not ir.cfi and ir.table_size == 65536
    ir.write_irte(5, Irte.remapped(0x41, 3, DEV))
    addr, data = _msg(5)
    assert isinstance(ir.remap(DEV, addr, data), Passthrough)
    ir.set_ir_enabled(True)
    assert isinstance(ir.remap(DEV, addr, data), Remapped)


_remappable_addr = st.builds(lambda h, s: compose_remappable(h, 0, s)[0],
                             st.integers(0, 17), st.booleans())


@given(
    entries=st.dictionaries(st.integers(0, 15), st.integers(0, U128) | irtes().map(Irte.pack),
                            max_size=8),
    sid=st.integers(0, 0xFFFF) | st.sampled_from(SIDS),
    addr=st.integers(0, (1 << 64) - 1) | st.integers(0xFEE00000, 0xFEEFFFFF) | _remappable_addr,
    data=st.integers(0, 0xFFFFFFFF) | st.integers(0, 3),
    pasid=st.none() | st.integers(0, 0xFFFFF),
    eim=st.booleans(), cfi=st.booleans(), pasid_check=st.booleans(),
)
def test_remap_total_on_hostile_input(entries, sid, addr, data, pasid, eim, cfi,
                                      pasid_check) -> None:
    ir = _ir(entries=16, eim=eim, cfi=cfi, pasid_check=pasid_check, fault_log=FaultLog(4))
    for i, raw in entries.items():
        ir.write_irte(i, raw, pasid=pasid)
    r = ir.remap(sid, addr, data, pasid)
    assert isinstance(r, (Remapped, Posted, Passthrough, IrFault))
    if isinstance(r, (Remapped, Posted)):
        irte = Irte.unpack(entries[r.index])
        assert irte.present and not irte.reserved_bits_set(eim)
    if isinstance(r, IrFault):
        assert 0x20 <= r.reason <= 0x26
        assert all(dmar_line(x).startswith("DMAR: [INTR-REMAP]") for x in ir.fault_log.pending())

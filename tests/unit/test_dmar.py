"""fabric.dmar: fault reasons, Linux strings and log lines, FRCD encoding, the bounded fault log."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.dmar import (
    FSTS_PFO,
    FSTS_PPF,
    FaultLog,
    FaultReason,
    FaultRecord,
    dmar_line,
    drhd_line,
    is_ir_reason,
    reason_string,
)

# ---------------------------------------------------------------------------------------------
# Reason codes and strings


def test_reason_codes_match_vtd_spec() -> None:
    expected = {
        "RESERVED": 0x00, "ROOT_ENTRY_P": 0x01, "CONTEXT_ENTRY_P": 0x02,
        "CONTEXT_ENTRY_INV": 0x03, "ADDR_BEYOND_MGAW": 0x04, "WRITE": 0x05, "READ": 0x06,
        "PAGING_ENTRY_INV": 0x07, "ROOT_TABLE_INV": 0x08, "CONTEXT_TABLE_INV": 0x09,
        "ROOT_ENTRY_RSVD": 0x0A, "CONTEXT_ENTRY_RSVD": 0x0B, "PAGING_ENTRY_RSVD": 0x0C,
        "CONTEXT_ENTRY_TT": 0x0D,
        "IR_REQ_RSVD": 0x20, "IR_INDEX_OVER": 0x21, "IR_ENTRY_P": 0x22, "IR_ROOT_INVAL": 0x23,
        "IR_IRTE_RSVD": 0x24, "IR_REQ_COMPAT": 0x25, "IR_SID_ERR": 0x26,
    }
    assert {m.name: m.value for m in FaultReason} == expected


IR_STRINGS = {
    0x20: "Detected reserved fields in the decoded interrupt-remapped request",
    0x21: "Interrupt index exceeded the interrupt-remapping table size",
    0x22: "Present field in the IRTE entry is clear",
    0x23: "Error accessing interrupt-remapping table pointed by IRTA_REG",
    0x24: "Detected reserved fields in the IRTE entry",
    0x25: "Blocked a compatibility format interrupt request",
    0x26: "Blocked an interrupt request due to source-id verification failure",
}

DMA_STRINGS = [
    "Software", "Present bit in root entry is clear", "Present bit in context entry is clear",
    "Invalid context entry", "Access beyond MGAW", "PTE Write access is not set",
    "PTE Read access is not set", "Next page table ptr is invalid", "Root table address invalid",
    "Context table ptr is invalid", "non-zero reserved fields in RTP",
    "non-zero reserved fields in CTP", "non-zero reserved fields in PTE",
    "PCE for translation request specifies blocking",
]


def test_reason_strings_exact() -> None:
    for code, text in IR_STRINGS.items():
        assert reason_string(code) == text
        assert FaultReason(code).text == text
        assert is_ir_reason(code)
    for code, text in enumerate(DMA_STRINGS):
        assert reason_string(code) == text
        assert not is_ir_reason(code)


@pytest.mark.parametrize("code", [0x0E, 0x1F, 0x27, 0x2F, 0x33, 0x49, 0x5F, 0x91, 0xFF])
def test_unknown_codes(code: int) -> None:
    assert reason_string(code) == "Unknown"


def test_scalable_mode_strings() -> None:
    assert reason_string(0x30) == "SM: Invalid Root Table Address"
    assert reason_string(0x58) == "SM: Error attempting to access PASID Table Entry"
    assert reason_string(0x90) == "SM: A/D bit update needed in first-level entry when set up in no snoop"


# ---------------------------------------------------------------------------------------------
# dmar_line: exact Linux dmar_fault_do_one output


@pytest.mark.parametrize("code", sorted(IR_STRINGS))
def test_ir_line_every_reason(code: int) -> None:
    rec = FaultRecord(code, 0x0101, "intr", index=5)
    assert dmar_line(rec) == (
        f"DMAR: [INTR-REMAP] Request device [01:00.1] fault index 0x5 "
        f"[fault reason 0x{code:02x}] {IR_STRINGS[code]}"
    )
    assert rec.line() == dmar_line(rec)


def test_ir_line_brief_example() -> None:
    rec = FaultRecord(FaultReason.IR_SID_ERR, 0x0101, "intr", index=5)
    assert dmar_line(rec) == (
        "DMAR: [INTR-REMAP] Request device [01:00.1] fault index 0x5 [fault reason 0x26] "
        "Blocked an interrupt request due to source-id verification failure"
    )


def test_ir_line_index_is_16_bits_lowercase_hex() -> None:
    rec = FaultRecord(0x21, 0xFFFF, "intr", index=0xABCD)
    assert dmar_line(rec) == (
        "DMAR: [INTR-REMAP] Request device [ff:1f.7] fault index 0xabcd [fault reason 0x21] "
        "Interrupt index exceeded the interrupt-remapping table size"
    )
    # an index past 16 bits (handle + sub-handle overflow) shows as the FRCD field would
    assert "fault index 0x0 " in dmar_line(FaultRecord(0x21, 0, "intr", index=0x10000))


def test_dma_write_no_pasid() -> None:
    rec = FaultRecord(FaultReason.WRITE, 0x0100, "dma-write", addr=0x1000)
    assert dmar_line(rec) == (
        "DMAR: [DMA Write NO_PASID] Request device [01:00.0] fault addr 0x1000 "
        "[fault reason 0x05] PTE Write access is not set"
    )


def test_dma_read_pasid() -> None:
    rec = FaultRecord(FaultReason.READ, 0x0100, "dma-read", addr=0xDEAD_B000, pasid=5)
    assert dmar_line(rec) == (
        "DMAR: [DMA Read PASID 0x5] Request device [01:00.0] fault addr 0xdeadb000 "
        "[fault reason 0x06] PTE Read access is not set"
    )


def test_dma_line_address_is_page_aligned_like_frcd() -> None:
    rec = FaultRecord(0x02, 0x0308, "dma-read", addr=0x12345678)
    assert dmar_line(rec) == (
        "DMAR: [DMA Read NO_PASID] Request device [03:01.0] fault addr 0x12345000 "
        "[fault reason 0x02] Present bit in context entry is clear"
    )


def test_unknown_code_prints_in_dma_format() -> None:
    rec = FaultRecord(0x99, 0x0100, "dma-write", addr=0x2000)
    assert dmar_line(rec) == (
        "DMAR: [DMA Write NO_PASID] Request device [01:00.0] fault addr 0x2000 "
        "[fault reason 0x99] Unknown"
    )
    # as in Linux the code, not the kind, picks the format
    rec = FaultRecord(0x27, 0x0100, "intr", index=1)
    assert dmar_line(rec) == (
        "DMAR: [DMA Write NO_PASID] Request device [01:00.0] fault addr 0x1000000000000 "
        "[fault reason 0x27] Unknown"
    )


def test_sm_line() -> None:
    rec = FaultRecord(0x58, 0x0100, "dma-read", addr=0x0, pasid=0x12)
    assert dmar_line(rec) == (
        "DMAR: [DMA Read PASID 0x12] Request device [01:00.0] fault addr 0x0 "
        "[fault reason 0x58] SM: Error attempting to access PASID Table Entry"
    )


def test_drhd_line() -> None:
    assert drhd_line(0x2) == "DMAR: DRHD: handling fault status reg 2"
    assert drhd_line(0x302) == "DMAR: DRHD: handling fault status reg 302"


_LINE_RE = re.compile(
    r"^DMAR: \[(INTR-REMAP|DMA (Read|Write) (NO_PASID|PASID 0x[0-9a-f]+))\] "
    r"Request device \[[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]\] "
    r"fault (index|addr) 0x[0-9a-f]+ \[fault reason 0x[0-9a-f]{2}\] .+$"
)


@given(
    reason=st.integers(0, 0xFF),
    sid=st.integers(0, 0xFFFF),
    kind=st.sampled_from(["intr", "dma-read", "dma-write"]),
    index=st.integers(0, 0x1FFFF),
    addr=st.integers(0, (1 << 64) - 1),
    pasid=st.none() | st.integers(0, 0xFFFFF),
)
def test_dmar_line_shape(reason, sid, kind, index, addr, pasid) -> None:
    line = dmar_line(FaultRecord(reason, sid, kind, index=index, addr=addr, pasid=pasid))
    assert _LINE_RE.match(line), line
    assert ("INTR-REMAP" in line) == (0x20 <= reason <= 0x26)


# ---------------------------------------------------------------------------------------------
# FaultRecord


def test_record_reason_becomes_enum_and_detail_is_not_compared() -> None:
    a = FaultRecord(0x26, 1, "intr", index=3, detail={"check": "sid"})
    b = FaultRecord(FaultReason.IR_SID_ERR, 1, "intr", index=3)
    assert a.reason is FaultReason.IR_SID_ERR
    assert a == b and hash(a) == hash(b)
    assert FaultRecord(0x99, 1).reason == 0x99


@pytest.mark.parametrize("kwargs", [
    dict(reason=0x100, source_id=0),
    dict(reason=-1, source_id=0),
    dict(reason=0x26, source_id=0x10000),
    dict(reason=0x26, source_id=0, kind="dma"),
    dict(reason=0x05, source_id=0, kind="dma-read", addr=1 << 64),
    dict(reason=0x05, source_id=0, kind="dma-read", pasid=1 << 20),
    dict(reason=0x26, source_id=0, index=-1),
])
def test_record_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        FaultRecord(**kwargs)


def test_frcd_encoding() -> None:
    lo, hi = FaultRecord(0x26, 0x0101, "intr", index=5).frcd()
    assert lo == 5 << 48
    assert hi == (1 << 63) | (0x26 << 32) | 0x0101          # F, FR, SID; T=0 (write)
    lo, hi = FaultRecord(0x06, 0x0100, "dma-read", addr=0x1234, pasid=0x5).frcd()
    assert lo == 0x1000
    assert hi == (1 << 63) | (1 << 62) | (0x5 << 40) | (0x06 << 32) | (1 << 31) | 0x0100
    _lo, hi = FaultRecord(0x05, 0x0100, "dma-write", addr=0x1000).frcd()
    assert not hi & (1 << 62) and not hi & (1 << 31)


# ---------------------------------------------------------------------------------------------
# FaultLog


def _rec(i: int, reason: int = 0x26) -> FaultRecord:
    return FaultRecord(reason, i, "intr", index=i)


def test_log_records_in_order_and_drains() -> None:
    log = FaultLog(4)
    assert log.fsts == 0 and not log.ppf
    assert log.record(_rec(1)) and log.record(_rec(2))
    assert log.ppf and log.fri == 0 and log.events == 1
    assert log.fsts == FSTS_PPF
    assert [r.source_id for r in log.pending()] == [1, 2]
    assert log.slot(0) == _rec(1) and log.slot(2) is None
    assert log.lines()[0].startswith("DMAR: [INTR-REMAP] Request device [00:00.1]")
    assert [r.source_id for r in log.drain()] == [1, 2]
    assert log.pending() == [] and log.fsts == 0
    # next record goes to register 2; it sets PPF again, so FRI points at it
    log.record(_rec(3))
    assert log.fri == 2 and log.events == 2 and log.fsts == FSTS_PPF | (2 << 8)


def test_log_overflow_sets_pfo_and_drops_until_cleared() -> None:
    log = FaultLog(2)
    assert log.record(_rec(1)) and log.record(_rec(2))
    assert not log.record(_rec(3))                        # FRCD[0] still full
    assert log.pfo and log.overflow == 1
    assert log.fsts & FSTS_PFO
    log.clear(0)                                          # free a register ...
    assert not log.record(_rec(4))                        # ... PFO still blocks recording
    assert log.overflow == 2
    log.clear_pfo()
    assert log.record(_rec(5))
    assert [r.source_id for r in log.pending()] == [2, 5]
    assert log.recorded == 3
    assert log.totals[FaultReason.IR_SID_ERR] == 5        # recorded + dropped


def test_log_totals_per_reason_and_suppressed() -> None:
    log = FaultLog(8)
    log.record(_rec(1, 0x22))
    log.record(_rec(2, 0x22))
    log.record(_rec(3, 0x05))
    log.suppress(FaultReason.IR_SID_ERR)
    assert log.totals == {0x22: 2, 0x05: 1}
    assert log.suppressed == {FaultReason.IR_SID_ERR: 1}
    assert len(log.pending()) == 3


def test_log_bounded() -> None:
    log = FaultLog(8)
    for i in range(1000):
        log.record(_rec(i & 0xFFFF))
    assert len(log.pending()) == 8 and log.overflow == 992 and log.totals[0x26] == 1000


def test_log_size_validation() -> None:
    with pytest.raises(ValueError):
        FaultLog(0)

"""VT-d fault reporting: reason codes, fault records, the bounded fault log, Linux log lines.

Shared by the interrupt-remapping unit (``fabric.ir``) and the DMA-remapping unit (IOMMU).
Pure and synchronous: nothing here does I/O or logging; ``dmar_line`` only *formats* text.

Sources (digest ``reference/interrupts-and-remapping.md`` section 5):

* reason codes: VT-d spec "fault reasons", QEMU ``VTDFaultReason`` (``VTD_FR_*`` names);
* reason strings and line format: Linux ``drivers/iommu/intel/dmar.c``
  (``dma_remap_fault_reasons``, ``dma_remap_sm_fault_reasons``, ``irq_remap_fault_reasons``,
  ``dmar_get_fault_reason``, ``dmar_fault_do_one``, ``dmar_fault``);
* record / register model: QEMU ``vtd_report_frcd_fault`` (PFO, next FRCD index, F bit).

Fault recording register (FRCD, 16 bytes, one per record; VT-d 10.4.14)::

    hi qword (offset +8)
     63  62  61..60  59 ........ 40  39 .... 32  31  30 ........ 16  15 ............ 0
    +---+---+-------+---------------+------------+----+--------------+----------------+
    | F | T |  AT   |  PV (PASID)   |     FR     | PP |   reserved   |      SID       |
    +---+---+-------+---------------+------------+----+--------------+----------------+
      F = fault (W1C)   T = 1 read / 0 write   FR = fault reason   PP = PASID present
    lo qword (offset +0)
     63 ..................................... 12  11 ............................... 0
    +--------------------------------------------+----------------------------------+
    |  FI: faulting page address (DMA)           |  reserved                        |
    |  or: interrupt index in 63:48 (IR faults)  |                                  |
    +--------------------------------------------+----------------------------------+

F, T, FR, SID and FI are from the digest (QEMU/Linux, verified).  PV 59:40 and PP 31 follow
Linux ``dma_frcd_pasid_value`` / ``dma_frcd_pasid_present`` as applied in ``dmar_fault``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, Mapping

from fabric.bdf import rid_str

__all__ = [
    "FaultReason",
    "FaultKind",
    "FAULT_KINDS",
    "FaultRecord",
    "FaultLog",
    "reason_string",
    "is_ir_reason",
    "dmar_line",
    "drhd_line",
    "FSTS_PFO",
    "FSTS_PPF",
]


class FaultReason(IntEnum):
    """VT-d fault reason codes (FRCD.FR), named after QEMU ``VTD_FR_*``.

    0x00-0x0D: legacy-mode DMA remapping faults.  0x20-0x26: interrupt-remapping faults.
    Scalable-mode DMA codes (0x30..0x90) are not enumerated here; ``FaultRecord`` and
    ``reason_string`` accept any 8-bit code, so the IOMMU may use plain ints for them.
    """

    # DMA remapping (legacy mode)
    RESERVED = 0x00            # "Software" (reserved)
    ROOT_ENTRY_P = 0x01        # root entry not present
    CONTEXT_ENTRY_P = 0x02     # context entry not present
    CONTEXT_ENTRY_INV = 0x03   # invalid context entry
    ADDR_BEYOND_MGAW = 0x04    # address beyond MGAW
    WRITE = 0x05               # PTE denies write
    READ = 0x06                # PTE denies read
    PAGING_ENTRY_INV = 0x07    # next-level table pointer invalid
    ROOT_TABLE_INV = 0x08      # root table address invalid
    CONTEXT_TABLE_INV = 0x09   # context table pointer invalid
    ROOT_ENTRY_RSVD = 0x0A     # reserved bits in root entry
    CONTEXT_ENTRY_RSVD = 0x0B  # reserved bits in context entry
    PAGING_ENTRY_RSVD = 0x0C   # reserved bits in paging entry
    CONTEXT_ENTRY_TT = 0x0D    # translation type blocks the request
    # Interrupt remapping
    IR_REQ_RSVD = 0x20    # reserved field set in the interrupt request
    IR_INDEX_OVER = 0x21  # interrupt index beyond the IRT size
    IR_ENTRY_P = 0x22     # IRTE present bit clear
    IR_ROOT_INVAL = 0x23  # error reading the IRT via IRTA_REG
    IR_IRTE_RSVD = 0x24   # reserved bits set in a present IRTE
    IR_REQ_COMPAT = 0x25  # compatibility-format interrupt blocked
    IR_SID_ERR = 0x26     # source-id verification failed

    @property
    def text(self) -> str:
        """The Linux reason string for this code."""
        return reason_string(self)


# ---------------------------------------------------------------------------------------------
# Linux reason strings (verbatim: emulated logs must match real ones)

_DMA_REASONS = (
    "Software",
    "Present bit in root entry is clear",
    "Present bit in context entry is clear",
    "Invalid context entry",
    "Access beyond MGAW",
    "PTE Write access is not set",
    "PTE Read access is not set",
    "Next page table ptr is invalid",
    "Root table address invalid",
    "Context table ptr is invalid",
    "non-zero reserved fields in RTP",
    "non-zero reserved fields in CTP",
    "non-zero reserved fields in PTE",
    "PCE for translation request specifies blocking",
)

_IR_REASONS = (
    "Detected reserved fields in the decoded interrupt-remapped request",
    "Interrupt index exceeded the interrupt-remapping table size",
    "Present field in the IRTE entry is clear",
    "Error accessing interrupt-remapping table pointed by IRTA_REG",
    "Detected reserved fields in the IRTE entry",
    "Blocked a compatibility format interrupt request",
    "Blocked an interrupt request due to source-id verification failure",
)

# dma_remap_sm_fault_reasons[] covers 0x30..0x90; its "Unknown" fillers are left out here
# (a missing code reads as "Unknown", which is what the Linux table says for them).
_SM_REASONS = {
    0x30: "SM: Invalid Root Table Address",
    0x31: "SM: TTM 0 for request with PASID",
    0x32: "SM: TTM 0 for page group request",
    0x38: "SM: Error attempting to access Root Entry",
    0x39: "SM: Present bit in Root Entry is clear",
    0x3A: "SM: Non-zero reserved field set in Root Entry",
    0x40: "SM: Error attempting to access Context Entry",
    0x41: "SM: Present bit in Context Entry is clear",
    0x42: "SM: Non-zero reserved field set in the Context Entry",
    0x43: "SM: Invalid Context Entry",
    0x44: "SM: DTE field in Context Entry is clear",
    0x45: "SM: PASID Enable field in Context Entry is clear",
    0x46: "SM: PASID is larger than the max in Context Entry",
    0x47: "SM: PRE field in Context-Entry is clear",
    0x48: "SM: RID_PASID field error in Context-Entry",
    0x50: "SM: Error attempting to access the PASID Directory Entry",
    0x51: "SM: Present bit in Directory Entry is clear",
    0x52: "SM: Non-zero reserved field set in PASID Directory Entry",
    0x58: "SM: Error attempting to access PASID Table Entry",
    0x59: "SM: Present bit in PASID Table Entry is clear",
    0x5A: "SM: Non-zero reserved field set in PASID Table Entry",
    0x5B: "SM: Invalid Scalable-Mode PASID Table Entry",
    0x5C: "SM: ERE field is clear in PASID Table Entry",
    0x5D: "SM: SRE field is clear in PASID Table Entry",
    0x70: "SM: Error attempting to access first-level paging entry",
    0x71: "SM: Present bit in first-level paging entry is clear",
    0x72: "SM: Non-zero reserved field set in first-level paging entry",
    0x73: "SM: Error attempting to access FL-PML4 entry",
    0x74: "SM: First-level entry address beyond MGAW in Nested translation",
    0x75: "SM: Read permission error in FL-PML4 entry in Nested translation",
    0x76: "SM: Read permission error in first-level paging entry in Nested translation",
    0x77: "SM: Write permission error in first-level paging entry in Nested translation",
    0x78: "SM: Error attempting to access second-level paging entry",
    0x79: "SM: Read/Write permission error in second-level paging entry",
    0x7A: "SM: Non-zero reserved field set in second-level paging entry",
    0x7B: "SM: Invalid second-level page table pointer",
    0x7C: "SM: A/D bit update needed in second-level entry when set up in no snoop",
    0x80: "SM: Address in first-level translation is not canonical",
    0x81: "SM: U/S set 0 for first-level translation with user privilege",
    0x82: "SM: No execute permission for request with PASID and ER=1",
    0x83: "SM: Address beyond the DMA hardware max",
    0x84: "SM: Second-level entry address beyond the max",
    0x85: "SM: No write permission for Write/AtomicOp request",
    0x86: "SM: No read permission for Read/AtomicOp request",
    0x87: "SM: Invalid address-interrupt address",
    0x90: "SM: A/D bit update needed in first-level entry when set up in no snoop",
}


def is_ir_reason(code: int) -> bool:
    """True for 0x20..0x26: Linux prints these in the ``[INTR-REMAP]`` format."""
    return 0x20 <= code < 0x20 + len(_IR_REASONS)


def reason_string(code: int) -> str:
    """Linux ``dmar_get_fault_reason``: the reason text for an 8-bit code, else ``"Unknown"``."""
    if is_ir_reason(code):
        return _IR_REASONS[code - 0x20]
    if code >= 0x30:
        return _SM_REASONS.get(code, "Unknown")
    if 0 <= code < len(_DMA_REASONS):
        return _DMA_REASONS[code]
    return "Unknown"


# ---------------------------------------------------------------------------------------------
# Fault records

FaultKind = Literal["intr", "dma-read", "dma-write"]
FAULT_KINDS: frozenset[str] = frozenset({"intr", "dma-read", "dma-write"})

_U64 = (1 << 64) - 1
_FRCD_F = 1 << 63
_FRCD_T = 1 << 62
_FRCD_PP = 1 << 31


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One recorded fault: the content of an FRCD register, plus lab-only ``detail``.

    ``reason``: FR code (``FaultReason`` when known, any 0..255 int otherwise).
    ``source_id``: 16-bit requester ID.  ``kind``: ``"intr"`` (IR fault, uses ``index``),
    ``"dma-read"`` / ``"dma-write"`` (DMA fault, uses ``addr``; sets FRCD.T for reads).
    ``pasid``: the request's PASID, or None (NO_PASID).  ``detail``: free-form information for
    the lab's own reports; not part of the register, excluded from equality and hashing.
    """

    reason: int
    source_id: int
    kind: FaultKind = "intr"
    index: int = 0
    addr: int = 0
    pasid: int | None = None
    detail: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.reason <= 0xFF:
            raise ValueError(f"fault reason 0x{self.reason:x} does not fit in 8 bits")
        if self.reason in FaultReason._value2member_map_:
            object.__setattr__(self, "reason", FaultReason(self.reason))
        if not 0 <= self.source_id <= 0xFFFF:
            raise ValueError(f"source-id 0x{self.source_id:x} does not fit in 16 bits")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} not one of {sorted(FAULT_KINDS)}")
        if self.index < 0 or not 0 <= self.addr <= _U64:
            raise ValueError("negative index or address beyond 64 bits")
        if self.pasid is not None and not 0 <= self.pasid <= 0xFFFFF:
            raise ValueError(f"PASID 0x{self.pasid:x} does not fit in 20 bits")

    @property
    def is_read(self) -> bool:
        """FRCD.T: 1 for a read request.  Interrupt requests are writes."""
        return self.kind == "dma-read"

    def frcd(self) -> tuple[int, int]:
        """Encode as the (lo, hi) qwords of a fault recording register, F bit set.

        IR faults carry the 16-bit interrupt index in lo[63:48] (an index beyond 0xFFFF,
        possible when handle + sub-handle overflows, is truncated as a 16-bit field would be)
        and no PASID.  DMA faults carry the page address in lo[63:12].
        """
        if self.kind == "intr":
            lo = (self.index & 0xFFFF) << 48
        else:
            lo = self.addr & ~0xFFF & _U64
        hi = _FRCD_F | (int(self.reason) << 32) | self.source_id
        if self.kind == "dma-read":
            hi |= _FRCD_T
        if self.kind != "intr" and self.pasid is not None:
            hi |= _FRCD_PP | (self.pasid << 40)
        return lo, hi

    def line(self) -> str:
        """Same as ``dmar_line(self)``."""
        return dmar_line(self)


def dmar_line(record: FaultRecord) -> str:
    """The line Linux ``dmar_fault_do_one`` prints for this record (``pr_fmt`` "DMAR: ").

    As in Linux, the *reason code* selects the format: 0x20..0x26 print
    ``[INTR-REMAP] ... fault index 0x<idx>``; every other code (unknown ones included) prints
    the DMA format, ``[DMA Read|Write NO_PASID|PASID 0x<p>] ... fault addr 0x<page>``.
    The address is what Linux reads back from FRCD.FI: page-aligned (bits 11:0 cleared).
    """
    lo, _hi = record.frcd()
    code = int(record.reason)
    dev = rid_str(record.source_id)
    if is_ir_reason(code):
        return (
            f"DMAR: [INTR-REMAP] Request device [{dev}] fault index 0x{lo >> 48:x} "
            f"[fault reason 0x{code:02x}] {reason_string(code)}"
        )
    rw = "DMA Read" if record.is_read else "DMA Write"
    if record.pasid is None or record.kind == "intr":
        tag = f"{rw} NO_PASID"
    else:
        tag = f"{rw} PASID 0x{record.pasid:x}"
    return (
        f"DMAR: [{tag}] Request device [{dev}] fault addr 0x{lo:x} "
        f"[fault reason 0x{code:02x}] {reason_string(code)}"
    )


def drhd_line(fsts: int) -> str:
    """The line Linux ``dmar_fault`` prints first (rate-limited) for a nonzero FSTS."""
    return f"DMAR: DRHD: handling fault status reg {fsts:x}"


# ---------------------------------------------------------------------------------------------
# The bounded fault log

FSTS_PFO = 1 << 0  # primary fault overflow
FSTS_PPF = 1 << 1  # primary pending fault (some FRCD has F set)


class FaultLog:
    """The primary fault log of one remapping unit: ``num_records`` FRCD registers.

    Theory of operation (QEMU ``vtd_report_frcd_fault``, VT-d 7.2.1):

    * ``record(rec)`` is hardware reporting a fault.  If FSTS.PFO is already set the fault is
      dropped.  Otherwise it goes into the next register in turn; if that register still holds
      an unserviced record (F set), the fault is dropped and PFO is set.  Every reported fault,
      recorded or dropped, counts in ``totals[reason]``; dropped ones also in ``overflow``.
    * When a record sets PPF (no record was pending before), FSTS.FRI is set to its register
      index and a fault event (the unit's fault-event MSI) would be raised: ``events`` counts
      these.  While PPF stays set, FRI and ``events`` do not change.
    * ``suppress(reason)`` is a fault that its entry's FPD (fault processing disable) bit
      qualified away: the request is still blocked, nothing is recorded, and only
      ``suppressed[reason]`` counts it.
    * Software services the log with ``drain()`` (the Linux ``dmar_fault`` handler: read and
      clear every register holding a record, then clear PFO), or with ``clear(slot)`` and
      ``clear_pfo()`` one register at a time.  ``pending()``/``drain()`` list records in the
      order they were recorded (with registers cleared one at a time, that can differ from
      walking the registers from FRI).

    Probing translations (``do_fault=False`` in the remapper) never reach the log.
    """

    __slots__ = ("num_records", "_slots", "_seq", "_next", "fri", "pfo", "overflow",
                 "recorded", "events", "totals", "suppressed")

    def __init__(self, num_records: int = 8) -> None:
        if not 1 <= num_records <= 256:
            raise ValueError("a unit has between 1 and 256 fault recording registers")
        self.num_records = num_records
        self._slots: list[FaultRecord | None] = [None] * num_records
        self._seq: list[int] = [0] * num_records  # recording order of each register
        self._next = 0               # QEMU next_frcd_reg: the register hardware writes next
        self.fri = 0                 # FSTS.FRI: first pending register when PPF was set
        self.pfo = False             # FSTS.PFO
        self.overflow = 0            # faults dropped because of PFO / a full register
        self.recorded = 0            # faults that made it into a register
        self.events = 0              # fault events raised (PPF 0 -> 1)
        self.totals: Counter[int] = Counter()      # per reason: recorded + dropped
        self.suppressed: Counter[int] = Counter()  # per reason: FPD-qualified, not reported

    def record(self, rec: FaultRecord) -> bool:
        """Report a fault; return True if it was recorded, False if it overflowed."""
        self.totals[rec.reason] += 1
        slots = self._slots
        if self.pfo or slots[self._next] is not None:
            self.pfo = True
            self.overflow += 1
            return False
        if not self.ppf:
            self.fri = self._next
            self.events += 1
        slots[self._next] = rec
        self._seq[self._next] = self.recorded
        self._next = (self._next + 1) % self.num_records
        self.recorded += 1
        return True

    def suppress(self, reason: int) -> None:
        """Count a fault suppressed by FPD (blocked but not recorded)."""
        self.suppressed[reason] += 1

    @property
    def ppf(self) -> bool:
        """FSTS.PPF: at least one register holds an unserviced record."""
        return any(s is not None for s in self._slots)

    @property
    def fsts(self) -> int:
        """The fault status register value: PFO bit 0, PPF bit 1, FRI bits 15:8."""
        return (FSTS_PFO if self.pfo else 0) | (FSTS_PPF if self.ppf else 0) | (self.fri << 8)

    def slot(self, i: int) -> FaultRecord | None:
        """FRCD[i] if its F bit is set, else None."""
        return self._slots[i]

    def pending(self) -> list[FaultRecord]:
        """Unserviced records, oldest first."""
        held = [(self._seq[i], r) for i, r in enumerate(self._slots) if r is not None]
        held.sort(key=lambda t: t[0])
        return [r for _, r in held]

    def clear(self, i: int) -> None:
        """Software writes 1 to FRCD[i].F."""
        self._slots[i] = None

    def clear_pfo(self) -> None:
        """Software writes 1 to FSTS.PFO."""
        self.pfo = False

    def drain(self) -> list[FaultRecord]:
        """Service the log like Linux ``dmar_fault``: return pending records, clear all, clear PFO."""
        out = self.pending()
        self._slots = [None] * self.num_records
        self.pfo = False
        return out

    def lines(self) -> list[str]:
        """Linux log lines for the pending records (does not clear them)."""
        return [dmar_line(r) for r in self.pending()]

    def __repr__(self) -> str:
        return (f"FaultLog(num_records={self.num_records}, pending={len(self.pending())}, "
                f"pfo={self.pfo}, overflow={self.overflow}, recorded={self.recorded})")

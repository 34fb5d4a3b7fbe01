"""The VT-d interrupt-remapping unit: IRTE codec, MSI address/data codecs, the remapper.

Pure and synchronous (stdlib only, no I/O, no logging).  The fabric feeds every interrupt
request (a DWORD MemWr to 0xFEE0_0000..0xFEEF_FFFF, with the RID the fabric stamped) to
``InterruptRemapper.remap`` and gets back one of ``Remapped``, ``Posted``, ``Passthrough`` or
``IrFault``.  Faults are data (STYLE practice 8); they are recorded into the unit's
``fabric.dmar.FaultLog`` only on the delivery path (``do_fault=True``).

Spec sections: digest ``reference/interrupts-and-remapping.md`` sections 1-3 and 5
(VT-d 5.1 "Interrupt Remapping", 9.10 "Interrupt Remapping Table Entry").

Theory of operation of ``remap`` (QEMU ``vtd_interrupt_remap_msi`` order, digest section 2,
plus the real-hardware compatibility block).  The first rule that applies decides:

 1. GCMD.IRE clear                        -> ``Passthrough`` (message decoded as compat format)
 2. addr[63:32] != 0 or addr[31:20] != 0xFEE -> fault 0x20 (index 0, as QEMU)
 3. addr[4] == 0 (compatibility format):   CFI set and EIME clear -> ``Passthrough``,
                                           else fault 0x25 (index 0)
 4. index = handle[15] << 15 | handle[14:0]
 5. SHV: data[31:16] != 0 -> fault 0x20 (index 0); else index += data[15:0]
 6. IRTA never programmed                 -> fault 0x23 (with the computed index)
 7. index >= table size                   -> fault 0x21
 8. --- the IRTE is read; the checks below are "qualified": FPD=1 suppresses recording ---
 9. P clear                               -> fault 0x22
10. reserved bits / reserved encodings    -> fault 0x24 (see ``Irte.reserved_bits_set``)
11. SVT=1: (sid & m) != (IRTE.SID & m), m from SQ; SVT=2: bus outside [start, end]
                                          -> fault 0x26
12. PASID: a tagged request needs an entry bound to its PASID (``pasid_check``) -> fault 0x26
13. IM=0 -> ``Remapped``; IM=1 -> ``Posted``

Choices (where QEMU, Linux and the spec differ or are silent):

* Step 5 runs before the table lookup.  QEMU checks data[31:16] only after a successful IRTE
  fetch; 0x20 is an unqualified, request-level fault, so checking it first only changes which
  fault is reported when a request is wrong in two ways.
* ``handle + subhandle`` is not truncated to 16 bits (QEMU's ``uint16_t index`` wraps, so
  handle 0xFFFF + sub-handle 1 would alias entry 0).  An index past the table faults 0x21.
  FRCD keeps only the low 16 bits of such an index, as a 16-bit field would.
* 0x23: hardware raises it when the IRT read fails.  Here "IR enabled but the table pointer
  (IRTA) was never programmed" (``table_size_log2_minus1=None`` / ``set_table(None)``) is
  that failure; it is checked before the size check because there is no size to compare.
* 0x24 covers the reserved *bits* of either format and two "conditionally reserved" cases:
  SVT=3 (a reserved encoding; QEMU reports 0x26 "take this as verification failure"
  instead) and, with EIME=0, destination-ID bits other than 47:40 (VT-d reserves 39:32 and
  63:48 in xAPIC mode; QEMU silently masks them).
* Compat format is blocked whenever EIME=1, whatever CFI says (VT-d: CFI is ignored in x2APIC
  mode; QEMU's CFI patch does the same).  CFI is clear at reset, as Linux leaves it.
* FPD also qualifies 0x22 on a not-present entry (QEMU applies FPD before the P check).
  0x20, 0x21, 0x23 and 0x25 have no IRTE and are always reported.
* The IRTE cache: each write decodes the entry once and pre-builds its success result, so the
  hot path is a dict lookup, an integer compare and returning a shared frozen object.  Writes
  are visible at once; ``invalidate`` (IEC flush) only counts.  Stale-cache behaviour of real
  hardware (entry used until the IEC flush) is not modelled.  ``Passthrough`` results are
  likewise shared objects from a bounded cache (4096 distinct messages, then flushed).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import index as _as_int
from types import MappingProxyType
from typing import Mapping, Union

from fabric.dmar import FaultLog, FaultReason, FaultRecord

__all__ = [
    "Irte",
    "irte_dest",
    "SQ_MASKS",
    "SVT_NONE",
    "SVT_SID",
    "SVT_BUS",
    "MSI_BASE",
    "compose_remappable",
    "decode_remappable",
    "RemappableMsi",
    "compose_compat",
    "decode_compat",
    "CompatMsi",
    "Remapped",
    "Posted",
    "Passthrough",
    "IrFault",
    "RemapResult",
    "InterruptRemapper",
    "MAX_ENTRIES",
]


def _mask(hi: int, lo: int) -> int:
    return ((1 << (hi - lo + 1)) - 1) << lo


_U128 = (1 << 128) - 1

# SVT encodings (digest section 3)
SVT_NONE = 0
SVT_SID = 1
SVT_BUS = 2

# SQ -> mask applied to both SIDs before comparing (QEMU vtd_svt_mask)
SQ_MASKS = (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)

# Reserved bits per format (P=1 with any of these set -> fault 0x24)
RSVD_REMAPPED = _mask(14, 12) | _mask(31, 24) | _mask(127, 84)
RSVD_POSTED = _mask(7, 2) | _mask(13, 12) | _mask(37, 24) | _mask(95, 84)
# EIME=0: only dest_id[15:8] (IRTE 47:40) is defined; the rest of 63:32 is reserved
XAPIC_DEST_RSVD = 0xFFFF00FF

_PDA_LO_MASK = (1 << 26) - 1  # PDA bits 31:6 in IRTE 63:38


def irte_dest(apic_id: int, eim: bool) -> int:
    """Linux ``IRTE_DEST(d)``: the 32-bit IRTE destination field for an APIC ID."""
    if eim:
        if not 0 <= apic_id <= 0xFFFFFFFF:
            raise ValueError(f"x2APIC ID 0x{apic_id:x} does not fit in 32 bits")
        return apic_id
    if not 0 <= apic_id <= 0xFF:
        raise ValueError(f"xAPIC ID 0x{apic_id:x} does not fit in 8 bits (EIME=0)")
    return apic_id << 8


@dataclass(frozen=True, slots=True)
class Irte:
    """A 128-bit VT-d interrupt remapping table entry (digest section 3, VT-d 9.10).

    Remapped format (IM = 0)::

      127 ................................. 84 83 82 81 80 79 ................ 64
     +----------------------------------------+-----+-----+----------------------+
     |               reserved                 | SVT | SQ  |         SID          |
     +----------------------------------------+-----+-----+----------------------+
      63 ......................................................................32
     +---------------------------------------------------------------------------+
     | DST: destination ID.  EIME=1: x2APIC ID 31:0.  EIME=0: APIC ID in 47:40,  |
     |      bits 63:48 and 39:32 reserved                                        |
     +---------------------------------------------------------------------------+
      31 ..... 24 23 ..... 16  15  14..12 11...8  7..5   4    3    2    1    0
     +-----------+-----------+----+------+------+------+----+----+----+-----+---+
     | reserved  |  vector   | IM | rsvd |AVAIL | DLM  | TM | RH | DM | FPD | P |
     +-----------+-----------+----+------+------+------+----+----+----+-----+---+

    Posted format (IM = 1)::

      127 ................ 96 95 ...... 84 83 82 81 80 79 ................ 64
     +------------------------+-----------+-----+-----+----------------------+
     | PDA[63:32]             | reserved  | SVT | SQ  |         SID          |
     +------------------------+-----------+-----+-----+----------------------+
      63 ............. 38 37 ...... 24 23 .. 16  15  14  13 12 11..8 7..2  1   0
     +-------------------+------------+--------+----+---+-----+-----+----+---+---+
     | PDA[31:6]         | reserved   | vector | IM |URG| rsv |AVAIL|rsvd|FPD| P |
     +-------------------+------------+--------+----+---+-----+-----+----+---+---+

    Fields that do not exist in the entry's format must be 0.  ``rsvd`` holds the raw bits
    found in the format's reserved positions, so any 128-bit value round-trips through
    ``unpack``/``pack`` (hostile entries included).  ``pda`` is the full 64-byte-aligned
    posted-descriptor address.
    """

    present: bool = False
    fpd: bool = False
    dest_mode: int = 0       # DM, 1 = logical
    redir_hint: int = 0      # RH
    trigger_mode: int = 0    # TM, 1 = level
    delivery_mode: int = 0   # DLM, MSI data[10:8] encoding
    avail: int = 0           # AVAIL 11:8, software-owned
    mode: int = 0            # IM: 0 remapped, 1 posted
    vector: int = 0
    dest_id: int = 0         # the 32-bit DST field as architected (see apic_dest)
    sid: int = 0
    sq: int = 0
    svt: int = 0
    urgent: bool = False     # posted only
    pda: int = 0             # posted only
    rsvd: int = 0            # raw reserved bits, in place

    def __post_init__(self) -> None:
        for name, width in (("dest_mode", 1), ("redir_hint", 1), ("trigger_mode", 1),
                            ("delivery_mode", 3), ("avail", 4), ("mode", 1), ("vector", 8),
                            ("dest_id", 32), ("sid", 16), ("sq", 2), ("svt", 2)):
            v = getattr(self, name)
            if not 0 <= v < (1 << width):
                raise ValueError(f"IRTE {name}={v!r} does not fit in {width} bits")
        if self.pda & 0x3F or not 0 <= self.pda < (1 << 64):
            raise ValueError(f"posted descriptor address 0x{self.pda:x} is not 64-byte aligned")
        if self.mode == 0:
            if self.urgent or self.pda:
                raise ValueError("urgent/pda exist only in the posted format (mode=1)")
            rsvd_mask = RSVD_REMAPPED
        else:
            if (self.dest_mode or self.redir_hint or self.trigger_mode or self.delivery_mode
                    or self.dest_id):
                raise ValueError("dest_mode/redir_hint/trigger_mode/delivery_mode/dest_id "
                                 "exist only in the remapped format (mode=0)")
            rsvd_mask = RSVD_POSTED
        if self.rsvd & ~rsvd_mask:
            raise ValueError(f"rsvd=0x{self.rsvd:x} has bits outside the reserved positions")

    # --- constructors -------------------------------------------------------------------

    @classmethod
    def remapped(cls, vector: int, dest_apic_id: int, sid: int, *, sq: int = 0,
                 svt: int = SVT_SID, dest_mode: int = 0, redir_hint: int = 0,
                 trigger_mode: int = 0, delivery_mode: int = 0, fpd: bool = False,
                 eim: bool = False, avail: int = 0) -> "Irte":
        """A present remapped-format entry as Linux writes it (``IRTE_DEST`` for the dest)."""
        return cls(present=True, fpd=fpd, dest_mode=dest_mode, redir_hint=redir_hint,
                   trigger_mode=trigger_mode, delivery_mode=delivery_mode, avail=avail,
                   mode=0, vector=vector, dest_id=irte_dest(dest_apic_id, eim),
                   sid=_as_int(sid), sq=sq, svt=svt)

    @classmethod
    def posted(cls, vector: int, pda: int, sid: int, *, sq: int = 0, svt: int = SVT_SID,
               urgent: bool = False, fpd: bool = False, avail: int = 0) -> "Irte":
        """A present posted-format entry: ``vector`` is the guest vector set in PIR."""
        return cls(present=True, fpd=fpd, avail=avail, mode=1, vector=vector,
                   sid=_as_int(sid), sq=sq, svt=svt, urgent=urgent, pda=pda)

    # --- codec --------------------------------------------------------------------------

    def pack(self) -> int:
        """The entry as a 128-bit integer (bit 0 = P)."""
        v = (int(self.present) | int(self.fpd) << 1 | self.avail << 8 | self.mode << 15
             | self.vector << 16 | self.sid << 64 | self.sq << 80 | self.svt << 82 | self.rsvd)
        if self.mode == 0:
            v |= (self.dest_mode << 2 | self.redir_hint << 3 | self.trigger_mode << 4
                  | self.delivery_mode << 5 | self.dest_id << 32)
        else:
            v |= (int(self.urgent) << 14 | ((self.pda >> 6) & _PDA_LO_MASK) << 38
                  | (self.pda >> 32) << 96)
        return v

    @classmethod
    def unpack(cls, raw: int) -> "Irte":
        """Decode a 128-bit entry; every value is accepted (reserved bits land in ``rsvd``)."""
        if not 0 <= raw <= _U128:
            raise ValueError("an IRTE is 128 bits")
        mode = (raw >> 15) & 1
        common = dict(present=bool(raw & 1), fpd=bool(raw & 2), avail=(raw >> 8) & 0xF,
                      mode=mode, vector=(raw >> 16) & 0xFF, sid=(raw >> 64) & 0xFFFF,
                      sq=(raw >> 80) & 3, svt=(raw >> 82) & 3)
        if mode == 0:
            return cls(dest_mode=(raw >> 2) & 1, redir_hint=(raw >> 3) & 1,
                       trigger_mode=(raw >> 4) & 1, delivery_mode=(raw >> 5) & 7,
                       dest_id=(raw >> 32) & 0xFFFFFFFF, rsvd=raw & RSVD_REMAPPED, **common)
        pda = ((raw >> 38) & _PDA_LO_MASK) << 6 | ((raw >> 96) & 0xFFFFFFFF) << 32
        return cls(urgent=bool(raw & (1 << 14)), pda=pda, rsvd=raw & RSVD_POSTED, **common)

    def to_bytes(self) -> bytes:
        """The 16 bytes as they sit in memory (little-endian)."""
        return self.pack().to_bytes(16, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Irte":
        if len(data) != 16:
            raise ValueError(f"an IRTE is 16 bytes, got {len(data)}")
        return cls.unpack(int.from_bytes(data, "little"))

    # --- queries ------------------------------------------------------------------------

    def apic_dest(self, eim: bool) -> int:
        """The destination APIC ID: DST as-is with EIME=1, DST[15:8] with EIME=0 (as QEMU)."""
        return self.dest_id if eim else (self.dest_id >> 8) & 0xFF

    def reserved_bits_set(self, eim: bool) -> bool:
        """True if this entry would fault 0x24 when present (see the module docstring).

        Reserved bits of its format, SVT=3 (reserved encoding), and with ``eim=False`` in the
        remapped format any DST bit outside 15:8 (IRTE bits 39:32 and 63:48).
        """
        if self.rsvd or self.svt == 3:
            return True
        return self.mode == 0 and not eim and bool(self.dest_id & XAPIC_DEST_RSVD)


# ---------------------------------------------------------------------------------------------
# MSI address/data codecs (digest sections 1 and 2)

MSI_BASE = 0xFEE  # addr[31:20] of every interrupt request


@dataclass(frozen=True, slots=True)
class RemappableMsi:
    """A decoded remappable-format request (see ``decode_remappable``)."""

    handle: int      # 16-bit handle: addr[2] << 15 | addr[19:5]
    shv: bool        # sub-handle valid, addr[3]
    subhandle: int   # data[15:0] (meaningful only with SHV)
    index: int       # handle + subhandle with SHV, else handle (not truncated)
    remappable: bool  # addr[4], interrupt format
    base_ok: bool    # addr[31:20] == 0xFEE
    data_rsvd: int   # data[31:16] (must be 0 with SHV)


def compose_remappable(handle: int, subhandle: int = 0, shv: bool = True) -> tuple[int, int, int]:
    """Linux ``fill_msi_msg``: a remappable-format MSI for IRTE ``handle`` (+ ``subhandle``).

    addr_lo::

      31 ........ 20 19 ............................ 5   4     3      2       1..0
     +--------------+-----------------------------------+-----+-----+-----------+------+
     |    0xFEE     |          handle[14:0]             | 1   | SHV | handle[15]|  00  |
     +--------------+-----------------------------------+-----+-----+-----------+------+
     addr_hi = 0.   data::

      31 ............. 16 15 ............. 0
     +-------------------+------------------+
     |   0 (reserved)    |    sub-handle    |
     +-------------------+------------------+

    Linux always sets SHV=1 and puts the sub-handle (multi-MSI vector number, IO-APIC pin, or
    0) in data.  Returns ``(addr_lo, addr_hi, data)``.
    """
    if not 0 <= handle <= 0xFFFF or not 0 <= subhandle <= 0xFFFF:
        raise ValueError("handle and sub-handle are 16-bit values")
    addr_lo = (MSI_BASE << 20 | (handle & 0x7FFF) << 5 | 1 << 4 | int(bool(shv)) << 3
               | ((handle >> 15) & 1) << 2)
    return addr_lo, 0, subhandle


def decode_remappable(addr_lo: int, data: int) -> RemappableMsi:
    """Decode addr_lo/data as a remappable-format request (no validity checks; see fields)."""
    handle = ((addr_lo >> 5) & 0x7FFF) | ((addr_lo >> 2) & 1) << 15
    shv = bool(addr_lo & 8)
    sub = data & 0xFFFF
    return RemappableMsi(handle=handle, shv=shv, subhandle=sub,
                         index=handle + sub if shv else handle,
                         remappable=bool(addr_lo & 0x10), base_ok=(addr_lo >> 20) == MSI_BASE,
                         data_rsvd=(data >> 16) & 0xFFFF)


@dataclass(frozen=True, slots=True)
class CompatMsi:
    """A decoded compatibility-format MSI (see ``decode_compat``)."""

    destid_0_7: int        # addr[19:12]
    virt_destid_8_14: int  # addr[11:5], extended destination ID (hypervisor feature)
    destid_8_31: int       # addr_hi[31:8], used only by the IOMMU's own fault-event MSI
    redir_hint: int        # addr[3]
    dest_mode: int         # addr[2], 1 = logical
    vector: int            # data[7:0]
    delivery_mode: int     # data[10:8]
    level_assert: int      # data[14]
    trigger_mode: int      # data[15], 1 = level
    remappable: bool       # addr[4] (should be 0 for compat)
    base_ok: bool          # addr[31:20] == 0xFEE

    def apic_id(self, *, ext_dest_id: bool = False, dmar: bool = False) -> int:
        """Destination APIC ID: 8 bits; + addr[11:5] with ``ext_dest_id``; + addr_hi with ``dmar``."""
        dest = self.destid_0_7
        if ext_dest_id:
            dest |= self.virt_destid_8_14 << 8
        if dmar:
            dest |= self.destid_8_31 << 8
        return dest


def compose_compat(dest_apic_id: int, vector: int, dest_mode: int = 0, redir_hint: int = 0,
                   delivery_mode: int = 0, trigger_mode: int = 0, *, level_assert: int = 0,
                   ext_dest_id: bool = False, dmar: bool = False) -> tuple[int, int, int]:
    """A compatibility-format MSI, as Linux ``__irq_msi_compose_msg`` builds it.

    addr_lo::

      31 ...... 20 19 ........... 12 11 ................ 5   4    3    2   1..0
     +------------+-----------------+----------------------+---+----+----+------+
     |   0xFEE    | dest APIC [7:0] | ext dest ID = [14:8] | 0 | RH | DM |  00  |
     +------------+-----------------+----------------------+---+----+----+------+
     addr_hi: 0, or APIC ID >> 8 in 31:8 for the IOMMU's own fault event (``dmar=True``).
     data::

      31 ...... 16  15   14   13 12  11  10 ... 8  7 ......... 0
     +------------+----+----+------+---+---------+-------------+
     |  reserved  | TM | LA | rsvd | 0 |   DLM   |   vector    |
     +------------+----+----+------+---+---------+-------------+

    APIC IDs above 0xFF need ``ext_dest_id`` (IDs < 0x8000, the KVM/Hyper-V 15-bit extension)
    or ``dmar``; otherwise ValueError (Linux WARNs).  ``level_assert`` (data[14]): Linux 5.11+
    writes 0, older kernels wrote 1 (``MSI_DATA_LEVEL_ASSERT``).
    Returns ``(addr_lo, addr_hi, data)``.
    """
    if not 0 <= vector <= 0xFF:
        raise ValueError(f"vector {vector} does not fit in 8 bits")
    addr_hi = 0
    ext = 0
    if dmar:
        if not 0 <= dest_apic_id <= 0xFFFFFFFF:
            raise ValueError("APIC ID does not fit in 32 bits")
        addr_hi = (dest_apic_id >> 8) << 8
    elif ext_dest_id and 0xFF < dest_apic_id < 0x8000:
        ext = dest_apic_id >> 8
    elif not 0 <= dest_apic_id <= 0xFF:
        raise ValueError(f"APIC ID 0x{dest_apic_id:x} not reachable by a compat MSI")
    addr_lo = (MSI_BASE << 20 | (dest_apic_id & 0xFF) << 12 | ext << 5
               | (redir_hint & 1) << 3 | (dest_mode & 1) << 2)
    data = (vector | (delivery_mode & 7) << 8 | (level_assert & 1) << 14
            | (trigger_mode & 1) << 15)
    return addr_lo, addr_hi, data


def decode_compat(addr_lo: int, addr_hi: int, data: int) -> CompatMsi:
    """Decode a compatibility-format MSI (no validity checks; see fields)."""
    return CompatMsi(destid_0_7=(addr_lo >> 12) & 0xFF, virt_destid_8_14=(addr_lo >> 5) & 0x7F,
                     destid_8_31=(addr_hi >> 8) & 0xFFFFFF, redir_hint=(addr_lo >> 3) & 1,
                     dest_mode=(addr_lo >> 2) & 1, vector=data & 0xFF,
                     delivery_mode=(data >> 8) & 7, level_assert=(data >> 14) & 1,
                     trigger_mode=(data >> 15) & 1, remappable=bool(addr_lo & 0x10),
                     base_ok=(addr_lo >> 20) & 0xFFF == MSI_BASE)


# ---------------------------------------------------------------------------------------------
# Results of remap()


@dataclass(frozen=True, slots=True)
class Remapped:
    """Remapped-format IRTE hit: deliver ``vector`` to APIC ``dest_id``."""

    index: int
    irte: Irte
    dest_id: int        # APIC ID (8-bit with EIME=0, 32-bit with EIME=1)
    vector: int
    dest_mode: int
    delivery_mode: int
    trigger_mode: int
    redir_hint: int = 0


@dataclass(frozen=True, slots=True)
class Posted:
    """Posted-format IRTE hit: post ``vector`` to the descriptor at ``pda`` (no delivery here)."""

    index: int
    irte: Irte
    vector: int
    pda: int
    urgent: bool


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not remapped (IR disabled, or compat format allowed by CFI): the message as decoded."""

    dest_id: int
    vector: int
    dest_mode: int
    delivery_mode: int
    trigger_mode: int
    redir_hint: int = 0


@dataclass(frozen=True, slots=True)
class IrFault:
    """The request was blocked.  ``index`` is what FRCD records (0 for 0x20 and 0x25)."""

    reason: FaultReason
    sid: int
    index: int
    addr: int
    data: int
    pasid: int | None
    detail: str = ""    # which check failed, for the lab's reports


RemapResult = Union[Remapped, Posted, Passthrough, IrFault]

MAX_ENTRIES = 1 << 16

# Per-index cache entry (a plain tuple: unpacking it is the cheapest thing on the hot path):
#   (status, fpd, svt, a, b, result, expected_pasid)
#   status: 0 ok, else FaultReason 0x22 / 0x24
#   svt=1: a = SQ mask, b = IRTE.SID & mask;  svt=2: a = start bus, b = end bus
_R_REQ_RSVD = FaultReason.IR_REQ_RSVD
_R_INDEX_OVER = FaultReason.IR_INDEX_OVER
_R_ENTRY_P = FaultReason.IR_ENTRY_P
_R_ROOT_INVAL = FaultReason.IR_ROOT_INVAL
_R_IRTE_RSVD = FaultReason.IR_IRTE_RSVD
_R_REQ_COMPAT = FaultReason.IR_REQ_COMPAT
_R_SID_ERR = FaultReason.IR_SID_ERR

_NOT_PRESENT = (_R_ENTRY_P, False, 0, 0, 0, None, None)
_PT_CACHE_MAX = 4096


class InterruptRemapper:
    """One VT-d interrupt-remapping unit (digest section 2; see the module docstring).

    State: GCMD.IRE (``enabled``), GCMD.CFI (``cfi``), IRTA (``table_size``, None when never
    programmed; EIME as ``eim``), the table (index -> raw 128-bit value), the fault log.

    Parameters
    ----------
    table_size_log2_minus1:
        IRTA.S: the table has 2**(S+1) entries (Linux writes 15: 65536).  None: IRTA is not
        programmed, and any remappable request faults 0x23 once IR is enabled.
    entries:
        Alternative to S: the number of entries (a power of two, 2..65536).
    eim:
        IRTA.EIME: x2APIC 32-bit destinations; compat format is then always blocked.
    enabled, cfi:
        Initial GCMD.IRE / GCMD.CFI (both clear at hardware reset).
    pasid_check:
        Lab platform capability ``pasid_ir`` (real VT-d lacks it).  When set, an IRTE written
        with ``write_irte(..., pasid=P)`` accepts only requests carrying PASID P; any other
        (or none) faults 0x26 with detail ``"pasid"``.  An entry written without a PASID
        accepts only requests *without* one -- with or without the capability, so without
        it every PASID-tagged request faults 0x26.  Otherwise an ADI, which shares its PF's
        RID, could name the PF's own entries (or any RID-only entry of that RID): from a
        message its guest stored in memory (found by ``bench/campaign.py``), or by a DMA
        write of chosen data into the interrupt range, which its PASID tags (found by the
        matrix).  The expected PASID lives in a side table, not in the 128-bit IRTE (AVAIL
        has only 4 bits).
    ext_dest_id:
        For ``Passthrough`` only: honour the 15-bit extended destination ID in addr[11:5]
        (what a KVM/Hyper-V platform advertising MSI_EXT_DEST_ID does).
    fault_log:
        The unit's fault log, shared with its DMA-remapping half; a new 8-record one if None.
    """

    def __init__(self, table_size_log2_minus1: int | None = 15, *, entries: int | None = None,
                 eim: bool = False, enabled: bool = False, cfi: bool = False,
                 pasid_check: bool = False, ext_dest_id: bool = False,
                 fault_log: FaultLog | None = None) -> None:
        self._table: dict[int, int] = {}
        self._pasids: dict[int, int] = {}
        self._cache: dict[int, tuple] = {}
        self._enabled = bool(enabled)
        self._cfi = bool(cfi)
        self._eim = bool(eim)
        self.pasid_check = bool(pasid_check)
        self._ext_dest_id = bool(ext_dest_id)
        self._pt_cache: dict[int, Passthrough] = {}
        self.fault_log = fault_log if fault_log is not None else FaultLog()
        self.iec_invalidations = 0
        self._size = 0
        self._programmed = False
        if entries is not None:
            self.set_table(entries)
        elif table_size_log2_minus1 is not None:
            self.set_irta(table_size_log2_minus1)

    # --- register-level state -----------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """GCMD.IRE / GSTS.IRES."""
        return self._enabled

    @property
    def cfi(self) -> bool:
        """GCMD.CFI / GSTS.CFIS: compatibility-format interrupts allowed (ignored with EIME)."""
        return self._cfi

    @property
    def eim(self) -> bool:
        """IRTA.EIME."""
        return self._eim

    @property
    def ext_dest_id(self) -> bool:
        """Passthrough honours addr[11:5] as APIC ID bits 14:8."""
        return self._ext_dest_id

    @ext_dest_id.setter
    def ext_dest_id(self, on: bool) -> None:
        self._ext_dest_id = bool(on)
        self._pt_cache.clear()

    @property
    def table_size(self) -> int | None:
        """Number of IRT entries, or None if IRTA was never programmed."""
        return self._size if self._programmed else None

    @property
    def irta_programmed(self) -> bool:
        return self._programmed

    @property
    def table(self) -> Mapping[int, int]:
        """Read-only view of the table: index -> raw 128-bit value (absent = 0)."""
        return MappingProxyType(self._table)

    def set_ir_enabled(self, on: bool) -> None:
        """GCMD.IRE."""
        self._enabled = bool(on)

    def set_cfi(self, on: bool) -> None:
        """GCMD.CFI."""
        self._cfi = bool(on)

    def set_irta(self, s: int, *, eim: bool | None = None) -> None:
        """Program IRTA (and latch it, as SIRTP does): S gives 2**(S+1) entries."""
        if not 0 <= s <= 15:
            raise ValueError(f"IRTA.S={s} outside 0..15")
        self.set_table(2 << s)
        if eim is not None:
            self.set_eim(eim)

    def set_table(self, size: int | None) -> None:
        """Set the table size in entries (power of two, 2..65536); None un-programs IRTA.

        Entries already written are kept (the table is memory); indices beyond the new size
        are unreachable (fault 0x21) until the table grows again.
        """
        if size is None:
            self._size, self._programmed = 0, False
            return
        if not 2 <= size <= MAX_ENTRIES or size & (size - 1):
            raise ValueError(f"table size {size} is not a power of two in 2..65536")
        self._size, self._programmed = size, True

    def set_eim(self, on: bool) -> None:
        """IRTA.EIME.  Re-decodes every cached entry (destination width and 0x24 rules change)."""
        on = bool(on)
        if on != self._eim:
            self._eim = on
            for index, raw in self._table.items():
                self._cache[index] = self._decode(index, raw, self._pasids.get(index))

    # --- the table ----------------------------------------------------------------------

    def write_irte(self, index: int, entry: int | Irte, *, pasid: int | None = None) -> None:
        """Store an entry (an ``Irte`` or any raw 128-bit value) at ``index`` (0..65535).

        ``pasid``: expected PASID for the lab's optional PASID check (see ``pasid_check``).
        """
        if not 0 <= index < MAX_ENTRIES:
            raise ValueError(f"IRTE index {index} outside 0..65535")
        raw = entry.pack() if isinstance(entry, Irte) else entry
        if not 0 <= raw <= _U128:
            raise ValueError("an IRTE is 128 bits")
        if pasid is not None and not 0 <= pasid <= 0xFFFFF:
            raise ValueError(f"PASID 0x{pasid:x} does not fit in 20 bits")
        if raw == 0 and pasid is None:
            self.clear_irte(index)
            return
        self._table[index] = raw
        if pasid is None:
            self._pasids.pop(index, None)
        else:
            self._pasids[index] = pasid
        self._cache[index] = self._decode(index, raw, pasid)

    def clear_irte(self, index: int) -> None:
        """Zero the entry at ``index`` (what Linux ``deactivate`` / ``free_irte`` does)."""
        self._table.pop(index, None)
        self._pasids.pop(index, None)
        self._cache.pop(index, None)

    def read_irte(self, index: int) -> int:
        """The raw 128-bit value at ``index`` (0 if never written)."""
        return self._table.get(index, 0)

    def irte(self, index: int) -> Irte:
        """The decoded entry at ``index``."""
        return Irte.unpack(self._table.get(index, 0))

    def expected_pasid(self, index: int) -> int | None:
        """The PASID side-table value for ``index`` (lab ``pasid_ir`` capability)."""
        return self._pasids.get(index)

    def invalidate(self, index: int | None = None, mask: int = 0) -> int:
        """Interrupt-entry-cache invalidation (global, or 2**mask entries from ``index``).

        A counter only: the model's cache is rebuilt on every write, so there is never a
        stale entry to flush.  Returns the running count of invalidations.
        """
        self.iec_invalidations += 1
        return self.iec_invalidations

    def _decode(self, index: int, raw: int, pasid: int | None) -> tuple:
        irte = Irte.unpack(raw)
        if not irte.present:
            return (_R_ENTRY_P, irte.fpd, 0, 0, 0, None, pasid)
        if irte.reserved_bits_set(self._eim):
            return (_R_IRTE_RSVD, irte.fpd, 0, 0, 0, None, pasid)
        svt, a, b = irte.svt, 0, 0
        if svt == SVT_SID:
            a = SQ_MASKS[irte.sq]
            b = irte.sid & a
        elif svt == SVT_BUS:
            a, b = irte.sid >> 8, irte.sid & 0xFF   # Linux: (start_bus << 8) | end_bus
        if irte.mode == 0:
            result: Remapped | Posted = Remapped(
                index, irte, irte.apic_dest(self._eim), irte.vector, irte.dest_mode,
                irte.delivery_mode, irte.trigger_mode, irte.redir_hint)
        else:
            result = Posted(index, irte, irte.vector, irte.pda, irte.urgent)
        return (0, irte.fpd, svt, a, b, result, pasid)

    # --- the hot path -------------------------------------------------------------------

    def remap(self, sid: int, addr: int, data: int, pasid: int | None = None, *,
              do_fault: bool = True) -> RemapResult:
        """Translate one interrupt request (64-bit ``addr``, 32-bit ``data``, from ``sid``).

        ``sid`` is the 16-bit RID as a plain int (``int(bdf)``); ``pasid`` the TLP's PASID
        prefix, if any.

        Returns ``Remapped``, ``Posted``, ``Passthrough`` or ``IrFault`` (never raises on
        hostile input).  ``do_fault=False`` probes: faults are returned but not recorded.
        The caller routes only 0xFEExxxxx writes here; with IR disabled the message is
        decoded as compat format whatever it holds (hardware passes it through unchanged).
        """
        if not self._enabled:
            return self._passthrough(addr, data)
        if addr >> 20 != MSI_BASE:
            why = "addr_hi != 0" if addr >> 32 else "addr[31:20] != 0xFEE"
            return self._fault(_R_REQ_RSVD, sid, 0, addr, data, pasid, do_fault, False, why)
        if not addr & 0x10:
            if self._cfi and not self._eim:
                return self._passthrough(addr, data)
            return self._fault(_R_REQ_COMPAT, sid, 0, addr, data, pasid, do_fault, False,
                               "compat format" + (" (EIME)" if self._eim else ""))
        index = ((addr >> 5) & 0x7FFF) | ((addr & 4) << 13)
        if addr & 8:
            if data >> 16:
                return self._fault(_R_REQ_RSVD, sid, 0, addr, data, pasid, do_fault, False,
                                   "data[31:16] != 0 with SHV")
            index += data
        if index >= self._size:
            if not self._programmed:
                return self._fault(_R_ROOT_INVAL, sid, index, addr, data, pasid, do_fault,
                                   False, "IRTA not programmed")
            return self._fault(_R_INDEX_OVER, sid, index, addr, data, pasid, do_fault, False,
                               f"index {index} >= table size {self._size}")
        status, fpd, svt, a, b, result, epasid = self._cache.get(index, _NOT_PRESENT)
        if status:
            return self._fault(status, sid, index, addr, data, pasid, do_fault, fpd,
                               "IRTE not present" if status == _R_ENTRY_P else
                               "reserved bits in IRTE")
        if svt == SVT_SID:
            if sid & a != b:
                return self._fault(_R_SID_ERR, sid, index, addr, data, pasid, do_fault, fpd,
                                   "sid")
        elif svt == SVT_BUS:
            if not a <= sid >> 8 <= b:
                return self._fault(_R_SID_ERR, sid, index, addr, data, pasid, do_fault, fpd,
                                   "bus")
        if pasid is not None or self.pasid_check:
            # A tagged request names (RID, PASID): only an entry bound to that PASID may take
            # it.  Without the capability no entry is, so every tagged request faults.
            if not self.pasid_check or pasid != epasid:
                return self._fault(_R_SID_ERR, sid, index, addr, data, pasid, do_fault, fpd,
                                   "pasid")
        return result

    def _passthrough(self, addr: int, data: int) -> Passthrough:
        # Only addr[19:2] and data[15:0] matter; results are shared frozen objects, cached
        # in a bounded dict (a device cycling through messages cannot grow it without limit).
        key = (addr & 0xFFFFC) << 14 | (data & 0xFFFF)
        pt = self._pt_cache.get(key)
        if pt is None:
            dest = (addr >> 12) & 0xFF
            if self._ext_dest_id:
                dest |= ((addr >> 5) & 0x7F) << 8
            pt = Passthrough(dest, data & 0xFF, (addr >> 2) & 1, (data >> 8) & 7,
                             (data >> 15) & 1, (addr >> 3) & 1)
            if len(self._pt_cache) >= _PT_CACHE_MAX:
                self._pt_cache.clear()
            self._pt_cache[key] = pt
        return pt

    def _fault(self, reason: FaultReason, sid: int, index: int, addr: int, data: int,
               pasid: int | None, do_fault: bool, fpd: bool, why: str) -> IrFault:
        if do_fault:
            if fpd:
                self.fault_log.suppress(reason)
            else:
                self.fault_log.record(FaultRecord(
                    reason, sid & 0xFFFF, "intr", index=index,
                    pasid=None if pasid is None else pasid & 0xFFFFF,
                    detail={"addr": addr, "data": data, "check": why}))
        return IrFault(reason, sid, index, addr, data, pasid, why)

    def __repr__(self) -> str:
        return (f"InterruptRemapper(enabled={self._enabled}, cfi={self._cfi}, eim={self._eim}, "
                f"table_size={self.table_size}, entries_written={len(self._table)})")

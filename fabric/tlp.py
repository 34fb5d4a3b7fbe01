"""PCIe Transaction Layer Packet codec (Non-Flit Mode): MRd/MWr 32/64, CfgRd0/CfgWr0, Cpl/CplD,
plus the PASID End-End TLP Prefix.

Pure: no I/O, stdlib only.  ``Tlp`` is the decoded form; ``Tlp.pack()`` / ``Tlp.unpack()`` convert
to and from wire bytes, and both validate (``TlpError``).  The fabric's router does not need a
``Tlp`` at all: ``peek()`` checks framing and pulls the routing fields out of the raw bytes, and
``stamp_requester()`` / ``stamp_completer()`` return a copy with one ID field rewritten.

Spec references are to the PCIe Base Specification (6.x numbering, Non-Flit Mode):
2.2.1 header, 2.2.4.1 address routing, 2.2.5.1 byte enables, 2.2.6.2-2.2.6.4 tag/attr,
2.2.7.1 request rules, 2.2.9.1 completions, 2.2.10 prefixes, 2.3.1.1 read completions,
6.20.2.1 PASID prefix.

Wire layout
===========
Header DWs are big-endian (byte 0 = Fmt/Type is sent first).  The payload follows in address
order (a 32-bit MSI data value is therefore little-endian), then the optional digest DW
(carried, not computed; big-endian like the header).

    [PASID prefix DW] header (3 or 4 DW) [payload: Length DW] [ECRC digest DW, if TD]

PASID End-End TLP Prefix (optional, at most one, only on memory requests; 6.20.2.1 Table 6-15)::

     31        24  23   22   21  20  19                                         0
    +------------+----+----+-------+--------------------------------------------+
    | 1001 0001  |PMR | ER |  R  R |                PASID[19:0]                 |
    +------------+----+----+-------+--------------------------------------------+
      Fmt=100 (prefix), Type[4]=1 (End-End), E[3:0]=0001 (PASID)  -> byte 0 = 0x91
      PMR = Privileged Mode Requested (byte 1 bit 7), ER = Execute Requested (byte 1 bit 6),
      bits 21:20 Reserved (must be 0).  ER is Reserved except on untranslated MRd (and ATS
      translation requests, AT=01), so pack/unpack reject it elsewhere.
      NB: shared/reference/pcie-tlp-config-siov.md section 2 (from one secondary source, a BSA
      exerciser) puts PMR/ER at bits 21/20 with 23:22 reserved; Table 6-15 of the spec puts them
      in byte 1 bits 7/6, i.e. DW bits 23/22, as above.  The PASID bits 19:0 agree in both.

DW0, every TLP (2.2.1)::

     31 29 28   24  23  22  20  19  18  17  16  15  14  13 12  11 10  9              0
    +-----+-------+---+------+---+---+---+---+---+---+------+------+----------------+
    | Fmt | Type  |T9 |  TC  |T8 |A2 |LN |TH |TD |EP | Attr |  AT  |  Length (DW)   |
    +-----+-------+---+------+---+---+---+---+---+---+------+------+----------------+
      T9/T8 = Tag[9]/Tag[8]; A2 = Attr[2] (IDO); Attr[1:0] = RO (bit 13), NS (bit 12).
      Length 0 encodes 1024 DW (Cpl without data: Length is Reserved and must be 0).

Request DW1 (MRd, MWr, CfgRd0, CfgWr0)::

     31                          16 15            8 7          4 3          0
    +------------------------------+---------------+------------+------------+
    |        Requester ID          |   Tag[7:0]    | Last DW BE | First DW BE|
    +------------------------------+---------------+------------+------------+

Memory request address DWs::

    3DW (MRd32/MWr32):  DW2 = Address[31:2] | PH[1:0]
    4DW (MRd64/MWr64):  DW2 = Address[63:32]         DW3 = Address[31:2] | PH[1:0]

Configuration request DW2 (target = the routing ID)::

     31      24 23     19 18  16 15   12 11        8 7              2 1  0
    +----------+---------+------+-------+-----------+----------------+----+
    |   Bus    | Device  | Func |   R   | Ext Reg # |   Register #   |  R |
    +----------+---------+------+-------+-----------+----------------+----+
      ``Tlp.address`` holds bits 11:2 as a byte offset (0..0xFFC); ``completer_id`` the target.

Completion DW1 / DW2::

     31                          16 15   13  12  11                        0
    +------------------------------+-------+-----+---------------------------+
    |        Completer ID          |Status | BCM |  Byte Count (0 = 4096)    |
    +------------------------------+-------+-----+---------------------------+
     31                          16 15            8  7  6                   0
    +------------------------------+---------------+----+-------------------+
    |  Requester ID (destination)  |   Tag[7:0]    | R  |   Lower Address   |
    +------------------------------+---------------+----+-------------------+

Validation
==========
``unpack()`` accepts exactly the byte strings that ``pack()`` can produce: every header bit is
either a field or a Reserved bit that must be 0, so for any buffer ``b`` either
``unpack(b)`` raises ``TlpError`` or ``unpack(b).pack() == b``, and ``unpack(x.pack()) == x`` for
every ``x`` that ``pack()`` accepts.  The checks (the "optional" receiver checks included, since a
malformed TLP here is always a bug in one of our own models):

* Fmt/Type must be one of the eight supported kinds; Msg/MsgD, IO, locked, Type 1 config,
  AtomicOps and DMWr are named in the error.  Prefixes other than PASID are named too.
* Buffer length == prefix + header + Length DW of payload (data kinds) + digest DW (TD=1).
* Memory: 3DW below 4 GiB, 4DW at/above 4 GiB (2.2.4.1: requesters must use 3DW below 4 GiB);
  no 4 KiB crossing; PH only with TH; Tag[9:8] Reserved on MWr (posted).
* Byte enables (2.2.5.1): 1 DW -> Last BE 0; >1 DW -> both non-zero, contiguous unless a QW-aligned
  2 DW memory request.  MRd with TH=1 carries ST[7:0] in the BE bits, so no BE rules apply.
* Config (2.2.7.1): Length 1, Last BE 0, TC 0, Attr 0 (IDO Reserved), AT 0, TH 0, LN 0, no prefix.
* Completions (2.2.9.1): TH 0, AT 0, Status in {SC, UR, CRS, CA}, CplD only with SC (2.3.1.1),
  CplD payload no larger than Byte Count allows, no prefix.
* AT=11b is Reserved everywhere.  Fields a kind does not carry must be left at their defaults.

Cross-checked against cocotbext-pcie (tests/unit/test_tlp_cocotbext.py), whose quirks this module
does not copy: its Lower Address precedence bug (0x1004/BE 0110b -> 0x04 instead of 0x05), its
zero-length-read first-BE offset (3 instead of 0), its UR/CA/CRS helpers leaving Byte Count 0
(which decodes as 4096), silent truncation of a >=4 GiB address in a 3DW type, no digest field
(the ECRC DW rides in ``data`` and is dropped by ``pack()`` for payload-less kinds), no prefix
support at all, and a ``check()`` that never applies the config/IO rules.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from fabric.bdf import rid_str

__all__ = [
    "TlpError",
    "TlpType",
    "CplStatus",
    "TlpAttr",
    "PASID_PREFIX_BYTE0",
    "MSI_ADDR_LO",
    "MSI_ADDR_HI",
    "Tlp",
    "peek",
    "stamp_requester",
    "stamp_completer",
    "prefix_pasid",
]


class TlpError(ValueError):
    """A malformed TLP or an out-of-range field; the message names the field, value and rule."""


class TlpType(IntEnum):
    """Supported Fmt/Type encodings; the value is header byte 0 (Fmt << 5 | Type)."""

    MEM_READ = 0x00
    MEM_READ_64 = 0x20
    MEM_WRITE = 0x40
    MEM_WRITE_64 = 0x60
    CFG_READ_0 = 0x04
    CFG_WRITE_0 = 0x44
    CPL = 0x0A
    CPL_DATA = 0x4A


class CplStatus(IntEnum):
    """Completion Status (2.2.9.1 Table 2-37); CRS is called RRS in newer specs."""

    SC = 0
    UR = 1
    CRS = 2
    CA = 4


class TlpAttr(IntFlag):
    """Attr[2:0]: IDO is DW0 bit 18, RO bit 13, NS bit 12."""

    NS = 1
    RO = 2
    IDO = 4


PASID_PREFIX_BYTE0 = 0x91

# x86 interrupt window: a DWORD MWr here is an MSI, not a memory access (Intel SDM 11.11.1).
MSI_ADDR_LO, MSI_ADDR_HI = 0xFEE0_0000, 0xFEEF_FFFF

# ---------------------------------------------------------------------------------------------
# Tables

_MEM, _CFG, _CPL = 0, 1, 2

# byte0 -> (TlpType, kind, header bytes, has payload, short name)
_INFO: dict[int, tuple[TlpType, int, int, bool, str]] = {
    0x00: (TlpType.MEM_READ, _MEM, 12, False, "MRd32"),
    0x20: (TlpType.MEM_READ_64, _MEM, 16, False, "MRd64"),
    0x40: (TlpType.MEM_WRITE, _MEM, 12, True, "MWr32"),
    0x60: (TlpType.MEM_WRITE_64, _MEM, 16, True, "MWr64"),
    0x04: (TlpType.CFG_READ_0, _CFG, 12, False, "CfgRd0"),
    0x44: (TlpType.CFG_WRITE_0, _CFG, 12, True, "CfgWr0"),
    0x0A: (TlpType.CPL, _CPL, 12, False, "Cpl"),
    0x4A: (TlpType.CPL_DATA, _CPL, 12, True, "CplD"),
}

# Known but unsupported header encodings, named in errors (2.2.1 Table 2-3).
_UNSUPPORTED: dict[int, str] = {
    0x01: "MRdLk (memory read lock, 3DW)",
    0x21: "MRdLk (memory read lock, 4DW)",
    0x02: "IORd",
    0x42: "IOWr",
    0x05: "CfgRd1 (Type 1 configuration read)",
    0x45: "CfgWr1 (Type 1 configuration write)",
    0x0B: "CplLk",
    0x4B: "CplDLk",
    0x4C: "FetchAdd AtomicOp (3DW)",
    0x6C: "FetchAdd AtomicOp (4DW)",
    0x4D: "Swap AtomicOp (3DW)",
    0x6D: "Swap AtomicOp (4DW)",
    0x4E: "CAS AtomicOp (3DW)",
    0x6E: "CAS AtomicOp (4DW)",
    0x5B: "DMWr (deferrable memory write, 3DW)",
    0x7B: "DMWr (deferrable memory write, 4DW)",
}
_MSG_ROUTE = ("to Root Complex", "by address", "by ID", "broadcast from Root Complex",
              "local", "gathered to Root Complex", "reserved routing", "reserved routing")
for _r, _route in enumerate(_MSG_ROUTE):
    _UNSUPPORTED[0x30 | _r] = f"Msg (message, routed {_route})"
    _UNSUPPORTED[0x70 | _r] = f"MsgD (message with data, routed {_route})"

# TLP prefix types (2.2.10.2 Table 2-38, 2.2.10.4 Table 2-39)
_PREFIX_NAMES = {
    0x80: "MR-IOV Local",
    0x8D: "Flit Mode Local",
    0x8E: "VendPrefixL0 Local",
    0x8F: "VendPrefixL1 Local",
    0x90: "TPH End-End",
    0x91: "PASID End-End",
    0x92: "IDE End-End",
    0x9E: "VendPrefixE0 End-End",
    0x9F: "VendPrefixE1 End-End",
}

_PREFIX_PMR = 1 << 23
_PREFIX_ER = 1 << 22
_PREFIX_RSVD = 0x0030_0000  # bits 21:20

_STATUS = {s.value: s for s in CplStatus}
_SC = CplStatus.SC  # a CplStatus member is slow to look up by name (Enum's class getattr)

# First DW BE -> offset of the first enabled byte (Table 2-41: 0000b -> 0).
_FIRST_OFF = (0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0)
# BE -> number of disabled bytes above the last enabled byte (0000b -> 0, unused).
_LAST_PAD = (0, 3, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
_FIRST_CONTIG = frozenset((0xF, 0xE, 0xC, 0x8))
_LAST_CONTIG = frozenset((0x1, 0x3, 0x7, 0xF))

_DW = struct.Struct(">I")
_H3 = struct.Struct(">III")   # DW0, DW1, DW2
_H4 = struct.Struct(">IIQ")   # DW0, DW1, Address[63:2] | PH
_P3 = struct.Struct(">IIII")  # prefix + 3DW header
_P4 = struct.Struct(">IIIQ")  # prefix + 4DW header

_ADDR64_MASK = 0xFFFF_FFFF_FFFF_FFFC

# pack()'s hot path: a memory request's td, bcm, digest, completer_id, status, byte_count, lower_address
_MEM_UNUSED = (False, False, None, 0, 0, 0, 0)

# pack()'s hot path: TlpType -> (kind, header bytes, has payload, byte 0 << 24, header struct,
# header struct after a PASID prefix)
_FAST: dict[TlpType, tuple] = {
    t: (kind, hlen, has_data, int(t) << 24, _H4 if hlen == 16 else _H3, _P4 if hlen == 16 else _P3)
    for t, kind, hlen, has_data, _name in _INFO.values()
}
_FOUR_GIB = 1 << 32


# ---------------------------------------------------------------------------------------------
# Error helpers


def _unsupported(b0: int) -> TlpError:
    if b0 & 0x80:
        return _prefix_error(b0)
    name = _UNSUPPORTED.get(b0, "reserved/undefined encoding")
    return TlpError(
        f"unsupported Fmt/Type 0x{b0:02x} ({name}); supported: "
        + ", ".join(f"{v[4]} 0x{k:02x}" for k, v in _INFO.items())
    )


def _prefix_error(b0: int) -> TlpError:
    if b0 >= 0xA0:
        return TlpError(f"reserved Fmt {b0 >> 5:03b}b in byte 0 0x{b0:02x} (Fmt 101b-111b are reserved)")
    kind = "End-End" if b0 & 0x10 else "Local"
    name = _PREFIX_NAMES.get(b0, f"reserved {kind}")
    return TlpError(
        f"unsupported TLP prefix 0x{b0:02x} ({name} TLP Prefix); only the PASID End-End prefix "
        f"0x{PASID_PREFIX_BYTE0:02x} is accepted"
    )


def _field(name: str, field: str, value: object, hi: int, lo: int = 0) -> int:
    if not isinstance(value, int):
        raise TlpError(f"{name}: {field} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise TlpError(f"{name}: {field}={value:#x} out of range (expected {lo:#x}..{hi:#x})")
    return value


def _flag(name: str, field: str, value: object) -> None:
    if value is not True and value is not False and value not in (0, 1):
        raise TlpError(f"{name}: {field} must be a bool, got {value!r}")


def _zero(name: str, field: str, value: object, why: str) -> None:
    if value:
        raise TlpError(f"{name}: {field}={value!r} must be 0/False ({why})")


def _read_prefix(buf, n: int) -> int:
    """Validate the prefix DW at offset 0 (caller saw byte 0 >= 0x80); return it."""
    if n < 4:
        raise TlpError(f"truncated TLP prefix: {n} bytes")
    dw = _DW.unpack_from(buf, 0)[0]
    b0 = dw >> 24
    if b0 != PASID_PREFIX_BYTE0:
        raise _prefix_error(b0)
    if dw & _PREFIX_RSVD:
        raise TlpError(f"PASID prefix 0x{dw:08x}: reserved bits 21:20 must be 0")
    if n < 5:
        raise TlpError("PASID prefix without a TLP header (2.2.10.1)")
    b4 = buf[4]
    if b4 & 0x80:
        if b4 == PASID_PREFIX_BYTE0:
            raise TlpError("duplicate PASID prefix: a TLP may carry at most one (6.20.2.1)")
        raise _prefix_error(b4)
    return dw


# ---------------------------------------------------------------------------------------------
# The decoded TLP


@dataclass(slots=True, eq=True)
class Tlp:
    """One decoded TLP.  Which fields a kind carries (others must stay at their defaults):

    ============  =====================================================================
    MRd/MWr       requester_id tag tc attr at th td ep ln length first_be last_be
                  address ph data digest pasid pmr er
    CfgRd0/CfgWr0 requester_id tag td ep length(=1) first_be address(reg byte offset)
                  completer_id(target BDF) data digest
    Cpl/CplD      requester_id(destination) tag tc attr td ep ln length completer_id
                  status bcm byte_count lower_address data digest
    ============  =====================================================================
    """

    type: TlpType
    requester_id: int = 0
    tag: int = 0
    tc: int = 0
    attr: int = 0
    at: int = 0
    th: bool = False
    td: bool = False
    ep: bool = False
    ln: bool = False
    length: int = 0
    first_be: int = 0
    last_be: int = 0
    address: int = 0
    ph: int = 0
    completer_id: int = 0
    status: CplStatus = CplStatus.SC
    bcm: bool = False
    byte_count: int = 0
    lower_address: int = 0
    data: bytes = b""
    digest: int | None = None
    pasid: int | None = None
    pmr: bool = False
    er: bool = False

    # -- validation ------------------------------------------------------------------------

    def _info(self) -> tuple[TlpType, int, int, bool, str]:
        try:
            info = _INFO.get(self.type)
        except TypeError:
            info = None
        if info is None:
            raise TlpError(f"type {self.type!r} is not a supported TlpType")
        return info

    def _fast_valid(self) -> bool:
        """True only if ``validate()`` would pass: the common, well-typed cases, checked with a few
        shifts and comparisons instead of ``validate()``'s per-field calls.  It may say False for
        a valid TLP (an ``IntEnum`` tag, 0/1 for a flag, a bytearray payload, non-contiguous BEs
        on a QW-aligned 2 DW request...): callers then run ``validate()``, which decides and names
        the rule.  Sound, not complete -- so the codec's behaviour is ``validate()``'s, faster."""
        t = self.type
        if type(t) is not TlpType:
            return False
        rid, tag, tc, attr, at, length = self.requester_id, self.tag, self.tc, self.attr, self.at, self.length
        th, td, ep, ln, bcm, pmr, er = self.th, self.td, self.ep, self.ln, self.bcm, self.pmr, self.er
        data, pasid = self.data, self.pasid
        if not (type(rid) is type(tag) is type(tc) is type(attr) is type(at) is type(length) is int
                and type(th) is type(td) is type(ep) is type(ln) is type(bcm) is type(pmr) is type(er) is bool
                and type(data) is bytes and not (rid >> 16 | tag >> 10 | tc >> 3 | attr >> 3 | at >> 2)
                and at != 3 and 0 <= length <= 1024):
            return False
        digest = self.digest
        if td:
            if type(digest) is not int or digest >> 32 or digest < 0:
                return False
        elif digest is not None:
            return False
        _t, kind, hlen, has_data, _name = _INFO[t]
        if kind == _MEM:
            if pasid is None:
                if pmr or er:
                    return False
            elif type(pasid) is not int or pasid >> 20 or pasid < 0:
                return False
            addr, ph, fbe, lbe = self.address, self.ph, self.first_be, self.last_be
            if not (type(addr) is type(ph) is type(fbe) is type(lbe) is int and not (fbe >> 4 | lbe >> 4 | ph >> 2)
                    and length and not addr & 3 and (addr & 0xFFF) + length * 4 <= 0x1000
                    and (th or not ph)
                    and (not er or (not has_data and at != 2))
                    and not (self.completer_id or self.status or bcm or self.byte_count or self.lower_address)):
                return False
            if hlen == 16:
                if addr >> 64 or addr < _FOUR_GIB:
                    return False
            elif addr >> 32 or addr < 0:
                return False
            if has_data:
                if len(data) != length * 4 or tag >> 8:
                    return False
            elif data:
                return False
            if th and not has_data:
                return True
            if length == 1:
                return not lbe
            return fbe in _FIRST_CONTIG and lbe in _LAST_CONTIG
        if pasid is not None or pmr or er:
            return False
        if kind == _CFG:
            addr, fbe, lbe, cid = self.address, self.first_be, self.last_be, self.completer_id
            return (length == 1 and type(addr) is type(fbe) is type(lbe) is type(cid) is int
                    and not (tc or attr or at or th or ln or self.ph or lbe or bcm or self.status
                             or self.byte_count or self.lower_address or addr & ~0xFFC or fbe >> 4 or fbe < 0
                             or cid >> 16 or cid < 0)
                    and len(data) == (4 if has_data else 0))
        cid, status, bc, la = self.completer_id, self.status, self.byte_count, self.lower_address
        if not (type(cid) is type(bc) is type(la) is int and type(status) is CplStatus
                and not (th or at or self.first_be or self.last_be or self.address or self.ph
                         or cid >> 16 or cid < 0 or la >> 7 or la < 0)
                and 1 <= bc <= 4096):
            return False
        if has_data:
            return (length > 0 and len(data) == length * 4 and status is _SC
                    and length * 4 <= (la & 3) + bc + 3)
        return not length and not data

    def validate(self) -> None:
        """Raise ``TlpError`` unless this TLP can be packed (the rules in the module docstring)."""
        _t, kind, hlen, has_data, name = self._info()
        _field(name, "requester_id", self.requester_id, 0xFFFF)
        tag = _field(name, "tag", self.tag, 0x3FF)
        _field(name, "tc", self.tc, 7)
        _field(name, "attr", self.attr, 7)
        at = _field(name, "at", self.at, 3)
        if at == 3:
            raise TlpError(f"{name}: AT=11b is reserved (0 untranslated, 1 translation request, 2 translated)")
        for f in ("th", "td", "ep", "ln", "bcm", "pmr", "er"):
            _flag(name, f, getattr(self, f))
        length = _field(name, "length", self.length, 1024)
        data = self.data
        if not isinstance(data, (bytes, bytearray)):
            raise TlpError(f"{name}: data must be bytes, got {type(data).__name__}")
        if self.td:
            if self.digest is None:
                raise TlpError(f"{name}: TD=1 but digest is None (the ECRC DW must be supplied)")
            _field(name, "digest", self.digest, 0xFFFF_FFFF)
        elif self.digest is not None:
            raise TlpError(f"{name}: digest=0x{self.digest:x} given but TD=0")
        if self.pasid is None:
            if self.pmr or self.er:
                raise TlpError(f"{name}: pmr/er set without a PASID prefix (pasid is None)")
        else:
            _field(name, "pasid", self.pasid, 0xF_FFFF)
            if kind != _MEM:
                raise TlpError(f"{name}: PASID prefix is only permitted on memory requests (6.20)")

        if kind == _MEM:
            self._validate_mem(name, hlen, has_data, tag, at, length, data)
        elif kind == _CFG:
            self._validate_cfg(name, has_data, length, data)
        else:
            self._validate_cpl(name, has_data, length, data)

    def _validate_mem(self, name, hlen, has_data, tag, at, length, data) -> None:
        addr = self.address
        if hlen == 16:
            _field(name, "address", addr, _ADDR64_MASK)
            if addr < _FOUR_GIB:
                raise TlpError(
                    f"{name}: address 0x{addr:x} is below 4 GiB; requesters must use the 3DW "
                    f"form {name[:3]}32 there (2.2.4.1)"
                )
        else:
            _field(name, "address", addr, 0xFFFF_FFFC)
        if addr & 3:
            raise TlpError(f"{name}: address 0x{addr:x} must be DW aligned (low 2 bits 0; use first_be)")
        if length == 0:
            raise TlpError(f"{name}: length=0; memory requests carry 1..1024 DW")
        ph = _field(name, "ph", self.ph, 3)
        if ph and not self.th:
            raise TlpError(f"{name}: ph={ph} requires TH=1 (PH is reserved when TH=0)")
        if has_data:
            if len(data) != length * 4:
                raise TlpError(f"{name}: length={length} DW but data is {len(data)} bytes (expected {length * 4})")
            if tag > 0xFF:
                raise TlpError(f"{name}: tag=0x{tag:x}; Tag[9:8] are reserved on posted requests (2.2.6.2)")
        elif data:
            raise TlpError(f"{name}: a read request carries no data ({len(data)} bytes given)")
        fbe = _field(name, "first_be", self.first_be, 0xF)
        lbe = _field(name, "last_be", self.last_be, 0xF)
        if not (self.th and not has_data):  # MRd with TH: BE bits carry ST[7:0] (2.2.5.1)
            _check_bes(name, fbe, lbe, length, addr & 7 == 0)
        if (addr & 0xFFF) + length * 4 > 0x1000:
            raise TlpError(
                f"{name}: address 0x{addr:x} + {length} DW crosses a 4 KiB boundary (2.2.7.1)"
            )
        if self.er and (has_data or at == 2):
            raise TlpError(f"{name}: ER (Execute Requested) is reserved except on untranslated MRd (6.20.2.3)")
        why = "not carried by memory requests"
        _zero(name, "completer_id", self.completer_id, why)
        _zero(name, "status", self.status, why)
        _zero(name, "bcm", self.bcm, why)
        _zero(name, "byte_count", self.byte_count, why)
        _zero(name, "lower_address", self.lower_address, why)

    def _validate_cfg(self, name, has_data, length, data) -> None:
        why = "configuration request restriction (2.2.7.1)"
        _zero(name, "tc", self.tc, why)
        _zero(name, "attr", self.attr, why + "; IDO is reserved, RO/NS must be 0")
        _zero(name, "at", self.at, why)
        _zero(name, "th", self.th, why)
        _zero(name, "ln", self.ln, why)
        _zero(name, "ph", self.ph, why)
        if length != 1:
            raise TlpError(f"{name}: length={length}; configuration requests must have length 1 (2.2.7.1)")
        _field(name, "first_be", self.first_be, 0xF)
        _field(name, "last_be", self.last_be, 0xF)
        if self.last_be:
            raise TlpError(f"{name}: last_be=0x{self.last_be:x}; must be 0 for a 1 DW request (2.2.5.1)")
        reg = _field(name, "address (register offset)", self.address, 0xFFC)
        if reg & 3:
            raise TlpError(f"{name}: register offset 0x{reg:x} must be DW aligned (use first_be)")
        _field(name, "completer_id (target)", self.completer_id, 0xFFFF)
        if has_data:
            if len(data) != 4:
                raise TlpError(f"{name}: data is {len(data)} bytes; CfgWr0 carries exactly 4")
        elif data:
            raise TlpError(f"{name}: a read request carries no data ({len(data)} bytes given)")
        why = "not carried by configuration requests"
        _zero(name, "status", self.status, why)
        _zero(name, "bcm", self.bcm, why)
        _zero(name, "byte_count", self.byte_count, why)
        _zero(name, "lower_address", self.lower_address, why)

    def _validate_cpl(self, name, has_data, length, data) -> None:
        _zero(name, "th", self.th, "TH is reserved for completions (2.2.9.1)")
        _zero(name, "at", self.at, "AT must be 00b for completions (2.2.9.1)")
        _field(name, "completer_id", self.completer_id, 0xFFFF)
        status = self.status
        if not isinstance(status, int) or status not in _STATUS:
            raise TlpError(f"{name}: status={status!r} is reserved (expected SC=0, UR=1, CRS=2, CA=4)")
        bc = _field(name, "byte_count", self.byte_count, 4096, 1)
        la = _field(name, "lower_address", self.lower_address, 0x7F)
        if has_data:
            if length == 0:
                raise TlpError(f"{name}: length=0; CplD carries 1..1024 DW")
            if len(data) != length * 4:
                raise TlpError(f"{name}: length={length} DW but data is {len(data)} bytes (expected {length * 4})")
            if status != CplStatus.SC:
                raise TlpError(f"{name}: status {CplStatus(status).name} completions carry no data; use Cpl (2.3.1.1)")
            if length * 4 > (la & 3) + bc + 3:
                raise TlpError(
                    f"{name}: {length} DW payload exceeds byte_count={bc} at lower_address=0x{la:x} "
                    f"(at most {((la & 3) + bc + 3) // 4} DW)"
                )
        else:
            if length:
                raise TlpError(f"{name}: length={length}; the Length field of a Cpl without data is reserved (0)")
            if data:
                raise TlpError(f"{name}: Cpl carries no data ({len(data)} bytes given); use CPL_DATA")
        why = "not carried by completions"
        _zero(name, "first_be", self.first_be, why)
        _zero(name, "last_be", self.last_be, why)
        _zero(name, "address", self.address, why)
        _zero(name, "ph", self.ph, why)

    # -- codec -----------------------------------------------------------------------------

    def pack(self) -> bytes:
        """Serialize to wire bytes; raises ``TlpError`` if any field breaks the rules.

        Three tiers, each sound (it returns bytes only for a TLP that ``validate()`` accepts, and
        then exactly ``_pack_checked()``'s bytes), not complete:

        1. the packer for the kind, picked by a dict lookup on ``type`` (``_PACK``, below the
           class): the common TLP -- plain ints and bools, no TC/Attr/AT/TH/TD/EP/LN/PH, Tag
           < 0x100 -- with one cheap test per field;
        2. ``_pack_general()``: any kind and field values, every field checked inline;
        3. ``_pack_checked()``: ``validate()``, which decides and names the rule, then encode.

        So what ``pack()`` accepts and the error it raises are ``validate()``'s."""
        try:
            return _PACK[self.type](self)
        except (KeyError, TypeError):  # not a supported type (an unhashable one too): validate() names it
            return self._pack_checked()

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> "Tlp":
        """Parse wire bytes (exactly one TLP); raises ``TlpError`` on anything malformed.

        A dict lookup on byte 0 (after a PASID prefix: byte 4) picks the decoder for the kind
        (``_DECODE``, below the class), which takes the common well-formed TLP (no digest, no
        Tag[9:8]/TC/Attr/AT/TH/EP/LN bits) and builds the ``Tlp`` slot by slot, without the
        25-argument ``__init__``.  Anything else, every error included, goes to
        ``_unpack_general()``, which decides (and names the rule)."""
        try:
            b0 = buf[0]
            if b0 == PASID_PREFIX_BYTE0:
                return _DECODE_PREFIXED[buf[4]](cls, buf)
            return _DECODE[b0](cls, buf)
        except (LookupError, struct.error):  # empty or short buffer, a byte 0 without a decoder
            return cls._unpack_general(buf)

    def _pack_general(self) -> bytes:
        """``pack()``'s second tier, for what the per-kind packers below the class do not take
        (TC/Attr/TH bits, a 10-bit tag, a prefix with PMR/ER as 0/1 ints, ...): every kind in one
        function.

        It checks the common cases inline -- each field loaded once, plain ints and
        bools, ranges by shifts OR-ed into one value -- and encodes.  Anything else (an IntFlag
        or a 0/1 int where a flag goes, a bytearray payload, a digest, non-contiguous BEs on a
        QW-aligned 2 DW request, and every invalid TLP) takes ``_pack_checked()``: ``validate()``
        then the same encoding.  The inline checks are sound, not complete (see ``_fast_valid``),
        so what ``pack()`` accepts and the error it raises are ``validate()``'s."""
        t = self.type
        try:
            info = _FAST.get(t)
        except TypeError:   # unhashable: validate() names it
            info = None
        if info is None or type(t) is not TlpType:
            return self._pack_checked()
        kind, hlen, has_data, b0, h, hp = info
        rid, tag, tc, attr, at, length = self.requester_id, self.tag, self.tc, self.attr, self.at, self.length
        th, ep, ln, data = self.th, self.ep, self.ln, self.data
        try:
            if kind == _MEM:
                addr, ph, fbe, lbe = self.address, self.ph, self.first_be, self.last_be
                # tag: 8 bits on posted requests (Tag[9:8] reserved), 10 on reads
                v = (rid >> 16 | tag >> (8 if has_data else 10) | tc >> 3 | attr >> 3 | at >> 2
                     | (th | ep | ln) >> 1 | ph >> 2 | fbe >> 4 | lbe >> 4 | (length - 1) >> 10 | addr & 3
                     | (addr >> 64 if hlen == 16 else addr >> 32))
                # the fields a memory request does not carry, at their defaults (== as validate()'s
                # truthiness and flag rules see them: 0, 0.0 and False alike)
                if (v or type(v) is not int or at == 3 or type(data) is not bytes
                        or (self.td, self.bcm, self.digest, self.completer_id, self.status, self.byte_count,
                            self.lower_address) != _MEM_UNUSED
                        or (len(data) != length << 2 if has_data else data)
                        or (addr & 0xFFF) + (length << 2) > 0x1000 or (hlen == 16 and addr < _FOUR_GIB)
                        or (ph and not th)
                        or not (th and not has_data
                                or (not lbe if length == 1 else fbe in _FIRST_CONTIG and lbe in _LAST_CONTIG))):
                    return self._pack_checked()
                dw0 = b0 | length & 0x3FF
                if tag >> 8:
                    dw0 |= (tag & 0x200) << 14 | (tag & 0x100) << 11
                if tc or attr or at or th or ep or ln:
                    dw0 |= tc << 20 | (attr & 4) << 16 | ln << 17 | th << 16 | ep << 14 | (attr & 3) << 12 | at << 10
                dw1 = rid << 16 | (tag & 0xFF) << 8 | lbe << 4 | fbe
                pasid = self.pasid
                if pasid is None:
                    if self.pmr is not False or self.er is not False:
                        return self._pack_checked()
                    hdr = h.pack(dw0, dw1, addr | ph)
                else:
                    pmr, er = self.pmr, self.er
                    if (type(pasid) is not int or pasid >> 20 or pasid < 0 or type(pmr) is not bool
                            or type(er) is not bool or (er and (has_data or at == 2))):
                        return self._pack_checked()
                    hdr = hp.pack(0x9100_0000 | pmr << 23 | er << 22 | pasid, dw0, dw1, addr | ph)
                return hdr + data if data else hdr
            if (self.pasid is not None or self.pmr is not False or self.er is not False or self.bcm is not False
                    or self.td is not False or self.digest is not None or th or at or type(data) is not bytes):
                return self._pack_checked()
            if kind == _CFG:
                addr, fbe, cid, lbe = self.address, self.first_be, self.completer_id, self.last_be
                # every field an int (a None or float raises TypeError), in range, and the
                # ones a config request does not carry 0; Length 1 and Last BE 0
                v = (rid >> 16 | tag >> 10 | fbe >> 4 | cid >> 16 | addr & ~0xFFC | lbe | length ^ 1
                     | tc | attr | at | th | ln | ep >> 1)
                if (v or type(v) is not int or self.ph
                        or self.status or self.byte_count or self.lower_address
                        or len(data) != (4 if has_data else 0)):
                    return self._pack_checked()
                hdr = h.pack(b0 | (tag & 0x200) << 14 | (tag & 0x100) << 11 | ep << 14 | 1,
                             rid << 16 | (tag & 0xFF) << 8 | fbe, cid << 16 | addr)
                return hdr + data if data else hdr
            cid, status, bc, la = self.completer_id, self.status, self.byte_count, self.lower_address
            v = (rid >> 16 | tag >> 10 | tc >> 3 | attr >> 3 | (ep | ln) >> 1 | th | at | cid >> 16 | la >> 7
                 | (bc - 1) >> 12 | (length - 1 if has_data else length) >> 10)
            if (v or type(v) is not int or type(status) is not CplStatus
                    or self.first_be or self.last_be or self.address or self.ph
                    or (len(data) != length << 2 or status is not _SC
                        or length << 2 > (la & 3) + bc + 3 if has_data else length or data)):
                return self._pack_checked()
            hdr = h.pack(b0 | (tag & 0x200) << 14 | tc << 20 | (tag & 0x100) << 11 | (attr & 4) << 16 | ln << 17
                         | ep << 14 | (attr & 3) << 12 | (length & 0x3FF),
                         cid << 16 | status << 13 | (bc & 0xFFF), rid << 16 | (tag & 0xFF) << 8 | la)
            return hdr + data if data else hdr
        except TypeError:        # a field that is not an int: validate() names it
            return self._pack_checked()

    def _pack_checked(self) -> bytes:
        """``pack()`` for everything its inline checks did not vouch for: ``validate()``, then encode."""
        self.validate()
        b0 = int(self.type)
        _t, kind, hlen, _d, _n = _INFO[b0]
        tag = self.tag
        attr = self.attr
        dw0 = (
            (b0 << 24) | ((tag & 0x200) << 14) | (self.tc << 20) | ((tag & 0x100) << 11)
            | ((attr & 4) << 16) | (self.ln << 17) | (self.th << 16) | (self.td << 15)
            | (self.ep << 14) | ((attr & 3) << 12) | (self.at << 10) | (self.length & 0x3FF)
        )
        if kind == _CPL:
            dw1 = (self.completer_id << 16) | (self.status << 13) | (self.bcm << 12) | (self.byte_count & 0xFFF)
            dw2 = (self.requester_id << 16) | ((tag & 0xFF) << 8) | self.lower_address
        else:
            dw1 = (self.requester_id << 16) | ((tag & 0xFF) << 8) | (self.last_be << 4) | self.first_be
            if kind == _CFG:
                dw2 = (self.completer_id << 16) | self.address
            else:
                dw2 = self.address | self.ph
        if self.pasid is None:
            hdr = _H4.pack(dw0, dw1, dw2) if hlen == 16 else _H3.pack(dw0, dw1, dw2)
        else:
            pfx = (PASID_PREFIX_BYTE0 << 24) | (self.pmr << 23) | (self.er << 22) | self.pasid
            hdr = _P4.pack(pfx, dw0, dw1, dw2) if hlen == 16 else _P3.pack(pfx, dw0, dw1, dw2)
        if self.td:
            return b"".join((hdr, self.data, _DW.pack(self.digest)))
        return hdr + self.data if self.data else hdr

    @classmethod
    def _unpack_general(cls, buf: bytes | bytearray | memoryview) -> "Tlp":
        """``unpack()`` for everything the per-type decoders below do not take: every error
        (raised here, with its message), a digest, a Tag[9:8]/TC/Attr/TH bit set, ..."""
        n = len(buf)
        b0 = buf[0] if n else -1
        off = 0
        pasid = None
        pmr = er = False
        if b0 >= 0x80:
            pdw = _read_prefix(buf, n)
            pasid = pdw & 0xF_FFFF
            pmr = bool(pdw & _PREFIX_PMR)
            er = bool(pdw & _PREFIX_ER)
            off = 4
            b0 = buf[4]
        info = _INFO.get(b0)
        if info is None:
            if b0 < 0:
                raise TlpError("empty buffer: no TLP")
            raise _unsupported(b0)
        t, kind, hlen, has_data, name = info
        end = off + hlen
        if n < end:
            raise TlpError(f"{name}: truncated header: {n} bytes, need {end}")
        if hlen == 16:
            dw0, dw1, dw2 = _H4.unpack_from(buf, off)
        else:
            dw0, dw1, dw2 = _H3.unpack_from(buf, off)
        lf = dw0 & 0x3FF
        length = lf if lf or (kind == _CPL and not has_data) else 1024  # 0 encodes 1024 DW
        plen = length * 4 if has_data else 0
        td = bool(dw0 & 0x8000)
        total = end + plen + (4 if td else 0)
        if n != total:
            raise TlpError(
                f"{name}: buffer is {n} bytes but the header says {total} "
                f"({off} prefix + {hlen} header + {plen} payload (Length={length} DW)"
                f" + {4 if td else 0} digest)"
            )
        data = bytes(buf[end:end + plen]) if plen else b""
        digest = _DW.unpack_from(buf, end + plen)[0] if td else None
        tag = ((dw0 >> 14) & 0x200) | ((dw0 >> 11) & 0x100)
        attr = ((dw0 >> 16) & 4) | ((dw0 >> 12) & 3)
        tc = (dw0 >> 20) & 7
        at = (dw0 >> 10) & 3
        th = dw0 & 0x10000 != 0
        ep = dw0 & 0x4000 != 0
        ln = dw0 & 0x20000 != 0
        # Every field below comes out of a bit field, so its type and width are right by
        # construction; ``ok`` checks the remaining rules of ``validate()`` for the common cases
        # (sound, not complete: a False runs ``validate()``, which decides and names the rule).
        if kind == _CPL:
            code = (dw1 >> 13) & 7
            status = _STATUS.get(code)
            if status is None:
                raise TlpError(f"{name}: Completion Status {code:03b}b is reserved (expected SC, UR, CRS or CA)")
            if dw2 & 0x80:
                raise TlpError(f"{name}: reserved bit 7 of DW2 (above Lower Address) is set")
            bc = (dw1 & 0xFFF) or 4096
            la = dw2 & 0x7F
            tlp = cls(t, dw2 >> 16, tag | ((dw2 >> 8) & 0xFF), tc, attr, at, th, td, ep, ln, length,
                      0, 0, 0, 0, dw1 >> 16, status, dw1 & 0x1000 != 0, bc, la, data, digest, pasid, pmr, er)
            ok = pasid is None and not dw0 & 0x10C00 and (
                status is _SC and length * 4 <= (la & 3) + bc + 3 if has_data else not length)
        elif kind == _CFG:
            if dw2 & 0xF003:
                raise TlpError(f"{name}: reserved bits of DW2 0x{dw2:08x} are set (bits 15:12 and 1:0 must be 0)")
            lbe = (dw1 >> 4) & 0xF
            tlp = cls(t, dw1 >> 16, tag | ((dw1 >> 8) & 0xFF), tc, attr, at, th, td, ep, ln, length,
                      dw1 & 0xF, lbe, dw2 & 0xFFC, 0, dw2 >> 16, _SC, False, 0,
                      0, data, digest, pasid, pmr, er)
            # TC, Attr, AT, TH, LN all 0 and the Length field 1
            ok = pasid is None and dw0 & 0x0077_3FFF == 1 and not lbe
        else:
            fbe, lbe, addr, ph = dw1 & 0xF, (dw1 >> 4) & 0xF, dw2 & ~3, dw2 & 3
            tlp = cls(t, dw1 >> 16, tag | ((dw1 >> 8) & 0xFF), tc, attr, at, th, td, ep, ln, length,
                      fbe, lbe, addr, ph, 0, _SC, False, 0,
                      0, data, digest, pasid, pmr, er)
            ok = (at != 3 and (th or not ph) and (hlen == 12 or addr >= _FOUR_GIB)
                  and (addr & 0xFFF) + length * 4 <= 0x1000 and (not er or not has_data and at != 2)
                  and (tag < 0x100 if has_data else True)
                  and (th and not has_data
                       or (not lbe if length == 1 else fbe in _FIRST_CONTIG and lbe in _LAST_CONTIG)))
        if not ok:
            tlp.validate()
        return tlp

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def _mem(cls, write: bool, address: int, nbytes: int, data: bytes, requester_id, tag, tc, attr,
             pasid, pmr, er) -> "Tlp":
        what = "mem_write" if write else "mem_read"
        address = operator.index(address)
        if not 1 <= nbytes <= 4096:
            raise TlpError(f"{what}: {nbytes} bytes; a request moves 1..4096 bytes")
        if not 0 <= address <= (1 << 64) - nbytes:
            raise TlpError(f"{what}: address 0x{address:x} + {nbytes} bytes is outside the 64-bit space")
        if (address & 0xFFF) + nbytes > 0x1000:
            raise TlpError(
                f"{what}: 0x{address:x} + {nbytes} bytes crosses a 4 KiB boundary (2.2.7.1); split it"
            )
        first_pad = address & 3
        ndw = (first_pad + nbytes + 3) >> 2
        last_pad = ndw * 4 - first_pad - nbytes
        first_be = (0xF << first_pad) & 0xF
        last_be = 0xF >> last_pad
        if ndw == 1:
            first_be &= last_be
            last_be = 0
        base = address & ~3
        if write:
            t = TlpType.MEM_WRITE if base < _FOUR_GIB else TlpType.MEM_WRITE_64
            payload = b"".join((bytes(first_pad), data, bytes(last_pad)))
        else:
            t = TlpType.MEM_READ if base < _FOUR_GIB else TlpType.MEM_READ_64
            payload = b""
        tlp = cls(t, operator.index(requester_id), tag, tc, attr, length=ndw, first_be=first_be,
                  last_be=last_be, address=base, data=payload, pasid=pasid, pmr=pmr, er=er)
        if not tlp._fast_valid():
            tlp.validate()
        return tlp

    @classmethod
    def mem_write(cls, address: int, data: bytes, requester_id: int = 0, *, tag: int = 0, tc: int = 0,
                  attr: int = 0, pasid: int | None = None, pmr: bool = False) -> "Tlp":
        """MWr of ``data`` (1..4096 bytes) at any byte ``address``: BEs cover exactly those bytes,
        the payload is padded to whole DWs with zeros, 3DW below 4 GiB else 4DW."""
        data = bytes(data)
        return cls._mem(True, address, len(data), data, requester_id, tag, tc, attr, pasid, pmr, False)

    @classmethod
    def mem_read(cls, address: int, nbytes: int, requester_id: int = 0, *, tag: int = 0, tc: int = 0,
                 attr: int = 0, pasid: int | None = None, pmr: bool = False, er: bool = False) -> "Tlp":
        """MRd of ``nbytes`` (1..4096) at any byte ``address``; 3DW below 4 GiB else 4DW."""
        return cls._mem(False, address, operator.index(nbytes), b"", requester_id, tag, tc, attr,
                        pasid, pmr, er)

    @classmethod
    def cfg_read(cls, target: int, reg: int, requester_id: int = 0, *, tag: int = 0,
                 first_be: int = 0xF) -> "Tlp":
        """CfgRd0 of the DW at byte offset ``reg`` (DW aligned, 0..0xFFC) of function ``target``."""
        tlp = cls(TlpType.CFG_READ_0, operator.index(requester_id), tag, length=1, first_be=first_be,
                  address=operator.index(reg), completer_id=operator.index(target))
        if not tlp._fast_valid():
            tlp.validate()
        return tlp

    @classmethod
    def cfg_write(cls, target: int, reg: int, value: int, requester_id: int = 0, *, tag: int = 0,
                  first_be: int = 0xF) -> "Tlp":
        """CfgWr0 of the register DW ``value`` (bytes in their lanes, sent little-endian)."""
        value = operator.index(value)
        if not 0 <= value <= 0xFFFF_FFFF:
            raise TlpError(f"CfgWr0: value=0x{value:x} does not fit in a DW")
        tlp = cls(TlpType.CFG_WRITE_0, operator.index(requester_id), tag, length=1, first_be=first_be,
                  address=operator.index(reg), completer_id=operator.index(target),
                  data=value.to_bytes(4, "little"))
        if not tlp._fast_valid():
            tlp.validate()
        return tlp

    @classmethod
    def completion(cls, req: "Tlp", completer_id: int, status: CplStatus = CplStatus.SC,
                   data: bytes = b"", *, byte_count: int | None = None,
                   lower_address: int | None = None) -> "Tlp":
        """The completion for ``req`` (2.2.9.1, 2.3.1.1).

        Copies requester ID, tag, TC and Attr.  ``data`` is the wire payload (whole DWs, starting
        with the DW that holds the first returned byte) and selects CplD; non-SC completions carry
        no data.  Defaults: config -> Byte Count 4, Lower Address 0; memory read -> Byte Count =
        all bytes the request enables (Table 2-40, 1 for a zero-length read), Lower Address =
        address[6:2] plus the first enabled byte (Table 2-41).  Pass ``byte_count`` /
        ``lower_address`` for the later completions of a split read.
        """
        _t, kind, _h, has_data, name = req._info()
        if kind == _CPL:
            raise TlpError(f"{name} is a completion; completions are never completed")
        if kind == _MEM and has_data:
            raise TlpError(f"{name} is a posted request; it gets no completion")
        try:
            status = CplStatus(status)
        except ValueError:
            raise TlpError(f"completion status {status!r} is reserved (expected SC, UR, CRS or CA)") from None
        data = bytes(data)
        if data and status != CplStatus.SC:
            raise TlpError(f"a {status.name} completion carries no data (2.3.1.1); got {len(data)} bytes")
        if status == CplStatus.SC:
            if has_data and data:
                raise TlpError(f"{name} completes with a Cpl without data; got {len(data)} bytes")
            if not has_data and not data:
                raise TlpError(f"a successful completion of {name} must carry data")
        if kind == _CFG:
            bc = 4 if byte_count is None else byte_count
            la = 0 if lower_address is None else lower_address
        else:
            fbe, lbe = req._bes()
            bc = req._be_byte_count(fbe, lbe) if byte_count is None else byte_count
            la = ((req.address & 0x7C) | _FIRST_OFF[fbe]) if lower_address is None else lower_address
        if len(data) % 4:
            raise TlpError(f"completion data is {len(data)} bytes; the payload must be whole DWs")
        cpl = cls(TlpType.CPL_DATA if data else TlpType.CPL, req.requester_id, req.tag, req.tc,
                  req.attr, length=len(data) // 4, completer_id=operator.index(completer_id),
                  status=status, byte_count=bc, lower_address=la, data=data)
        if not cpl._fast_valid():
            cpl.validate()
        return cpl

    # -- queries ---------------------------------------------------------------------------

    def _bes(self) -> tuple[int, int]:
        """Effective (first, last) BEs: an MRd with TH=1 implies all bytes (2.2.5.1)."""
        if self.th and self.type in (TlpType.MEM_READ, TlpType.MEM_READ_64):
            return 0xF, (0 if self.length == 1 else 0xF)
        return self.first_be, self.last_be

    def _be_byte_count(self, fbe: int, lbe: int) -> int:
        """Total bytes a request enables (Table 2-40); 1 for a zero-length read."""
        if self.length == 1:
            if not fbe:
                return 1
            return 4 - _FIRST_OFF[fbe] - _LAST_PAD[fbe]
        return self.length * 4 - _FIRST_OFF[fbe] - _LAST_PAD[lbe]

    def payload_bytes(self) -> bytes:
        """The bytes the payload really carries: for a write, from the first to the last enabled
        byte (what gets written, if the BEs are contiguous -- see ``byte_enable_mask()``); for a
        CplD, ``byte_count`` bytes from ``lower_address & 3`` (capped at the payload)."""
        data = self.data
        if not data:
            return b""
        if self.type == TlpType.CPL_DATA:
            la3 = self.lower_address & 3
            return bytes(data[la3:la3 + self.byte_count])
        fbe, lbe = self.first_be, self.last_be
        if not fbe:
            return b""
        if self.length == 1:
            return bytes(data[_FIRST_OFF[fbe]:4 - _LAST_PAD[fbe]])
        return bytes(data[_FIRST_OFF[fbe]:len(data) - _LAST_PAD[lbe]])

    def byte_enable_mask(self) -> int:
        """Bit i set = payload/request byte i is enabled (requests), or valid (CplD)."""
        if self.type in (TlpType.CPL, TlpType.CPL_DATA):
            la3 = self.lower_address & 3
            n = min(self.byte_count, self.length * 4 - la3) if self.length else 0
            return ((1 << n) - 1) << la3 if n > 0 else 0
        fbe, lbe = self._bes()
        if self.length <= 1:
            return fbe
        middle = (1 << (4 * (self.length - 2))) - 1
        return fbe | (middle << 4) | (lbe << (4 * (self.length - 1)))

    def byte_address(self) -> int:
        """Address of the first enabled byte (requests); ``lower_address`` for completions."""
        if self.type in (TlpType.CPL, TlpType.CPL_DATA):
            return self.lower_address
        return self.address + _FIRST_OFF[self._bes()[0]]

    def fmt_type_name(self) -> str:
        """Short spec-style name: MRd32, MRd64, MWr32, MWr64, CfgRd0, CfgWr0, Cpl, CplD."""
        return self._info()[4]

    def is_posted(self) -> bool:
        return self.type in (TlpType.MEM_WRITE, TlpType.MEM_WRITE_64)

    def is_non_posted(self) -> bool:
        return self.type in (TlpType.MEM_READ, TlpType.MEM_READ_64, TlpType.CFG_READ_0, TlpType.CFG_WRITE_0)

    def is_completion(self) -> bool:
        return self.type in (TlpType.CPL, TlpType.CPL_DATA)

    def __str__(self) -> str:
        _t, kind, _h, has_data, name = self._info()
        if kind == _MEM:
            s = f"{name} {rid_str(self.requester_id)} tag {self.tag} addr 0x{self.address:x} len {self.length}"
            full_last = 0 if self.length == 1 else 0xF
            if self.first_be != 0xF or self.last_be != full_last:
                s += f" be {self.first_be:x}/{self.last_be:x}"
        elif kind == _CFG:
            s = (f"{name} {rid_str(self.requester_id)} tag {self.tag} -> {rid_str(self.completer_id)} "
                 f"reg 0x{self.address:03x} be {self.first_be:x}")
            if has_data and len(self.data) == 4:
                s += f" data 0x{int.from_bytes(self.data, 'little'):08x}"
        else:
            st = _STATUS.get(self.status)
            s = (f"{name} {rid_str(self.completer_id)} -> {rid_str(self.requester_id)} tag {self.tag} "
                 f"{st.name if st is not None else self.status} bc {self.byte_count} "
                 f"la 0x{self.lower_address:02x} len {self.length}")
        if self.tc:
            s += f" tc {self.tc}"
        if self.attr:
            s += " attr " + "|".join(a.name for a in TlpAttr if self.attr & a)
        if self.at:
            s += f" at {self.at}"
        if self.th:
            s += f" th ph {self.ph}"
        for flag in ("ln", "ep", "td"):
            if getattr(self, flag):
                s += f" {flag.upper()}"
        if self.pasid is not None:
            s += f" [pasid 0x{self.pasid:x}{' pmr' if self.pmr else ''}{' er' if self.er else ''}]"
        return s


def _check_bes(name: str, fbe: int, lbe: int, length: int, qw_aligned: bool) -> None:
    """Byte-enable rules of 2.2.5.1 for a memory request of ``length`` DW."""
    if length == 1:
        if lbe:
            raise TlpError(f"{name}: last_be=0x{lbe:x}; must be 0 for a 1 DW request (2.2.5.1)")
        return
    if not fbe or not lbe:
        raise TlpError(
            f"{name}: first_be=0x{fbe:x} last_be=0x{lbe:x}; both must be non-zero for a "
            f"{length} DW request (2.2.5.1)"
        )
    if length == 2 and qw_aligned:
        return
    if fbe not in _FIRST_CONTIG or lbe not in _LAST_CONTIG:
        raise TlpError(
            f"{name}: first_be=0x{fbe:x} last_be=0x{lbe:x} are not contiguous; only 1 DW and "
            f"QW-aligned 2 DW requests may use non-contiguous byte enables (2.2.5.1)"
        )


# ---------------------------------------------------------------------------------------------
# Per-kind packers and decoders: the first tier of ``Tlp.pack()`` / ``Tlp.unpack()``
#
# They take the common TLP of each kind -- every field a plain int/bool, no TC/Attr/AT/TH/TD/EP/
# LN/PH, Tag < 0x100, no digest -- and hand everything else to the next tier.  A packer must be
# sound: it returns bytes only for a TLP that ``validate()`` accepts, and then exactly
# ``_pack_checked()``'s bytes.
#
# In CPython 3.11 a shift, AND or OR of two ints is not specialized: it costs about as much as
# four ``is`` tests, two ``struct`` items or four tuple subscripts.  So both directions let
# ``struct`` cut the header at its byte boundaries (Requester/Completer ID, Tag, the BE byte,
# Lower Address...) and use small tables for the rest.  A packer covers each field so:
#
# * fields that must be 0/False/None: ``is`` with the int 0 itself (small ints are shared),
#   False, None or ``CplStatus.SC`` -- stricter than ``validate()`` (a 0.0, 0/1 for a flag or an
#   IntEnum zero goes to the next tier, where ``validate()`` decides in the end);
# * ``struct`` ``B``/``H``/``I``/``Q`` items: ``struct`` refuses a negative or too big value
#   (``struct.error``) and anything without ``__index__`` (``TypeError``);
# * the other bounds: one comparison, or a table without an entry (0/None) for a bad value;
# * a non-int with ``__index__`` (a numpy integer...) would pass all that: one chained
#   ``type(a) is ... is int`` over the fields encoded.
#
# A decoder needs no type or range checks (every field is cut out of the header): only the
# reserved bits and the rules between fields.

_Z = 0   # `field is _Z`: the int 0 itself
_ONE = 1
_new = object.__new__
_PACK_ERRORS = (TypeError, IndexError, struct.error)   # IndexError: an index beyond a table

# page offset -> the most DWs a memory request may carry from there: 0 unless DW aligned, and no
# 4 KiB crossing (2.2.7.1).  Also "is this a DW-aligned register offset" for config requests.
_MAX_DW = tuple(0 if off & 3 else (0x1000 - off) >> 2 for off in range(0x1000))


def _be_table(ok) -> tuple:
    """[last_be][first_be] -> the BE byte, or None where ``ok`` says no; 32 x 32, so that an index
    -32..-1 lands on a None too (further out: IndexError)."""
    return tuple(tuple(l << 4 | f if l < 16 and f < 16 and ok(f, l) else None for f in range(32))
                 for l in range(32))


_BE_1DW = _be_table(lambda f, l: l == 0)                                      # 2.2.5.1
_BE_NDW = _be_table(lambda f, l: f in _FIRST_CONTIG and l in _LAST_CONTIG)    # contiguous
# BE byte of a multi-DW request -> (first_be, last_be) if contiguous, else None
_BE_NDW_SPLIT = tuple((b & 0xF, b >> 4) if _BE_NDW[b >> 4][b & 0xF] is not None else None
                      for b in range(256))
# PASID prefix byte 1 -> (PMR, ER, PASID[19:16] << 16), None if reserved bits 5:4 are set
_PREFIX_BYTE1 = tuple(None if b & 0x30 else (b & 0x80 != 0, b & 0x40 != 0, (b & 0xF) << 16)
                      for b in range(256))
# Completion DW1 bits 15:12 -> (Status, BCM), None for a reserved status
_STATUS_BCM = tuple(None if _STATUS.get(n >> 1) is None else (_STATUS[n >> 1], n & 1 != 0) for n in range(16))
_STATUS_BITS = {s: s << 13 for s in CplStatus}   # Status -> its bits of DW1[15:0]

# Memory request: Fmt/Type, byte 1 (T9 TC T8 A2 LN TH), TD|EP|Attr[1:0]|AT|Length, Requester ID,
# Tag, Last|First BE, address (3DW: Address[31:2] | PH; 4DW: Address[63:2] | PH); a prefix DW first
_MEM3, _MEM4 = struct.Struct(">BxHHBBI"), struct.Struct(">BxHHBBQ")
_PMEM3, _PMEM4 = struct.Struct(">IBxHHBBI"), struct.Struct(">IBxHHBBQ")
# ... decoded after a dispatch on byte 0 (so skipped), and after the prefix's byte 0 (0x91)
_DMEM3, _DMEM4 = struct.Struct(">xBHHBBI"), struct.Struct(">xBHHBBQ")
_DPMEM3, _DPMEM4 = struct.Struct(">xBHxBHHBBI"), struct.Struct(">xBHxBHHBBQ")
# Config request: DW0, Requester ID, Tag, Last|First BE, target ID, DW2[15:0] (register)
_CFG_HDR = struct.Struct(">IHBBHH")
_DCFG = struct.Struct(">xBHHBBHH")
# Completion: Fmt/Type, byte 1, TD|EP|Attr[1:0]|AT|Length, Completer ID, Status|BCM|Byte Count,
# Requester ID, Tag, R|Lower Address
_CPL_HDR = struct.Struct(">BxHHHHBB")
_DCPL = struct.Struct(">xBHHHHBB")


def _mem_packer(t: TlpType, hlen: int, has_data: bool):
    b0 = int(t)
    wide = hlen == 16   # 3DW below 4 GiB (the top: struct's I), 4DW at/above
    h, hp = (_MEM4, _PMEM4) if wide else (_MEM3, _PMEM3)

    def pack(self: Tlp) -> bytes:
        length = self.length
        addr = self.address
        data = self.data
        try:
            if (self.tc is not _Z or self.attr is not _Z or self.at is not _Z or self.ph is not _Z
                    or self.th is not False or self.td is not False or self.ep is not False or self.ln is not False
                    or self.completer_id is not _Z or self.status is not _SC or self.bcm is not False
                    or self.byte_count is not _Z or self.lower_address is not _Z or self.digest is not None
                    or not 0 < length <= _MAX_DW[addr & 0xFFF] or (wide and addr < _FOUR_GIB)
                    or (type(data) is not bytes or len(data) != length * 4 if has_data else data != b"")):
                return self._pack_general()
            fbe = self.first_be
            lbe = self.last_be
            # (a QW-aligned 2 DW request's non-contiguous BEs: the next tier)
            be = (_BE_1DW if length == 1 else _BE_NDW)[lbe][fbe]
            rid = self.requester_id
            tag = self.tag
            if be is None or not (type(rid) is type(tag) is type(fbe) is type(lbe) is type(length) is type(addr)
                                  is int):
                return self._pack_general()
            pasid = self.pasid
            pmr = self.pmr
            er = self.er
            if pasid is None:
                if pmr is not False or er is not False:
                    return self._pack_general()
                hdr = h.pack(b0, length if length < 1024 else 0, rid, tag, be, addr)
            else:
                if type(pasid) is not int or pasid >= 0x10_0000:
                    return self._pack_general()
                if pmr is False and er is False:
                    pdw = 0x9100_0000 | pasid
                elif (pmr is True or pmr is False) and (er is False or er is True and not has_data):
                    pdw = 0x9100_0000 | pmr << 23 | er << 22 | pasid   # ER: untranslated MRd only
                else:
                    return self._pack_general()
                hdr = hp.pack(pdw, b0, length if length < 1024 else 0, rid, tag, be, addr)
        except _PACK_ERRORS:
            return self._pack_general()
        return hdr + data if has_data else hdr

    return pack


def _cfg_packer(t: TlpType, has_data: bool):
    dw0 = int(t) << 24 | 1   # Length 1

    def pack(self: Tlp) -> bytes:
        fbe = self.first_be
        reg = self.address
        data = self.data
        try:
            if (self.tc is not _Z or self.attr is not _Z or self.at is not _Z or self.ph is not _Z
                    or self.th is not False or self.td is not False or self.ep is not False or self.ln is not False
                    or self.last_be is not _Z or self.length is not _ONE or self.status is not _SC
                    or self.bcm is not False or self.byte_count is not _Z or self.lower_address is not _Z
                    or self.digest is not None or self.pasid is not None or self.pmr is not False
                    or self.er is not False or fbe >= 16 or not _MAX_DW[reg]   # DW aligned, < 0x1000
                    or (type(data) is not bytes or len(data) != 4 if has_data else data != b"")):
                return self._pack_general()
            rid = self.requester_id
            tag = self.tag
            cid = self.completer_id
            if not (type(rid) is type(tag) is type(fbe) is type(cid) is type(reg) is int):
                return self._pack_general()
            hdr = _CFG_HDR.pack(dw0, rid, tag, fbe, cid, reg)   # (a negative reg: struct)
        except _PACK_ERRORS:
            return self._pack_general()
        return hdr + data if has_data else hdr

    return pack


def _cpl_packer(t: TlpType, has_data: bool):
    b0 = int(t)

    def pack(self: Tlp) -> bytes:
        length = self.length
        bc = self.byte_count
        la = self.lower_address
        data = self.data
        try:
            if (self.tc is not _Z or self.attr is not _Z or self.at is not _Z or self.ph is not _Z
                    or self.th is not False or self.td is not False or self.ep is not False or self.ln is not False
                    or self.first_be is not _Z or self.last_be is not _Z or self.address is not _Z
                    or self.bcm is not False or self.digest is not None or self.pasid is not None
                    or self.pmr is not False or self.er is not False or la >= 0x80 or not 0 < bc <= 4096):
                return self._pack_general()
            status = self.status
            if has_data:
                if (status is not _SC or type(data) is not bytes or not 0 < length <= 1024
                        or len(data) != length * 4 or length * 4 > (la & 3) + bc + 3):
                    return self._pack_general()
                sbc = bc if bc < 4096 else 0
            else:
                if type(status) is not CplStatus or length is not _Z or data != b"":
                    return self._pack_general()
                sbc = _STATUS_BITS[status] | (bc if bc < 4096 else 0)
            rid = self.requester_id
            tag = self.tag
            cid = self.completer_id
            if not (type(rid) is type(tag) is type(cid) is type(bc) is type(la) is type(length) is int):
                return self._pack_general()
            hdr = _CPL_HDR.pack(b0, length if length < 1024 else 0, cid, sbc, rid, tag, la)
        except _PACK_ERRORS:
            return self._pack_general()
        return hdr + data if has_data else hdr

    return pack


def _decoded(cls, t, rid, tag, length, fbe, lbe, addr, cid, status, bcm, bc, la, data, pasid, pmr, er):
    """The ``Tlp`` a fast decoder returns: the given fields, and the defaults of every one the
    fast paths only accept at its default (TC, Attr, AT, TH, TD, EP, LN, PH, no digest).  Slot
    stores on ``object.__new__``: the 25-argument ``__init__`` and its checks cost more."""
    o = _new(cls)
    o.type = t
    o.requester_id = rid
    o.tag = tag
    o.tc = 0
    o.attr = 0
    o.at = 0
    o.th = False
    o.td = False
    o.ep = False
    o.ln = False
    o.length = length
    o.first_be = fbe
    o.last_be = lbe
    o.address = addr
    o.ph = 0
    o.completer_id = cid
    o.status = status
    o.bcm = bcm
    o.byte_count = bc
    o.lower_address = la
    o.data = data
    o.digest = None
    o.pasid = pasid
    o.pmr = pmr
    o.er = er
    return o


def _mem_decoder(t: TlpType, hlen: int, has_data: bool, prefixed: bool):
    wide = hlen == 16   # 3DW below 4 GiB, 4DW at/above
    hs = (_DPMEM4 if wide else _DPMEM3) if prefixed else (_DMEM4 if wide else _DMEM3)
    start = hlen + 4 if prefixed else hlen

    def decode(cls, buf):
        if prefixed:
            p1, plo, b1, hw, rid, tag, be, addr = hs.unpack_from(buf)
            prefix = _PREFIX_BYTE1[p1]
            if prefix is None:
                return cls._unpack_general(buf)
            pmr, er, phi = prefix
            if er and has_data:   # ER: MRd only (AT is 0 here)
                return cls._unpack_general(buf)
        else:
            b1, hw, rid, tag, be, addr = hs.unpack_from(buf)
        # no Tag[9:8], TC, IDO, LN, TH (byte 1) or TD, EP, Attr[1:0], AT (above Length)
        if b1 or hw >= 0x400:
            return cls._unpack_general(buf)
        length = hw or 1024
        end = start + length * 4 if has_data else start
        # _MAX_DW: PH 0, no 4 KiB crossing
        if len(buf) != end or length > _MAX_DW[addr & 0xFFF] or (wide and addr < _FOUR_GIB):
            return cls._unpack_general(buf)
        if length == 1:
            if be >= 16:   # Last BE must be 0
                return cls._unpack_general(buf)
            fbe = be
            lbe = 0
        else:
            split = _BE_NDW_SPLIT[be]   # (a QW-aligned 2 DW request's non-contiguous BEs: general)
            if split is None:
                return cls._unpack_general(buf)
            fbe, lbe = split
        if has_data:
            data = buf[start:end]
            if type(data) is not bytes:
                data = bytes(data)
        else:
            data = b""
        if prefixed:
            return _decoded(cls, t, rid, tag, length, fbe, lbe, addr, 0, _SC, False, 0, 0, data, phi | plo, pmr, er)
        return _decoded(cls, t, rid, tag, length, fbe, lbe, addr, 0, _SC, False, 0, 0, data, None, False, False)

    return decode


def _cfg_decoder(t: TlpType, has_data: bool):
    size = 16 if has_data else 12

    def decode(cls, buf):
        b1, hw, rid, tag, be, cid, reg = _DCFG.unpack_from(buf)
        # DW0 = Fmt/Type | Length 1, nothing else; Last BE 0; DW2 bits 15:12 and 1:0 reserved
        if len(buf) != size or b1 or hw != 1 or be >= 16 or reg >= 0x1000 or not _MAX_DW[reg]:
            return cls._unpack_general(buf)
        if has_data:
            data = buf[12:16]
            if type(data) is not bytes:
                data = bytes(data)
        else:
            data = b""
        return _decoded(cls, t, rid, tag, 1, be, 0, reg, cid, _SC, False, 0, 0, data, None, False, False)

    return decode


def _cpl_decoder(t: TlpType, has_data: bool):

    def decode(cls, buf):
        b1, hw, cid, sbc, rid, tag, la = _DCPL.unpack_from(buf)
        # no Tag[9:8], TC, IDO, LN, TH, TD, EP, Attr[1:0], AT; DW2 bit 7 reserved
        if b1 or hw >= 0x400 or la >= 0x80:
            return cls._unpack_general(buf)
        if has_data:
            length = hw or 1024
            bc = sbc or 4096
            # Status SC and BCM 0 (BCM set: the general path); the payload fits Byte Count
            if sbc >= 0x1000 or len(buf) != 12 + length * 4 or length * 4 > (la & 3) + bc + 3:
                return cls._unpack_general(buf)
            status = _SC
            bcm = False
        else:
            if hw or len(buf) != 12:   # Length is Reserved
                return cls._unpack_general(buf)
            status_bcm = _STATUS_BCM[sbc >> 12]
            if status_bcm is None:
                return cls._unpack_general(buf)
            status, bcm = status_bcm
            length = 0
            bc = sbc & 0xFFF or 4096
        if has_data:
            data = buf[12:]
            if type(data) is not bytes:
                data = bytes(data)
        else:
            data = b""
        return _decoded(cls, t, rid, tag, length, 0, 0, 0, cid, status, bcm, bc, la, data, None, False, False)

    return decode


_PACK: dict[TlpType, object] = {}
_DECODE: dict[int, object] = {}
_DECODE_PREFIXED: dict[int, object] = {}   # byte 4 after a PASID prefix -> decoder
for _t, _kind, _hlen, _has_data, _name in _INFO.values():
    if _kind == _MEM:
        _PACK[_t] = _mem_packer(_t, _hlen, _has_data)
        _DECODE[_t.value] = _mem_decoder(_t, _hlen, _has_data, False)
        _DECODE_PREFIXED[_t.value] = _mem_decoder(_t, _hlen, _has_data, True)
    elif _kind == _CFG:
        _PACK[_t] = _cfg_packer(_t, _has_data)
        _DECODE[_t.value] = _cfg_decoder(_t, _has_data)
    else:
        _PACK[_t] = _cpl_packer(_t, _has_data)
        _DECODE[_t.value] = _cpl_decoder(_t, _has_data)


# ---------------------------------------------------------------------------------------------
# Router fast path


def mem_write_raw(address: int, data: bytes, requester_id: int = 0) -> bytes | None:
    """``Tlp.mem_write(address, data, requester_id).pack()`` without building a ``Tlp``, for a
    CPU's stores on the hot path (doorbells, head pointers): whole DWs at a DW-aligned address
    inside one 4 KiB page, tag 0, no PASID.  ``None`` for anything else (use ``Tlp.mem_write``).
    Same bytes either way (test_tlp.py checks it)."""
    if type(data) is not bytes or type(address) is not int or type(requester_id) is not int:
        return None
    n = len(data)
    if (address & 3 or n & 3 or not n or (address & 0xFFF) + n > 0x1000 or address < 0 or address >> 64
            or not 0 <= requester_id <= 0xFFFF):
        return None
    ndw = n >> 2
    dw1 = requester_id << 16 | (0x0F if ndw == 1 else 0xFF)
    if address < 0x1_0000_0000:
        return _H3.pack(0x4000_0000 | (ndw & 0x3FF), dw1, address) + data
    return _H4.pack(0x6000_0000 | (ndw & 0x3FF), dw1, address) + data


def peek(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """Check framing and return ``(byte0, hdr_offset, id, key)`` without building a ``Tlp``.

    ``byte0`` is the header's Fmt/Type byte (compare with ``TlpType``); ``hdr_offset`` is 4 after
    a PASID prefix, else 0.  By kind:

    * memory request: ``(type, off, requester_id, address)`` (byte address of the first DW)
    * config request: ``(type, off, requester_id, target_id << 16 | reg)`` -- DW2 with its
      reserved bits masked, so ``key >> 16`` is the target BDF and ``key & 0xFFC`` the register
    * completion: ``(type, off, requester_id, completer_id)`` -- the requester is the destination

    Checked: supported Fmt/Type, prefix (PASID only, once, reserved bits, memory requests only),
    complete header, buffer length == header + Length payload + digest.  BE rules, reserved
    header bits and field restrictions are left to ``Tlp.unpack()`` at the receiver.
    """
    n = len(buf)
    if n < 12:
        raise TlpError(f"truncated TLP: {n} bytes, a header is at least 12")
    b0 = buf[0]
    off = 0
    if b0 >= 0x80:
        _read_prefix(buf, n)
        off = 4
        b0 = buf[4]
    info = _INFO.get(b0)
    if info is None:
        raise _unsupported(b0)
    _t, kind, hlen, has_data, name = info
    if n < off + hlen:
        raise TlpError(f"{name}: truncated header: {n} bytes, need {off + hlen}")
    dw0, dw1, dw2 = (_H4 if hlen == 16 else _H3).unpack_from(buf, off)
    total = off + hlen
    if has_data:
        total += ((dw0 & 0x3FF) or 1024) << 2
    if dw0 & 0x8000:
        total += 4
    if n != total:
        raise TlpError(f"{name}: buffer is {n} bytes but the header says {total}")
    if kind == _MEM:
        return b0, off, dw1 >> 16, dw2 & _ADDR64_MASK
    if off:
        raise TlpError(f"{name}: PASID prefix is only permitted on memory requests (6.20)")
    if kind == _CFG:
        return b0, 0, dw1 >> 16, dw2 & 0xFFFF_0FFC
    return b0, 0, dw2 >> 16, dw1 >> 16


def _stamp(buf, pos: int, value: int) -> bytes:
    out = bytearray(buf)
    out[pos] = value >> 8
    out[pos + 1] = value & 0xFF
    return bytes(out)


def stamp_requester(buf: bytes | bytearray | memoryview, rid: int) -> bytes:
    """Copy of ``buf`` with its Requester ID field set to ``rid``: request DW1[31:16], or for a
    completion DW2[31:16] (the completion's destination).  Validates framing like ``peek``."""
    rid = operator.index(rid)
    if not 0 <= rid <= 0xFFFF:
        raise TlpError(f"stamp_requester: rid=0x{rid:x} out of range (expected 0x0..0xffff)")
    b0, off, _id, _key = peek(buf)
    return _stamp(buf, off + (8 if _INFO[b0][1] == _CPL else 4), rid)


def stamp_completer(buf: bytes | bytearray | memoryview, cid: int) -> bytes:
    """Copy of a completion ``buf`` with its Completer ID (DW1[31:16]) set to ``cid``."""
    cid = operator.index(cid)
    if not 0 <= cid <= 0xFFFF:
        raise TlpError(f"stamp_completer: cid=0x{cid:x} out of range (expected 0x0..0xffff)")
    b0, off, _id, _key = peek(buf)
    info = _INFO[b0]
    if info[1] != _CPL:
        raise TlpError(f"stamp_completer: {info[4]} is not a completion and has no Completer ID")
    return _stamp(buf, off + 4, cid)


def prefix_pasid(buf: bytes | bytearray | memoryview) -> int | None:
    """The PASID of a TLP's PASID prefix, or None if it has no prefix.  Only the prefix DW is
    checked (another prefix type, reserved bits, duplicate PASID prefix -> ``TlpError``)."""
    if not len(buf):
        raise TlpError("empty buffer: no TLP")
    if buf[0] < 0x80:
        return None
    return _read_prefix(buf, len(buf)) & 0xF_FFFF

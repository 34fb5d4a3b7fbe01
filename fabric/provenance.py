"""Out-of-band provenance of an interrupt MWr: which function or ADI emitted it (DESIGN.md §6).

A device model hands every interrupt MWr to its shell with an ``origin`` integer
(``device.emit.Emit``); the wire carries it beside the TLP bytes (``wire.TLP``
frame) and the receiver of the delivered interrupt compares it with the owner of
the vector.  The bus, the IOMMU and the IR unit never read it: it is the lab's
oracle, not a hardware field.

Encoding (a plain non-negative int, msgpack-friendly)::

     63        33  32  31             16 15                       0
    +------------+----+-----------------+--------------------------+
    |     0      | A  |   ADI index     |   RID (bus:dev.fn)       |
    +------------+----+-----------------+--------------------------+

    A = 0:  a PCI function (PF or VF): origin == RID, bits 31:16 are 0.
            This is what the SR-IOV models have always sent, so an RID is
            already a valid origin.
    A = 1:  ADI ``index`` of the Scalable-IOV PF whose RID is in bits 15:0.

Why the ADI *index* and not the PASID: an ADI has no RID of its own and on the
wire is told apart only by its PASID, but the PASID is a number software
programs (and may reprogram, or program twice).  The hardware itself always
knows which ADI's engine produced a message; the oracle wants exactly that
ground truth, so that a misprogrammed or forged PASID shows up as a breach
instead of being believed.
"""

from __future__ import annotations

from fabric.bdf import rid_str

__all__ = [
    "ADI_FLAG",
    "function_origin",
    "adi_origin",
    "is_adi",
    "is_valid",
    "origin_rid",
    "origin_adi",
    "describe",
]

ADI_FLAG = 1 << 32
_ADI_SHIFT = 16
_MAX = ADI_FLAG | 0xFFFF_FFFF


def function_origin(rid: int) -> int:
    """Origin of an interrupt emitted by the PCI function ``rid`` (PF or VF): the RID itself."""
    if not 0 <= rid <= 0xFFFF:
        raise ValueError(f"RID 0x{rid:x} does not fit in 16 bits")
    return rid


def adi_origin(rid: int, adi_index: int) -> int:
    """Origin of an interrupt emitted by ADI ``adi_index`` of the SIOV PF ``rid``."""
    if not 0 <= rid <= 0xFFFF:
        raise ValueError(f"RID 0x{rid:x} does not fit in 16 bits")
    if not 0 <= adi_index <= 0xFFFF:
        raise ValueError(f"ADI index {adi_index} does not fit in 16 bits")
    return ADI_FLAG | adi_index << _ADI_SHIFT | rid


def is_valid(origin: object) -> bool:
    """True for an int that ``function_origin`` or ``adi_origin`` can produce."""
    if type(origin) is not int or not 0 <= origin <= _MAX:
        return False
    return bool(origin & ADI_FLAG) or origin <= 0xFFFF


def is_adi(origin: int) -> bool:
    """True if ``origin`` names an ADI (False for a function, or for anything invalid)."""
    return is_valid(origin) and bool(origin & ADI_FLAG)


def origin_rid(origin: int) -> int:
    """The RID in ``origin`` (the function's own, or the ADI's PF's)."""
    return origin & 0xFFFF


def origin_adi(origin: int) -> int | None:
    """The ADI index in ``origin``, or None for a function."""
    return (origin >> _ADI_SHIFT) & 0xFFFF if is_adi(origin) else None


def describe(origin: int | None) -> str:
    """Human form: ``"01:00.0"`` for a function, ``"01:00.0 ADI 3"`` for an ADI.

    Never raises: ``None`` reads ``"-"`` and an int no device can send reads
    ``"invalid origin 0x..."`` (a report must survive whatever a peer sent).
    """
    if origin is None:
        return "-"
    if not is_valid(origin):
        return f"invalid origin {origin:#x}" if type(origin) is int else f"invalid origin {origin!r}"
    text = rid_str(origin & 0xFFFF)
    if origin & ADI_FLAG:
        return f"{text} ADI {(origin >> _ADI_SHIFT) & 0xFFFF}"
    return text

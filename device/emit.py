"""What a device model hands back to its process shell.

Every model entry point returns a list of :class:`Emit`; the shell sends
``emit.tlp`` in list order on one socket (that is what keeps a DMA MWr ahead
of the interrupt MWr that follows it) and forwards ``emit.origin`` beside it.
"""

from __future__ import annotations

from typing import NamedTuple

from fabric.tlp import Tlp, TlpType


class Emit(NamedTuple):
    """One TLP to put on the link.

    ``origin`` is the RID of the function whose MSI-X table or IMS produced an
    interrupt MWr: out-of-band provenance for the lab's isolation oracle
    (DESIGN.md §6).  The fabric and the IR unit never read it.  A DWORD
    completion record (``device.engine`` CMPL_FORMAT) carries it too: that DMA
    write is an interrupt request if software aimed it at 0xFEEx_xxxx.  ``None``
    for every other TLP (completions, other DMA writes).
    """

    tlp: Tlp
    origin: int | None = None
    #: ``tlp.pack()`` made already (an MSI-X message cached per vector), or None: the shell packs.
    #: A cached Emit and its ``Tlp`` are sent again and again: never modify an emitted ``Tlp``.
    raw: bytes | None = None


_FOUR_GIB = 1 << 32


def mem_write_dw(address: int, data: bytes, requester_id: int, pasid: int | None = None) -> Tlp:
    """``Tlp.mem_write(address, data, requester_id, pasid=pasid)`` for the device's own hot-path writes.

    DMA records and MSI-X / IMS messages are whole DWs at DW-aligned addresses inside
    one 4 KiB page: for those the header fields are known valid (all bytes
    enabled, 3DW below 4 GiB else 4DW) and the codec's validation -- which
    ``pack()`` repeats anyway -- is skipped.  Anything else goes through
    ``Tlp.mem_write``.  Same result either way (tested).
    """
    n = len(data)
    if (address & 3 or n & 3 or not n or (address & 0xFFF) + n > 0x1000 or address >> 64 or requester_id >> 16
            or (pasid is not None and pasid >> 20)):
        return Tlp.mem_write(address, data, requester_id, pasid=pasid)
    return Tlp(
        TlpType.MEM_WRITE if address < _FOUR_GIB else TlpType.MEM_WRITE_64,
        requester_id,
        length=n >> 2,
        first_be=0xF,
        last_be=0 if n == 4 else 0xF,
        address=address,
        data=bytes(data),
        pasid=pasid,
    )

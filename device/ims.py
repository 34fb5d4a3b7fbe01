"""Interrupt Message Store of kind ``device``: IMS slots in a BAR, IDXD layout.

IMS is device-specific storage of addr/data pairs (DESIGN.md §1).  This block
models the ``device`` kind as Intel's DSA/IAA (IDXD) lays it out: an array of
16-byte slots in BAR0, written directly by whoever maps that BAR page.  The
hypervisor can trap those writes only by leaving the page unmapped in the
guest's second-level tables; that is why the function puts IMS and MSI-X in
different 4 KiB pages (see ``device.function``).

Slot (16 bytes, same shape as an MSI-X table entry;
reference/pcie-tlp-config-siov.md §6, Linux ``irq-ims-msi.h``
``IMS_CTRL_VECTOR_MASKBIT`` / ``IMS_CTRL_PASID_ENABLE`` / ``IMS_CTRL_PASID_SHIFT``)::

     31                                                  2 1 0
    +-----------------------------------------------------+---+
    |              Message Address [31:2]                 | 00|  +0x0  addr lo
    +-----------------------------------------------------+---+
    |              Message Upper Address [63:32]              |  +0x4  addr hi
    +---------------------------------------------------------+
    |              Message Data                               |  +0x8  data
    +-----------------------------+-------------+---+-----+---+
    |        PASID [19:0]         |  Reserved   |PE | Rsv | M |  +0xC  ctrl
    +-----------------------------+-------------+---+-----+---+
     31                         12 11          4  3  2   1  0

    ctrl bit 0      M   Mask: 1 = the slot may not send (reset value)
    ctrl bits 2:1   -   reserved (interrupt control), read 0
    ctrl bit 3      PE  PASID Enable: tag the message with ctrl.PASID
    ctrl bits 11:4  -   reserved, read 0
    ctrl bits 31:12     PASID (20 bits)

Every other field is writable.  Address bits 1:0 read 0, as in an MSI-X entry:
an interrupt message is one DW at a DW-aligned address, so the device can
always send what the slot holds.

Sending slot s is a 1-DW MWr of ``data`` (little-endian) to ``addr hi:lo``,
requester ID = the function's RID, with a PASID TLP prefix carrying
ctrl.PASID when the slot asks for one *and the device can tag interrupts*.

Theory of operation
-------------------
* ``notify(s)`` on a masked slot sets its pending flag instead of sending.
  IMS has no architected PBA, so the flags are internal (``is_pending``).
* Clearing a pending slot's Mask bit clears the flag and sends the message
  ("replayed"): the ctrl write that unmasks it returns the MWr.
* With Bus Master Enable clear the function may not issue the MWr: the message
  is dropped and counted as ``blocked_no_bme`` (nothing is left pending), as in
  ``device.msix``.
* There is no Enable / Function Mask: each slot masks itself.
* Reset (power-on / FLR): every slot masked (ctrl = 1), everything else zero,
  no flag pending.  Counters are statistics and survive ``reset()``.

The PASID choice (``pasid_interrupts``)
---------------------------------------
The device-level knob ``pasid_interrupts`` says whether this device can put a
PASID prefix on an interrupt MWr at all.  With it set (default), a slot with
PE = 1 sends RID + PASID: the thread's case 3, where the IR unit can tell two
owners of the same RID apart by PASID.  With it clear the device cannot tag
interrupts ("This SIOV device cannot tag interrupts with PASID"): PE and PASID
are still stored and read back -- the slot is plain storage -- but the message
goes out with the RID only, which is the thread's case 4 (only a hypervisor
that exclusively controls the slots keeps it safe).  The device neither drops
the message nor refuses the write: it sends what it can, which is exactly the
behaviour the lab's rows 4 / 4-unsafe turn on.
"""

from __future__ import annotations

import struct
from typing import Any

from device.emit import Emit, mem_write_dw

IMS_SLOT_SIZE = 16
IMS_SLOT_LOWER_ADDR = 0x0
IMS_SLOT_UPPER_ADDR = 0x4
IMS_SLOT_DATA = 0x8
IMS_SLOT_CTRL = 0xC

IMS_CTRL_VECTOR_MASKBIT = 0x1
IMS_CTRL_PASID_ENABLE = 0x8
IMS_CTRL_PASID_SHIFT = 12
IMS_CTRL_PASID_MASK = 0xF_FFFF << IMS_CTRL_PASID_SHIFT
IMS_CTRL_WRITABLE = IMS_CTRL_PASID_MASK | IMS_CTRL_PASID_ENABLE | IMS_CTRL_VECTOR_MASKBIT  # 0xFFFFF009

_SLOT = struct.Struct("<IIII")


def _always() -> bool:
    return True


class ImsStore:
    """The IMS slot array of one function, with mask/pending/replay semantics."""

    __slots__ = (
        "nslots", "slots", "pending", "bus_master", "requester_id", "pasid_interrupts",
        "sent", "pended", "replayed", "blocked_no_bme", "invalid_slot", "pasid_enabled",
    )

    def __init__(self, slots: int, *, requester_id: int = 0, pasid_interrupts: bool = True) -> None:
        #: the owning function's PASID Enable (a function without the capability: always on)
        self.pasid_enabled = _always
        if slots < 1:
            raise ValueError(f"IMS with {slots} slots: at least 1 (a function without IMS has no store)")
        self.nslots = slots
        self.slots = bytearray(slots * IMS_SLOT_SIZE)
        self.pending = bytearray((slots + 7) // 8)
        self.bus_master = False
        self.requester_id = requester_id
        self.pasid_interrupts = pasid_interrupts
        self.sent = 0
        self.pended = 0
        self.replayed = 0
        self.blocked_no_bme = 0
        self.invalid_slot = 0
        self.reset()

    # ---- state -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Power-on / FLR state: every slot masked and zeroed, nothing pending."""
        slots = self.slots
        slots[:] = bytes(len(slots))
        for off in range(IMS_SLOT_CTRL, len(slots), IMS_SLOT_SIZE):
            slots[off] = IMS_CTRL_VECTOR_MASKBIT
        self.pending[:] = bytes(len(self.pending))

    def is_masked(self, slot: int) -> bool:
        return bool(self.slots[slot * IMS_SLOT_SIZE + IMS_SLOT_CTRL] & IMS_CTRL_VECTOR_MASKBIT)

    def is_pending(self, slot: int) -> bool:
        return bool(self.pending[slot >> 3] >> (slot & 7) & 1)

    def message(self, slot: int) -> tuple[int, int]:
        """The (address, data) pair stored in ``slot``."""
        lo, hi, data, _ = _SLOT.unpack_from(self.slots, slot * IMS_SLOT_SIZE)
        return hi << 32 | lo, data

    # ---- signalling ------------------------------------------------------------------------------

    def notify(self, slot: int) -> Emit | None:
        """Signal ``slot``: the MWr to send, or None if pended, blocked or out of range."""
        if not 0 <= slot < self.nslots:
            self.invalid_slot += 1
            return None
        if self.slots[slot * IMS_SLOT_SIZE + IMS_SLOT_CTRL] & IMS_CTRL_VECTOR_MASKBIT:
            self.pending[slot >> 3] |= 1 << (slot & 7)
            self.pended += 1
            return None
        return self._send(slot)

    def _send(self, slot: int) -> Emit | None:
        if not self.bus_master:
            self.blocked_no_bme += 1
            return None
        lo, hi, data, ctrl = _SLOT.unpack_from(self.slots, slot * IMS_SLOT_SIZE)
        self.sent += 1
        return self.emit_message(hi << 32 | lo, data, ctrl)

    def emit_message(self, address: int, data: int, ctrl: int) -> Emit:
        """Turn one unmasked slot into its MWr (BME already checked).

        A function's store tags it with ctrl.PASID when PE is set and the
        device can tag interrupts; origin = the function's RID.  A subclass
        whose device identifies the sender differently (the SIOV ADI's store,
        ``device.adi``) overrides this.
        """
        # PCIe: no PASID prefix unless the function's PASID capability is enabled.
        pasid = (ctrl >> IMS_CTRL_PASID_SHIFT
                 if ctrl & IMS_CTRL_PASID_ENABLE and self.pasid_interrupts and self.pasid_enabled() else None)
        rid = self.requester_id
        return Emit(mem_write_dw(address, data.to_bytes(4, "little"), rid, pasid), rid)

    # ---- MMIO accessors (offsets relative to the first slot) -------------------------------------

    def read(self, off: int, size: int = 4) -> int:
        """Read 4 bytes, or an aligned 8 bytes, of the slot array; beyond the last slot reads 0."""
        _check_access(off, size)
        if off + size > len(self.slots):
            return 0
        return int.from_bytes(self.slots[off:off + size], "little")

    def write(self, off: int, size: int, value: int) -> list[Emit]:
        """Write 4 bytes, or an aligned 8 bytes; returns the message an unmask replays (if any)."""
        _check_access(off, size)
        if size == 8:
            out = self._write32(off, value & 0xFFFFFFFF)
            out += self._write32(off + 4, value >> 32 & 0xFFFFFFFF)
            return out
        return self._write32(off, value)

    def _write32(self, off: int, value: int) -> list[Emit]:
        if off + 4 > len(self.slots):
            return []
        slot, field = divmod(off, IMS_SLOT_SIZE)
        if field == IMS_SLOT_LOWER_ADDR:
            value &= 0xFFFFFFFC
        elif field == IMS_SLOT_CTRL:
            value &= IMS_CTRL_WRITABLE
            self.slots[off:off + 4] = value.to_bytes(4, "little")
            if value & IMS_CTRL_VECTOR_MASKBIT or not self.is_pending(slot):
                return []
            self.pending[slot >> 3] &= ~(1 << (slot & 7)) & 0xFF
            self.replayed += 1
            emit = self._send(slot)
            return [emit] if emit is not None else []
        self.slots[off:off + 4] = value.to_bytes(4, "little")
        return []

    # ---- observation -----------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Slots not in reset state (programmed, unmasked or pending), for debugging views.

        msgpack-friendly: one dict per slot with its decoded fields.
        """
        out: list[dict[str, Any]] = []
        for slot in range(self.nslots):
            lo, hi, data, ctrl = _SLOT.unpack_from(self.slots, slot * IMS_SLOT_SIZE)
            pending = self.is_pending(slot)
            if lo | hi | data or ctrl != IMS_CTRL_VECTOR_MASKBIT or pending:
                out.append({
                    "slot": slot,
                    "address": hi << 32 | lo,
                    "data": data,
                    "masked": bool(ctrl & IMS_CTRL_VECTOR_MASKBIT),
                    "pasid_enable": bool(ctrl & IMS_CTRL_PASID_ENABLE),
                    "pasid": ctrl >> IMS_CTRL_PASID_SHIFT,
                    "pending": pending,
                })
        return out


def _check_access(off: int, size: int) -> None:
    if size not in (4, 8) or off % size or off < 0:
        raise ValueError(f"IMS access of {size} bytes at 0x{off:x}: only aligned 4 or 8")

"""MSI-X table and Pending Bit Array (PCI LB 3.0 6.8.2.6-6.8.2.10; QEMU hw/pci/msix.c).

Table entry (16 bytes per vector, in a BAR)::

     31                                                  2 1 0
    +-----------------------------------------------------+---+
    |              Message Address [31:2]                 | 00|  +0x0  addr lo
    +-----------------------------------------------------+---+
    |              Message Upper Address [63:32]              |  +0x4  addr hi
    +---------------------------------------------------------+
    |              Message Data                               |  +0x8  data
    +-----------------------------------------------------+---+
    |              Reserved                               | M |  +0xC  vector control, bit0 Mask
    +-----------------------------------------------------+---+

PBA: one bit per vector, vector v = bit (v % 64) of QW (v // 64); sized
``align_up(N, 64) / 8`` bytes as QEMU does.  Read-only to software.

Sending vector v is a 1-DW MWr of ``data`` (little-endian) to ``addr hi:lo``,
requester ID = the function's RID.

Theory of operation (QEMU's semantics)
--------------------------------------
* A vector is *masked* when MSI-X is disabled, the Function Mask is set, or
  its entry's Mask bit is set.
* ``notify(v)`` on a masked vector sets its PBA bit instead of sending.
* When a vector becomes unmasked -- its Mask bit cleared, Function Mask
  cleared, or MSI-X Enable set -- and its PBA bit is set, the bit is cleared
  and the message is sent ("replayed").
* With Bus Master Enable clear the function may not issue the MWr: the message
  is dropped and counted as ``blocked_no_bme`` (as in QEMU, where the bus
  master address space swallows it; nothing is left pending).
* Reset: every entry masked (vector control = 1), everything else zero, PBA
  clear, Enable and Function Mask clear.

Enable / Function Mask live in the MSI-X capability and Bus Master Enable in
the Command register; the owning function pushes them here
(``set_control``, ``bus_master``), so this block needs no config space.
Counters (``sent`` ...) are statistics and survive ``reset()``.
"""

from __future__ import annotations

import struct

from device.emit import Emit, mem_write_dw
from fabric.tlp import TlpError

PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0x0
PCI_MSIX_ENTRY_UPPER_ADDR = 0x4
PCI_MSIX_ENTRY_DATA = 0x8
PCI_MSIX_ENTRY_VECTOR_CTRL = 0xC
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1

_ENTRY = struct.Struct("<IIII")


class MsixTable:
    """Vector table + PBA of one function, with mask/pending/replay semantics."""

    __slots__ = (
        "nvectors", "table", "pba", "enabled", "function_mask", "bus_master", "requester_id",
        "sent", "pended", "replayed", "blocked_no_bme", "invalid_vector", "_cache",
    )

    def __init__(self, nvectors: int, *, requester_id: int = 0) -> None:
        if not 1 <= nvectors <= 2048:
            raise ValueError(f"MSI-X table size {nvectors} outside 1..2048")
        self.nvectors = nvectors
        self.table = bytearray(nvectors * PCI_MSIX_ENTRY_SIZE)
        self.pba = bytearray((nvectors + 63) // 64 * 8)
        self.enabled = False
        self.function_mask = False
        self.bus_master = False
        self.requester_id = requester_id
        self.sent = 0
        self.pended = 0
        self.replayed = 0
        self.blocked_no_bme = 0
        self.invalid_vector = 0
        self._cache: dict[int, tuple[tuple[int, int, int, int], Emit]] = {}
        self.reset()

    # ---- state -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Power-on / FLR state: all entries masked, table and PBA cleared, MSI-X off."""
        table = self.table
        table[:] = bytes(len(table))
        for off in range(PCI_MSIX_ENTRY_VECTOR_CTRL, len(table), PCI_MSIX_ENTRY_SIZE):
            table[off] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.pba[:] = bytes(len(self.pba))
        self.enabled = False
        self.function_mask = False
        self._cache.clear()

    def is_masked(self, vector: int) -> bool:
        return (
            not self.enabled
            or self.function_mask
            or bool(self.table[vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT)
        )

    def is_pending(self, vector: int) -> bool:
        return bool(self.pba[vector >> 3] >> (vector & 7) & 1)

    def message(self, vector: int) -> tuple[int, int]:
        """The (address, data) pair stored in entry ``vector``."""
        lo, hi, data, _ = _ENTRY.unpack_from(self.table, vector * PCI_MSIX_ENTRY_SIZE)
        return hi << 32 | lo, data

    # ---- signalling ------------------------------------------------------------------------------

    def notify(self, vector: int) -> Emit | None:
        """Signal ``vector`` (QEMU ``msix_notify``): the MWr to send, or None if pended/blocked."""
        if not 0 <= vector < self.nvectors:
            self.invalid_vector += 1
            return None
        if self.is_masked(vector):
            self.pba[vector >> 3] |= 1 << (vector & 7)
            self.pended += 1
            return None
        return self._send(vector)

    def _send(self, vector: int) -> Emit | None:
        if not self.bus_master:
            self.blocked_no_bme += 1
            return None
        lo, hi, data, _ = _ENTRY.unpack_from(self.table, vector * PCI_MSIX_ENTRY_SIZE)
        self.sent += 1
        rid = self.requester_id
        # The message, built and encoded once per (entry, RID): a vector fires the same bytes
        # until software rewrites its entry (the key is what the entry says now).
        key = (lo, hi, data, rid)
        hit = self._cache.get(vector)
        if hit is not None and hit[0] == key:
            return hit[1]
        tlp = mem_write_dw(hi << 32 | lo, data.to_bytes(4, "little"), rid)
        try:
            emit = Emit(tlp, rid, tlp.pack())
        except TlpError:
            return Emit(tlp, rid)              # the shell's pack says what is wrong with it
        self._cache[vector] = (key, emit)
        return emit

    def _replay_if_unmasked(self, vector: int) -> Emit | None:
        """QEMU ``msix_handle_mask_update``: a pending vector that is now unmasked fires."""
        if self.is_masked(vector) or not self.is_pending(vector):
            return None
        self.pba[vector >> 3] &= ~(1 << (vector & 7)) & 0xFF
        self.replayed += 1
        return self._send(vector)

    def set_control(self, enabled: bool, function_mask: bool) -> list[Emit]:
        """New MSI-X Enable / Function Mask from the capability; returns replayed messages."""
        was_global_masked = not self.enabled or self.function_mask
        self.enabled, self.function_mask = enabled, function_mask
        out: list[Emit] = []
        if was_global_masked and enabled and not function_mask:
            for byte_index, bits in enumerate(self.pba):
                if not bits:
                    continue
                for bit in range(8):
                    if bits >> bit & 1:
                        vector = byte_index * 8 + bit
                        if vector < self.nvectors:
                            emit = self._replay_if_unmasked(vector)
                            if emit is not None:
                                out.append(emit)
        return out

    # ---- MMIO accessors (offsets relative to the table / PBA start) ------------------------------

    def table_read(self, off: int, size: int = 4) -> int:
        """Read 4 bytes, or an aligned 8 bytes, of the table; beyond the table reads 0."""
        _check_access(off, size)
        if off + size > len(self.table):
            return 0
        return int.from_bytes(self.table[off:off + size], "little")

    def table_write(self, off: int, size: int, value: int) -> list[Emit]:
        """Write 4 bytes, or an aligned 8 bytes, of the table; returns replayed messages."""
        _check_access(off, size)
        if size == 8:
            out = self._table_write32(off, value & 0xFFFFFFFF)
            out += self._table_write32(off + 4, value >> 32 & 0xFFFFFFFF)
            return out
        return self._table_write32(off, value)

    def _table_write32(self, off: int, value: int) -> list[Emit]:
        if off + 4 > len(self.table):
            return []
        vector, field = divmod(off, PCI_MSIX_ENTRY_SIZE)
        if field == PCI_MSIX_ENTRY_LOWER_ADDR:
            value &= 0xFFFFFFFC  # DW-aligned address: bits 1:0 read as 0
        elif field == PCI_MSIX_ENTRY_VECTOR_CTRL:
            value &= PCI_MSIX_ENTRY_CTRL_MASKBIT  # bits 31:1 reserved
            was_masked = self.is_masked(vector)
            self.table[off:off + 4] = value.to_bytes(4, "little")
            if was_masked:
                emit = self._replay_if_unmasked(vector)
                return [emit] if emit is not None else []
            return []
        self.table[off:off + 4] = value.to_bytes(4, "little")
        return []

    def pba_read(self, off: int, size: int = 4) -> int:
        """Read 4 bytes, or an aligned 8 bytes, of the PBA (writes are ignored)."""
        _check_access(off, size)
        if off + size > len(self.pba):
            return 0
        return int.from_bytes(self.pba[off:off + size], "little")


def _check_access(off: int, size: int) -> None:
    if size not in (4, 8) or off % size:
        raise ValueError(f"MSI-X access of {size} bytes at 0x{off:x}: only aligned 4 or 8")

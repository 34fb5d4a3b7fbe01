"""vfio-pci's emulation of an assigned function, as a pure model.

What the guest sees of an assigned VF (QEMU ``hw/vfio/pci.c`` in miniature):

- **Config space** is a virtual copy made at assignment from the real function's
  config.  IDs: a VF reads Vendor/Device as 0xFFFF, so the virtual header shows
  the PF's vendor and the VF Device ID (as ``vfio_config_init`` does).  Command
  and BAR0 are virtual (BAR sizing is emulated: the guest's all-ones write reads
  back the size mask).  MSI-X Message Control's Enable and Function Mask are
  virtual; the rest is read-only.
- **BAR0** is split by page when the guest programs its address: the engine
  registers and IMS slots (pages 0-1) map straight through the EPT to the VF's
  real BAR, the MSI-X table and PBA (pages 2-3) are trapped so that the host
  alone programs the real table.
- **MSI-X table writes** land in a virtual table; an unmasked entry with a valid
  compatibility-format message (guest vector, guest APIC ID) is what the host
  forwards real interrupts of that entry to.

The model returns *actions*; the VMM carries them out (EPT programming,
enabling the real MSI-X, updating the forwarding table).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from guest.pci import regs as R

PAGE = 0x1000
MSIX_TABLE_OFFSET = 0x2000   # the engine function's layout (BAR0 page 2: table, page 3: PBA)
MSIX_PBA_OFFSET = 0x3000
PASSTHROUGH_PAGES = (0, 1)   # engine registers, IMS slots
TRAPPED_PAGES = (2, 3)       # MSI-X table, PBA


@dataclass
class VEntry:
    addr_lo: int = 0
    addr_hi: int = 0
    data: int = 0
    ctrl: int = R.PCI_MSIX_ENTRY_CTRL_MASKBIT

    @property
    def masked(self) -> bool:
        return bool(self.ctrl & R.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def target(self) -> tuple[int, int] | None:
        """(guest APIC ID, vector) of a compatibility-format message, or None if unusable."""
        if self.addr_lo >> 20 != 0xFEE or self.addr_hi or self.addr_lo & 0x10:
            return None
        vector = self.data & 0xFF
        if vector < 0x10:
            return None
        return (self.addr_lo >> 12) & 0xFF, vector


@dataclass
class VirtualFunction:
    host_rid: int
    guest_rid: int
    config: bytearray            # 256-byte snapshot of the real function's config space
    bar0_size: int
    bar0_hpa: int
    vendor: int
    device: int
    msix_pos: int
    msix_size: int
    bar0_gpa: int = 0
    command: int = 0
    msix_enable: bool = False
    msix_maskall: bool = False
    table: list[VEntry] = field(default_factory=list)
    pending: dict[int, tuple[int | None, int]] = field(default_factory=dict)  # entry -> (origin, t_ns)
    _bar0_sizing: bool = False

    def __post_init__(self) -> None:
        self.table = [VEntry() for _ in range(self.msix_size)]

    # -- config space ----------------------------------------------------------

    def cfg_read(self, reg: int) -> int:
        reg &= 0xFFC
        if reg >= len(self.config):
            return 0
        if reg == R.PCI_VENDOR_ID:
            return self.vendor | self.device << 16
        if reg == R.PCI_COMMAND:
            status = int.from_bytes(self.config[6:8], "little")
            return self.command | status << 16
        if reg == R.PCI_BASE_ADDRESS_0:
            return (~(self.bar0_size - 1) & 0xFFFF_FFFF) if self._bar0_sizing else self.bar0_gpa
        if R.PCI_BASE_ADDRESS_0 < reg <= R.PCI_BASE_ADDRESS_0 + 20:
            return 0
        if reg == self.msix_pos:
            dw = int.from_bytes(self.config[reg:reg + 4], "little")
            ctrl = (dw >> 16) & R.PCI_MSIX_FLAGS_QSIZE
            ctrl |= R.PCI_MSIX_FLAGS_ENABLE if self.msix_enable else 0
            ctrl |= R.PCI_MSIX_FLAGS_MASKALL if self.msix_maskall else 0
            return (dw & 0xFFFF) | ctrl << 16
        return int.from_bytes(self.config[reg:reg + 4], "little")

    def cfg_write(self, reg: int, value: int, be: int) -> list[tuple]:
        """Apply a guest config write; returns actions for the VMM."""
        reg &= 0xFFC
        old = self.cfg_read(reg)
        mask = 0
        for i in range(4):
            if be >> i & 1:
                mask |= 0xFF << (8 * i)
        new = (old & ~mask) | (value & mask)
        actions: list[tuple] = []
        if reg == R.PCI_COMMAND:
            self.command = new & (R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE)
        elif reg == R.PCI_BASE_ADDRESS_0:
            if new & 0xFFFF_FFF0 == 0xFFFF_FFF0:
                self._bar0_sizing = True
            else:
                self._bar0_sizing = False
                gpa = new & ~(self.bar0_size - 1) & 0xFFFF_FFF0
                if gpa != self.bar0_gpa:
                    actions.append(("bar0", self.bar0_gpa, gpa))
                    self.bar0_gpa = gpa
        elif reg == self.msix_pos and be & 0xC:
            ctrl = new >> 16
            enable, maskall = bool(ctrl & R.PCI_MSIX_FLAGS_ENABLE), bool(ctrl & R.PCI_MSIX_FLAGS_MASKALL)
            if enable != self.msix_enable or maskall != self.msix_maskall:
                self.msix_enable, self.msix_maskall = enable, maskall
                actions.append(("msix_ctrl", enable, maskall))
                actions += self._replay()
        return actions

    # -- the trapped MSI-X table and PBA --------------------------------------

    def mmio_write(self, offset: int, data: bytes) -> list[tuple]:
        """A guest store into BAR0's trapped pages (offset within BAR0)."""
        actions: list[tuple] = []
        if not MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + 16 * self.msix_size:
            return actions  # PBA is read-only; anything else in the trapped pages is ignored
        for i in range(0, len(data) - len(data) % 4, 4):
            off = offset + i - MSIX_TABLE_OFFSET
            idx, field_ = divmod(off, 16)
            if idx >= self.msix_size:
                break
            (v,) = struct.unpack_from("<I", data, i)
            e = self.table[idx]
            if field_ == 0:
                e.addr_lo = v
            elif field_ == 4:
                e.addr_hi = v
            elif field_ == 8:
                e.data = v
            else:
                e.ctrl = v & 1
            actions.append(("entry", idx))
        actions += self._replay()
        return actions

    def mmio_read(self, offset: int, size: int) -> bytes:
        out = bytearray()
        for off in range(offset & ~3, offset + size, 4):
            if MSIX_TABLE_OFFSET <= off < MSIX_TABLE_OFFSET + 16 * self.msix_size:
                idx, f = divmod(off - MSIX_TABLE_OFFSET, 16)
                e = self.table[idx]
                v = (e.addr_lo, e.addr_hi, e.data, e.ctrl)[f // 4]
            elif MSIX_PBA_OFFSET <= off < MSIX_PBA_OFFSET + 8 * ((self.msix_size + 63) // 64):
                bit0 = (off - MSIX_PBA_OFFSET) * 8
                v = sum(1 << (b - bit0) for b in self.pending if bit0 <= b < bit0 + 32)
            else:
                v = 0
            out += struct.pack("<I", v)
        lead = offset & 3
        return bytes(out[lead:lead + size])

    # -- forwarding ----------------------------------------------------------

    def deliverable(self, idx: int) -> tuple[int, int] | None:
        """Where a real interrupt of entry ``idx`` goes in the guest now, or None (then pending)."""
        if not self.msix_enable or self.msix_maskall:
            return None
        e = self.table[idx]
        return None if e.masked else e.target()

    def _replay(self) -> list[tuple]:
        """Entries pending while masked fire once deliverable (MSI-X semantics, virtualized)."""
        out = []
        for idx in sorted(self.pending):
            if self.deliverable(idx) is not None:
                origin, t_ns = self.pending.pop(idx)
                out.append(("fire", idx, origin, t_ns))
        return out

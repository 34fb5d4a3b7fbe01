"""The virtual device a VMM builds for an ADI (Scalable IOV), as a pure model.

An ADI has no config space of its own: it is a slice of its PF (a work-queue
portal and some IMS slots) told apart by PASID.  To give it to a guest the VMM
composes a whole virtual PCI function around it (vfio-mdev / Intel's "VDCM"):

- **Config space**, made up: vendor 1b36, device 11a3 ("irqlab ADI"), a PCI Express
  capability, and the Intel SIOV DVSEC whose Capabilities bit 0 says "IMS
  supported" — unless the VMM *mangles* it (Intel's path: hide IMS from the guest
  and emulate MSI-X instead), in which case the bit reads 0 and an MSI-X
  capability with one vector appears.
- **BAR0** (16 KiB, virtual): page 0 is the ADI's real portal page (pass-through in
  the EPT); page 1 is the ADI's device-kind IMS slots, *trapped* when the VMM
  emulates IMS for this device (case 4) and not mapped at all otherwise; pages 2-3
  hold the emulated MSI-X table and PBA (mangle only; no hardware behind them).

Memory-kind IMS slots live in the guest's own RAM and are nobody's to trap.
The model returns actions for the VMM, like ``host.vfio.VirtualFunction``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from guest.pci import regs as R
from host.vfio import VEntry

PAGE = 0x1000
BAR0_SIZE = 0x4000
IMS_PAGE = 0x1000
MSIX_TABLE = 0x2000
MSIX_PBA = 0x3000
ADI_DEVICE_ID = 0x11A3
VENDOR = 0x1B36
PCIE_POS = 0x40
MSIX_POS = 0x7C
DVSEC_POS = 0x100
DVSEC_LEN = 0x18


@dataclass
class VSlot:
    addr_lo: int = 0
    addr_hi: int = 0
    data: int = 0
    ctrl: int = 1          # masked at reset

    def fields(self) -> tuple[int, int, int, int]:
        return self.addr_lo, self.addr_hi, self.data, self.ctrl


@dataclass
class VirtualAdi:
    """What the guest sees of one assigned ADI."""

    pf_rid: int
    adi: int
    guest_rid: int
    pasid: int
    portal_hpa: int             # the ADI's real portal page 0 (page 1 = its IMS slots)
    ims_slots: int
    mangle: bool = False
    emulate_ims: bool = True
    tags_pasid: bool = True     # the device tags this ADI's interrupt messages with its PASID
    bar0_gpa: int = 0
    command: int = 0
    msix_enable: bool = False
    msix_maskall: bool = False
    slots: list[VSlot] = field(default_factory=list)
    table: list[VEntry] = field(default_factory=list)
    pending: dict[int, tuple[int | None, int]] = field(default_factory=dict)
    real_handles: dict[int, int] = field(default_factory=dict)   # real slot -> the fake handle it holds
    _sizing: bool = False
    config: bytearray = field(default_factory=lambda: bytearray(4096))

    def __post_init__(self) -> None:
        self.slots = [VSlot() for _ in range(self.ims_slots)]
        self.table = [VEntry()] if self.mangle else []
        c = self.config
        struct.pack_into("<HH", c, 0, VENDOR, ADI_DEVICE_ID)
        struct.pack_into("<H", c, 6, R.PCI_STATUS_CAP_LIST)
        struct.pack_into("<I", c, 8, 0x0880_0001)         # class 0x088000, revision 1
        c[R.PCI_CAPABILITY_LIST] = PCIE_POS
        # PCI Express capability v2, endpoint; next -> MSI-X when mangled
        struct.pack_into("<BBH", c, PCIE_POS, R.PCI_CAP_ID_EXP, MSIX_POS if self.mangle else 0, 0x0002)
        if self.mangle:
            # MSI-X: one vector, table in BAR0 at 0x2000, PBA at 0x3000
            struct.pack_into("<BBHII", c, MSIX_POS, R.PCI_CAP_ID_MSIX, 0, 0, MSIX_TABLE, MSIX_PBA)
        # Intel SIOV DVSEC (ext cap 0x23): vendor 8086, length 0x18, ID 5, IMS bit (unless mangled)
        struct.pack_into("<I", c, DVSEC_POS, R.PCI_EXT_CAP_ID_DVSEC | 1 << 16)
        struct.pack_into("<I", c, DVSEC_POS + R.PCI_DVSEC_HEADER1, R.PCI_VENDOR_ID_INTEL | DVSEC_LEN << 20)
        struct.pack_into("<H", c, DVSEC_POS + R.PCI_DVSEC_HEADER2, R.PCI_DVSEC_ID_INTEL_SIOV)
        struct.pack_into("<I", c, DVSEC_POS + R.PCI_DVSEC_INTEL_SIOV_CAP,
                         0 if self.mangle else R.PCI_DVSEC_INTEL_SIOV_CAP_IMS)

    @property
    def ims_page_kind(self) -> str | None:
        """How the EPT maps BAR0 page 1: trapped (IMS emulation) or not at all."""
        return "trap" if self.emulate_ims and not self.mangle and self.ims_slots else None

    # -- config space ----------------------------------------------------------

    def cfg_read(self, reg: int) -> int:
        reg &= 0xFFC
        if reg == R.PCI_COMMAND:
            return self.command | int.from_bytes(self.config[6:8], "little") << 16
        if reg == R.PCI_BASE_ADDRESS_0:
            return (~(BAR0_SIZE - 1) & 0xFFFF_FFFF) if self._sizing else self.bar0_gpa
        if R.PCI_BASE_ADDRESS_0 < reg <= R.PCI_BASE_ADDRESS_0 + 20:
            return 0
        if self.mangle and reg == MSIX_POS:
            ctrl = (R.PCI_MSIX_FLAGS_ENABLE if self.msix_enable else 0) | \
                   (R.PCI_MSIX_FLAGS_MASKALL if self.msix_maskall else 0)
            return R.PCI_CAP_ID_MSIX | ctrl << 16
        return int.from_bytes(self.config[reg:reg + 4], "little")

    def cfg_write(self, reg: int, value: int, be: int) -> list[tuple]:
        reg &= 0xFFC
        old = self.cfg_read(reg)
        mask = sum(0xFF << (8 * i) for i in range(4) if be >> i & 1)
        new = (old & ~mask) | (value & mask)
        actions: list[tuple] = []
        if reg == R.PCI_COMMAND:
            self.command = new & (R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE)
        elif reg == R.PCI_BASE_ADDRESS_0:
            if new & 0xFFFF_FFF0 == 0xFFFF_FFF0:
                self._sizing = True
            else:
                self._sizing = False
                gpa = new & ~(BAR0_SIZE - 1) & 0xFFFF_FFF0
                if gpa != self.bar0_gpa:
                    actions.append(("bar0", self.bar0_gpa, gpa))
                    self.bar0_gpa = gpa
        elif self.mangle and reg == MSIX_POS and be & 0xC:
            ctrl = new >> 16
            enable, maskall = bool(ctrl & R.PCI_MSIX_FLAGS_ENABLE), bool(ctrl & R.PCI_MSIX_FLAGS_MASKALL)
            if (enable, maskall) != (self.msix_enable, self.msix_maskall):
                self.msix_enable, self.msix_maskall = enable, maskall
                actions.append(("msix_ctrl", enable, maskall))
                actions += self._replay()
        return actions

    # -- trapped BAR0 pages ------------------------------------------------------

    def mmio_write(self, offset: int, data: bytes) -> list[tuple]:
        actions: list[tuple] = []
        for i in range(0, len(data) - len(data) % 4, 4):
            off = offset + i
            (v,) = struct.unpack_from("<I", data, i)
            if IMS_PAGE <= off < IMS_PAGE + 16 * len(self.slots):
                idx, f = divmod(off - IMS_PAGE, 16)
                s = self.slots[idx]
                if f == 0:
                    s.addr_lo = v
                elif f == 4:
                    s.addr_hi = v
                elif f == 8:
                    s.data = v
                else:
                    s.ctrl = v
                if ("ims_slot", idx) not in actions:
                    actions.append(("ims_slot", idx))
            elif self.mangle and MSIX_TABLE <= off < MSIX_TABLE + 16 * len(self.table):
                idx, f = divmod(off - MSIX_TABLE, 16)
                e = self.table[idx]
                if f == 0:
                    e.addr_lo = v
                elif f == 4:
                    e.addr_hi = v
                elif f == 8:
                    e.data = v
                else:
                    e.ctrl = v & 1
                if ("entry", idx) not in actions:
                    actions.append(("entry", idx))
        if self.mangle:
            actions += self._replay()
        return actions

    def mmio_read(self, offset: int, size: int) -> bytes:
        out = bytearray()
        for off in range(offset & ~3, offset + size, 4):
            v = 0
            if IMS_PAGE <= off < IMS_PAGE + 16 * len(self.slots):
                idx, f = divmod(off - IMS_PAGE, 16)
                v = self.slots[idx].fields()[f // 4]
            elif self.mangle and MSIX_TABLE <= off < MSIX_TABLE + 16 * len(self.table):
                idx, f = divmod(off - MSIX_TABLE, 16)
                e = self.table[idx]
                v = (e.addr_lo, e.addr_hi, e.data, e.ctrl)[f // 4]
            elif self.mangle and off == MSIX_PBA:
                v = sum(1 << i for i in self.pending)
            out += struct.pack("<I", v)
        lead = offset & 3
        return bytes(out[lead:lead + size])

    # -- emulated MSI-X (mangle) -------------------------------------------------

    def deliverable(self, idx: int) -> tuple[int, int] | None:
        if not self.mangle or not self.msix_enable or self.msix_maskall:
            return None
        e = self.table[idx]
        return None if e.masked else e.target()

    def _replay(self) -> list[tuple]:
        out = []
        for idx in sorted(self.pending):
            if self.deliverable(idx) is not None:
                origin, t_ns = self.pending.pop(idx)
                out.append(("fire", idx, origin, t_ns))
        return out

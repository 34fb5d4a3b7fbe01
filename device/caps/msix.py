"""MSI-X Capability (PCI LB 3.0 6.8.2; Linux PCI_MSIX_*).

Layout (12 bytes)::

     31  30  29         16 15             8 7              0
    +---+---+-------------+----------------+----------------+
    |En |FM | Table Size  |  Next Pointer  |  Cap ID 0x11   | +0x00  Message Control = bits 31:16
    +---+---+-------------+----------------+----------+-----+
    |            Table Offset (8-byte aligned)        | BIR | +0x04
    +-------------------------------------------------+-----+
    |            PBA Offset (8-byte aligned)          | BIR | +0x08
    +-------------------------------------------------+-----+

    Message Control: bits 10:0 Table Size = N-1 (RO), bit14 Function Mask (RW),
                     bit15 MSI-X Enable (RW).  BIR (bits 2:0) = BAR index.

The table and the PBA themselves live in a BAR (see ``device.msix``).  This
structure only holds the control bits; a write that changes Enable or Function
Mask calls ``on_control(enabled, function_mask)``, whose return value (MSI-X
messages replayed from the PBA) becomes the output of the CfgWr.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from device.caps.common import PciCap, PciCapId

PCI_MSIX_FLAGS = 0x02
PCI_MSIX_TABLE = 0x04
PCI_MSIX_PBA = 0x08
PCI_CAP_MSIX_SIZEOF = 0x0C

PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE_BIR = 0x00000007
PCI_MSIX_TABLE_OFFSET = 0xFFFFFFF8

MsixControlHook = Callable[[bool, bool], "Iterable[Any] | None"]


class MsixCap(PciCap):
    """The 12-byte MSI-X capability: table size, control bits, table/PBA locators."""

    cap_id = PciCapId.MSIX
    length = PCI_CAP_MSIX_SIZEOF

    def __init__(
        self,
        table_size: int,
        *,
        table_bir: int = 0,
        table_offset: int = 0,
        pba_bir: int = 0,
        pba_offset: int = 0,
        on_control: MsixControlHook | None = None,
    ) -> None:
        if not 1 <= table_size <= 2048:
            raise ValueError(f"MSI-X table size {table_size} outside 1..2048")
        if table_offset & 7 or pba_offset & 7:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.table_size = table_size
        self.table_bir, self.table_offset = table_bir, table_offset
        self.pba_bir, self.pba_offset = pba_bir, pba_offset
        self.on_control = on_control

    def init_registers(self) -> None:
        c, o = self.cfg, self.offset
        c.set16(o + PCI_MSIX_FLAGS, self.table_size - 1)
        c.set_wmask(o + PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE, 2)
        c.set32(o + PCI_MSIX_TABLE, self.table_offset | self.table_bir)
        c.set32(o + PCI_MSIX_PBA, self.pba_offset | self.pba_bir)
        c.add_hook(o + PCI_MSIX_FLAGS, 2, self._control_written)

    @property
    def message_control(self) -> int:
        return self.cfg.get16(self.offset + PCI_MSIX_FLAGS)

    @property
    def enabled(self) -> bool:
        return bool(self.message_control & PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_mask(self) -> bool:
        return bool(self.message_control & PCI_MSIX_FLAGS_MASKALL)

    def _control_written(self, reg: int, old: int, new: int) -> "Iterable[Any] | None":
        changed = (old ^ new) >> 16 & (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        if not changed or self.on_control is None:
            return None
        ctl = new >> 16
        return self.on_control(bool(ctl & PCI_MSIX_FLAGS_ENABLE), bool(ctl & PCI_MSIX_FLAGS_MASKALL))

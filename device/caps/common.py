"""Capability IDs and base classes (PCI LB 3.0 6.7, PCIe Base 7.6 / 7.9).

Standard capability header (in 0x40-0xFF)::

     15            8 7             0
    +---------------+---------------+
    |  Next Pointer |    Cap ID     |   cap+0  (cap-specific 16 bits follow at cap+2)
    +---------------+---------------+

Extended capability header (in 0x100-0xFFF)::

     31          20 19    16 15                     0
    +--------------+--------+------------------------+
    | Next Offset  | Version |   Extended Cap ID      |   cap+0
    +--------------+--------+------------------------+

``ConfigSpace.add_capability`` / ``add_ext_capability`` write the header and
link it; the capability's ``init_registers`` writes the rest (values, masks,
hooks).  Offsets are byte offsets (cocotbext counts DWs; we do not).
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from device.config import ConfigSpace


class PciCapId(IntEnum):
    """Standard capability IDs (Linux PCI_CAP_ID_*)."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    SLOTID = 0x04
    MSI = 0x05
    CHSWP = 0x06
    PCIX = 0x07
    HT = 0x08
    VNDR = 0x09
    DBG = 0x0A
    CCRC = 0x0B
    SHPC = 0x0C
    SSVID = 0x0D
    AGP3 = 0x0E
    SECDEV = 0x0F
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EA = 0x14
    FPB = 0x15


class PciExtCapId(IntEnum):
    """Extended capability IDs (Linux PCI_EXT_CAP_ID_*)."""

    ERR = 0x01
    VC = 0x02
    DSN = 0x03
    PWR = 0x04
    RCLD = 0x05
    RCILC = 0x06
    RCEC = 0x07
    MFVC = 0x08
    VC9 = 0x09
    RCRB = 0x0A
    VNDR = 0x0B
    CAC = 0x0C
    ACS = 0x0D
    ARI = 0x0E
    ATS = 0x0F
    SRIOV = 0x10
    MRIOV = 0x11
    MCAST = 0x12
    PRI = 0x13
    REBAR = 0x15
    DPA = 0x16
    TPH = 0x17
    LTR = 0x18
    SECPCI = 0x19
    PMUX = 0x1A
    PASID = 0x1B
    DPC = 0x1D
    L1SS = 0x1E
    PTM = 0x1F
    DVSEC = 0x23


class PciCap:
    """A structure in the standard capability list."""

    cap_id: ClassVar[int]
    length: ClassVar[int]

    offset: int
    cfg: "ConfigSpace"

    def install(self, cfg: "ConfigSpace", offset: int) -> None:
        self.cfg = cfg
        self.offset = offset
        self.init_registers()

    def init_registers(self) -> None:
        """Write register values and masks below ``self.offset``; register hooks."""


class PciExtCap(PciCap):
    """A structure in the extended capability list."""

    version: ClassVar[int] = 1

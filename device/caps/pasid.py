"""PASID extended capability (PCIe Base 7.8.8; Linux PCI_PASID_*).

Layout (8 bytes, capability version 1)::

     31          20 19    16 15                                   0
    +--------------+--------+--------------------------------------+
    | Next Offset  | Ver 1  |       Extended Cap ID 0x001B         | +0x00
    +--------------+--------+-------------------+------------------+
    |        PASID Control (16)                 | PASID Capability | +0x04
    +-------------------------------------------+------------------+

    PASID Capability (+0x04, RO)              PASID Control (+0x06)
     15    13 12        8 7   3  2   1  0        15        3  2   1   0
    +--------+-----------+-----+---+---+-+      +-----------+---+---+---+
    |   0    | Max PASID |  0  |PMS|EPS|0|      |     0     |PME|EPE|En |
    |        |  Width    |     |   |   | |      |           |   |   |   |
    +--------+-----------+-----+---+---+-+      +-----------+---+---+---+
      EPS  Execute Permission Supported         En   PASID Enable (RW)
      PMS  Privileged Mode Supported            EPE  Execute Permission Enable
      Max PASID Width: 0..20, the function        (RW only if EPS, else RO 0)
      uses PASIDs below 1 << width              PME  Privileged Mode Enable
                                                  (RW only if PMS, else RO 0)

(reference/pcie-tlp-config-siov.md §4.5: PCI_PASID_CAP 0x04, PCI_PASID_CTRL
0x06, PCI_PASID_CAP_EXEC 0x02, PCI_PASID_CAP_PRIV 0x04, width mask 0x1F00,
PCI_PASID_CTRL_ENABLE 0x01, _EXEC 0x02, _PRIV 0x04.)

A function may put a PASID TLP prefix on a request only while PASID Enable is
set (and the ER / PMR bits only with the matching enables, PCIe 6.20.2); the
device models read ``enabled`` at the moment they build each TLP.  Reset (FLR)
clears the Control register with the rest of config space.
"""

from __future__ import annotations

from device.caps.common import PciExtCap, PciExtCapId

PCI_PASID_CAP = 0x04
PCI_PASID_CTRL = 0x06
PCI_EXT_CAP_PASID_SIZEOF = 0x08

PCI_PASID_CAP_EXEC = 0x0002
PCI_PASID_CAP_PRIV = 0x0004
PCI_PASID_CAP_WIDTH = 0x1F00
PCI_PASID_CAP_WIDTH_SHIFT = 8
PCI_PASID_CTRL_ENABLE = 0x0001
PCI_PASID_CTRL_EXEC = 0x0002
PCI_PASID_CTRL_PRIV = 0x0004

PASID_MAX_WIDTH = 20


class PasidCap(PciExtCap):
    """The PASID capability: what the function can tag, and whether software lets it."""

    cap_id = PciExtCapId.PASID
    version = 1
    length = PCI_EXT_CAP_PASID_SIZEOF

    def __init__(self, *, max_pasid_width: int = PASID_MAX_WIDTH, exec_supported: bool = False,
                 privileged_supported: bool = False) -> None:
        if not 0 <= max_pasid_width <= PASID_MAX_WIDTH:
            raise ValueError(f"Max PASID Width {max_pasid_width} outside 0..{PASID_MAX_WIDTH}")
        self.max_pasid_width = max_pasid_width
        self.exec_supported = exec_supported
        self.privileged_supported = privileged_supported

    def init_registers(self) -> None:
        c, o = self.cfg, self.offset
        c.set16(o + PCI_PASID_CAP,
                self.max_pasid_width << PCI_PASID_CAP_WIDTH_SHIFT
                | (PCI_PASID_CAP_EXEC if self.exec_supported else 0)
                | (PCI_PASID_CAP_PRIV if self.privileged_supported else 0))
        c.set16(o + PCI_PASID_CTRL, 0)
        c.set_wmask(o + PCI_PASID_CTRL,
                    PCI_PASID_CTRL_ENABLE
                    | (PCI_PASID_CTRL_EXEC if self.exec_supported else 0)
                    | (PCI_PASID_CTRL_PRIV if self.privileged_supported else 0), 2)

    @property
    def control(self) -> int:
        return self.cfg.get16(self.offset + PCI_PASID_CTRL)

    @property
    def enabled(self) -> bool:
        """PASID Enable: the function may send PASID TLP prefixes."""
        return bool(self.cfg.data[self.offset + PCI_PASID_CTRL] & PCI_PASID_CTRL_ENABLE)

    @property
    def max_pasids(self) -> int:
        """How many PASIDs the function supports (Linux ``pci_max_pasids``)."""
        return 1 << self.max_pasid_width

"""PCI Express Capability, version 2, endpoint (PCIe Base 7.5.3; Linux PCI_EXP_*).

Layout (0x3C bytes, QEMU's PCI_EXP_VER2_SIZEOF)::

     31                            16 15             8 7              0
    +--------------------------------+----------------+----------------+
    |  PCIe Capabilities (ver 2,     |  Next Pointer  |  Cap ID 0x10   | +0x00
    |  type 0 = endpoint)            |                |                |
    +--------------------------------+----------------+----------------+
    |                 Device Capabilities (bit28 FLR capable)          | +0x04
    +--------------------------------+---------------------------------+
    |  Device Status (bits3:0 RW1C)  |  Device Control (bit15 Init FLR)| +0x08
    +--------------------------------+---------------------------------+
    |                 Link Capabilities (2.5 GT/s, x1)                 | +0x0C
    +--------------------------------+---------------------------------+
    |  Link Status                   |  Link Control                   | +0x10
    +--------------------------------+---------------------------------+
    |  Slot Capabilities / Control / Status, Root Control / Status     | +0x14-0x23
    |  (not implemented by an endpoint: read 0)                        |
    +------------------------------------------------------------------+
    |                 Device Capabilities 2                            | +0x24
    +--------------------------------+---------------------------------+
    |  Device Status 2               |  Device Control 2               | +0x28
    +--------------------------------+---------------------------------+
    |                 Link Capabilities 2 (speed vector: 2.5 GT/s)     | +0x2C
    +--------------------------------+---------------------------------+
    |  Link Status 2                 |  Link Control 2                 | +0x30
    +--------------------------------+---------------------------------+
    |  Slot Capabilities 2 / Control 2 / Status 2 (read 0)             | +0x34-0x3B
    +------------------------------------------------------------------+

Device Control: bits3:0 error reporting enables, bit4 Relaxed Ordering, bits7:5
Max_Payload_Size, bit11 No Snoop, bits14:12 Max_Read_Request_Size are RW;
**bit15 Initiate Function Level Reset** always reads 0, and writing 1 calls
``on_flr`` (the function then returns to its power-on state, PCIe Base 6.6.2).
"""

from __future__ import annotations

from typing import Callable

from device.caps.common import PciCap, PciCapId

PCI_EXP_FLAGS = 0x02
PCI_EXP_DEVCAP = 0x04
PCI_EXP_DEVCTL = 0x08
PCI_EXP_DEVSTA = 0x0A
PCI_EXP_LNKCAP = 0x0C
PCI_EXP_LNKCTL = 0x10
PCI_EXP_LNKSTA = 0x12
PCI_EXP_DEVCAP2 = 0x24
PCI_EXP_DEVCTL2 = 0x28
PCI_EXP_LNKCAP2 = 0x2C
PCI_EXP_LNKCTL2 = 0x30
PCI_EXP_LNKSTA2 = 0x32
PCI_EXP_VER2_SIZEOF = 0x3C

PCI_EXP_FLAGS_VERS_2 = 0x0002
PCI_EXP_TYPE_ENDPOINT = 0x0

PCI_EXP_DEVCAP_PAYLOAD_256B = 0x1
PCI_EXP_DEVCAP_RBER = 0x00008000
PCI_EXP_DEVCAP_FLR = 0x10000000

PCI_EXP_DEVCTL_ERR_ENABLES = 0x000F
PCI_EXP_DEVCTL_RELAX_EN = 0x0010
PCI_EXP_DEVCTL_PAYLOAD = 0x00E0
PCI_EXP_DEVCTL_NOSNOOP_EN = 0x0800
PCI_EXP_DEVCTL_READRQ = 0x7000
PCI_EXP_DEVCTL_READRQ_512B = 0x2000
PCI_EXP_DEVCTL_BCR_FLR = 0x8000

PCI_EXP_DEVSTA_ERRORS = 0x000F  # CED NFED FED URD, RW1C

PCI_EXP_LNKCAP_SLS_2_5GB = 0x1
PCI_EXP_LNKCAP_MLW_X1 = 0x1 << 4
PCI_EXP_LNKCTL_RW = 0x00C3  # ASPM control, common clock, extended synch
PCI_EXP_LNKSTA_CLS_2_5GB = 0x1
PCI_EXP_LNKSTA_NLW_X1 = 0x1 << 4
PCI_EXP_DEVCAP2_COMP_TMOUT_DIS = 0x10
PCI_EXP_DEVCTL2_RW = 0x001F  # completion timeout value + disable
PCI_EXP_LNKCAP2_SLS_2_5GB = 0x02
PCI_EXP_LNKCTL2_TLS = 0x000F
PCI_EXP_LNKCTL2_TLS_2_5GT = 0x0001


class PcieCap(PciCap):
    """PCI Express Capability v2 of an endpoint, with FLR."""

    cap_id = PciCapId.EXP
    length = PCI_EXP_VER2_SIZEOF

    def __init__(self, *, flr_capable: bool = True, on_flr: Callable[[], None] | None = None) -> None:
        self.flr_capable = flr_capable
        self.on_flr = on_flr

    def init_registers(self) -> None:
        c, o = self.cfg, self.offset
        c.set16(o + PCI_EXP_FLAGS, PCI_EXP_FLAGS_VERS_2 | PCI_EXP_TYPE_ENDPOINT << 4)
        c.set32(
            o + PCI_EXP_DEVCAP,
            PCI_EXP_DEVCAP_PAYLOAD_256B | PCI_EXP_DEVCAP_RBER | (PCI_EXP_DEVCAP_FLR if self.flr_capable else 0),
        )
        c.set16(o + PCI_EXP_DEVCTL, PCI_EXP_DEVCTL_RELAX_EN | PCI_EXP_DEVCTL_NOSNOOP_EN | PCI_EXP_DEVCTL_READRQ_512B)
        devctl_wmask = (
            PCI_EXP_DEVCTL_ERR_ENABLES | PCI_EXP_DEVCTL_RELAX_EN | PCI_EXP_DEVCTL_PAYLOAD
            | PCI_EXP_DEVCTL_NOSNOOP_EN | PCI_EXP_DEVCTL_READRQ
        )
        if self.flr_capable:
            devctl_wmask |= PCI_EXP_DEVCTL_BCR_FLR  # lands, then the hook clears it
        c.set_wmask(o + PCI_EXP_DEVCTL, devctl_wmask, 2)
        c.set_w1cmask(o + PCI_EXP_DEVSTA, PCI_EXP_DEVSTA_ERRORS, 2)
        c.set32(o + PCI_EXP_LNKCAP, PCI_EXP_LNKCAP_SLS_2_5GB | PCI_EXP_LNKCAP_MLW_X1)
        c.set_wmask(o + PCI_EXP_LNKCTL, PCI_EXP_LNKCTL_RW, 2)
        c.set16(o + PCI_EXP_LNKSTA, PCI_EXP_LNKSTA_CLS_2_5GB | PCI_EXP_LNKSTA_NLW_X1)
        c.set32(o + PCI_EXP_DEVCAP2, PCI_EXP_DEVCAP2_COMP_TMOUT_DIS)
        c.set_wmask(o + PCI_EXP_DEVCTL2, PCI_EXP_DEVCTL2_RW, 2)
        c.set32(o + PCI_EXP_LNKCAP2, PCI_EXP_LNKCAP2_SLS_2_5GB)
        c.set16(o + PCI_EXP_LNKCTL2, PCI_EXP_LNKCTL2_TLS_2_5GT)
        c.set_wmask(o + PCI_EXP_LNKCTL2, PCI_EXP_LNKCTL2_TLS, 2)
        c.add_hook(o + PCI_EXP_DEVCTL, 2, self._devctl_written)

    def _devctl_written(self, reg: int, old: int, new: int) -> None:
        if new & PCI_EXP_DEVCTL_BCR_FLR:
            # Initiate FLR reads as 0; the write completes, then the function resets.
            self.cfg.set16(self.offset + PCI_EXP_DEVCTL, new & ~PCI_EXP_DEVCTL_BCR_FLR)
            if self.on_flr is not None:
                self.on_flr()

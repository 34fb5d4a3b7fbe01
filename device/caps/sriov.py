"""Single Root I/O Virtualization extended capability (SR-IOV 1.1 3.3; Linux PCI_SRIOV_*).

Layout (0x40 bytes)::

     31                            16 15                             0
    +--------------------------------+--------------------------------+
    | Next [31:20] | Ver [19:16]     |   Extended Cap ID 0x0010       | +0x00
    +--------------------------------+--------------------------------+
    |            SR-IOV Capabilities (VF Migration: not capable)      | +0x04
    +--------------------------------+--------------------------------+
    |  SR-IOV Status                 |  SR-IOV Control                | +0x08
    +--------------------------------+--------------------------------+
    |  TotalVFs (RO)                 |  InitialVFs (RO)               | +0x0C
    +----------------+---------------+--------------------------------+
    |   Reserved     | Func Dep Link |  NumVFs (RW)                   | +0x10
    +----------------+---------------+--------------------------------+
    |  VF Stride (RO)                |  First VF Offset (RO)          | +0x14
    +--------------------------------+--------------------------------+
    |  VF Device ID (RO)             |  Reserved                      | +0x18
    +--------------------------------+--------------------------------+
    |            Supported Page Sizes (RO; bit n => 2^(n+12) bytes)   | +0x1C
    |            System Page Size (RW; one bit)                       | +0x20
    |            VF BAR0 .. VF BAR5 (BAR encoding, size = one VF's)   | +0x24-0x38
    |            VF Migration State Array Offset (0: none)            | +0x3C
    +-----------------------------------------------------------------+

    SR-IOV Control: bit0 VF Enable, bit1 VF Migration Enable (RO 0), bit2 VF
    Migration Interrupt Enable (RO 0), bit3 VF Memory Space Enable (VF MSE),
    bit4 ARI Capable Hierarchy.

VF routing IDs (SR-IOV 3.3.10/11, Linux ``pci_iov_virtfn_bus/devfn``), 0-based
VF index ``i``, 16-bit arithmetic (may carry into the bus number)::

    rid(i) = (PF RID + First VF Offset + i * VF Stride) & 0xFFFF

VF BARs (3.3.14): VF ``i``'s BAR n starts at ``VF BARn + i * size``, where size
(what the all-ones sizing read reports) is one VF's BAR size rounded up to the
System Page Size.

Theory of operation
-------------------
* NumVFs and System Page Size are writable only while VF Enable is clear (the
  spec leaves changes while enabled undefined; we lock them).  A NumVFs value
  above TotalVFs and a System Page Size that is not exactly one supported bit
  are refused (the register keeps its previous value).
* Any change of VF Enable or VF MSE calls ``on_change()``; the device then
  reconciles its VF set (VF Enable 0->1 creates NumVFs VFs, 1->0 destroys
  them) and its address decode.
"""

from __future__ import annotations

from typing import Callable

from device.caps.common import PciExtCap, PciExtCapId

PCI_SRIOV_CAP = 0x04
PCI_SRIOV_CTRL = 0x08
PCI_SRIOV_STATUS = 0x0A
PCI_SRIOV_INITIAL_VF = 0x0C
PCI_SRIOV_TOTAL_VF = 0x0E
PCI_SRIOV_NUM_VF = 0x10
PCI_SRIOV_FUNC_LINK = 0x12
PCI_SRIOV_VF_OFFSET = 0x14
PCI_SRIOV_VF_STRIDE = 0x16
PCI_SRIOV_VF_DID = 0x1A
PCI_SRIOV_SUP_PGSIZE = 0x1C
PCI_SRIOV_SYS_PGSIZE = 0x20
PCI_SRIOV_BAR = 0x24
PCI_SRIOV_NUM_BARS = 6
PCI_SRIOV_VFM = 0x3C
PCI_EXT_CAP_SRIOV_SIZEOF = 0x40

PCI_SRIOV_CTRL_VFE = 0x01
PCI_SRIOV_CTRL_VFM = 0x02
PCI_SRIOV_CTRL_INTR = 0x04
PCI_SRIOV_CTRL_MSE = 0x08
PCI_SRIOV_CTRL_ARI = 0x10

# 4K, 8K, 64K, 256K, 1M, 4M: what Linux expects a PF to offer (page_size must include 4K).
DEFAULT_SUPPORTED_PAGE_SIZES = 0x553


class SriovCap(PciExtCap):
    """The PF's SR-IOV capability: VF count, RID arithmetic, VF BARs, VF Enable / VF MSE."""

    cap_id = PciExtCapId.SRIOV
    version = 1
    length = PCI_EXT_CAP_SRIOV_SIZEOF

    def __init__(
        self,
        *,
        total_vfs: int,
        vf_device_id: int,
        first_vf_offset: int = 1,
        vf_stride: int = 1,
        initial_vfs: int | None = None,
        vf_bars: dict[int, int] | None = None,
        vf_bars_64bit: bool = False,
        supported_page_sizes: int = DEFAULT_SUPPORTED_PAGE_SIZES,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if not 0 <= total_vfs <= 0xFFFF:
            raise ValueError("TotalVFs must fit in 16 bits")
        if total_vfs > 1 and vf_stride == 0:
            raise ValueError("VF Stride 0 with more than one VF")
        if not supported_page_sizes & 1:
            raise ValueError("Supported Page Sizes must include 4 KiB")
        self.total_vfs = total_vfs
        self.initial_vfs = total_vfs if initial_vfs is None else initial_vfs
        self.vf_device_id = vf_device_id
        self.first_vf_offset = first_vf_offset & 0xFFFF
        self.vf_stride = vf_stride & 0xFFFF
        self.vf_bars = dict(vf_bars or {})  # VF BAR index -> one VF's size (before page rounding)
        self.vf_bars_64bit = vf_bars_64bit
        self.supported_page_sizes = supported_page_sizes
        self.on_change = on_change

    # ---- registers -------------------------------------------------------------------------------

    def init_registers(self) -> None:
        c, o = self.cfg, self.offset
        c.set32(o + PCI_SRIOV_CAP, 0)
        c.set_wmask(o + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE | PCI_SRIOV_CTRL_ARI, 2)
        c.set16(o + PCI_SRIOV_INITIAL_VF, self.initial_vfs)
        c.set16(o + PCI_SRIOV_TOTAL_VF, self.total_vfs)
        c.set_wmask(o + PCI_SRIOV_NUM_VF, 0xFFFF, 2)
        c.set16(o + PCI_SRIOV_VF_OFFSET, self.first_vf_offset)
        c.set16(o + PCI_SRIOV_VF_STRIDE, self.vf_stride)
        c.set16(o + PCI_SRIOV_VF_DID, self.vf_device_id)
        c.set32(o + PCI_SRIOV_SUP_PGSIZE, self.supported_page_sizes)
        c.set32(o + PCI_SRIOV_SYS_PGSIZE, 0x1)  # 4 KiB
        c.set_wmask(o + PCI_SRIOV_SYS_PGSIZE, self.supported_page_sizes)
        self._define_vf_bars()
        c.add_hook(o + PCI_SRIOV_CTRL, 2, self._ctrl_written)
        c.add_hook(o + PCI_SRIOV_NUM_VF, 2, self._num_vfs_written)
        c.add_hook(o + PCI_SRIOV_SYS_PGSIZE, 4, self._page_size_written)

    def _define_vf_bars(self) -> None:
        step = 2 if self.vf_bars_64bit else 1
        for index, size in self.vf_bars.items():
            if index % step or index + step > PCI_SRIOV_NUM_BARS:
                raise ValueError(f"no room for VF BAR{index}")
            self.cfg.define_bar(
                self.offset + PCI_SRIOV_BAR + 4 * index,
                max(size, self.system_page_size),
                is64=self.vf_bars_64bit,
            )

    def _ctrl_written(self, reg: int, old: int, new: int) -> None:
        c, o = self.cfg, self.offset
        if (old ^ new) & PCI_SRIOV_CTRL_VFE:
            locked = bool(new & PCI_SRIOV_CTRL_VFE)
            c.set_wmask(o + PCI_SRIOV_NUM_VF, 0 if locked else 0xFFFF, 2)
            c.set_wmask(o + PCI_SRIOV_SYS_PGSIZE, 0 if locked else self.supported_page_sizes)
        if (old ^ new) & (PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE) and self.on_change is not None:
            self.on_change()

    def _num_vfs_written(self, reg: int, old: int, new: int) -> None:
        if (new & 0xFFFF) > self.total_vfs:
            self.cfg.set16(self.offset + PCI_SRIOV_NUM_VF, old & 0xFFFF)

    def _page_size_written(self, reg: int, old: int, new: int) -> None:
        if old == new:
            return
        if new & (new - 1) or not new & self.supported_page_sizes:
            self.cfg.set32(self.offset + PCI_SRIOV_SYS_PGSIZE, old)
            return
        self._define_vf_bars()

    # ---- state -----------------------------------------------------------------------------------

    @property
    def control(self) -> int:
        return self.cfg.get16(self.offset + PCI_SRIOV_CTRL)

    @property
    def vf_enable(self) -> bool:
        return bool(self.cfg.data[self.offset + PCI_SRIOV_CTRL] & PCI_SRIOV_CTRL_VFE)

    @property
    def vf_mse(self) -> bool:
        return bool(self.cfg.data[self.offset + PCI_SRIOV_CTRL] & PCI_SRIOV_CTRL_MSE)

    @property
    def num_vfs(self) -> int:
        return self.cfg.get16(self.offset + PCI_SRIOV_NUM_VF)

    @property
    def system_page_size(self) -> int:
        return 1 << (self.cfg.get32(self.offset + PCI_SRIOV_SYS_PGSIZE).bit_length() - 1 + 12)

    def vf_rid(self, pf_rid: int, index: int) -> int:
        """Routing ID of 0-based VF ``index`` (16-bit sum, may carry into the bus number)."""
        return (pf_rid + self.first_vf_offset + index * self.vf_stride) & 0xFFFF

    def vf_bar_size(self, index: int) -> int:
        """One VF's share of VF BAR ``index`` (what sizing reads back)."""
        return max(self.vf_bars[index], self.system_page_size)

    def vf_bar_address(self, index: int) -> int:
        """Base of VF BAR ``index`` (VF 0's BAR; VF i is at + i * vf_bar_size)."""
        return self.cfg.bar_address(self.offset + PCI_SRIOV_BAR + 4 * index)

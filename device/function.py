"""One PCIe function of the lab device (a PF or an SR-IOV VF).

A function = type-0 config space (PCIe cap v2 with FLR, MSI-X cap) + BAR0::

    BAR0 (16 KiB, 32-bit non-prefetchable memory BAR, four 4 KiB pages)
    +---------+--------------------------------------------------------------+
    | 0x0000  | page 0: work-engine registers (``device.engine``), 0xA0 used  |
    | 0x1000  | page 1: IMS slots (``device.ims``), 16 bytes each, up to 256; |
    |         |         absent (reads 0) on a function with ims_slots=0       |
    | 0x2000  | page 2: MSI-X table, 16 bytes per vector (BIR 0, off 0x2000)  |
    | 0x3000  | page 3: MSI-X PBA (BIR 0, offset 0x3000), read-only           |
    +---------+--------------------------------------------------------------+
    holes read 0 and ignore writes

Why one block per page: a hypervisor that assigns the function to a guest maps
pages 0 and 1 straight through (engine and IMS: the guest programs its IMS
slots with no exit, which is what makes IMS of kind ``device`` a question of
who composes the message) and traps pages 2 and 3 to emulate the MSI-X table,
as VFIO does.  Trapping IMS too is a per-page decision (unmap page 1), never a
partial one.  Sharing a page between IMS and MSI-X would make that impossible.

Config space layout of both kinds::

    0x000  type-0 header (PF: BAR0 = 16 KiB; VF: BARs read 0, Vendor/Device ID 0xFFFF)
    0x040  PCI Express capability v2 (0x3C bytes; DevCap FLR capable)
    0x07C  MSI-X capability (12 bytes)
    0x100  PF only: SR-IOV extended capability (added by the device)

VF differences (SR-IOV 1.1 ch. 3.4): Vendor ID and Device ID read 0xFFFF, the
header BARs are read-only 0 (the VF's BAR space is the PF's VF BAR0 + i * size),
Command MSE and INTx Disable are read-only 0 (memory decode is the PF's VF MSE),
only Bus Master Enable is writable.

Functions do not decode addresses: the device maps an MRd/MWr to a function and
hands over the offset inside BAR0.
"""

from __future__ import annotations

from typing import Callable

from device.caps.msix import MsixCap
from device.caps.pcie import PcieCap
from device.config import (
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_PARITY,
    PCI_COMMAND_SERR,
    PCI_COMMAND_INTX_DISABLE,
    BE_MASK,
    ConfigSpace,
)
from device.emit import Emit, mem_write_dw
from device.engine import DMA_GO, DOORBELL, EngineShared, WorkEngine
from device.ims import ImsStore
from device.msix import MsixTable
from fabric.bdf import rid_str
from fabric.tlp import CplStatus, Tlp

BAR0_SIZE = 0x4000
ENGINE_OFFSET = 0x0000
IMS_OFFSET = 0x1000
MSIX_TABLE_OFFSET = 0x2000
MSIX_PBA_OFFSET = 0x3000
MAX_VECTORS = (MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) // 16  # 256
MAX_IMS_SLOTS = (MSIX_TABLE_OFFSET - IMS_OFFSET) // 16  # 256
_IMS_ZERO = dict.fromkeys(("ims_sent", "ims_pended", "ims_replayed", "ims_blocked_no_bme", "ims_invalid_slot"), 0)

CLASS_SYSTEM_PERIPHERAL_OTHER = 0x088000  # what IDXD reports
PF_COMMAND_WMASK = (
    PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE
)
VF_COMMAND_WMASK = PCI_COMMAND_MASTER

PCIE_CAP_OFFSET = 0x40
MSIX_CAP_OFFSET = 0x7C


class Function:
    """A PF or VF: config space, MSI-X table/PBA, optional IMS and work engine behind BAR0.

    ``ims_slots`` = 0 means no IMS (``self.ims`` is None, IMS_CAP reads 0).
    ``pasid_interrupts`` is the device-level knob of ``device.ims``: whether an
    IMS slot with PASID Enable sends its MWr with the PASID prefix.
    """

    __slots__ = (
        "_rid", "is_vf", "vf_index", "cfg", "pcie", "msix_cap", "msix", "ims", "engine", "on_flr",
        "cfg_reads", "cfg_writes", "mem_reads", "mem_writes", "doorbells", "doorbells_dropped",
        "dma_writes", "flrs", "ims_invalid", "dma_read_tlps", "dma_write_tlps", "dma_dropped",
    )

    def __init__(
        self,
        rid: int,
        *,
        vendor_id: int,
        device_id: int,
        vectors: int,
        is_vf: bool = False,
        vf_index: int | None = None,
        revision: int = 1,
        class_code: int = CLASS_SYSTEM_PERIPHERAL_OTHER,
        subsystem_vendor_id: int | None = None,
        subsystem_id: int = 0,
        on_flr: Callable[["Function"], None] | None = None,
        ims_slots: int = 0,
        pasid_interrupts: bool = True,
        engines: EngineShared | None = None,
    ) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"{vectors} MSI-X vectors do not fit between 0x2000 and 0x3000")
        if not 0 <= ims_slots <= MAX_IMS_SLOTS:
            raise ValueError(f"{ims_slots} IMS slots do not fit between 0x1000 and 0x2000")
        self._rid = rid & 0xFFFF
        self.is_vf = is_vf
        self.vf_index = vf_index
        self.on_flr = on_flr
        self.cfg_reads = self.cfg_writes = self.mem_reads = self.mem_writes = 0
        self.doorbells = self.doorbells_dropped = self.dma_writes = self.flrs = self.ims_invalid = 0
        self.dma_read_tlps = self.dma_write_tlps = self.dma_dropped = 0

        cfg = self.cfg = ConfigSpace()
        cfg.init_header(
            0xFFFF if is_vf else vendor_id,
            0xFFFF if is_vf else device_id,
            revision=revision,
            class_code=class_code,
            subsystem_vendor_id=vendor_id if subsystem_vendor_id is None else subsystem_vendor_id,
            subsystem_id=subsystem_id,
            command_wmask=VF_COMMAND_WMASK if is_vf else PF_COMMAND_WMASK,
        )
        if not is_vf:
            cfg.add_bar(0, BAR0_SIZE)
        self.pcie = PcieCap(flr_capable=True, on_flr=self.flr)
        cfg.add_capability(self.pcie, PCIE_CAP_OFFSET)
        self.msix_cap = MsixCap(
            vectors,
            table_bir=0,
            table_offset=MSIX_TABLE_OFFSET,
            pba_bir=0,
            pba_offset=MSIX_PBA_OFFSET,
            on_control=self._msix_control,
        )
        cfg.add_capability(self.msix_cap, MSIX_CAP_OFFSET)
        cfg.add_hook(PCI_COMMAND, 2, self._command_written)
        cfg.seal()

        self.msix = MsixTable(vectors, requester_id=self._rid)
        self.ims = (ImsStore(ims_slots, requester_id=self._rid, pasid_interrupts=pasid_interrupts)
                    if ims_slots else None)
        self.engine = WorkEngine(ims_slots, engines)

    # ---- identity --------------------------------------------------------------------------------

    @property
    def rid(self) -> int:
        return self._rid

    @rid.setter
    def rid(self, value: int) -> None:
        self._rid = value & 0xFFFF
        self.msix.requester_id = self._rid
        if self.ims is not None:
            self.ims.requester_id = self._rid

    def __repr__(self) -> str:
        kind = f"VF{self.vf_index}" if self.is_vf else "PF"
        return f"<Function {kind} {rid_str(self._rid)}>"

    @property
    def bar0_address(self) -> int:
        """PF only: the base programmed in header BAR0."""
        return self.cfg.bar_address(PCI_BASE_ADDRESS_0)

    # ---- config ----------------------------------------------------------------------------------

    def config_read(self, reg: int, first_be: int = 0xF) -> int:
        self.cfg_reads += 1
        return self.cfg.read(reg, first_be)

    def config_write(self, reg: int, value: int, first_be: int = 0xF) -> list[Emit]:
        """CfgWr; returns MSI-X messages replayed by an MSI-X Enable / Function Mask change."""
        self.cfg_writes += 1
        return self.cfg.write(reg, value, first_be)

    def _command_written(self, reg: int, old: int, new: int) -> None:
        self.msix.bus_master = bme = bool(new & PCI_COMMAND_MASTER)
        if self.ims is not None:
            self.ims.bus_master = bme

    def _msix_control(self, enabled: bool, function_mask: bool) -> list[Emit]:
        return self.msix.set_control(enabled, function_mask)

    # ---- reset -----------------------------------------------------------------------------------

    def flr(self) -> None:
        """Function Level Reset (PCIe Base 6.6.2): registers, MSI-X, IMS and engine to power-on state.

        As on real hardware the BARs and Command register are cleared too;
        software saves and restores config around an FLR (Linux
        ``pci_reset_function``).  Counters are statistics and survive.
        """
        self.flrs += 1
        self.cfg.reset()
        self.msix.reset()
        self.msix.bus_master = False
        if self.ims is not None:
            self.ims.reset()
            self.ims.bus_master = False
        self.engine.reset()
        if self.on_flr is not None:
            self.on_flr(self)

    # ---- BAR0 MMIO -------------------------------------------------------------------------------

    def mmio_read(self, off: int, length: int) -> bytes:
        """MRd of ``length`` DWs starting at DW-aligned BAR offset ``off``: the CplD payload."""
        self.mem_reads += 1
        if length == 1:
            return self._read_dw(off).to_bytes(4, "little")
        return b"".join(self._read_dw(off + 4 * i).to_bytes(4, "little") for i in range(length))

    def mmio_write(self, off: int, tlp: Tlp) -> list[Emit]:
        """MWr at DW-aligned BAR offset ``off``; returns the TLPs it causes (DMA, interrupts)."""
        self.mem_writes += 1
        data = tlp.data
        length = tlp.length
        if length == 1:
            return self._write_dw(off, int.from_bytes(data[0:4], "little"), tlp.first_be)
        out: list[Emit] = []
        for i in range(length):
            be = tlp.first_be if i == 0 else (tlp.last_be if i == length - 1 else 0xF)
            if be:
                out += self._write_dw(off + 4 * i, int.from_bytes(data[4 * i:4 * i + 4], "little"), be)
        return out

    def _read_dw(self, off: int) -> int:
        if off < IMS_OFFSET:
            return self.engine.read32(off)
        if off < MSIX_TABLE_OFFSET:
            return self.ims.read(off - IMS_OFFSET) if self.ims is not None else 0
        if off < MSIX_PBA_OFFSET:
            return self.msix.table_read(off - MSIX_TABLE_OFFSET)
        if off < BAR0_SIZE:
            return self.msix.pba_read(off - MSIX_PBA_OFFSET)
        return 0

    def _write_dw(self, off: int, value: int, be: int) -> list[Emit]:
        if off < IMS_OFFSET:
            if off == DOORBELL:
                # Only a full-DW write carries a cookie; a partial one is ignored.
                return self.doorbell(value) if be == 0xF else []
            if off == DMA_GO:
                return self.dma_go(value) if be == 0xF else []
            if be != 0xF:
                m = BE_MASK[be]
                value = (self.engine.read32(off) & ~m) | (value & m)
            self.engine.write32(off, value)
            return []
        if off < MSIX_TABLE_OFFSET:
            ims = self.ims
            if ims is None:
                return []
            off -= IMS_OFFSET
            if be != 0xF:
                m = BE_MASK[be]
                value = (ims.read(off) & ~m) | (value & m)
            return ims.write(off, 4, value)
        if off < MSIX_PBA_OFFSET:
            off -= MSIX_TABLE_OFFSET
            if be != 0xF:
                m = BE_MASK[be]
                value = (self.msix.table_read(off) & ~m) | (value & m)
            return self.msix.table_write(off, 4, value)
        return []  # PBA and holes: read-only / ignored

    # ---- work engine -----------------------------------------------------------------------------

    def doorbell(self, cookie: int) -> list[Emit]:
        """One work item: ``[DMA MWr of the completion record, interrupt MWr]`` in that order.

        The record is 16 bytes, or with CMPL_FORMAT.DW the 4-byte cookie alone: one full-DW
        MWr that, aimed at 0xFEEx_xxxx, the fabric takes for an interrupt request from this
        function's RID (``device.engine``).

        The interrupt is MSI-X vector IRQ_VECTOR, or IMS slot IRQ_VECTOR when
        IRQ_MODE = 1.  Nothing at all without Bus Master Enable, a programmed
        ring or room in the work queue (``doorbells_dropped``; ``wq_full``).  The interrupt may be pended (masked
        vector / slot), blocked or invalid (no such vector / slot; IRQ_MODE = 1
        without IMS counts ``ims_invalid``), in which case only the DMA write
        is returned.
        """
        self.doorbells += 1
        if not self._admits():
            self.doorbells_dropped += 1
            return []
        return self._finish(cookie)

    def _admits(self) -> bool:
        """A work item may start: Bus Master Enable, a programmed ring, room in the work queue."""
        engine = self.engine
        return self.msix.bus_master and engine.ring_entries != 0 and engine.accepts()

    def _finish(self, cookie: int) -> list[Emit]:
        """A work item ends: ``[record MWr, interrupt MWr]`` (see ``doorbell``), the interrupt
        IRQ_BURST times (``device.engine``'s interrupt generator)."""
        engine = self.engine
        msix = self.msix
        address, record = engine.complete(cookie)
        self.dma_writes += 1
        # A DWORD record is the one DMA write that can be an interrupt request: it carries its
        # provenance like an interrupt message, so the oracle sees it if it is taken for one.
        out = [Emit(mem_write_dw(address, record, self._rid), self._rid if engine.cmpl_format else None)]
        vector = engine.irq_vector
        if engine.irq_mode:
            ims = self.ims
            if ims is None:
                self.ims_invalid += 1
                return out
            irq = ims.notify(vector)
            if irq is not None:
                engine.ims_sent += engine.emit_burst(out, irq, ims)
            elif vector < ims.nslots and ims.is_pending(vector):
                engine.ims_pended += 1
            return out
        irq = msix.notify(vector)
        if irq is not None:
            engine.msix_sent += engine.emit_burst(out, irq, msix)
        elif vector < msix.nvectors and msix.is_pending(vector):
            engine.msix_pended += 1
        return out

    # ---- DMA copy (device.engine: DMA_GO) ---------------------------------------------------------

    def dma_go(self, cookie: int) -> list[Emit]:
        """A copy work item: the first memory reads (MRd) of DMA_LEN bytes at DMA_SRC.  Dropped
        like a doorbell (``dma_dropped``) without Bus Master Enable, a ring, room in the work
        queue, or with a DMA_LEN of 0 or over DMA_MAX_LEN."""
        if not self._admits():
            self.dma_dropped += 1
            return []
        reads = self.engine.copy_start(cookie)
        if reads is None:
            self.dma_dropped += 1
            return []
        return self._reads(reads)

    def _reads(self, reads) -> list[Emit]:
        rid = self._rid
        self.dma_read_tlps += len(reads)
        return [Emit(Tlp.mem_read(addr, n, rid, tag=tag), None) for addr, n, tag in reads]

    def dma_completion(self, cpl: Tlp) -> list[Emit] | None:
        """A completion of one of the copy's reads: ``[MWr of its bytes ..., next MRds ...,
        record + interrupt of every copy now complete]``; None if no such read is outstanding."""
        ok = cpl.status == CplStatus.SC
        got = self.engine.copy_data(cpl.tag, ok, cpl.payload_bytes() if ok else b"")
        if got is None:
            return None
        writes, reads, done = got
        rid = self._rid
        out = [Emit(mem_write_dw(addr, data, rid), None) for addr, data in writes]
        self.dma_write_tlps += len(writes)
        if reads:
            out += self._reads(reads)
        if done and self.msix.bus_master and self.engine.ring_entries:
            for cookie, _ok in done:
                out += self._finish(cookie)
        return out

    # ---- observation -----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Monotonic statistics (they survive FLR), for the control interface."""
        m, i = self.msix, self.ims
        return {
            "cfg_reads": self.cfg_reads,
            "cfg_writes": self.cfg_writes,
            "mem_reads": self.mem_reads,
            "mem_writes": self.mem_writes,
            "doorbells": self.doorbells,
            "doorbells_dropped": self.doorbells_dropped,
            "wq_full": self.engine.wq_full,
            "dma_writes": self.dma_writes,
            "dma_copies": self.engine.dma_copies,
            "dma_errors": self.engine.dma_errors,
            "dma_dropped": self.dma_dropped,
            "dma_read_tlps": self.dma_read_tlps,
            "dma_write_tlps": self.dma_write_tlps,
            "flrs": self.flrs,
            "msix_sent": m.sent,
            "msix_pended": m.pended,
            "msix_replayed": m.replayed,
            "blocked_no_bme": m.blocked_no_bme,
            "msix_invalid_vector": m.invalid_vector,
            "ims_invalid": self.ims_invalid,
            **(_IMS_ZERO if i is None else {
                "ims_sent": i.sent,
                "ims_pended": i.pended,
                "ims_replayed": i.replayed,
                "ims_blocked_no_bme": i.blocked_no_bme,
                "ims_invalid_slot": i.invalid_slot,
            }),
        }

"""device.function + device.sriov_device: MSI-X over MMIO TLPs, the work engine, FLR, UR paths."""

from __future__ import annotations

import struct

import pytest

from device.caps.sriov import PCI_SRIOV_BAR, PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_MSE, PCI_SRIOV_CTRL_VFE, PCI_SRIOV_NUM_VF
from device.emit import Emit
from device.engine import (
    CMPL_HEAD,
    WQ_DEPTH,
    WQ_SIZE,
    CMPL_BASE_HI,
    CMPL_BASE_LO,
    CMPL_FORMAT,
    CMPL_RING_ENTRIES,
    COMPLETED,
    DOORBELL,
    ENGINE_MAGIC,
    ENGINE_VERSION,
    IRQ_BURST,
    IRQ_BURST_MAX,
    IRQ_VECTOR,
    MSIX_PENDED,
    MSIX_SENT,
)
from device.function import MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET
from device.sriov_device import SriovDevice
from fabric.tlp import CplStatus, Tlp, TlpType

BUS = 2
PF = BUS << 8
BAR = 0xFEB0_0000
VF_BAR = 0xC000_0000
RING = 0x1_0000_2000  # a bus address above 4 GiB: 4DW DMA writes
MSI = 0xFEE0_0000
MSIX_CAP = 0x7C
SRIOV = 0x100
HOST_RID = 0x0000


class Host:
    """Drives one device with TLPs the way the host driver would."""

    def __init__(self, dev: SriovDevice) -> None:
        self.dev = dev

    def send(self, tlp: Tlp) -> list[Emit]:
        out = self.dev.handle_tlp(tlp)
        for e in out:  # everything the model emits must survive the wire
            assert Tlp.unpack(e.tlp.pack()) == e.tlp
            assert e.raw is None or e.raw == e.tlp.pack()     # a cached encoding is the TLP's
        return out

    # config
    def rd(self, target: int, reg: int) -> int:
        (e,) = self.send(Tlp.cfg_read(target, reg, HOST_RID))
        assert e.tlp.status == CplStatus.SC
        return int.from_bytes(e.tlp.data, "little")

    def wr(self, target: int, reg: int, value: int, be: int = 0xF) -> list[Emit]:
        cpl, *rest = self.send(Tlp.cfg_write(target, reg, value, HOST_RID, first_be=be))
        assert cpl.tlp.type == TlpType.CPL and cpl.tlp.status == CplStatus.SC
        assert cpl.tlp.completer_id == target and cpl.origin is None
        return rest

    def wr16(self, target: int, off: int, value: int) -> list[Emit]:
        return self.wr(target, off & ~3, value << (off & 2) * 8, 0x3 << (off & 2))

    def msix_control(self, target: int, *, enable: bool, fmask: bool = False) -> list[Emit]:
        return self.wr16(target, MSIX_CAP + 2, (0x8000 if enable else 0) | (0x4000 if fmask else 0))

    # memory
    def r32(self, addr: int) -> int:
        (e,) = self.send(Tlp.mem_read(addr, 4, HOST_RID))
        assert e.tlp.status == CplStatus.SC, str(e.tlp)
        return int.from_bytes(e.tlp.data, "little")

    def w32(self, addr: int, value: int) -> list[Emit]:
        return self.send(Tlp.mem_write(addr, value.to_bytes(4, "little"), HOST_RID))

    def w64(self, addr: int, value: int) -> list[Emit]:
        return self.send(Tlp.mem_write(addr, value.to_bytes(8, "little"), HOST_RID))

    # driver steps
    def bring_up_pf(self, *, bme: bool = True) -> None:
        self.wr(PF, 0x10, BAR)
        self.wr(PF, 0x04, 0x2 | (0x4 if bme else 0))

    def program_vector(self, bar: int, vector: int, addr: int, data: int, masked: bool = False) -> list[Emit]:
        entry = bar + MSIX_TABLE_OFFSET + 16 * vector
        out = self.w64(entry, addr)
        out += self.w64(entry + 8, data | int(masked) << 32)
        return out

    def program_ring(self, bar: int, base: int, entries: int, vector: int) -> None:
        self.w32(bar + CMPL_BASE_LO, base & 0xFFFF_FFFF)
        self.w32(bar + CMPL_BASE_HI, base >> 32)
        self.w32(bar + CMPL_RING_ENTRIES, entries)
        self.w32(bar + IRQ_VECTOR, vector)


@pytest.fixture
def h() -> Host:
    host = Host(SriovDevice())
    host.bring_up_pf()
    return host


# ---- MSI-X through MMIO ---------------------------------------------------------------------------


def test_msix_table_programming_via_mwr(h: Host) -> None:
    assert h.program_vector(BAR, 3, 0x1_FEE0_0008, 0x4023) == []
    t = h.dev.pf.msix
    assert t.message(3) == (0x1_FEE0_0008, 0x4023) and not t.table_read(3 * 16 + 12) & 1
    entry = BAR + MSIX_TABLE_OFFSET + 48
    assert h.r32(entry) == 0xFEE0_0008 and h.r32(entry + 4) == 1 and h.r32(entry + 8) == 0x4023
    (e,) = h.send(Tlp.mem_read(entry, 16, HOST_RID))  # one CplD for a 4-DW read
    assert struct.unpack("<IIII", e.tlp.data) == (0xFEE0_0008, 1, 0x4023, 0)
    assert e.tlp.byte_count == 16 and e.tlp.completer_id == PF
    # byte-enable writes merge into the entry
    h.send(Tlp.mem_write(entry + 9, b"\x99", HOST_RID))
    assert h.r32(entry + 8) == 0x9923


def test_vector_mask_pba_and_unmask_delivery_over_mmio(h: Host) -> None:
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 1, MSI, 0x31, masked=True)
    h.program_ring(BAR, RING, 4, vector=1)
    dma, = h.w32(BAR + DOORBELL, 0xC0FFEE)  # interrupt pended: only the DMA write
    assert dma.origin is None
    assert h.r32(BAR + MSIX_PBA_OFFSET) == 0b10
    assert h.w32(BAR + MSIX_PBA_OFFSET, 0) == [] and h.r32(BAR + MSIX_PBA_OFFSET) == 0b10  # RO
    assert h.r32(BAR + MSIX_PENDED) == 1 and h.r32(BAR + MSIX_SENT) == 0
    (irq,) = h.w32(BAR + MSIX_TABLE_OFFSET + 16 + 12, 0)  # clear the entry mask -> replay
    assert irq.tlp.address == MSI and irq.tlp.data == (0x31).to_bytes(4, "little")
    assert irq.origin == PF and irq.tlp.requester_id == PF
    assert h.r32(BAR + MSIX_PBA_OFFSET) == 0


def test_function_mask_and_enable_replay_in_cfgwr_output(h: Host) -> None:
    h.program_vector(BAR, 0, MSI, 0x20)
    h.program_ring(BAR, RING, 4, vector=0)
    h.w32(BAR + DOORBELL, 1)  # MSI-X disabled -> pended
    assert h.wr16(PF, MSIX_CAP + 2, 0xC000) == []  # enable + function mask: still masked
    (irq,) = h.msix_control(PF, enable=True, fmask=False)  # the Cpl is first, then the replay
    assert irq.tlp.data[0] == 0x20 and irq.origin == PF
    assert h.dev.pf.msix.pba_read(0) == 0


def test_no_interrupt_and_no_dma_without_bus_master() -> None:
    h = Host(SriovDevice())
    h.bring_up_pf(bme=False)
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0x20)
    h.program_ring(BAR, RING, 4, vector=0)
    assert h.w32(BAR + DOORBELL, 1) == []
    pf = h.dev.pf
    assert pf.doorbells_dropped == 1 and h.r32(BAR + COMPLETED) == 0
    assert pf.msix.notify(0) is None and pf.msix.blocked_no_bme == 1
    h.wr(PF, 0x04, 0x6)
    assert [e.tlp.type for e in h.w32(BAR + DOORBELL, 1)] == [TlpType.MEM_WRITE_64, TlpType.MEM_WRITE]


# ---- the work engine ------------------------------------------------------------------------------


def test_engine_registers(h: Host) -> None:
    assert h.r32(BAR) == ENGINE_MAGIC == int.from_bytes(b"IRQL", "little")
    assert h.r32(BAR + ENGINE_VERSION) == 0x0001_0000
    h.program_ring(BAR, 0x1234_5678_9ABC_DEFF, 8, vector=5)
    assert h.r32(BAR + CMPL_BASE_LO) == 0x9ABC_DEF0 and h.r32(BAR + CMPL_BASE_HI) == 0x1234_5678
    assert h.r32(BAR + CMPL_RING_ENTRIES) == 8 and h.r32(BAR + IRQ_VECTOR) == 5
    h.w32(BAR + CMPL_RING_ENTRIES, 6)  # not a power of two: ignored
    assert h.r32(BAR + CMPL_RING_ENTRIES) == 8
    h.send(Tlp.mem_write(BAR + IRQ_VECTOR + 1, b"\x01", HOST_RID))  # partial write merges
    assert h.r32(BAR + IRQ_VECTOR) == 0x105
    for ro in (0x00, COMPLETED, MSIX_SENT, MSIX_PENDED):
        before = h.r32(BAR + ro)
        h.w32(BAR + ro, 0xFFFF_FFFF)
        assert h.r32(BAR + ro) == before
    assert h.r32(BAR + DOORBELL) == 0
    assert h.r32(BAR + 0x1FFC) == 0 and h.w32(BAR + 0x1000, 5) == []  # holes
    (e,) = h.send(Tlp.mem_read(BAR, 16, HOST_RID))
    assert struct.unpack("<IIII", e.tlp.data) == (ENGINE_MAGIC, 0x0001_0000, 0x9ABC_DEF0, 0x1234_5678)


def test_doorbell_emits_dma_record_then_msix(h: Host) -> None:
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 2, MSI | 0x1000, 0x4041)
    h.program_ring(BAR, RING, 4, vector=2)
    out = h.w32(BAR + DOORBELL, 0xDEAD_BEEF)
    assert len(out) == 2
    dma, irq = out
    assert dma.tlp.type == TlpType.MEM_WRITE_64 and dma.origin is None
    assert dma.tlp.address == RING and dma.tlp.requester_id == PF
    assert dma.tlp.data == struct.pack("<IIQ", 0xDEAD_BEEF, 1, 0)
    assert irq.tlp.type == TlpType.MEM_WRITE and irq.origin == PF
    assert irq.tlp.address == MSI | 0x1000 and irq.tlp.requester_id == PF
    assert irq.tlp.data == (0x4041).to_bytes(4, "little")
    assert h.r32(BAR + COMPLETED) == 1 and h.r32(BAR + MSIX_SENT) == 1


@pytest.fixture
def g() -> Host:
    """A device built with the interrupt generator (IRQ_BURST works)."""
    host = Host(SriovDevice(irq_generator=True))
    host.bring_up_pf()
    return host


def test_irq_burst_needs_the_generator(h: Host) -> None:
    """Without the interrupt generator IRQ_BURST reads 1 and ignores writes: one interrupt each."""
    h.w32(BAR + IRQ_BURST, 32)
    assert h.r32(BAR + IRQ_BURST) == 1
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0x20)
    h.program_ring(BAR, RING, 4, vector=0)
    assert len(h.w32(BAR + DOORBELL, 1)) == 2


def test_irq_burst_register_is_clamped_and_reset_by_flr(g: Host) -> None:
    h = g
    assert h.r32(BAR + IRQ_BURST) == 1
    for written, reads in ((32, 32), (0, 1), (IRQ_BURST_MAX, 256), (257, 256), (0xFFFF_FFFF, 256), (3, 3)):
        h.w32(BAR + IRQ_BURST, written)
        assert h.r32(BAR + IRQ_BURST) == reads, written
    assert h.wr16(PF, 0x40 + 0x08, 0x8000 | 0x2810) == []   # DevCtl: Initiate FLR
    h.bring_up_pf()
    assert h.r32(BAR + IRQ_BURST) == 1


def test_irq_burst_raises_each_completion_interrupt_n_times_after_its_record(g: Host) -> None:
    h = g
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 2, MSI | 0x1000, 0x4041)
    h.program_ring(BAR, RING, 4, vector=2)
    h.w32(BAR + IRQ_BURST, 5)
    dma, *irqs = h.w32(BAR + DOORBELL, 7)
    assert dma.tlp.address == RING and dma.origin is None
    assert len(irqs) == 5 and all(e.tlp == irqs[0].tlp and e.origin == PF for e in irqs)
    assert irqs[0].tlp.address == MSI | 0x1000 and irqs[0].tlp.data == (0x4041).to_bytes(4, "little")
    assert h.r32(BAR + MSIX_SENT) == 5 and h.dev.pf.msix.sent == 5 and h.r32(BAR + COMPLETED) == 1
    # a masked vector pends once, whatever the burst; unmasking replays one message
    h.program_vector(BAR, 2, MSI | 0x1000, 0x4041, masked=True)
    (dma,) = h.w32(BAR + DOORBELL, 8)
    assert h.r32(BAR + MSIX_PENDED) == 1 and h.r32(BAR + MSIX_SENT) == 5
    (irq,) = h.w32(BAR + MSIX_TABLE_OFFSET + 2 * 16 + 12, 0)
    assert irq.tlp.address == MSI | 0x1000


def test_doorbell_ring_wraps_with_sequence_numbers(h: Host) -> None:
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0)
    h.program_ring(BAR, RING, 2, vector=0)
    records = []
    for i in range(5):
        records.append(h.w32(BAR + DOORBELL, 100 + i)[0].tlp)
        h.w32(BAR + CMPL_HEAD, i + 1)                 # the driver consumed it
    assert [t.address - RING for t in records] == [0, 16, 0, 16, 0]
    assert [struct.unpack("<IIQ", t.data) for t in records] == [(100 + i, 1, i) for i in range(5)]
    assert h.r32(BAR + COMPLETED) == 5


def test_work_queue_holds_wq_depth_unconsumed_items(h: Host) -> None:
    """A doorbell with WQ_DEPTH completed records not yet consumed (CMPL_HEAD) is dropped;
    consuming frees room; a head beyond COMPLETED is ignored (it would free room for records
    never written)."""
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0)
    h.program_ring(BAR, RING, 1024, vector=0)
    assert h.r32(BAR + WQ_DEPTH) == WQ_SIZE == 64
    for i in range(WQ_SIZE):
        assert len(h.w32(BAR + DOORBELL, i)) == 2
    assert h.w32(BAR + DOORBELL, 999) == []
    snap = h.dev.pf.counters()
    assert snap["wq_full"] == 1 and snap["doorbells_dropped"] == 1 and h.r32(BAR + COMPLETED) == WQ_SIZE
    h.w32(BAR + CMPL_HEAD, WQ_SIZE + 5)              # beyond COMPLETED: ignored
    assert h.r32(BAR + CMPL_HEAD) == 0 and h.w32(BAR + DOORBELL, 1000) == []
    h.w32(BAR + CMPL_HEAD, 3)                        # three consumed: three more fit
    assert [len(h.w32(BAR + DOORBELL, 2000 + i)) for i in range(4)] == [2, 2, 2, 0]
    assert h.dev.pf.counters()["wq_full"] == 3
    h.program_ring(BAR, RING, 8, vector=0)           # a small ring: the queue is no deeper than it
    assert h.r32(BAR + WQ_DEPTH) == 8


# ---- DWORD completion records (CMPL_FORMAT.DW) -----------------------------------------------------


def test_dword_records_are_one_full_dw_write_of_the_cookie(h: Host) -> None:
    """CMPL_FORMAT.DW: each record is the cookie alone, one full-DW MWr at base + 4 * slot, with
    CMPL_BASE's bits 3:2 counting; the interrupt follows as usual.  Back to 16-byte records,
    and after an FLR, the format is 16 bytes again."""
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0x30)
    base = RING | 0x8                                     # DWORD-aligned, not 16-byte aligned
    h.program_ring(BAR, base, 4, vector=0)
    assert h.r32(BAR + CMPL_FORMAT) == 0 and h.r32(BAR + CMPL_BASE_LO) == (RING & 0xFFFF_FFFF)
    h.w32(BAR + CMPL_FORMAT, 0xFFFF_FFFF)                 # bits 31:1 read 0
    assert h.r32(BAR + CMPL_FORMAT) == 1 and h.r32(BAR + CMPL_BASE_LO) == (base & 0xFFFF_FFFF)
    dmas = []
    for i in range(3):
        dma, irq = h.w32(BAR + DOORBELL, 0xA0 + i)
        assert dma.tlp.length == 1 and dma.tlp.first_be == 0xF and dma.tlp.last_be == 0
        # provenance rides with it (as with an interrupt message): the oracle sees it if the
        # fabric takes it for an interrupt request
        assert dma.origin == PF and dma.tlp.requester_id == PF and irq.origin == PF
        dmas.append(dma.tlp)
    assert [t.address - base for t in dmas] == [0, 4, 8]
    assert [t.data for t in dmas] == [(0xA0 + i).to_bytes(4, "little") for i in range(3)]
    h.w32(BAR + CMPL_FORMAT, 0)                           # 16-byte records again, at base & ~0xF
    assert h.r32(BAR + CMPL_BASE_LO) == (RING & 0xFFFF_FFFF)
    dma, _ = h.w32(BAR + DOORBELL, 0xB0)
    assert dma.tlp.address == RING + 3 * 16 and dma.tlp.data == struct.pack("<IIQ", 0xB0, 1, 3)
    assert dma.origin is None
    h.w32(BAR + CMPL_FORMAT, 1)
    h.dev.pf.flr()
    assert h.dev.pf.engine.cmpl_format == 0


def test_dword_record_into_the_interrupt_range_is_an_interrupt_request_the_ir_unit_checks() -> None:
    """Aimed at 0xFEEx_xxxx a DWORD record is, on the bus, a remappable interrupt request from
    the function's RID naming the IRTE the guest chose (handle in the base, sub-handle in the
    cookie): the IR unit's IRTE checks decide -- source-id (0x26) for someone else's entry,
    not present (0x22) for a free one.  A 16-byte record there is no interrupt request at all."""
    from fabric.dmar import FaultReason
    from fabric.ir import InterruptRemapper, IrFault, Irte, compose_remappable

    other = PF + 1                                        # someone else's function
    ir = InterruptRemapper(entries=256, enabled=True)
    ir.write_irte(0x42, Irte.remapped(0x51, 0, other))
    lo, _hi, data = compose_remappable(0x40, 2, shv=True)  # IRTE 0x40 + sub-handle 2 = 0x42

    def forge(cookie: int, dword: bool = True) -> Tlp:
        """A function fresh from its driver, told to DMA one record to ``lo``."""
        f = Host(SriovDevice())
        f.bring_up_pf()
        f.msix_control(PF, enable=True)
        f.program_vector(BAR, 0, MSI, 0x30)
        f.program_ring(BAR, lo, 1, vector=0)
        f.w32(BAR + CMPL_FORMAT, int(dword))
        dma, _irq = f.w32(BAR + DOORBELL, cookie)
        return dma.tlp

    tlp = forge(data)
    raw = tlp.pack()
    assert tlp.address == lo and len(raw) == 12 + 4 and raw[7] == 0x0F   # one DW, all bytes enabled
    res = ir.remap(tlp.requester_id, tlp.address, int.from_bytes(tlp.data, "little"))
    assert type(res) is IrFault and res.reason == FaultReason.IR_SID_ERR and res.index == 0x42, res
    tlp = forge(data + 1)                                  # IRTE 0x43: not present
    res = ir.remap(tlp.requester_id, tlp.address, int.from_bytes(tlp.data, "little"))
    assert type(res) is IrFault and res.reason == FaultReason.IR_ENTRY_P and res.index == 0x43, res
    assert forge(data, dword=False).length == 4            # the bus faults this 0x20 (not a DWORD)


def test_adi_dword_records_are_pasid_tagged_dma() -> None:
    """An ADI's portal has the same knob: its DWORD record leaves with the PF's RID and the
    ADI's PASID, like all its DMA."""
    from device.engine import IRQ_MODE
    from tests.unit.test_device_siov import make, portal, ring
    dev, sh = make(adis=2)
    sh.w32(portal(1) + IRQ_MODE, 1)
    sh.w32(portal(1) + CMPL_FORMAT, 1)
    assert sh.r32(portal(1) + CMPL_FORMAT) == 1
    dma, _irq = sh.w32(portal(1) + DOORBELL, 0xC0DE)
    assert dma.tlp.address == ring(1) and dma.tlp.data == (0xC0DE).to_bytes(4, "little")
    assert dma.tlp.length == 1 and dma.tlp.requester_id == 0x0100 and dma.tlp.pasid == 0x101
    assert dma.origin == dev.adis()[1].origin


def test_doorbell_dropped_until_ring_programmed_and_partial_doorbell_ignored(h: Host) -> None:
    assert h.w32(BAR + DOORBELL, 1) == []
    assert h.dev.pf.doorbells_dropped == 1
    h.program_ring(BAR, RING, 4, vector=0)
    assert h.send(Tlp.mem_write(BAR + DOORBELL, b"\x01\x02", HOST_RID)) == []
    assert h.dev.pf.doorbells == 1


def test_doorbell_with_out_of_range_vector_still_completes(h: Host) -> None:
    h.msix_control(PF, enable=True)
    h.program_ring(BAR, RING, 4, vector=8)  # PF has vectors 0..7
    (dma,) = h.w32(BAR + DOORBELL, 7)
    assert dma.origin is None
    assert h.dev.pf.msix.invalid_vector == 1


def test_vf_doorbell_uses_vf_rid_and_vf_table() -> None:
    h = Host(SriovDevice())
    h.rd(PF, 0)
    h.wr(PF, SRIOV + PCI_SRIOV_BAR, VF_BAR)
    h.wr16(PF, SRIOV + PCI_SRIOV_NUM_VF, 2)
    h.wr16(PF, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE)
    vf1, vf1_bar = PF + 2, VF_BAR + 0x4000
    h.wr(vf1, 0x04, 0x4)
    h.msix_control(vf1, enable=True)
    h.program_vector(vf1_bar, 3, MSI | 0x2000, 0x77)
    h.program_ring(vf1_bar, 0x5000_0000, 16, vector=3)
    dma, irq = h.w32(vf1_bar + DOORBELL, 9)
    assert dma.tlp.requester_id == vf1 and dma.tlp.address == 0x5000_0000 and dma.origin is None
    assert irq.tlp.requester_id == vf1 and irq.origin == vf1
    assert irq.tlp.address == MSI | 0x2000 and irq.tlp.data[0] == 0x77
    assert h.dev.pf.msix.message(3) == (0, 0)  # the PF's table is untouched
    assert h.program_vector(vf1_bar, 4, MSI, 1) == []  # the VF has 4 vectors: entry 4 is a hole
    assert h.dev.functions()[vf1].msix.table_read(4 * 16) == 0


# ---- FLR ------------------------------------------------------------------------------------------


def test_flr_through_devctl_clears_table_engine_and_decode(h: Host) -> None:
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0x99)
    h.program_ring(BAR, RING, 4, vector=0)
    h.w32(BAR + DOORBELL, 1)
    assert h.wr16(PF, 0x40 + 0x08, 0x8000 | 0x2810) == []
    pf = h.dev.pf
    assert pf.msix.message(0) == (0, 0) and pf.msix.is_masked(0) and not pf.msix.enabled
    assert pf.engine.ring_entries == 0 and pf.engine.completed == 0
    (e,) = h.send(Tlp.mem_read(BAR, 4, HOST_RID))  # Command and BAR0 cleared: no decode
    assert e.tlp.status == CplStatus.UR
    h.bring_up_pf()
    assert h.r32(BAR + COMPLETED) == 0 and h.r32(BAR + MSIX_TABLE_OFFSET + 12) == 1
    assert pf.counters()["dma_writes"] == 1 and pf.flrs == 1  # statistics survive


def test_vf_flr_keeps_vf_and_resets_it() -> None:
    h = Host(SriovDevice())
    h.wr(PF, SRIOV + PCI_SRIOV_BAR, VF_BAR)
    h.wr16(PF, SRIOV + PCI_SRIOV_NUM_VF, 1)
    h.wr16(PF, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE)
    vf = PF + 1
    h.wr(vf, 0x04, 0x4)
    h.program_vector(VF_BAR, 1, MSI, 5)
    h.program_ring(VF_BAR, RING, 4, vector=1)
    assert h.dev.function_level_reset(vf)
    fn = h.dev.functions()[vf]
    assert fn.flrs == 1 and h.rd(vf, 0x04) & 0xFFFF == 0 and fn.msix.message(1) == (0, 0)
    assert h.r32(VF_BAR + CMPL_RING_ENTRIES) == 0  # still decoded: VF MSE lives in the PF
    assert h.dev.sriov.vf_enable and len(h.dev.vfs) == 1


# ---- UR / drops / completions ---------------------------------------------------------------------


def test_ur_for_nonexistent_function_and_unmapped_mrd(h: Host) -> None:
    (e,) = h.send(Tlp.cfg_read(PF | 5, 0, HOST_RID, tag=7))
    assert e.tlp.type == TlpType.CPL and e.tlp.status == CplStatus.UR
    assert e.tlp.tag == 7 and e.tlp.requester_id == HOST_RID and e.tlp.completer_id == PF
    (e,) = h.send(Tlp.cfg_write(PF | 5, 4, 6, HOST_RID))
    assert e.tlp.status == CplStatus.UR
    (e,) = h.send(Tlp.mem_read(0x1000, 4, HOST_RID, tag=3))
    assert e.tlp.status == CplStatus.UR and e.tlp.tag == 3
    assert h.send(Tlp.mem_write(0x1000, b"abcd", HOST_RID)) == []
    (e,) = h.send(Tlp.mem_read(BAR + 0x4000, 4, HOST_RID))  # just past BAR0
    assert e.tlp.status == CplStatus.UR
    c = h.dev.snapshot()["counters"]
    assert (c["cfg_ur"], c["mrd_unmapped"], c["mwr_unmapped"]) == (2, 2, 1)


def test_memory_decode_off_is_ur_and_drop(h: Host) -> None:
    h.wr(PF, 0x04, 0x4)  # BME only
    (e,) = h.send(Tlp.mem_read(BAR, 4, HOST_RID))
    assert e.tlp.status == CplStatus.UR
    assert h.w32(BAR + IRQ_VECTOR, 3) == [] and h.dev.pf.engine.irq_vector == 0


def test_poisoned_write_dropped(h: Host) -> None:
    tlp = Tlp.mem_write(BAR + IRQ_VECTOR, b"\x03\0\0\0", HOST_RID)
    tlp.ep = True
    assert h.dev.handle_tlp(tlp) == [] and h.dev.pf.engine.irq_vector == 0
    assert h.dev.poisoned_dropped == 1


def test_completions_go_to_hook_or_are_dropped(h: Host) -> None:
    req = Tlp.mem_read(0x1000, 4, PF, tag=1)
    cpl = Tlp.completion(req, 0, CplStatus.SC, b"\0\0\0\0")
    assert h.dev.handle_tlp(cpl) == [] and h.dev.cpl_unexpected == 1
    seen: list[Tlp] = []
    h.dev.on_completion = lambda t: seen.append(t) or []
    h.dev.handle_tlp(cpl)
    assert seen == [cpl]


def test_snapshot_shape(h: Host) -> None:
    snap = h.dev.snapshot()
    assert snap["bus"] == BUS and snap["num_vfs"] == 0 and not snap["vf_enable"]
    pf = snap["functions"]["02:00.0"]
    assert pf["rid"] == PF and pf["kind"] == "PF" and pf["bus_master"]
    assert {"doorbells", "msix_sent", "msix_pended", "blocked_no_bme", "flrs"} <= set(pf)


def test_mmio_doorbell_path_is_cheap(h: Host) -> None:
    """Not a benchmark: a sanity bound so an accidental O(config space) step shows up."""
    import time

    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0)
    h.program_ring(BAR, RING, 1024, vector=0)
    tlp = Tlp.mem_write(BAR + DOORBELL, b"\x01\0\0\0", HOST_RID)
    handle = h.dev.handle_tlp
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        handle(tlp)
    per = (time.perf_counter() - t0) / n
    assert per < 200e-6, f"{per * 1e6:.1f} us per doorbell"

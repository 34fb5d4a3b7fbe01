"""Scalable-IOV device: PASID cap, SIOV DVSEC, BARs, ADI table, ADI tagging, IMS of both kinds, resets.

Pure: the device model is driven with TLPs the way the fabric would, no processes.
"""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.adi import (
    ADI_CTRL_ENABLE,
    ADI_CTRL_MEM_IMS_ENABLE,
    ADI_CTRL_PASID_ENABLE,
    ADI_CTRL_RESET,
    FETCH_TAGS,
    IMS_MEM_SLOTS,
    IRQ_MODE_IMS_MEMORY,
    QCTX_BASE_HI,
    QCTX_BASE_LO,
)
from device.caps.dvsec import PCI_DVSEC_ID_INTEL_SIOV, PCI_VENDOR_ID_INTEL
from device.engine import (
    CMPL_BASE_LO,
    CMPL_RING_ENTRIES,
    COMPLETED,
    DOORBELL,
    ENGINE_MAGIC,
    IMS_CAP,
    IMS_SENT,
    IRQ_MODE,
    IRQ_BURST,
    IRQ_VECTOR,
)
from device.ims import IMS_CTRL_PASID_ENABLE, IMS_CTRL_PASID_SHIFT
from device.siov_device import ADI_CAP, ADI_CAP_PASID_INTERRUPTS, ADI_TABLE, SiovDevice, bar2_size
from fabric import provenance
from fabric.provenance import adi_origin, describe, function_origin, is_adi
from fabric.tlp import CplStatus, Tlp, TlpType

PF = 0x0100                 # 01:00.0
BAR0 = 0xFEB0_0000
BAR2 = 0xC000_0000
MSI = 0xFEE0_0000
PASID_CAP = 0x100
DVSEC = 0x108
QCTX = 0x2_0000_1000        # above 4 GiB: the slot read is an MRd64


# ---- a root complex in a few lines -----------------------------------------------------------------


class Host:
    """Drives the device with TLPs, as the fabric would (host = 00:00.0)."""

    def __init__(self, dev: SiovDevice, rid: int = PF) -> None:
        self.dev, self.rid = dev, rid

    def rd(self, reg: int, target: int | None = None) -> int:
        (emit,) = self.dev.handle_tlp(Tlp.cfg_read(self.rid if target is None else target, reg))
        assert emit.tlp.status == CplStatus.SC, emit.tlp
        return int.from_bytes(emit.tlp.data, "little")

    def wr(self, reg: int, value: int, be: int = 0xF) -> list:
        out = self.dev.handle_tlp(Tlp.cfg_write(self.rid, reg, value, first_be=be))
        assert out[0].tlp.status == CplStatus.SC
        return out[1:]

    def mrd(self, addr: int, nbytes: int = 4) -> Tlp:
        (emit,) = self.dev.handle_tlp(Tlp.mem_read(addr, nbytes))
        return emit.tlp

    def r32(self, addr: int) -> int:
        cpl = self.mrd(addr)
        assert cpl.status == CplStatus.SC, cpl
        return int.from_bytes(cpl.data, "little")

    def w32(self, addr: int, value: int) -> list:
        return self.dev.handle_tlp(Tlp.mem_write(addr, value.to_bytes(4, "little")))

    def w64(self, addr: int, value: int) -> list:
        return self.dev.handle_tlp(Tlp.mem_write(addr, value.to_bytes(8, "little")))


def portal(i: int) -> int:
    return BAR2 + i * 0x2000


def ims_slot(i: int, s: int) -> int:
    return portal(i) + 0x1000 + 16 * s


def adi_ctrl(i: int) -> int:
    return BAR0 + ADI_TABLE + 8 * i


def adi_pasid(i: int) -> int:
    return BAR0 + ADI_TABLE + 8 * i + 4


def handle(i: int, s: int = 0) -> tuple[int, int]:
    """The (address, data) the fixture programs into ADI i's device IMS slot s."""
    return MSI + 0x1000 * (i + 1), 0x40 + 0x10 * i + s


def ring(i: int) -> int:
    return 0x10_0000 * (i + 1)


def make(*, pasid_interrupts: bool = True, pasid_enable: bool = True, adis: int = 4, mem_ims: bool = True,
         **kw) -> tuple[SiovDevice, Host]:
    """A device as the host driver leaves it: BARs, MSE+BME, PASID on, every ADI enabled with
    PASID 0x100+i (and memory IMS allowed unless ``mem_ims`` is false), its ring at ring(i)
    with 8 entries and device IMS slots 0-1 unmasked."""
    dev = SiovDevice(adis=adis, pasid_interrupts=pasid_interrupts, **kw)
    h = Host(dev)
    h.wr(0x10, BAR0)
    h.wr(0x18, BAR2)
    h.wr(0x04, 0x6)
    if pasid_enable:
        h.wr(PASID_CAP + 4, 1 << 16, be=0xC)
    for i in range(adis):
        h.w32(adi_pasid(i), 0x100 + i)
        h.w32(adi_ctrl(i), ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE | (ADI_CTRL_MEM_IMS_ENABLE if mem_ims else 0))
        h.w64(portal(i) + CMPL_BASE_LO, ring(i))
        h.w32(portal(i) + CMPL_RING_ENTRIES, 8)
        for s in range(min(2, dev.adis()[i].ims.nslots if dev.adis()[i].ims else 0)):
            addr, data = handle(i, s)
            h.w64(ims_slot(i, s), addr)
            h.w64(ims_slot(i, s) + 8, data)          # data, ctrl = 0: unmasked
    return dev, h


def memory_mode(h: Host, i: int, vector: int = 3, qctx: int = QCTX) -> None:
    h.w64(portal(i) + QCTX_BASE_LO, qctx)
    h.w32(portal(i) + IRQ_VECTOR, vector)
    h.w32(portal(i) + IRQ_MODE, IRQ_MODE_IMS_MEMORY)


def slot_pe(h: Host, i: int, s: int = 0, pasid_field: int = 0) -> list:
    """Set ADI i's device IMS slot s ctrl to PASID-enable (bit 3), unmasked, with ``pasid_field``
    in ctrl[31:12] (stored, but never the PASID the ADI sends)."""
    return h.w32(ims_slot(i, s) + 12, IMS_CTRL_PASID_ENABLE | pasid_field << IMS_CTRL_PASID_SHIFT)


def slot_bytes(addr: int, data: int, ctrl: int = 0) -> bytes:
    return struct.pack("<IIII", addr & 0xFFFFFFFF, addr >> 32, data, ctrl)


def cpl_for(mrd: Tlp, payload: bytes | None, status: CplStatus = CplStatus.SC) -> Tlp:
    """The root complex's answer to the device's slot read."""
    if status != CplStatus.SC:
        return Tlp.completion(mrd, 0x0000, status)
    return Tlp.completion(mrd, 0x0000, CplStatus.SC, payload)


# ---- provenance ----------------------------------------------------------------------------------


def test_provenance_helpers() -> None:
    assert function_origin(PF) == PF
    assert adi_origin(PF, 3) == 1 << 32 | 3 << 16 | PF
    assert describe(function_origin(PF)) == "01:00.0"
    assert describe(adi_origin(PF, 3)) == "01:00.0 ADI 3"
    assert describe(adi_origin(0x1A3B, 0)) == "1a:07.3 ADI 0"
    assert describe(None) == "-"
    assert describe(1 << 40).startswith("invalid origin") and describe(-1).startswith("invalid origin")
    assert describe(0x1_0000).startswith("invalid origin")           # RID bits only, ADI flag clear
    assert is_adi(adi_origin(PF, 0)) and not is_adi(function_origin(PF)) and not is_adi(-5)
    assert provenance.origin_rid(adi_origin(0x0208, 7)) == 0x0208
    assert provenance.origin_adi(adi_origin(0x0208, 7)) == 7
    assert provenance.origin_adi(function_origin(0x0208)) is None
    for bad in ((0x10000, 0), (-1, 0), (0, 0x10000), (0, -1)):
        with pytest.raises(ValueError):
            adi_origin(*bad)
    with pytest.raises(ValueError):
        function_origin(0x10000)


@given(rid=st.integers(0, 0xFFFF), index=st.integers(0, 0xFFFF))
def test_provenance_roundtrip(rid: int, index: int) -> None:
    o = adi_origin(rid, index)
    assert provenance.is_valid(o) and is_adi(o)
    assert (provenance.origin_rid(o), provenance.origin_adi(o)) == (rid, index)
    assert o != function_origin(rid) and not is_adi(function_origin(rid))
    assert msgpack.unpackb(msgpack.packb(o)) == o                     # rides the wire as an int


# ---- config space --------------------------------------------------------------------------------


def ext_caps(h: Host) -> list[tuple[int, int, int]]:
    """Walk the extended capability list: (offset, ID, version)."""
    out, off = [], 0x100
    while off:
        hdr = h.rd(off)
        out.append((off, hdr & 0xFFFF, hdr >> 16 & 0xF))
        off = hdr >> 20
        assert len(out) < 64
    return out


def find_dvsec(h: Host, vendor: int, dvsec_id: int) -> int:
    """Linux ``pci_find_dvsec_capability``: 0 when absent."""
    for off, cap_id, _ver in ext_caps(h):
        if cap_id == 0x23 and h.rd(off + 4) & 0xFFFF == vendor and h.rd(off + 8) & 0xFFFF == dvsec_id:
            return off
    return 0


def std_caps(h: Host) -> list[int]:
    ids, ptr = [], h.rd(0x34) & 0xFF
    while ptr:
        dw = h.rd(ptr)
        ids.append(dw & 0xFF)
        ptr = dw >> 8 & 0xFF
    return ids


def test_identity_and_capability_lists() -> None:
    dev = SiovDevice()
    h = Host(dev, rid=0x0000)
    assert h.rd(0x00) == 0x11A2 << 16 | 0x1B36
    assert h.rd(0x04) >> 16 & 0x10, "Capabilities List bit"
    assert std_caps(h) == [0x10, 0x11]                               # PCIe, MSI-X
    assert h.rd(0x40 + 4) & 1 << 28, "FLR capable"
    assert ext_caps(h) == [(PASID_CAP, 0x1B, 1), (DVSEC, 0x23, 1)]


def test_pasid_capability() -> None:
    dev = SiovDevice()
    h = Host(dev, rid=0x0000)
    cap = h.rd(PASID_CAP + 4)
    assert cap & 0xFFFF == 20 << 8, "Max PASID Width 20, no exec / privileged mode"
    assert cap >> 16 == 0, "PASID Enable clear at reset"
    h.wr(PASID_CAP + 4, 0xFFFF_FFFF)
    assert h.rd(PASID_CAP + 4) == 20 << 8 | 1 << 16, "only PASID Enable is writable"
    assert dev.pasid_enabled and dev.pasid_cap.max_pasids == 1 << 20
    h.wr(PASID_CAP + 4, 0, be=0xC)
    assert not dev.pasid_enabled


def test_siov_dvsec_found_with_ims_bit() -> None:
    dev = SiovDevice()
    h = Host(dev, rid=0x0000)
    off = find_dvsec(h, PCI_VENDOR_ID_INTEL, PCI_DVSEC_ID_INTEL_SIOV)
    assert off == DVSEC
    assert find_dvsec(h, 0x1E98, 5) == 0 and find_dvsec(h, 0x8086, 4) == 0
    h1 = h.rd(off + 4)
    assert (h1 & 0xFFFF, h1 >> 16 & 0xF, h1 >> 20) == (0x8086, 0, 0x18)
    dw2 = h.rd(off + 8)
    assert dw2 & 0xFFFF == 5                                         # DVSEC ID
    assert dw2 >> 16 & 0xFF == 0                                     # +0x0A Function Dependency Link
    assert dw2 >> 24 == 1                                            # +0x0B Flags: Homogeneous
    assert h.rd(off + 0x0C) == 0x553                                 # Supported Page Sizes
    assert h.rd(off + 0x10) == 0x1                                   # System Page Size 4 KiB
    assert h.rd(off + 0x14) & 1 == 1                                 # Capabilities: IMS supported
    # read-only fields stay put
    for reg in (off + 4, off + 8, off + 0x0C, off + 0x14):
        before = h.rd(reg)
        h.wr(reg, ~before & 0xFFFF_FFFF)
        assert h.rd(reg) == before
    # System Page Size: exactly one supported bit
    h.wr(off + 0x10, 0x2)
    assert h.rd(off + 0x10) == 0x2 and dev.dvsec.system_page_size == 0x2000
    for bad in (0x3, 0x4, 0x0, 0x800):
        h.wr(off + 0x10, bad)
        assert h.rd(off + 0x10) == 0x2
    assert dev.snapshot()["ims_supported"] is True


@pytest.mark.parametrize("adis, size", [(0, 0x2000), (1, 0x2000), (2, 0x4000), (3, 0x8000), (4, 0x8000),
                                        (5, 0x10000), (64, 0x80000)])
def test_bar_sizing(adis: int, size: int) -> None:
    assert bar2_size(adis) == size
    dev = SiovDevice(adis=adis)
    h = Host(dev, rid=0x0000)
    for reg in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24):
        h.wr(reg, 0xFFFF_FFFF)
    assert h.rd(0x10) == 0xFFFF_C000                                  # BAR0: 16 KiB, 32-bit
    assert h.rd(0x18) == (~(size - 1) & 0xFFFF_FFF0)                  # BAR2: 32-bit memory
    assert [h.rd(r) for r in (0x14, 0x1C, 0x20, 0x24)] == [0, 0, 0, 0]
    assert dev.bar2_size == size


def test_memory_decode_gated_by_mse() -> None:
    dev = SiovDevice()
    h = Host(dev)
    h.wr(0x10, BAR0)
    h.wr(0x18, BAR2)
    assert h.mrd(BAR0).status == CplStatus.UR and h.mrd(BAR2).status == CplStatus.UR
    h.wr(0x04, 0x2)
    assert h.r32(BAR0) == ENGINE_MAGIC and h.r32(BAR2) == ENGINE_MAGIC and h.r32(portal(3)) == ENGINE_MAGIC
    assert h.mrd(BAR2 + 0x8000).status == CplStatus.UR               # just past BAR2
    assert dev.snapshot()["counters"]["mrd_unmapped"] == 3


def test_bar2_holes_read_zero() -> None:
    dev, h = make(adis=3)
    assert h.r32(portal(3)) == 0 and h.w32(portal(3) + DOORBELL, 1) == []
    assert dev.snapshot()["counters"]["mwr_unmapped"] == 0


def test_config_to_other_devfn_is_ur_and_bus_is_captured() -> None:
    dev = SiovDevice()
    (e,) = dev.handle_tlp(Tlp.cfg_read(0x0301, 0))
    assert e.tlp.status == CplStatus.UR and dev.snapshot()["counters"]["cfg_ur"] == 1
    (e,) = dev.handle_tlp(Tlp.cfg_read(0x0300, 0))
    assert e.tlp.status == CplStatus.SC and e.tlp.completer_id == 0x0300 and dev.rid == 0x0300
    assert list(dev.functions()) == [0x0300]
    assert dev.adis()[2].origin == adi_origin(0x0300, 2)


# ---- ADI management registers ----------------------------------------------------------------------


def test_adi_table_programming() -> None:
    dev = SiovDevice(adis=4)
    h = Host(dev)
    h.wr(0x10, BAR0)
    h.wr(0x04, 0x2)
    assert h.r32(BAR0 + ADI_CAP) == 4 | ADI_CAP_PASID_INTERRUPTS
    assert h.r32(BAR0 + 0x38) == 0 and h.r32(BAR0 + 0x104) == 0       # PF engine above 0x34: zero
    h.w32(adi_pasid(2), 0xFFFF_FFFF)
    assert h.r32(adi_pasid(2)) == 0xF_FFFF
    h.w32(adi_ctrl(2), 0xFFFF_FFFF & ~ADI_CTRL_RESET)
    assert h.r32(adi_ctrl(2)) == 0x7, "only EN, PE and MIE are stored"
    adi = dev.adis()[2]
    assert adi.enabled and adi.pasid == 0xF_FFFF
    # byte-enabled write to ADI_PASID's low byte only
    dev.handle_tlp(Tlp.mem_write(adi_pasid(2), b"\x34"))
    assert h.r32(adi_pasid(2)) == 0xF_FF34
    # beyond the last ADI: reads 0, writes ignored
    h.w32(adi_ctrl(4), 3)
    assert h.r32(adi_ctrl(4)) == 0 and h.r32(BAR0 + 0xFFC) == 0
    assert [a.pasid for a in dev.adis()] == [0, 0, 0xF_FF34, 0]


def test_adi_portal_registers() -> None:
    dev, h = make()
    p = portal(1)
    assert h.r32(p) == ENGINE_MAGIC
    assert h.r32(p + IMS_CAP) == 8 and h.r32(p + IMS_MEM_SLOTS) == 16
    h.w32(p + IMS_MEM_SLOTS, 99)
    assert h.r32(p + IMS_MEM_SLOTS) == 16
    h.w64(p + QCTX_BASE_LO, 0x1234_5678_9ABC_DEFF)
    assert (h.r32(p + QCTX_BASE_LO), h.r32(p + QCTX_BASE_HI)) == (0x9ABC_DEF0, 0x1234_5678)
    for mode in (0, 1, 2):
        h.w32(p + IRQ_MODE, mode)
        assert h.r32(p + IRQ_MODE) == mode
    h.w32(p + IRQ_MODE, 3)
    assert h.r32(p + IRQ_MODE) == 2, "reserved modes are ignored"
    # ADI page 1: its IMS slots, IDXD layout, reset value masked
    assert h.r32(ims_slot(1, 0)) == handle(1)[0] and h.r32(ims_slot(1, 5) + 12) == 1


# ---- doorbells: device-kind IMS ----------------------------------------------------------------------


@pytest.mark.parametrize("pasid_interrupts", [True, False])
@pytest.mark.parametrize("ctrl_pe", [True, False])
def test_doorbell_device_ims(pasid_interrupts: bool, ctrl_pe: bool) -> None:
    """A device-kind slot's MWr is tagged iff the knob is on (and the ADI's PASID is enabled) AND
    the slot's ctrl has PASID-enable (bit 3); the tag is the ADI's PASID."""
    dev, h = make(pasid_interrupts=pasid_interrupts)
    assert bool(h.r32(BAR0 + ADI_CAP) & ADI_CAP_PASID_INTERRUPTS) == pasid_interrupts, "the driver can tell"
    if ctrl_pe:
        assert slot_pe(h, 2) == []
    out = h.w32(portal(2) + DOORBELL, 0xC0FFEE)
    assert [e.tlp.type for e in out] == [TlpType.MEM_WRITE, TlpType.MEM_WRITE]
    dma, irq = out
    assert dma.tlp.address == ring(2) and dma.tlp.requester_id == PF and dma.tlp.pasid == 0x102
    assert dma.tlp.data == struct.pack("<IIQ", 0xC0FFEE, 1, 0) and dma.origin is None
    addr, data = handle(2)
    assert irq.tlp.address == addr and irq.tlp.data == data.to_bytes(4, "little")
    assert irq.tlp.requester_id == PF and irq.tlp.length == 1
    assert irq.tlp.pasid == (0x102 if pasid_interrupts and ctrl_pe else None)
    assert irq.origin == adi_origin(PF, 2) and describe(irq.origin) == "01:00.0 ADI 2"
    for e in out:
        assert Tlp.unpack(e.tlp.pack()) == e.tlp
    assert h.r32(portal(2) + COMPLETED) == 1 and h.r32(portal(2) + IMS_SENT) == 1
    snap = dev.snapshot()["adis"][2]
    assert (snap["doorbells"], snap["completed"], snap["ims_sent"]) == (1, 1, 1)
    assert (snap["pasid"], snap["enabled"]) == (0x102, True)


def test_irq_burst_on_device_ims_and_memory_ims_raises_one() -> None:
    """IRQ_BURST on an ADI: a device-kind slot's message n times after the record; a memory-kind
    slot is fetched and raised once (the burst does not apply).  Without the generator the
    register reads 1."""
    dev, h = make()
    h.w32(portal(2) + IRQ_BURST, 4)
    assert h.r32(portal(2) + IRQ_BURST) == 1 and len(h.w32(portal(2) + DOORBELL, 0)) == 2
    dev, h = make(irq_generator=True)
    h.w32(portal(2) + IRQ_BURST, 4)
    assert h.r32(portal(2) + IRQ_BURST) == 4
    dma, *irqs = h.w32(portal(2) + DOORBELL, 1)
    assert dma.tlp.address == ring(2) and len(irqs) == 4
    assert all(e.tlp == irqs[0].tlp and e.origin == adi_origin(PF, 2) for e in irqs)
    assert h.r32(portal(2) + IMS_SENT) == 4
    memory_mode(h, 1, vector=3)
    h.w32(portal(1) + IRQ_BURST, 4)
    dma, mrd = h.w32(portal(1) + DOORBELL, 2)
    (irq,) = dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(*handle(1), 0)))
    assert irq.origin == adi_origin(PF, 1) and h.r32(portal(1) + IMS_SENT) == 1


def test_irq_mode_0_and_1_both_use_device_ims() -> None:
    dev, h = make()
    h.w32(portal(0) + IRQ_VECTOR, 1)
    for mode in (0, 1):
        h.w32(portal(0) + IRQ_MODE, mode)
        _, irq = h.w32(portal(0) + DOORBELL, 7)
        assert (irq.tlp.address, irq.tlp.data) == (handle(0, 1)[0], handle(0, 1)[1].to_bytes(4, "little"))


def test_pasid_prefix_needs_pf_pasid_enable_and_adi_pe() -> None:
    dev, h = make(pasid_enable=False)
    slot_pe(h, 0)                                                     # the slot asks to be tagged
    dma, irq = h.w32(portal(0) + DOORBELL, 1)
    assert dma.tlp.pasid is None and irq.tlp.pasid is None
    h.wr(PASID_CAP + 4, 1 << 16, be=0xC)
    h.w32(adi_ctrl(0), ADI_CTRL_ENABLE)                               # ADI PE clear
    dma, irq = h.w32(portal(0) + DOORBELL, 1)
    assert dma.tlp.pasid is None and irq.tlp.pasid is None
    h.w32(adi_ctrl(0), ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE)
    dma, irq = h.w32(portal(0) + DOORBELL, 1)
    assert dma.tlp.pasid == irq.tlp.pasid == 0x100
    assert irq.origin == adi_origin(PF, 0), "provenance is the ADI whatever the tagging"
    h.w32(ims_slot(0, 0) + 12, 0)                                     # slot ctrl PASID-enable clear
    dma, irq = h.w32(portal(0) + DOORBELL, 1)
    assert dma.tlp.pasid == 0x100 and irq.tlp.pasid is None, "DMA still tagged; the slot's MWr is not"
    assert irq.origin == adi_origin(PF, 0)


def test_slot_ctrl_pasid_does_not_choose_the_tag() -> None:
    """The ADI tags with ADI_PASID (programmed by the host), never with what the slot's PASID field says."""
    dev, h = make()
    h.w32(ims_slot(1, 0) + 12, 0x8 | 0x777 << 12)                     # PE + PASID 0x777 in ctrl, unmasked
    assert h.r32(ims_slot(1, 0) + 12) == 0x8 | 0x777 << 12            # stored, reads back
    _, irq = h.w32(portal(1) + DOORBELL, 1)
    assert irq.tlp.pasid == 0x101


@pytest.mark.parametrize("pasid_interrupts", [True, False])
def test_device_slot_naming_another_pasid_still_sends_the_adis_own(pasid_interrupts: bool) -> None:
    """ADI 1's slot ctrl names ADI 3's (real, enabled) PASID: the message still goes out with ADI 1's
    PASID -- on a doorbell, on a replay, and after the host re-programs ADI_PASID -- or untagged when
    the device cannot tag interrupts.  The PASID field without PE tags nothing."""
    dev, h = make(pasid_interrupts=pasid_interrupts)
    own = 0x101 if pasid_interrupts else None
    slot_pe(h, 1, pasid_field=0x103)
    assert h.r32(ims_slot(1, 0) + 12) == IMS_CTRL_PASID_ENABLE | 0x103 << IMS_CTRL_PASID_SHIFT
    dma, irq = h.w32(portal(1) + DOORBELL, 1)
    assert dma.tlp.pasid == 0x101 and irq.tlp.pasid == own and irq.origin == adi_origin(PF, 1)
    _, other = h.w32(portal(3) + DOORBELL, 1)                         # ADI 3 itself, slot ctrl PE clear
    assert other.tlp.pasid is None
    h.w32(ims_slot(1, 0) + 12, 1 | IMS_CTRL_PASID_ENABLE | 0x103 << IMS_CTRL_PASID_SHIFT)  # mask
    assert len(h.w32(portal(1) + DOORBELL, 2)) == 1
    (irq,) = slot_pe(h, 1, pasid_field=0x103)                         # unmask: replay
    assert irq.tlp.pasid == own and irq.origin == adi_origin(PF, 1)
    h.w32(adi_pasid(1), 0x555)                                        # the host re-programs ADI_PASID
    _, irq = h.w32(portal(1) + DOORBELL, 3)
    assert irq.tlp.pasid == (0x555 if pasid_interrupts else None)
    h.w32(ims_slot(1, 0) + 12, 0x103 << IMS_CTRL_PASID_SHIFT)         # PASID field, PE clear
    _, irq = h.w32(portal(1) + DOORBELL, 4)
    assert irq.tlp.pasid is None and irq.origin == adi_origin(PF, 1)


def test_device_ims_mask_pending_replay_keeps_adi_identity() -> None:
    dev, h = make(pasid_interrupts=True)
    h.w32(ims_slot(3, 0) + 12, 1 | IMS_CTRL_PASID_ENABLE)             # mask, PASID-enable
    out = h.w32(portal(3) + DOORBELL, 1)
    assert len(out) == 1 and dev.adis()[3].ims.is_pending(0)
    (irq,) = slot_pe(h, 3)                                            # unmask (PE kept): replay
    assert irq.origin == adi_origin(PF, 3) and irq.tlp.pasid == 0x103 and irq.tlp.requester_id == PF
    assert dev.snapshot()["adis"][3]["ims_replayed"] == 1
    # the replay is tagged per the ctrl at the time it is sent: unmasking with PE clear sends it untagged
    h.w32(ims_slot(3, 0) + 12, 1 | IMS_CTRL_PASID_ENABLE)
    h.w32(portal(3) + DOORBELL, 2)
    (irq,) = h.w32(ims_slot(3, 0) + 12, 0)
    assert irq.origin == adi_origin(PF, 3) and irq.tlp.pasid is None and irq.tlp.requester_id == PF
    assert dev.snapshot()["adis"][3]["ims_replayed"] == 2


def test_device_ims_replay_blocked_while_adi_disabled() -> None:
    dev, h = make()
    h.w32(ims_slot(3, 0) + 12, 1)
    h.w32(portal(3) + DOORBELL, 1)
    h.w32(adi_ctrl(3), 0)                                             # ADI disabled
    assert h.w32(ims_slot(3, 0) + 12, 0) == []
    h.w32(adi_ctrl(3), ADI_CTRL_ENABLE)
    h.w32(ims_slot(3, 0) + 12, 1)
    h.w32(portal(3) + DOORBELL, 1)
    h.wr(0x04, 0x2)                                                   # PF BME clear
    assert h.w32(ims_slot(3, 0) + 12, 0) == []


def test_no_device_ims_slot_means_record_only() -> None:
    dev, h = make(adi_ims_slots=0)
    assert h.r32(portal(0) + IMS_CAP) == 0 and h.r32(ims_slot(0, 0)) == 0
    (dma,) = h.w32(portal(0) + DOORBELL, 1)
    assert dma.tlp.address == ring(0)
    h.w32(portal(0) + IRQ_VECTOR, 8)
    assert dev.snapshot()["adis"][0]["ims_invalid"] == 1


def test_adi_disabled_or_bme_clear_sends_nothing() -> None:
    dev, h = make()
    h.w32(adi_ctrl(1), ADI_CTRL_PASID_ENABLE)                         # EN clear
    assert h.w32(portal(1) + DOORBELL, 1) == []
    assert h.w32(portal(0) + DOORBELL, 1) != [], "other ADIs unaffected"
    h.w32(adi_ctrl(1), ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE)
    h.wr(0x04, 0x2)                                                   # PF BME clear
    assert h.w32(portal(1) + DOORBELL, 1) == [] and h.w32(portal(0) + DOORBELL, 1) == []
    assert h.r32(portal(1) + COMPLETED) == 0
    snap = dev.snapshot()["adis"][1]
    assert snap["doorbells"] == 2 and snap["doorbells_dropped"] == 2


def test_pf_engine_is_a_plain_function() -> None:
    dev, h = make()
    h.wr(0x7C, 0x8000_0000, be=0xC)                                  # MSI-X Enable
    h.w64(BAR0 + 0x2000, MSI + 0xF000)
    h.w64(BAR0 + 0x2008, 0x99)
    h.w64(BAR0 + CMPL_BASE_LO, 0x50_0000)
    h.w32(BAR0 + CMPL_RING_ENTRIES, 4)
    dma, irq = h.w32(BAR0 + DOORBELL, 1)
    assert dma.tlp.pasid is None and irq.tlp.pasid is None
    assert irq.origin == function_origin(PF) and describe(irq.origin) == "01:00.0"


# ---- doorbells: memory-kind IMS ----------------------------------------------------------------------


@pytest.mark.parametrize("pasid_interrupts", [True, False])
@pytest.mark.parametrize("fetched_ctrl", [0, IMS_CTRL_PASID_ENABLE | 0x777 << IMS_CTRL_PASID_SHIFT,
                                          0x103 << IMS_CTRL_PASID_SHIFT, 0xFFFF_FFFE])
def test_memory_ims_fetch_then_send_exactly_what_was_fetched(pasid_interrupts: bool, fetched_ctrl: int) -> None:
    """Memory-kind: tagged with the ADI's PASID per the knob alone, whatever the fetched ctrl says."""
    dev, h = make(pasid_interrupts=pasid_interrupts)
    memory_mode(h, 1, vector=3)
    out = h.w32(portal(1) + DOORBELL, 0xAB)
    assert [e.tlp.type for e in out] == [TlpType.MEM_WRITE, TlpType.MEM_READ_64]
    dma, mrd = out
    assert dma.tlp.pasid == 0x101 and dma.origin is None
    assert mrd.tlp.address == QCTX + 0x30 and mrd.tlp.length == 4 and mrd.tlp.requester_id == PF
    assert mrd.tlp.pasid == 0x101, "the slot read is DMA: tagged whatever the interrupt knob"
    assert mrd.origin is None and Tlp.unpack(mrd.tlp.pack()) == mrd.tlp
    # The owner's RAM holds ADI 2's handle: the device does not care whose it is.
    stolen_addr, stolen_data = handle(2)
    (irq,) = dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(stolen_addr, stolen_data, fetched_ctrl)))
    assert irq.tlp.type == TlpType.MEM_WRITE and irq.tlp.address == stolen_addr
    assert irq.tlp.data == stolen_data.to_bytes(4, "little") and irq.tlp.requester_id == PF
    assert irq.tlp.pasid == (0x101 if pasid_interrupts else None)
    assert irq.origin == adi_origin(PF, 1), "provenance names the ADI that really sent it"
    snap = dev.snapshot()["adis"][1]
    assert (snap["ims_mem_fetches"], snap["ims_sent"], snap["ims_mem_in_flight"]) == (1, 1, 0)
    assert h.r32(portal(1) + IMS_SENT) == 1
    assert dev.snapshot()["fetch_tags_in_flight"] == 0


def test_memory_ims_sends_any_64bit_address() -> None:
    dev, h = make()
    memory_mode(h, 0, vector=0, qctx=0x8000)
    _, mrd = h.w32(portal(0) + DOORBELL, 1)
    assert mrd.tlp.type == TlpType.MEM_READ and mrd.tlp.address == 0x8000
    (irq,) = dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(0x7_DEAD_BEE7, 0xFFFF_FFFF, ctrl=0xFFFF_FFF8)))
    assert irq.tlp.type == TlpType.MEM_WRITE_64 and irq.tlp.address == 0x7_DEAD_BEE4
    assert irq.tlp.data == b"\xff\xff\xff\xff"
    assert irq.tlp.pasid == 0x100, "the ADI's PASID, not the fetched ctrl's 0xFFFFF"


def test_memory_ims_masked_slot_sends_nothing() -> None:
    dev, h = make()
    memory_mode(h, 2)
    _, mrd = h.w32(portal(2) + DOORBELL, 1)
    assert dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(*handle(2), ctrl=1))) == []
    snap = dev.snapshot()["adis"][2]
    assert snap["ims_mem_masked"] == 1 and snap["ims_sent"] == 0 and snap["ims_mem_in_flight"] == 0


@pytest.mark.parametrize("bad", ["UR", "CA", "short", "poisoned", "lower_address", "byte_count"])
def test_memory_ims_failed_fetch_sends_nothing(bad: str) -> None:
    dev, h = make()
    memory_mode(h, 2)
    _, mrd = h.w32(portal(2) + DOORBELL, 1)
    good = slot_bytes(*handle(2))
    if bad in ("UR", "CA"):
        cpl = cpl_for(mrd.tlp, None, CplStatus[bad])
    elif bad == "short":
        cpl = Tlp.completion(mrd.tlp, 0, CplStatus.SC, good[:4], byte_count=4)
    elif bad == "poisoned":
        cpl = cpl_for(mrd.tlp, good)
        cpl.ep = True
    elif bad == "lower_address":
        cpl = Tlp.completion(mrd.tlp, 0, CplStatus.SC, good, lower_address=0x40)
    else:
        cpl = Tlp.completion(mrd.tlp, 0, CplStatus.SC, good, byte_count=32)
    assert Tlp.unpack(cpl.pack()) == cpl, "a well-formed TLP; only its meaning is wrong"
    assert dev.handle_tlp(cpl) == []
    snap = dev.snapshot()["adis"][2]
    assert snap["ims_mem_fetch_failed"] == 1 and snap["ims_sent"] == 0 and snap["ims_mem_in_flight"] == 0


def test_memory_ims_gate_closed_while_in_flight() -> None:
    dev, h = make()
    memory_mode(h, 0)
    _, mrd = h.w32(portal(0) + DOORBELL, 1)
    h.w32(adi_ctrl(0), 0)
    assert dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(*handle(0)))) == []
    assert dev.snapshot()["adis"][0]["ims_mem_blocked"] == 1


def test_memory_ims_needs_the_owners_mem_ims_enable() -> None:
    """The portal is the guest's: without ADI_CTRL.MIE (set by the PF's owner) it cannot select
    memory IMS on its own and send whatever it stored in its memory."""
    dev, h = make(mem_ims=False)
    memory_mode(h, 0)
    out = h.w32(portal(0) + DOORBELL, 1)
    assert len(out) == 1 and out[0].tlp.address == ring(0), "the record only: no slot fetch"
    assert dev.snapshot()["adis"][0]["ims_invalid"] == 1
    h.w32(adi_ctrl(0), ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE | ADI_CTRL_MEM_IMS_ENABLE)
    _, mrd = h.w32(portal(0) + DOORBELL, 1)
    assert mrd.tlp.type == TlpType.MEM_READ_64, "with MIE set the slot is fetched"


def test_memory_ims_vector_beyond_queue_context_is_invalid() -> None:
    dev, h = make()
    memory_mode(h, 0, vector=16)
    out = h.w32(portal(0) + DOORBELL, 1)
    assert len(out) == 1 and dev.snapshot()["adis"][0]["ims_invalid"] == 1


def test_unexpected_completions_are_counted_and_dropped() -> None:
    dev, h = make()
    memory_mode(h, 0)
    _, mrd = h.w32(portal(0) + DOORBELL, 1)
    wrong_tag = Tlp.completion(Tlp.mem_read(QCTX + 0x30, 16, PF, tag=mrd.tlp.tag + 1), 0, CplStatus.SC,
                               slot_bytes(*handle(0)))
    wrong_rid = Tlp.completion(Tlp.mem_read(QCTX + 0x30, 16, PF + 1, tag=mrd.tlp.tag), 0, CplStatus.SC,
                               slot_bytes(*handle(0)))
    assert dev.handle_tlp(wrong_tag) == [] and dev.handle_tlp(wrong_rid) == []
    assert dev.snapshot()["counters"]["cpl_unexpected"] == 2
    assert dev.fetches.in_flight() == 1, "the real read is still outstanding"
    (irq,) = dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(*handle(0))))
    assert dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(*handle(0)))) == [], "a duplicate is unexpected"
    assert dev.snapshot()["counters"]["cpl_unexpected"] == 3


def test_fetch_tags_are_shared_and_bounded() -> None:
    dev, h = make()
    h.w32(portal(0) + CMPL_RING_ENTRIES, 64)
    h.w32(portal(1) + CMPL_RING_ENTRIES, 64)
    memory_mode(h, 0)
    memory_mode(h, 1)
    mrds = []
    for n in range(FETCH_TAGS):
        mrds.append(h.w32(portal(n % 2) + DOORBELL, n)[1].tlp)
    assert sorted(m.tag for m in mrds) == list(range(FETCH_TAGS)), "one tag space for all ADIs (one RID)"
    out = h.w32(portal(0) + DOORBELL, 99)
    assert len(out) == 1, "record written, no tag left: the slot read waits for one"
    assert dev.snapshot()["adis"][0]["ims_mem_no_tag"] == 1
    assert dev.snapshot()["adis"][0]["ims_mem_fetch_failed"] == 0, "queued, not dropped"
    irq, queued = dev.handle_tlp(cpl_for(mrds[5], slot_bytes(*handle(1))))
    assert irq.origin == adi_origin(PF, 1)                            # mrds[5] was ADI 1's
    # the freed tag goes at once to the waiting read (ADI 0's), after the interrupt
    assert queued.origin is None and queued.tlp.type == TlpType.MEM_READ_64 and queued.tlp.tag == mrds[5].tag
    assert (queued.tlp.address, queued.tlp.pasid, queued.tlp.requester_id) == (QCTX + 0x30, 0x100, PF)
    assert dev.snapshot()["adis"][0]["ims_mem_fetches"] == FETCH_TAGS // 2 + 1
    (irq,) = dev.handle_tlp(cpl_for(queued.tlp, slot_bytes(*handle(0))))
    assert irq.origin == adi_origin(PF, 0), "nothing else waiting: only the interrupt"
    out = h.w32(portal(0) + DOORBELL, 100)
    assert out[1].tlp.tag == mrds[5].tag


def test_doorbell_order_on_the_wire_for_two_adis() -> None:
    """ADI 0 device IMS, ADI 1 memory IMS: each record precedes its own interrupt traffic."""
    dev, h = make()
    memory_mode(h, 1)
    a = h.w32(portal(0) + DOORBELL, 1)
    b = h.w32(portal(1) + DOORBELL, 2)
    assert [(e.tlp.type, e.origin) for e in a] == [(TlpType.MEM_WRITE, None), (TlpType.MEM_WRITE, adi_origin(PF, 0))]
    assert [(e.tlp.type, e.origin) for e in b] == [(TlpType.MEM_WRITE, None), (TlpType.MEM_READ_64, None)]


# ---- resets ----------------------------------------------------------------------------------------


def test_adi_reset_by_register() -> None:
    dev, h = make()
    memory_mode(h, 1)
    _, mrd = h.w32(portal(1) + DOORBELL, 1)
    h.w32(ims_slot(1, 0) + 12, 1)
    h.w32(portal(1) + DOORBELL, 2)                                    # still memory mode: 2nd fetch
    h.w32(adi_ctrl(1), ADI_CTRL_RESET | ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE)
    assert h.r32(adi_ctrl(1)) == 3, "bit 31 reads 0; EN/PE of the same write land"
    assert h.r32(adi_pasid(1)) == 0x101, "ADI_PASID is the host's: kept"
    p = portal(1)
    assert [h.r32(p + r) for r in (CMPL_BASE_LO, CMPL_RING_ENTRIES, IRQ_MODE, IRQ_VECTOR, COMPLETED,
                                   QCTX_BASE_LO, QCTX_BASE_HI)] == [0] * 7
    assert h.r32(p + IMS_CAP) == 8 and h.r32(p + IMS_MEM_SLOTS) == 16
    assert h.r32(ims_slot(1, 0)) == 0 and h.r32(ims_slot(1, 0) + 12) == 1, "slots zeroed and masked"
    # the fetches in flight at the reset are orphans: their completions do nothing
    assert dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(*handle(1)))) == []
    assert dev.snapshot()["counters"]["cpl_orphaned"] == 1
    assert dev.snapshot()["adis"][1]["resets"] == 1
    # other ADIs untouched
    assert h.r32(portal(0) + CMPL_BASE_LO) == ring(0)


def test_adi_reset_by_control_interface() -> None:
    dev, h = make()
    h.w32(portal(2) + DOORBELL, 1)
    assert dev.adi_reset(2) and not dev.adi_reset(4) and not dev.adi_reset(-1)
    assert h.r32(portal(2) + COMPLETED) == 0 and h.r32(adi_ctrl(2)) == 7, "management registers kept"
    assert h.w32(portal(2) + DOORBELL, 1) == [], "ring cleared: the ADI driver must reprogram"


def test_orphan_tag_is_not_reused_before_its_completion() -> None:
    dev, h = make()
    memory_mode(h, 0)
    _, old = h.w32(portal(0) + DOORBELL, 1)
    dev.adi_reset(0)
    h.w32(portal(1) + CMPL_RING_ENTRIES, 64)
    memory_mode(h, 1)
    tags = {h.w32(portal(1) + DOORBELL, n)[1].tlp.tag for n in range(FETCH_TAGS - 1)}
    assert old.tlp.tag not in tags
    assert len(h.w32(portal(1) + DOORBELL, 99)) == 1                  # pool exhausted incl. the orphan: waits
    (queued,) = dev.handle_tlp(cpl_for(old.tlp, slot_bytes(*handle(1))))
    assert queued.origin is None and queued.tlp.type == TlpType.MEM_READ_64, \
        "not credited to ADI 1: no interrupt, only ADI 1's waiting read starts"
    assert queued.tlp.tag == old.tlp.tag and dev.snapshot()["counters"]["cpl_orphaned"] == 1


@pytest.mark.parametrize("via", ["devctl", "control"])
def test_pf_flr_resets_pf_and_every_adi(via: str) -> None:
    dev, h = make()
    memory_mode(h, 3)
    _, mrd = h.w32(portal(3) + DOORBELL, 1)
    if via == "devctl":
        assert h.wr(0x48, 0x8000, be=0x3) == []
    else:
        assert dev.function_level_reset(PF) and not dev.function_level_reset(PF + 1)
    assert h.rd(0x10) == 0 and h.rd(0x18) == 0 and h.rd(0x04) & 0x6 == 0
    assert h.rd(PASID_CAP + 4) >> 16 == 0 and not dev.pasid_enabled
    assert dev.fetches.in_flight() == 0
    assert dev.handle_tlp(cpl_for(mrd.tlp, slot_bytes(*handle(3)))) == []
    h.wr(0x10, BAR0)
    h.wr(0x18, BAR2)
    h.wr(0x04, 0x6)
    for i in range(4):
        assert h.r32(adi_ctrl(i)) == 0 and h.r32(adi_pasid(i)) == 0
        assert h.r32(portal(i) + CMPL_BASE_LO) == 0 and h.r32(ims_slot(i, 0) + 12) == 1
    assert h.w32(portal(0) + DOORBELL, 1) == []


# ---- observation -----------------------------------------------------------------------------------


def test_snapshot_is_msgpack_friendly_and_complete() -> None:
    dev, h = make()
    memory_mode(h, 1)
    h.w32(portal(0) + DOORBELL, 1)
    h.w32(portal(1) + DOORBELL, 1)
    snap = dev.snapshot()
    assert msgpack.unpackb(msgpack.packb(snap), strict_map_key=False) == snap
    assert snap["kind"] == "siov" and snap["num_adis"] == 4 and snap["pf_rid"] == PF and list(snap["functions"]) == ["01:00.0"]
    assert snap["functions"]["01:00.0"]["kind"] == "PF"
    for key in ("doorbells", "completed", "ims_sent", "ims_mem_fetches", "ims_mem_masked",
                "ims_mem_fetch_failed", "pasid", "enabled", "origin", "name"):
        assert all(key in a for a in snap["adis"]), key
    assert snap["adis"][0]["ims_sent"] == 1 and snap["adis"][1]["ims_mem_in_flight"] == 1
    assert snap["adis"][3]["name"] == "01:00.0 ADI 3"
    assert [a.index for a in dev.adis()] == [0, 1, 2, 3]


def test_constructor_limits() -> None:
    with pytest.raises(ValueError):
        SiovDevice(adis=449)
    with pytest.raises(ValueError):
        SiovDevice(adi_ims_slots=257)
    SiovDevice(adis=448, adi_ims_slots=256)

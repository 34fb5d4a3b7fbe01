"""device.ims + the IMS path of device.function: slots over MMIO, mask -> pending -> replay,
Bus Master Enable, PASID tagging (slot PE bit AND the device's pasid_interrupts knob), the
work engine's IRQ_MODE / IMS_CAP, FLR."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.caps.sriov import PCI_SRIOV_BAR, PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_MSE, PCI_SRIOV_CTRL_VFE, PCI_SRIOV_NUM_VF
from device.engine import (
    COMPLETED,
    DOORBELL,
    IMS_CAP,
    IMS_PENDED,
    IMS_SENT,
    IRQ_MODE,
    MSIX_PENDED,
    MSIX_SENT,
)
from device.function import IMS_OFFSET, MAX_IMS_SLOTS, Function
from device.ims import IMS_CTRL_PASID_ENABLE, IMS_CTRL_VECTOR_MASKBIT, ImsStore
from device.sriov_device import SriovDevice
from fabric.tlp import CplStatus, Tlp, TlpType
# pytest puts this directory on sys.path (no __init__.py): share the TLP-driving Host helper
from test_device_function import BAR, HOST_RID, MSI, PF, RING, SRIOV, VF_BAR, Host

RID = 0x0210
MSI_ADDR = 0xFEE0_2000


def ctrl(*, masked: bool = False, pasid: int | None = None) -> int:
    """An IMS ctrl value: mask bit, and PASID Enable + PASID when ``pasid`` is given."""
    value = IMS_CTRL_VECTOR_MASKBIT if masked else 0
    if pasid is not None:
        value |= IMS_CTRL_PASID_ENABLE | pasid << 12
    return value


def program(s: ImsStore, slot: int, addr: int, data: int, ctrl_value: int = 0) -> list:
    base = slot * 16
    out = s.write(base, 8, addr)
    out += s.write(base + 8, 4, data)
    out += s.write(base + 12, 4, ctrl_value)
    return out


def live(n: int = 8, *, pasid_interrupts: bool = True) -> ImsStore:
    s = ImsStore(n, requester_id=RID, pasid_interrupts=pasid_interrupts)
    s.bus_master = True
    return s


def assert_msg(emit, addr: int, data: int, *, rid: int = RID, pasid: int | None = None) -> None:
    assert emit is not None
    tlp = emit.tlp
    assert tlp.type == (TlpType.MEM_WRITE if addr < 1 << 32 else TlpType.MEM_WRITE_64)
    assert tlp.address == addr and tlp.length == 1 and tlp.first_be == 0xF and tlp.last_be == 0
    assert tlp.data == data.to_bytes(4, "little")
    assert tlp.requester_id == rid and emit.origin == rid
    assert tlp.pasid == pasid
    assert Tlp.unpack(tlp.pack()) == tlp  # the PASID prefix survives the wire


# ---- ImsStore on its own --------------------------------------------------------------------------


def test_reset_state_and_reset_clears() -> None:
    s = ImsStore(3, requester_id=RID)
    assert len(s.slots) == 48 and not s.bus_master and s.pasid_interrupts
    for slot in range(3):
        assert [s.read(slot * 16 + f) for f in (0, 4, 8, 12)] == [0, 0, 0, 1]
        assert s.is_masked(slot) and not s.is_pending(slot)
    assert s.snapshot() == []
    program(s, 1, MSI_ADDR, 0x41, ctrl(masked=True, pasid=7))
    s.notify(1)
    assert s.is_pending(1) and s.snapshot()[0]["pending"]
    s.reset()
    assert [s.read(16 + f) for f in (0, 4, 8, 12)] == [0, 0, 0, 1]
    assert not s.is_pending(1) and s.snapshot() == []
    assert s.pended == 1  # counters are statistics, they survive reset
    with pytest.raises(ValueError):
        ImsStore(0)


def test_every_field_writable_except_reserved_ctrl_bits() -> None:
    s = live(2)
    for f in (0, 4, 8, 12):
        s.write(16 + f, 4, 0xFFFF_FFFF)
    assert s.read(16) == 0xFFFF_FFFC  # address bits 1:0 read 0 (a DW-aligned message, as MSI-X)
    assert s.read(20) == 0xFFFF_FFFF and s.read(24) == 0xFFFF_FFFF
    assert s.read(28) == 0xFFFF_F009  # bits 2:1 and 11:4 reserved, read 0
    s.write(28, 4, 0x0000_0FF6)  # only reserved bits (and mask clear)
    assert s.read(28) == 0
    assert s.read(0, 8) == 0 and s.read(8, 8) == 1 << 32  # slot 0 untouched by slot 1's writes
    assert s.message(1) == (0xFFFF_FFFF_FFFF_FFFC, 0xFFFF_FFFF)


def test_qword_accesses_alignment_and_holes() -> None:
    s = live(2)
    assert s.write(16, 8, 0x0000_0001_FEE0_0004) == []
    assert s.read(16) == 0xFEE0_0004 and s.read(20) == 1 and s.read(16, 8) == 0x1_FEE0_0004
    assert s.write(24, 8, (ctrl(pasid=0x12345) << 32) | 0xAB) == []  # data + ctrl in one QW
    assert s.message(1) == (0x1_FEE0_0004, 0xAB) and not s.is_masked(1)
    assert s.read(28) == 0x1234_5008
    for off, size in ((4, 8), (2, 4), (0, 2), (0, 16), (-4, 4)):
        with pytest.raises(ValueError):
            s.read(off, size)
        with pytest.raises(ValueError):
            s.write(off, size, 0)
    assert s.read(32) == 0 and s.write(32, 4, 5) == [] and s.read(32) == 0  # beyond the last slot


def test_unmasked_notify_sends_and_above_4gib_is_4dw() -> None:
    s = live()
    program(s, 3, MSI_ADDR, 0x4023)
    assert_msg(s.notify(3), MSI_ADDR, 0x4023)
    program(s, 4, 0x1_2345_6780, 7)
    assert_msg(s.notify(4), 0x1_2345_6780, 7)
    assert s.sent == 2 and s.pended == 0 and not any(s.pending)


def test_masked_slot_pends_and_unmask_delivers_once() -> None:
    s = live()
    program(s, 5, MSI_ADDR, 0x55, ctrl(masked=True))
    assert s.notify(5) is None and s.notify(5) is None  # one pending flag, not a queue
    assert s.is_pending(5) and s.pended == 2 and s.sent == 0
    assert s.write(5 * 16 + 12, 4, ctrl(masked=True, pasid=3)) == []  # still masked: nothing
    (emit,) = s.write(5 * 16 + 12, 4, ctrl())  # the unmasking write returns the MWr
    assert_msg(emit, MSI_ADDR, 0x55)
    assert not s.is_pending(5) and s.replayed == 1 and s.sent == 1
    assert s.write(5 * 16 + 12, 4, ctrl()) == []  # already unmasked, nothing pending
    assert s.write(5 * 16 + 12, 4, ctrl(masked=True)) == [] and s.write(5 * 16 + 12, 4, 0) == []


def test_replay_uses_the_message_stored_at_unmask_time() -> None:
    s = live()
    program(s, 0, MSI_ADDR, 1, ctrl(masked=True))
    s.notify(0)
    s.write(8, 4, 2)  # reprogram data while masked and pending
    (emit,) = s.write(8, 8, ctrl(pasid=9) << 32 | 3)  # data + unmask in one QW write
    assert_msg(emit, MSI_ADDR, 3, pasid=9)


def test_no_message_without_bus_master() -> None:
    s = live()
    s.bus_master = False
    program(s, 0, MSI_ADDR, 1)
    assert s.notify(0) is None
    assert s.blocked_no_bme == 1 and s.sent == 0 and not s.is_pending(0)  # dropped, not pended
    s.write(12, 4, ctrl(masked=True))
    assert s.notify(0) is None and s.is_pending(0)
    assert s.write(12, 4, ctrl()) == []  # a replay with BME clear is lost the same way
    assert s.blocked_no_bme == 2 and s.replayed == 1 and not s.is_pending(0)


def test_invalid_slot_counted() -> None:
    s = live(4)
    assert s.notify(4) is None and s.notify(-1) is None
    assert s.invalid_slot == 2 and s.pended == 0 and not any(s.pending)


@pytest.mark.parametrize(
    ("knob", "pe", "expect"),
    [(True, True, 0xABCDE), (True, False, None), (False, True, None), (False, False, None)],
)
def test_pasid_prefix_only_with_slot_pe_and_device_knob(knob: bool, pe: bool, expect: int | None) -> None:
    s = live(pasid_interrupts=knob)
    c = ctrl(pasid=0xABCDE) if pe else 0xABCDE << 12  # PASID bits stored either way
    program(s, 2, MSI_ADDR, 0x22, c)
    assert s.read(2 * 16 + 12) == c  # without the knob the slot still stores and reads back PE/PASID
    assert_msg(s.notify(2), MSI_ADDR, 0x22, pasid=expect)
    s.write(2 * 16 + 12, 4, c | 1)
    s.notify(2)
    (replayed,) = s.write(2 * 16 + 12, 4, c)
    assert_msg(replayed, MSI_ADDR, 0x22, pasid=expect)  # the replay is tagged the same way


def test_snapshot_lists_used_slots() -> None:
    s = live(4)
    program(s, 1, 0x1_FEE0_0000, 0x31, ctrl(pasid=5))
    program(s, 3, MSI_ADDR, 0x33, ctrl(masked=True))
    s.notify(3)
    assert s.snapshot() == [
        {"slot": 1, "address": 0x1_FEE0_0000, "data": 0x31, "masked": False, "pasid_enable": True,
         "pasid": 5, "pending": False},
        {"slot": 3, "address": MSI_ADDR, "data": 0x33, "masked": True, "pasid_enable": False,
         "pasid": 0, "pending": True},
    ]


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["notify", "notify", "mask", "unmask", "qunmask",
                                                "bme_on", "bme_off"]), st.integers(0, 7)),
                    max_size=50),
       knob=st.booleans())
def test_no_interrupt_lost_or_duplicated(ops, knob: bool) -> None:
    """Model check: a notify is sent at once (unmasked, BME set), dropped and counted (unmasked,
    BME clear), or leaves the slot pending; a pending slot fires exactly once on the write that
    unmasks it; nothing is sent while masked; every message carries its slot's data and PASID."""
    s = ImsStore(8, requester_id=RID, pasid_interrupts=knob)
    pasid = {v: (0x100 + v if v & 1 else None) for v in range(8)}  # odd slots ask for a PASID
    for v in range(8):
        program(s, v, MSI_ADDR + 4 * v, v, ctrl(masked=True, pasid=pasid[v]))
    masked = [True] * 8
    pending: set[int] = set()
    bme = False
    blocked = 0

    def check(emits, expect: list[int]) -> None:
        assert [e.tlp.data[0] for e in emits] == expect
        for e in emits:
            v = e.tlp.data[0]
            assert_msg(e, MSI_ADDR + 4 * v, v, pasid=pasid[v] if knob else None)

    for op, v in ops:
        if op == "notify":
            emit = s.notify(v)
            if masked[v]:
                assert emit is None
                pending.add(v)
            elif bme:
                check([emit], [v])
            else:
                assert emit is None
                blocked += 1
        elif op == "bme_on" or op == "bme_off":
            s.bus_master = bme = op == "bme_on"
        elif op == "mask":
            masked[v] = True
            check(s.write(v * 16 + 12, 4, ctrl(masked=True, pasid=pasid[v])), [])
        else:  # unmask by a DW write of ctrl, or a QW write of data + ctrl
            was_masked, masked[v] = masked[v], False
            c = ctrl(pasid=pasid[v])
            out = s.write(v * 16 + 12, 4, c) if op == "unmask" else s.write(v * 16 + 8, 8, c << 32 | v)
            fires = was_masked and v in pending
            pending.discard(v)
            if fires and not bme:
                blocked += 1
            check(out, [v] if fires and bme else [])
        assert {u for u in range(8) if s.is_pending(u)} == pending
        assert s.blocked_no_bme == blocked


# ---- through TLPs: PF and VF BAR0 page 1 ----------------------------------------------------------


def program_slot(h: Host, bar: int, slot: int, addr: int, data: int, c: int = 0) -> list:
    base = bar + IMS_OFFSET + 16 * slot
    out = h.w64(base, addr)
    out += h.w64(base + 8, c << 32 | data)
    return out


def ims_device(**kw) -> Host:
    h = Host(SriovDevice(**{"pf_ims_slots": 8, "vf_ims_slots": 4, **kw}))
    h.bring_up_pf()
    return h


def enable_vfs(h: Host, n: int = 2) -> None:
    h.wr(PF, SRIOV + PCI_SRIOV_BAR, VF_BAR)
    h.wr16(PF, SRIOV + PCI_SRIOV_NUM_VF, n)
    h.wr16(PF, SRIOV + PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE)
    for i in range(n):
        h.wr(PF + 1 + i, 0x04, 0x4)


def test_pf_slot_programming_via_mwr_and_read_back() -> None:
    h = ims_device()
    assert program_slot(h, BAR, 3, 0x1_FEE0_0008, 0x4023, ctrl(pasid=0x77)) == []
    ims = h.dev.pf.ims
    assert ims.message(3) == (0x1_FEE0_0008, 0x4023) and not ims.is_masked(3)
    slot = BAR + IMS_OFFSET + 48
    assert [h.r32(slot + f) for f in (0, 4, 8, 12)] == [0xFEE0_0008, 1, 0x4023, 0x77008]
    (e,) = h.send(Tlp.mem_read(slot, 16, HOST_RID))  # one CplD for a 4-DW read
    assert struct.unpack("<IIII", e.tlp.data) == (0xFEE0_0008, 1, 0x4023, 0x77008)
    assert e.tlp.completer_id == PF
    h.send(Tlp.mem_write(slot + 9, b"\x99", HOST_RID))  # byte-enable writes merge into the slot
    assert h.r32(slot + 8) == 0x9923
    h.w32(slot + 12, 0xFFFF_FFFF)
    assert h.r32(slot + 12) == 0xFFFF_F009
    assert h.r32(BAR + IMS_OFFSET + 8 * 16) == 0 and h.w32(BAR + IMS_OFFSET + 8 * 16, 1) == []  # past slot 7
    assert h.r32(BAR + IMS_OFFSET + 8 * 16) == 0 and h.r32(BAR + 0x1FFC) == 0
    assert h.dev.pf.msix.message(3) == (0, 0)  # the MSI-X table is another page


def test_vf_slot_programming_lands_in_the_vf_store_only() -> None:
    h = ims_device()
    enable_vfs(h)
    vf1, vf1_bar = PF + 2, VF_BAR + 0x4000
    program_slot(h, vf1_bar, 1, MSI, 0x61, ctrl(masked=True))
    fns = h.dev.functions()
    assert fns[vf1].ims.message(1) == (MSI, 0x61) and fns[vf1].ims.is_masked(1)
    assert fns[PF + 1].ims.message(1) == (0, 0) and h.dev.pf.ims.message(1) == (0, 0)
    assert h.r32(vf1_bar + IMS_OFFSET + 16 + 8) == 0x61 and h.r32(vf1_bar + IMS_OFFSET + 16 + 12) == 1
    assert program_slot(h, vf1_bar, 4, MSI, 1) == []  # the VF has 4 slots: slot 4 is a hole
    assert fns[vf1].ims.read(4 * 16) == 0


def test_ims_cap_reads_slot_count_and_function_without_ims_has_a_hole() -> None:
    h = ims_device()
    enable_vfs(h, 1)
    assert h.r32(BAR + IMS_CAP) == 8 and h.r32(VF_BAR + IMS_CAP) == 4
    h.w32(BAR + IMS_CAP, 0)  # RO
    assert h.r32(BAR + IMS_CAP) == 8
    plain = Host(SriovDevice())
    plain.bring_up_pf()
    assert plain.dev.pf.ims is None and plain.r32(BAR + IMS_CAP) == 0
    assert plain.w64(BAR + IMS_OFFSET, MSI) == [] and plain.r32(BAR + IMS_OFFSET) == 0
    assert plain.r32(BAR + IMS_OFFSET + 12) == 0  # no IMS: page 1 is a hole, not masked slots
    h2 = ims_device(pf_ims_slots=0)  # IMS on the VFs only (matrix row 2-ims)
    enable_vfs(h2, 1)
    assert h2.r32(BAR + IMS_CAP) == 0 and h2.r32(VF_BAR + IMS_CAP) == 4


def test_irq_mode_register() -> None:
    h = ims_device()
    assert h.r32(BAR + IRQ_MODE) == 0
    h.w32(BAR + IRQ_MODE, 0xFFFF_FFFF)
    assert h.r32(BAR + IRQ_MODE) == 1  # bits 31:1 read 0
    h.w32(BAR + IRQ_MODE, 2)
    assert h.r32(BAR + IRQ_MODE) == 0
    for ro in (IMS_SENT, IMS_PENDED):
        h.w32(BAR + ro, 0xFFFF_FFFF)
        assert h.r32(BAR + ro) == 0
    with pytest.raises(ValueError):
        Function(0, vendor_id=1, device_id=2, vectors=1, ims_slots=MAX_IMS_SLOTS + 1)
    assert Function(0, vendor_id=1, device_id=2, vectors=1, ims_slots=MAX_IMS_SLOTS).engine.ims_cap == 256


def ring(h: Host, bar: int, slot: int, *, mode: int = 1, entries: int = 4) -> None:
    h.program_ring(bar, RING, entries, vector=slot)
    h.w32(bar + IRQ_MODE, mode)


def test_doorbell_irq_mode_ims_emits_dma_record_then_ims_mwr() -> None:
    h = ims_device()
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 2, MSI | 0x3000, 0x99)  # same index in MSI-X: must not fire
    program_slot(h, BAR, 2, MSI | 0x1000, 0x4041)
    ring(h, BAR, 2)
    dma, irq = h.w32(BAR + DOORBELL, 0xDEAD_BEEF)
    assert dma.tlp.type == TlpType.MEM_WRITE_64 and dma.origin is None and dma.tlp.pasid is None
    assert dma.tlp.address == RING and dma.tlp.requester_id == PF
    assert dma.tlp.data == struct.pack("<IIQ", 0xDEAD_BEEF, 1, 0)
    assert_msg(irq, MSI | 0x1000, 0x4041, rid=PF)
    assert h.r32(BAR + COMPLETED) == 1 and h.r32(BAR + IMS_SENT) == 1 and h.r32(BAR + IMS_PENDED) == 0
    assert h.r32(BAR + MSIX_SENT) == 0 and h.dev.pf.msix.sent == 0
    h.w32(BAR + IRQ_MODE, 0)  # back to MSI-X: the same doorbell raises the MSI-X vector
    _, irq = h.w32(BAR + DOORBELL, 1)
    assert_msg(irq, MSI | 0x3000, 0x99, rid=PF)
    assert h.r32(BAR + MSIX_SENT) == 1 and h.r32(BAR + IMS_SENT) == 1


def test_vf_doorbell_ims_with_pasid_uses_vf_rid() -> None:
    for knob in (True, False):
        h = ims_device(pasid_interrupts=knob)
        enable_vfs(h)
        vf1, vf1_bar = PF + 2, VF_BAR + 0x4000
        program_slot(h, vf1_bar, 3, MSI | 0x2000, 0x77, ctrl(pasid=0x42))
        ring(h, vf1_bar, 3)
        dma, irq = h.w32(vf1_bar + DOORBELL, 9)
        assert dma.tlp.requester_id == vf1 and dma.origin is None and dma.tlp.pasid is None
        assert_msg(irq, MSI | 0x2000, 0x77, rid=vf1, pasid=0x42 if knob else None)


def test_doorbell_on_masked_slot_pends_and_unmask_mwr_delivers() -> None:
    h = ims_device()
    program_slot(h, BAR, 1, MSI, 0x31, ctrl(masked=True))
    ring(h, BAR, 1)
    (dma,) = h.w32(BAR + DOORBELL, 1)
    (dma,) = h.w32(BAR + DOORBELL, 2)
    assert dma.origin is None and h.r32(BAR + IMS_PENDED) == 2 and h.r32(BAR + IMS_SENT) == 0
    assert h.r32(BAR + MSIX_PENDED) == 0 and not h.dev.pf.msix.is_pending(1)
    (irq,) = h.w32(BAR + IMS_OFFSET + 16 + 12, 0)  # the guest's unmask write returns the replay
    assert_msg(irq, MSI, 0x31, rid=PF)
    assert h.w32(BAR + IMS_OFFSET + 16 + 12, 0) == []  # delivered once


def test_irq_mode_ims_without_ims_is_counted_and_still_completes() -> None:
    h = Host(SriovDevice())
    h.bring_up_pf()
    h.msix_control(PF, enable=True)
    h.program_vector(BAR, 0, MSI, 0x20)
    ring(h, BAR, 0)
    (dma,) = h.w32(BAR + DOORBELL, 5)
    assert dma.origin is None and h.r32(BAR + COMPLETED) == 1
    c = h.dev.pf.counters()
    assert c["ims_invalid"] == 1 and c["msix_sent"] == 0 and c["ims_sent"] == 0
    h2 = ims_device()
    ring(h2, BAR, 8)  # PF has slots 0..7
    (dma,) = h2.w32(BAR + DOORBELL, 5)
    assert h2.dev.pf.counters()["ims_invalid_slot"] == 1


def test_no_ims_interrupt_and_no_dma_without_bus_master() -> None:
    h = ims_device()
    program_slot(h, BAR, 0, MSI, 0x20)
    ring(h, BAR, 0)
    h.wr(PF, 0x04, 0x2)  # clear BME
    assert h.w32(BAR + DOORBELL, 1) == []
    assert h.dev.pf.doorbells_dropped == 1 and h.dev.pf.ims.sent == 0
    assert h.dev.pf.ims.notify(0) is None and h.dev.pf.ims.blocked_no_bme == 1
    h.wr(PF, 0x04, 0x6)
    assert [e.tlp.type for e in h.w32(BAR + DOORBELL, 1)] == [TlpType.MEM_WRITE_64, TlpType.MEM_WRITE]


def test_flr_clears_ims_and_irq_mode() -> None:
    h = ims_device()
    program_slot(h, BAR, 0, MSI, 0x99, ctrl(pasid=3))
    program_slot(h, BAR, 1, MSI, 0x98, ctrl(masked=True))
    ring(h, BAR, 1)
    h.w32(BAR + DOORBELL, 1)  # slot 1 pending
    pf = h.dev.pf
    assert pf.ims.is_pending(1)
    assert h.wr16(PF, 0x40 + 0x08, 0x8000 | 0x2810) == []  # Initiate FLR
    assert pf.ims.message(0) == (0, 0) and pf.ims.is_masked(0) and not pf.ims.is_pending(1)
    assert not pf.ims.bus_master and pf.engine.irq_mode == 0
    h.bring_up_pf()
    assert h.r32(BAR + IMS_OFFSET + 12) == 1 and h.r32(BAR + IRQ_MODE) == 0 and h.r32(BAR + IMS_CAP) == 8
    assert h.r32(BAR + IMS_PENDED) == 0  # engine registers restart
    assert h.w32(BAR + IMS_OFFSET + 16 + 12, 0) == []  # the pending flag died with the FLR
    assert pf.counters()["ims_pended"] == 1 and pf.flrs == 1  # statistics survive


def test_vf_flr_clears_vf_ims_only() -> None:
    h = ims_device()
    enable_vfs(h)
    program_slot(h, BAR, 0, MSI, 1)
    program_slot(h, VF_BAR, 0, MSI, 2)
    program_slot(h, VF_BAR + 0x4000, 0, MSI, 3)
    assert h.dev.function_level_reset(PF + 1)
    fns = h.dev.functions()
    assert fns[PF + 1].ims.message(0) == (0, 0) and fns[PF + 1].ims.is_masked(0)
    assert fns[PF + 2].ims.message(0) == (MSI, 3) and h.dev.pf.ims.message(0) == (MSI, 1)


def test_snapshot_and_counters_carry_ims() -> None:
    h = ims_device()
    program_slot(h, BAR, 2, MSI, 0x22, ctrl(pasid=1))
    ring(h, BAR, 2)
    h.w32(BAR + DOORBELL, 1)
    pf = h.dev.snapshot()["functions"]["02:00.0"]
    assert pf["irq_mode"] == "ims" and pf["ims_slots"] == 8
    assert pf["ims_sent"] == 1 and pf["ims_pended"] == 0 and pf["ims_invalid"] == 0
    assert [s["slot"] for s in pf["ims"]] == [2] and pf["ims"][0]["pasid"] == 1
    plain = Host(SriovDevice())
    plain.bring_up_pf()
    pf = plain.dev.snapshot()["functions"]["02:00.0"]
    assert pf["ims_slots"] == 0 and pf["ims"] == [] and pf["ims_sent"] == 0 and pf["irq_mode"] == "msix"
    assert set(plain.dev.pf.counters()) == set(h.dev.pf.counters())


def test_unmapped_ims_page_is_ur() -> None:
    h = ims_device()
    h.wr(PF, 0x04, 0x4)  # MSE off
    (e,) = h.send(Tlp.mem_read(BAR + IMS_OFFSET, 4, HOST_RID))
    assert e.tlp.status == CplStatus.UR


def test_ims_doorbell_path_is_cheap() -> None:
    """Not a benchmark: the IMS doorbell costs about what the MSI-X one does."""
    import time

    h = ims_device()
    program_slot(h, BAR, 0, MSI, 0, ctrl(pasid=1))
    ring(h, BAR, 0, entries=1024)
    tlp = Tlp.mem_write(BAR + DOORBELL, b"\x01\0\0\0", HOST_RID)
    handle = h.dev.handle_tlp
    assert len(handle(tlp)) == 2
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        handle(tlp)
    per = (time.perf_counter() - t0) / n
    assert per < 200e-6, f"{per * 1e6:.1f} us per doorbell"

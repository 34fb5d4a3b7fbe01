"""Whatever a (hostile) host or guest sends, the device model answers with valid TLPs and never raises."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.emit import mem_write_dw
from device.sriov_device import SriovDevice
from fabric.tlp import CplStatus, Tlp, TlpType

PF = 0x0100
BAR = 0xFEB0_0000
VF_BAR = 0xC000_0000


@settings(max_examples=300, deadline=None)
@given(
    dw=st.integers(0, (1 << 62) - 1),
    ndw=st.integers(1, 8),
    rid=st.integers(0, 0xFFFF),
    fill=st.integers(0, 255),
    pasid=st.none() | st.integers(0, 0xF_FFFF),
)
def test_mem_write_dw_equals_codec(dw: int, ndw: int, rid: int, fill: int, pasid: int | None) -> None:
    address = dw * 4
    data = bytes((fill + i) & 0xFF for i in range(4 * ndw))
    if (address & 0xFFF) + len(data) > 0x1000:
        address &= ~0xFFF
    assert mem_write_dw(address, data, rid, pasid) == Tlp.mem_write(address, data, rid, pasid=pasid)


def _device() -> SriovDevice:
    dev = SriovDevice(pf_ims_slots=4, vf_ims_slots=2)
    for t in (
        Tlp.cfg_write(PF, 0x10, BAR),
        Tlp.cfg_write(PF, 0x04, 0x6),
        Tlp.cfg_write(PF, 0x7C, 0x8000_0000, first_be=0xC),
        Tlp.cfg_write(PF, 0x124, VF_BAR),
        Tlp.cfg_write(PF, 0x110, 3, first_be=0x3),
        Tlp.cfg_write(PF, 0x108, 0x9, first_be=0x3),
    ):
        dev.handle_tlp(t)
    for vf in (PF + 1, PF + 2, PF + 3):
        dev.handle_tlp(Tlp.cfg_write(vf, 0x04, 0x4))
        dev.handle_tlp(Tlp.cfg_write(vf, 0x7C, 0x8000_0000, first_be=0xC))
    for i, bar in enumerate((BAR, VF_BAR, VF_BAR + 0x4000, VF_BAR + 0x8000)):
        dev.handle_tlp(Tlp.mem_write(bar + 0x08, (0x10_0000 * (i + 1)).to_bytes(8, "little")))
        dev.handle_tlp(Tlp.mem_write(bar + 0x10, (8).to_bytes(4, "little")))
        for v in range(4):
            entry = bar + 0x2000 + 16 * v
            dev.handle_tlp(Tlp.mem_write(entry, (0xFEE0_0000 + 0x1000 * i).to_bytes(8, "little")))
            dev.handle_tlp(Tlp.mem_write(entry + 8, (0x40 + v).to_bytes(8, "little")))
        for slot in range(2):  # IMS slots: unmasked, slot 1 PASID-tagged
            entry = bar + 0x1000 + 16 * slot
            dev.handle_tlp(Tlp.mem_write(entry, (0xFEE0_0000 + 0x1000 * i).to_bytes(8, "little")))
            ctrl = slot << 3 | (0x100 + i) << 12
            dev.handle_tlp(Tlp.mem_write(entry + 8, ((ctrl << 32) | 0x60 + slot).to_bytes(8, "little")))
    return dev


_targets = st.one_of(st.sampled_from([PF, PF + 1, PF + 2, PF + 3, PF + 4, 0x0200]), st.integers(0, 0xFFFF))
_regs = st.one_of(
    st.sampled_from([0x04, 0x10, 0x48, 0x7C, 0x108, 0x110, 0x120, 0x124]),
    st.integers(0, 0x3FF).map(lambda i: i * 4),
)
_windows = st.sampled_from([BAR, VF_BAR, VF_BAR + 0x4000, VF_BAR + 0x8000, 0])
_offsets = st.one_of(
    st.sampled_from([0x08, 0x0C, 0x10, 0x14, 0x18, 0x28, 0x2C, 0x1000, 0x100C, 0x101C, 0x2000, 0x200C,
                     0x2010, 0x201C, 0x3000]),
    st.integers(0, 0x4FFF),
)


@st.composite
def _tlps(draw):
    kind = draw(st.sampled_from(["cfgrd", "cfgwr", "mwr", "mrd", "cpl", "doorbell", "doorbell"]))
    if kind == "doorbell":
        return Tlp.mem_write(draw(_windows) + 0x18, draw(st.binary(min_size=4, max_size=4)))
    if kind == "cfgrd":
        return Tlp.cfg_read(draw(_targets), draw(_regs), first_be=draw(st.integers(0, 15)))
    if kind == "cfgwr":
        return Tlp.cfg_write(draw(_targets), draw(_regs), draw(st.integers(0, 0xFFFF_FFFF)),
                             first_be=draw(st.integers(0, 15)))
    addr = draw(_windows) + draw(_offsets)
    n = draw(st.integers(1, 32))
    if (addr & 0xFFF) + n > 0x1000:
        addr &= ~0xFFF
    if kind == "mwr":
        return Tlp.mem_write(addr, draw(st.binary(min_size=n, max_size=n)), 0x0000)
    if kind == "mrd":
        return Tlp.mem_read(addr, n, 0x0000, tag=draw(st.integers(0, 255)))
    return Tlp.completion(Tlp.mem_read(0x1000, 4, PF), 0, CplStatus.SC, b"\0\0\0\0")


def test_fixture_device_delivers_interrupts() -> None:
    dev = _device()
    for bar, rid in ((BAR, PF), (VF_BAR + 0x4000, PF + 2)):
        dma, irq = dev.handle_tlp(Tlp.mem_write(bar + 0x18, b"\1\0\0\0"))
        assert dma.origin is None and irq.origin == rid
        dev.handle_tlp(Tlp.mem_write(bar + 0x28, b"\1\0\0\0"))  # IRQ_MODE = IMS
        dev.handle_tlp(Tlp.mem_write(bar + 0x14, b"\1\0\0\0"))  # slot 1: PASID-tagged
        dma, irq = dev.handle_tlp(Tlp.mem_write(bar + 0x18, b"\1\0\0\0"))
        assert dma.origin is None and irq.origin == rid and irq.tlp.pasid is not None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tlps=st.lists(_tlps(), min_size=1, max_size=60))
def test_random_traffic_never_raises_and_emits_valid_tlps(tlps: list[Tlp]) -> None:
    dev = _device()
    for tlp in tlps:
        out = dev.handle_tlp(tlp)
        if tlp.is_non_posted():
            assert out and out[0].tlp.is_completion(), "every non-posted request gets a completion"
            assert out[0].tlp.tag == tlp.tag and out[0].tlp.requester_id == tlp.requester_id
        elif tlp.type == TlpType.CPL_DATA:
            assert out == []
        for e in out:
            assert Tlp.unpack(e.tlp.pack()) == e.tlp
            if e.origin is not None:  # interrupt MWr: provenance is the sender's RID
                assert e.tlp.is_posted() and e.tlp.requester_id == e.origin and e.tlp.length == 1
                assert e.origin in dev.functions()
        snap = dev.snapshot()
        assert snap["num_vfs"] == len(dev.vfs) <= 4

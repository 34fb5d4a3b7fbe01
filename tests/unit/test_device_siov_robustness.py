"""Whatever a (hostile) host, guest or memory answers, the SIOV model emits valid TLPs and never raises."""

from __future__ import annotations

import struct
from typing import NamedTuple

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.ims import IMS_CTRL_PASID_ENABLE, IMS_CTRL_PASID_SHIFT, IMS_CTRL_VECTOR_MASKBIT
from device.siov_device import SiovDevice
from fabric.provenance import adi_origin, function_origin, is_adi, origin_adi, origin_rid
from fabric.tlp import CplStatus, Tlp, TlpType

PF = 0x0100
BAR0 = 0xFEB0_0000
BAR2 = 0xC000_0000
QCTX = 0x3000_0000
PE = IMS_CTRL_PASID_ENABLE


def _other_pasid(i: int) -> int:
    """The ctrl PASID field the fixture puts in ADI i's device slot 0: another ADI's real PASID."""
    return 0x100 + (i + 1) % 4


def _w(dev: SiovDevice, addr: int, value: int, n: int = 4) -> None:
    dev.handle_tlp(Tlp.mem_write(addr, value.to_bytes(n, "little")))


def _device(pasid_interrupts: bool) -> SiovDevice:
    """PF with MSI-X + IMS, 4 ADIs: 0/2 device IMS, 1/3 memory IMS; everything enabled.  Device
    slot 0 of each ADI: ctrl PASID-enable with another ADI's PASID in its PASID field; slot 1: ctrl 0
    (untagged).  ADI 0 signals slot 0, ADI 2 slot 1, ADI i = 1/3 memory slot i."""
    dev = SiovDevice(adis=4, adi_ims_slots=4, pf_ims_slots=2, pasid_interrupts=pasid_interrupts)
    for t in (Tlp.cfg_write(PF, 0x10, BAR0), Tlp.cfg_write(PF, 0x18, BAR2), Tlp.cfg_write(PF, 0x04, 0x6),
              Tlp.cfg_write(PF, 0x7C, 0x8000_0000, first_be=0xC), Tlp.cfg_write(PF, 0x104, 1 << 16, first_be=0xC)):
        dev.handle_tlp(t)
    _w(dev, BAR0 + 0x08, 0x50_0000, 8)
    _w(dev, BAR0 + 0x10, 8)
    _w(dev, BAR0 + 0x2000, 0xFEE0_0000, 8)
    _w(dev, BAR0 + 0x2008, 0x30, 8)
    for i in range(4):
        p = BAR2 + 0x2000 * i
        _w(dev, BAR0 + 0x204 + 8 * i, 0x100 + i)
        _w(dev, BAR0 + 0x200 + 8 * i, 7)             # EN | PE | MIE (memory IMS allowed)
        _w(dev, p + 0x08, 0x10_0000 * (i + 1), 8)
        _w(dev, p + 0x10, 8)
        for s in range(2):
            _w(dev, p + 0x1000 + 16 * s, 0xFEE0_0000 + 0x1000 * i, 8)
            ctrl = PE | _other_pasid(i) << IMS_CTRL_PASID_SHIFT if s == 0 else 0
            _w(dev, p + 0x1008 + 16 * s, (0x40 + s) | ctrl << 32, 8)
        if i % 2:
            _w(dev, p + 0x38, QCTX + 0x1000 * i, 8)
            _w(dev, p + 0x28, 2)
            _w(dev, p + 0x14, i)
        elif i:
            _w(dev, p + 0x14, 1)
    return dev


_targets = st.one_of(st.sampled_from([PF, PF + 1, 0x0200, 0x0000]), st.integers(0, 0xFFFF))
_regs = st.one_of(
    st.sampled_from([0x04, 0x10, 0x18, 0x48, 0x7C, 0x104, 0x108, 0x118, 0x11C]),
    st.integers(0, 0x3FF).map(lambda i: i * 4),
)
_windows = st.sampled_from([BAR0, BAR2, BAR2 + 0x2000, BAR2 + 0x4000, BAR2 + 0x6000, 0])
_offsets = st.one_of(
    st.sampled_from([0x08, 0x10, 0x14, 0x18, 0x28, 0x38, 0x3C, 0x40, 0x100, 0x200, 0x204, 0x208, 0x210,
                     0x218, 0x1000, 0x100C, 0x101C, 0x2000, 0x200C]),
    st.integers(0, 0x9FFF),
)


class Respond(NamedTuple):
    """Answer the ``pick``-th outstanding slot read the device has sent (as its memory would)."""

    pick: int
    status: CplStatus
    data: bytes
    ep: bool
    shape: str  # "good", "short" (1 DW), "lower_address" (wrong), "duplicate" (answer twice)


class Control(NamedTuple):
    """A control-interface call: ``adi_reset(arg)`` or ``function_level_reset(arg)``."""

    op: str
    arg: int


@st.composite
def _ops(draw):
    kind = draw(st.sampled_from(["cfgrd", "cfgwr", "mwr", "mrd", "cpl", "respond", "respond", "respond",
                                 "doorbell", "doorbell", "doorbell", "control", "imsctrl", "imsctrl", "vector",
                                 "memirq"]))
    if kind == "doorbell":
        return Tlp.mem_write(draw(_windows) + 0x18, draw(st.binary(min_size=4, max_size=4)))
    if kind == "imsctrl":
        # an ADI's device slot ctrl: mask / unmask (replays), PASID-enable on/off, any PASID field
        ctrl = draw(st.sampled_from([0, 1, PE, PE | 1])) | draw(st.sampled_from([0, 0x100, 0x103, 0xF_FFFF])) << 12
        slot = BAR2 + 0x2000 * draw(st.integers(0, 3)) + 0x1000 + 16 * draw(st.integers(0, 3))
        return Tlp.mem_write(slot + 0xC, ctrl.to_bytes(4, "little"))
    if kind == "memirq":
        # a memory-kind ADI's doorbell, its slot read answered at once with an unmasked slot whose
        # ctrl may say anything about PASIDs (a tuple: the test runs both ops in turn)
        ctrl = draw(st.sampled_from([0, PE, PE | 0x102 << 12, 0xFFFF_FFFE, 0x100 << 12]))
        addr, data = 0xFEE0_0000 + draw(st.integers(0, 0xFFF)) * 4, draw(st.integers(0, 0xFFFF_FFFF))
        slot = struct.pack("<IIII", addr, 0, data, ctrl)
        return (Tlp.mem_write(BAR2 + 0x2000 * draw(st.sampled_from([1, 3])) + 0x18, b"\1\0\0\0"),
                Respond(-1, CplStatus.SC, slot, False, "good"))
    if kind == "vector":
        vector = draw(st.integers(0, 4))
        return Tlp.mem_write(BAR2 + 0x2000 * draw(st.integers(0, 3)) + 0x14, vector.to_bytes(4, "little"))
    if kind == "cfgrd":
        return Tlp.cfg_read(draw(_targets), draw(_regs), first_be=draw(st.integers(0, 15)))
    if kind == "cfgwr":
        return Tlp.cfg_write(draw(_targets), draw(_regs), draw(st.integers(0, 0xFFFF_FFFF)),
                             first_be=draw(st.integers(0, 15)))
    if kind == "control":
        op = draw(st.sampled_from(["adi_reset", "adi_reset", "adi_reset", "function_level_reset"]))
        return Control(op, draw(st.integers(-1, 5)) if op == "adi_reset" else draw(st.sampled_from([PF, PF + 1])))
    if kind == "respond":
        status = draw(st.sampled_from([CplStatus.SC] * 5 + [CplStatus.UR, CplStatus.CA]))
        # ctrl DW: mostly unmasked, sometimes masked; the rest is whatever the owner wrote (PASID-enable
        # and a PASID field included: a memory-kind slot's ctrl does not choose the tag)
        ctrl = draw(st.sampled_from([0, 0, 1, 0xFFFF_FFFF, PE | 0x102 << 12, PE, 0xFFFF_FFFE]))
        slot = draw(st.binary(min_size=12, max_size=12)) + ctrl.to_bytes(4, "little")
        return Respond(draw(st.integers(0, 40)), status, slot, draw(st.booleans()) and draw(st.booleans()),
                       draw(st.sampled_from(["good"] * 6 + ["short", "lower_address", "duplicate"])))
    if kind == "cpl":
        # A blind completion: a guessed tag, right or wrong requester.
        rid = draw(st.sampled_from([PF, PF, PF, 0x0200]))
        req = Tlp.mem_read(QCTX + draw(st.integers(0, 0x7F)) * 16, 16, rid, tag=draw(st.integers(0, 40)))
        status = draw(st.sampled_from([CplStatus.SC, CplStatus.UR]))
        if status != CplStatus.SC:
            return Tlp.completion(req, 0, status)
        return Tlp.completion(req, 0, status, draw(st.binary(min_size=16, max_size=16)))
    addr = draw(_windows) + draw(_offsets)
    n = draw(st.integers(1, 32))
    if (addr & 0xFFF) + n > 0x1000:
        addr &= ~0xFFF
    if kind == "mwr":
        tlp = Tlp.mem_write(addr, draw(st.binary(min_size=n, max_size=n)), 0x0000)
        tlp.ep = draw(st.booleans()) and draw(st.booleans())
        return tlp
    return Tlp.mem_read(addr, n, 0x0000, tag=draw(st.integers(0, 255)))


def _answer(r: Respond, mrd: Tlp) -> list[Tlp]:
    if r.status != CplStatus.SC:
        return [Tlp.completion(mrd, 0, r.status)]
    if r.shape == "short":
        cpl = Tlp.completion(mrd, 0, CplStatus.SC, r.data[:4], byte_count=4)
    elif r.shape == "lower_address":
        cpl = Tlp.completion(mrd, 0, CplStatus.SC, r.data, lower_address=(mrd.address + 16) & 0x7F)
    else:
        cpl = Tlp.completion(mrd, 0, CplStatus.SC, r.data)
    cpl.ep = r.ep
    return [cpl, cpl] if r.shape == "duplicate" else [cpl]


@pytest.mark.parametrize("pasid_interrupts", [True, False])
def test_fixture_device_exercises_both_kinds(pasid_interrupts: bool) -> None:
    dev = _device(pasid_interrupts)
    own = 0x100 if pasid_interrupts else None
    # device kind, slot 0 (ctrl PE, PASID field = ADI 1's): tagged with ADI 0's own PASID
    dma, irq = dev.handle_tlp(Tlp.mem_write(BAR2 + 0x18, b"\1\0\0\0"))
    assert irq.origin == adi_origin(PF, 0) and irq.tlp.pasid == own and _other_pasid(0) == 0x101
    # device kind, slot 1 (ctrl PE clear): untagged
    dma, irq = dev.handle_tlp(Tlp.mem_write(BAR2 + 0x4018, b"\1\0\0\0"))
    assert irq.origin == adi_origin(PF, 2) and irq.tlp.pasid is None and irq.tlp.data == b"\x41\0\0\0"
    dev.handle_tlp(Tlp.mem_write(BAR2 + 0x14, b"\1\0\0\0"))          # ADI 0 -> slot 1 too
    dma, irq = dev.handle_tlp(Tlp.mem_write(BAR2 + 0x18, b"\1\0\0\0"))
    assert irq.origin == adi_origin(PF, 0) and irq.tlp.pasid is None and irq.tlp.data == b"\x41\0\0\0"
    # memory kind: tagged per the knob, whatever the fetched ctrl says
    for ctrl in (0, PE | 0x103 << IMS_CTRL_PASID_SHIFT):
        dma, mrd = dev.handle_tlp(Tlp.mem_write(BAR2 + 0x2018, b"\1\0\0\0"))
        assert mrd.tlp.type == TlpType.MEM_READ and mrd.tlp.address == QCTX + 0x1010 and mrd.tlp.pasid == 0x101
        slot = struct.pack("<IIII", 0xFEE0_0000, 0, 0x77, ctrl)
        (irq,) = dev.handle_tlp(Tlp.completion(mrd.tlp, 0, CplStatus.SC, slot))
        assert irq.origin == adi_origin(PF, 1) and irq.tlp.pasid == (0x101 if pasid_interrupts else None)
    dma, irq = dev.handle_tlp(Tlp.mem_write(BAR0 + 0x18, b"\1\0\0\0"))
    assert irq.origin == function_origin(PF)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pasid_interrupts=st.booleans(), ops=st.lists(_ops(), min_size=1, max_size=60))
def test_random_traffic_never_raises_and_emits_valid_tlps(pasid_interrupts: bool, ops: list) -> None:
    dev = _device(pasid_interrupts)
    outstanding: list[Tlp] = []        # slot reads the device sent and nobody answered yet
    for op in [o for op in ops for o in (op if type(op) is tuple else (op,))]:
        if type(op) is Control:
            getattr(dev, op.op)(op.arg)
            continue
        tlps = [op] if type(op) is Tlp else (_answer(op, outstanding.pop(op.pick % len(outstanding)))
                                              if outstanding else [])
        for tlp in tlps:
            _check(dev, tlp, dev.handle_tlp(tlp), pasid_interrupts, outstanding)
        snap = dev.snapshot()
        assert snap["fetch_tags_in_flight"] <= 32
        assert msgpack.unpackb(msgpack.packb(snap), strict_map_key=False) == snap


def _check(dev: SiovDevice, tlp: Tlp, out: list, pasid_interrupts: bool, outstanding: list[Tlp]) -> None:
    if tlp.is_non_posted():
        assert out and out[0].tlp.is_completion(), "every non-posted request gets a completion"
        assert out[0].tlp.tag == tlp.tag and out[0].tlp.requester_id == tlp.requester_id
        assert out[0].tlp.completer_id == dev.rid
    elif tlp.is_completion():
        # a CplD yields at most the interrupt, then the slot reads that were waiting for a free tag
        irqs = [e for e in out if e.origin is not None]
        assert len(irqs) <= 1 and out[:len(irqs)] == irqs, "a CplD yields at most one interrupt, first"
        assert all(e.tlp.type in (TlpType.MEM_READ, TlpType.MEM_READ_64) for e in out[len(irqs):])
        if irqs:
            lo, hi, data = struct.unpack_from("<III", tlp.data)
            assert out[0].tlp.address == (hi << 32 | lo) & ~3 and out[0].tlp.data == tlp.data[8:12]
    for e in out:
        t = e.tlp
        assert Tlp.unpack(t.pack()) == t
        if not t.is_completion():
            assert t.requester_id == dev.rid, "everything the device starts carries the PF's RID"
        if t.pasid is not None:
            assert dev.pasid_enabled, "a PASID prefix only while the PF's PASID Enable is set"
        if e.origin is not None:  # interrupt MWr
            assert t.is_posted() and t.length == 1 and origin_rid(e.origin) == t.requester_id
            if is_adi(e.origin):
                adi = dev.adis()[origin_adi(e.origin)]
                assert t.pasid in _expected_irq_pasids(adi, tlp, t)
                assert pasid_interrupts or t.pasid is None
            else:
                assert e.origin == function_origin(dev.rid) and t.pasid is None
        elif t.type in (TlpType.MEM_READ, TlpType.MEM_READ_64):
            assert t.length == 4 and t.address & 0xF == 0 and t.tag < 32
            outstanding.append(t)


def _expected_irq_pasids(adi, cause: Tlp, t: Tlp) -> set[int | None]:
    """The PASID prefix an ADI's interrupt MWr may carry (None = untagged): one value unless two
    slots hold the very same message (then the sender is either).

    Memory kind (sent on the slot read's CplD): the ADI's ``irq_pasid`` -- knob, PF PASID Enable
    and ADI PE -- whatever the fetched ctrl says.  Device kind (a doorbell or an unmasking ctrl
    write): the same only if the sending slot's ctrl has PASID-enable; the value is the ADI's own
    PASID, never the slot's PASID field.  The sending slot is the unmasked one holding exactly the
    message sent; its ctrl cannot change later in the same TLP (the ctrl is a slot's last DW), so
    the state after the TLP shows it.
    """
    if cause.is_completion():
        return {adi.irq_pasid}
    ims = adi.ims
    assert ims is not None
    data = int.from_bytes(t.data, "little")
    ctrls = {ims.read(16 * s + 0xC) for s in range(ims.nslots)
             if ims.message(s) == (t.address, data) and not ims.read(16 * s + 0xC) & IMS_CTRL_VECTOR_MASKBIT}
    assert ctrls, "a device-kind interrupt is the message of one of the ADI's unmasked slots"
    return {adi.irq_pasid if c & IMS_CTRL_PASID_ENABLE else None for c in ctrls}

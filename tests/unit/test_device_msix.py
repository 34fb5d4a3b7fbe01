"""device.msix: table/PBA state and QEMU's mask -> pending -> replay semantics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.msix import MsixTable
from fabric.tlp import Tlp, TlpType

RID = 0x0108
MSI_ADDR = 0xFEE0_1000


def program(t: MsixTable, vector: int, addr: int, data: int, masked: bool = False) -> list:
    base = vector * 16
    out = t.table_write(base, 4, addr & 0xFFFF_FFFF)
    out += t.table_write(base + 4, 4, addr >> 32)
    out += t.table_write(base + 8, 4, data)
    out += t.table_write(base + 12, 4, int(masked))
    return out


def live(n: int = 8) -> MsixTable:
    """Enabled, unmasked function, BME set."""
    t = MsixTable(n, requester_id=RID)
    t.bus_master = True
    assert t.set_control(True, False) == []
    return t


def assert_msg(emit, addr: int, data: int) -> None:
    assert emit is not None
    tlp = emit.tlp
    assert tlp.type in (TlpType.MEM_WRITE, TlpType.MEM_WRITE_64)
    assert tlp.address == addr and tlp.length == 1 and tlp.first_be == 0xF
    assert tlp.data == data.to_bytes(4, "little")
    assert tlp.requester_id == RID and emit.origin == RID
    assert Tlp.unpack(tlp.pack()) == tlp
    assert emit.raw is None or emit.raw == tlp.pack()


def test_a_vector_message_is_encoded_once_until_its_entry_changes() -> None:
    """The device sends a vector's message from a cache keyed by the entry and the RID: the same
    bytes until software rewrites the entry (or the RID moves), then the new message."""
    t = live()
    program(t, 1, MSI_ADDR, 0x30)
    first = t.notify(1)
    assert t.notify(1) is first and first.raw == first.tlp.pack() and t.sent == 2
    program(t, 1, MSI_ADDR + 8, 0x31)
    assert_msg(t.notify(1), MSI_ADDR + 8, 0x31)
    t.requester_id = RID + 1
    assert t.notify(1).tlp.requester_id == RID + 1
    t.requester_id = RID
    t.reset()
    t.bus_master = True
    t.set_control(True, False)
    program(t, 1, MSI_ADDR, 0x30)
    again = t.notify(1)
    assert again is not first and again == first       # re-encoded after the reset, same bytes


def test_reset_state() -> None:
    t = MsixTable(5, requester_id=RID)
    assert len(t.pba) == 8  # align_up(5, 64) / 8
    for v in range(5):
        assert t.table_read(v * 16) == 0
        assert t.table_read(v * 16 + 4) == 0
        assert t.table_read(v * 16 + 8) == 0
        assert t.table_read(v * 16 + 12) == 1  # masked
        assert t.is_masked(v)
    assert t.pba_read(0, 8) == 0
    assert not t.enabled and not t.function_mask
    # dirty it, then reset
    t.bus_master = True
    t.set_control(True, True)
    program(t, 2, MSI_ADDR, 0x41)
    t.notify(2)
    assert t.pba_read(0) == 0b100
    t.reset()
    assert t.table_read(2 * 16) == 0 and t.table_read(2 * 16 + 12) == 1
    assert t.pba_read(0) == 0 and not t.enabled and not t.function_mask
    assert t.pended == 1  # counters are statistics, they survive reset


def test_unmasked_notify_sends_message() -> None:
    t = live()
    program(t, 3, MSI_ADDR, 0x4023)
    assert_msg(t.notify(3), MSI_ADDR, 0x4023)
    assert t.sent == 1 and t.pba_read(0) == 0


def test_message_above_4gib_uses_4dw_mwr() -> None:
    t = live()
    program(t, 0, 0x1_2345_6780, 7)
    emit = t.notify(0)
    assert_msg(emit, 0x1_2345_6780, 7)
    assert emit.tlp.type == TlpType.MEM_WRITE_64


def test_entry_mask_pends_and_unmask_replays() -> None:
    t = live()
    program(t, 5, MSI_ADDR, 0x55, masked=True)
    assert t.notify(5) is None
    assert t.is_pending(5) and t.pba_read(0) == 1 << 5 and t.pended == 1
    assert t.notify(5) is None  # still one pending bit, not a queue
    (emit,) = t.table_write(5 * 16 + 12, 4, 0)
    assert_msg(emit, MSI_ADDR, 0x55)
    assert not t.is_pending(5) and t.replayed == 1 and t.sent == 1
    assert t.table_write(5 * 16 + 12, 4, 0) == []  # already unmasked, nothing pending


def test_function_mask_pends_and_clearing_replays() -> None:
    t = live()
    program(t, 1, MSI_ADDR, 0x11)
    program(t, 6, MSI_ADDR + 4, 0x66)
    program(t, 7, MSI_ADDR + 8, 0x77, masked=True)
    assert t.set_control(True, True) == []
    for v in (6, 1, 7):
        assert t.notify(v) is None
    assert t.pba_read(0) == 0b1100_0010
    out = t.set_control(True, False)
    assert [e.tlp.data[0] for e in out] == [0x11, 0x66]  # vector order; 7 still entry-masked
    assert t.pba_read(0) == 0b1000_0000


def test_enable_replays_vectors_pended_while_disabled() -> None:
    t = MsixTable(8, requester_id=RID)
    t.bus_master = True
    program(t, 4, MSI_ADDR, 0x44)  # unmasked entry, but MSI-X disabled
    assert t.notify(4) is None and t.is_pending(4)
    (emit,) = t.set_control(True, False)
    assert_msg(emit, MSI_ADDR, 0x44)
    assert not t.is_pending(4)


def test_enable_with_function_mask_does_not_replay() -> None:
    t = MsixTable(8, requester_id=RID)
    t.bus_master = True
    program(t, 0, MSI_ADDR, 1)
    t.notify(0)
    assert t.set_control(True, True) == []
    assert t.is_pending(0)


def test_no_message_without_bus_master() -> None:
    t = live()
    t.bus_master = False
    program(t, 0, MSI_ADDR, 1)
    assert t.notify(0) is None
    assert t.blocked_no_bme == 1 and t.sent == 0
    assert not t.is_pending(0)  # dropped, as QEMU's bus-master address space drops it
    # a pending vector replayed while BME is clear is lost the same way
    t.table_write(12, 4, 1)
    t.notify(0)
    assert t.table_write(12, 4, 0) == []
    assert t.blocked_no_bme == 2 and not t.is_pending(0)


def test_invalid_vector_counted() -> None:
    t = live(4)
    assert t.notify(4) is None and t.notify(-1) is None
    assert t.invalid_vector == 2 and t.pba_read(0) == 0


def test_qword_accesses_and_alignment() -> None:
    t = live(2)
    t.table_write(16, 8, 0x0000_0001_FEE0_0004)
    assert t.table_read(16) == 0xFEE0_0004
    assert t.table_read(20) == 0x1
    assert t.table_read(16, 8) == 0x0000_0001_FEE0_0004
    t.table_write(24, 8, 0x0000_0000_0000_00AB)  # data + vector control (unmask)
    assert t.message(1) == (0x1_FEE0_0004, 0xAB) and not t.is_masked(1)
    for off, size in ((4, 8), (2, 4), (0, 2), (0, 16)):
        with pytest.raises(ValueError):
            t.table_read(off, size)
    assert t.table_read(64) == 0  # beyond the table
    assert t.table_write(64, 4, 0) == []
    with pytest.raises(ValueError):
        t.pba_read(4, 8)


def test_address_low_bits_and_reserved_control_bits() -> None:
    t = live(1)
    t.table_write(0, 4, 0xFEE0_0003)
    assert t.table_read(0) == 0xFEE0_0000
    t.table_write(12, 4, 0xFFFF_FFFE)
    assert t.table_read(12) == 0


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["notify", "mask", "unmask", "fmask", "funmask",
                                                "enable", "disable"]), st.integers(0, 7)),
                    max_size=40))
def test_no_interrupt_lost_or_duplicated(ops) -> None:
    """Model check: each notify is either sent now or leaves its PBA bit set; a set PBA bit is
    sent exactly once when the vector becomes unmasked; nothing is sent while masked."""
    t = MsixTable(8, requester_id=RID)
    t.bus_master = True
    for v in range(8):
        program(t, v, MSI_ADDR, v, masked=False)
    pending = set()
    enabled = fmask = False
    entry_mask = [False] * 8

    def masked(v: int) -> bool:
        return not enabled or fmask or entry_mask[v]

    for op, v in ops:
        if op == "notify":
            emit = t.notify(v)
            if masked(v):
                assert emit is None
                pending.add(v)
            else:
                assert emit is not None and emit.tlp.data[0] == v
            continue
        was = {u: masked(u) for u in range(8)}
        if op == "mask":
            entry_mask[v] = True
            out = t.table_write(v * 16 + 12, 4, 1)
        elif op == "unmask":
            entry_mask[v] = False
            out = t.table_write(v * 16 + 12, 4, 0)
        else:
            enabled = {"enable": True, "disable": False}.get(op, enabled)
            fmask = {"fmask": True, "funmask": False}.get(op, fmask)
            out = t.set_control(enabled, fmask)
        fired = sorted(e.tlp.data[0] for e in out)
        expect = sorted(u for u in pending if was[u] and not masked(u))
        assert fired == expect
        pending -= set(fired)
        assert {u for u in range(8) if t.is_pending(u)} == pending

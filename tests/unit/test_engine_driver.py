"""guest.drivers.engine: the handler's record check (an interrupt never overtakes the completion
record that announces it) with the interrupt generator, against a stand-in kernel -- no process,
no device: the test writes the records into RAM and runs the handler as the interrupts arrive."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from guest.drivers.engine import CMPL_STATUS_DONE, DOORBELL, IRQ_BURST, EngineInstance

BAR0 = 0xFEB0_0000
_RECORD = struct.Struct("<IIQ")


class Ram:
    base = 0

    def __init__(self) -> None:
        self.data = bytearray(1 << 16)
        self._next = 0x100

    def alloc(self, size: int) -> int:
        addr, self._next = self._next, self._next + size
        return addr


class Hw:
    """MMIO: writes are recorded; a read of IRQ_BURST returns what the device took."""

    def __init__(self, generator: bool) -> None:
        self.generator = generator
        self.writes: list[tuple[int, int]] = []
        self.burst = 1

    def mmio_write(self, addr: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        self.writes.append((addr - BAR0, value))
        if addr - BAR0 == IRQ_BURST and self.generator:
            self.burst = value

    async def mmio_read(self, addr: int, size: int) -> bytes:
        assert addr - BAR0 == IRQ_BURST
        return self.burst.to_bytes(4, "little")


def instance(generator: bool = True) -> tuple[EngineInstance, Ram]:
    ram = Ram()
    kernel = SimpleNamespace(provenance={}, ram=ram, hw=Hw(generator), cur_t_ns=0)
    dev = SimpleNamespace(bars=[SimpleNamespace(base=BAR0)], rid=0x0101, caps={}, name="01:00.1")
    inst = EngineInstance(kernel, dev)
    inst.ring = ram.alloc(inst.entries * _RECORD.size)
    inst.wq_depth = 64
    return inst, ram


def complete(inst: EngineInstance, ram: Ram, seq: int) -> None:
    """The device's DMA write of record ``seq``."""
    _RECORD.pack_into(ram.data, inst.ring + (seq % inst.entries) * _RECORD.size, seq, CMPL_STATUS_DONE, seq)


def interrupts(inst: EngineInstance, n: int) -> None:
    """``n`` interrupts reach the handler, one at a time."""
    for _ in range(n):
        inst.handle_irq(inst.irq, 0)


def deliver_in_order_then_one_too_many(inst: EngineInstance, ram: Ram, items: list[tuple[int, int]]) -> None:
    """Each record of ``items`` (seq, its interrupts) lands, then its interrupts: nothing
    overtakes; then one interrupt with no record behind it is caught."""
    for seq, n in items:
        complete(inst, ram, seq)
        interrupts(inst, n)
    assert inst.record_missing == 0
    interrupts(inst, 1)
    assert inst.record_missing == 1


async def test_a_burst_of_interrupts_after_their_record_is_in_order_and_one_more_is_not():
    inst, ram = instance()
    assert await inst.set_burst(4) == 4 and (IRQ_BURST, 4) in inst.kernel.hw.writes
    inst.ring_doorbell(0)
    deliver_in_order_then_one_too_many(inst, ram, [(0, 4)])   # a fifth has no record behind it
    assert inst.completed == 1 and inst.interrupts == 5


async def test_a_device_without_the_generator_keeps_one_per_record():
    inst, ram = instance(generator=False)
    assert await inst.set_burst(8) == 1               # read back: the device took 1
    inst.ring_doorbell(0)
    deliver_in_order_then_one_too_many(inst, ram, [(0, 1)])


async def test_work_rung_before_a_burst_change_is_checked_at_the_burst_it_was_rung_at():
    """Two work items rung at burst 4, then IRQ_BURST set to 1 while they are in flight: their
    4 interrupts each are in order; the next item's 1 is too, and a second one of it is not."""
    inst, ram = instance()
    await inst.set_burst(4)
    inst.ring_doorbell(0)
    inst.ring_doorbell(1)
    assert await inst.set_burst(1) == 1
    for seq in (0, 1):
        complete(inst, ram, seq)
        interrupts(inst, 4)
    assert inst.record_missing == 0, "records rung at burst 4 announce 4 interrupts each"
    inst.ring_doorbell(2)
    deliver_in_order_then_one_too_many(inst, ram, [(2, 1)])
    assert [off for off, _ in inst.kernel.hw.writes].count(DOORBELL) == 3


async def test_two_changes_with_work_in_flight_keep_each_item_at_its_own_burst():
    inst, ram = instance()
    inst.ring_doorbell(0)
    inst.ring_doorbell(1)                            # both at burst 1
    await inst.set_burst(4)
    await inst.set_burst(8)
    for seq in (0, 1):                               # one interrupt each, in order
        complete(inst, ram, seq)
        interrupts(inst, 1)
    assert inst.record_missing == 0
    inst.ring_doorbell(2)                            # at burst 8
    deliver_in_order_then_one_too_many(inst, ram, [(2, 8)])


async def test_interrupts_that_overtake_a_record_rung_between_two_changes_are_caught():
    inst, ram = instance()
    await inst.set_burst(4)
    inst.ring_doorbell(0)
    inst.ring_doorbell(1)                            # 4 each
    await inst.set_burst(1)
    inst.ring_doorbell(2)                            # 1
    await inst.set_burst(4)
    complete(inst, ram, 0)
    interrupts(inst, 4)
    assert inst.record_missing == 0
    interrupts(inst, 3)                              # record 1's interrupts, ahead of record 1
    assert inst.record_missing == 3


async def test_work_the_handler_rings_while_the_burst_is_read_back_runs_at_the_new_burst():
    """A straggler interrupt during the read-back rings backlog work: it is on the link after
    the IRQ_BURST write, so the device runs it at the new burst, and the check counts it so."""
    inst, ram = instance()
    inst.wq_depth = 4                                # 3 in flight, the rest waits in the backlog
    for cookie in range(5):
        inst.ring_doorbell(cookie)
    assert inst.doorbells == 3 and len(inst.backlog) == 2
    hw = inst.kernel.hw
    read = hw.mmio_read

    async def read_with_a_straggler(addr: int, size: int) -> bytes:
        complete(inst, ram, 0)
        inst.handle_irq(inst.irq, 0)                 # record 0's one interrupt: rings item 3
        return await read(addr, size)

    hw.mmio_read = read_with_a_straggler
    assert await inst.set_burst(4) == 4 and inst.doorbells == 4
    deliver_in_order_then_one_too_many(inst, ram, [(1, 1), (2, 1), (3, 4)])   # before the write 1, after 4


async def test_a_device_that_does_not_answer_is_taken_at_its_word_and_nothing_raises():
    inst, _ = instance()

    async def no_answer(addr: int, size: int) -> bytes:
        raise RuntimeError("no completion within 5 s")

    inst.kernel.hw.mmio_read = no_answer
    assert await inst.set_burst(16) == 16
    inst.removed = "surprise removal"
    assert await inst.set_burst(2) == 16             # a removed function is left alone

"""VECTOR -> HCALL -> IMS: the thread's "Alloc / Compose / Store" split, with a fake hypervisor.

Gleixner (2020-11-08): the vector domain allocates, the HCALL domain asks the
hypervisor to compose, the bus domain (IMS) stores.  These tests build that
hierarchy from ``guest.irq`` with a fake hypervisor (records every hypercall,
answers ``(addr_lo, addr_hi, data, handle)``) and a fake MMIO recorder, and
drive it the way ``guest.kernel.Kernel.alloc_ims`` does: allocate, await each
level's ``prepare``, then ``request_irq``.

The fake hypervisor never suspends, so the coroutines are driven to completion
without an event loop (``drive``): tier-a tests, no loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from fabric import hypercall as hc
from fabric.ir import compose_remappable
from guest.irq.domain import (BusyError, DomainBusToken, InvalidIrqError, IrqAllocInfo, IrqTable,
                              MsiMsg, NoSpaceError, NotSupportedError, irq_chip_compose_msi_msg,
                              irq_domain_alloc_irqs, irq_domain_free_irqs,
                              irq_domain_get_irq_data)
from guest.irq.hcall import HcallChip, HcallData, HcallDomain
from guest.irq.ims import IMS_CTRL, IMS_CTRL_VECTOR_MASKBIT, IMS_SLOT_SIZE, ImsDomain, ImsSlot
from guest.irq.vector import VectorDomain, irqd_cfg

# ------------------------------------------------------------------ fakes

APIC_IDS = [0, 2]          # CPU 1 has APIC ID 2: the compose must carry the APIC ID, not the CPU
IMS_BASE = 0xE000_1000     # BAR0 page 1 of the function, as the engine lays it out
HWSIZE = 4
DEV_RID = 0x0018           # 00:03.0 as the guest sees it


def drive(coro):
    """Run a coroutine that never suspends (our fakes don't) to completion, without a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("coroutine suspended: a fake should never wait")


@dataclass
class FakeDev:
    rid: int = DEV_RID

    @property
    def name(self) -> str:
        return "0000:00:03.0"


class FakeHypervisor:
    """Answers HC_MSI_COMPOSE with a remappable message for a fresh IRTE handle."""

    def __init__(self, error: Exception | None = None, first_handle: int = 7):
        self.calls: list[tuple[int, ...]] = []
        self.nowait: list[tuple[int, ...]] = []
        self.error = error
        self.next_handle = first_handle

    def reply(self, handle: int) -> tuple[int, int, int, int]:
        lo, hi, data = compose_remappable(handle)
        return lo, hi, data, handle

    async def hypercall(self, nr: int, *args: int) -> list[int]:
        self.calls.append((nr, *args))
        if self.error is not None:
            raise self.error
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        return list(self.reply(handle))

    def hypercall_nowait(self, nr: int, *args: int) -> None:
        self.nowait.append((nr, *args))


class FakeMmio:
    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, bytes(data)))


def slot_addr(i: int) -> int:
    return IMS_BASE + IMS_SLOT_SIZE * i


def msg_bytes(lo: int, hi: int, data: int) -> bytes:
    return struct.pack("<III", lo, hi, data)


def ctrl_bytes(v: int) -> bytes:
    return struct.pack("<I", v)


class Machine:
    """One guest's irq hierarchy: VECTOR -> HCALL -> HCALL-IMS-<dev>."""

    def __init__(self, hv: FakeHypervisor | None = None, hwsize: int = HWSIZE, hcall: bool = True):
        self.table = IrqTable()
        self.vector = VectorDomain(self.table, APIC_IDS)
        self.hv = hv or FakeHypervisor()
        self.hcall = HcallDomain(self.vector, self.hv) if hcall else None
        self.mmio = FakeMmio()
        self.dev = FakeDev()
        self.ims = ImsDomain(self.hcall or self.vector, self.dev.name, hwsize, slot_addr, self.mmio)
        self.handled: list[tuple[int, int]] = []

    def alloc(self, nr: int = 1, **info) -> int:
        return irq_domain_alloc_irqs(self.ims, nr, IrqAllocInfo(dev=self.dev, **info))

    async def prepare(self, virq: int, nr: int = 1) -> None:
        """Kernel._prepare: await every level's ``prepare`` (the HCALL level composes)."""
        for irq in range(virq, virq + nr):
            for level in self.table.irq_get_irq_data(irq).levels():
                prepare = getattr(level.domain, "prepare", None)
                if prepare is not None:
                    await prepare(level)

    async def alloc_ims(self, nr: int = 1, **info) -> list[int]:
        """Kernel.alloc_ims: allocate, prepare, and free everything again if prepare fails."""
        virq = self.alloc(nr, **info)
        try:
            await self.prepare(virq, nr)
        except BaseException:
            irq_domain_free_irqs(self.ims, virq, nr)
            raise
        return list(range(virq, virq + nr))

    def request(self, irq: int) -> None:
        self.table.request_irq(irq, lambda i, cpu: self.handled.append((i, cpu)), f"engine-ims{irq}")

    def up(self, nr: int = 1, **info) -> list[int]:
        irqs = drive(self.alloc_ims(nr, **info))
        for irq in irqs:
            self.request(irq)
        return irqs

    def hcall_level(self, irq: int):
        return irq_domain_get_irq_data(self.hcall, irq)

    def slot(self, irq: int) -> ImsSlot:
        return irq_domain_get_irq_data(self.ims, irq).chip_data


# --------------------------------------------------------------- hierarchy


def test_hierarchy_shape():
    m = Machine()
    assert m.hcall.parent is m.vector and m.ims.parent is m.hcall
    assert m.ims.name == "HCALL-IMS-0000:00:03.0"
    assert m.hcall.bus_token is DomainBusToken.HCALL
    assert m.ims.bus_token is DomainBusToken.PCI_DEVICE_IMS
    assert m.ims.size == HWSIZE
    lines = m.table.domain_hierarchy().splitlines()
    assert [line.split(":")[0] for line in lines] == ["VECTOR", "  HCALL", "    HCALL-IMS-0000"]
    assert lines[2].endswith("parent=HCALL")


def test_allocation_makes_no_hypercall_and_no_mmio():
    m = Machine()
    virq = m.alloc()
    assert m.hv.calls == [] and m.mmio.writes == []
    levels = [lvl.domain for lvl in m.table.irq_get_irq_data(virq).levels()]
    assert levels == [m.ims, m.hcall, m.vector]
    assert m.hcall_level(virq).chip.name == "HCALL"
    assert m.hcall_level(virq).chip_data == HcallData(DEV_RID, 0)
    assert m.slot(virq) == ImsSlot(0, slot_addr(0))


# ------------------------------------------------------ compose and store


def test_prepare_then_request_stores_exactly_the_composed_message():
    m = Machine()
    (irq,) = m.up()
    lo, hi, data, handle = m.hv.reply(7)
    assert m.mmio.writes == [
        (slot_addr(0), msg_bytes(lo, hi, data)),                 # 12 bytes: the composed pair
        (slot_addr(0) + IMS_CTRL, ctrl_bytes(0)),                # then the slot unmasked
    ]
    assert len(m.mmio.writes[0][1]) == 12
    slot = m.slot(irq)
    assert slot.msg == MsiMsg(lo, hi, data) and not slot.masked
    assert irq_chip_compose_msi_msg(m.table.irq_get_irq_data(irq)) == MsiMsg(lo, hi, data)
    assert m.hcall_level(irq).chip_data.handle == handle
    assert m.hcall.composed == 1


def test_the_guest_composes_nothing_itself():
    """The stored pair is the hypervisor's, never a compatibility MSI built from the vector."""
    m = Machine()
    (irq,) = m.up()
    cfg = irqd_cfg(m.table.irq_get_irq_data(irq))
    stored = m.mmio.writes[0][1]
    assert stored != msg_bytes(0xFEE0_0000 | cfg.dest_apicid << 12, 0, cfg.vector)
    assert struct.unpack("<I", stored[:4])[0] & 0x10      # remappable format, as the fake answered


def test_compose_hypercall_carries_rid_vector_apic_id_and_slot():
    m = Machine()
    (irq,) = m.up(cpu=1)
    cfg = irqd_cfg(m.table.irq_get_irq_data(irq))
    assert (cfg.cpu, cfg.dest_apicid) == (1, 2)
    assert m.hv.calls == [(hc.HC_MSI_COMPOSE, DEV_RID, cfg.vector, 2, 0)]
    assert 0x20 <= cfg.vector < 0xEC


def test_second_irq_composes_for_its_own_slot():
    m = Machine()
    (a,) = m.up()
    (b,) = m.up()
    assert (m.slot(a).index, m.slot(b).index) == (0, 1)
    cookies = [call[4] for call in m.hv.calls]
    assert cookies == [0, 1]
    assert m.mmio.writes[2][0] == slot_addr(1)


def test_compose_after_a_freed_slot_names_the_reused_slot():
    m = Machine()
    a, b, c = (m.up()[0] for _ in range(3))
    m.table.free_irq(b)
    irq_domain_free_irqs(m.ims, b)
    (d,) = m.up()
    assert m.slot(d).index == 1
    assert m.hv.calls[-1][4] == 1


def test_explicit_slot_is_the_cookie():
    m = Machine()
    (irq,) = m.up(hwirq=2)
    assert m.slot(irq).index == 2
    assert m.hv.calls[0][4] == 2
    assert m.mmio.writes[0][0] == slot_addr(2)


def test_multi_irq_allocation_composes_per_slot():
    m = Machine()
    irqs = m.up(2, hwirq=1)
    assert [m.slot(i).index for i in irqs] == [1, 2]
    cfgs = [irqd_cfg(m.table.irq_get_irq_data(i)) for i in irqs]
    assert m.hv.calls == [(hc.HC_MSI_COMPOSE, DEV_RID, c.vector, c.dest_apicid, s)
                          for c, s in zip(cfgs, [1, 2])]
    assert [h.chip_data.handle for h in map(m.hcall_level, irqs)] == [7, 8]


def test_compose_before_prepare_raises_and_stores_nothing():
    m = Machine()
    virq = m.alloc()
    with pytest.raises(InvalidIrqError, match="prepare not run"):
        m.request(virq)
    assert m.mmio.writes == []
    desc = m.table.irq_to_desc(virq)
    assert desc.actions == [] and not desc.activated and desc.masked


def test_hcall_chip_compose_without_message_raises():
    m = Machine()
    virq = m.alloc()
    with pytest.raises(InvalidIrqError):
        HcallChip().irq_compose_msi_msg(m.hcall_level(virq))


def test_interrupt_on_the_guest_vector_runs_the_handler():
    m = Machine()
    (irq,) = m.up(cpu=1)
    cfg = irqd_cfg(m.table.irq_get_irq_data(irq))
    assert m.vector.handle_vector(cfg.cpu, cfg.vector) is True
    assert m.handled == [(irq, 1)]


# ------------------------------------------------------------------ errors


def test_hypercall_error_propagates_from_prepare():
    err = hc.HypercallError(hc.HC_MSI_COMPOSE, -hc.KVM_EPERM)
    m = Machine(FakeHypervisor(error=err))
    virq = m.alloc()
    with pytest.raises(hc.HypercallError) as exc:
        drive(m.hcall.prepare(m.hcall_level(virq)))
    assert exc.value is err
    assert m.hcall_level(virq).chip_data.msg is None
    assert m.hcall.composed == 0


def test_failed_compose_leaves_nothing_allocated():
    m = Machine(FakeHypervisor(error=hc.HypercallError(hc.HC_MSI_COMPOSE, -hc.KVM_ENOSPC)))
    with pytest.raises(hc.HypercallError, match="ENOSPC"):
        drive(m.alloc_ims())
    assert m.table.descs == {}
    assert m.ims.used == set() and m.ims.revmap == {}
    assert m.vector.matrix.allocated(0) == m.vector.matrix.allocated(1) == 0
    assert m.hv.nowait == []            # nothing was composed, so nothing to free
    assert m.mmio.writes == []


def test_failure_on_the_second_of_two_frees_the_first_compose():
    hv = FakeHypervisor()
    calls = 0

    async def flaky(nr, *args):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise hc.HypercallError(nr, -hc.KVM_ENOSPC)
        return await FakeHypervisor.hypercall(hv, nr, *args)

    hv.hypercall = flaky
    m = Machine(hv)
    with pytest.raises(hc.HypercallError):
        drive(m.alloc_ims(2))
    assert hv.nowait == [(hc.HC_MSI_FREE, DEV_RID, 7)]
    assert m.table.descs == {} and m.ims.used == set()


# ----------------------------------------------------------------- release


def test_free_sends_msi_free_with_the_handle():
    m = Machine()
    (irq,) = m.up()
    m.table.free_irq(irq)
    assert m.mmio.writes[-1] == (slot_addr(0) + IMS_CTRL, ctrl_bytes(IMS_CTRL_VECTOR_MASKBIT))
    assert m.hv.nowait == []            # free_irq only masks
    irq_domain_free_irqs(m.ims, irq)
    assert m.hv.nowait == [(hc.HC_MSI_FREE, DEV_RID, 7)]
    assert m.hv.calls == [m.hv.calls[0]]    # the free is not awaited
    assert m.table.descs == {} and m.ims.used == set()
    assert m.vector.matrix.allocated(0) == m.vector.matrix.allocated(1) == 0


def test_free_of_an_unprepared_irq_sends_nothing():
    m = Machine()
    virq = m.alloc()
    irq_domain_free_irqs(m.ims, virq)
    assert m.hv.nowait == []


def test_free_sends_one_msi_free_per_irq():
    m = Machine()
    irqs = m.up(3)
    for irq in irqs:
        m.table.free_irq(irq)
    irq_domain_free_irqs(m.ims, irqs[0], 3)
    assert m.hv.nowait == [(hc.HC_MSI_FREE, DEV_RID, h) for h in (7, 8, 9)]


# ---------------------------------------------------------- mask, affinity


def test_mask_and_unmask_write_the_slot_ctrl():
    m = Machine()
    (irq,) = m.up()
    m.table.mask_irq(irq)
    m.table.unmask_irq(irq)
    assert m.mmio.writes[-2:] == [(slot_addr(0) + IMS_CTRL, ctrl_bytes(1)),
                                  (slot_addr(0) + IMS_CTRL, ctrl_bytes(0))]


def test_set_affinity_is_refused():
    m = Machine()
    (irq,) = m.up(cpu=0)
    cfg = irqd_cfg(m.table.irq_get_irq_data(irq))
    with pytest.raises(NotSupportedError):
        m.table.irq_set_affinity(irq, 1)
    with pytest.raises(NotSupportedError, match="compose hypercall"):
        m.hcall.chip.irq_set_affinity(m.hcall_level(irq), 1)
    assert irqd_cfg(m.table.irq_get_irq_data(irq)) == cfg     # nothing moved
    assert len(m.hv.calls) == 1


# -------------------------------------------------------------- exhaustion


def test_slot_exhaustion_is_no_space():
    m = Machine(hwsize=2)
    m.up(2)
    calls, writes = len(m.hv.calls), len(m.mmio.writes)
    allocated = m.vector.matrix.allocated(0) + m.vector.matrix.allocated(1)
    with pytest.raises(NoSpaceError):
        m.alloc()
    assert (len(m.hv.calls), len(m.mmio.writes)) == (calls, writes)
    assert m.vector.matrix.allocated(0) + m.vector.matrix.allocated(1) == allocated
    assert len(m.table.descs) == 2


def test_request_beyond_the_slots_is_no_space():
    m = Machine(hwsize=2)
    with pytest.raises(NoSpaceError):
        m.alloc(hwirq=1, nr=2)
    with pytest.raises(NoSpaceError):
        m.alloc(3)
    assert m.table.descs == {} and m.vector.matrix.allocated(0) == 0


def test_slot_in_use_is_refused_without_leaking_a_vector():
    """Rule 1: a failing alloc undoes its parent's allocation too."""
    m = Machine()
    m.up(hwirq=1)
    before = [m.vector.matrix.allocated(c) for c in range(len(APIC_IDS))]
    with pytest.raises(BusyError):
        m.alloc(hwirq=1)
    assert [m.vector.matrix.allocated(c) for c in range(len(APIC_IDS))] == before
    assert m.ims.used == {1}
    assert len(m.table.descs) == 1


def test_slot_outside_the_domain_is_refused_without_leaking():
    m = Machine()
    with pytest.raises(InvalidIrqError):
        m.alloc(hwirq=-1)
    assert m.vector.matrix.allocated(0) == m.vector.matrix.allocated(1) == 0
    assert m.ims.used == set() and m.table.descs == {}


def test_the_callers_alloc_info_is_not_modified():
    m = Machine()
    info = IrqAllocInfo(dev=m.dev)
    irq_domain_alloc_irqs(m.ims, 1, info)
    irq_domain_alloc_irqs(m.ims, 1, info)       # the same info again: the next free slot
    assert info.hwirq is None
    assert m.ims.used == {0, 1}


def test_alloc_without_info_still_names_the_slot():
    m = Machine()
    m.alloc()
    virq = irq_domain_alloc_irqs(m.ims, 1, None)
    assert m.hcall_level(virq).chip_data == HcallData(0, 1)   # no device: RID 0, but slot 1


def test_freed_slots_are_reused():
    m = Machine(hwsize=1)
    (irq,) = m.up()
    m.table.free_irq(irq)
    irq_domain_free_irqs(m.ims, irq)
    (again,) = m.up()
    assert m.slot(again).index == 0


# ------------------------------------------------- IMS on the vector domain


def test_ims_on_a_bare_vector_domain_composes_compat_messages():
    m = Machine(hcall=False)
    assert m.ims.name == "IMS-0000:00:03.0" and m.ims.parent is m.vector
    (irq,) = m.up(cpu=1)
    cfg = irqd_cfg(m.table.irq_get_irq_data(irq))
    assert m.hv.calls == []
    assert m.mmio.writes == [
        (slot_addr(0), msg_bytes(0xFEE0_0000 | 2 << 12, 0, cfg.vector)),
        (slot_addr(0) + IMS_CTRL, ctrl_bytes(0)),
    ]


def test_ims_on_a_bare_vector_domain_moves_with_the_vector():
    """Without HCALL the IMS chip still has no set_affinity of its own (pci_create_ims_domain)."""
    m = Machine(hcall=False)
    (irq,) = m.up()
    with pytest.raises(NotSupportedError):
        m.table.irq_set_affinity(irq, 1)


def test_prepare_is_a_no_op_without_hcall():
    m = Machine(hcall=False)
    virq = m.alloc()
    drive(m.prepare(virq))
    assert m.hv.calls == []

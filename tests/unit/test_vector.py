"""VectorMatrix and the x86 vector domain."""

import pytest

from guest.irq.domain import (
    DomainCreationError,
    InvalidIrqError,
    IrqAllocInfo,
    IrqError,
    IrqSetMask,
    IrqTable,
    MsiMsg,
    NoSpaceError,
    irq_chip_compose_msi_msg,
    irq_domain_alloc_irqs,
    irq_domain_free_irqs,
)
from guest.irq.vector import (
    FIRST_EXTERNAL_VECTOR,
    FIRST_SYSTEM_VECTOR,
    IRQ_MOVE_CLEANUP_VECTOR,
    ISA_IRQ_VECTOR,
    IrqCfg,
    VectorDomain,
    VectorMatrix,
    irq_msi_compose_msg,
    irqd_cfg,
)

# ----------------------------------------------------------------- matrix


def test_range_and_reservations():
    m = VectorMatrix(1)
    assert (FIRST_EXTERNAL_VECTOR, FIRST_SYSTEM_VECTOR) == (0x20, 0xEC)
    assert IRQ_MOVE_CLEANUP_VECTOR == 0x20
    assert [ISA_IRQ_VECTOR(0), ISA_IRQ_VECTOR(15)] == [0x30, 0x3F]
    assert m.usable == list(range(0x21, 0x30)) + list(range(0x40, 0xEC))
    assert len(m.usable) == m.available(0) == 187


def test_lowest_free_vector_on_least_loaded_cpu():
    m = VectorMatrix(3)
    got = [m.alloc() for _ in range(5)]
    assert got == [(0, 0x21), (1, 0x21), (2, 0x21), (0, 0x22), (1, 0x22)]
    m.free(0, 0x21)
    assert m.alloc() == (0, 0x21)  # CPU 0 had the fewest (tie broken to the lowest CPU)
    assert m.alloc() == (2, 0x22)


def test_requested_cpu_and_skipping_reserved():
    m = VectorMatrix(2)
    vectors = [m.alloc(1)[1] for _ in range(16)]
    assert vectors[-2:] == [0x2F, 0x40]
    assert m.allocated(1) == 16 and m.allocated(0) == 0


def test_per_cpu_and_global_exhaustion():
    m = VectorMatrix(2)
    for _ in range(187):
        m.alloc(0)
    with pytest.raises(NoSpaceError, match="CPU 0: all 187"):
        m.alloc(0)
    assert m.alloc() == (1, 0x21)  # the other CPU still has room
    for _ in range(186):
        m.alloc()
    with pytest.raises(NoSpaceError, match="all 2 CPUs"):
        m.alloc()


def test_free_errors_and_bad_cpu():
    m = VectorMatrix(1)
    cpu, vec = m.alloc()
    m.free(cpu, vec)
    with pytest.raises(InvalidIrqError, match="not allocated"):
        m.free(cpu, vec)
    with pytest.raises(InvalidIrqError, match="CPU 4 does not exist"):
        m.alloc(4)


def test_custom_reservations():
    m = VectorMatrix(1, reserved=set())
    assert m.alloc() == (0, 0x20) and m.available(0) == 0xEC - 0x20 - 1


# ----------------------------------------------------------------- compose


@pytest.mark.parametrize("cfg, ext, msg", [
    (IrqCfg(0x21, 0, 0), False, MsiMsg(0xFEE00000, 0, 0x21)),
    (IrqCfg(0x45, 3, 1), False, MsiMsg(0xFEE03000, 0, 0x45)),
    (IrqCfg(0xEB, 0xFF, 7), False, MsiMsg(0xFEEFF000, 0, 0xEB)),
    # extended destination ID: apicid[14:8] in address bits 11:5
    (IrqCfg(0x30, 0x123, 9), True, MsiMsg(0xFEE23000 | (0x1 << 5), 0, 0x30)),
    (IrqCfg(0x30, 0x7FFF, 9), True, MsiMsg(0xFEEFF000 | (0x7F << 5), 0, 0x30)),
])
def test_compatibility_format(cfg, ext, msg):
    assert irq_msi_compose_msg(cfg, ext) == msg


@pytest.mark.parametrize("apicid, ext", [(0x100, False), (0x8000, True)])
def test_unaddressable_apic_id_needs_ir(apicid, ext):
    with pytest.raises(IrqError, match="needs interrupt remapping"):
        irq_msi_compose_msg(IrqCfg(0x30, apicid, 0), ext)


# ------------------------------------------------------------------ domain


@pytest.fixture
def vd():
    table = IrqTable()
    return table, VectorDomain(table, cpu_to_apicid=[0, 4, 8])


def test_alloc_assigns_cpu_vector_and_apicid(vd):
    table, dom = vd
    virq = irq_domain_alloc_irqs(dom, 2, IrqAllocInfo(cpu=2))
    data = table.irq_get_irq_data(virq + 1)
    assert data.chip_data == IrqCfg(0x22, 8, 2) == irqd_cfg(data)
    assert data.hwirq == virq + 1 and data.chip.name == "APIC"
    assert dom.irq_for_vector(2, 0x21) == virq and dom.irq_for_vector(2, 0x22) == virq + 1
    assert irq_chip_compose_msi_msg(data) == MsiMsg(0xFEE08000, 0, 0x22)
    irq_domain_free_irqs(dom, virq, 2)
    assert dom.matrix.allocated(2) == 0 and dom.vector_irq == [{}, {}, {}]


def test_any_arg_without_cpu_means_least_loaded(vd):
    table, dom = vd
    virq = irq_domain_alloc_irqs(dom, 3, arg=object())
    assert [irqd_cfg(table.irq_get_irq_data(virq + i)).cpu for i in range(3)] == [0, 1, 2]


def test_partial_multi_alloc_is_undone(vd):
    table, dom = vd
    for _ in range(185):
        dom.matrix.alloc(1)
    with pytest.raises(NoSpaceError, match="CPU 1"):
        irq_domain_alloc_irqs(dom, 3, IrqAllocInfo(cpu=1))
    assert dom.matrix.allocated(1) == 185 and dom.vector_irq[1] == {}
    assert table.descs == {}
    assert irq_domain_alloc_irqs(dom, 2, IrqAllocInfo(cpu=1)) == table.first_irq


def test_set_affinity_moves_the_vector(vd):
    table, dom = vd
    virq = irq_domain_alloc_irqs(dom, 1, IrqAllocInfo(cpu=0))
    dom.matrix.alloc(1)  # CPU 1 already uses 0x21
    assert table.irq_set_affinity(virq, 1) is IrqSetMask.OK
    cfg = irqd_cfg(table.irq_get_irq_data(virq))
    assert cfg == IrqCfg(0x22, 4, 1)
    assert not dom.matrix.is_allocated(0, 0x21)
    assert dom.irq_for_vector(0, 0x21) is None and dom.irq_for_vector(1, 0x22) == virq
    assert table.irq_set_affinity(virq, 1) is IrqSetMask.OK  # same CPU: unchanged
    assert irqd_cfg(table.irq_get_irq_data(virq)) is cfg


def test_set_affinity_failure_changes_nothing(vd):
    table, dom = vd
    virq = irq_domain_alloc_irqs(dom, 1, IrqAllocInfo(cpu=0))
    for _ in range(187):
        dom.matrix.alloc(2)
    with pytest.raises(NoSpaceError):
        table.irq_set_affinity(virq, 2)
    assert irqd_cfg(table.irq_get_irq_data(virq)) == IrqCfg(0x21, 0, 0)
    assert dom.irq_for_vector(0, 0x21) == virq


def test_handle_vector_runs_the_bound_irq(vd):
    table, dom = vd
    virq = irq_domain_alloc_irqs(dom, 1, IrqAllocInfo(cpu=1))
    seen = []
    table.request_irq(virq, lambda irq, cpu: seen.append((irq, cpu)), "dev")
    assert dom.handle_vector(1, 0x21) is True
    assert dom.handle_vector(0, 0x21) is False and dom.spurious == 1
    assert seen == [(virq, 1)] and table.irq_to_desc(virq).kstat == {1: 1}
    with pytest.raises(InvalidIrqError):
        dom.handle_vector(3, 0x21)


@pytest.mark.parametrize("apicids, reason", [([], "lists no CPU"), ([1, 1], "duplicate APIC ids")])
def test_bad_cpu_map_is_a_creation_error(apicids, reason):
    with pytest.raises(DomainCreationError, match=reason):
        VectorDomain(IrqTable(), apicids)

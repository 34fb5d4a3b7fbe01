"""``Kernel.boot()``: the irq hierarchy a CPUID answer calls for, and the delivery oracle.

The policy is the thread's: bare metal composes itself (vector or IR); a guest
that knows it is a VM composes through the hypervisor (HCALL) if it can, and
refuses IMS domain creation otherwise; a guest that cannot tell (``hidden``)
behaves as bare metal; the ``legacy2020`` kernel puts IMS on the vector domain
even in a VM (the behaviour the thread criticises).  ``Kernel.deliver`` then
compares the provenance of each arriving interrupt with the owner of its vector.

The fake ``Hardware`` implements only what boot and ``create_ims_domain`` /
``alloc_ims`` touch; CPUID comes from ``host.cpuid.vm_cpuid``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from functools import partial

import pytest

from fabric import hypercall as hc
from fabric.ir import compose_remappable
from guest.cpuid import bare_metal_cpuid
from guest.irq.domain import (DomainCreationError, IrqAllocInfo, irq_domain_alloc_irqs,
                              irq_domain_get_irq_data)
from guest.irq.hcall import HcallDomain
from guest.irq.ims import IMS_CTRL, ImsDomain
from guest.irq.ir import IrDomain
from guest.irq.vector import irqd_cfg
from guest.kernel import Breach, Kernel
from host.cpuid import vm_cpuid

APIC_IDS = [0, 1]
RAM = 2 << 20
IMS_BASE = 0xE000_1000


class FakeHardware:
    """Records MMIO and IRTE programming; answers compose hypercalls like a KVM host would."""

    def __init__(self):
        self.mmio: list[tuple[int, bytes]] = []
        self.irtes: dict[int, int] = {}
        self.calls: list[tuple[int, ...]] = []
        self.nowait: list[tuple[int, ...]] = []

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.mmio.append((addr, bytes(data)))

    def irte_write(self, index: int, raw: int) -> None:
        self.irtes[index] = raw

    def irte_clear(self, index: int) -> None:
        self.irtes.pop(index, None)

    async def hypercall(self, nr: int, *args: int) -> list[int]:
        self.calls.append((nr, *args))
        handle = 40 + len(self.calls)
        return [*compose_remappable(handle), handle]

    def hypercall_nowait(self, nr: int, *args: int) -> None:
        self.nowait.append((nr, *args))


@dataclass
class FakeDev:
    rid: int = 0x0018

    @property
    def name(self) -> str:
        return "0000:00:03.0"


def drive(coro):
    """Run a coroutine that never suspends to completion, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("coroutine suspended")


def slot_addr(i: int) -> int:
    return IMS_BASE + 16 * i


def cpuid_of(profile: str):
    return bare_metal_cpuid if profile == "bare" else partial(vm_cpuid, profile)


def boot(profile: str = "bare", variant: str = "modern", ir_entries: int | None = 256,
         provenance: dict[int, int] | None = None) -> Kernel:
    k = Kernel("k", APIC_IDS, RAM, FakeHardware(), cpuid_of(profile), ir_entries=ir_entries,
               variant=variant, provenance=provenance)
    k.boot()
    return k


# ---------------------------------------------------------------- policies


def test_bare_metal_with_ir_remaps_msi_and_ims():
    k = boot("bare", ir_entries=256)
    assert not k.cpuid.hypervisor
    assert isinstance(k.ir, IrDomain) and k.ir.name == "INTEL-IR-0" and k.ir.parent is k.vector
    assert k.msi_parent is k.ir and k.ims_parent is k.ir
    assert k.hcall is None
    ims = k.create_ims_domain(FakeDev(), 4, slot_addr)
    assert ims.parent is k.ir and ims.name == "IR-IMS-0000:00:03.0"
    assert any("Enabled IRQ remapping" in line for line in k.log)


@pytest.mark.parametrize("ir_entries", [None, 0])
def test_bare_metal_without_ir_uses_the_vector_domain(ir_entries):
    k = boot("bare", ir_entries=ir_entries)
    assert k.ir is None and k.hcall is None
    assert k.msi_parent is k.vector and k.ims_parent is k.vector
    ims = k.create_ims_domain(FakeDev(), 4, slot_addr)
    assert ims.parent is k.vector and ims.name == "IMS-0000:00:03.0"


def test_kvm_modern_builds_the_hcall_domain():
    k = boot("kvm", "modern")
    assert k.cpuid.hypervisor and k.cpuid.msi_compose
    assert isinstance(k.hcall, HcallDomain) and k.hcall.parent is k.vector
    assert k.hcall.hv is k.hw
    assert k.ims_parent is k.hcall
    assert k.msi_parent is k.vector          # MSI-X of an assigned VF: the VMM emulates the table
    assert k.ir is None                      # ir_entries is a bare-metal thing
    ims = k.create_ims_domain(FakeDev(), 4, slot_addr)
    assert ims.parent is k.hcall and ims.name == "HCALL-IMS-0000:00:03.0"
    assert "irq: hypervisor offers MSI compose: HCALL domain created" in k.log


def test_oldkvm_modern_refuses_ims_naming_the_missing_hypercall():
    k = boot("oldkvm", "modern")
    assert k.cpuid.hypervisor and not k.cpuid.msi_compose
    assert k.ims_parent is None and k.hcall is None and k.ir is None
    assert k.msi_parent is k.vector
    with pytest.raises(DomainCreationError) as exc:
        k.create_ims_domain(FakeDev(), 4, slot_addr)
    err = exc.value
    assert err.name == "IMS-0000:00:03.0"
    assert err.errno == errno.ENODEV
    assert "compose hypercall" in str(err)
    assert "KVM_FEATURE_IRQLAB_MSI_COMPOSE" in str(err)
    assert [d.name for d in k.irq.domains] == ["VECTOR"]     # nothing half-created


def test_hidden_looks_like_bare_metal():
    k = boot("hidden", "modern", ir_entries=None)
    assert not k.cpuid.hypervisor
    assert k.hcall is None and k.ir is None
    assert k.ims_parent is k.vector
    ims = k.create_ims_domain(FakeDev(), 4, slot_addr)       # "succeeds" ...
    assert ims.parent is k.vector
    assert k.log[0] == "cpuid: bare metal (CPUID.1:ECX[31] clear)"


def test_hidden_kernel_is_indistinguishable_from_bare_metal():
    hidden, bare = boot("hidden", ir_entries=None), boot("bare", ir_entries=None)
    assert hidden.cpuid == bare.cpuid
    assert hidden.irq.domain_hierarchy() == bare.irq.domain_hierarchy()
    assert hidden.log == bare.log


@pytest.mark.parametrize("profile", ["kvm", "oldkvm"])
def test_legacy2020_puts_ims_on_the_vector_domain_in_a_vm(profile):
    k = boot(profile, "legacy2020")
    assert k.cpuid.hypervisor
    assert k.hcall is None and k.ir is None
    assert k.ims_parent is k.vector and k.msi_parent is k.vector
    ims = k.create_ims_domain(FakeDev(), 4, slot_addr)
    assert ims.parent is k.vector
    assert any("legacy2020" in line for line in k.log)


def test_ims_domain_needs_slots():
    k = boot("kvm")
    with pytest.raises(DomainCreationError, match="no IMS slots"):
        k.create_ims_domain(FakeDev(), 0, slot_addr)


def test_boot_returns_and_keeps_the_probe():
    k = Kernel("k", APIC_IDS, RAM, FakeHardware(), cpuid_of("kvm"))
    info = k.boot()
    assert info is k.cpuid and info.vendor == "KVMKVMKVM\0\0\0"
    assert k.log[0].startswith("cpuid: hypervisor 'KVMKVMKVM'")


# ---------------------------------------------------- IMS through the kernel


def test_kvm_alloc_ims_composes_by_hypercall_and_records_the_owner():
    k = boot("kvm", provenance={0x0018: 0x0101})
    dev = FakeDev()
    ims = k.create_ims_domain(dev, 4, slot_addr)
    (irq,) = drive(k.alloc_ims(ims, dev))
    cfg = irqd_cfg(k.irq.irq_get_irq_data(irq))
    assert k.hw.calls == [(hc.HC_MSI_COMPOSE, 0x0018, cfg.vector, cfg.dest_apicid, 0)]
    assert k.irq_owner[irq] == 0x0101        # the physical VF, not the guest's RID
    k.irq.request_irq(irq, lambda i, c: None, "engine")
    lo, hi, data = compose_remappable(41)
    assert k.hw.mmio == [(slot_addr(0), struct.pack("<III", lo, hi, data)),
                         (slot_addr(0) + IMS_CTRL, struct.pack("<I", 0))]


def test_kvm_second_ims_irq_composes_for_slot_1():
    k = boot("kvm")
    dev = FakeDev()
    ims = k.create_ims_domain(dev, 4, slot_addr)
    drive(k.alloc_ims(ims, dev))
    (irq,) = drive(k.alloc_ims(ims, dev))
    assert irq_domain_get_irq_data(ims, irq).hwirq == 1
    assert k.hw.calls[-1][4] == 1


def test_bare_metal_alloc_ims_programs_an_irte_for_the_device():
    k = boot("bare", ir_entries=256)
    dev = FakeDev(rid=0x0100)
    ims = k.create_ims_domain(dev, 4, slot_addr)
    (irq,) = drive(k.alloc_ims(ims, dev))
    assert k.hw.calls == []
    k.irq.request_irq(irq, lambda i, c: None, "engine")
    index = irq_domain_get_irq_data(k.ir, irq).hwirq
    assert index in k.hw.irtes
    assert k.hw.mmio[0] == (slot_addr(0), struct.pack("<III", *compose_remappable(index)))
    assert k.irq_owner[irq] == 0x0100


def test_ims_domain_uses_the_kernels_hardware_for_mmio():
    k = boot("kvm")
    ims = k.create_ims_domain(FakeDev(), 4, slot_addr)
    assert isinstance(ims, ImsDomain) and ims.chip.mmio is k.hw


# ------------------------------------------------------------------ deliver

OWNER, OTHER = 0x0101, 0x0202


def bound_irq(k: Kernel, cpu: int, owner: int | None = OWNER, seen: list | None = None):
    """A requested vector-domain irq on ``cpu`` owned by ``owner``; returns (irq, vector)."""
    irq = irq_domain_alloc_irqs(k.vector, 1, IrqAllocInfo(cpu=cpu))
    handler = (lambda i, c: seen.append((i, c, k.cur_origin, k.cur_t_ns))) if seen is not None \
        else (lambda i, c: None)
    k.irq.request_irq(irq, handler, f"test{irq}")
    if owner is not None:
        k.irq_owner[irq] = owner
    return irq, irqd_cfg(k.irq.irq_get_irq_data(irq)).vector


def test_deliver_runs_the_handler_and_counts_the_arrival():
    k = boot("bare", ir_entries=None)
    seen: list = []
    irq, vector = bound_irq(k, 1, seen=seen)
    k.deliver(APIC_IDS[1], vector, origin=OWNER, t_ns=77)
    assert seen == [(irq, 1, OWNER, 77)]     # the handler sees the provenance
    assert k.arrivals == {irq: 1}
    assert k.irq.irq_to_desc(irq).kstat == {1: 1}
    assert k.irqs_received == 1
    assert k.breach_count == 0 and k.breaches == []


def test_deliver_counts_arrivals_per_irq():
    k = boot("bare", ir_entries=None)
    a, va = bound_irq(k, 0)
    b, vb = bound_irq(k, 0)
    for _ in range(3):
        k.deliver(0, va, OWNER)
    k.deliver(0, vb, OWNER)
    assert k.arrivals == {a: 3, b: 1}
    assert k.irqs_received == 4


def test_deliver_from_another_origin_is_a_breach():
    k = boot("bare", ir_entries=None)
    seen: list = []
    irq, vector = bound_irq(k, 0, seen=seen)
    k.deliver(0, vector, origin=OTHER, t_ns=5)
    assert k.breach_count == 1
    assert k.breaches == [Breach(cpu=0, vector=vector, irq=irq, owner=OWNER, origin=OTHER,
                                 receiver=f"test{irq}")]
    assert str(k.breaches[0]) == (f"CPU0 vector 0x{vector:02x} (irq {irq}) belongs to 01:00.1 "
                                  f"but was raised by 02:00.2; handled by test{irq}")
    assert k.arrivals == {irq: 1} and len(seen) == 1     # still delivered: the oracle only observes


def test_deliver_without_provenance_is_not_a_breach():
    k = boot("bare", ir_entries=None)
    irq, vector = bound_irq(k, 0)
    k.deliver(0, vector)
    assert k.breach_count == 0 and k.arrivals == {irq: 1}


def test_deliver_from_the_owner_is_never_a_breach():
    k = boot("bare", ir_entries=None)
    _, v0 = bound_irq(k, 0, owner=OWNER)
    _, v1 = bound_irq(k, 1, owner=OTHER)
    k.deliver(0, v0, OWNER)
    k.deliver(1, v1, OTHER)
    assert k.breach_count == 0


def test_deliver_to_an_unowned_vector_is_a_breach():
    k = boot("bare", ir_entries=None)
    k.deliver(0, 0x99, origin=OTHER)
    assert k.breaches == [Breach(0, 0x99, None, None, OTHER)]
    assert k.vector.spurious == 1
    assert k.arrivals == {}
    assert "belongs to nobody" in str(k.breaches[0])


def test_breach_log_is_bounded_but_the_count_is_not():
    k = boot("bare", ir_entries=None)
    _, vector = bound_irq(k, 0)
    for _ in range(150):
        k.deliver(0, vector, OTHER)
    assert k.breach_count == 150 and len(k.breaches) == 100


def test_misdirected_apic_id_is_counted_and_dropped():
    k = boot("bare", ir_entries=None)
    irq, vector = bound_irq(k, 0)
    k.deliver(7, vector, origin=OTHER)
    assert k.misdirected == 1
    assert k.irqs_received == 0 and k.arrivals == {} and k.breach_count == 0


def test_deliver_through_the_hcall_path_checks_the_physical_owner():
    """kvm guest: the interrupt arrives on the guest vector the HCALL level allocated."""
    k = boot("kvm", provenance={0x0018: OWNER})
    dev = FakeDev()
    ims = k.create_ims_domain(dev, 4, slot_addr)
    (irq,) = drive(k.alloc_ims(ims, dev))
    seen: list = []
    k.irq.request_irq(irq, lambda i, c: seen.append(i), "engine")
    cfg = irqd_cfg(k.irq.irq_get_irq_data(irq))
    k.deliver(cfg.dest_apicid, cfg.vector, origin=OWNER)
    k.deliver(cfg.dest_apicid, cfg.vector, origin=OTHER)
    assert seen == [irq, irq]
    assert k.arrivals == {irq: 2}
    assert k.breach_count == 1 and k.breaches[0].origin == OTHER

"""x86 CPU-vector allocation and the root irq domain (Linux arch/x86/kernel/apic/vector.c).

``VectorMatrix`` is Linux's ``irq_matrix`` (kernel/irq/matrix.c) reduced to
what the model needs: one bitmap of vectors per CPU over the external range
``FIRST_EXTERNAL_VECTOR (0x20) .. FIRST_SYSTEM_VECTOR (0xEC)``, exclusive.
0xEC is LOCAL_TIMER_VECTOR; everything from there up is a system vector
(timer, IPIs, spurious 0xFF) and never handed to devices.

Reserved inside the range (system-wide, on every CPU), as Linux does on a
machine with a legacy PIC:

- 0x20 ``IRQ_MOVE_CLEANUP_VECTOR`` (``irq_matrix_assign_system`` in
  ``lapic_assign_system_vectors``; v6.6 replaced it by a timer, the model
  keeps the classic layout);
- 0x30..0x3F ``ISA_IRQ_VECTOR(0..15)``, the legacy ISA irqs.

That leaves 187 device vectors per CPU: 0x21..0x2F and 0x40..0xEB. Pass
``reserved=`` to model another machine. Allocation is Linux's: the CPU with
the most free vectors (ties: lowest CPU number) unless one is requested,
then the lowest free vector on it.

``VectorDomain`` is ``x86_vector_domain``: the root of every hierarchy. Its
alloc assigns a (CPU, vector) to each virq, kept in ``irq_data.chip_data`` as
an ``IrqCfg``; its chip "APIC" composes compatibility-format MSIs (digest §1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guest.irq.domain import (
    DomainCreationError,
    InvalidIrqError,
    IrqChip,
    IrqData,
    IrqDomain,
    IrqDomainFlags,
    IrqDomainOps,
    IrqError,
    IrqSetMask,
    IrqTable,
    MsiMsg,
    NoSpaceError,
    irq_domain_get_irq_data,
    irq_domain_reset_irq_data,
    irq_domain_set_hwirq_and_chip,
)

NR_VECTORS = 256
FIRST_EXTERNAL_VECTOR = 0x20
FIRST_SYSTEM_VECTOR = 0xEC          # LOCAL_TIMER_VECTOR
IRQ_MOVE_CLEANUP_VECTOR = FIRST_EXTERNAL_VECTOR


def ISA_IRQ_VECTOR(irq: int) -> int:  # noqa: N802 - Linux macro name
    """Vector of legacy ISA irq ``irq`` (0x30 + irq)."""
    return ((FIRST_EXTERNAL_VECTOR + 16) & ~15) + irq


DEFAULT_RESERVED_VECTORS = frozenset(
    {IRQ_MOVE_CLEANUP_VECTOR} | {ISA_IRQ_VECTOR(irq) for irq in range(16)})

# Compatibility-format MSI address (digest §1)
X86_MSI_BASE_ADDRESS_LOW = 0xFEE00000
X86_MSI_BASE_ADDRESS_HIGH = 0
MSI_ADDR_DEST_ID_SHIFT = 12          # bits 19:12 destid_0_7
MSI_ADDR_EXT_DEST_ID_SHIFT = 5       # bits 11:5 virt_destid_8_14


class VectorMatrix:
    """Per-CPU external-vector allocator (Linux ``struct irq_matrix``).

    ``alloc(cpu=None) -> (cpu, vector)``, ``free(cpu, vector)``. Raises
    ``NoSpaceError`` when the requested CPU (or, with no request, every CPU)
    has no free vector, ``InvalidIrqError`` for a bad CPU or a vector that is
    not allocated.
    """

    def __init__(self, ncpus: int, reserved: frozenset[int] | set[int] = DEFAULT_RESERVED_VECTORS):
        if ncpus < 1:
            raise ValueError(f"need at least one CPU, got {ncpus}")
        self.ncpus = ncpus
        self.reserved = frozenset(reserved)
        self.usable = [v for v in range(FIRST_EXTERNAL_VECTOR, FIRST_SYSTEM_VECTOR)
                       if v not in self.reserved]
        self._allocated: list[set[int]] = [set() for _ in range(ncpus)]

    def _check_cpu(self, cpu: int) -> None:
        if not 0 <= cpu < self.ncpus:
            raise InvalidIrqError(f"CPU {cpu} does not exist (ncpus={self.ncpus})")

    def allocated(self, cpu: int) -> int:
        self._check_cpu(cpu)
        return len(self._allocated[cpu])

    def available(self, cpu: int) -> int:
        return len(self.usable) - self.allocated(cpu)

    def is_allocated(self, cpu: int, vector: int) -> bool:
        self._check_cpu(cpu)
        return vector in self._allocated[cpu]

    def alloc(self, cpu: int | None = None) -> tuple[int, int]:
        """irq_matrix_alloc - Allocate a vector on ``cpu`` or on the least-loaded CPU."""
        where = f"CPU {cpu}" if cpu is not None else f"all {self.ncpus} CPUs"
        if cpu is None:
            cpu = max(range(self.ncpus), key=lambda c: (self.available(c), -c))
        if self.available(cpu) == 0:
            raise NoSpaceError(f"{where}: all {len(self.usable)} device vectors in use")
        used = self._allocated[cpu]
        vector = next(v for v in self.usable if v not in used)
        used.add(vector)
        return cpu, vector

    def free(self, cpu: int, vector: int) -> None:
        """irq_matrix_free - Release ``vector`` on ``cpu``."""
        self._check_cpu(cpu)
        if vector not in self._allocated[cpu]:
            raise InvalidIrqError(f"CPU {cpu}: vector {vector:#x} is not allocated")
        self._allocated[cpu].remove(vector)


@dataclass(frozen=True)
class IrqCfg:
    """Where an irq lands: CPU vector and APIC id (Linux ``struct irq_cfg``).

    ``cpu`` is the CPU index behind ``dest_apicid`` (Linux keeps it beside the
    cfg in ``apic_chip_data``).
    """

    vector: int
    dest_apicid: int
    cpu: int


def irqd_cfg(irq_data: IrqData) -> IrqCfg:
    """irqd_cfg - The ``IrqCfg`` of the vector level under ``irq_data``.

    Child domains (IR, HCALL) call this with their own level to learn the
    vector and destination to program.
    """
    for data in irq_data.levels():
        if isinstance(data.chip_data, IrqCfg):
            return data.chip_data
    raise InvalidIrqError(f"irq {irq_data.irq} has no vector level")


def irq_msi_compose_msg(cfg: IrqCfg, ext_dest_id: bool = False) -> MsiMsg:
    """__irq_msi_compose_msg - Compatibility-format MSI for ``cfg`` (digest §1).

    Physical destination mode, no redirection hint, fixed delivery, edge:
    ``address_lo = 0xFEE00000 | apicid[7:0] << 12 (| apicid[14:8] << 5 with
    ext_dest_id)``, ``address_hi = 0``, ``data = vector`` (Linux >= 5.11; older
    kernels also set bit 14, "level assert"). Raises ``IrqError`` for an APIC
    id the format cannot address (> 0xFF, or > 0x7FFF with ext_dest_id):
    such a CPU is only reachable through interrupt remapping.
    """
    limit = 0x7FFF if ext_dest_id else 0xFF
    if cfg.dest_apicid > limit:
        raise IrqError(f"APIC id {cfg.dest_apicid:#x} not addressable by a compatibility MSI "
                       f"(limit {limit:#x}); needs interrupt remapping")
    address_lo = X86_MSI_BASE_ADDRESS_LOW | (cfg.dest_apicid & 0xFF) << MSI_ADDR_DEST_ID_SHIFT
    if ext_dest_id:
        address_lo |= (cfg.dest_apicid >> 8) << MSI_ADDR_EXT_DEST_ID_SHIFT
    return MsiMsg(address_lo, X86_MSI_BASE_ADDRESS_HIGH, cfg.vector)


class ApicChip(IrqChip):
    """Linux ``lapic_controller`` ("APIC"), the chip of the vector level."""

    name = "APIC"

    def irq_ack(self, irq_data: IrqData) -> None:
        """apic_ack_edge: nothing to do in the model; the CPU shell EOIs its LocalApic."""

    def irq_compose_msi_msg(self, irq_data: IrqData) -> MsiMsg:
        domain = irq_data.domain
        assert isinstance(domain, VectorDomain)
        return irq_msi_compose_msg(irq_data.chip_data, domain.ext_dest_id)

    def irq_set_affinity(self, irq_data: IrqData, cpu: int) -> IrqSetMask:
        domain = irq_data.domain
        assert isinstance(domain, VectorDomain)
        domain.move_vector(irq_data, cpu)
        return IrqSetMask.OK


class VectorDomainOps(IrqDomainOps):
    """x86_vector_domain_ops: alloc assigns (cpu, vector), free releases it."""

    def alloc(self, domain: IrqDomain, virq: int, nr: int, arg: Any) -> None:
        assert isinstance(domain, VectorDomain)
        want_cpu = getattr(arg, "cpu", None)
        for i in range(nr):
            try:
                cpu, vector = domain.matrix.alloc(want_cpu)
            except IrqError:
                self.free(domain, virq, i)
                raise
            cfg = IrqCfg(vector, domain.cpu_to_apicid[cpu], cpu)
            # Linux: the vector level's hwirq is the virq itself.
            irq_domain_set_hwirq_and_chip(domain, virq + i, virq + i, domain.chip, cfg)
            domain.vector_irq[cpu][vector] = virq + i

    def free(self, domain: IrqDomain, virq: int, nr: int) -> None:
        assert isinstance(domain, VectorDomain)
        for irq in range(virq, virq + nr):
            data = irq_domain_get_irq_data(domain, irq)
            if data is None or not isinstance(data.chip_data, IrqCfg):
                continue
            cfg = data.chip_data
            domain.matrix.free(cfg.cpu, cfg.vector)
            domain.vector_irq[cfg.cpu].pop(cfg.vector, None)
            irq_domain_reset_irq_data(data)


class VectorDomain(IrqDomain):
    """The root domain ``x86_vector_domain`` ("VECTOR").

    ``VectorDomain(table, cpu_to_apicid, *, name="VECTOR", reserved=...,
    ext_dest_id=False)``: ``cpu_to_apicid[cpu]`` is that CPU's APIC id.
    ``ext_dest_id`` lets compose use MSI address bits 11:5 for APIC ids up to
    0x7FFF (a guest that saw KVM_FEATURE_MSI_EXT_DEST_ID). It is an MSI parent
    (PCI/MSI domains may sit directly on it when there is no IR).

    The per-CPU ``vector_irq`` table maps a vector back to its virq for the
    CPU shell; ``handle_vector`` is the interrupt entry (``common_interrupt``).
    """

    def __init__(self, table: IrqTable, cpu_to_apicid: Sequence[int], *, name: str = "VECTOR",
                 reserved: frozenset[int] | set[int] = DEFAULT_RESERVED_VECTORS,
                 ext_dest_id: bool = False) -> None:
        if not cpu_to_apicid:
            raise DomainCreationError(name, "cpu_to_apicid lists no CPU")
        if len(set(cpu_to_apicid)) != len(cpu_to_apicid):
            raise DomainCreationError(name, f"duplicate APIC ids in {list(cpu_to_apicid)}")
        self.cpu_to_apicid = list(cpu_to_apicid)
        self.matrix = VectorMatrix(len(self.cpu_to_apicid), reserved)
        self.ext_dest_id = ext_dest_id
        self.chip = ApicChip()
        self.vector_irq: list[dict[int, int]] = [{} for _ in self.cpu_to_apicid]
        self.spurious = 0
        super().__init__(name, VectorDomainOps(), table=table, flags=IrqDomainFlags.MSI_PARENT,
                         host_data=self.matrix)

    def move_vector(self, irq_data: IrqData, cpu: int) -> IrqCfg:
        """Re-target the vector level ``irq_data`` to ``cpu`` (apic_set_affinity).

        Allocates the new vector first (on ``NoSpaceError`` nothing changes),
        then frees the old one at once. Linux keeps the old vector until the
        first interrupt arrives on the new one (move cleanup); here an
        interrupt still in flight to the old vector is counted as spurious.
        """
        old: IrqCfg = irq_data.chip_data
        if cpu == old.cpu:
            return old
        cpu, vector = self.matrix.alloc(cpu)
        new = IrqCfg(vector, self.cpu_to_apicid[cpu], cpu)
        self.matrix.free(old.cpu, old.vector)
        del self.vector_irq[old.cpu][old.vector]
        self.vector_irq[cpu][vector] = irq_data.irq
        irq_data.chip_data = new
        return new

    def irq_for_vector(self, cpu: int, vector: int) -> int | None:
        """The virq bound to ``vector`` on ``cpu`` (Linux's per-CPU ``vector_irq[]``)."""
        return self.vector_irq[cpu].get(vector)

    def handle_vector(self, cpu: int, vector: int) -> bool:
        """common_interrupt - Run the irq bound to ``vector`` on ``cpu``.

        Returns what ``IrqTable.handle_irq`` returns; an unbound vector is
        counted in ``spurious`` ("No irq handler for vector") and returns False.
        """
        if not 0 <= cpu < len(self.vector_irq):
            raise InvalidIrqError(f"CPU {cpu} does not exist")
        irq = self.irq_for_vector(cpu, vector)
        if irq is None:
            self.spurious += 1
            return False
        return self.table.handle_irq(irq, cpu)

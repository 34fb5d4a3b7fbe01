"""The OS model: CPUs, memory, the irq hierarchy, the PCI core and drivers.

One ``Kernel`` runs in the host process (bare metal) and, in later steps, one
in every guest process.  It is I/O-free: everything that leaves the CPU goes
through the injected ``hw`` (config/MMIO accesses, IOMMU and IR programming on
bare metal), and everything that arrives (an interrupt, a DMA write into RAM)
is handed to it by the process shell.

Boot decides the irq-domain hierarchy from the CPUID probe, as the thread
argues it must: bare metal builds ``VECTOR -> INTEL-IR -> PCI-MSIX`` (or
``VECTOR -> PCI-MSIX`` without an IR unit).

Interrupt entry (``deliver``) is the hot path: the local APIC accepts the
vector, the CPU services everything pending in priority order, and each
vector runs its irq's handler.  Before the handler runs, the provenance the
device attached out of band is compared with the owner of the vector: a
mismatch is an isolation breach, counted and kept with its path.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from fabric.bdf import rid_str
from fabric.provenance import describe
from guest.apic import LocalApic
from guest.cpuid import CpuidInfo, probe
from guest.irq.domain import (DomainCreationError, IrqAllocInfo, IrqDomain, IrqTable,
                              irq_domain_alloc_irqs, irq_domain_free_irqs, irq_domain_remove)
from guest.irq.hcall import HcallDomain
from guest.irq.ims import ImsDomain
from guest.irq.ir import IrDomain
from guest.irq.vector import VectorDomain
from guest.pci.core import PciBus, PciDev
from guest.pci.msi import pci_alloc_irq_vectors_msix
from guest.pci import regs as R

#: Guest kernel variants: "modern" builds the HCALL domain when the hypervisor offers the
#: compose hypercall and refuses IMS in a VM without it; "legacy2020" is the behaviour the
#: thread criticises (IMS domains on the vector domain even in a VM).
KERNEL_VARIANTS = ("modern", "legacy2020")


class Hardware(Protocol):
    """What the kernel needs from the machine it runs on (see host/ for the bare-metal one)."""

    async def cfg_read(self, rid: int, reg: int) -> int | None: ...
    async def cfg_write(self, rid: int, reg: int, value: int, first_be: int = 0xF) -> None: ...
    def mmio_write(self, addr: int, data: bytes) -> None: ...
    def irte_write(self, index: int, raw: int) -> None: ...
    def irte_clear(self, index: int) -> None: ...
    async def bar_window(self, base: int, size: int, rid: int) -> None: ...
    async def dma_context(self, rid: int, mode: str) -> None: ...


@dataclass
class Breach:
    """An interrupt delivered to a vector whose owner did not emit it."""

    cpu: int
    vector: int
    irq: int | None
    owner: int | None
    origin: int | None
    handle: int = -1             # the IRTE the message named (-2: injected by the hypervisor, -3: posted)
    receiver: str = ""           # the handler that ran it (e.g. "vfio-ims:g2": injected into g2)

    def __str__(self) -> str:
        own = describe(self.owner) if self.owner is not None else "nobody"
        org = describe(self.origin) if self.origin is not None else "unknown"
        path = ""
        if self.handle >= 0:
            path = f"; its message named IRTE {self.handle}"
        elif self.handle == -2:
            path = "; injected by the hypervisor"
        elif self.handle == -3:
            path = "; posted by the IR unit"
        if self.receiver:
            path += f"; handled by {self.receiver}"
        return (f"CPU{self.cpu} vector 0x{self.vector:02x} (irq {self.irq}) belongs to {own} "
                f"but was raised by {org}{path}")


@dataclass
class Ram:
    """The OS's physical memory and a bump allocator for DMA buffers."""

    size: int
    base: int = 0
    data: bytearray = field(init=False)
    _next: int = 0x10_0000  # keep the first MiB for "firmware"

    def __post_init__(self) -> None:
        self.data = mmap.mmap(-1, self.size)   # zero-filled; a page costs memory once written

    def alloc(self, size: int, align: int = 4096) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self.size:
            raise MemoryError(f"out of RAM allocating {size} bytes ({self.size} total)")
        self._next = addr + size
        return self.base + addr

    def write(self, addr: int, data: bytes) -> bool:
        off = addr - self.base
        if off < 0 or off + len(data) > self.size:
            return False
        self.data[off:off + len(data)] = data
        return True

    def read(self, addr: int, size: int) -> bytes | None:
        off = addr - self.base
        if off < 0 or off + size > self.size:
            return None
        return bytes(self.data[off:off + size])


class Kernel:
    def __init__(self, name: str, apic_ids: list[int], ram_size: int, hw: Hardware,
                 cpuid: Callable[[int, int], tuple[int, int, int, int]], *, ir_entries: int | None = 65536,
                 variant: str = "modern", provenance: dict[int, int] | None = None):
        self.name = name
        self.hw = hw
        self.apic_ids = list(apic_ids)
        self.cpus = [LocalApic(a) for a in self.apic_ids]
        self._cpu_of_apic = {a: i for i, a in enumerate(self.apic_ids)}
        self.ram = Ram(ram_size)
        self.irq = IrqTable()
        self.vector = VectorDomain(self.irq, self.apic_ids)
        self._cpuid = cpuid
        self._ir_entries = ir_entries
        self.cpuid: CpuidInfo | None = None
        self.ir: IrDomain | None = None
        self.msi_parent: IrqDomain = self.vector
        self.ims_parent: IrqDomain | None = None
        self.ims_refusal = ""
        self.hcall: HcallDomain | None = None
        self.variant = variant
        #: out-of-band identity of each function for the isolation oracle (lab-only; an OS
        #: cannot know it): the RID as the OS sees it -> the emitter's physical identity
        self.provenance = dict(provenance or {})
        self.pci = PciBus(hw)
        self.drivers: list[Any] = []
        self.bound: dict[int, Any] = {}         # rid -> driver instance
        self.claimed: set[int] = set()          # functions vfio-pci holds for VMs (no host driver)
        self.probe_failures: dict[int, str] = {}  # rid -> why the driver could not bind
        self.removed: set[int] = set()            # functions surprise-removed (their device died)
        self.pasid_ir = False                   # the platform's IRTEs can check PASIDs
        self.pasid_interrupts = True            # the root complex accepts PASID-tagged interrupts
        self._next_pasid = 1
        self.irq_owner: dict[int, int] = {}     # virq -> RID that may raise it
        self.breaches: list[Breach] = []
        self.breach_irqs: dict[int, int] = {}   # virq -> interrupts that reached it from someone else
        self.breach_count = 0
        self.irqs_received = 0
        self.misdirected = 0                    # messages for an APIC ID no CPU has
        self.arrivals: dict[int, int] = {}      # virq -> messages that reached its vector
        self.posted_coalesced = 0               # posted messages merged into a PIR bit already set
        self.cur_origin: int | None = None
        self.cur_t_ns = 0
        self.log: list[str] = []

    # -- boot ----------------------------------------------------------------

    def boot(self) -> CpuidInfo:
        """Probe CPUID and build the interrupt hierarchy it calls for."""
        info = self.cpuid = probe(self._cpuid)
        self.log.append(f"cpuid: {info.describe()}")
        if not info.hypervisor:
            # Bare metal (or a guest that cannot tell): the vector domain, or IR, composes.
            if self._ir_entries:
                self.ir = IrDomain(self.vector, self.hw, entries=self._ir_entries)
                self.msi_parent = self.ir
                self.log.append(f"DMAR-IR: Enabled IRQ remapping in xapic mode ({self._ir_entries} entries)")
            self.ims_parent = self.msi_parent
        elif self.variant == "legacy2020":
            self.ims_parent = self.vector
            self.log.append("irq: legacy2020 kernel: IMS domains sit on the vector domain even in a VM")
        elif info.msi_compose:
            self.hcall = HcallDomain(self.vector, self.hw)
            self.ims_parent = self.hcall
            self.log.append("irq: hypervisor offers MSI compose: HCALL domain created")
        else:
            self.ims_refusal = ("running under a hypervisor that offers no MSI compose hypercall "
                                "(CPUID 0x40000001 lacks KVM_FEATURE_IRQLAB_MSI_COMPOSE): "
                                "the guest cannot compose a message the device may store")
            self.log.append("irq: no HCALL domain: IMS domain creation will fail")
        return info

    # -- PCI -----------------------------------------------------------------

    async def pci_init(self, buses: range, sriov: dict[int, int] | None = None,
                       slots: range = range(1)) -> list[PciDev]:
        """Scan, assign BARs, program windows/IOMMU context, enable SR-IOV, bind drivers."""
        sriov = sriov or {}
        devs = await self.pci.scan(buses, slots)
        for dev in devs:
            await self._setup_function(dev)
        for dev in devs:
            nvf = sriov.get(dev.rid >> 8, 0)
            if nvf and R.PCI_EXT_CAP_ID_SRIOV in dev.ext_caps:
                for vf in await self.pci.sriov_enable(dev, nvf):
                    for bar in vf.bars.values():
                        await self.hw.bar_window(bar.base, bar.size, vf.rid)
                    await self.hw.dma_context(vf.rid, "pt")
                    await self.bind_driver(vf)
        return list(self.pci.devices.values())

    async def _setup_function(self, dev: PciDev) -> None:
        for bar in await self.pci.assign_resources(dev):
            await self.hw.bar_window(bar.base, bar.size, dev.rid)
        await self.hw.dma_context(dev.rid, "pt")   # iommu=pt: host-owned devices DMA untranslated
        await self.bind_driver(dev)

    async def bind_driver(self, dev: PciDev) -> Any:
        if dev.rid in self.claimed:
            dev.driver = "vfio-pci"
            return None
        from guest.drivers.engine import DriverError
        for drv in self.drivers:
            if drv.match(dev):
                try:
                    inst = await drv.probe(self, dev)
                except DriverError as exc:
                    # Linux: "probe of 0000:00:03.0 failed with error -22"; the driver says why.
                    self.probe_failures[dev.rid] = str(exc)
                    self.log.append(f"{getattr(drv, 'name', 'driver')} {dev.name}: probe failed: {exc}")
                    return None
                self.bound[dev.rid] = inst
                dev.driver = inst
                return inst
        return None

    async def alloc_msix(self, dev: PciDev, nvec: int) -> list[int]:
        irqs = await pci_alloc_irq_vectors_msix(self.pci, dev, self.msi_parent, self.hw, nvec)
        owner = self.provenance.get(dev.rid, dev.rid)
        for irq in irqs:
            self.irq_owner[irq] = owner
        return irqs

    # -- IMS -----------------------------------------------------------------

    def create_ims_domain(self, dev: PciDev, hwsize: int, slot_addr: Callable[[int], int],
                          kind: str = "device", store=None, name: str | None = None) -> ImsDomain:
        """``pci_create_ims_domain`` (2022; ``pci_subdevice_msi_create_irq_domain`` in 2020): a
        per-device IMS domain, or DomainCreationError saying why not.

        ``store`` writes the slots (the MMIO path for ``device`` kind; a RAM writer for
        ``memory`` kind).  Whether the device *has* IMS is the caller's capability check
        (``PciBus.ims_supported``); this decides whether the platform can compose for it.
        """
        dev_name = name or dev.name
        full = f"IMS-{'MEM-' if kind == 'memory' else ''}{dev_name}"
        if self.ims_parent is None:
            raise DomainCreationError(full, self.ims_refusal or "no MSI parent domain supports IMS")
        if hwsize <= 0:
            raise DomainCreationError(full, "the device reports no IMS slots")
        return ImsDomain(self.ims_parent, dev_name, hwsize, slot_addr, store or self.hw, kind)

    def ram_store(self):
        """A store for memory-kind IMS: plain writes into this OS's RAM."""
        ram = self.ram

        class _RamStore:
            def mmio_write(self, addr: int, data: bytes) -> None:
                if not ram.write(addr, data):
                    raise MemoryError(f"IMS slot at 0x{addr:x} outside RAM")
        return _RamStore()

    pci_create_ims_domain = create_ims_domain

    async def alloc_ims(self, domain: ImsDomain, dev: PciDev, nr: int = 1, owner: int | None = None,
                        pasid: int | None = None) -> list[int]:
        """Allocate ``nr`` IMS irqs and run the domains' async prepare (compose hypercalls).

        ``owner``: the provenance identity allowed to raise them (default: the function's);
        ``pasid``: bind the IRTEs to this PASID too (bare metal, PASID-tagged interrupts).
        """
        extra = {"sid": dev.rid}
        if pasid is not None:
            extra["pasid"] = pasid
        virq = irq_domain_alloc_irqs(domain, nr, IrqAllocInfo(dev=dev, extra=extra))
        irqs = list(range(virq, virq + nr))
        try:
            await self._prepare(irqs)
        except BaseException:
            irq_domain_free_irqs(domain, virq, nr)
            raise
        if owner is None:
            owner = self.provenance.get(dev.rid, dev.rid)
        for irq in irqs:
            self.irq_owner[irq] = owner
        return irqs

    async def _prepare(self, irqs: list[int]) -> None:
        for irq in irqs:
            data = self.irq.irq_get_irq_data(irq)
            for level in data.levels():
                prepare = getattr(level.domain, "prepare", None)
                if prepare is not None:
                    await prepare(level)

    def surprise_removal(self, rids: list[int]) -> list[str]:
        """``pci_dev_set_disconnected`` + the driver's ``.remove``: the functions are gone.

        Every driver instance on them (a function, or ADIs of a PF) is told; it stops and
        reports the error instead of waiting for interrupts that cannot come.
        """
        names = []
        gone = set(rids)
        self.removed |= gone
        for inst in list(self.bound.values()):
            dev = getattr(inst, "dev", None)
            if dev is not None and dev.rid in gone and hasattr(inst, "remove"):
                inst.remove("surprise removal: the device is gone")
                names.append(inst.name)
        self.log.append(f"pci: surprise removal of {sorted(rid_str(r) for r in gone)}")
        return names

    def alloc_pasid(self) -> int:
        """``ioasid_alloc``: a fresh PASID (20 bits; 0 is reserved for requests without one)."""
        pasid = self._next_pasid
        if pasid > 0xF_FFFF:
            raise RuntimeError("PASID space exhausted")
        self._next_pasid += 1
        return pasid

    def remove_domain(self, domain: IrqDomain) -> None:
        irq_domain_remove(domain)

    # -- interrupt entry (hot path) ----------------------------------------

    def deliver(self, apic_id: int, vector: int, origin: int | None = None, t_ns: int = 0,
                handle: int = -1) -> None:
        """An interrupt message reached local APIC ``apic_id``: accept it and run what is pending."""
        cpu = self._cpu_of_apic.get(apic_id)
        if cpu is None:
            self.misdirected += 1
            return
        apic = self.cpus[cpu]
        self.irqs_received += 1
        vector_irq = self.vector.vector_irq[cpu]
        irq = vector_irq.get(vector)
        if irq is not None:
            arrivals = self.arrivals
            arrivals[irq] = arrivals.get(irq, 0) + 1
            owner = self.irq_owner.get(irq)
        else:
            owner = None
        if origin is not None and owner != origin:
            self._breach(cpu, vector, irq, owner, origin, handle)
        if not apic.accept(vector):
            return   # illegal vector, or merged with the same vector already pending (edge)
        while True:
            v = apic.ack()
            if v is None:
                break
            self.cur_origin, self.cur_t_ns = (origin, t_ns) if v == vector else (None, 0)
            pending_irq = vector_irq.get(v)
            if pending_irq is None:
                self.vector.spurious += 1
            else:
                self.irq.handle_irq(pending_irq, cpu)
            apic.eoi()

    def coalesced_posted(self, apic_id: int, vector: int, n: int) -> None:
        """``n`` posted messages for ``vector`` merged into a PIR bit that was already set (the
        vCPU was descheduled, or the bit not yet synced): the CPU takes the vector once, so
        they reach its irq without a handler run of their own.  Counted as arrivals (they
        did arrive; the handler that runs consumes their work), before the one delivery, so
        a workload waiting for every arrival sees them when that handler runs."""
        cpu = self._cpu_of_apic.get(apic_id)
        if cpu is None or n <= 0:
            return
        self.posted_coalesced += n
        irq = self.vector.vector_irq[cpu].get(vector)
        if irq is not None:
            self.arrivals[irq] = self.arrivals.get(irq, 0) + n

    def irq_forwards(self, apic_id: int, vector: int) -> bool:
        """For traces: does this vector's handler pass the interrupt on (the host injecting it
        into a guest)?  Then the interrupt's flow continues beyond this CPU."""
        cpu = self._cpu_of_apic.get(apic_id)
        irq = self.vector.vector_irq[cpu].get(vector) if cpu is not None else None
        desc = self.irq.irq_to_desc(irq) if irq is not None else None
        return bool(desc and any(a.name.startswith(("vfio", "vdcm")) for a in desc.actions))

    def _breach(self, cpu: int, vector: int, irq: int | None, owner: int | None, origin: int,
                handle: int = -1) -> None:
        self.breach_count += 1
        if irq is not None:
            self.breach_irqs[irq] = self.breach_irqs.get(irq, 0) + 1
        if len(self.breaches) < 100:
            desc = self.irq.irq_to_desc(irq) if irq is not None else None
            receiver = ", ".join(a.name for a in desc.actions) if desc is not None else ""
            self.breaches.append(Breach(cpu, vector, irq, owner, origin, handle, receiver))

    # -- views ---------------------------------------------------------------

    def proc_interrupts(self) -> str:
        return self.irq.proc_interrupts(len(self.cpus))

    def domain_hierarchy(self) -> str:
        return self.irq.domain_hierarchy()

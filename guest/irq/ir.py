"""The interrupt-remapping domain (Linux ``drivers/iommu/intel/irq_remapping.c``).

``IR-<n>`` sits between the vector domain and the per-device MSI domains::

    VECTOR  ->  INTEL-IR-0  ->  IR-PCI-MSIX-0000:01:00.0

alloc takes IRTE indices (Linux ``alloc_irte``: a block of 2^order consecutive
entries), activate writes the IRTE (``intel_irq_remapping_activate`` ->
``modify_irte``), deactivate clears it, and the chip composes the remappable
message that the device will store (``fill_msi_msg``: format = 1, SHV = 1,
handle = IRTE index, sub-handle 0).  Affinity changes rewrite the IRTE, not the
device's entry (``intel_ir_set_affinity`` returns ``IRQ_SET_MASK_OK_DONE``).

The IRT itself lives in the IOMMU (the fabric); the domain reaches it through
the injected ``IrHardware``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fabric.ir import Irte, compose_remappable
from guest.irq.domain import (DomainBusToken, IrqChip, IrqData, IrqDomain, IrqDomainFlags,
                              IrqDomainOps, IrqSetMask, MsiMsg, NoSpaceError,
                              irq_chip_set_affinity_parent, irq_domain_alloc_irqs_parent,
                              irq_domain_free_irqs_parent, irq_domain_get_irq_data,
                              irq_domain_reset_irq_data, irq_domain_set_hwirq_and_chip)
from guest.irq.vector import irqd_cfg


class IrHardware(Protocol):
    def irte_write(self, index: int, raw: int, pasid: int | None = None) -> None:
        """Program IRTE ``index`` with a 128-bit value (ordered before later MMIO writes);
        ``pasid``: also accept only requests tagged with it (platform ``pasid_ir``)."""

    def irte_clear(self, index: int) -> None:
        """Clear IRTE ``index`` (present bit 0)."""


@dataclass
class IrteRef:
    """Linux ``struct irq_2_iommu``: which IRTE an irq uses."""

    index: int
    sid: int
    msg: MsiMsg
    irte: Irte | None = None
    pasid: int | None = None
    posted: tuple[int, int] | None = None    # (descriptor address, guest vector) when posted


class IrteAllocator:
    """First-fit bitmap of IRTE indices, blocks aligned to their size (``bitmap_find_free_region``)."""

    def __init__(self, entries: int):
        self.entries = entries
        self._used = bytearray(entries)
        self.in_use = 0

    def alloc(self, count: int) -> int:
        order = max(count - 1, 0).bit_length()
        block = 1 << order
        used = self._used
        for base in range(0, self.entries - block + 1, block):
            if not any(used[base:base + block]):
                used[base:base + block] = b"\x01" * block
                self.in_use += block
                return base
        raise NoSpaceError(f"no {block} free consecutive IRTEs ({self.in_use}/{self.entries} in use)")

    def free(self, base: int, count: int) -> None:
        block = 1 << max(count - 1, 0).bit_length()
        for i in range(base, base + block):
            if self._used[i]:
                self._used[i] = 0
                self.in_use -= 1


class IntelIrChip(IrqChip):
    """``intel_ir_chip`` ("INTEL-IR")."""

    name = "INTEL-IR"

    def irq_compose_msi_msg(self, irq_data: IrqData) -> MsiMsg:
        return irq_data.chip_data.msg

    def irq_set_affinity(self, irq_data: IrqData, cpu: int) -> IrqSetMask:
        irq_chip_set_affinity_parent(irq_data, cpu)
        domain: IrDomain = irq_data.domain
        domain.write_irte(irq_data)
        return IrqSetMask.OK_DONE

    def irq_ack(self, irq_data: IrqData) -> None:
        """apic_ack_irq: the CPU shell EOIs the local APIC."""

    def irq_set_vcpu_affinity(self, irq_data: IrqData, vcpu_info) -> None:
        """``intel_ir_set_vcpu_affinity``: switch the IRTE to posted format (``vcpu_info`` =
        ``{"pda": descriptor address, "vector": guest vector}``) or back to remapped (None).
        The device's message (the handle) does not change either way."""
        domain: IrDomain = irq_data.domain
        ref: IrteRef = irq_data.chip_data
        if vcpu_info is None:
            ref.posted = None
            domain.write_irte(irq_data)
            return
        ref.posted = (int(vcpu_info["pda"]), int(vcpu_info["vector"]))
        domain.write_irte(irq_data)


class IrDomainOps(IrqDomainOps):
    def alloc(self, domain: IrqDomain, virq: int, nr: int, arg: Any) -> None:
        assert isinstance(domain, IrDomain)
        extra = getattr(arg, "extra", None) or {}
        sid = extra.get("sid")
        pasid = extra.get("pasid")
        if sid is None:
            dev = getattr(arg, "dev", None)
            sid = getattr(dev, "rid", None)
        if sid is None:
            raise NoSpaceError("IR alloc needs the requester ID (arg.extra['sid'] or arg.dev.rid)")
        irq_domain_alloc_irqs_parent(domain, virq, nr, arg)
        try:
            base = domain.allocator.alloc(nr)
        except NoSpaceError:
            irq_domain_free_irqs_parent(domain, virq, nr)
            raise
        for i in range(nr):
            index = base + i
            lo, hi, data = compose_remappable(index, 0, shv=True)
            ref = IrteRef(index, sid, MsiMsg(lo, hi, data), pasid=pasid)
            irq_domain_set_hwirq_and_chip(domain, virq + i, index, domain.chip, ref)

    def free(self, domain: IrqDomain, virq: int, nr: int) -> None:
        assert isinstance(domain, IrDomain)
        first = irq_domain_get_irq_data(domain, virq)
        if first is not None and isinstance(first.chip_data, IrteRef):
            domain.allocator.free(first.chip_data.index, nr)
        for irq in range(virq, virq + nr):
            data = irq_domain_get_irq_data(domain, irq)
            if data is not None:
                irq_domain_reset_irq_data(data)
        irq_domain_free_irqs_parent(domain, virq, nr)

    def activate(self, domain: IrqDomain, irq_data: IrqData) -> None:
        domain.write_irte(irq_data)

    def deactivate(self, domain: IrqDomain, irq_data: IrqData) -> None:
        ref: IrteRef = irq_data.chip_data
        domain.hw.irte_clear(ref.index)
        ref.irte = None


class IrDomain(IrqDomain):
    """``INTEL-IR-<seq>``: one per remapping unit."""

    def __init__(self, parent: IrqDomain, hw: IrHardware, entries: int = 65536, seq: int = 0,
                 sid_check: bool = True):
        self.hw = hw
        self.allocator = IrteAllocator(entries)
        self.chip = IntelIrChip()
        self.sid_check = sid_check
        super().__init__(f"INTEL-IR-{seq}", IrDomainOps(), parent=parent, size=entries,
                         bus_token=DomainBusToken.DMAR,
                         flags=IrqDomainFlags.MSI_PARENT | IrqDomainFlags.ISOLATED_MSI)

    #: prefix the per-device MSI domains put in front of their chip names
    msi_prefix = "IR-"

    def write_irte(self, irq_data: IrqData) -> None:
        """``modify_irte``: program the entry from the vector level's (vector, APIC id)."""
        ref: IrteRef = irq_data.chip_data
        if ref.posted is not None:
            pda, vector = ref.posted
            irte = Irte.posted(vector, pda, ref.sid, svt=1 if self.sid_check else 0)
        else:
            cfg = irqd_cfg(irq_data)
            # Linux set_msi_sid: SVT=1 (verify SID), SQ=0 (all 16 bits), SID = the requester.
            irte = Irte.remapped(cfg.vector, cfg.dest_apicid, ref.sid, svt=1 if self.sid_check else 0)
        ref.irte = irte
        if ref.pasid is None:
            self.hw.irte_write(ref.index, irte.pack())
        else:
            self.hw.irte_write(ref.index, irte.pack(), pasid=ref.pasid)

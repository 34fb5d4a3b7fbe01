"""The HCALL domain: a guest's interrupt messages composed by the hypervisor.

The thread's diagram (Gleixner, 2020-11-08)::

    [CPU] -- [VI | RT] -- [Bridge] -- Bus -- [Device]
     Alloc    "Compose"               Store    Use
    Vectordomain  HCALLdomain       Busdomain
         |             ^
         v             |
        Hypervisor: Alloc + Compose

A guest cannot compose a message the device may send: only the hypervisor knows
the host vector, the IRTE and the source-id the IR unit will check.  So the
HCALL domain sits between the guest's vector domain and a bus domain (IMS): the
vector domain picks the guest vector and vCPU, and the HCALL domain asks the
hypervisor (``HC_MSI_COMPOSE``) for the pair to store.  The bus domain stores
whatever comes back — a real remappable message (case 2/3) or an ABI "fake"
pair the hypervisor's emulation understands (case 4).

Hypercalls are VM exits, i.e. round trips: the domain composes in an async
``prepare`` step that the kernel awaits after allocation and before activation
(Linux does the same work in sleepable context: ``msi_prepare`` and the
``irq_bus_lock``/``irq_bus_sync_unlock`` bracket).  ``irq_compose_msi_msg`` then
returns the prepared message.  Freeing sends ``HC_MSI_FREE`` without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fabric import hypercall as hc
from guest.irq.domain import (DomainBusToken, InvalidIrqError, IrqChip, IrqData, IrqDomain,
                              IrqDomainFlags, IrqDomainOps, MsiMsg, NotSupportedError,
                              irq_domain_alloc_irqs_parent, irq_domain_free_irqs_parent,
                              irq_domain_get_irq_data, irq_domain_reset_irq_data,
                              irq_domain_set_hwirq_and_chip)
from guest.irq.vector import irqd_cfg


class Hypervisor(Protocol):
    async def hypercall(self, nr: int, *args: int) -> list[int]:
        """Issue a hypercall; returns its values or raises ``hc.HypercallError``."""

    def hypercall_nowait(self, nr: int, *args: int) -> None: ...


@dataclass
class HcallData:
    dev_rid: int          # the function as the guest sees it
    cookie: int           # the bus-level index (IMS slot)
    msg: MsiMsg | None = None
    handle: int | None = None


class HcallChip(IrqChip):
    name = "HCALL"

    def irq_compose_msi_msg(self, irq_data: IrqData) -> MsiMsg:
        d: HcallData = irq_data.chip_data
        if d.msg is None:
            raise InvalidIrqError(f"irq {irq_data.irq}: HCALL message not composed (prepare not run)")
        return d.msg

    def irq_set_affinity(self, irq_data: IrqData, cpu: int):
        raise NotSupportedError("moving an HCALL-composed interrupt needs a new compose hypercall")


class HcallDomainOps(IrqDomainOps):
    def alloc(self, domain: IrqDomain, virq: int, nr: int, arg: Any) -> None:
        dev = getattr(arg, "dev", None)
        first = getattr(arg, "hwirq", None) or 0
        extra = getattr(arg, "extra", None) or {}
        # cookie: the slot index, bit 16 set for a memory-kind store (docs/hypercalls.md)
        kind = hc.COOKIE_MEMORY if extra.get("ims_kind") == "memory" else 0
        irq_domain_alloc_irqs_parent(domain, virq, nr, arg)
        for i in range(nr):
            irq_domain_set_hwirq_and_chip(domain, virq + i, virq + i, domain.chip,
                                          HcallData(getattr(dev, "rid", 0), (first + i) | kind))

    def free(self, domain: IrqDomain, virq: int, nr: int) -> None:
        d: HcallDomain = domain
        for irq in range(virq, virq + nr):
            data = irq_domain_get_irq_data(domain, irq)
            if data is None:
                continue
            hd: HcallData = data.chip_data
            if hd is not None and hd.handle is not None:
                d.hv.hypercall_nowait(hc.HC_MSI_FREE, hd.dev_rid, hd.handle)
            irq_domain_reset_irq_data(data)
        irq_domain_free_irqs_parent(domain, virq, nr)


class HcallDomain(IrqDomain):
    """``HCALL``: composes through the hypervisor (irqlab; Linux has no such domain yet)."""

    msi_prefix = "HCALL-"

    def __init__(self, parent: IrqDomain, hv: Hypervisor):
        self.hv = hv
        self.chip = HcallChip()
        self.composed = 0
        super().__init__("HCALL", HcallDomainOps(), parent=parent, bus_token=DomainBusToken.HCALL,
                         flags=IrqDomainFlags.MSI_PARENT)

    async def prepare(self, irq_data: IrqData) -> None:
        """Compose the message of one allocated irq by hypercall (raises HypercallError)."""
        d: HcallData = irq_data.chip_data
        cfg = irqd_cfg(irq_data)
        lo, hi, data, handle = (await self.hv.hypercall(hc.HC_MSI_COMPOSE, d.dev_rid, cfg.vector,
                                                        cfg.dest_apicid, d.cookie))[:4]
        d.msg = MsiMsg(lo, hi, data)
        d.handle = handle
        self.composed += 1

"""IMS: a per-device bus domain storing messages in device-specific slots.

Linux: ``pci_create_ims_domain(pdev, template, hwsize, data)`` (2022) and its 2020
ancestor ``pci_subdevice_msi_create_irq_domain``.  The bus domain *stores*; it
never composes.  Whether a message it stores will ever arrive depends on who
composed it, which is why creation is refused where no parent can compose a
message the platform will accept (``ImsPolicy`` in ``guest.kernel``).

The store here is the IDXD-like ``device`` kind: 16-byte slots in a BAR page
(+0 addr lo, +4 addr hi, +8 data, +0xC ctrl with bit 0 = mask), written with
posted MMIO stores.  Like the IDXD PoC, mask/unmask write ctrl, and the
message write leaves the slot masked until unmask.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from guest.irq.domain import (DomainBusToken, IrqAllocInfo, IrqChip, IrqData, IrqDomain,
                              IrqDomainFlags, IrqDomainOps, IrqError, MsiMsg, NoSpaceError,
                              NotSupportedError, irq_chip_compose_msi_msg,
                              irq_domain_alloc_irqs_parent,
                              irq_domain_free_irqs_parent, irq_domain_get_irq_data,
                              irq_domain_reset_irq_data, irq_domain_set_hwirq_and_chip)

IMS_SLOT_SIZE = 16
IMS_CTRL = 0xC
IMS_CTRL_VECTOR_MASKBIT = 1 << 0
IMS_CTRL_PASID_ENABLE = 1 << 3
IMS_CTRL_PASID_SHIFT = 12

_MSG = struct.Struct("<III")
_U32 = struct.Struct("<I")


class MmioOps(Protocol):
    def mmio_write(self, addr: int, data: bytes) -> None: ...


@dataclass
class ImsSlot:
    index: int
    addr: int
    msg: MsiMsg | None = None
    masked: bool = True
    ctrl: int = IMS_CTRL_VECTOR_MASKBIT   # the cookie: PASID bits, mask bit


class ImsChip(IrqChip):
    def __init__(self, name: str, mmio: MmioOps):
        super().__init__(name)
        self.mmio = mmio

    def irq_write_msi_msg(self, irq_data: IrqData, msg: MsiMsg) -> None:
        slot: ImsSlot = irq_data.chip_data
        slot.msg = msg
        self.mmio.mmio_write(slot.addr, _MSG.pack(msg.address_lo, msg.address_hi, msg.data))

    def irq_mask(self, irq_data: IrqData) -> None:
        slot: ImsSlot = irq_data.chip_data
        slot.masked = True
        slot.ctrl |= IMS_CTRL_VECTOR_MASKBIT
        self.mmio.mmio_write(slot.addr + IMS_CTRL, _U32.pack(slot.ctrl))

    def irq_unmask(self, irq_data: IrqData) -> None:
        slot: ImsSlot = irq_data.chip_data
        slot.masked = False
        slot.ctrl &= ~IMS_CTRL_VECTOR_MASKBIT
        self.mmio.mmio_write(slot.addr + IMS_CTRL, _U32.pack(slot.ctrl))
    # No irq_set_affinity: pci_create_ims_domain forbids it; the parent handles affinity.


def _with_hwirq(arg: Any, first: int, kind: str = "device") -> Any:
    """``arg`` for the parent, carrying the first slot as ``hwirq`` and the store's kind."""
    if arg is None:
        return IrqAllocInfo(hwirq=first, extra={"ims_kind": kind})
    if isinstance(arg, IrqAllocInfo):
        return dataclasses.replace(arg, hwirq=first, extra={**arg.extra, "ims_kind": kind})
    return arg


class ImsDomainOps(IrqDomainOps):
    def alloc(self, domain: IrqDomain, virq: int, nr: int, arg: Any) -> None:
        d: ImsDomain = domain
        first = getattr(arg, "hwirq", None)
        if first is None:
            first = d.find_free(nr)
        if first + nr > d.hwsize:
            raise NoSpaceError(f"{d.name}: IMS slots {first}..{first + nr - 1} beyond {d.hwsize}")
        # The parent sees the slot chosen here (Linux msi_set_desc sets arg->hwirq): the HCALL
        # domain names it in its compose hypercall.
        irq_domain_alloc_irqs_parent(domain, virq, nr, _with_hwirq(arg, first, d.kind))
        added: list[int] = []
        try:
            for i in range(nr):
                idx = first + i
                irq_domain_set_hwirq_and_chip(domain, virq + i, idx, d.chip, ImsSlot(idx, d.slot_addr(idx)))
                d.used.add(idx)
                added.append(idx)
        except IrqError:
            d.used.difference_update(added)         # Rule 1: undo, including the parent's alloc
            irq_domain_free_irqs_parent(domain, virq, nr)
            raise

    def free(self, domain: IrqDomain, virq: int, nr: int) -> None:
        d: ImsDomain = domain
        for irq in range(virq, virq + nr):
            data = irq_domain_get_irq_data(domain, irq)
            if data is not None:
                d.used.discard(data.hwirq)
                irq_domain_reset_irq_data(data)
        irq_domain_free_irqs_parent(domain, virq, nr)

    def activate(self, domain: IrqDomain, irq_data: IrqData) -> None:
        irq_data.chip.irq_write_msi_msg(irq_data, irq_chip_compose_msi_msg(irq_data))

    def deactivate(self, domain: IrqDomain, irq_data: IrqData) -> None:
        irq_data.chip.irq_mask(irq_data)


class ImsDomain(IrqDomain):
    """``<prefix>IMS-<dev>``: a device's IMS slots (``DOMAIN_BUS_PCI_DEVICE_IMS``).

    ``kind`` is the store: ``"device"`` (slots in a BAR page, written with MMIO stores)
    or ``"memory"`` (slots in a queue context in this OS's RAM, written with plain
    stores — ``mmio`` is then a RAM writer; the device fetches them by DMA).  Memory
    domains are named ``<prefix>IMS-MEM-<dev>``.
    """

    def __init__(self, parent: IrqDomain, dev_name: str, hwsize: int, slot_addr: Callable[[int], int],
                 mmio: MmioOps, kind: str = "device"):
        if kind not in ("device", "memory"):
            raise ValueError(f"IMS kind {kind!r}")
        prefix = getattr(parent, "msi_prefix", "")
        name = f"{prefix}IMS-{'MEM-' if kind == 'memory' else ''}{dev_name}"
        self.kind = kind
        self.hwsize = hwsize
        self.slot_addr = slot_addr
        self.used: set[int] = set()
        self.chip = ImsChip(name, mmio)
        super().__init__(name, ImsDomainOps(), parent=parent, size=hwsize,
                         bus_token=DomainBusToken.PCI_DEVICE_IMS, flags=IrqDomainFlags.MSI_DEVICE)

    def find_free(self, nr: int) -> int:
        for base in range(self.hwsize - nr + 1):
            if all(base + i not in self.used for i in range(nr)):
                return base
        raise NoSpaceError(f"{self.name}: no {nr} free IMS slots of {self.hwsize}")

"""PCI MSI-X: the per-device bus domain and ``pci_alloc_irq_vectors``.

Linux: ``drivers/pci/msi/msi.c`` (``msix_capability_init``), ``irqdomain.c``
(``pci_msi_domain_write_msg``, chip templates "PCI-MSIX").  The device domain's
chip is named ``<parent prefix>PCI-MSIX-<dev>`` — ``IR-PCI-MSIX-0000:01:00.0`` on
top of interrupt remapping, ``PCI-MSIX-0000:01:00.0`` directly on the vector
domain.  It *stores* the message its parents *compose*: a posted MWr of
address lo/hi and data into the table entry, then vector control for mask and
unmask.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

from guest.irq.domain import (DomainBusToken, IrqAllocInfo, IrqChip, IrqData, IrqDomain,
                              IrqDomainFlags, IrqDomainOps, IrqSetMask, MsiMsg, NoSpaceError,
                              irq_chip_compose_msi_msg, irq_chip_set_affinity_parent, irq_domain_alloc_irqs,
                              irq_domain_alloc_irqs_parent, irq_domain_free_irqs,
                              irq_domain_free_irqs_parent, irq_domain_get_irq_data,
                              irq_domain_remove, irq_domain_reset_irq_data,
                              irq_domain_set_hwirq_and_chip)
from guest.pci import regs as R
from guest.pci.core import PciBus, PciDev, PciError


class MmioOps(Protocol):
    def mmio_write(self, addr: int, data: bytes) -> None:
        """A posted CPU store to device memory."""


_ENTRY_MSG = struct.Struct("<III")
_MASKED = (1).to_bytes(4, "little")
_UNMASKED = (0).to_bytes(4, "little")


@dataclass
class MsixEntry:
    """Linux ``struct msi_desc`` for one MSI-X entry."""

    dev: PciDev
    index: int
    addr: int           # CPU address of the table entry
    msg: MsiMsg | None = None
    masked: bool = True


class PciMsixChip(IrqChip):
    def __init__(self, name: str, mmio: MmioOps):
        super().__init__(name)
        self.mmio = mmio

    def irq_write_msi_msg(self, irq_data: IrqData, msg: MsiMsg) -> None:
        """``pci_msi_domain_write_msg``: store address and data in the table entry."""
        entry: MsixEntry = irq_data.chip_data
        entry.msg = msg
        self.mmio.mmio_write(entry.addr, _ENTRY_MSG.pack(msg.address_lo, msg.address_hi, msg.data))

    def irq_set_affinity(self, irq_data: IrqData, cpu: int) -> IrqSetMask:
        """``msi_domain_set_affinity``: move the parent; re-store the message unless it says done."""
        ret = irq_chip_set_affinity_parent(irq_data, cpu)
        if ret is not IrqSetMask.OK_DONE:
            self.irq_write_msi_msg(irq_data, irq_chip_compose_msi_msg(irq_data))
        return ret

    def irq_mask(self, irq_data: IrqData) -> None:
        entry: MsixEntry = irq_data.chip_data
        entry.masked = True
        self.mmio.mmio_write(entry.addr + R.PCI_MSIX_ENTRY_VECTOR_CTRL, _MASKED)

    def irq_unmask(self, irq_data: IrqData) -> None:
        entry: MsixEntry = irq_data.chip_data
        entry.masked = False
        self.mmio.mmio_write(entry.addr + R.PCI_MSIX_ENTRY_VECTOR_CTRL, _UNMASKED)


class PciMsixDomainOps(IrqDomainOps):
    def alloc(self, domain: IrqDomain, virq: int, nr: int, arg: Any) -> None:
        d: PciMsixDomain = domain
        first = getattr(arg, "hwirq", None) or 0
        if first + nr > d.table_size:
            raise NoSpaceError(f"{d.dev}: MSI-X entries {first}..{first + nr - 1} beyond table size {d.table_size}")
        irq_domain_alloc_irqs_parent(domain, virq, nr, arg)
        for i in range(nr):
            index = first + i
            entry = MsixEntry(d.dev, index, d.table_addr + index * R.PCI_MSIX_ENTRY_SIZE)
            irq_domain_set_hwirq_and_chip(domain, virq + i, index, d.chip, entry)

    def free(self, domain: IrqDomain, virq: int, nr: int) -> None:
        for irq in range(virq, virq + nr):
            data = irq_domain_get_irq_data(domain, irq)
            if data is not None:
                irq_domain_reset_irq_data(data)
        irq_domain_free_irqs_parent(domain, virq, nr)

    def activate(self, domain: IrqDomain, irq_data: IrqData) -> None:
        """``msi_domain_activate``: compose through the parents, then store."""
        msg = irq_chip_compose_msi_msg(irq_data)
        irq_data.chip.irq_write_msi_msg(irq_data, msg)

    def deactivate(self, domain: IrqDomain, irq_data: IrqData) -> None:
        irq_data.chip.irq_mask(irq_data)


class PciMsixDomain(IrqDomain):
    def __init__(self, parent: IrqDomain, dev: PciDev, mmio: MmioOps, table_addr: int, table_size: int):
        prefix = getattr(parent, "msi_prefix", "")
        name = f"{prefix}PCI-MSIX-{dev.name}"
        self.dev = dev
        self.table_addr = table_addr
        self.table_size = table_size
        self.chip = PciMsixChip(name, mmio)
        super().__init__(name, PciMsixDomainOps(), parent=parent, size=table_size,
                         bus_token=DomainBusToken.PCI_DEVICE_MSIX, flags=IrqDomainFlags.MSI_DEVICE)


async def pci_alloc_irq_vectors_msix(bus: PciBus, dev: PciDev, parent: IrqDomain, mmio: MmioOps,
                                     nvec: int) -> list[int]:
    """``pci_alloc_irq_vectors(dev, nvec, nvec, PCI_IRQ_MSIX)``: returns the virqs.

    Enables MSI-X with the function masked, allocates ``nvec`` irqs in a new
    per-device domain under ``parent`` (entries stay masked until
    ``request_irq`` activates and unmasks them), then clears the function mask.
    """
    pos = dev.caps.get(R.PCI_CAP_ID_MSIX)
    if pos is None:
        raise PciError(f"{dev}: no MSI-X capability")
    ctrl = await bus.read16(dev.rid, pos + R.PCI_MSIX_FLAGS)
    table_size = (ctrl & R.PCI_MSIX_FLAGS_QSIZE) + 1
    if not 0 < nvec <= table_size:
        raise PciError(f"{dev}: {nvec} vectors requested, MSI-X table has {table_size}")
    table = await bus.read32(dev.rid, pos + R.PCI_MSIX_TABLE)
    bir, offset = table & R.PCI_MSIX_TABLE_BIR, table & R.PCI_MSIX_TABLE_OFFSET
    bar = dev.bars.get(bir)
    if bar is None or not bar.base:
        raise PciError(f"{dev}: MSI-X table in BAR{bir}, which is not assigned")
    await bus.write16(dev.rid, pos + R.PCI_MSIX_FLAGS,
                      ctrl | R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL)
    domain = PciMsixDomain(parent, dev, mmio, bar.base + offset, table_size)
    try:
        virq = irq_domain_alloc_irqs(domain, nvec, IrqAllocInfo(dev=dev, hwirq=0, extra={"sid": dev.rid}))
    except Exception:
        irq_domain_remove(domain)
        await bus.write16(dev.rid, pos + R.PCI_MSIX_FLAGS, ctrl & ~R.PCI_MSIX_FLAGS_ENABLE)
        raise
    await bus.write16(dev.rid, pos + R.PCI_MSIX_FLAGS,
                      (ctrl | R.PCI_MSIX_FLAGS_ENABLE) & ~R.PCI_MSIX_FLAGS_MASKALL)
    dev.irq_domain = domain
    dev.msix_enabled = True
    dev.msi_irqs = list(range(virq, virq + nvec))
    return dev.msi_irqs


async def pci_free_irq_vectors(bus: PciBus, dev: PciDev) -> None:
    if not dev.msi_irqs:
        return
    domain = dev.irq_domain
    irq_domain_free_irqs(domain, dev.msi_irqs[0], len(dev.msi_irqs))
    irq_domain_remove(domain)
    pos = dev.caps[R.PCI_CAP_ID_MSIX]
    ctrl = await bus.read16(dev.rid, pos + R.PCI_MSIX_FLAGS)
    await bus.write16(dev.rid, pos + R.PCI_MSIX_FLAGS, ctrl & ~R.PCI_MSIX_FLAGS_ENABLE)
    dev.msi_irqs = []
    dev.msix_enabled = False
    dev.irq_domain = None

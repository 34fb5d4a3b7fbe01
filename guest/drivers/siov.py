"""Driver for the irqlab Scalable-IOV engine PF (1b36:11a2) and its ADIs (bare metal).

Like IDXD's PF driver, it owns the device: it enables PASID, hands out ADIs —
each with a PASID of its own — and either drives an ADI itself (case 1: the host's
own work queues, interrupts through IMS in the device or in host memory) or
keeps it for the VMM, which gives it to a guest (cases 3 and 4).

The driver's own copy of the management registers (BAR0, PF only)::

    0x100  ADI_CAP    RO  bits 15:0 number of ADIs; bit 31: interrupt messages carry the ADI's PASID
    0x200 + 8*i       ADI_CTRL   bit0 Enable, bit1 PASID Enable, bit2 memory-IMS enable,
                                 bit31 (write 1) ADI reset
    0x204 + 8*i       ADI_PASID  bits 19:0

ADI ``i``'s portal is BAR2 + i * 0x2000: page 0 the work-engine registers (the
same layout as a function's, see ``guest.drivers.engine``), page 1 its device-kind
IMS slots.
"""

from __future__ import annotations

import struct

from fabric.provenance import adi_origin
from guest.drivers.engine import EngineInstance, PCI_VENDOR_ID_REDHAT_QUMRANET
from guest.pci.core import PciDev

SIOV_PF_ID = 0x11A2
ADI_CAP = 0x100
ADI_CAP_COUNT = 0xFFFF
ADI_CAP_PASID_INTERRUPTS = 1 << 31
ADI_TABLE = 0x200
ADI_CTRL_ENABLE = 1 << 0
ADI_CTRL_PASID_ENABLE = 1 << 1
ADI_CTRL_MEM_IMS_ENABLE = 1 << 2
ADI_CTRL_RESET = 1 << 31
ADI_PORTAL_STRIDE = 0x2000

_U32 = struct.Struct("<I")


class SiovPf:
    """One bound SIOV PF: its ADIs, which are the host's and which the VMM holds."""

    def __init__(self, kernel, dev: PciDev, adis: int, pasid_interrupts: bool):
        self.kernel = kernel
        self.dev = dev
        self.bar0 = dev.bars[0].base
        self.bar2 = dev.bars[2].base
        self.count = adis
        self.pasid_interrupts = pasid_interrupts
        self.pasids: dict[int, int] = {}          # ADI -> PASID
        self.mem_ims: dict[int, bool] = {}        # ADI -> memory IMS allowed
        self.owner: dict[int, str] = {}           # ADI -> "host" or a VM name
        self.engines: dict[int, EngineInstance] = {}

    def portal(self, adi: int) -> int:
        return self.bar2 + adi * ADI_PORTAL_STRIDE

    def enable_adi(self, adi: int, pasid: int, mem_ims: bool = False) -> None:
        """Program the ADI table: its PASID, then Enable | PASID Enable (| memory-IMS enable)."""
        w = self.kernel.hw.mmio_write
        base = self.bar0 + ADI_TABLE + 8 * adi
        w(base + 4, _U32.pack(pasid & 0xF_FFFF))
        w(base, _U32.pack(ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE | (ADI_CTRL_MEM_IMS_ENABLE if mem_ims else 0)))
        self.pasids[adi] = pasid
        self.mem_ims[adi] = mem_ims

    def set_mem_ims(self, adi: int, on: bool) -> None:
        """Allow (or forbid) the ADI to send messages fetched from its owner's memory."""
        if self.mem_ims.get(adi) == on:
            return
        self.mem_ims[adi] = on
        self.kernel.hw.mmio_write(self.bar0 + ADI_TABLE + 8 * adi, _U32.pack(
            ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE | (ADI_CTRL_MEM_IMS_ENABLE if on else 0)))

    def reset_adi(self, adi: int) -> None:
        """ADI reset; the write's other bits are 0, so EN, PE and MIE land cleared."""
        self.kernel.hw.mmio_write(self.bar0 + ADI_TABLE + 8 * adi, _U32.pack(ADI_CTRL_RESET))
        self.pasids.pop(adi, None)
        self.mem_ims.pop(adi, None)


class SiovPfDriver:
    """``struct pci_driver`` for the SIOV PF.  ``claimed``: ADIs the VMM keeps (rid -> set)."""

    name = "irqlab-siov"

    def __init__(self, irq_mode: str = "ims", ims_kind: dict[int, str] | None = None,
                 claimed: dict[int, set[int]] | None = None, host_domain: int | None = None):
        self.irq_mode = irq_mode
        self.ims_kind = ims_kind or {}
        self.claimed = claimed or {}
        self.host_domain = host_domain
        self.pfs: dict[int, SiovPf] = {}

    def match(self, dev: PciDev) -> bool:
        return dev.vendor == PCI_VENDOR_ID_REDHAT_QUMRANET and dev.device == SIOV_PF_ID

    async def probe(self, kernel, dev: PciDev) -> SiovPf:
        bus = kernel.pci
        await bus.enable_device(dev)
        await bus.enable_pasid(dev)
        raw = await kernel.hw.mmio_read(dev.bars[0].base + ADI_CAP, 4)
        cap = int.from_bytes(raw or b"\0\0\0\0", "little")
        pf = SiovPf(kernel, dev, cap & ADI_CAP_COUNT, bool(cap & ADI_CAP_PASID_INTERRUPTS))
        self.pfs[dev.rid] = pf
        # the PF's own work engine, MSI-X, like any function
        pf_engine = EngineInstance(kernel, dev, "msix")
        await pf_engine.setup()
        kernel.bound[dev.rid] = pf_engine
        kind = self.ims_kind.get(dev.rid, "device")
        # A memory-kind message goes out PASID-tagged when the device tags interrupts; only an
        # IRTE bound to that PASID takes a tagged request, so the platform must both accept
        # (pasid_interrupts) and check (pasid_ir) them.  Otherwise the host's ADIs use
        # device-kind slots, written untagged (ctrl PASID-enable clear).
        mem_ok = not pf.pasid_interrupts or (kernel.pasid_ir and kernel.pasid_interrupts)
        if kind == "memory" and not mem_ok:
            kind = "device"
            kernel.log.append(f"{self.name} {dev}: memory IMS not used: its interrupt messages carry "
                              f"PASIDs and this platform cannot "
                              f"{'check' if kernel.pasid_interrupts else 'receive'} them")
        for adi in range(pf.count):
            if adi in self.claimed.get(dev.rid, set()):
                pf.owner[adi] = "vmm"
                continue
            pasid = kernel.alloc_pasid()
            pf.enable_adi(adi, pasid, mem_ims=True)     # the host's own: it trusts itself
            pf.owner[adi] = "host"
            if self.host_domain is not None:
                await kernel.hw.iommu_pasid(dev.rid, pasid, self.host_domain)
            origin = adi_origin(dev.rid, adi)
            bind = pasid if (pf.pasid_interrupts and kernel.pasid_ir) else None
            inst = EngineInstance(kernel, dev, self.irq_mode, bar0=pf.portal(adi), label=f"adi{adi} {dev}",
                                  ims_kind=kind, origin=origin, msix=False,
                                  domain_name=f"{dev.name}.adi{adi}", bind_pasid=bind, mem_ims=mem_ok)
            await inst.setup()
            pf.engines[adi] = inst
            kernel.bound[origin] = inst
        kernel.log.append(f"{self.name} {dev}: {pf.count} ADIs ({sum(1 for o in pf.owner.values() if o == 'host')} "
                          f"host, {sum(1 for o in pf.owner.values() if o == 'vmm')} for VMs), "
                          f"interrupts {'carry' if pf.pasid_interrupts else 'do not carry'} PASIDs")
        return pf_engine

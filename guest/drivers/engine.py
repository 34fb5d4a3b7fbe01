"""Driver for the irqlab work engine (PF 1b36:11a0, VF 1b36:11a1).

The driver's own copy of the register map (like a Linux driver's
``registers.h``; the OS never imports the device model)::

    BAR0 + 0x00  ENGINE_ID          RO  "IRQL"
    BAR0 + 0x08  CMPL_BASE_LO       RW  completion ring bus address
    BAR0 + 0x0C  CMPL_BASE_HI       RW
    BAR0 + 0x10  CMPL_RING_ENTRIES  RW  power of two
    BAR0 + 0x14  IRQ_VECTOR         RW  MSI-X entry raised on completion
    BAR0 + 0x18  DOORBELL           WO  cookie: one work item
    completion record (16 B): u32 cookie | u32 status (1 = done) | u64 seq

The interrupt handler runs only after the device's DMA write of the record
(same source, posted ordering), so the record for every interrupt must already
be in memory: the handler checks it and counts ``record_missing`` if not —
the lab's check of PCIe ordering end to end.
"""

from __future__ import annotations

import struct
import time
from typing import Callable

from guest.pci.core import PciDev

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1B36
ENGINE_PF_ID = 0x11A0
ENGINE_VF_ID = 0x11A1

ENGINE_ID = 0x00
CMPL_BASE_LO = 0x08
CMPL_BASE_HI = 0x0C
CMPL_RING_ENTRIES = 0x10
IRQ_VECTOR = 0x14
DOORBELL = 0x18
CMPL_STATUS_DONE = 1
RING_ENTRIES = 1024

_RECORD = struct.Struct("<IIQ")
_U32 = struct.Struct("<I")


class EngineDriver:
    """The driver (``struct pci_driver``): matches and probes functions."""

    name = "irqlab-engine"

    def match(self, dev: PciDev) -> bool:
        return dev.vendor == PCI_VENDOR_ID_REDHAT_QUMRANET and dev.device in (ENGINE_PF_ID, ENGINE_VF_ID)

    async def probe(self, kernel, dev: PciDev) -> "EngineInstance":
        await kernel.pci.enable_device(dev)
        inst = EngineInstance(kernel, dev)
        await inst.setup()
        return inst


class EngineInstance:
    """One bound function: its ring, its MSI-X vector and its counters."""

    def __init__(self, kernel, dev: PciDev):
        self.kernel = kernel
        self.dev = dev
        self.bar0 = dev.bars[0].base
        self.ring = 0
        self.entries = RING_ENTRIES
        self.irq = -1
        self.doorbells = 0
        self.completed = 0          # records consumed by the handler
        self.interrupts = 0
        self.record_missing = 0
        self.latencies_ns: list[int] = []
        self.on_complete: Callable[["EngineInstance", int], None] | None = None
        self._ram = kernel.ram

    @property
    def name(self) -> str:
        return f"{'vf' if self.dev.is_virtfn else 'pf'} {self.dev}"

    async def setup(self) -> None:
        k = self.kernel
        self.ring = k.ram.alloc(self.entries * _RECORD.size)
        (self.irq,) = await k.alloc_msix(self.dev, 1)
        k.irq.request_irq(self.irq, self.handle_irq, f"{EngineDriver.name}:{self.dev}")
        w = k.hw.mmio_write
        w(self.bar0 + CMPL_BASE_LO, _U32.pack(self.ring & 0xFFFF_FFFF))
        w(self.bar0 + CMPL_BASE_HI, _U32.pack(self.ring >> 32))
        w(self.bar0 + CMPL_RING_ENTRIES, _U32.pack(self.entries))
        w(self.bar0 + IRQ_VECTOR, _U32.pack(0))

    def ring_doorbell(self, cookie: int) -> None:
        self.doorbells += 1
        self.kernel.hw.mmio_write(self.bar0 + DOORBELL, _U32.pack(cookie & 0xFFFF_FFFF))

    def handle_irq(self, irq: int, cpu: int) -> None:
        """The interrupt handler: consume every completed record, in order."""
        k = self.kernel
        self.interrupts += 1
        t = k.cur_t_ns
        if t:
            self.latencies_ns.append(time.monotonic_ns() - t)
        data = self._ram.data
        base = self.ring - self._ram.base
        seq = self.completed
        found = 0
        while True:
            off = base + (seq % self.entries) * 16
            cookie, status, rseq = _RECORD.unpack_from(data, off)
            if status != CMPL_STATUS_DONE or rseq != seq:
                break
            data[off + 4:off + 8] = b"\0\0\0\0"  # consumed
            seq += 1
            found += 1
            self.completed = seq
            if self.on_complete is not None:
                self.on_complete(self, cookie)
        if not found:
            # The interrupt overtook its completion record: an ordering violation.
            self.record_missing += 1

"""DMA copies by the work engine, driven from an OS (the guest's ``dma.copy`` control operation).

The driver's own copy of the engine's copy-descriptor registers (the OS never
imports the device model)::

    BAR0 + 0x80/0x84  DMA_SRC_LO/HI  RW  source bus address
    BAR0 + 0x88/0x8C  DMA_DST_LO/HI  RW  destination bus address
    BAR0 + 0x90       DMA_LEN        RW  bytes per copy
    BAR0 + 0x94       DMA_GO         WO  cookie: one copy work item (a record + interrupt when done)
    BAR0 + 0x9C       DMA_ERRORS     RO  copies a read of which failed (UR/CA)

``DmaRun`` (pure: it only calls the kernel's hardware hooks, like the driver)
fills a source buffer in this OS's RAM with random bytes, points the descriptor
at it and at a destination buffer (bus addresses are this OS's physical
addresses: in a VM the IOMMU translates them, IOVA = GPA), and keeps
``inflight`` copies going until ``copies`` have completed -- each completion is
the engine's ordinary record and interrupt, seen by the driver's handler.  Then
it checks that the destination holds the source.  The shell
(``guest.process``) does the waiting.
"""

from __future__ import annotations

import os
import struct
from typing import Callable

DMA_SRC_LO, DMA_SRC_HI, DMA_DST_LO, DMA_DST_HI, DMA_LEN, DMA_GO, DMA_ERRORS = (
    0x80, 0x84, 0x88, 0x8C, 0x90, 0x94, 0x9C)
MAX_BYTES = 1 << 20
_U32 = struct.Struct("<I")


class DmaRun:
    """One ``dma.copy`` run on one engine instance: ``begin()``, then the driver's handler
    calls back on every completion until ``on_done``; ``end()`` restores the driver and
    reports.  ``src`` (a bus address) copies from there instead of this OS's own buffer."""

    def __init__(self, kernel, inst, size: int, copies: int, inflight: int, buffers: dict,
                 src: int | None = None) -> None:
        if not 1 <= size <= MAX_BYTES or copies < 1 or inflight < 1:
            raise ValueError(f"1 <= bytes <= {MAX_BYTES}, copies >= 1 and inflight >= 1 are required")
        if getattr(inst, "dma_busy", False):
            raise RuntimeError(f"{inst.name}: a DMA run is already going")
        self.kernel, self.inst, self.size, self.copies = kernel, inst, size, copies
        # at most half the work queue: the rest is room for records consumed but not given back
        self.inflight = min(inflight, copies, max(1, inst.wq_depth // 2))
        if size not in buffers:                  # allocated once per size: RAM is a bump allocator
            buffers[size] = (kernel.ram.alloc(size), kernel.ram.alloc(size))
        self.src, self.dst = buffers[size]
        self.pattern = os.urandom(size)
        kernel.ram.write(self.src, self.pattern)
        kernel.ram.write(self.dst, bytes(size))
        self.own = src is None
        if not self.own:
            self.src = src & 0xFFFF_FFFF_FFFF_FFFF
        self.sent = self.completed = 0
        self.on_done: Callable[[], None] | None = None
        self._old = None

    def begin(self) -> None:
        w, bar = self.kernel.hw.mmio_write, self.inst.bar0
        for reg, v in ((DMA_SRC_LO, self.src & 0xFFFF_FFFF), (DMA_SRC_HI, self.src >> 32),
                       (DMA_DST_LO, self.dst & 0xFFFF_FFFF), (DMA_DST_HI, self.dst >> 32), (DMA_LEN, self.size)):
            w(bar + reg, _U32.pack(v))
        self._old = self.inst.on_complete
        self.inst.on_complete = self._complete
        self.inst.dma_busy = True
        for _ in range(self.inflight):
            self._go()

    def _go(self) -> None:
        self.sent += 1
        self.inst.doorbells += 1       # the driver's work-queue accounting counts every work item
        self.kernel.hw.mmio_write(self.inst.bar0 + DMA_GO, _U32.pack(self.sent & 0xFFFF_FFFF))

    def _complete(self, _inst, cookie: int) -> None:
        self.completed += 1
        if self.sent < self.copies:
            self._go()
        elif self.completed >= self.copies and self.on_done is not None:
            self.on_done()

    def end(self) -> dict:
        self.inst.on_complete = self._old
        self.inst.dma_busy = False
        return {"function": self.inst.name, "bytes": self.size, "copies": self.completed, "sent": self.sent,
                "inflight": self.inflight, "src": self.src, "dst": self.dst,
                "verified": self.kernel.ram.read(self.dst, self.size) == self.pattern if self.own else None}

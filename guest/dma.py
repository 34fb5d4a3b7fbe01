"""DMA copies by the work engine, driven from an OS (the ``dma.copy`` control operation).

The driver's own copy of the engine's copy-descriptor registers (the OS never
imports the device model)::

    BAR0 + 0x80/0x84  DMA_SRC_LO/HI  RW  source bus address
    BAR0 + 0x88/0x8C  DMA_DST_LO/HI  RW  destination bus address
    BAR0 + 0x90       DMA_LEN        RW  bytes per copy
    BAR0 + 0x94       DMA_GO         WO  cookie: one copy work item (a record + interrupt when done)
    BAR0 + 0x9C       DMA_ERRORS     RO  copies a read of which failed (UR/CA)

``run`` fills a source buffer in this OS's RAM with random bytes, points the
descriptor at it and at a destination buffer (bus addresses are this OS's
physical addresses: in a VM the IOMMU translates them, IOVA = GPA), and keeps
``inflight`` copies going until ``copies`` have completed -- each completion is
the engine's ordinary record and interrupt, seen by the driver's handler.  Then
it checks the destination holds the source.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time

DMA_SRC_LO, DMA_SRC_HI, DMA_DST_LO, DMA_DST_HI, DMA_LEN, DMA_GO, DMA_ERRORS = (
    0x80, 0x84, 0x88, 0x8C, 0x90, 0x94, 0x9C)
MAX_BYTES = 1 << 20
_U32 = struct.Struct("<I")


async def run(shell, args: dict) -> dict:
    """``dma.copy``: ``bytes`` per copy (1..1 MiB), ``copies``, ``inflight``, ``timeout_s``,
    ``function`` (a driver instance name; default the first), ``src`` (a bus address to copy
    from instead of this OS's own buffer).  Returns counts, elapsed time, whether the
    destination holds the source (None with ``src``), and the engine's DMA_ERRORS increase."""
    size = int(args.get("bytes", 65536))
    copies = int(args.get("copies", 100))
    inflight = int(args.get("inflight", 4))
    timeout_s = float(args.get("timeout_s", 60.0))
    if not 1 <= size <= MAX_BYTES or copies < 1 or inflight < 1 or timeout_s <= 0:
        raise ValueError(f"1 <= bytes <= {MAX_BYTES}, copies >= 1, inflight >= 1 and timeout_s > 0 are required")
    if shell.workload is not None and not shell.workload.finished:
        raise RuntimeError("a workload is running on this OS")
    engines = [e for e in shell.engines() if e.irq >= 0 and not e.removed]
    name = args.get("function")
    inst = next((e for e in engines if name is None or e.name == name), None)
    if inst is None:
        raise ValueError(f"no engine function {name!r} here (have: {', '.join(e.name for e in engines)})")
    if getattr(inst, "dma_busy", False):
        raise RuntimeError(f"{inst.name}: a DMA run is already going")
    # at most half the work queue: the rest is room for records consumed but not yet given back
    inflight = min(inflight, copies, max(1, inst.wq_depth // 2))
    k = shell.kernel
    bufs = getattr(shell, "dma_buffers", None)
    if bufs is None:
        bufs = shell.dma_buffers = {}
    if size not in bufs:
        bufs[size] = (k.ram.alloc(size), k.ram.alloc(size))
    src, dst = bufs[size]
    pattern = os.urandom(size)
    k.ram.write(src, pattern)
    k.ram.write(dst, bytes(size))
    own = "src" not in args
    if not own:           # any bus address: what the IOMMU makes of a copy from outside this OS's RAM
        src = int(args["src"]) & 0xFFFF_FFFF_FFFF_FFFF
    w, bar = k.hw.mmio_write, inst.bar0
    for reg, v in ((DMA_SRC_LO, src & 0xFFFF_FFFF), (DMA_SRC_HI, src >> 32), (DMA_DST_LO, dst & 0xFFFF_FFFF),
                   (DMA_DST_HI, dst >> 32), (DMA_LEN, size)):
        w(bar + reg, _U32.pack(v))
    raw = await k.hw.mmio_read(bar + DMA_ERRORS, 4)
    errors0 = int.from_bytes(raw or b"\0\0\0\0", "little")

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state = {"sent": 0, "completed": 0}

    def go() -> None:
        state["sent"] += 1
        inst.doorbells += 1           # the driver's work-queue accounting counts every work item
        w(bar + DMA_GO, _U32.pack(state["sent"] & 0xFFFF_FFFF))

    def on_complete(_inst, cookie: int) -> None:
        state["completed"] += 1
        if state["sent"] < copies:
            go()
        elif state["completed"] >= copies and not done.done():
            done.set_result(True)

    old = inst.on_complete
    inst.on_complete = on_complete
    inst.dma_busy = True
    t0 = time.monotonic()
    timed_out = False
    try:
        for _ in range(inflight):
            go()
        try:
            await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            timed_out = True
        elapsed = time.monotonic() - t0
    finally:
        inst.on_complete = old
        inst.dma_busy = False
    raw = await k.hw.mmio_read(bar + DMA_ERRORS, 4)
    errors = int.from_bytes(raw or b"\0\0\0\0", "little") - errors0
    return {"function": inst.name, "bytes": size, "copies": state["completed"], "sent": state["sent"],
            "inflight": inflight, "elapsed_s": elapsed, "timed_out": timed_out, "dma_errors": errors,
            "verified": k.ram.read(dst, size) == pattern if own else None, "src": src, "dst": dst}

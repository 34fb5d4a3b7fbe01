"""The bare-metal machine as the host kernel sees it: CPU accesses become TLPs,
IOMMU/IR programming becomes privileged register writes to the fabric.

This is the host's side of ``guest.kernel.Hardware``.  Non-posted requests
(config reads/writes, MMIO reads) carry a tag from a small allocator and are
completed by the ``Cpl``/``CplD`` the fabric routes back; posted ones (MMIO
writes) are simply sent.  Everything leaves on the one port in program order,
so an IRTE write always reaches the IR unit before the MSI-X table write that
publishes its handle.
"""

from __future__ import annotations

import asyncio

from fabric import wire
from fabric.port import Port
from fabric.tlp import CplStatus, Tlp

#: Generous: a busy 2-core machine can stall a process for seconds.
CFG_TIMEOUT_S = 30.0


class CompletionTimeout(RuntimeError):
    pass


class HostHardware:
    def __init__(self, port: Port):
        self.port = port
        self._free_tags = list(range(255, -1, -1))
        self._waiting: dict[int, asyncio.Future] = {}
        self.unexpected_completions = 0

    # -- non-posted requests ---------------------------------------------------

    async def _nonposted(self, tlp: Tlp, what: str) -> Tlp:
        while not self._free_tags:
            await asyncio.sleep(0.001)
        tag = self._free_tags.pop()
        tlp.tag = tag
        fut = asyncio.get_running_loop().create_future()
        self._waiting[tag] = fut
        self.port.send(wire.tlp(tlp.pack()))
        try:
            async with asyncio.timeout(CFG_TIMEOUT_S):
                return await fut
        except TimeoutError:
            raise CompletionTimeout(f"{what}: no completion within {CFG_TIMEOUT_S:.0f} s") from None
        finally:
            self._waiting.pop(tag, None)
            self._free_tags.append(tag)

    def on_completion(self, cpl: Tlp) -> None:
        fut = self._waiting.get(cpl.tag)
        if fut is None or fut.done():
            self.unexpected_completions += 1
            return
        fut.set_result(cpl)

    async def cfg_read(self, rid: int, reg: int) -> int | None:
        cpl = await self._nonposted(Tlp.cfg_read(rid, reg), f"CfgRd0 {rid:04x}:{reg:03x}")
        if cpl.status != CplStatus.SC or not cpl.data:
            return None
        return int.from_bytes(cpl.data[:4], "little")

    async def cfg_write(self, rid: int, reg: int, value: int, first_be: int = 0xF) -> None:
        cpl = await self._nonposted(Tlp.cfg_write(rid, reg, value, first_be=first_be),
                                    f"CfgWr0 {rid:04x}:{reg:03x}")
        if cpl.status != CplStatus.SC:
            raise CompletionTimeout(f"CfgWr0 {rid:04x}:{reg:03x} completed with {cpl.status.name}")

    async def mmio_read(self, addr: int, size: int) -> bytes | None:
        cpl = await self._nonposted(Tlp.mem_read(addr, size), f"MRd 0x{addr:x}")
        if cpl.status != CplStatus.SC:
            return None
        lead = addr & 3
        return cpl.data[lead:lead + size]

    # -- posted ----------------------------------------------------------------

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.port.send(wire.tlp(Tlp.mem_write(addr, data).pack()))

    # -- IOMMU / IR unit (privileged register interface) -----------------------

    def irte_write(self, index: int, raw: int, pasid: int | None = None) -> None:
        args = {"index": index, "lo": raw & (1 << 64) - 1, "hi": raw >> 64}
        if pasid is not None:
            args["pasid"] = pasid
        self.port.reg_nowait("irte.write", args)

    async def iommu_pasid(self, rid: int, pasid: int, domain: int | None) -> None:
        await self.port.reg("iommu.pasid", {"rid": rid, "pasid": pasid, "domain": domain})

    def irte_clear(self, index: int) -> None:
        self.port.reg_nowait("irte.clear", {"index": index})

    async def bar_window(self, base: int, size: int, rid: int) -> None:
        await self.port.reg("window.set", {"base": base, "size": size, "rid": rid})

    async def dma_context(self, rid: int, mode: str) -> None:
        await self.port.reg("context.set", {"rid": rid, "mode": mode})

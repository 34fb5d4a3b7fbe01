"""A VM's machine as its kernel sees it: every privileged access is a VM exit.

This is the guest's side of ``guest.kernel.Hardware``.  CPUID, config-space
accesses (ECAM) and hypercalls are explicit VM exits answered by the host; MMIO
loads and stores are TLPs with guest-physical addresses that the fabric's EPT
passes through to the device, traps to the host, or refuses.  A guest has no
IOMMU or IR unit of its own: those hooks do nothing.
"""

from __future__ import annotations

import asyncio
import itertools

from fabric import hypercall as hc
from fabric import wire
from fabric.port import Port
from fabric.tlp import CplStatus, Tlp, mem_write_raw

EXIT_TIMEOUT_S = 30.0


class VmExitError(RuntimeError):
    pass


class GuestHardware:
    def __init__(self, port: Port):
        self.port = port
        self._seq = itertools.count(1)
        self._exits: dict[int, asyncio.Future] = {}
        self._free_tags = list(range(255, -1, -1))
        self._reads: dict[int, asyncio.Future] = {}
        self.exits = 0
        self.unexpected = 0
        self.on_event = None          # platform notifications (surprise removal)

    # -- VM exits --------------------------------------------------------------

    async def vmexit(self, reason: str, args: dict):
        seq = next(self._seq)
        fut = asyncio.get_running_loop().create_future()
        self._exits[seq] = fut
        self.exits += 1
        self.port.send(wire.vmexit("", seq, reason, args))
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                return await fut
        except TimeoutError:
            raise VmExitError(f"VM exit {reason!r}: no VM entry within {EXIT_TIMEOUT_S:.0f} s") from None
        finally:
            self._exits.pop(seq, None)

    def on_vmentry(self, msg: list) -> None:
        _, _vm, seq, ok, result = msg
        if seq == 0:
            # unsolicited: a notification from the virtual platform (hot-unplug)
            if self.on_event is not None and isinstance(result, dict):
                self.on_event(result)
            return
        fut = self._exits.get(seq)
        if fut is None or fut.done():
            self.unexpected += 1
            return
        if ok:
            fut.set_result(result)
        else:
            fut.set_exception(VmExitError(str(result)))

    def cpuid_table(self, leaves: dict[int, tuple[int, int, int, int]]):
        return lambda leaf, sub=0: leaves.get(leaf, (0, 0, 0, 0))

    async def fetch_cpuid(self, leaves=(0, 1, 0x4000_0000, 0x4000_0001)) -> dict[int, tuple]:
        return {leaf: tuple(await self.vmexit("cpuid", {"leaf": leaf, "subleaf": 0})) for leaf in leaves}

    # -- config space (ECAM accesses trap) -------------------------------------

    async def cfg_read(self, rid: int, reg: int) -> int | None:
        v = await self.vmexit("cfg", {"rid": rid, "reg": reg})
        return None if v is None or v == 0xFFFF_FFFF else int(v)

    async def cfg_write(self, rid: int, reg: int, value: int, first_be: int = 0xF) -> None:
        await self.vmexit("cfg", {"rid": rid, "reg": reg, "value": value, "be": first_be})

    # -- MMIO --------------------------------------------------------------------

    def mmio_write(self, addr: int, data: bytes) -> None:
        raw = mem_write_raw(addr, data)             # a doorbell's bytes, without a Tlp object
        self.port.send(wire.tlp(raw if raw is not None else Tlp.mem_write(addr, data).pack()))

    async def mmio_read(self, addr: int, size: int) -> bytes | None:
        while not self._free_tags:
            await asyncio.sleep(0.001)
        tag = self._free_tags.pop()
        fut = asyncio.get_running_loop().create_future()
        self._reads[tag] = fut
        self.port.send(wire.tlp(Tlp.mem_read(addr, size, tag=tag).pack()))
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                cpl = await fut
        except TimeoutError:
            raise VmExitError(f"MRd 0x{addr:x}: no completion within {EXIT_TIMEOUT_S:.0f} s") from None
        finally:
            self._reads.pop(tag, None)
            self._free_tags.append(tag)
        if cpl.status != CplStatus.SC:
            return None
        lead = addr & 3
        return cpl.data[lead:lead + size]

    def on_completion(self, cpl: Tlp) -> None:
        fut = self._reads.get(cpl.tag)
        if fut is None or fut.done():
            self.unexpected += 1
            return
        fut.set_result(cpl)

    # -- hypercalls --------------------------------------------------------------

    async def hypercall(self, nr: int, *args: int) -> list[int]:
        r = await self.vmexit("hypercall", hc.request(nr, *args))
        ret = r.get("ret", -hc.KVM_EINVAL) if isinstance(r, dict) else -hc.KVM_EINVAL
        if ret:
            raise hc.HypercallError(nr, ret)
        return list(r.get("v", []))

    def hypercall_nowait(self, nr: int, *args: int) -> None:
        self.port.send(wire.vmexit("", 0, "hypercall", hc.request(nr, *args)))

    # -- no IOMMU / IR inside a VM ----------------------------------------------

    def irte_write(self, index: int, raw: int, pasid: int | None = None) -> None:
        raise RuntimeError("a VM has no interrupt-remapping unit")

    def irte_clear(self, index: int) -> None:
        raise RuntimeError("a VM has no interrupt-remapping unit")

    async def bar_window(self, base: int, size: int, rid: int) -> None:
        """The VMM maps the BAR in the EPT when it sees the config write."""

    async def dma_context(self, rid: int, mode: str) -> None:
        """The VMM programmed the IOMMU when it assigned the function."""

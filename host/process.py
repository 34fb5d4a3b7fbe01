"""The host process shell: the bare-metal OS (``guest.kernel.Kernel``) plus,
in later steps, the VMM.

Run as ``python -m host --runtime DIR --name host`` with the registration
token in ``IRQLAB_TOKEN``.  Boot: register with the fabric, probe CPUID (bare
metal), bind the CPUs' APIC IDs and RAM in the fabric, enable interrupt
remapping, enumerate PCI, enable SR-IOV, bind drivers, then tell the controller
"ready".  After that it serves control requests (workload, stats, views).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback

from fabric import wire
from fabric.bdf import rid_str
from fabric.loop import die_with_parent, run
from fabric.port import Port
from fabric.tlp import CplStatus, Tlp, TlpError, TlpType
from guest.cpuid import bare_metal_cpuid
from guest.drivers.engine import EngineDriver, EngineInstance
from guest.kernel import Kernel
from guest.views import lspci
from host.hw import HostHardware
from host.workload import Workload

_CPL = (TlpType.CPL, TlpType.CPL_DATA)
_MWR = (TlpType.MEM_WRITE, TlpType.MEM_WRITE_64)
_MRD = (TlpType.MEM_READ, TlpType.MEM_READ_64)


class Host:
    def __init__(self, cfg: dict, port: Port):
        self.cfg = cfg
        self.port = port
        self.hw = HostHardware(port)
        apic_ids = list(range(int(cfg["cpus"])))
        self.kernel = Kernel("host", apic_ids, int(cfg["memory_mib"]) << 20, self.hw, bare_metal_cpuid,
                             ir_entries=int(cfg["ir_entries"]) if cfg.get("ir", True) else None)
        self.kernel.drivers.append(EngineDriver())
        self.workload: Workload | None = None
        self.stop = asyncio.get_running_loop().create_future()
        self.bad_tlps = 0
        self.dma_writes = 0
        self.dma_reads = 0
        self.dma_unmapped = 0
        self._ctl_ops = {
            "status": self.op_status,
            "workload.run": self.op_workload_run,
            "stats": self.op_stats,
            "views": self.op_views,
            "shutdown": self.op_shutdown,
        }

    # -- boot ---------------------------------------------------------------

    async def boot(self) -> dict:
        k = self.kernel
        info = k.boot()
        await self.port.reg("cpus.bind", {"apic_ids": k.apic_ids})
        await self.port.reg("ram.set", {"base": 0, "size": k.ram.size})
        if k.ir is not None:
            await self.port.reg("ir.table", {"entries": k.ir.allocator.entries})
            await self.port.reg("ir.enable", {"on": True})
            await self.port.reg("ir.cfi", {"on": False})   # Linux clears CFI once IR is on
        max_bus = int(self.port.info.get("max_bus", 32))
        sriov = {int(b): int(n) for b, n in self.cfg.get("sriov", {}).items()}
        devs = await k.pci_init(range(1, max_bus + 1), sriov)
        return {"cpuid": info.describe(), "functions": [rid_str(d.rid) for d in devs],
                "hierarchy": k.domain_hierarchy()}

    def engines(self) -> list[EngineInstance]:
        return [inst for inst in self.kernel.bound.values() if isinstance(inst, EngineInstance)]

    # -- messages from the fabric (hot path) ---------------------------------

    def on_message(self, msg: list) -> None:
        kind = msg[0]
        if kind == wire.IRQ:
            _, apic, vector, origin, t_ns, _handle = msg
            self.kernel.deliver(apic, vector, origin, t_ns)
        elif kind == wire.TLP:
            self.on_tlp(msg[1])
        elif kind == wire.CTL:
            self.on_ctl(msg)

    def on_tlp(self, raw: bytes) -> None:
        try:
            tlp = Tlp.unpack(raw)
        except TlpError:
            self.bad_tlps += 1
            return
        t = tlp.type
        if t in _CPL:
            self.hw.on_completion(tlp)
        elif t in _MWR:
            # Device DMA into host RAM (the fabric already applied the IOMMU).
            if self.kernel.ram.write(tlp.byte_address(), tlp.payload_bytes()):
                self.dma_writes += 1
            else:
                self.dma_unmapped += 1
        elif t in _MRD:
            self.dma_reads += 1
            nbytes = len(tlp.payload_bytes()) if tlp.data else self._read_len(tlp)
            data = self.kernel.ram.read(tlp.byte_address(), nbytes)
            if data is None:
                cpl = Tlp.completion(tlp, 0, CplStatus.UR)
            else:
                lead = tlp.byte_address() & 3
                padded = bytes(lead) + data
                padded += bytes(-len(padded) % 4)
                cpl = Tlp.completion(tlp, 0, CplStatus.SC, padded)
            self.port.send(wire.tlp(cpl.pack()))
        else:
            self.bad_tlps += 1

    @staticmethod
    def _read_len(tlp: Tlp) -> int:
        if tlp.length == 1:
            return bin(tlp.first_be).count("1") or 1
        first = 4 - ((tlp.first_be & -tlp.first_be).bit_length() - 1)
        last = tlp.last_be.bit_length()
        return first + 4 * (tlp.length - 2) + last

    # -- control ------------------------------------------------------------

    def on_ctl(self, msg: list) -> None:
        try:
            c = wire.as_ctl(msg)
        except wire.WireError:
            return
        op = self._ctl_ops.get(c.op)
        if op is None:
            self.port.reply(c.req_id, False, f"host: unknown op {c.op!r} (known: {sorted(self._ctl_ops)})")
            return
        asyncio.get_running_loop().create_task(self._run_ctl(c.req_id, op, c.args))

    async def _run_ctl(self, req_id: int, op, args: dict) -> None:
        try:
            result = await op(args)
        except Exception as exc:  # report, never die of a bad request
            self.port.reply(req_id, False, f"host: {type(exc).__name__}: {exc}")
            return
        self.port.reply(req_id, True, result)

    async def op_status(self, args: dict) -> dict:
        k = self.kernel
        return {"cpuid": k.cpuid.describe() if k.cpuid else None,
                "functions": {inst.name: inst.dev.rid for inst in self.engines()}}

    async def op_workload_run(self, args: dict) -> dict:
        per_function = int(args.get("per_function", 1000))
        inflight = int(args.get("inflight", 32))
        timeout_s = float(args.get("timeout_s", 120))
        if self.workload is not None and not self.workload.finished:
            raise RuntimeError("a workload is already running")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        t0 = time.monotonic()
        self.workload = wl = Workload.start(self.engines(), per_function, inflight,
                                            on_finished=lambda: done.done() or done.set_result(True))
        timed_out = False
        try:
            async with asyncio.timeout(timeout_s):
                await done
        except TimeoutError:
            timed_out = True
        wl.detach()
        return {"timed_out": timed_out, "elapsed_s": time.monotonic() - t0,
                "functions": wl.report(), "host": self.counters()}

    def counters(self) -> dict:
        k = self.kernel
        return {"irqs_received": k.irqs_received, "breaches": k.breach_count,
                "breach_samples": [str(b) for b in k.breaches[:10]],
                "spurious": k.vector.spurious, "dma_writes": self.dma_writes, "dma_reads": self.dma_reads,
                "dma_unmapped": self.dma_unmapped, "bad_tlps": self.bad_tlps,
                "unexpected_completions": self.hw.unexpected_completions,
                "illegal_vectors": sum(c.illegal_vector for c in k.cpus)}

    async def op_stats(self, args: dict) -> dict:
        return {"host": self.counters(), "functions": self.workload.report() if self.workload else {}}

    async def op_views(self, args: dict) -> dict:
        k = self.kernel
        return {"proc_interrupts": k.proc_interrupts(), "domains": k.domain_hierarchy(),
                "lspci": await lspci(k.pci), "dmesg": "\n".join(k.log)}

    async def op_shutdown(self, args: dict) -> bool:
        asyncio.get_running_loop().call_soon(lambda: self.stop.done() or self.stop.set_result("shutdown"))
        return True


async def main_async(cfg: dict, token: str, name: str) -> int:
    port = Port(cfg["endpoint"], token, name)
    host: Host | None = None
    port.on_message = lambda msg: host.on_message(msg) if host else None
    await port.connect()
    host = Host(cfg, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: host.stop.done() or host.stop.set_result(signal.Signals(s).name))
    try:
        summary = await host.boot()
    except Exception as exc:
        traceback.print_exc()
        port.event("failed", {"stage": "boot", "error": f"{type(exc).__name__}: {exc}"})
        await asyncio.sleep(0.2)
        port.close()
        return 1
    port.event("ready", summary)
    why = await host.stop
    await asyncio.sleep(0.05)  # let the shutdown reply leave
    port.close()
    print(f"host: stopped ({why})", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m host", description="irqlab host: bare-metal OS and VMM")
    ap.add_argument("--runtime", required=True, help="runtime directory written by launch.py")
    ap.add_argument("--name", default="host")
    args = ap.parse_args(argv)
    die_with_parent()
    with open(os.path.join(args.runtime, f"{args.name}.json")) as f:
        cfg = json.load(f)
    token = os.environ.get("IRQLAB_TOKEN", "")
    rc = 0

    async def go():
        nonlocal rc
        rc = await main_async(cfg, token, args.name)

    run(go())
    return rc

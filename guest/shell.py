"""What every OS process shell (the host and each guest) does the same way.

``OsShell`` owns a ``Kernel`` and its port: it applies DMA that arrives as TLPs to
the kernel's RAM (and answers DMA reads), hands completions to the hardware
adapter, delivers interrupts to the local APICs, and serves the control
operations common to every OS instance (status, workload, stats, views,
shutdown).  ``host.process.Host`` and ``guest.process.Guest`` add their own.
"""

from __future__ import annotations

import asyncio
import time

from fabric import wire
from fabric.bdf import rid_str
from fabric.trace import TLP_NAMES, Tracer, chunk_budget, flow_id, requested
from fabric.tlp import CplStatus, Tlp, TlpError, TlpType, peek
from guest.drivers.engine import IRQ_BURST_MAX, EngineInstance
from guest.views import lspci
from guest.workload import Workload

_CPL = (TlpType.CPL, TlpType.CPL_DATA)
_MWR = (TlpType.MEM_WRITE, TlpType.MEM_WRITE_64)
_MRD = (TlpType.MEM_READ, TlpType.MEM_READ_64)
#: trace argument names (fabric.trace.Tracer.rec)
_TK_IRQ = ("apic", "vector", "handle")
_TK_TLP = ("rid", "key")


class OsShell:
    def __init__(self, port, kernel, hw):
        self.port = port
        self.kernel = kernel
        self.hw = hw
        self.workload: Workload | None = None
        self._starting = False          # a workload.run is programming the engines / behaviours
        self.stop = asyncio.get_running_loop().create_future()
        self.bad_tlps = 0
        self.dma_writes = 0
        self.dma_reads = 0
        self.dma_unmapped = 0
        self.ctl_ops = {
            "status": self.op_status,
            "workload.run": self.op_workload_run,
            "workload.stop": self.op_workload_stop,
            "trace.start": self.op_trace_start,
            "trace.dump": self.op_trace_dump,
            "stats": self.op_stats,
            "views": self.op_views,
            "shutdown": self.op_shutdown,
        }
        self.msg_handlers = {wire.IRQ: self.on_irq, wire.TLP: self.on_tlp_msg, wire.CTL: self.on_ctl,
                             wire.POSTED: self.on_posted}
        self.tracer = Tracer(port.name, on=requested())
        self.is_guest = getattr(port, "info", {}).get("role") == "guest"

    def engines(self) -> list[EngineInstance]:
        return [inst for inst in self.kernel.bound.values() if isinstance(inst, EngineInstance)]

    # -- messages from the fabric (hot path) ---------------------------------

    def on_message(self, msg: list) -> None:
        handler = self.msg_handlers.get(msg[0])
        if handler is not None:
            handler(msg)

    def on_irq(self, msg: list) -> None:
        _, apic, vector, origin, t_ns, handle = msg
        tr = self.tracer
        if tr.on:
            tr.rec("f" if self.is_guest or not self.kernel.irq_forwards(apic, vector) else "t",
                   "IRQ handler", "irq", flow_id(origin, t_ns), _TK_IRQ, apic, vector, handle)
        self.kernel.deliver(apic, vector, origin, t_ns, handle)

    def on_posted(self, msg: list) -> None:
        """A posted-interrupt notification: the vCPU syncs the PIR bits into its APIC.  Each
        entry is [vector, origin, t_ns, postings]: a PIR bit that absorbed several postings
        is taken once (its handler consumes all their work); the others are counted."""
        _, apic, entries = msg
        deliver = self.kernel.deliver
        coalesced = self.kernel.coalesced_posted
        tr = self.tracer
        for vector, origin, t_ns, postings in entries:
            if tr.on:
                tr.rec("f", "posted IRQ handler", "irq", flow_id(origin, t_ns), _TK_IRQ, apic, vector, -3)
            if postings != 1:
                coalesced(apic, vector, postings - 1)
            deliver(apic, vector, origin, t_ns, -3)

    def on_tlp_msg(self, msg: list) -> None:
        if self.tracer.on:
            self._trace_tlp(msg[1])
        self.on_tlp(msg[1])

    def _trace_tlp(self, raw) -> None:
        try:
            ftype, _, rid, key = peek(raw)
        except (TlpError, TypeError):      # on_tlp counts what does not parse
            return
        self.tracer.rec("i", TLP_NAMES.get(ftype, "TLP"), "tlp", None, _TK_TLP, rid, key)

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
            # DMA into this OS's RAM (the fabric already translated it).
            if self.kernel.ram.write(tlp.byte_address(), tlp.payload_bytes()):
                self.dma_writes += 1
            else:
                self.dma_unmapped += 1
        elif t in _MRD:
            self.dma_reads += 1
            addr = tlp.address
            data = self.kernel.ram.read(addr, tlp.length * 4)
            if data is None:
                cpl = Tlp.completion(tlp, 0, CplStatus.UR)
            else:
                cpl = Tlp.completion(tlp, 0, CplStatus.SC, data)
            self.port.send(wire.tlp(cpl.pack()))
        else:
            self.bad_tlps += 1

    # -- control ------------------------------------------------------------

    def on_ctl(self, msg: list) -> None:
        try:
            c = wire.as_ctl(msg)
        except wire.WireError:
            return
        op = self.ctl_ops.get(c.op)
        if op is None:
            self.port.reply(c.req_id, False, f"{self.port.name}: unknown op {c.op!r} (known: {sorted(self.ctl_ops)})")
            return
        asyncio.get_running_loop().create_task(self._run_ctl(c.req_id, c.op, op, c.args))

    async def _run_ctl(self, req_id: int, name: str, op, args: dict) -> None:
        try:
            result = await op(args)
        except Exception as exc:  # report, never die of a bad request
            self.port.reply(req_id, False, f"{self.port.name}: {name}: {type(exc).__name__}: {exc}")
            return
        self.port.reply(req_id, True, result)

    async def op_status(self, args: dict) -> dict:
        k = self.kernel
        return {"cpuid": k.cpuid.describe() if k.cpuid else None,
                "functions": {inst.name: {"rid": inst.dev.rid, "irq_mode": inst.irq_mode,
                                          "ims_error": inst.ims_error} for inst in self.engines()}}

    async def op_workload_run(self, args: dict) -> dict:
        per_function = int(args.get("per_function", 1000))
        inflight = int(args.get("inflight", 32))
        timeout_s = float(args.get("timeout_s", 120))
        stall_s = float(args.get("stall_s", 0) or 0)
        rate = float(args.get("rate", 0) or 0)
        burst = int(args.get("burst", 1) or 1)
        if per_function < 0 or inflight < 1 or timeout_s <= 0 or rate < 0 or not 1 <= burst <= IRQ_BURST_MAX:
            raise ValueError("per_function >= 0, inflight >= 1, timeout_s > 0, rate >= 0 and "
                             f"1 <= burst <= {IRQ_BURST_MAX} are required")
        if (self.workload is not None and not self.workload.finished) or self._starting:
            raise RuntimeError("a workload is already running")
        loop = asyncio.get_running_loop()
        self._starting = True
        try:
            engines = self.engines()
            await asyncio.gather(*(inst.set_burst(burst) for inst in engines))    # never raises
            background = await self.before_workload(args)
        finally:
            self._starting = False
        done = self._workload_done = loop.create_future()
        ended = self._workload_ended = asyncio.Event()
        t0 = time.monotonic()
        self.workload = wl = Workload.start(engines, per_function, inflight,
                                            on_finished=lambda: done.done() or done.set_result(True),
                                            rate=rate)
        pacer = loop.create_task(self._pace(wl, done)) if rate else None
        timed_out = stalled = False
        deadline = t0 + timeout_s
        while not done.done():
            # Wait for the end, but notice a run that stopped making progress (interrupts
            # that never come): after ``stall_s`` without a completion, stop waiting.
            progress = wl.completed()
            wait = deadline - time.monotonic()
            if stall_s:
                wait = min(wait, stall_s)
            if wait <= 0:
                timed_out = True
                break
            try:
                await asyncio.wait_for(asyncio.shield(done), timeout=wait)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                if wl.completed() == progress:
                    stalled = True
                    break
        if pacer is not None:
            pacer.cancel()
        wl.stopping = True
        if not stalled and not wl.quiesced():
            # stopped, stalled or timed out with work in flight: let it land (bounded) so that
            # the next run does not count this one's stragglers
            quiet = loop.create_future()
            wl.on_quiet = lambda: quiet.done() or quiet.set_result(True)
            try:
                await asyncio.wait_for(quiet, timeout=min(stall_s or 5.0, 5.0))
            except TimeoutError:
                pass
        wl.detach()
        wl.finished = True        # ended: done, stopped, stalled or timed out
        ended.set()
        if background is not None:
            try:
                await background
            except Exception:
                pass
        return {"timed_out": timed_out, "stalled": stalled, "elapsed_s": time.monotonic() - t0,
                "functions": wl.report(), "failed": self.probe_failures(), "os": self.counters(),
                "behaviours": getattr(self, "behaviour_results", [])}

    def probe_failures(self) -> dict:
        k = self.kernel
        return {rid_str(rid): {"rid": rid, "origin": k.provenance.get(rid, rid), "error": err}
                for rid, err in k.probe_failures.items()}

    async def before_workload(self, args: dict):
        """Hook: what an OS does before a run (misbehaving guests); may return a task."""
        return None

    async def op_workload_stop(self, args: dict) -> bool:
        """End the running workload now (its run reports what it got so far)."""
        done = getattr(self, "_workload_done", None)
        if done is None or done.done():
            return False
        done.set_result("stopped")
        await self._workload_ended.wait()      # the run has landed its stragglers and ended
        return True

    @staticmethod
    async def _pace(wl: Workload, done: asyncio.Future) -> None:
        """The timer of a paced workload: ring what is due, sleep until the next is."""
        while not done.done():
            now = time.monotonic_ns()
            nxt = wl.tick(now)
            await asyncio.sleep(max(nxt - time.monotonic_ns(), 0) / 1e9)

    def counters(self) -> dict:
        k = self.kernel
        return {"irqs_received": k.irqs_received, "breaches": k.breach_count,
                "breach_samples": [str(b) for b in k.breaches[:10]],
                "spurious": k.vector.spurious, "dma_writes": self.dma_writes, "dma_reads": self.dma_reads,
                "dma_unmapped": self.dma_unmapped, "bad_tlps": self.bad_tlps,
                "illegal_vectors": sum(c.illegal_vector for c in k.cpus),
                "posted_coalesced": k.posted_coalesced}

    async def op_stats(self, args: dict) -> dict:
        return {"os": self.counters(), "functions": self.workload.report() if self.workload else {}}

    async def op_views(self, args: dict) -> dict:
        k = self.kernel
        return {"proc_interrupts": k.proc_interrupts(), "domains": k.domain_hierarchy(),
                "lspci": await lspci(k.pci), "dmesg": "\n".join(k.log)}

    async def op_trace_start(self, args: dict) -> dict:
        return self.tracer.start(args.get("max_events"))

    async def op_trace_dump(self, args: dict) -> dict:
        return self.tracer.dump_chunk(args.get("offset", 0), chunk_budget("guest" if self.is_guest else "host"))

    async def op_shutdown(self, args: dict) -> bool:
        asyncio.get_running_loop().call_soon(lambda: self.stop.done() or self.stop.set_result("shutdown"))
        return True

"""A guest process shell: one VM running the OS model.

Run as ``python -m guest --runtime DIR --name g1`` with the registration token
in ``IRQLAB_TOKEN``.  Boot: register with the fabric, probe CPUID (every leaf is a
VM exit answered from the VM's profile), build the irq-domain hierarchy that
answer calls for, enumerate the virtual PCI bus (config accesses trap), bind the
engine driver to the assigned functions (MSI-X or IMS), then tell the
controller "ready" with what it built.
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
from guest.drivers.engine import EngineDriver
from guest.hw import GuestHardware
from guest.kernel import Kernel
from guest.shell import OsShell


class Guest(OsShell):
    def __init__(self, cfg: dict, port: Port):
        hw = GuestHardware(port)
        self.cpuid_leaves: dict = {}
        kernel = Kernel(port.name, list(range(int(cfg.get("cpus", 1)))), int(cfg.get("memory_mib", 16)) << 20,
                        hw, lambda leaf, sub=0: self.cpuid_leaves.get(leaf, (0, 0, 0, 0)),
                        ir_entries=None, variant=cfg.get("kernel", "modern"),
                        provenance={int(k): int(v) for k, v in cfg.get("provenance", {}).items()})
        super().__init__(port, kernel, hw)
        self.cfg = cfg
        kernel.drivers.append(EngineDriver(cfg.get("irq_mode", "msix"),
                                           {int(r): k for r, k in cfg.get("ims_kinds", {}).items()}))
        self.msg_handlers[wire.VMENTRY] = hw.on_vmentry
        hw.on_event = self.on_platform_event
        self.behaviours = list(cfg.get("behaviours", []))
        import collections
        port.recent = collections.deque(maxlen=64)   # for a replay-frames misbehaviour
        self.ctl_ops["hostile"] = self.op_hostile
        self.ctl_ops["dma.copy"] = self.op_dma_copy

    async def before_workload(self, args: dict):
        """Topology ``behaviours``: committed at the start of every workload run; a storm runs
        alongside it.  Returns a task to await after the run (or None)."""
        from guest.hostile import ACTIONS
        background = None
        self.behaviour_results = []
        for name in self.behaviours:
            if name not in ACTIONS:
                self.behaviour_results.append({"action": name, "error": "unknown behaviour"})
                continue
            if name == "storm":
                background = asyncio.get_running_loop().create_task(ACTIONS[name][1](self, {"seconds": 1.0}))
                continue
            try:
                self.behaviour_results.append({"action": name, "result": await ACTIONS[name][1](self, {})})
            except Exception as exc:  # a misbehaviour that cannot apply here is reported, not fatal
                self.behaviour_results.append({"action": name, "error": f"{type(exc).__name__}: {exc}"})
        return background

    def on_platform_event(self, ev: dict) -> None:
        if ev.get("event") == "surprise-removal" and type(ev.get("rid")) is int:
            self.kernel.surprise_removal([ev["rid"]])

    async def op_dma_copy(self, args: dict) -> dict:
        """DMA copies by an assigned function's engine, through the IOMMU (``guest.dma``): ``bytes``
        per copy, ``copies``, ``inflight``, ``timeout_s``, ``function`` (default the first
        engine), ``src`` (a bus address instead of this guest's own buffer)."""
        from guest.dma import DMA_ERRORS, DmaRun
        if self.workload is not None and not self.workload.finished:
            raise RuntimeError("a workload is running on this OS")
        engines = [e for e in self.engines() if e.irq >= 0 and not e.removed]
        name = args.get("function")
        inst = next((e for e in engines if name is None or e.name == name), None)
        if inst is None:
            raise ValueError(f"no engine function {name!r} here (have: {', '.join(e.name for e in engines)})")
        timeout_s = float(args.get("timeout_s", 60.0))
        if timeout_s <= 0:
            raise ValueError("timeout_s > 0 is required")
        k = self.kernel
        run = DmaRun(k, inst, int(args.get("bytes", 65536)), int(args.get("copies", 100)),
                     int(args.get("inflight", 4)), self.__dict__.setdefault("dma_buffers", {}),
                     None if args.get("src") is None else int(args["src"]))
        errors0 = int.from_bytes(await k.hw.mmio_read(inst.bar0 + DMA_ERRORS, 4) or bytes(4), "little")
        done = asyncio.get_running_loop().create_future()
        run.on_done = lambda: done.done() or done.set_result(True)
        t0 = time.monotonic()
        timed_out = False
        try:
            run.begin()
            try:
                await asyncio.wait_for(done, timeout_s)
            except TimeoutError:
                timed_out = True
        finally:
            elapsed = time.monotonic() - t0
            out = run.end()
        errors = int.from_bytes(await k.hw.mmio_read(inst.bar0 + DMA_ERRORS, 4) or bytes(4), "little") - errors0
        return {**out, "elapsed_s": elapsed, "timed_out": timed_out, "dma_errors": errors}

    async def op_hostile(self, args: dict) -> dict:
        """Commit one misbehaviour by name (``guest.hostile.ACTIONS``)."""
        from guest.hostile import ACTIONS
        name = args.get("action")
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r}; known: {', '.join(sorted(ACTIONS))}")
        return await ACTIONS[name][1](self, args)

    async def boot(self) -> dict:
        k = self.kernel
        self.cpuid_leaves = await self.hw.fetch_cpuid()
        info = k.boot()
        devs = await k.pci_init(range(0, 1), slots=range(32))
        return {"cpuid": info.describe(), "functions": [rid_str(d.rid) for d in devs],
                "hierarchy": k.domain_hierarchy(),
                "drivers": {inst.name: {"irq_mode": inst.irq_mode, "ims_error": inst.ims_error}
                            for inst in self.engines()},
                "ims_refusal": k.ims_refusal, "failed": self.probe_failures()}


async def main_async(cfg: dict, token: str, name: str) -> int:
    guest: Guest | None = None
    port = Port(cfg["endpoint"], token or cfg.get("token", ""), name,
                on_message=lambda msg: guest.on_message(msg) if guest else None, curve=cfg.get("curve"))
    await port.connect()
    guest = Guest(cfg, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: guest.stop.done() or guest.stop.set_result(signal.Signals(s).name))
    try:
        summary = await guest.boot()
    except Exception as exc:
        traceback.print_exc()
        port.event("failed", {"stage": "boot", "error": f"{type(exc).__name__}: {exc}"})
        await asyncio.sleep(0.2)
        port.close()
        return 1
    port.event("ready", summary)
    why = await guest.stop
    await asyncio.sleep(0.05)
    port.close()
    print(f"guest {name}: stopped ({why})", file=sys.stderr, flush=True)
    return 0


#: CPU niceness of a guest process (its vCPUs), above the fabric's, the devices' and the host's 0
#: (``IRQLAB_VCPU_NICE`` in the launcher's environment overrides it; 0 = as everyone else).
VCPU_NICE = int(os.environ.get("IRQLAB_VCPU_NICE", "10"))


def vcpu_priority() -> None:
    """Run this VM's vCPUs below the hardware and the hypervisor (docs/architecture.md, "CPU").

    In a real machine a vCPU cannot slow the PCIe fabric, the IOMMU or a device down -- they are
    hardware -- and the host's interrupt handling preempts vCPUs.  In the lab all of them are
    processes sharing the same cores, so a guest spinning on its doorbell would otherwise take
    the CPU the others' interrupts need to get through."""
    try:
        os.nice(VCPU_NICE - os.nice(0))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest", description="irqlab guest: one VM running the OS model")
    ap.add_argument("--runtime", required=True, help="runtime directory written by launch.py")
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    die_with_parent()
    vcpu_priority()
    with open(os.path.join(args.runtime, f"{args.name}.json")) as f:
        cfg = json.load(f)
    rc = 0

    async def go():
        nonlocal rc
        rc = await main_async(cfg, os.environ.get("IRQLAB_TOKEN", ""), args.name)

    run(go())
    return rc

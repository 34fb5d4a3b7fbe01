"""The host process shell: the bare-metal OS (``guest.kernel.Kernel``) plus the VMM.

Run as ``python -m host --runtime DIR --name host`` with the registration
token in ``IRQLAB_TOKEN``.  Boot: register with the fabric, probe CPUID (bare
metal), bind the CPUs' APIC IDs and RAM in the fabric, program and enable
interrupt remapping, enumerate PCI, enable SR-IOV, bind drivers (vfio-pci for
functions assigned to VMs), create the VMs, then tell the controller "ready".
After that it serves control requests and the VMs' exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import traceback

from fabric import wire
from fabric.bdf import rid_str
from fabric.loop import die_with_parent, run
from fabric.port import Port
from guest.cpuid import bare_metal_cpuid
from guest.drivers.engine import EngineDriver
from guest.drivers.siov import SiovPfDriver
from guest.kernel import Kernel
from guest.shell import OsShell
from host.hw import HostHardware
from host.vmm import Vmm


#: the IOMMU domain of the host's own PASID-tagged DMA (identity over host RAM)
HOST_PASID_DOMAIN = 0x7FFF

#: VMs created at once at boot: each reads its VF's 256-byte config space with 64 CfgRd0s in
#: flight, and the fabric's root complex has 256 tags for the host's non-posted requests
VM_CREATE_INFLIGHT = 3


class Host(OsShell):
    def __init__(self, cfg: dict, port: Port):
        hw = HostHardware(port)
        kernel = Kernel("host", list(range(int(cfg["cpus"]))), int(cfg["memory_mib"]) << 20, hw,
                        bare_metal_cpuid, ir_entries=int(cfg["ir_entries"]) if cfg.get("ir", True) else None)
        super().__init__(port, kernel, hw)
        self.cfg = cfg
        self.platform = dict(port.info)
        kernel.pasid_ir = bool(self.platform.get("pasid_ir"))
        kernel.pasid_interrupts = bool(self.platform.get("pasid_interrupts", True))
        kernel.drivers.append(EngineDriver(cfg.get("irq_mode", "msix")))
        kernel.claimed.update(int(r) for vm in cfg.get("vms", []) for r in vm.get("assign_rids", []))
        # Scalable-IOV PFs: per-PF options and the ADIs the VMM keeps for VMs
        self.siov_opts = {int(rid): o for rid, o in cfg.get("siov", {}).items()}
        claimed: dict[int, set[int]] = {}
        for vm in cfg.get("vms", []):
            for rid, adi in vm.get("assign_adis", []):
                claimed.setdefault(int(rid), set()).add(int(adi))
        self.siov = SiovPfDriver("ims", {rid: o.get("ims", "device") for rid, o in self.siov_opts.items()},
                                 claimed, HOST_PASID_DOMAIN if self.siov_opts else None)
        kernel.drivers.append(self.siov)
        self.vmm = Vmm(self)
        self.msg_handlers[wire.VMEXIT] = self.vmm.on_exit
        self.ctl_ops["vms"] = self.op_vms
        self.ctl_ops["vm.died"] = self.op_vm_died
        self.ctl_ops["device.removed"] = self.op_device_removed
        self.ctl_ops["vcpu.deschedule"] = self.op_vcpu_deschedule
        self.ctl_ops["vcpu.schedule"] = self.op_vcpu_schedule

    async def boot(self) -> dict:
        k = self.kernel
        info = k.boot()
        await self.port.reg("cpus.bind", {"apic_ids": k.apic_ids})
        await self.port.reg("mem.map", {"owner": self.port.name, "hpa": 0, "size": k.ram.size, "local": 0})
        if k.ir is not None:
            await self.port.reg("ir.table", {"entries": k.ir.allocator.entries})
            await self.port.reg("ir.enable", {"on": True})
            await self.port.reg("ir.cfi", {"on": False})   # Linux clears CFI once IR is on
        if self.siov_opts:
            # PASID-tagged DMA of the host's own ADIs: an identity domain over host RAM
            await self.port.reg("iommu.domain", {"domain": HOST_PASID_DOMAIN, "op": "create"})
            await self.port.reg("iommu.map", {"domain": HOST_PASID_DOMAIN, "iova": 0, "hpa": 0,
                                              "size": k.ram.size, "read": True, "write": True})
        max_bus = int(self.port.info.get("max_bus", 32))
        sriov = {int(b): int(n) for b, n in self.cfg.get("sriov", {}).items()}
        devs = await k.pci_init(range(1, max_bus + 1), sriov)
        await self._create_vms(self.cfg.get("vms", []))
        k.log.extend(self.vmm.log)
        return {"cpuid": info.describe(), "functions": [rid_str(d.rid) for d in devs],
                "hierarchy": k.domain_hierarchy(), "vms": sorted(self.vmm.vms)}

    async def _create_vms(self, specs: list[dict]) -> None:
        """Create the VMs, VM_CREATE_INFLIGHT at a time: each is a dozen round trips to the fabric
        and the device, so 64 VMs one after another spend the boot waiting on them.  VMs with
        ADIs are created first, one at a time, so their PASIDs are allocated in topology order;
        ``vmm.vms`` keeps the topology's order whatever order they finish in."""
        sem = asyncio.Semaphore(VM_CREATE_INFLIGHT)

        async def create(i: int, spec: dict) -> None:
            async with sem:
                await self.vmm.create_vm(spec, i)

        numbered = list(enumerate(specs))
        for i, spec in numbered:
            if spec.get("assign_adis"):
                await self.vmm.create_vm(spec, i)
        await asyncio.gather(*(create(i, spec) for i, spec in numbered if not spec.get("assign_adis")))
        vms = self.vmm.vms
        self.vmm.vms = {spec["name"]: vms[spec["name"]] for spec in specs if spec["name"] in vms}

    def counters(self) -> dict:
        c = super().counters()
        c["unexpected_completions"] = self.hw.unexpected_completions
        return c

    async def op_vms(self, args: dict) -> dict:
        return self.vmm.snapshot()

    async def op_vm_died(self, args: dict) -> dict:
        return await self.vmm.destroy_vm(str(args["name"]))

    async def op_vcpu_deschedule(self, args: dict) -> dict:
        """``{"vm": NAME, "vcpu": N}`` (no ``vcpu``: every vCPU): the vCPU stops running; its
        posted interrupts wait in PIR (SN set)."""
        return await self.vmm.set_vcpu_running(args.get("vm"), args.get("vcpu"), False)

    async def op_vcpu_schedule(self, args: dict) -> dict:
        """The vCPU runs again (SN clear): what PIR accumulated is delivered."""
        return await self.vmm.set_vcpu_running(args.get("vm"), args.get("vcpu"), True)

    async def op_device_removed(self, args: dict) -> dict:
        """A device process died: its functions are surprise-removed from the host and the VMs."""
        buses = [int(b) for b in args.get("buses", [])]
        k = self.kernel
        gone = [rid for rid in k.pci.devices if rid >> 8 in buses]
        for rid in gone:
            k.removed.add(rid)
        removed_here = k.surprise_removal(gone)
        told = await self.vmm.device_removed(buses)
        return {"functions": [rid_str(r) for r in gone], "host_drivers": removed_here, **told}

    def _adi_irqs(self, rid: int, pf, adi: int) -> list[str]:
        """The ADI's interrupts for the ``adis`` view: IMS kind, the IRTE behind each and what
        that IRTE checks (the RID only, or RID and PASID), where it points."""
        from guest.irq.ir import IrteRef
        k = self.kernel

        def irte(virq: int) -> str:
            data = k.irq.irq_get_irq_data(virq)
            ref = next((d.chip_data for d in (data.levels() if data else ())
                        if isinstance(d.chip_data, IrteRef)), None)
            if ref is None:
                return "no IRTE"
            checks = f"RID {rid_str(ref.sid)} + PASID 0x{ref.pasid:x}" if ref.pasid is not None else \
                f"RID {rid_str(ref.sid)} only"
            if ref.irte is None:
                return f"IRTE {ref.index} (not written), checks {checks}"
            how = ("posted" if ref.irte.mode else "remapped") + f" vector 0x{ref.irte.vector:02x}"
            return f"IRTE {ref.index} checks {checks}, {how}"

        inst = pf.engines.get(adi)
        if inst is not None:                     # the host drives it
            kind = {"ims": "device IMS", "ims-memory": "memory IMS"}.get(inst.irq_mode, inst.irq_mode)
            if inst.irq < 0:
                return [f"{kind}: no interrupt ({inst.ims_error or 'not set up'})"]
            return [f"{kind} slot {k.irq.irq_get_irq_data(inst.irq).hwirq}: {irte(inst.irq)}"]
        out = []
        for vm in self.vmm.vms.values():
            for vadi in vm.vfs.values():
                if getattr(vadi, "pf_rid", None) != rid or getattr(vadi, "adi", None) != adi:
                    continue
                for c in [c for c in vm.composes.values() if c.vf is vadi]:
                    pair = "fake pair (case 4: the VMM writes the real slot)" if c.kind == "fake" else \
                        "real pair stored by the guest"
                    out.append(f"{vm.name} {rid_str(vadi.guest_rid)} compose handle {c.handle}: {pair}; "
                               f"{irte(c.virq)} -> vCPU{c.apic} vector 0x{c.vector:02x}")
        return out

    async def op_views(self, args: dict) -> dict:
        views = await super().op_views(args)
        lines = []
        for rid, pf in sorted(self.siov.pfs.items()):
            lines.append(f"{pf.dev}: {pf.count} ADIs, interrupt messages "
                         f"{'PASID-tagged' if pf.pasid_interrupts else 'untagged'}")
            for adi in range(pf.count):
                pasid = pf.pasids.get(adi)
                lines.append(f"  ADI {adi}: owner {pf.owner.get(adi, '-')}, PASID "
                             + (f"0x{pasid:x}" if pasid is not None else "-")
                             + f", portal 0x{pf.portal(adi):x}")
                lines += [f"    {b}" for b in self._adi_irqs(rid, pf, adi)]
        views["adis"] = "\n".join(lines)
        vms = []
        for vm in self.vmm.vms.values():
            if vm.delivery == "posted":
                how = (f"posted ({self.vmm.posted_irtes(vm)} IRTEs posted into descriptors "
                       + ", ".join(f"vCPU{c} 0x{p:x}" + (" [descheduled: SN]" if c in vm.descheduled else "")
                                   for c, p in vm.pids.items()) + ")")
            else:
                how = "injection (remapped to a host vector, injected by the VMM)"
            vms.append(f"{vm.name}: {vm.state}, {vm.vcpus} vCPUs, interrupt delivery {how}; "
                       f"injected {vm.injected}")
        views["vms"] = "\n".join(vms)
        return views


async def main_async(cfg: dict, token: str, name: str) -> int:
    host: Host | None = None
    port = Port(cfg["endpoint"], token or cfg.get("token", ""), name,
                on_message=lambda msg: host.on_message(msg) if host else None, curve=cfg.get("curve"))
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

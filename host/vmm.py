"""The VMM half of the host: virtual machines, assigned VFs, VM exits, hypercalls, injection.

For each VM of the topology the VMM, at host boot (before the guest process
starts):

1. places the guest's RAM in host-physical address space (a window of its own;
   the bytes live in the guest's process) and tells the fabric's memory map;
2. creates an IOMMU domain whose second-level table maps IOVA = guest-physical
   onto that window, and points each assigned VF's context entry at it, so the
   VF's DMA lands in its guest's memory and nowhere else;
3. builds the VF's virtual config space (``host.vfio``) and claims the VF from the
   host's own driver (vfio-pci binds it).

Then it serves the guest's VM exits: CPUID from the VM's profile, config-space
accesses through the virtual config, trapped MSI-X table accesses, hypercalls,
EPT violations.  Real interrupts of an assigned VF arrive at host vectors whose
handlers inject (guest vector, vCPU) into the guest — the remapped-then-injected
path of case 2.

A VM whose ``delivery`` is ``"posted"`` (the default on a platform with posted
interrupts) gets a posted-interrupt descriptor per vCPU in the fabric; every
vfio MSI-X entry the guest makes deliverable, and every message composed by
hypercall, gets a posted-format IRTE naming (descriptor, guest vector), so the
IR unit notifies the vCPU itself and the host is not on the path.  A masked
entry goes back to remapped (the host holds it pending).  ``set_vcpu_running``
deschedules / schedules a vCPU: the descriptor's SN bit.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from fabric import hypercall as hc
from fabric import wire
from fabric.bdf import rid_str
from fabric.tlp import CplStatus, Tlp, TlpError, TlpType
from fabric.trace import flow_id
from guest.irq.domain import (IrqAllocInfo, IrqError, irq_chip_compose_msi_msg, irq_domain_alloc_irqs,
                              irq_domain_free_irqs)
from guest.irq.ir import IrteRef
from guest.pci import regs as R
from guest.pci.core import PciDev
from guest.pci.msi import pci_free_irq_vectors
from fabric.ir import compose_remappable
from fabric.provenance import adi_origin, describe
from host import emul_siov
from host.cpuid import vm_cpuid
from host.vdev import BAR0_SIZE as ADI_BAR0_SIZE, VirtualAdi
from host.vfio import PAGE, VirtualFunction

#: guest RAM windows in host-physical space: 1 TiB up, 64 GiB apart
GUEST_HPA_BASE = 1 << 40
GUEST_HPA_STRIDE = 1 << 36
#: assigned functions appear on the guest's bus 0 from slot 3 (QEMU leaves 0-2 to chipset)
FIRST_GUEST_SLOT = 3
#: per-VM quota of hypercall-composed interrupts (an IRTE each)
COMPOSE_QUOTA = 64
#: where the model's posted-interrupt descriptors "live" (64 bytes per vCPU, host memory)
PID_BASE = 0x7F00_0000

#: trace argument names of an injection (fabric.trace.Tracer.rec)
_TK_INJECT = ("vm", "vcpu", "vector")


@dataclass
class Compose:
    handle: int
    vf: "VirtualFunction | VirtualAdi"
    virq: int
    apic: int
    vector: int
    kind: str = "remapped"      # "remapped": a real pair went to the guest; "fake": the ABI pair
    real: tuple[int, int, int] | None = None


def fake_pair(handle: int) -> tuple[int, int, int]:
    """The "fake" address/data pair of case 4 (an ABI between guest and VMM, docs/hypercalls.md).

    Remappable format with the VMM's handle in the handle field and address bits 63:32 = 1:
    meaningless to the IR unit (any request with addr_hi != 0 faults 0x20), recognisable by
    the VMM's IMS emulation when the guest stores it into a trapped slot.
    """
    lo, _, data = compose_remappable(handle & 0xFFFF, 0, shv=True)
    return lo, FAKE_ADDR_HI, data


FAKE_ADDR_HI = 0x1


@dataclass
class Vm:
    name: str
    index: int
    vcpus: int
    mem_size: int
    profile: str
    variant: str
    hpa: int
    domain: int
    vfs: dict[int, "VirtualFunction | VirtualAdi"] = field(default_factory=dict)  # guest RID -> device
    composes: dict[int, Compose] = field(default_factory=dict)
    handles: itertools.count = field(default_factory=lambda: itertools.count(1))
    exits: dict[str, int] = field(default_factory=dict)
    hypercalls: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    injected: int = 0
    pending_forward: int = 0
    state: str = "running"          # "running" | "dead" (its process died; everything reclaimed)
    pids: dict[int, int] = field(default_factory=dict)      # vCPU APIC ID -> descriptor address
                                                            # (empty: this VM's interrupts are injected)
    descheduled: set[int] = field(default_factory=set)      # vCPUs whose descriptor has SN set
    refused_total: int = 0
    reclaimed: dict = field(default_factory=dict)

    @property
    def apic_ids(self) -> list[int]:
        return list(range(self.vcpus))

    @property
    def delivery(self) -> str:
        """"posted" when its vCPUs have posted-interrupt descriptors, else "injection"."""
        return "posted" if self.pids else "injection"

    def refuse(self, what: str) -> None:
        self.refused_total += 1
        if len(self.refused) < 200:
            self.refused.append(what)


class Vmm:
    def __init__(self, host):
        self.host = host
        self.kernel = host.kernel
        self.port = host.port
        self.vms: dict[str, Vm] = {}
        self.by_irq: dict[int, tuple[Vm, VirtualFunction, int]] = {}   # host virq -> (vm, vf, entry)
        self.log: list[str] = []
        #: the platform has posted interrupts; each VM's ``delivery`` (topology) says whether it
        #: uses them (a VM with descriptors is posted, one without is injected)
        self.posted = bool(host.platform.get("posted"))

    # ------------------------------------------------------------------
    # setup

    async def create_vm(self, spec: dict, index: int) -> Vm:
        name = spec["name"]
        vm = Vm(name, index, int(spec.get("cpus", 1)), int(spec.get("memory_mib", 16)) << 20,
                spec.get("cpuid", "kvm"), spec.get("kernel", "modern"),
                GUEST_HPA_BASE + index * GUEST_HPA_STRIDE, domain=index + 1)
        reg = self.port.reg
        delivery = spec.get("delivery") or ("posted" if self.posted else "injection")
        if delivery not in ("posted", "injection"):
            raise RuntimeError(f"{name}: unknown interrupt delivery {delivery!r}")
        if delivery == "posted" and not self.posted:
            raise RuntimeError(f"{name}: posted delivery asked for, but the platform has no posted interrupts")
        if delivery == "posted":
            # one posted-interrupt descriptor per vCPU (Linux: pi_desc in struct vcpu_vmx)
            for vcpu in vm.apic_ids:
                vm.pids[vcpu] = PID_BASE + (index * 64 + vcpu) * 64
                await reg("pid.set", {"pda": vm.pids[vcpu], "vm": name, "vcpu": vcpu})
            self.log.append(f"kvm {name}: posted interrupts, descriptors "
                            + ", ".join(f"vCPU{c} 0x{p:x}" for c, p in vm.pids.items()))
        else:
            self.log.append(f"kvm {name}: interrupts injected by the host"
                            + (" (posted interrupts available; the topology asked for injection)"
                               if self.posted else ""))
        await reg("mem.map", {"owner": name, "hpa": vm.hpa, "size": vm.mem_size, "local": 0})
        await reg("iommu.domain", {"domain": vm.domain, "op": "create"})
        await reg("iommu.map", {"domain": vm.domain, "iova": 0, "hpa": vm.hpa, "size": vm.mem_size,
                                "read": True, "write": True})
        slot = FIRST_GUEST_SLOT
        for rid in spec.get("assign_rids", []):
            dev = self.kernel.pci.devices.get(rid)
            if dev is None:
                raise RuntimeError(f"{name}: assigned function {rid_str(rid)} was not found by enumeration")
            vf = await self._make_vf(dev, slot << 3)
            slot += 1
            vm.vfs[vf.guest_rid] = vf
            await reg("context.set", {"rid": rid, "mode": "domain", "domain": vm.domain})
            self.log.append(f"vfio-pci {rid_str(rid)}: assigned to {name} as {rid_str(vf.guest_rid)}")
        for rid, adi in spec.get("assign_adis", []):
            vadi = await self._make_adi(vm, rid, adi, slot << 3)
            slot += 1
            vm.vfs[vadi.guest_rid] = vadi
            self.log.append(f"vdcm {rid_str(rid)} ADI {adi}: PASID 0x{vadi.pasid:x}, assigned to {name} as "
                            f"{rid_str(vadi.guest_rid)}" + (" (IMS capability hidden: Intel's path)"
                                                            if vadi.mangle else ""))
        self.vms[name] = vm
        return vm

    async def _make_adi(self, vm: Vm, rid: int, adi: int, guest_rid: int) -> VirtualAdi:
        """Give ADI ``adi`` of the SIOV PF at ``rid`` to ``vm``: a PASID, DMA into the VM's domain."""
        pf = self.host.siov.pfs.get(rid)
        if pf is None or not 0 <= adi < pf.count:
            raise RuntimeError(f"{vm.name}: {rid_str(rid)} has no ADI {adi}")
        opts = self.host.siov_opts.get(rid, {})
        pasid = self.kernel.alloc_pasid()
        pf.enable_adi(adi, pasid)
        pf.owner[adi] = vm.name
        await self.host.hw.iommu_pasid(rid, pasid, vm.domain)
        raw = await self.kernel.hw.mmio_read(pf.portal(adi) + emul_siov.IMS_CAP, 4)
        slots = int.from_bytes(raw or b"\0\0\0\0", "little")
        vadi = VirtualAdi(rid, adi, guest_rid, pasid, pf.portal(adi), slots,
                          mangle=bool(opts.get("mangle")), emulate_ims=bool(opts.get("vmm_emulation", True)))
        vadi.tags_pasid = pf.pasid_interrupts
        return vadi

    async def _make_vf(self, dev: PciDev, guest_rid: int) -> VirtualFunction:
        bus = self.kernel.pci
        # the 64 config reads in flight at once (pipelined, a burst of CfgRd0s), not one by one
        dws = await asyncio.gather(*(bus.read32(dev.rid, reg) for reg in range(0, 256, 4)))
        config = bytearray(b"".join(v.to_bytes(4, "little") for v in dws))
        msix_pos = dev.caps[R.PCI_CAP_ID_MSIX]
        ctrl = await bus.read16(dev.rid, msix_pos + R.PCI_MSIX_FLAGS)
        bar = dev.bars[0]
        # the real function: memory decode and bus mastering on, MSI-X enabled with all
        # entries masked until the guest's table says otherwise
        await bus.enable_device(dev)
        return VirtualFunction(dev.rid, guest_rid, config, bar.size, bar.base, dev.vendor, dev.device,
                               msix_pos, (ctrl & R.PCI_MSIX_FLAGS_QSIZE) + 1)

    # ------------------------------------------------------------------
    # VM exits

    def on_exit(self, msg: list) -> None:
        _, vm_name, seq, reason, args = msg
        vm = self.vms.get(vm_name)
        if vm is None or vm.state == "dead":
            return          # (a VM exit that was on its way when the VM died: nobody to resume)
        vm.exits[reason] = vm.exits.get(reason, 0) + 1
        if self.host.tracer.on:
            detail = {"nr": args.get("nr")} if reason == "hypercall" and isinstance(args, dict) else {}
            self.host.tracer.instant(f"VM exit {vm_name}: {reason}", "vmexit", seq=seq, **detail)
        handler = self._exits.get(reason)
        if handler is None:
            vm.refuse(f"unknown VM exit reason {reason!r}")
            self._resume(vm, seq, False, f"unknown exit reason {reason!r}")
            return
        asyncio.get_running_loop().create_task(self._serve(vm, seq, reason, handler, args))

    async def _serve(self, vm: Vm, seq: int, reason: str, handler, args) -> None:
        try:
            result = await handler(self, vm, args if isinstance(args, dict) else {})
        except (KeyError, TypeError, ValueError, TlpError, IrqError) as exc:
            vm.refuse(f"{reason}: {type(exc).__name__}: {exc}")
            self._resume(vm, seq, False, f"{reason}: bad arguments")
            return
        self._resume(vm, seq, True, result)

    def _resume(self, vm: Vm, seq: int, ok: bool, result: Any) -> None:
        if seq:
            self.port.send(wire.vmentry(vm.name, seq, ok, result))

    async def exit_cpuid(self, vm: Vm, a: dict) -> list[int]:
        leaf, sub = int(a["leaf"]) & 0xFFFF_FFFF, int(a.get("subleaf", 0)) & 0xFFFF_FFFF
        return list(vm_cpuid(vm.profile, leaf, sub))

    async def exit_cfg(self, vm: Vm, a: dict) -> int | None:
        rid, reg = int(a["rid"]), int(a["reg"])
        vf = vm.vfs.get(rid)
        if not 0 <= reg < 4096:
            raise ValueError(f"config register 0x{reg:x}")
        if "value" not in a:
            return 0xFFFF_FFFF if vf is None else vf.cfg_read(reg)
        if vf is None:
            return None
        for action in vf.cfg_write(reg, int(a["value"]) & 0xFFFF_FFFF, int(a.get("be", 0xF)) & 0xF):
            await self._act(vm, vf, action)
        return None

    async def exit_mmio(self, vm: Vm, a: dict) -> dict | None:
        """A guest access to a trapped page (the fabric forwards the TLP, already stamped)."""
        tlp = Tlp.unpack(a["tlp"])
        gpa = tlp.byte_address()
        vf = next((v for v in vm.vfs.values() if v.bar0_gpa and v.bar0_gpa <= gpa < v.bar0_gpa + _bar0_size(v)),
                  None)
        if tlp.type in (TlpType.MEM_WRITE, TlpType.MEM_WRITE_64):
            if vf is not None:
                for action in vf.mmio_write(gpa - vf.bar0_gpa, tlp.payload_bytes()):
                    await self._act(vm, vf, action)
            return None
        nbytes = tlp.length * 4
        if vf is None:
            cpl = Tlp.completion(tlp, 0, CplStatus.UR)
        else:
            data = vf.mmio_read((gpa - vf.bar0_gpa) & ~3, nbytes)
            cpl = Tlp.completion(tlp, 0, CplStatus.SC, data)
        self.port.send(wire.tlp(cpl.pack()))
        return None

    async def exit_ept_violation(self, vm: Vm, a: dict) -> None:
        vm.refuse(f"EPT violation: {'write' if a.get('write') else 'read'} at GPA 0x{int(a.get('gpa', 0)):x}")

    async def exit_hypercall(self, vm: Vm, a: dict) -> dict:
        parsed = hc.parse_request(a)
        if parsed is None:
            vm.refuse("malformed hypercall")
            return hc.reply(-hc.KVM_EINVAL)
        nr, args = parsed
        name = hc.NAMES.get(nr, f"nr{nr}")
        vm.hypercalls[name] = vm.hypercalls.get(name, 0) + 1
        if nr == hc.HC_QUERY_FEATURES:
            feats = hc.FEAT_MSI_COMPOSE if vm.profile == "kvm" else 0
            return hc.reply(0, hc.HYPERCALL_ABI_VERSION, feats)
        if vm.profile != "kvm":
            vm.refuse(f"hypercall {name} from a VM whose CPUID does not offer it")
            return hc.reply(-hc.KVM_ENOSYS)
        if nr == hc.HC_MSI_COMPOSE:
            return await self._compose(vm, args)
        if nr == hc.HC_MSI_FREE:
            return self._free(vm, args)
        vm.refuse(f"unknown hypercall {nr}")
        return hc.reply(-hc.KVM_ENOSYS)

    _exits = {"cpuid": exit_cpuid, "cfg": exit_cfg, "mmio": exit_mmio,
              "ept_violation": exit_ept_violation, "hypercall": exit_hypercall}

    # ------------------------------------------------------------------
    # the compose hypercall: a real remappable message bound to the VF's RID

    async def _compose(self, vm: Vm, args: list[int]) -> dict:
        if len(args) < 3:
            return hc.reply(-hc.KVM_EINVAL)
        dev, vector, dest = args[0], args[1], args[2]
        cookie = args[3] if len(args) > 3 else 0
        vf = vm.vfs.get(dev)
        if vf is None:
            vm.refuse(f"compose for {rid_str(dev & 0xFFFF)}, which is not assigned to {vm.name}")
            return hc.reply(-hc.KVM_EPERM)
        if not hc.FIRST_VECTOR <= vector <= hc.LAST_VECTOR:
            vm.refuse(f"compose with vector 0x{vector & 0xFFFFFFFF:x}")
            return hc.reply(-hc.KVM_EINVAL)
        if dest not in vm.apic_ids:
            vm.refuse(f"compose for vCPU APIC ID {dest}, not one of {vm.apic_ids}")
            return hc.reply(-hc.KVM_EINVAL)
        if len(vm.composes) >= COMPOSE_QUOTA:
            vm.refuse("compose quota exhausted")
            return hc.reply(-hc.KVM_ENOSPC)
        ir = self.kernel.ir
        if ir is None:
            return hc.reply(-hc.KVM_EOPNOTSUPP)   # without IR nothing would check the source
        memory = bool(cookie & hc.COOKIE_MEMORY)
        fake = False
        extra = {"sid": getattr(vf, "host_rid", None) or getattr(vf, "pf_rid", 0)}
        owner = extra["sid"]
        if isinstance(vf, VirtualAdi):
            owner = adi_origin(vf.pf_rid, vf.adi)
            plat = self.host.platform
            if memory:
                why = self._memory_ims_refusal(vf)
                if why:
                    vm.refuse(f"compose for {rid_str(dev)} memory IMS: {why}")
                    return hc.reply(-hc.KVM_EOPNOTSUPP)
                # only now may the ADI send messages fetched from the guest's memory
                self.host.siov.pfs[vf.pf_rid].set_mem_ims(vf.adi, True)
            if not memory:
                if not vf.emulate_ims or vf.mangle:
                    vm.refuse(f"compose for {rid_str(dev)} device IMS: the VMM has no IMS emulation "
                              f"for device 1b36:11a2")
                    return hc.reply(-hc.KVM_EOPNOTSUPP)
                fake = True
            if memory and vf.tags_pasid and plat.get("pasid_ir"):
                # case 3: the IRTE accepts only this ADI's PASID.  (Device-kind slots are
                # trapped and written by the VMM untagged: the source-id is check enough.)
                extra["pasid"] = vf.pasid
        try:
            virq = irq_domain_alloc_irqs(ir, 1, IrqAllocInfo(extra=extra))
        except IrqError:
            return hc.reply(-hc.KVM_ENOSPC)
        handle = next(vm.handles)
        self.kernel.irq_owner[virq] = owner
        self.kernel.irq.request_irq(virq, self._compose_handler(vm, handle), f"vfio-ims:{vm.name}")
        msg = irq_chip_compose_msi_msg(self.kernel.irq.irq_get_irq_data(virq))
        real = (msg.address_lo, msg.address_hi, msg.data)
        vm.composes[handle] = Compose(handle, vf, virq, dest, vector, "fake" if fake else "remapped", real)
        if dest in vm.pids:
            # posted: the IR unit sets the guest vector in the vCPU's descriptor itself
            self._set_posted(virq, (vm.pids[dest], vector))
        lo, hi, data = fake_pair(handle) if fake else real
        return hc.reply(0, lo, hi, data, handle)

    def _memory_ims_refusal(self, vadi: VirtualAdi) -> str:
        """Why a message stored in guest memory would be unsafe or useless here ('' if fine).

        Nobody can trap a store into guest RAM, so the IR unit must be able to tell this
        ADI's interrupts from every other ADI's on the same RID: the device has to tag them
        with the PASID, the root complex has to accept such tags, and IRTEs have to check them.
        """
        plat = self.host.platform
        if vadi.tags_pasid and not plat.get("pasid_interrupts", True):
            return "this platform cannot receive PASID-tagged interrupts (case 3 impossible)"
        if self.host.cfg.get("vmm_unsafe_ims"):
            return ""   # the naive VMM of row 4-unsafe
        if not vadi.tags_pasid:
            return ("the device does not tag interrupt messages with the ADI's PASID: a message in "
                    "guest memory could name any IRTE of its RID")
        if not plat.get("pasid_ir"):
            return "the platform's IRTEs cannot check PASIDs"
        return ""

    def _free(self, vm: Vm, args: list[int]) -> dict:
        if len(args) < 2:
            return hc.reply(-hc.KVM_EINVAL)
        c = vm.composes.get(args[1])
        if c is None or c.vf.guest_rid != args[0]:
            vm.refuse(f"free of handle {args[1]} it does not own")
            return hc.reply(-hc.KVM_EPERM)
        del vm.composes[c.handle]
        if c.kind == "fake":        # case 4: no real slot may keep the pair of a freed IRTE
            emul_siov.retire_handle(self, c.vf, c.handle)
        self.kernel.irq.free_irq(c.virq)
        irq_domain_free_irqs(self.kernel.ir, c.virq, 1)
        self.kernel.irq_owner.pop(c.virq, None)
        return hc.reply(0)

    def _compose_handler(self, vm: Vm, handle: int):
        def handler(irq: int, cpu: int) -> None:
            c = vm.composes.get(handle)
            if c is not None:
                self._inject(vm, c.apic, c.vector, self.kernel.cur_origin, self.kernel.cur_t_ns)
        return handler

    # ------------------------------------------------------------------
    # actions from the vfio model

    async def _act(self, vm: Vm, vf, action: tuple) -> None:
        if isinstance(vf, VirtualAdi):
            await self._act_adi(vm, vf, action)
            return
        await self._act_vf(vm, vf, action)
        if vm.pids:
            self._sync_posted(vm, vf)

    def _posted_target(self, virq: int) -> tuple[int, int] | None:
        """(descriptor, guest vector) this host irq's IRTE is posted to now; None when it is
        remapped, or the irq is not allocated.  The IR level's own record (``IrteRef.posted``)
        is the truth: an irq freed and allocated again starts remapped, whatever it was."""
        data = self.kernel.irq.irq_get_irq_data(virq)
        for level in data.levels() if data is not None else ():
            if isinstance(level.chip_data, IrteRef):
                return level.chip_data.posted
        return None

    def _set_posted(self, virq: int, target: tuple[int, int] | None) -> None:
        """Post this host interrupt to (descriptor, guest vector), or back to remapped (None)."""
        if self._posted_target(virq) == target:
            return
        self.kernel.irq.irq_set_vcpu_affinity(virq, None if target is None else
                                              {"pda": target[0], "vector": target[1]})

    def _sync_posted(self, vm: Vm, vf: VirtualFunction) -> None:
        """vfio + posted interrupts: an entry the guest made deliverable is posted straight to its
        vCPU; a masked or disabled one goes back to remapped, so the host sees it and keeps it
        pending (the guest's mask is honoured)."""
        for virq, (owner, dev, idx) in self.by_irq.items():
            if dev is not vf:
                continue
            target = vf.deliverable(idx)
            pda = vm.pids.get(target[0]) if target else None
            self._set_posted(virq, (pda, target[1]) if pda is not None else None)

    def posted_irtes(self, vm: Vm) -> int:
        """How many host IRTEs are in posted format into this VM's descriptors now."""
        pdas = set(vm.pids.values())
        virqs = [v for v, (owner, _, _) in self.by_irq.items() if owner is vm]
        virqs += [c.virq for c in vm.composes.values()]
        return sum(1 for v in virqs if (self._posted_target(v) or (None,))[0] in pdas)

    async def _act_vf(self, vm: Vm, vf, action: tuple) -> None:
        kind = action[0]
        if kind == "bar0":
            _, old, new = action
            if old:
                await self.port.reg("ept.unmap", {"vm": vm.name, "gpa": old, "size": vf.bar0_size})
            if new:
                await self.port.reg("ept.map", {"vm": vm.name, "gpa": new, "size": 2 * PAGE, "kind": "mmio",
                                                "hpa": vf.bar0_hpa})
                await self.port.reg("ept.map", {"vm": vm.name, "gpa": new + 2 * PAGE,
                                                "size": vf.bar0_size - 2 * PAGE, "kind": "trap"})
        elif kind == "msix_ctrl":
            _, enable, _maskall = action
            dev = self.kernel.pci.devices[vf.host_rid]
            if enable and not dev.msix_enabled:
                irqs = await self.kernel.alloc_msix(dev, vf.msix_size)
                for idx, virq in enumerate(irqs):
                    self.by_irq[virq] = (vm, vf, idx)
                    self.kernel.irq.request_irq(virq, self._msix_handler, f"vfio-msix[{idx}]({rid_str(vf.host_rid)})")
        elif kind == "fire":
            _, idx, origin, t_ns = action
            target = vf.deliverable(idx)
            if target is not None:
                self._inject(vm, *target, origin, t_ns)

    async def _act_adi(self, vm: Vm, vadi: VirtualAdi, action: tuple) -> None:
        kind = action[0]
        reg = self.port.reg
        if kind == "bar0":
            _, old, new = action
            if old:
                await reg("ept.unmap", {"vm": vm.name, "gpa": old, "size": ADI_BAR0_SIZE})
            if new:
                # page 0: the ADI's portal, pass-through; page 1: its IMS slots, trapped when the
                # VMM emulates IMS, else not mapped; pages 2-3: the emulated MSI-X (mangle)
                await reg("ept.map", {"vm": vm.name, "gpa": new, "size": PAGE, "kind": "mmio",
                                      "hpa": vadi.portal_hpa})
                if vadi.ims_page_kind == "trap":
                    await reg("ept.map", {"vm": vm.name, "gpa": new + PAGE, "size": PAGE, "kind": "trap"})
                if vadi.mangle:
                    await reg("ept.map", {"vm": vm.name, "gpa": new + 2 * PAGE, "size": 2 * PAGE, "kind": "trap"})
        elif kind == "ims_slot":
            emul_siov.translate_slot(self, vm, vadi, action[1])
        elif kind in ("msix_ctrl", "entry"):
            emul_siov.mangle_update(self, vm, vadi)
        elif kind == "fire":
            _, idx, origin, t_ns = action
            target = vadi.deliverable(idx)
            if target is not None:
                self._inject(vm, *target, origin, t_ns)

    def _msix_handler(self, irq: int, cpu: int) -> None:
        entry = self.by_irq.get(irq)
        if entry is not None:
            vm, vf, idx = entry
            self._forward(vm, vf, idx)

    def _forward(self, vm: Vm, vf: VirtualFunction, idx: int) -> None:
        k = self.kernel
        target = vf.deliverable(idx)
        if target is None:
            # Masked in the guest's virtual table: pending until unmasked (one per entry).
            vf.pending.setdefault(idx, (k.cur_origin, k.cur_t_ns))
            vm.pending_forward += 1
            return
        self._inject(vm, *target, k.cur_origin, k.cur_t_ns)

    def _inject(self, vm: Vm, apic: int, vector: int, origin: int | None, t_ns: int) -> None:
        vm.injected += 1
        tr = self.host.tracer
        if tr.on:
            tr.rec("t", "inject", "irq", flow_id(origin, t_ns), _TK_INJECT, vm.name, apic, vector)
        self.port.send(wire.inject(vm.name, apic, vector, origin, t_ns))

    async def set_vcpu_running(self, name: Any, vcpu: Any, running: bool) -> dict:
        """Schedule / deschedule vCPU ``vcpu`` of VM ``name`` (None: all of them): its descriptor's
        SN bit.  While SN is set the IR unit still sets PIR bits but notifies nobody; clearing
        it delivers what accumulated (KVM's vmx_vcpu_pi_put / vmx_vcpu_pi_load).  ValueError,
        one line, for a VM that does not exist, is dead, or is not posted."""
        vm = self.vms.get(name) if isinstance(name, str) else None
        if vm is None:
            raise ValueError(f"no VM named {name!r} (VMs: {', '.join(sorted(self.vms)) or 'none'})")
        if vm.state == "dead":
            raise ValueError(f"{vm.name} is dead")
        if not vm.pids:
            raise ValueError(f"{vm.name} uses injection delivery: only a VM with posted interrupts has "
                             f"descriptors whose SN bit (de)scheduling a vCPU sets")
        if vcpu is None:
            vcpus = list(vm.pids)
        elif type(vcpu) is int and vcpu in vm.pids:
            vcpus = [vcpu]
        else:
            raise ValueError(f"{vm.name} has no vCPU {vcpu!r} (vCPUs 0..{vm.vcpus - 1})")
        out = {}
        for c in vcpus:
            out[str(c)] = await self.port.reg("pid.sn", {"pda": vm.pids[c], "on": not running})
            if running:
                vm.descheduled.discard(c)
            else:
                vm.descheduled.add(c)
        self.kernel.log.append(f"kvm {vm.name}: vCPU {', '.join(map(str, vcpus))} "
                        + ("scheduled (SN clear)" if running else "descheduled (SN set)"))
        return {"vm": vm.name, "running": running, "vcpus": out}

    # ------------------------------------------------------------------
    # a VM died: take back everything it had

    async def destroy_vm(self, name: str) -> dict:
        """The VM's process is gone (SIGKILL, crash): free its IRTEs, PASIDs, EPT, IOMMU domain and
        RAM window, reset its VFs (FLR clears their MSI-X tables) and ADIs.  Other VMs are not
        touched.  Idempotent."""
        vm = self.vms.get(name)
        if vm is None or vm.state == "dead":
            return {"known": vm is not None}
        vm.state = "dead"
        k = self.kernel
        reg = self.port.reg
        out = {"irtes": 0, "vfs_reset": [], "adis_reset": [], "pasids": []}
        from guest.drivers.siov import ADI_TABLE
        # First silence every source at the device (ADI reset, VF FLR), each followed by a
        # non-posted access to that device: its completion comes back behind every interrupt
        # the function sent before (one link, in order), so none of them is still on its way
        # when the IRTEs and host vectors are freed below (Linux frees an IRQ after
        # synchronize_irq for the same reason: a message landing on a freed vector reaches a
        # vector its emitter does not own).
        for dev in list(vm.vfs.values()):
            if isinstance(dev, VirtualAdi):
                pf = self.host.siov.pfs.get(dev.pf_rid)
                if pf is not None:
                    pf.reset_adi(dev.adi)
                    pf.owner[dev.adi] = "free"
                    await k.hw.mmio_read(pf.bar0 + ADI_TABLE + 8 * dev.adi, 4)
                await self.host.hw.iommu_pasid(dev.pf_rid, dev.pasid, None)
                out["adis_reset"].append(_phys(dev))
                out["pasids"].append(dev.pasid)
            else:
                phys = k.pci.devices.get(dev.host_rid)
                if phys is not None and dev.host_rid not in k.removed:
                    await k.pci.function_reset(phys)        # config writes are non-posted
                out["vfs_reset"].append(rid_str(dev.host_rid))
        for c in list(vm.composes.values()):
            self._release(c.virq)
            out["irtes"] += 1
        vm.composes.clear()
        for virq in [v for v, (owner, _, _) in self.by_irq.items() if owner is vm]:
            del self.by_irq[virq]
            k.irq.free_irq(virq)
        for dev in vm.vfs.values():
            if isinstance(dev, VirtualAdi):
                backing = getattr(dev, "backing_virq", None)
                if backing is not None:
                    self._release(backing)
                    out["irtes"] += 1
                continue
            phys = k.pci.devices.get(dev.host_rid)
            if phys is not None and dev.host_rid not in k.removed and phys.msix_enabled:
                out["irtes"] += len(phys.msi_irqs)
                await pci_free_irq_vectors(k.pci, phys)
            await reg("context.set", {"rid": dev.host_rid, "mode": "block"})
        for pda in vm.pids.values():
            await reg("pid.clear", {"pda": pda})
        # the fabric's answers: True if it had this VM's EPT and dropped it; destroying a domain
        # that does not exist is an error (so a reply at all means it was there and is gone)
        out["ept"] = bool(await reg("ept.destroy", {"vm": name}))
        await reg("iommu.domain", {"domain": vm.domain, "op": "destroy"})
        out["iommu_domain"] = vm.domain
        await reg("mem.unmap", {"owner": name})
        out["ram_window"] = [vm.hpa, vm.mem_size]
        vm.reclaimed = out
        self.log.append(f"vm {name}: died; reclaimed {out['irtes']} IRTEs, PASIDs {out['pasids']}, "
                        f"reset {out['vfs_reset'] + out['adis_reset']}")
        return out

    def _release(self, virq: int) -> None:
        k = self.kernel
        k.irq.free_irq(virq)
        irq_domain_free_irqs(k.ir, virq, 1)
        k.irq_owner.pop(virq, None)

    async def device_removed(self, buses: list[int]) -> dict:
        """Surprise removal of the device behind ``buses``: every VM using one of its functions
        is told (its driver gets a clear error), and the host stops forwarding for them."""
        told = []
        for vm in self.vms.values():
            if vm.state == "dead":
                continue
            for guest_rid, dev in vm.vfs.items():
                rid = dev.pf_rid if isinstance(dev, VirtualAdi) else dev.host_rid
                if rid >> 8 not in buses:
                    continue
                for c in [c for c in vm.composes.values() if c.vf is dev]:
                    self._release(c.virq)
                    del vm.composes[c.handle]
                for virq in [v for v, (o, d, _) in self.by_irq.items() if d is dev]:
                    del self.by_irq[virq]
                    self.kernel.irq.free_irq(virq)
                # an unsolicited VM entry: the hot-unplug notification of the virtual bus
                self.port.send(wire.vmentry(vm.name, 0, True, {"event": "surprise-removal", "rid": guest_rid}))
                told.append(f"{vm.name}:{rid_str(guest_rid)}")
        return {"told": told}

    # ------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {vm.name: {"state": vm.state, "delivery": vm.delivery,
                          "posted_descriptors": {str(c): f"0x{p:x}" for c, p in vm.pids.items()},
                          "posted_irtes": self.posted_irtes(vm), "descheduled": sorted(vm.descheduled),
                          "reclaimed": vm.reclaimed, "exits": vm.exits, "hypercalls": vm.hypercalls, "injected": vm.injected,
                          "pending_forward": vm.pending_forward, "composes": len(vm.composes),
                          "refused": vm.refused[-20:], "refused_total": vm.refused_total,
                          "assigned": {rid_str(g): _phys(v) for g, v in vm.vfs.items()},
                          "pasids": {rid_str(g): v.pasid for g, v in vm.vfs.items() if isinstance(v, VirtualAdi)},
                          "irte_bindings": [{"handle": c.handle, "dev": rid_str(c.vf.guest_rid), "kind": c.kind,
                                             "irte": c.real[0] >> 5 & 0x7FFF if c.real else None,
                                             "pasid": (c.vf.pasid if isinstance(c.vf, VirtualAdi) and
                                                       c.vf.tags_pasid and self.host.platform.get("pasid_ir")
                                                       else None),
                                             "vector": c.vector, "vcpu": c.apic}
                                            for c in vm.composes.values()],
                          "paths": {rid_str(g): _path(v, vm) for g, v in vm.vfs.items()}}
                for vm in self.vms.values()}


def _path(v, vm: Vm) -> dict:
    """How this assigned device's interrupts are virtualised, and the device-specific VMM code
    that path needs (DESIGN.md §5: "per-device VMM code counted")."""
    if isinstance(v, VirtualFunction):
        return {"path": "vfio-pci MSI-X emulation (generic PCI)", "device_specific_lines": 0}
    if v.mangle:
        key = "mangle (capability hidden, MSI-X emulated on IMS)"
        return {"path": key, "device_specific_lines": emul_siov.DEVICE_SPECIFIC_LINES[key]}
    kinds = {c.kind for c in vm.composes.values() if c.vf is v}
    if "fake" in kinds:
        key = "case 4 (IMS emulation)"
        return {"path": key, "device_specific_lines": emul_siov.DEVICE_SPECIFIC_LINES[key]}
    if kinds:
        return {"path": "HCALL compose (generic hypercall)", "device_specific_lines": 0}
    return {"path": "none", "device_specific_lines": 0}


def _bar0_size(v) -> int:
    return ADI_BAR0_SIZE if isinstance(v, VirtualAdi) else v.bar0_size


def _phys(v) -> str:
    if isinstance(v, VirtualAdi):
        return describe(adi_origin(v.pf_rid, v.adi))
    return rid_str(v.host_rid)

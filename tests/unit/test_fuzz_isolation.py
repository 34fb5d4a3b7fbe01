"""Property-based isolation fuzzing (DESIGN.md §5-6): hostile owners against the real models.

The invariant: **in every secure configuration no interrupt reaches a vector its sender does not
own; nothing raises; state stays consistent.**  Four state machines drive the real code:

1. ``IsolationMachine``: the host's bare-metal kernel (real ``guest.kernel.Kernel`` with its
   ``INTEL-IR`` domain) writing IRTEs into a real ``fabric.ir.InterruptRemapper``, and the real
   ``host.vmm.Vmm`` serving hypercalls (``exit_hypercall`` -> ``_compose`` / ``_free``),
   trapped device-IMS stores (``host.vdev.VirtualAdi`` -> ``host.emul_siov.translate_slot``)
   and VM deaths (``destroy_vm``).  Owners: the host and three guests, each with a VF (its own
   RID) and ADIs (the shared PF RID, distinct PASIDs).  Attackers make their devices emit
   whatever their untrapped storage can hold (a VF's passed-through IMS slot, with any PASID;
   an ADI's memory-IMS slot, tagged as the hardware tags it), and whatever the VMM wrote into
   their trapped slots.  Every ``Remapped``/``Posted`` result's IRTE must belong to the
   emitter's owner (posted: into one of its own vCPUs' descriptors); every legitimately composed
   message must be delivered to its own IRTE; the IRT holds exactly the entries someone owns.
   Targeted tests beside it: ``find`` proves the row 4-unsafe breach exists; row 3 blocks every
   forgery (the regression test of e836591's fix: RID-only IRTEs refuse PASID-tagged requests).
2. ``IommuMachine``: ``fabric.iommu.Iommu`` against a reference model; each guest's domain maps
   only its own RAM window; a ``Translation`` always lands in the requester's guest.
3. ``VfioMachine`` / ``VdevMachine``: hostile cfg and trapped-MMIO writes to a VirtualFunction
   and to VirtualAdis (case 4 and Intel's mangle path) with the real VMM behind them.

Holes this file found, now fixed, each with a regression test below:

- ``memory-ims-bypass``: an ADI's portal is passed through, so its guest could select IRQ_MODE 2
  (memory IMS) on its own and store a forged handle in its RAM whatever the VMM refused.  The
  device now honours memory IMS only with ADI_CTRL.MIE, which the host's PF driver sets when
  the VMM approves a memory-IMS compose (``Vmm._memory_ims_refusal`` empty).
- ``stale-device-slot``: HC_MSI_FREE of a case-4 (fake) compose freed the IRTE but left the real
  device-IMS slot holding the real pair, unmasked; when the IRTE was reused (another VM, the
  host) the old ADI's doorbell reached it.  ``emul_siov.retire_handle`` masks and clears it.
"""

from __future__ import annotations

import itertools
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, event, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fabric import hypercall as hc
from fabric.dmar import FaultReason
from fabric.iommu import (FR_PASID_DIR_ENTRY_P, FR_PASID_ENTRY_P, FR_SM_TTM0_PASID, PAGE_SIZE, DmaFault,
                          Iommu, MemoryMap, Translation, Unclaimed)
from fabric.ir import (SVT_SID, InterruptRemapper, IrFault, Posted, Remapped, compose_compat, compose_remappable,
                       decode_remappable)
from fabric.provenance import adi_origin
from guest.cpuid import bare_metal_cpuid
from guest.irq.domain import IrqAllocInfo, IrqError, irq_chip_compose_msi_msg, irq_domain_alloc_irqs, \
    irq_domain_free_irqs
from guest.kernel import Kernel
from guest.pci import regs as R
from host.vdev import BAR0_SIZE as ADI_BAR0_SIZE
from host.vdev import IMS_PAGE, MSIX_TABLE as ADI_MSIX_TABLE, VirtualAdi
from host.vfio import MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, VirtualFunction
from host.vmm import COMPOSE_QUOTA, PID_BASE, Vm, Vmm, fake_pair

IRT = 128                       # IRT entries (small: guessed handles hit live entries often)
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
SRIOV_PF, HOST_VF = 0x0100, 0x0104
GUEST_VFS = {"g1": 0x0101, "g2": 0x0102, "g3": 0x0103}
SIOV_PF, SIOV_PF2 = 0x0200, 0x0300
#: ADIs: (pf, index, owner).  The host keeps ADI 3 of SIOV_PF (its own case-1 IMS).
ADIS = [(SIOV_PF, 0, "g1"), (SIOV_PF, 1, "g2"), (SIOV_PF, 2, "g3"), (SIOV_PF2, 0, "g1")]
HOST_ADI_PASID = 0x40
GUEST_DEV_SLOTS = 2             # device-IMS slots per ADI (IMS_CAP)


def run(coro):
    """Drive a VMM coroutine that never really suspends (every await is on a fake that returns)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine suspended: a fake awaited something real")


def irte_index(msg: tuple[int, int, int]) -> int:
    lo, _, data = msg
    return decode_remappable(lo, data).index


def portal(pf: int, adi: int) -> int:
    return 0xE000_0000 + (pf >> 8 << 20) + adi * 0x2000


def vf_config(msix_size: int, msix_pos: int = 0x70) -> bytearray:
    """256 bytes of a real VF's config space as vfio reads it at assignment (host/vfio.py)."""
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, R.PCI_VENDOR_ID, 0xFFFF, 0xFFFF)
    struct.pack_into("<HH", cfg, R.PCI_COMMAND, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER,
                     R.PCI_STATUS_CAP_LIST)
    struct.pack_into("<I", cfg, R.PCI_BASE_ADDRESS_0, 0xF000_0000 | R.PCI_BASE_ADDRESS_MEM_TYPE_64)
    struct.pack_into("<I", cfg, R.PCI_BASE_ADDRESS_0 + 4, 0x1)
    struct.pack_into("<I", cfg, R.PCI_BASE_ADDRESS_0 + 8, 0xDEAD_BEE0)
    cfg[R.PCI_CAPABILITY_LIST] = msix_pos
    struct.pack_into("<BBHII", cfg, msix_pos, R.PCI_CAP_ID_MSIX, 0,
                     (msix_size - 1) | R.PCI_MSIX_FLAGS_ENABLE, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)
    return cfg


# =============================================================================================
# An in-memory host: the real kernel IR domain + real VMM over a real IR unit, fake I/O


class RecordingHw:
    """The host kernel's hardware: IRTE writes go to the IR unit; MMIO to devices is recorded."""

    def __init__(self, ir: InterruptRemapper) -> None:
        self.ir = ir
        self.mem: dict[int, int] = {}          # device register bytes by host-physical address
        self.writes: list[tuple[int, bytes]] = []
        self.pasid_log: list[tuple[int, int, object]] = []

    def irte_write(self, index: int, raw: int, pasid: int | None = None) -> None:
        self.ir.write_irte(index, raw, pasid=pasid)

    def irte_clear(self, index: int) -> None:
        self.ir.clear_irte(index)

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, bytes(data)))
        for i, b in enumerate(data):
            self.mem[addr + i] = b

    async def mmio_read(self, addr: int, size: int) -> bytes:
        """A non-posted read (destroy_vm flushes each reset device's interrupts with one)."""
        return bytes(self.mem.get(addr + i, 0) for i in range(size))

    async def iommu_pasid(self, rid: int, pasid: int, domain) -> None:
        """``host.hw.iommu_pasid`` (destroy_vm clears the dead VM's PASID entries)."""
        self.pasid_log.append((rid, pasid, domain))

    def dwords(self, addr: int, n: int) -> tuple[int, ...]:
        raw = bytes(self.mem.get(addr + i, 0) for i in range(4 * n))
        return struct.unpack(f"<{n}I", raw)


class FakePort:
    """What the VMM says to the fabric (register programming, VM entries): recorded only."""

    def __init__(self) -> None:
        self.regs: list[tuple[str, dict]] = []
        self.sent: list[bytes] = []

    async def reg(self, op: str, args: dict | None = None, timeout: float = 10.0):
        self.regs.append((op, dict(args or {})))

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)


class FakeSiovPf:
    """The host's SIOV PF driver as the VMM sees it: resetting an ADI clears its device IMS and
    its ADI_CTRL (memory-IMS enable included); ``set_mem_ims`` sets ADI_CTRL.MIE."""

    def __init__(self, lab: "Lab", rid: int) -> None:
        self.lab, self.rid, self.owner = lab, rid, {}
        self.mem_ims: dict[int, bool] = {}
        self.bar0 = 0xD000_0000 + (rid << 12)     # the ADI table's BAR (read back after a reset)

    def set_mem_ims(self, adi: int, on: bool) -> None:
        self.mem_ims[adi] = on

    def reset_adi(self, adi: int) -> None:
        self.mem_ims[adi] = False
        base = portal(self.rid, adi) + IMS_PAGE
        for s in range(GUEST_DEV_SLOTS):     # reset: every slot zero and masked
            for i in range(16):
                self.lab.hw.mem[base + 16 * s + i] = int(i == 0xC)


class Lab:
    """The host (a real bare-metal Kernel with INTEL-IR, a real Vmm) and its guests, in memory.

    ``tags``: the SIOV device tags interrupt MWrs with the ADI's PASID; ``pasid_ir``: IRTEs can
    check PASIDs; ``rc_tags``: the root complex accepts tagged interrupt requests; ``unsafe``: the
    naive VMM of row 4-unsafe (``vmm_unsafe_ims``); ``posted``: posted interrupts.  Each guest
    has a VF (its own RID) at 00:03.0 and its ADIs (``adis``) from 00:04.0 on."""

    def __init__(self, *, tags: bool, pasid_ir: bool, rc_tags: bool = True, unsafe: bool = False,
                 posted: bool = False, guests: tuple[str, ...] = ("g1", "g2", "g3"), adis=ADIS,
                 emulate: bool = True) -> None:
        self.ir = InterruptRemapper(entries=IRT, enabled=True, pasid_check=pasid_ir)
        self.hw = RecordingHw(self.ir)
        self.kernel = Kernel("host", [0, 1], 4096, self.hw, bare_metal_cpuid, ir_entries=IRT)
        self.kernel.boot()
        assert self.kernel.ir is not None, "the host kernel must build INTEL-IR"
        self.kernel.pasid_ir = pasid_ir
        self.platform = {"pasid_ir": pasid_ir, "pasid_interrupts": rc_tags, "posted": posted}
        self.cfg = {"vmm_unsafe_ims": unsafe}
        self.tags = tags
        self.port = FakePort()
        self.tracer = SimpleNamespace(on=False)
        self.siov = SimpleNamespace(pfs={SIOV_PF: FakeSiovPf(self, SIOV_PF), SIOV_PF2: FakeSiovPf(self, SIOV_PF2)})
        self.vmm = Vmm(self)
        for pf in self.siov.pfs.values():
            for adi in range(4):
                pf.reset_adi(adi)                              # power-on: every real slot masked
        # host-allocated IRTEs: virq -> owner ("host", or a guest for its VF's MSI-X forwarders)
        self.host_irqs: dict[int, str] = {}
        self.host_meta: dict[int, tuple[int, int | None, int | None]] = {}  # virq -> (sid, bind, tag)
        self.freed_fake: dict[tuple[str, int], set] = {}             # (vm, id(vadi)) -> real pairs
        self.next_pasid = itertools.count(0x11)
        for i, name in enumerate(guests):
            vm = Vm(name, i, 2, 1 << 24, "kvm", "modern", (1 << 40) + i * (1 << 36), i + 1)
            if self.vmm.posted:     # one posted-interrupt descriptor per vCPU, as Vmm.create_vm
                vm.pids = {vcpu: PID_BASE + (i * 64 + vcpu) * 64 for vcpu in vm.apic_ids}
            slot = 3
            vf = VirtualFunction(GUEST_VFS[name], slot << 3, vf_config(4), 0x4000, 0xF000_0000 + i * 0x10000,
                                 0x1B36, 0x11A1, 0x70, 4)
            vm.vfs[vf.guest_rid] = vf
            for pf, adi, owner in adis:
                if owner != name:
                    continue
                slot += 1
                vadi = VirtualAdi(pf, adi, slot << 3, next(self.next_pasid), portal(pf, adi), GUEST_DEV_SLOTS,
                                  emulate_ims=emulate)
                vadi.tags_pasid = tags
                self.siov.pfs[pf].owner[adi] = name
                vm.vfs[vadi.guest_rid] = vadi
            self.vmm.vms[name] = vm

    # --- views ------------------------------------------------------------------------------

    def live_vms(self) -> list[Vm]:
        return [vm for vm in self.vmm.vms.values() if vm.state != "dead"]

    def adis_of(self, vm: Vm) -> list[VirtualAdi]:
        return [d for d in vm.vfs.values() if isinstance(d, VirtualAdi)]

    def vf_of(self, vm: Vm) -> VirtualFunction:
        return next(d for d in vm.vfs.values() if isinstance(d, VirtualFunction))

    def virq_index(self, virq: int) -> int:
        msg = irq_chip_compose_msi_msg(self.kernel.irq.irq_get_irq_data(virq))
        return decode_remappable(msg.address_lo, msg.data).index

    def owners(self) -> dict[int, str]:
        """IRTE index -> who composed it (the model's ownership table)."""
        out: dict[int, str] = {}
        for vm in self.live_vms():
            for c in vm.composes.values():
                idx = irte_index(c.real)
                assert idx not in out, f"IRTE {idx} handed out twice ({out[idx]} and {vm.name})"
                out[idx] = vm.name
        for virq, owner in self.host_irqs.items():
            idx = self.virq_index(virq)
            assert idx not in out, f"IRTE {idx} handed out twice ({out[idx]} and {owner})"
            out[idx] = owner
        return out

    def mem_ims_enabled(self, vadi: VirtualAdi) -> bool:
        """ADI_CTRL.MIE: whether the device honours IRQ_MODE 2 (memory IMS) for this ADI."""
        return self.siov.pfs[vadi.pf_rid].mem_ims.get(vadi.adi, False)

    def real_slot(self, vadi: VirtualAdi, idx: int) -> tuple[int, int, int, int]:
        return self.hw.dwords(vadi.portal_hpa + IMS_PAGE + 16 * idx, 4)

    # --- the platform's answer to an interrupt MWr (fabric.bus._interrupt) --------------------

    def interrupt(self, sid: int, addr: int, data: int, pasid: int | None):
        if pasid is not None and not self.platform["pasid_interrupts"]:
            return "dropped by the root complex"
        return self.ir.remap(sid, addr & ~3 & U64, data & U32, pasid)

    # --- the guest side ----------------------------------------------------------------------

    def hypercall(self, vm: Vm, nr, args) -> dict:
        return run(self.vmm.exit_hypercall(vm, {"nr": nr, "a": args}))

    def compose(self, vm: Vm, dev: int, vector: int = 0x41, dest: int = 0, cookie: int = 0) -> dict:
        return self.hypercall(vm, hc.HC_MSI_COMPOSE, [dev, vector, dest, cookie])

    def store_device_slot(self, vm: Vm, vadi: VirtualAdi, idx: int, raw: bytes, off: int = 0) -> list:
        """A guest store into its ADI's trapped IMS page: the vdev model, then the VMM's dispatch
        (``Vmm._act`` -> ``emul_siov.translate_slot``).  Returns the VMM's writes to hardware."""
        mark = len(self.hw.writes)
        for action in vadi.mmio_write(IMS_PAGE + 16 * idx + off, raw):
            assert action[0] == "ims_slot" and 0 <= action[1] < len(vadi.slots), action
            if vadi.ims_page_kind == "trap":           # page 1 reaches the VMM only if trapped
                run(self.vmm._act(vm, vadi, action))
        return self.hw.writes[mark:]

    def free(self, vm: Vm, dev: int, handle: int) -> dict:
        c = vm.composes.get(handle)
        r = self.hypercall(vm, hc.HC_MSI_FREE, [dev, handle])
        if r["ret"] == 0 and c.kind == "fake":
            self.freed_fake.setdefault((vm.name, id(c.vf)), set()).add(c.real)
        return r

    # --- host-owned interrupts (the host's own drivers, and vfio's MSI-X forwarders) ----------

    def host_alloc(self, owner: str, sid: int, bind: int | None = None, emit_pasid: int | None = None):
        """Allocate and activate one host interrupt in INTEL-IR (as Kernel.alloc_msix/alloc_ims)."""
        extra = {"sid": sid}
        if bind is not None:
            extra["pasid"] = bind
        try:
            virq = irq_domain_alloc_irqs(self.kernel.ir, 1, IrqAllocInfo(extra=extra))
        except IrqError:
            return None
        self.kernel.irq.request_irq(virq, lambda irq, cpu: None, f"fuzz:{owner}")
        self.host_irqs[virq] = owner
        self.host_meta[virq] = (sid, bind, emit_pasid)
        return virq

    def host_free(self, virq: int) -> None:
        self.kernel.irq.free_irq(virq)
        irq_domain_free_irqs(self.kernel.ir, virq, 1)
        del self.host_irqs[virq], self.host_meta[virq]

    def boot_host_drivers(self) -> None:
        """What the host's own drivers hold at boot: PF MSI-X vectors, a host VF, its own ADI's
        device- and memory-kind IMS (memory IRTEs bound to the PASID as guest/drivers/siov.py)."""
        for sid in (SRIOV_PF, SIOV_PF, SIOV_PF2, HOST_VF):
            self.host_alloc("host", sid)
        self.host_alloc("host", SIOV_PF)                       # host ADI 3, device IMS: untagged
        self.host_adi_memory_ims()

    def host_adi_memory_ims(self) -> None:
        """The host's ADI with memory IMS, as guest/drivers/siov.py does it: a tagged message needs
        an IRTE bound to its PASID, so with a tagging device the host uses memory IMS only if the
        platform accepts and checks tags; otherwise device IMS, untagged."""
        if not self.tags:
            self.host_alloc("host", SIOV_PF)
        elif self.platform["pasid_ir"] and self.platform["pasid_interrupts"]:
            self.host_alloc("host", SIOV_PF, HOST_ADI_PASID, HOST_ADI_PASID)
        else:
            self.host_alloc("host", SIOV_PF)                   # fell back to device IMS


IR_FAULTS = {FaultReason.IR_REQ_RSVD, FaultReason.IR_INDEX_OVER, FaultReason.IR_ENTRY_P,
             FaultReason.IR_ROOT_INVAL, FaultReason.IR_IRTE_RSVD, FaultReason.IR_REQ_COMPAT,
             FaultReason.IR_SID_ERR}


def mostly(data, valid: st.SearchStrategy, invalid: st.SearchStrategy, label: str):
    """Draw from ``valid`` seven times in eight, else from ``invalid`` (hostile arguments)."""
    return data.draw(valid if data.draw(st.integers(0, 7), label=f"{label}?") else invalid, label=label)


def attack_messages(lab: Lab) -> st.SearchStrategy[tuple[int, int]]:
    """(addr, data) a hostile owner can put in untrapped storage: guessed or live handles (with
    and without SHV / sub-handles), compatibility-format messages, anything at all."""
    guessed = st.builds(lambda h, shv, sub: (compose_remappable(h, 0, shv)[0], sub),
                        st.integers(0, IRT + 2), st.booleans(), st.integers(0, 4))
    opts = [guessed,
            st.tuples(st.integers(0xFEE0_0000, 0xFEEF_FFFF), st.integers(0, U32)),
            st.builds(lambda d, v: compose_compat(d, v)[::2], st.integers(0, 0xFF), st.integers(0, 0xFF)),
            st.tuples(st.integers(0, U64), st.integers(0, U32))]
    live = sorted(lab.ir.table)
    if not live:
        return st.one_of(opts)
    aimed = st.one_of(st.sampled_from(live).map(lambda i: (compose_remappable(i)[0], 0)),
                      st.tuples(st.sampled_from(live), st.integers(0, 3)).map(
                          lambda t: (compose_remappable(t[0] - min(t[0], t[1]))[0], min(t[0], t[1]))))
    return st.integers(0, 3).flatmap(lambda k: aimed if k else st.one_of(opts))


def expected_compose_ret(lab: Lab, vm: Vm, args: list[int]) -> int:
    """What Vmm._compose must answer (docs/hypercalls.md "Errors"): 0 or a negative KVM code."""
    if len(args) < 3:
        return -hc.KVM_EINVAL
    dev, vector, dest = args[:3]
    cookie = args[3] if len(args) > 3 else 0
    vf = vm.vfs.get(dev)
    if vf is None:
        return -hc.KVM_EPERM
    if not hc.FIRST_VECTOR <= vector <= hc.LAST_VECTOR or dest not in vm.apic_ids:
        return -hc.KVM_EINVAL
    if len(vm.composes) >= COMPOSE_QUOTA:
        return -hc.KVM_ENOSPC
    if isinstance(vf, VirtualAdi):
        if cookie & hc.COOKIE_MEMORY:
            if lab.vmm._memory_ims_refusal(vf):
                return -hc.KVM_EOPNOTSUPP
        elif not vf.emulate_ims or vf.mangle:
            return -hc.KVM_EOPNOTSUPP
    return -hc.KVM_ENOSPC if lab.kernel.ir.allocator.in_use >= IRT else 0


class IsolationMachine(RuleBasedStateMachine):
    """Host + guests g1..g3 composing, freeing, storing and emitting against the real VMM/IR."""

    lab: Lab

    @initialize(tags=st.booleans(), pasid_ir=st.booleans(), rc_tags=st.sampled_from([True, True, False]),
                posted=st.booleans())
    def boot(self, tags, pasid_ir, rc_tags, posted):
        self.lab = Lab(tags=tags, pasid_ir=pasid_ir, rc_tags=rc_tags, posted=posted)
        self.lab.boot_host_drivers()

    # --- helpers ------------------------------------------------------------------------------

    def _vm(self, data) -> Vm:
        return self.lab.vmm.vms[data.draw(st.sampled_from([vm.name for vm in self.lab.live_vms()]), label="vm")]

    def _adi(self, data, vm: Vm) -> VirtualAdi:
        adis = self.lab.adis_of(vm)
        return adis[data.draw(st.integers(0, len(adis) - 1), label="adi#")]

    def _judge(self, vm: Vm, path: str, dev, res, msg) -> None:
        """The oracle: a Remapped result's IRTE belongs to the emitter's owner (or it is a breach)."""
        lab = self.lab
        if isinstance(res, str):
            event(f"{path}: dropped")
            return                                             # dropped before the IR unit
        assert type(res) in (Remapped, Posted, IrFault), f"IR enabled, CFI clear: {res!r}"
        if type(res) is IrFault:
            assert res.reason in IR_FAULTS, res
            event(f"{path}: fault 0x{int(res.reason):02x}")
            return
        owner = lab.owners().get(res.index)
        assert owner is not None, f"IRTE {res.index} remapped but nobody composed it: {res!r}"
        if owner == vm.name:
            if type(res) is Posted:     # posted straight into one of the emitter's own vCPUs
                assert res.pda in vm.pids.values(), f"posted to a descriptor not {vm.name}'s: {res!r}"
            event(f"{path}: own IRTE" + (" (posted)" if type(res) is Posted else ""))
            return
        raise AssertionError(f"ISOLATION BREACH: {vm.name}'s {path} ({dev!r:.60}) message {msg} "
                             f"reached IRTE {res.index} owned by {owner}: {res!r}")

    # --- guests: hypercalls -------------------------------------------------------------------

    @rule(data=st.data())
    def compose(self, data):
        lab = self.lab
        vm = self._vm(data)
        dev = mostly(data, st.sampled_from(sorted(vm.vfs)), st.integers(0, 0xFFFF), "dev")
        vector = mostly(data, st.integers(hc.FIRST_VECTOR, hc.LAST_VECTOR), st.integers(-(1 << 63), U64), "vector")
        dest = mostly(data, st.sampled_from(vm.apic_ids), st.integers(-(1 << 63), U64), "dest")
        cookie = mostly(data, st.sampled_from([0, hc.COOKIE_MEMORY, 3, hc.COOKIE_MEMORY | 5]),
                        st.integers(0, U64), "cookie")
        args = [dev, vector, dest, cookie][:mostly(data, st.just(4), st.integers(0, 3), "nargs")]
        want = expected_compose_ret(lab, vm, args)
        before = dict(vm.composes)
        r = lab.hypercall(vm, hc.HC_MSI_COMPOSE, args)
        assert r["ret"] == want, (r, want, args)
        event(f"compose: {hc.ERROR_NAMES.get(r['ret'], r['ret'])}")
        if r["ret"]:
            assert vm.composes == before and r["v"] == []
            return
        lo, hi, d, handle = r["v"]
        assert handle not in before and handle in vm.composes
        c = vm.composes[handle]
        vf = vm.vfs[dev]
        assert c.vf is vf and c.vector == vector and c.apic == dest
        fake = isinstance(vf, VirtualAdi) and not (len(args) > 3 and cookie & hc.COOKIE_MEMORY)
        assert c.kind == ("fake" if fake else "remapped")
        assert (lo, hi, d) == (fake_pair(handle) if fake else c.real)
        if fake:     # worthless to hardware: fault 0x20 from any requester
            assert type(lab.ir.remap(vf.pf_rid, lo | hi << 32, d, None, do_fault=False)) is IrFault

    @rule(data=st.data())
    def free(self, data):
        lab = self.lab
        vm = self._vm(data)
        own = sorted(vm.composes)
        handle = mostly(data, st.sampled_from(own), st.integers(-3, 200), "handle") if own \
            else data.draw(st.integers(-3, 200), label="handle")
        c = vm.composes.get(handle)
        dev = mostly(data, st.just(c.vf.guest_rid), st.integers(0, 0xFFFF), "dev") if c \
            else data.draw(st.integers(0, 0xFFFF), label="dev")
        idx = irte_index(c.real) if c else None
        r = lab.free(vm, dev, handle)
        if c is not None and c.vf.guest_rid == dev:
            assert r == {"ret": 0, "v": []} and handle not in vm.composes
            assert idx not in lab.ir.table, "HC_MSI_FREE left the IRTE present"
        else:
            assert r["ret"] == -hc.KVM_EPERM and vm.composes.get(handle) is c

    @rule(data=st.data())
    def hostile_hypercall(self, data):
        vm = self._vm(data)
        junk = st.one_of(st.integers(-(1 << 70), 1 << 70), st.none(), st.text(max_size=3), st.floats(),
                         st.booleans(), st.lists(st.integers(), max_size=2))
        nr = data.draw(st.one_of(st.integers(-3, 5), junk), label="nr")
        args = data.draw(st.one_of(st.lists(st.one_of(st.integers(-(1 << 64), 1 << 65), junk), max_size=6),
                                   junk), label="args")
        req = data.draw(st.one_of(st.just({"nr": nr, "a": args}), st.just({"nr": nr}), junk), label="req")
        r = run(self.lab.vmm.exit_hypercall(vm, req))
        assert type(r) is dict and type(r["ret"]) is int and r["ret"] <= 0
        assert all(type(v) is int for v in r["v"])

    # --- guests: storage and emission ---------------------------------------------------------

    @rule(data=st.data())
    def store_device_slot(self, data):
        """A guest writes its ADI's trapped IMS page; only pairs the VMM composed for that ADI
        ever reach the real slot, otherwise it stays masked."""
        lab = self.lab
        vm = self._vm(data)
        vadi = self._adi(data, vm)
        idx = data.draw(st.integers(0, GUEST_DEV_SLOTS - 1), label="slot")
        mine = {c.handle: c for c in vm.composes.values() if c.vf is vadi and c.kind == "fake"}
        others = [fake_pair(c.handle) for v in lab.live_vms() for c in v.composes.values() if c.vf is not vadi]
        others += [c.real for v in lab.live_vms() for c in v.composes.values()]
        forged = [st.builds(fake_pair, st.integers(0, 0x1_0000)), st.tuples(*[st.integers(0, U32)] * 3)]
        if others:
            forged.insert(0, st.sampled_from(others))
        if mine:
            msg = mostly(data, st.sampled_from(sorted(mine)).map(fake_pair), st.one_of(forged), "msg")
        else:
            msg = data.draw(st.one_of(forged), label="msg")
        ctrl = mostly(data, st.sampled_from([0, 0, 1]), st.integers(0, U32), "ctrl")
        raw = struct.pack("<IIII", *msg, ctrl)
        how = mostly(data, st.just("slot"), st.sampled_from(["dwords", "bytes"]), "how")
        writes = []
        if how == "slot":
            writes += lab.store_device_slot(vm, vadi, idx, raw)
        elif how == "dwords":
            for f in data.draw(st.permutations(range(4)), label="order"):
                writes += lab.store_device_slot(vm, vadi, idx, raw[4 * f:4 * f + 4], 4 * f)
        else:
            off = data.draw(st.integers(0, 15), label="off")
            n = data.draw(st.integers(0, 24), label="len")
            writes += lab.store_device_slot(vm, vadi, idx, (raw * 3)[off:off + n], off)
        live = {c.real for c in vm.composes.values() if c.vf is vadi and c.kind == "fake"}
        base = vadi.portal_hpa + IMS_PAGE
        for addr, payload in writes:
            assert base <= addr and addr + len(payload) <= base + 16 * len(vadi.slots), \
                f"the VMM wrote outside {vm.name}'s ADI slots: 0x{addr:x}"
            if len(payload) == 12:
                assert struct.unpack("<III", payload) in live and addr % 16 == 0, payload
            else:
                assert len(payload) == 4 and addr % 16 == 0xC and payload in (b"\1\0\0\0", b"\0\0\0\0")
        for s in range(len(vadi.slots)):
            real = lab.real_slot(vadi, s)
            assert real[3] & 1 or real[:3] in live, \
                f"real slot {s} of {vm.name}'s ADI unmasked with {real} (composed: {live})"
        event(f"store: {'own fake pair' if msg in map(fake_pair, mine) else 'other'}")
        if how == "slot" and msg in map(fake_pair, mine) and not ctrl & 1 and vadi.ims_page_kind == "trap":
            event("store: own fake pair, unmasked")
            c = next(c for c in mine.values() if fake_pair(c.handle) == msg)
            real = lab.real_slot(vadi, idx)
            assert real == (*c.real, 0), (real, c.real)
            res = lab.interrupt(vadi.pf_rid, real[0] | real[1] << 32, real[2], None)
            assert type(res) in (Remapped, Posted) and res.index == irte_index(c.real), \
                f"case 4 not delivered: {res!r}"

    @rule(data=st.data())
    def emit(self, data):
        """Any guest's device sends whatever its storage holds, with the hardware-stamped identity."""
        for _ in range(data.draw(st.integers(1, 4), label="burst")):
            self._emit_one(data)

    def _emit_one(self, data):
        lab = self.lab
        vm = self._vm(data)
        path = data.draw(st.sampled_from(["vf", "adi-mem", "adi-dev"]), label="path")
        if path == "vf":
            dev = lab.vf_of(vm)
            addr, d = data.draw(attack_messages(lab), label="msg")
            pasid = data.draw(st.one_of(st.none(), st.integers(0, 0xFFFFF)), label="pasid")  # its IMS ctrl
            msg = (addr, d)
            res = lab.interrupt(dev.host_rid, addr, d, pasid)
        elif path == "adi-mem":
            dev = self._adi(data, vm)
            if not lab.mem_ims_enabled(dev):
                event("adi-mem: memory IMS not enabled by the host (ADI_CTRL.MIE clear)")
                return                                         # the device fetches nothing
            addr, d = data.draw(attack_messages(lab), label="msg")
            msg = (addr, d)
            res = lab.interrupt(dev.pf_rid, addr, d, dev.pasid if dev.tags_pasid else None)
        else:
            adis = lab.adis_of(vm)
            every = [(a, i) for a in range(len(adis)) for i in range(GUEST_DEV_SLOTS)]
            armed = [(a, i) for a, i in every if not lab.real_slot(adis[a], i)[3] & 1]
            a, i = (mostly(data, st.sampled_from(armed), st.sampled_from(every), "adi#, slot") if armed
                    else data.draw(st.sampled_from(every), label="adi#, slot"))
            dev = adis[a]
            msg = lab.real_slot(dev, i)
            if msg[3] & 1:
                event("adi-dev: masked")
                return                                         # masked: the device sends nothing
            res = lab.interrupt(dev.pf_rid, msg[0] | msg[1] << 32, msg[2], None)   # VMM: PE clear
        self._judge(vm, path, dev, res, msg)

    @rule(data=st.data())
    def legit_emit(self, data):
        """Liveness: every live compose, emitted by its own device as intended, is delivered."""
        lab = self.lab
        cands = [(vm.name, c.handle) for vm in lab.live_vms() for c in vm.composes.values()
                 if c.kind == "remapped"]
        cands += [(None, v) for v in lab.host_irqs]
        if not cands:
            return
        name, c = data.draw(st.sampled_from(cands), label="(vm, handle) or (None, host virq)")
        vm = None if name is None else lab.vmm.vms[name]
        if vm is not None:
            c = vm.composes[c]
        if vm is None:
            sid, _, pasid = lab.host_meta[c]
            msg = irq_chip_compose_msi_msg(lab.kernel.irq.irq_get_irq_data(c))
            lo, hi, d, want = msg.address_lo, msg.address_hi, msg.data, lab.virq_index(c)
        else:
            lo, hi, d = c.real
            want = irte_index(c.real)
            if isinstance(c.vf, VirtualAdi):
                sid, pasid = c.vf.pf_rid, (c.vf.pasid if c.vf.tags_pasid else None)
                assert lab.mem_ims_enabled(c.vf), "a memory-IMS compose the device would not honour"
            else:
                sid, pasid = c.vf.host_rid, None
        res = lab.interrupt(sid, lo | hi << 32, d, pasid)
        if isinstance(res, str):
            assert vm is None, "the VMM composed a memory-IMS message the root complex drops"
            return
        assert type(res) in (Remapped, Posted) and res.index == want, f"a legitimate message was not delivered: {res!r}"
        if vm is not None and lab.vmm.posted:     # straight to the vCPU it was composed for
            assert type(res) is Posted and (res.pda, res.vector) == (vm.pids[c.apic], c.vector), res

    # --- the host -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.lab.host_irqs) < 24)
    @rule(data=st.data())
    def host_alloc(self, data):
        lab = self.lab
        who = data.draw(st.sampled_from(["host", "host-adi-mem", "vf-msix"]), label="who")
        if who == "host":
            lab.host_alloc("host", data.draw(st.sampled_from([SRIOV_PF, SIOV_PF, SIOV_PF2, HOST_VF]), label="sid"))
        elif who == "host-adi-mem":
            lab.host_adi_memory_ims()
        else:   # vfio enabling a guest VF's MSI-X: host vectors (sid = the VF) forwarding to that guest
            vm = self._vm(data)
            lab.host_alloc(vm.name, lab.vf_of(vm).host_rid)

    @precondition(lambda self: self.lab.host_irqs)
    @rule(data=st.data())
    def host_free(self, data):
        virq = data.draw(st.sampled_from(sorted(self.lab.host_irqs)), label="virq")
        idx = self.lab.virq_index(virq)
        self.lab.host_free(virq)
        assert idx not in self.lab.ir.table

    @precondition(lambda self: len(self.lab.live_vms()) >= 2)
    @rule(data=st.data())
    def kill_vm(self, data):
        """SIGKILL a guest: destroy_vm reclaims its IRTEs and PASIDs and resets its ADIs."""
        lab = self.lab
        vm = self._vm(data)
        idxs = {irte_index(c.real) for c in vm.composes.values()}
        n = len(vm.composes)
        out = run(lab.vmm.destroy_vm(vm.name))
        assert vm.state == "dead" and not vm.composes and out["irtes"] == n
        for virq in [v for v, o in lab.host_irqs.items() if o == vm.name]:
            lab.host_free(virq)                            # pci_free_irq_vectors of its VF
        assert not idxs & set(lab.ir.table)
        for vadi in lab.adis_of(vm):
            assert (vadi.pf_rid, vadi.pasid, None) in lab.hw.pasid_log
            assert all(lab.real_slot(vadi, s)[3] & 1 for s in range(len(vadi.slots)))
        assert run(lab.vmm.destroy_vm(vm.name)) == {"known": True}     # idempotent

    # --- consistency --------------------------------------------------------------------------

    @invariant()
    def irt_matches_who_composed_what(self):
        lab = self.lab
        owners = lab.owners()
        assert set(owners) == set(lab.ir.table), "IRT entries nobody owns, or owned entries missing"
        assert lab.kernel.ir.allocator.in_use == len(owners)
        for vm in lab.live_vms():
            assert len(vm.composes) <= COMPOSE_QUOTA
            for c in vm.composes.values():
                idx = irte_index(c.real)
                e = lab.ir.irte(idx)
                adi = isinstance(c.vf, VirtualAdi)
                assert e.present and e.svt == SVT_SID and e.sq == 0
                assert e.sid == (c.vf.pf_rid if adi else c.vf.host_rid)
                if lab.vmm.posted:
                    assert e.mode == 1 and (e.pda, e.vector) == (vm.pids[c.apic], c.vector)
                else:
                    assert e.mode == 0
                bound = c.vf.pasid if (adi and c.kind == "remapped" and c.vf.tags_pasid
                                       and lab.platform["pasid_ir"]) else None
                assert lab.ir.expected_pasid(idx) == bound
                assert lab.kernel.irq_owner[c.virq] == (adi_origin(c.vf.pf_rid, c.vf.adi) if adi
                                                       else c.vf.host_rid)
        for virq, (sid, bind, _) in lab.host_meta.items():
            idx = lab.virq_index(virq)
            assert lab.ir.irte(idx).sid == sid and lab.ir.expected_pasid(idx) == bind


TestIsolation = IsolationMachine.TestCase
TestIsolation.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# =============================================================================================
# 1b. Targeted: the 4-unsafe breach exists, case 3 blocks every forgery, the known holes


def two_guests(**kw) -> tuple[Lab, Vm, Vm, VirtualAdi, VirtualAdi]:
    """g1 and g2 with one ADI each on SIOV_PF; the host holds its own PF and ADI interrupts."""
    lab = Lab(guests=("g1", "g2"), adis=[(SIOV_PF, 0, "g1"), (SIOV_PF, 1, "g2")], **kw)
    lab.boot_host_drivers()
    g1, g2 = lab.vmm.vms["g1"], lab.vmm.vms["g2"]
    return lab, g1, g2, lab.adis_of(g1)[0], lab.adis_of(g2)[0]


#: what a hostile guest can put in its memory-IMS slot: any handle, with or without a sub-handle
FORGED = st.builds(lambda h, shv, sub: (compose_remappable(h, 0, shv)[0], sub),
                   st.integers(0, IRT - 1), st.booleans(), st.integers(0, 3))


def every_forgery():
    for h in range(IRT):
        for shv in (False, True):
            for sub in range(4 if shv else 1):
                yield compose_remappable(h, 0, shv)[0], sub


def breaches(lab: Lab, vm: Vm, vadi: VirtualAdi) -> dict[int, str]:
    """IRTE index -> foreign owner, for every forged memory-IMS message of ``vadi`` that lands."""
    out = {}
    if not lab.mem_ims_enabled(vadi):
        return out                      # the device ignores IRQ_MODE 2 without ADI_CTRL.MIE
    for addr, data in every_forgery():
        res = lab.interrupt(vadi.pf_rid, addr, data, vadi.pasid if vadi.tags_pasid else None)
        if type(res) is Remapped and lab.owners().get(res.index) != vm.name:
            out[res.index] = lab.owners().get(res.index)
    return out


def test_row_4_unsafe_a_breach_exists():
    """Row 4-unsafe: memory IMS, a device that cannot tag, the naive VMM.  ``find`` looks for a
    message g1's ADI can store in its RAM that the IR unit remaps to g2's IRTE -- and finds one."""
    lab, g1, g2, a1, a2 = two_guests(tags=False, pasid_ir=False, unsafe=True)
    r2 = lab.compose(g2, a2.guest_rid, 0x51, 1, hc.COOKIE_MEMORY)
    assert r2["ret"] == 0, "the naive VMM composes for memory IMS it cannot make safe"
    victim = irte_index(g2.composes[r2["v"][3]].real)

    def lands_on_g2(msg) -> bool:
        res = lab.interrupt(a1.pf_rid, msg[0], msg[1], None)     # untagged: only the PF's RID
        return type(res) is Remapped and lab.owners().get(res.index) == "g2"

    addr, data = find(FORGED, lands_on_g2, settings=settings(max_examples=2000, database=None))
    assert decode_remappable(addr, data).index == victim
    # the platform records nothing: to the IR unit it is a valid request of the PF
    before = dict(lab.ir.fault_log.totals)
    assert type(lab.interrupt(a1.pf_rid, addr, data, None)) is Remapped
    assert dict(lab.ir.fault_log.totals) == before
    # the careful VMM refuses that compose on the same platform (row "4-unsafe, careful VMM")
    careful, c1, _, ca1, _ = two_guests(tags=False, pasid_ir=False)
    assert careful.compose(c1, ca1.guest_rid, 0x41, 0, hc.COOKIE_MEMORY)["ret"] == -hc.KVM_EOPNOTSUPP


def test_row_3_pasid_check_blocks_every_forgery():
    """Row 3 (tagging device, pasid_ir): no handle g1's ADI can store reaches anyone else's IRTE --
    not g2's memory-IMS entry (bound to g2's PASID), not g2's case-4 entry, not the host's own
    PF vectors or its ADI's entries (RID-only: they refuse tagged requests, e836591)."""
    lab, g1, g2, a1, a2 = two_guests(tags=True, pasid_ir=True)
    assert lab.compose(g1, a1.guest_rid, 0x41, 0, hc.COOKIE_MEMORY)["ret"] == 0
    assert lab.compose(g2, a2.guest_rid, 0x51, 1, hc.COOKIE_MEMORY)["ret"] == 0
    r = lab.compose(g2, a2.guest_rid, 0x52, 1, 0)                # g2 also uses case 4
    lab.store_device_slot(g2, a2, 0, struct.pack("<IIII", *fake_pair(r["v"][3]), 0))
    assert breaches(lab, g1, a1) == {}
    with pytest.raises(NoSuchExample):
        find(FORGED, lambda m: type(res := lab.interrupt(a1.pf_rid, m[0], m[1], a1.pasid)) is Remapped
             and lab.owners()[res.index] != "g1", settings=settings(max_examples=300, database=None))
    # ... while g1's own message is delivered, and g2's is blocked when g1 sends it
    own = g1.composes[1].real
    assert lab.interrupt(a1.pf_rid, own[0], own[2], a1.pasid).index == irte_index(own)
    res = lab.interrupt(a1.pf_rid, g2.composes[1].real[0], 0, a1.pasid)
    assert type(res) is IrFault and res.reason == FaultReason.IR_SID_ERR and res.detail == "pasid"


@pytest.mark.parametrize("tags,pasid_ir", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["tagging+pasid_ir (secure)", "tagging, no pasid_ir", "untagged, pasid_ir", "untagged"])
def test_memory_ims_cannot_bypass_case_4(tags, pasid_ir):
    """Regression (hole "memory-ims-bypass"): the careful VMM refuses g1's memory-IMS compose, g2
    uses trapped device IMS.  g1's ADI portal is passed through, so it can select IRQ_MODE 2 and
    store a forged handle in its own RAM anyway -- but the device honours memory IMS only with
    ADI_CTRL.MIE, which the host sets only where the VMM approved the compose."""
    lab, g1, g2, a1, a2 = two_guests(tags=tags, pasid_ir=pasid_ir)
    ret = lab.compose(g1, a1.guest_rid, 0x41, 0, hc.COOKIE_MEMORY)["ret"]
    assert ret == (0 if tags and pasid_ir else -hc.KVM_EOPNOTSUPP)
    r = lab.compose(g2, a2.guest_rid, 0x51, 1, 0)
    lab.store_device_slot(g2, a2, 0, struct.pack("<IIII", *fake_pair(r["v"][3]), 0))
    assert lab.real_slot(a2, 0) == (*g2.composes[r["v"][3]].real, 0)
    assert lab.mem_ims_enabled(a1) == (tags and pasid_ir)
    assert breaches(lab, g1, a1) == {}


@pytest.mark.parametrize("tags,pasid_ir", [(False, False), (True, True)], ids=["untagged", "tagging+pasid_ir"])
@pytest.mark.parametrize("reuser", ["g2", "host"])
def test_freed_case_4_pair_leaves_no_stale_device_slot(tags, pasid_ir, reuser):
    """Regression (hole "stale-device-slot"): g1 stores its fake pair (the VMM writes the real
    pair), then frees the handle without touching the slot; the IRTE is reused.  The VMM must
    have masked the real slot, or g1's doorbell would raise the new owner's interrupt."""
    lab, g1, g2, a1, a2 = two_guests(tags=tags, pasid_ir=pasid_ir)
    h = lab.compose(g1, a1.guest_rid, 0x41, 0, 0)["v"][3]
    lab.store_device_slot(g1, a1, 0, struct.pack("<IIII", *fake_pair(h), 0))
    old = irte_index(g1.composes[h].real)
    assert lab.free(g1, a1.guest_rid, h)["ret"] == 0
    if reuser == "g2":
        assert lab.compose(g2, a2.guest_rid, 0x51, 1, 0)["ret"] == 0
    else:
        lab.host_alloc("host", SIOV_PF)                 # e.g. the host's PF driver adds a vector
    assert old in lab.ir.table and lab.owners()[old] == reuser
    lo, hi, data, ctrl = lab.real_slot(a1, 0)
    res = None if ctrl & 1 else lab.interrupt(a1.pf_rid, lo | hi << 32, data, None)
    assert not (type(res) is Remapped and lab.owners()[res.index] != "g1"), \
        f"g1's stale slot reached {reuser}'s IRTE {res.index}"


def test_case_4_translates_only_the_exact_pairs_it_handed_out():
    """docs/siov.md: "a pair it did not hand out leaves the real slot masked".  The fake pair's
    handle field is 16 bits (addr[2] is handle bit 15, as for any remappable message) and its
    data is 0; a VM's handles keep counting up across compose/free cycles."""
    lab, g1, _, a1, _ = two_guests(tags=False, pasid_ir=False)
    g1.handles = itertools.count(0x7FFF)         # the state after 32766 compose/free cycles
    hs = [lab.compose(g1, a1.guest_rid, 0x41 + i, 0, 0)["v"][3] for i in range(2)]
    assert hs == [0x7FFF, 0x8000]
    for slot, h in enumerate(hs):
        lab.store_device_slot(g1, a1, slot, struct.pack("<IIII", *fake_pair(h), 0))
        assert lab.real_slot(a1, slot) == (*g1.composes[h].real, 0), f"handle 0x{h:x} not translated"
    # a pair the VMM did not hand out: its own handle with another sub-handle / other format bits
    lo, hi, _ = fake_pair(hs[0])
    for forged in ((lo, hi, 1), (lo & ~0x8, hi, 0), (lo & ~0x10, hi, 0), (lo | 0x3, hi, 0)):
        lab.store_device_slot(g1, a1, 0, struct.pack("<IIII", *forged, 0))
        assert lab.real_slot(a1, 0)[3] & 1, f"{forged} is not a pair the VMM handed out"


# =============================================================================================
# 2. The IOMMU: a Translation always lands in the requester's own guest


P = PAGE_SIZE
WIN_PAGES = 16                                   # each guest's RAM window, in pages
IOMMU_GUESTS = {"g1": 1, "g2": 2, "g3": 3}       # guest -> its domain id (Vmm: index + 1)
ADI_PASIDS = {"g1": 0x11, "g2": 0x12, "g3": 0x13}  # each guest's ADI on SIOV_PF
HOST_RAM = 1 << 30
DMA_FAULTS = {FaultReason.CONTEXT_ENTRY_P, FaultReason.ADDR_BEYOND_MGAW, FaultReason.WRITE,
              FaultReason.READ, FaultReason.CONTEXT_ENTRY_TT, FR_SM_TTM0_PASID, FR_PASID_DIR_ENTRY_P,
              FR_PASID_ENTRY_P}


def window(g: str) -> int:
    return (1 << 40) + (IOMMU_GUESTS[g] - 1) * (1 << 36)


class IommuMachine(RuleBasedStateMachine):
    """Domains, mappings (own window only), contexts, PASID entries, RAM windows coming and
    going, and DMA from any requester, checked against a reference model of VT-d 3.4/3.7."""

    @initialize(mgaw=st.sampled_from([39, 48]))
    def setup(self, mgaw):
        self.mgaw = mgaw
        self.mm = MemoryMap()
        self.mm.map_range(0, HOST_RAM, "host", 0)
        for g in IOMMU_GUESTS:
            self.mm.map_range(window(g), WIN_PAGES * P, g, 0)
        self.iommu = Iommu(mgaw=mgaw, memory=self.mm)
        # the reference model
        self.ram = {"host": (0, HOST_RAM), **{g: (window(g), WIN_PAGES * P) for g in IOMMU_GUESTS}}
        self.domains: dict[int, dict[int, tuple[int, bool, bool]]] = {}   # did -> page -> (hpa, r, w)
        self.ctx: dict[int, object] = {}
        self.pasids: dict[tuple[int, int], int] = {}
        self.dom_owner = {d: g for g, d in IOMMU_GUESTS.items()}
        # what Vmm.create_vm / _make_adi program: a domain per guest mapping its whole window at
        # IOVA 0 (guest-physical), its VF's context and its ADI's PASID entry pointing there;
        # the host's own functions in pass-through
        for g, did in IOMMU_GUESTS.items():
            self.iommu.create_domain(did)
            self.iommu.map(did, 0, window(g), WIN_PAGES * P, True, True)
            self.domains[did] = {k: (window(g) + k * P, True, True) for k in range(WIN_PAGES)}
            self.iommu.set_context(GUEST_VFS[g], ("domain", did))
            self.ctx[GUEST_VFS[g]] = ("domain", did)
            self.iommu.set_pasid(SIOV_PF, ADI_PASIDS[g], did)
            self.pasids[(SIOV_PF, ADI_PASIDS[g])] = did
        for rid in (SRIOV_PF, SIOV_PF, HOST_VF):
            self.iommu.set_context(rid, "pt")
            self.ctx[rid] = "pt"

    # --- programming (what the VMM / host kernel do, plus hostile-looking values) ----------

    @rule(did=st.sampled_from([1, 2, 3, 7, 0xFFFF]))
    def create_domain(self, did):
        if did in self.domains:
            with pytest.raises(ValueError):
                self.iommu.create_domain(did)
        else:
            self.iommu.create_domain(did)
            self.domains[did] = {}

    @rule(did=st.sampled_from([1, 2, 3, 7]))
    def destroy_domain(self, did):
        if did not in self.domains:
            with pytest.raises(ValueError):
                self.iommu.destroy_domain(did)
            return
        self.iommu.destroy_domain(did)
        del self.domains[did]
        self.ctx = {r: m for r, m in self.ctx.items() if m != ("domain", did)}
        self.pasids = {k: d for k, d in self.pasids.items() if d != did}

    @rule(data=st.data(), g=st.sampled_from(sorted(IOMMU_GUESTS)), n=st.integers(1, 4),
          read=st.booleans(), write=st.booleans())
    def map(self, data, g, n, read, write):
        """The VMM maps a run of its guest's own RAM window at some IOVA of that guest's domain."""
        did = IOMMU_GUESTS[g]
        top = (1 << (self.mgaw - 12))
        iova_pg = data.draw(st.one_of(st.integers(0, 2 * WIN_PAGES), st.integers(top - 6, top + 1),
                                      st.integers(0, top)), label="iova page")
        win_pg = data.draw(st.integers(0, WIN_PAGES - n), label="window page")
        hpa = window(g) + win_pg * P
        ptes = self.domains.get(did)
        bad = (ptes is None or (iova_pg + n) > top or not (read or write)
               or any(p in ptes for p in range(iova_pg, iova_pg + n)))
        if bad:
            with pytest.raises(ValueError):
                self.iommu.map(did, iova_pg * P, hpa, n * P, read, write)
            return
        self.iommu.map(did, iova_pg * P, hpa, n * P, read, write)
        for k in range(n):
            ptes[iova_pg + k] = (hpa + k * P, read, write)

    @rule(data=st.data(), did=st.sampled_from([1, 2, 3, 7]), n=st.integers(1, 8))
    def unmap(self, data, did, n):
        ptes = self.domains.get(did)
        first = data.draw(st.sampled_from(sorted(ptes)) if ptes else st.integers(0, 40), label="page")
        if ptes is None:
            with pytest.raises(ValueError):
                self.iommu.unmap(did, first * P, n * P)
            return
        gone = [p for p in range(first, first + n) if p in ptes]
        assert self.iommu.unmap(did, first * P, n * P) == len(gone) * P
        for p in gone:
            del ptes[p]

    @rule(data=st.data())
    def set_context(self, data):
        g = data.draw(st.sampled_from(sorted(IOMMU_GUESTS)), label="guest")
        choice = data.draw(st.sampled_from(["own", "own", "block", "host-pt", "hostile"]), label="what")
        if choice == "own":                      # vfio assigns the guest's VF to its domain
            rid, mode = GUEST_VFS[g], ("domain", IOMMU_GUESTS[g])
        elif choice == "block":                  # the VF of a dead VM
            rid, mode = GUEST_VFS[g], "block"
        elif choice == "host-pt":                # iommu=pt for the host's own functions
            rid, mode = data.draw(st.sampled_from([SRIOV_PF, SIOV_PF, HOST_VF]), label="rid"), "pt"
        else:                                    # malformed programming must be refused cleanly
            rid = data.draw(st.one_of(st.integers(-2, 0x10001), st.sampled_from(list(GUEST_VFS.values()))),
                            label="rid")
            mode = data.draw(st.sampled_from(["bogus", ("domain",), ("domain", 0x10000), ("domain", 99),
                                              ["domain", IOMMU_GUESTS[g]], ("dom", 1), None]), label="mode")
        ok = (0 <= rid <= 0xFFFF and (mode in ("pt", "block") or (
              isinstance(mode, (tuple, list)) and len(mode) == 2 and mode[0] == "domain"
              and mode[1] in self.domains)))
        if not ok:
            with pytest.raises(ValueError):
                self.iommu.set_context(rid, mode)
            return
        self.iommu.set_context(rid, mode)
        self.ctx[rid] = mode if isinstance(mode, str) else ("domain", mode[1])
        if isinstance(mode, (tuple, list)) and rid in GUEST_VFS.values() and choice != "hostile":
            assert self.dom_owner[mode[1]] == g

    @rule(rid=st.sampled_from(sorted(GUEST_VFS.values()) + [SRIOV_PF]))
    def clear_context(self, rid):
        self.iommu.clear_context(rid)
        self.ctx.pop(rid, None)

    @rule(g=st.sampled_from(sorted(IOMMU_GUESTS)), on=st.booleans())
    def adi_pasid(self, g, on):
        """The VMM binds (rid=PF, the guest's ADI PASID) to the guest's domain, or clears it."""
        key = (SIOV_PF, ADI_PASIDS[g])
        if not on:
            self.iommu.clear_pasid(*key)
            self.pasids.pop(key, None)
        elif IOMMU_GUESTS[g] not in self.domains:
            with pytest.raises(ValueError):
                self.iommu.set_pasid(*key, IOMMU_GUESTS[g])
        else:
            self.iommu.set_pasid(*key, IOMMU_GUESTS[g])
            self.pasids[key] = IOMMU_GUESTS[g]

    @rule(g=st.sampled_from(sorted(IOMMU_GUESTS)), present=st.booleans())
    def ram_window(self, g, present):
        """The VM dies (its RAM window leaves the memory map) or is started again."""
        if present and g not in self.ram:
            self.mm.map_range(window(g), WIN_PAGES * P, g, 0)
            self.ram[g] = (window(g), WIN_PAGES * P)
        elif not present:
            self.mm.unmap_owner(g)
            self.ram.pop(g, None)

    # --- DMA --------------------------------------------------------------------------------

    def _claim(self, hpa: int, n: int):
        for owner, (start, size) in self.ram.items():
            if start <= hpa < start + size:
                return ("T", owner, hpa - start, hpa) if hpa + n <= start + size else ("U",)
        return ("U",)

    def _expect(self, rid, addr, size, write, pasid):
        n = size if size > 0 else 1
        if pasid is None:
            ctx = self.ctx.get(rid)
            if ctx is None:
                return ("F", FaultReason.CONTEXT_ENTRY_P)
            if ctx == "block":
                return ("F", FaultReason.CONTEXT_ENTRY_TT)
            if ctx == "pt":
                return self._claim(addr, n)
            did = ctx[1]
        else:
            did = self.pasids.get((rid, pasid))
            if did is None:
                if not any(r == rid for r, _ in self.pasids):
                    return ("F", FR_SM_TTM0_PASID)
                if not any(r == rid and p >> 6 == pasid >> 6 for r, p in self.pasids):
                    return ("F", FR_PASID_DIR_ENTRY_P)
                return ("F", FR_PASID_ENTRY_P)
        ptes = self.domains[did]
        if addr < 0 or (addr + n - 1) >> self.mgaw:
            return ("F", FaultReason.ADDR_BEYOND_MGAW)
        hpas = []
        for page in range(addr >> 12, ((addr + n - 1) >> 12) + 1):
            pte = ptes.get(page)
            if pte is None or not pte[2 if write else 1]:
                return ("F", FaultReason.WRITE if write else FaultReason.READ)
            hpas.append(pte[0])
        if any(b != a + P for a, b in zip(hpas, hpas[1:])):
            return ("U",)
        return self._claim(hpas[0] + (addr & (P - 1)), n)

    def _requester_guest(self, rid, pasid):
        """The guest a requester is assigned to (through its context or PASID entry), if any."""
        did = self.pasids.get((rid, pasid)) if pasid is not None else (
            self.ctx[rid][1] if isinstance(self.ctx.get(rid), tuple) else None)
        return self.dom_owner.get(did) if did is not None else None

    @rule(data=st.data())
    def dma(self, data):
        for _ in range(data.draw(st.integers(1, 4), label="burst")):
            self._dma(data, data.draw(st.booleans(), label="write"))

    def _dma(self, data, write):
        who = data.draw(st.sampled_from(["vf", "vf", "adi", "adi", "host", "any"]), label="requester")
        g = data.draw(st.sampled_from(sorted(IOMMU_GUESTS)), label="guest")
        if who == "vf":
            rid, pasid = GUEST_VFS[g], None
        elif who == "adi":
            rid, pasid = SIOV_PF, ADI_PASIDS[g]
        elif who == "host":
            rid, pasid = data.draw(st.sampled_from([SRIOV_PF, SIOV_PF, HOST_VF]), label="rid"), None
        else:
            rid = data.draw(st.one_of(st.sampled_from(sorted(GUEST_VFS.values()) + [SIOV_PF]),
                                      st.integers(-1, 0x10000)), label="rid")
            pasid = data.draw(st.one_of(st.none(), st.sampled_from(sorted(ADI_PASIDS.values())),
                                        st.integers(-1, 1 << 21)), label="pasid")
        mapped = sorted({p for ptes in self.domains.values() for p in ptes})
        near = [st.integers(0, 3 * WIN_PAGES * P)]
        if mapped:
            near.insert(0, st.tuples(st.sampled_from(mapped), st.integers(-8, P + 8)).map(lambda t: t[0] * P + t[1]))
        addr = data.draw(st.one_of(*near, st.integers(-(1 << 64), 1 << 65),
                                   st.integers((1 << self.mgaw) - 3 * P, (1 << self.mgaw) + P),
                                   st.sampled_from([window(g) + o for g in IOMMU_GUESTS for o in (0, P - 2)])),
                         label="addr")
        size = data.draw(st.one_of(st.integers(0, 3 * P), st.sampled_from([4, 64, P]), st.integers(-5, 1 << 64)),
                         label="size")
        want = self._expect(rid, addr, size, write, pasid)
        stats = (self.iommu.translations, self.iommu.unclaimed, dict(self.iommu.faults),
                 dict(self.iommu.fault_log.totals))
        probe = self.iommu.translate(rid, addr, size, write, pasid, do_fault=False)
        assert stats == (self.iommu.translations, self.iommu.unclaimed, dict(self.iommu.faults),
                         dict(self.iommu.fault_log.totals)), "a probe left a trace"
        res = self.iommu.translate(rid, addr, size, write, pasid)
        assert res == probe
        if want[0] == "F":
            assert type(res) is DmaFault and res.reason == want[1], (res, want)
            assert res.reason in DMA_FAULTS and res.rid == rid and res.pasid == pasid and res.write == write
            event(f"dma: fault 0x{int(res.reason):02x}")
        elif want[0] == "U":
            assert type(res) is Unclaimed, (res, want)
            event("dma: unclaimed")
        else:
            assert type(res) is Translation and tuple(res) == want[1:], (res, want)
            guest = self._requester_guest(rid, pasid)
            if guest is not None:       # isolation: an assigned requester only reaches its guest's RAM
                assert res.owner == guest and 0 <= res.local_addr < WIN_PAGES * P, (res, rid, pasid)
            else:
                assert self.ctx.get(rid) == "pt" and pasid is None, "translated without an assignment"
            event("dma: translated" + (" (assigned)" if guest else " (pass-through)"))

    @invariant()
    def programming_matches(self):
        if not hasattr(self, "iommu"):
            return
        assert self.iommu.domains() == sorted(self.domains)
        assert self.iommu.contexts() == {r: self.ctx[r] for r in sorted(self.ctx)}
        assert self.iommu.pasid_entries() == {k: self.pasids[k] for k in sorted(self.pasids)}
        for did, ptes in self.domains.items():
            for m in self.iommu.domain_mappings(did):     # every PTE inside its owner's window
                g = self.dom_owner.get(did)
                assert g is not None and window(g) <= m["hpa"] and m["hpa"] + m["size"] <= window(g) + WIN_PAGES * P
            assert sum(m["size"] for m in self.iommu.domain_mappings(did)) == len(ptes) * P


TestIommu = IommuMachine.TestCase
TestIommu.settings = settings(max_examples=150, stateful_step_count=50, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# =============================================================================================
# 3. vfio / vdev emulation under hostile config and trapped-MMIO writes


CMD_BITS = R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE


def msix_entry_values() -> st.SearchStrategy[tuple[int, int, int, int]]:
    """(addr_lo, addr_hi, data, ctrl) a guest driver, or a hostile one, writes into its table."""
    compat = st.builds(lambda apic, vec, ctrl: (0xFEE0_0000 | apic << 12, 0, vec, ctrl),
                       st.integers(0, 0xFF), st.integers(0, 0xFF), st.sampled_from([0, 1]))
    anything = st.tuples(st.integers(0, U32), st.integers(0, U32), st.integers(0, U32), st.integers(0, U32))
    remappable = st.builds(lambda h, ctrl: (compose_remappable(h)[0], 0, 0, ctrl), st.integers(0, 0xFFFF),
                           st.sampled_from([0, 1]))
    return st.one_of(compat, compat, remappable, anything)


def check_target(entry, target, where: str) -> None:
    """``deliverable`` may only name (APIC, vector) from the guest's own compat-format entry."""
    assert target is not None
    apic, vector = target
    assert vector >= 0x10, f"{where}: vector 0x{vector:x} is an exception vector"
    assert entry.addr_lo >> 20 == 0xFEE and entry.addr_hi == 0 and not entry.addr_lo & 0x10, where
    assert (apic, vector) == ((entry.addr_lo >> 12) & 0xFF, entry.data & 0xFF) and not entry.masked, where


class VfioMachine(RuleBasedStateMachine):
    """A guest hammering its assigned VF's virtual config space and trapped MSI-X table/PBA, with
    the VMM's forwarding (``Vmm._forward``) firing real interrupts in between."""

    @initialize(size=st.integers(1, 8), pos=st.sampled_from([0x40, 0x70, 0x9C]))
    def setup(self, size, pos):
        self.vf = VirtualFunction(0x0101, 0x18, vf_config(size, pos), 0x4000, 0xF000_0000, 0x1B36, 0x11A1, pos, size)
        self.shadow = [[0, 0, 0, 1] for _ in range(size)]       # aligned DWORD stores, as written
        self.origins = itertools.count(1)
        self.injected: list[tuple[int, int, int]] = []          # (apic, vector, origin)

    def _actions(self, actions, pending_before):
        vf = self.vf
        for a in actions:
            assert a[0] in ("bar0", "msix_ctrl", "entry", "fire"), a
            if a[0] == "bar0":
                assert a[2] == vf.bar0_gpa and a[1] != a[2]
            elif a[0] == "msix_ctrl":
                assert a[1:] == (vf.msix_enable, vf.msix_maskall)
            elif a[0] == "entry":
                assert 0 <= a[1] < vf.msix_size
            else:       # a replay: it was pending, it is deliverable now, with its provenance
                _, idx, origin, t_ns = a
                assert pending_before.get(idx) == (origin, t_ns) and idx not in vf.pending
                target = vf.deliverable(idx)
                check_target(vf.table[idx], target, f"replay of entry {idx}")
                self.injected.append((*target, origin))
                event("vfio: pending entry replayed")

    @rule(data=st.data())
    def cfg_write(self, data):
        vf = self.vf
        reg = mostly(data, st.sampled_from([R.PCI_COMMAND, R.PCI_BASE_ADDRESS_0, vf.msix_pos, vf.msix_pos,
                                            R.PCI_BASE_ADDRESS_0 + 4, R.PCI_VENDOR_ID]),
                     st.integers(0, 0xFFF), "reg")
        value = mostly(data, st.one_of(st.sampled_from([U32, 0xFFFF_FFF0, 0]),
                                       st.builds(lambda f: f << 16, st.integers(0, 0xFFFF)),
                                       st.integers(0, 0xFFFF_F) .map(lambda a: a << 14)),
                       st.integers(0, U32), "value")
        be = mostly(data, st.sampled_from([0xF, 0xC, 0x3]), st.integers(0, 0xF), "be")
        before = dict(vf.pending)
        self._actions(vf.cfg_write(reg, value, be), before)

    @rule(enable=st.sampled_from([True, True, False]), maskall=st.sampled_from([False, False, True]))
    def msix_control(self, enable, maskall):
        """``pci_write_config_word(MSI-X Message Control)``: a word write at cap + 2."""
        vf = self.vf
        flags = (R.PCI_MSIX_FLAGS_ENABLE if enable else 0) | (R.PCI_MSIX_FLAGS_MASKALL if maskall else 0)
        before = dict(vf.pending)
        self._actions(vf.cfg_write(vf.msix_pos, flags << 16, 0xC), before)
        assert (vf.msix_enable, vf.msix_maskall) == (enable, maskall)

    @rule(data=st.data())
    def table_write(self, data):
        vf = self.vf
        idx = data.draw(st.integers(0, vf.msix_size - 1), label="entry")
        vals = data.draw(msix_entry_values(), label="values")
        how = data.draw(st.sampled_from(["entry", "dword", "qword"]), label="how")
        before = dict(vf.pending)
        base = MSIX_TABLE_OFFSET + 16 * idx
        if how == "entry":
            self._actions(vf.mmio_write(base, struct.pack("<IIII", *vals)), before)
            self.shadow[idx] = [vals[0], vals[1], vals[2], vals[3] & 1]
        else:
            f = data.draw(st.integers(0, 3 if how == "dword" else 2), label="field")
            n = 1 if how == "dword" else 2
            self._actions(vf.mmio_write(base + 4 * f, struct.pack(f"<{n}I", *vals[f:f + n])), before)
            for k in range(f, f + n):
                self.shadow[idx][k] = vals[k] & (1 if k == 3 else U32)

    @rule(data=st.data())
    def raw_mmio_write(self, data):
        """Anything at all into the trapped pages: any offset, any length, any alignment."""
        vf = self.vf
        off = data.draw(st.integers(0x2000 - 8, 0x4000 + 8), label="offset")
        raw = data.draw(st.binary(max_size=40), label="bytes")
        before = dict(vf.pending)
        self._actions(vf.mmio_write(off, raw), before)
        self.shadow = [[e.addr_lo, e.addr_hi, e.data, e.ctrl] for e in vf.table]   # undefined: resync

    @rule(data=st.data())
    def mmio_read(self, data):
        vf = self.vf
        off = data.draw(st.integers(0x2000 - 8, 0x4000 + 8), label="offset")
        size = data.draw(st.integers(0, 64), label="size")
        out = vf.mmio_read(off, size)
        assert len(out) == size

    @rule(data=st.data())
    def fire(self, data):
        """A real interrupt of entry ``idx`` reaches the host: ``Vmm._forward``."""
        vf = self.vf
        armed = [i for i, e in enumerate(vf.table) if not e.masked]
        idx = (mostly(data, st.sampled_from(armed), st.integers(0, vf.msix_size - 1), "entry") if armed
               else data.draw(st.integers(0, vf.msix_size - 1), label="entry"))
        origin = next(self.origins)
        target = vf.deliverable(idx)
        if target is None:
            vf.pending.setdefault(idx, (origin, 0))
            event("vfio: fired while not deliverable")
        else:
            check_target(vf.table[idx], target, f"entry {idx}")
            self.injected.append((*target, origin))
            event("vfio: injected")

    @invariant()
    def consistent(self):
        vf = getattr(self, "vf", None)
        if vf is None:
            return
        for idx, e in enumerate(vf.table):
            t = vf.deliverable(idx)
            if t is not None:
                check_target(e, t, f"entry {idx}")
                assert vf.msix_enable and not vf.msix_maskall
        for idx in vf.pending:
            assert vf.deliverable(idx) is None, f"entry {idx} deliverable but still pending (not replayed)"
        table = vf.mmio_read(MSIX_TABLE_OFFSET, 16 * vf.msix_size)
        assert list(struct.unpack(f"<{4 * vf.msix_size}I", table)) == [v for e in self.shadow for v in e]
        pba = int.from_bytes(vf.mmio_read(MSIX_PBA_OFFSET, 8), "little")
        assert pba == sum(1 << i for i in vf.pending)
        # the virtual header: no host-physical BAR, no junk, only the virtual bits
        assert vf.cfg_read(R.PCI_VENDOR_ID) == 0x1B36 | 0x11A1 << 16
        cmd = vf.cfg_read(R.PCI_COMMAND) & 0xFFFF
        assert cmd == vf.command and not cmd & ~CMD_BITS
        bar = vf.cfg_read(R.PCI_BASE_ADDRESS_0)
        assert bar == (~(vf.bar0_size - 1) & U32 if vf._bar0_sizing else vf.bar0_gpa)
        assert vf.bar0_gpa % vf.bar0_size == 0 and 0 <= vf.bar0_gpa <= U32
        assert all(vf.cfg_read(r) == 0 for r in range(R.PCI_BASE_ADDRESS_0 + 4, R.PCI_BASE_ADDRESS_0 + 24, 4))
        ctrl = vf.cfg_read(vf.msix_pos) >> 16
        assert ctrl & R.PCI_MSIX_FLAGS_QSIZE == vf.msix_size - 1
        assert bool(ctrl & R.PCI_MSIX_FLAGS_ENABLE) == vf.msix_enable
        assert bool(ctrl & R.PCI_MSIX_FLAGS_MASKALL) == vf.msix_maskall
        assert all(vec >= 0x10 for _, vec, _ in self.injected)


TestVfio = VfioMachine.TestCase
TestVfio.settings = settings(max_examples=150, stateful_step_count=50, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class VdevMachine(RuleBasedStateMachine):
    """Guests hammering their VirtualAdis (case 4: trapped IMS page; Intel's mangle path: emulated
    MSI-X backed by real IMS slot 0) with the real VMM dispatch (``Vmm._act``) behind them."""

    @initialize(tags=st.booleans(), pasid_ir=st.booleans())
    def setup(self, tags, pasid_ir):
        lab = self.lab = Lab(tags=tags, pasid_ir=pasid_ir, guests=("g1", "g2"),
                             adis=[(SIOV_PF, 0, "g1"), (SIOV_PF, 1, "g1"), (SIOV_PF, 2, "g2")])
        g1 = lab.vmm.vms["g1"]
        mangled = VirtualAdi(SIOV_PF2, 0, 6 << 3, 0x21, portal(SIOV_PF2, 0), GUEST_DEV_SLOTS, mangle=True)
        mangled.tags_pasid = tags
        g1.vfs[mangled.guest_rid] = mangled
        self.injected: list[tuple[str, int, int]] = []
        vmm = lab.vmm

        def inject(vm, apic, vector, origin, t_ns):          # Vmm._inject, recorded
            self.injected.append((vm.name, apic, vector))
            vmm.port.send(b"inject")
        vmm._inject = inject

    def _pick(self, data) -> tuple[Vm, VirtualAdi]:
        lab = self.lab
        name = data.draw(st.sampled_from(["g1", "g1", "g2"]), label="vm")
        vm = lab.vmm.vms[name]
        adis = lab.adis_of(vm)
        return vm, adis[data.draw(st.integers(0, len(adis) - 1), label="adi#")]

    def _dispatch(self, vm: Vm, vadi: VirtualAdi, actions: list) -> None:
        """The VMM carries the model's actions out; check every write it makes to real hardware."""
        lab = self.lab
        for action in actions:
            assert action[0] in ("bar0", "ims_slot", "entry", "msix_ctrl", "fire"), action
            mark, n_inj = len(lab.hw.writes), len(self.injected)
            table = [(e.addr_lo, e.addr_hi, e.data, e.ctrl) for e in vadi.table]
            run(lab.vmm._act(vm, vadi, action))
            base = vadi.portal_hpa + IMS_PAGE
            live = {c.real for c in vm.composes.values() if c.vf is vadi and c.kind == "fake"}
            backing = getattr(vadi, "backing_virq", None)
            for addr, payload in lab.hw.writes[mark:]:
                assert base <= addr and addr + len(payload) <= base + 16 * len(vadi.slots), \
                    f"the VMM wrote outside {vm.name}'s ADI slots: 0x{addr:x}"
                if vadi.mangle:
                    msg = irq_chip_compose_msi_msg(lab.kernel.irq.irq_get_irq_data(backing))
                    assert (addr, payload) in ((base, struct.pack("<III", msg.address_lo, msg.address_hi, msg.data)),
                                               (base + 0xC, b"\0\0\0\0")), (addr, payload)
                elif len(payload) == 12:
                    assert struct.unpack("<III", payload) in live and addr % 16 == 0, payload
                else:
                    assert len(payload) == 4 and addr % 16 == 0xC and payload in (b"\1\0\0\0", b"\0\0\0\0")
            for name, apic, vector in self.injected[n_inj:]:
                assert name == vm.name and vadi.mangle and vector >= 0x10
                assert any((apic, vector) == ((lo >> 12) & 0xFF, d & 0xFF) for lo, _, d, _ in table + [
                    (e.addr_lo, e.addr_hi, e.data, e.ctrl) for e in vadi.table])
                event("vdev: mangle interrupt injected")

    @rule(data=st.data())
    def compose(self, data):
        vm, vadi = self._pick(data)
        cookie = mostly(data, st.just(0), st.sampled_from([hc.COOKIE_MEMORY, 7]), "cookie")
        args = [vadi.guest_rid, data.draw(st.integers(0x20, 0xEF), label="vector"), 0, cookie]
        want = expected_compose_ret(self.lab, vm, args)
        assert self.lab.hypercall(vm, hc.HC_MSI_COMPOSE, args)["ret"] == want
        if vadi.mangle and not cookie & hc.COOKIE_MEMORY:
            assert want == -hc.KVM_EOPNOTSUPP, "no device-IMS emulation on the mangle path"

    @rule(data=st.data())
    def free(self, data):
        vm, vadi = self._pick(data)
        own = sorted(h for h, c in vm.composes.items() if c.vf is vadi)
        if own:
            self.lab.free(vm, vadi.guest_rid, data.draw(st.sampled_from(own), label="handle"))

    @rule(data=st.data())
    def cfg_write(self, data):
        vm, vadi = self._pick(data)
        reg = mostly(data, st.sampled_from([R.PCI_COMMAND, R.PCI_BASE_ADDRESS_0, 0x7C, 0x100, 0x10C]),
                     st.integers(0, 0xFFF), "reg")
        value = data.draw(st.one_of(st.sampled_from([U32, 0x8000_0000, 0xC000_0000, 0, 0xFEB0_0000]),
                                    st.integers(0, U32)), label="value")
        be = mostly(data, st.sampled_from([0xF, 0xC]), st.integers(0, 0xF), "be")
        self._dispatch(vm, vadi, vadi.cfg_write(reg, value, be))

    @rule(data=st.data())
    def trapped_write(self, data):
        """A store the EPT traps: case 4 page 1 (IMS slots); mangle pages 2-3 (MSI-X, PBA)."""
        vm, vadi = self._pick(data)
        lab = self.lab
        if vadi.mangle:
            idx = 0
            vals = data.draw(msix_entry_values(), label="entry")
            off = mostly(data, st.just(ADI_MSIX_TABLE), st.integers(ADI_MSIX_TABLE, ADI_BAR0_SIZE - 1), "offset")
        else:
            if vadi.ims_page_kind != "trap":
                return
            event("vdev: case-4 trapped store")
            handles = [h for v in lab.live_vms() for h in v.composes]
            idx = data.draw(st.integers(0, len(vadi.slots) - 1), label="slot")
            vals = data.draw(st.one_of(st.sampled_from(handles or [1]).map(lambda h: (*fake_pair(h), 0)),
                                       st.tuples(*[st.integers(0, U32)] * 4)), label="values")
            off = data.draw(st.one_of(st.just(IMS_PAGE + 16 * idx), st.integers(IMS_PAGE, 2 * IMS_PAGE - 1)),
                            label="offset")
        raw = mostly(data, st.just(struct.pack("<IIII", *vals)), st.binary(max_size=24), "bytes")
        self._dispatch(vm, vadi, vadi.mmio_write(off, raw))

    @rule(data=st.data())
    def any_write_to_the_model(self, data):
        """The model itself never raises, whatever offset (page 0 and beyond BAR0 included)."""
        vm, vadi = self._pick(data)
        actions = vadi.mmio_write(data.draw(st.integers(0, ADI_BAR0_SIZE + 0x40), label="offset"),
                                  data.draw(st.binary(max_size=40), label="bytes"))
        assert all(a[0] in ("ims_slot", "entry", "fire") for a in actions)
        for a in actions:
            if a[0] == "fire":
                check_target(vadi.table[a[1]], vadi.deliverable(a[1]), "replay")
        out = vadi.mmio_read(data.draw(st.integers(0, ADI_BAR0_SIZE + 0x40), label="read offset"),
                             n := data.draw(st.integers(0, 40), label="read size"))
        assert len(out) == n

    @rule(enable=st.sampled_from([True, True, False]), maskall=st.sampled_from([False, False, True]))
    def mangle_msix_control(self, enable, maskall):
        """The guest's driver enables the emulated MSI-X of its mangled ADI (a word write at cap + 2)."""
        vm = self.lab.vmm.vms["g1"]
        vadi = next(d for d in self.lab.adis_of(vm) if d.mangle)
        flags = (R.PCI_MSIX_FLAGS_ENABLE if enable else 0) | (R.PCI_MSIX_FLAGS_MASKALL if maskall else 0)
        self._dispatch(vm, vadi, vadi.cfg_write(0x7C, flags << 16, 0xC))
        assert (vadi.msix_enable, vadi.msix_maskall) == (enable, maskall)

    @rule(data=st.data())
    def backing_interrupt(self, data):
        """The ADI raises real IMS slot 0 (mangle): the host's handler forwards or pends it."""
        vm = self.lab.vmm.vms["g1"]
        vadi = next(d for d in self.lab.adis_of(vm) if d.mangle)
        virq = getattr(vadi, "backing_virq", None)
        if virq is None:
            return
        n = len(self.injected)
        self.lab.kernel.irq.handle_irq(virq, 0)
        for name, apic, vector in self.injected[n:]:
            assert name == "g1" and vector >= 0x10
            check_target(vadi.table[0], (apic, vector), "mangle")
        event("vdev: mangle backing interrupt " + ("forwarded" if self.injected[n:] else "pending"))

    @invariant()
    def consistent(self):
        lab = getattr(self, "lab", None)
        if lab is None:
            return
        for vm in lab.live_vms():
            for vadi in lab.adis_of(vm):
                cfg = vadi.cfg_read(0)
                assert cfg == 0x1B36 | 0x11A3 << 16
                ims = vadi.cfg_read(0x100 + R.PCI_DVSEC_INTEL_SIOV_CAP) & R.PCI_DVSEC_INTEL_SIOV_CAP_IMS
                assert bool(ims) == (not vadi.mangle)
                assert not vadi.cfg_read(R.PCI_COMMAND) & 0xFFFF & ~CMD_BITS
                assert vadi.cfg_read(R.PCI_BASE_ADDRESS_0) in (vadi.bar0_gpa, ~(ADI_BAR0_SIZE - 1) & U32)
                assert vadi.bar0_gpa % ADI_BAR0_SIZE == 0
                for i, e in enumerate(vadi.table):
                    t = vadi.deliverable(i)
                    if t is not None:
                        check_target(e, t, f"{vm.name} mangle entry {i}")
                if not vadi.mangle:
                    assert vadi.deliverable(0) is None
                    live = {c.real for c in vm.composes.values() if c.vf is vadi and c.kind == "fake"}
                    for s in range(len(vadi.slots)):
                        real = lab.real_slot(vadi, s)
                        assert real[3] & 1 or real[:3] in live, (vm.name, s, real)
                else:
                    virq = getattr(vadi, "backing_virq", None)
                    if virq is not None:      # the backing IRTE: this PF's RID, owned by this ADI
                        e = lab.ir.irte(lab.virq_index(virq))
                        assert e.present and e.sid == vadi.pf_rid and e.svt == SVT_SID
                        assert lab.ir.expected_pasid(lab.virq_index(virq)) is None
                        assert lab.kernel.irq_owner[virq] == adi_origin(vadi.pf_rid, vadi.adi)


TestVdev = VdevMachine.TestCase
TestVdev.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

"""Property-based isolation fuzzing (DESIGN.md §5-6): hostile owners against the real models.

The invariant: **in every secure configuration no interrupt reaches a vector its sender does not
own; nothing raises; state stays consistent.**  Three state machines drive the real code:

1. ``IsolationMachine``: the host's bare-metal kernel (real ``guest.kernel.Kernel`` with its
   ``INTEL-IR`` domain) writing IRTEs into a real ``fabric.ir.InterruptRemapper``, and the real
   ``host.vmm.Vmm`` serving hypercalls (``exit_hypercall`` -> ``_compose`` / ``_free``),
   trapped device-IMS stores (``host.vdev.VirtualAdi`` -> ``host.emul_siov.translate_slot``)
   and VM deaths (``destroy_vm``).  Owners: the host and three guests, each with a VF (its own
   RID) and ADIs (the shared PF RID, distinct PASIDs).  Attackers make their devices emit
   whatever their untrapped storage can hold (a VF's passed-through IMS slot, with any PASID;
   an ADI's memory-IMS slot, tagged as the hardware tags it), and whatever the VMM wrote into
   their trapped slots.  Every ``Remapped`` result's IRTE must belong to the emitter's owner;
   every legitimately composed message must be delivered to its own IRTE.
2. ``IommuMachine``: ``fabric.iommu.Iommu`` against a reference model; each guest's domain maps
   only its own RAM window; a ``Translation`` always lands in the requester's guest.
3. ``VfioMachine`` / ``VdevMachine``: hostile cfg and trapped-MMIO writes to a VirtualFunction
   and to VirtualAdis (case 4 and Intel's mangle path) with the real VMM behind them.

Known holes (found by this file; each has a strict-xfail test below that demonstrates it, and
the state machine reports breaches matching *exactly* that signature instead of failing, so
that every other breach still fails it).  When a hole is fixed, its xfail test starts to pass
(strict: the run fails) -- then delete its entry from ``KNOWN_HOLES``.
"""

from __future__ import annotations

import itertools
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, event, find, note, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fabric import hypercall as hc
from fabric.dmar import FaultReason
from fabric.iommu import (FR_PASID_DIR_ENTRY_P, FR_PASID_ENTRY_P, FR_SM_TTM0_PASID, PAGE_SIZE, DmaFault,
                          Iommu, MemoryMap, Translation, Unclaimed)
from fabric.ir import (SVT_SID, InterruptRemapper, IrFault, Remapped, compose_compat, compose_remappable,
                       decode_remappable)
from fabric.provenance import adi_origin
from guest.cpuid import bare_metal_cpuid
from guest.irq.domain import IrqAllocInfo, IrqError, irq_chip_compose_msi_msg, irq_domain_alloc_irqs, \
    irq_domain_free_irqs
from guest.kernel import Kernel
from guest.pci import regs as R
from host import emul_siov
from host.vdev import BAR0_SIZE as ADI_BAR0_SIZE
from host.vdev import IMS_PAGE, MSIX_PBA as ADI_MSIX_PBA, MSIX_TABLE as ADI_MSIX_TABLE, VirtualAdi
from host.vfio import MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, VirtualFunction
from host.vmm import COMPOSE_QUOTA, FAKE_ADDR_HI, Vm, Vmm, fake_pair

#: signature -> why it is (still) a hole.  See the module docstring.
KNOWN_HOLES = {
    "memory-ims-bypass": (
        "an ADI's portal (page 0, passed through) lets its guest select IRQ_MODE 2 and point the "
        "queue context at its own RAM whatever the VMM refused: untagged (or unchecked) memory-IMS "
        "messages carry only the PF's RID, so trapping device IMS (case 4) or refusing the memory "
        "compose (3-noplat, careful 4-unsafe) does not stop a forged handle.  Needs a host-only "
        "per-ADI memory-IMS enable in the device (device/adi.py) that the VMM leaves clear "
        "unless _memory_ims_refusal() is empty"),
    "stale-device-slot": (
        "HC_MSI_FREE of a case-4 (fake) compose frees the IRTE but leaves the real device-IMS slot "
        "that translate_slot wrote holding its real pair, unmasked: when the IRTE index is reused "
        "(another VM's ADI on the same PF, the host's own PF vectors) the old ADI's doorbell "
        "reaches it.  Vmm._free must mask the real slots that hold the freed pair"),
}
EXCUSED: dict[str, int] = {}

IRT = 128                       # IRT entries (small: guessed handles hit live entries often)
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
SRIOV_PF, HOST_VF = 0x0100, 0x0104
GUEST_VFS = {"g1": 0x0101, "g2": 0x0102, "g3": 0x0103}
SIOV_PF, SIOV_PF2 = 0x0200, 0x0300
#: ADIs: (pf, index, owner).  Host keeps ADI 3 of SIOV_PF (its own case-1 IMS).
ADIS = [(SIOV_PF, 0, "g1"), (SIOV_PF, 1, "g2"), (SIOV_PF, 2, "g3"), (SIOV_PF2, 0, "g1")]
HOST_ADI = (SIOV_PF, 3)
HOST_ADI_PASID = 0x40
GUEST_DEV_SLOTS = 2
FIRST_GUEST_RID = 3 << 3


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


def vf_config(msix_size: int, msix_pos: int = 0x70, bar0_size: int = 0x4000) -> bytearray:
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
    """The host's SIOV PF driver as destroy_vm sees it: resetting an ADI clears its device IMS."""

    def __init__(self, lab: "Lab", rid: int) -> None:
        self.lab, self.rid, self.owner = lab, rid, {}

    def reset_adi(self, adi: int) -> None:
        base = portal(self.rid, adi) + IMS_PAGE
        for s in range(GUEST_DEV_SLOTS):     # reset: every slot zero and masked
            for i in range(16):
                self.lab.hw.mem[base + 16 * s + i] = int(i == 0xC)


class Lab:
    """Host + three guests.  ``tags``: the SIOV device tags interrupt MWrs with the ADI's PASID;
    ``pasid_ir``: IRTEs can check PASIDs; ``rc_tags``: the root complex accepts tagged interrupt
    requests; ``unsafe``: the naive VMM of row 4-unsafe (``vmm_unsafe_ims``)."""

    def __init__(self, *, tags: bool, pasid_ir: bool, rc_tags: bool = True, unsafe: bool = False,
                 guests: tuple[str, ...] = ("g1", "g2", "g3"), adis=ADIS, emulate: bool = True) -> None:
        self.ir = InterruptRemapper(entries=IRT, enabled=True, pasid_check=pasid_ir)
        self.hw = RecordingHw(self.ir)
        self.kernel = Kernel("host", [0, 1], 4096, self.hw, bare_metal_cpuid, ir_entries=IRT)
        self.kernel.boot()
        assert self.kernel.ir is not None, "the host kernel must build INTEL-IR"
        self.kernel.pasid_ir = pasid_ir
        self.platform = {"pasid_ir": pasid_ir, "pasid_interrupts": rc_tags}
        self.cfg = {"vmm_unsafe_ims": unsafe}
        self.tags = tags
        self.port = FakePort()
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
        """A guest store into its ADI's trapped IMS page: vdev model, then the VMM's emulation.
        Returns the VMM's writes to real hardware."""
        mark = len(self.hw.writes)
        for action in vadi.mmio_write(IMS_PAGE + 16 * idx + off, raw):
            assert action[0] == "ims_slot" and 0 <= action[1] < len(vadi.slots), action
            if vadi.ims_page_kind == "trap":           # page 1 reaches the VMM only if trapped
                emul_siov.translate_slot(self.vmm, vm, vadi, action[1])
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
        bind = HOST_ADI_PASID if self.tags and self.platform["pasid_ir"] else None
        self.host_alloc("host", SIOV_PF, bind, HOST_ADI_PASID if self.tags else None)   # memory IMS


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
    if live:
        opts[:0] = [st.sampled_from(live).map(lambda i: (compose_remappable(i)[0], 0)),
                    st.tuples(st.sampled_from(live), st.integers(0, 3)).map(
                        lambda t: (compose_remappable(t[0] - min(t[0], t[1]))[0], min(t[0], t[1])))]
    return st.one_of(opts)


def expected_compose_ret(lab: Lab, vm: Vm, args: list[int]) -> int | str:
    """What Vmm._compose must answer (docs/hypercalls.md "Errors"); 'ok?' = 0 unless the IRT is full."""
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

    @initialize(tags=st.booleans(), pasid_ir=st.booleans(), rc_tags=st.sampled_from([True, True, False]))
    def boot(self, tags, pasid_ir, rc_tags):
        self.lab = Lab(tags=tags, pasid_ir=pasid_ir, rc_tags=rc_tags)
        self.lab.boot_host_drivers()
        note(f"config: tags={tags} pasid_ir={pasid_ir} rc_tags={rc_tags}")

    # --- helpers ------------------------------------------------------------------------------

    def _vm(self, data) -> Vm:
        return data.draw(st.sampled_from(self.lab.live_vms()), label="vm")

    def _judge(self, vm: Vm, path: str, dev, res, msg) -> None:
        """The oracle: a Remapped result's IRTE belongs to the emitter's owner (or it is a breach)."""
        lab = self.lab
        if isinstance(res, str):
            event(f"{path}: dropped")
            return                                             # dropped before the IR unit
        assert type(res) in (Remapped, IrFault), f"IR enabled, CFI clear: {res!r}"
        if type(res) is IrFault:
            assert res.reason in IR_FAULTS, res
            event(f"{path}: fault 0x{int(res.reason):02x}")
            return
        owner = lab.owners().get(res.index)
        assert owner is not None, f"IRTE {res.index} remapped but nobody composed it: {res!r}"
        if owner == vm.name:
            event(f"{path}: own IRTE")
            return
        hole = None
        if path == "adi-mem" and lab.vmm._memory_ims_refusal(dev):
            hole = "memory-ims-bypass"
        elif path == "adi-dev":
            live = {c.real for c in vm.composes.values() if c.vf is dev and c.kind == "fake"}
            if msg[:3] not in live and msg[:3] in lab.freed_fake.get((vm.name, id(dev)), ()):
                hole = "stale-device-slot"
        if hole in KNOWN_HOLES:
            event(f"{path}: known hole {hole}")
            EXCUSED[hole] = EXCUSED.get(hole, 0) + 1
            note(f"known hole {hole}: {vm.name} {path} -> IRTE {res.index} of {owner}")
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
        vadi = data.draw(st.sampled_from(lab.adis_of(vm)), label="adi")
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
            assert real[3] & 1 or real[:3] in live or not any(real[:3]), \
                f"real slot {s} of {vm.name}'s ADI unmasked with {real} (composed: {live})"
        event(f"store: {'own fake pair' if msg in map(fake_pair, mine) else 'other'}")
        if how == "slot" and msg in map(fake_pair, mine) and not ctrl & 1 and vadi.ims_page_kind == "trap":
            event("store: own fake pair, unmasked")
            c = next(c for c in mine.values() if fake_pair(c.handle) == msg)
            real = lab.real_slot(vadi, idx)
            assert real == (*c.real, 0), (real, c.real)
            res = lab.interrupt(vadi.pf_rid, real[0] | real[1] << 32, real[2], None)
            assert type(res) is Remapped and res.index == irte_index(c.real), f"case 4 not delivered: {res!r}"

    @rule(data=st.data())
    def emit(self, data):
        """Any guest's device sends whatever its storage holds, with the hardware-stamped identity."""
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
            dev = data.draw(st.sampled_from(lab.adis_of(vm)), label="adi")
            addr, d = data.draw(attack_messages(lab), label="msg")
            msg = (addr, d)
            res = lab.interrupt(dev.pf_rid, addr, d, dev.pasid if dev.tags_pasid else None)
        else:
            every = [(a, i) for a in lab.adis_of(vm) for i in range(len(a.slots))]
            armed = [(a, i) for a, i in every if not lab.real_slot(a, i)[3] & 1]
            dev, i = (mostly(data, st.sampled_from(armed), st.sampled_from(every), "slot") if armed
                      else data.draw(st.sampled_from(every), label="slot"))
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
        cands = [(vm, c) for vm in lab.live_vms() for c in vm.composes.values() if c.kind == "remapped"]
        cands += [(None, v) for v in lab.host_irqs]
        if not cands:
            return
        vm, c = data.draw(st.sampled_from(cands), label="compose")
        if vm is None:
            sid, _, pasid = lab.host_meta[c]
            msg = irq_chip_compose_msi_msg(lab.kernel.irq.irq_get_irq_data(c))
            lo, hi, d, want = msg.address_lo, msg.address_hi, msg.data, lab.virq_index(c)
        else:
            lo, hi, d = c.real
            want = irte_index(c.real)
            if isinstance(c.vf, VirtualAdi):
                sid, pasid = c.vf.pf_rid, (c.vf.pasid if c.vf.tags_pasid else None)
            else:
                sid, pasid = c.vf.host_rid, None
        res = lab.interrupt(sid, lo | hi << 32, d, pasid)
        if isinstance(res, str):
            assert vm is None, "the VMM composed a memory-IMS message the root complex drops"
            return
        assert type(res) is Remapped and res.index == want, f"a legitimate message was not delivered: {res!r}"

    # --- the host -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.lab.host_irqs) < 24)
    @rule(data=st.data())
    def host_alloc(self, data):
        lab = self.lab
        who = data.draw(st.sampled_from(["host", "host-adi-mem", "vf-msix"]), label="who")
        if who == "host":
            lab.host_alloc("host", data.draw(st.sampled_from([SRIOV_PF, SIOV_PF, SIOV_PF2, HOST_VF]), label="sid"))
        elif who == "host-adi-mem":
            bind = HOST_ADI_PASID if lab.tags and lab.platform["pasid_ir"] else None
            lab.host_alloc("host", SIOV_PF, bind, HOST_ADI_PASID if lab.tags else None)
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
                assert e.present and e.mode == 0 and e.svt == SVT_SID and e.sq == 0
                assert e.sid == (c.vf.pf_rid if adi else c.vf.host_rid)
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

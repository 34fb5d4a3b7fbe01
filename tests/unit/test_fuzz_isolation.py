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
from hypothesis import HealthCheck, find, note, settings
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
GUEST_DEV_SLOTS = 4
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
        for i in range(16 * 256):
            self.lab.hw.mem.pop(base + i, None)
        for s in range(256):                 # reset: every slot masked
            self.lab.hw.mem[base + 16 * s + 0xC] = 1


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
        # host-allocated IRTEs: virq -> owner ("host", or a guest for its VF's MSI-X forwarders)
        self.host_irqs: dict[int, str] = {}
        self.memslot: dict[tuple[str, int], tuple[int, int]] = {}   # (vm, adi id) -> (addr, data)
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



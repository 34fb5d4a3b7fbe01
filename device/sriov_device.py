"""An SR-IOV endpoint: one PF at devfn 0 plus up to TotalVFs VFs (SR-IOV 1.1).

This is the whole device as its process shell sees it: one pure, synchronous
object with a single entry point::

    emits = device.handle_tlp(tlp)     # -> list[Emit], send in list order

Theory of operation
-------------------
*Bus number.*  Like a real endpoint the device has no bus number of its own
until configuration requests arrive: it captures it from the target ID of
Type-0 CfgRd/CfgWr addressed to devfn 0.  The bus may only change while no VF
exists (VF RIDs are fixed when VF Enable is set).  The spec captures on CfgWr
only; capturing on CfgRd too (as cocotbext does) makes no observable
difference because the device emits nothing before it has been written.

*Routing.*  Type-0 configuration requests are routed by the full 16-bit target
ID to the PF or a VF (VFs can carry into the next bus number); an unknown
target gets a UR completion.  CfgWr gets a Cpl with SC.  Memory requests are
decoded against the *enabled* windows: the PF's BAR0 when its Command.MSE is
set, and VF i's window ``VF BAR0 + i * size`` when VF Enable and VF MSE are
set.  The window list is rebuilt lazily after any config write or FLR, so the
MMIO/doorbell path is a short scan over a list of tuples.  MRd that hits
nothing -> UR Cpl; MWr that hits nothing -> dropped and counted.  Completions
(answers to DMA reads, none yet) go to ``on_completion`` or are dropped.

*VF lifetime.*  The PF's SR-IOV capability reports every change of VF Enable /
VF MSE; VF Enable 0->1 creates NumVFs VFs in power-on state, 1->0 (or a PF FLR,
which clears VF Enable) destroys them.

Requests the device starts (DMA, MSI-X and IMS MWr) carry the originating
function's RID as requester ID (an IMS MWr also its slot's PASID, see
``device.ims``); completions carry the completing function's
RID as completer ID (the PF's for UR to unknown targets/addresses).  Interrupt
MWrs also carry that RID out of band as ``Emit.origin``.
"""

from __future__ import annotations

from typing import Any, Callable

from device.caps.sriov import SriovCap
from device.emit import Emit
from device.engine import EngineShared
from device.function import BAR0_SIZE, Function
from fabric.bdf import rid_str
from fabric.tlp import CplStatus, Tlp, TlpType

__all__ = ["Emit", "SriovDevice"]

SRIOV_CAP_OFFSET = 0x100


class SriovDevice:
    """PF + VFs behind one link; ``handle_tlp`` is the shell's only entry point."""

    def __init__(
        self,
        vendor_id: int = 0x1B36,
        device_id: int = 0x11A0,
        vf_device_id: int = 0x11A1,
        total_vfs: int = 4,
        pf_vectors: int = 8,
        vf_vectors: int = 4,
        first_vf_offset: int = 1,
        vf_stride: int = 1,
        pf_ims_slots: int = 0,
        vf_ims_slots: int = 0,
        pasid_interrupts: bool = True,
        irq_generator: bool = False,
    ) -> None:
        """``*_ims_slots``: IMS slots (kind ``device``, BAR0 + 0x1000) of the PF / of each VF,
        0 = none.  ``pasid_interrupts``: whether the device can PASID-tag interrupt MWrs
        (``device.ims``).  ``irq_generator``: the engines' IRQ_BURST works (``device.engine``)."""
        self.vendor_id = vendor_id
        self.vf_vectors = vf_vectors
        self.vf_ims_slots = vf_ims_slots
        self.pasid_interrupts = pasid_interrupts
        self.engines = EngineShared(irq_generator)   # what its engines share (device.engine)
        self.bus = 0
        self.pf = Function(0, vendor_id=vendor_id, device_id=device_id, vectors=pf_vectors, on_flr=self._pf_flr,
                           ims_slots=pf_ims_slots, pasid_interrupts=pasid_interrupts, engines=self.engines)
        self.sriov = SriovCap(
            total_vfs=total_vfs,
            vf_device_id=vf_device_id,
            first_vf_offset=first_vf_offset,
            vf_stride=vf_stride,
            vf_bars={0: BAR0_SIZE},
            on_change=self._sriov_changed,
        )
        self.pf.cfg.add_ext_capability(self.sriov, SRIOV_CAP_OFFSET)
        self.pf.cfg.seal()

        self.vfs: list[Function] = []
        self._by_rid: dict[int, Function] = {self.pf.rid: self.pf}
        self._windows: list[tuple[int, int, Function]] = []
        self._decode_dirty = True
        self.on_completion: Callable[[Tlp], list[Emit]] | None = None

        # device-level counters
        self.cfg_ur = 0
        self.mrd_unmapped = 0
        self.mwr_unmapped = 0
        self.poisoned_dropped = 0
        self.cpl_unexpected = 0
        self.unsupported = 0

        self._handlers: dict[int, Callable[[Tlp], list[Emit]]] = {
            TlpType.MEM_WRITE: self._mem_write,
            TlpType.MEM_WRITE_64: self._mem_write,
            TlpType.MEM_READ: self._mem_read,
            TlpType.MEM_READ_64: self._mem_read,
            TlpType.CFG_READ_0: self._cfg_read,
            TlpType.CFG_WRITE_0: self._cfg_write,
            TlpType.CPL: self._completion,
            TlpType.CPL_DATA: self._completion,
        }

    # ---- the entry point -------------------------------------------------------------------------

    def handle_tlp(self, tlp: Tlp) -> list[Emit]:
        """Consume one TLP from the link; return the TLPs to send, in order."""
        handler = self._handlers.get(tlp.type)
        if handler is None:
            self.unsupported += 1
            return []
        return handler(tlp)

    # ---- memory requests (the hot path) ----------------------------------------------------------

    def _decode(self, address: int) -> tuple[Function | None, int]:
        if self._decode_dirty:
            self._rebuild_decode()
        for base, limit, fn in self._windows:
            if base <= address < limit:
                return fn, address - base
        return None, 0

    def _mem_write(self, tlp: Tlp) -> list[Emit]:
        fn, off = self._decode(tlp.address)
        if fn is None:
            self.mwr_unmapped += 1
            return []
        if tlp.ep:
            self.poisoned_dropped += 1
            return []
        return fn.mmio_write(off, tlp)

    def _mem_read(self, tlp: Tlp) -> list[Emit]:
        fn, off = self._decode(tlp.address)
        if fn is None:
            self.mrd_unmapped += 1
            return [Emit(Tlp.completion(tlp, self.pf.rid, CplStatus.UR))]
        return [Emit(Tlp.completion(tlp, fn.rid, CplStatus.SC, fn.mmio_read(off, tlp.length)))]

    def _rebuild_decode(self) -> None:
        windows: list[tuple[int, int, Function]] = []
        pf = self.pf
        if pf.cfg.memory_space_enabled:
            base = pf.bar0_address
            windows.append((base, base + BAR0_SIZE, pf))
        if self.vfs and self.sriov.vf_mse:
            base = self.sriov.vf_bar_address(0)
            size = self.sriov.vf_bar_size(0)
            for i, vf in enumerate(self.vfs):
                windows.append((base + i * size, base + (i + 1) * size, vf))
        self._windows = windows
        self._decode_dirty = False

    # ---- configuration requests ------------------------------------------------------------------

    def _target(self, tlp: Tlp) -> Function | None:
        target = tlp.completer_id & 0xFFFF
        if target & 0xFF == 0 and not self.vfs and target >> 8 != self.bus:
            self._set_bus(target >> 8)
        return self._by_rid.get(target)

    def _cfg_read(self, tlp: Tlp) -> list[Emit]:
        fn = self._target(tlp)
        if fn is None:
            self.cfg_ur += 1
            return [Emit(Tlp.completion(tlp, self.pf.rid, CplStatus.UR, byte_count=4, lower_address=0))]
        value = fn.config_read(tlp.address, tlp.first_be)
        return [Emit(Tlp.completion(tlp, fn.rid, CplStatus.SC, value.to_bytes(4, "little"),
                                    byte_count=4, lower_address=0))]

    def _cfg_write(self, tlp: Tlp) -> list[Emit]:
        fn = self._target(tlp)
        if fn is None:
            self.cfg_ur += 1
            return [Emit(Tlp.completion(tlp, self.pf.rid, CplStatus.UR, byte_count=4, lower_address=0))]
        value = int.from_bytes(tlp.data[0:4], "little")
        # Completion first: an FLR or VF Enable inside the write must not change who completes it.
        out = [Emit(Tlp.completion(tlp, fn.rid, CplStatus.SC, byte_count=4, lower_address=0))]
        out += fn.config_write(tlp.address, value, tlp.first_be)
        self._decode_dirty = True
        return out

    def _set_bus(self, bus: int) -> None:
        self.bus = bus & 0xFF
        self.pf.rid = self.bus << 8
        self._by_rid = {self.pf.rid: self.pf}

    # ---- completions -----------------------------------------------------------------------------

    def _completion(self, tlp: Tlp) -> list[Emit]:
        if self.on_completion is not None:
            return self.on_completion(tlp)
        fn = self._by_rid.get(tlp.requester_id)     # a read of a DMA copy (device.engine DMA_GO)
        out = fn.dma_completion(tlp) if fn is not None else None
        if out is None:
            self.cpl_unexpected += 1
            return []
        return out

    # ---- SR-IOV ----------------------------------------------------------------------------------

    def _sriov_changed(self) -> None:
        want = self.sriov.num_vfs if self.sriov.vf_enable else 0
        if want != len(self.vfs):
            self._destroy_vfs()
            for i in range(want):
                self._create_vf(i)
        self._decode_dirty = True

    def _create_vf(self, index: int) -> None:
        vf = Function(
            self.sriov.vf_rid(self.pf.rid, index),
            vendor_id=self.vendor_id,
            device_id=self.sriov.vf_device_id,
            vectors=self.vf_vectors,
            is_vf=True,
            vf_index=index,
            on_flr=self._vf_flr,
            ims_slots=self.vf_ims_slots,
            pasid_interrupts=self.pasid_interrupts,
            engines=self.engines,
        )
        self.vfs.append(vf)
        self._by_rid[vf.rid] = vf

    def _destroy_vfs(self) -> None:
        for vf in self.vfs:
            self._by_rid.pop(vf.rid, None)
        self.vfs.clear()

    def _pf_flr(self, pf: Function) -> None:
        # PF FLR clears VF Enable (SR-IOV 3.3.3.1): the VFs go away.
        self._destroy_vfs()
        self._decode_dirty = True

    def _vf_flr(self, vf: Function) -> None:
        self._decode_dirty = True

    # ---- control interface -----------------------------------------------------------------------

    def functions(self) -> dict[int, Function]:
        """RID -> function, PF first then VFs in index order."""
        return dict(self._by_rid)

    def function_level_reset(self, rid: int) -> bool:
        """FLR the function with routing ID ``rid``; False if there is none."""
        fn = self._by_rid.get(rid)
        if fn is None:
            return False
        fn.flr()
        self._decode_dirty = True
        return True

    def snapshot(self) -> dict[str, Any]:
        """Counters and state for the control interface (msgpack-friendly)."""
        functions: dict[str, Any] = {}
        for rid, fn in self._by_rid.items():
            functions[rid_str(rid)] = {
                "rid": rid,
                "kind": "VF" if fn.is_vf else "PF",
                "vf_index": fn.vf_index,
                "bus_master": fn.msix.bus_master,
                "msix_enabled": fn.msix.enabled,
                "irq_mode": "ims" if fn.engine.irq_mode else "msix",
                "ims_slots": fn.engine.ims_cap,
                "ims": fn.ims.snapshot() if fn.ims is not None else [],
                "completed": fn.engine.completed,
                **fn.counters(),
            }
        return {
            "bus": self.bus,
            "vf_enable": self.sriov.vf_enable,
            "vf_mse": self.sriov.vf_mse,
            "num_vfs": len(self.vfs),
            "counters": {
                "cfg_ur": self.cfg_ur,
                "mrd_unmapped": self.mrd_unmapped,
                "mwr_unmapped": self.mwr_unmapped,
                "poisoned_dropped": self.poisoned_dropped,
                "cpl_unexpected": self.cpl_unexpected,
                "unsupported": self.unsupported,
            },
            "functions": functions,
        }

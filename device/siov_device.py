"""A Scalable-IOV endpoint: one PF at devfn 0 whose ADIs share its RID and differ by PASID.

The whole device as its process shell sees it, the same shape as
``device.sriov_device``::

    emits = device.handle_tlp(tlp)     # -> list[Emit], send in list order

Config space (devfn 0 only)::

    0x000  type-0 header: BAR0 = 16 KiB (PF registers), BAR2 = ADI portals (both 32-bit memory)
    0x040  PCI Express capability v2 (FLR capable: an FLR resets the PF and every ADI)
    0x07C  MSI-X capability (pf_vectors; table/PBA in BAR0 pages 2/3)
    0x100  PASID extended capability (``device.caps.pasid``: Max PASID Width 20, no exec/priv)
    0x108  Intel Scalable IOV DVSEC (``device.caps.dvsec``: vendor 0x8086, ID 5, IMS supported)

BAR0 (16 KiB) is a ``device.function.Function``'s, plus the ADI management
registers in page 0 above the engine's::

    +---------+-------------------------------------------------------------------+
    | 0x0000  | page 0: PF work engine (``device.engine``, 0x00-0x34)             |
    | 0x0100  |         ADI_CAP     RO  bits 15:0 = number of ADIs, bit 31 = the  |
    |         |                         device PASID-tags interrupt MWrs (the     |
    |         |                         ``pasid_interrupts`` knob), 30:16 = 0     |
    | 0x0200  |         ADI table, 8 bytes per ADI i at 0x200 + 8 * i:            |
    |         |           +0 ADI_CTRL  bit0 EN, bit1 PE (PASID Enable),           |
    |         |                        bit2 MIE (memory IMS allowed),             |
    |         |                        bit31 write 1 = ADI reset (reads 0)        |
    |         |           +4 ADI_PASID bits 19:0 RW                               |
    | 0x1000  | page 1: PF IMS slots (pf_ims_slots, may be 0: reads 0)            |
    | 0x2000  | page 2: PF MSI-X table                                            |
    | 0x3000  | page 3: PF MSI-X PBA                                              |
    +---------+-------------------------------------------------------------------+

Only the PF's owner (the host) reaches BAR0: the ADI table says which PASID
each ADI wears, so a VMM never maps BAR0 into a guest.  What it maps is an
ADI's slice of BAR2::

    BAR2 (size = next power of two of adis * 0x2000, at least 0x2000)
    +-----------------+---------------------------------------------------------+
    | i * 0x2000      | ADI i page 0: its work engine (``device.adi``)          |
    | i * 0x2000 + 4K | ADI i page 1: its device-kind IMS slots                 |
    | adis * 0x2000.. | holes: read 0, writes ignored                           |
    +-----------------+---------------------------------------------------------+

Theory of operation
-------------------
*Bus number and config.*  As ``SriovDevice``: the bus is captured from the
target ID of Type-0 config requests to devfn 0; any other devfn gets a UR
completion (an SIOV device has one function, the ADIs are not functions).
CfgWr gets a Cpl with SC, sent before anything the write causes.

*Memory decode.*  BAR0 and BAR2 decode only while the PF's Command.MSE is set
(MRd that hits nothing -> UR Cpl; MWr -> dropped and counted).  BAR0 goes to the
PF (``Function`` with the management registers hooked in), BAR2 to ADI
``offset // 0x2000``.  Poisoned MWrs are dropped.

*Who sends what.*  The PF's own engine, MSI-X and IMS behave as on any
``Function``: requester = PF RID, origin = ``function_origin(rid)`` (= RID).
Everything an ADI starts also carries the PF's RID, plus a PASID prefix as
described in ``device.adi``; its interrupts carry ``adi_origin(rid, i)`` out of
band.  ADI traffic needs the PF's Bus Master Enable *and* the ADI's EN bit.

*Completions* answer memory-IMS slot reads.  They are matched by tag in the
device's ``FetchTable`` (the ADIs share the PF's RID and so its 32 tags) and
must be addressed to the PF's RID; anything else is counted (``cpl_unexpected``,
or ``cpl_orphaned`` for a read whose ADI was reset meanwhile) and dropped.

*Resets.*  PF FLR (Device Control, or ``function_level_reset``): config space,
PF registers, every ADI to power-on and every fetch tag freed.  ADI reset
(ADI_CTRL bit 31, or ``adi_reset(i)``): that ADI's engine, IMS slots and
in-flight fetches.
"""

from __future__ import annotations

from typing import Any, Callable

from device.adi import ADI_PORTAL_SIZE, ADI_MAX_IMS_SLOTS, DEFAULT_IMS_MEM_SLOTS, Adi, FetchTable
from device.caps.dvsec import IntelSiovDvsec
from device.caps.pasid import PasidCap
from device.config import BE_MASK, PCI_COMMAND
from device.emit import Emit
from device.engine import EngineShared
from device.function import BAR0_SIZE, IMS_OFFSET, Function
from fabric.bdf import rid_str
from fabric.provenance import function_origin
from fabric.tlp import CplStatus, Tlp, TlpType

__all__ = ["Emit", "SiovDevice", "ADI_CAP", "ADI_CAP_COUNT", "ADI_CAP_PASID_INTERRUPTS", "ADI_TABLE", "ADI_ENTRY_SIZE", "ADI_CTRL", "ADI_PASID",
           "MAX_ADIS", "PASID_CAP_OFFSET", "SIOV_DVSEC_OFFSET", "BAR2_INDEX", "bar2_size"]

PASID_CAP_OFFSET = 0x100
SIOV_DVSEC_OFFSET = 0x108
BAR2_INDEX = 2
PCI_BASE_ADDRESS_2 = 0x18

ADI_CAP = 0x100
ADI_CAP_COUNT = 0xFFFF
ADI_CAP_PASID_INTERRUPTS = 1 << 31
ADI_TABLE = 0x200
ADI_ENTRY_SIZE = 8
ADI_CTRL = 0x0
ADI_PASID = 0x4
MAX_ADIS = (IMS_OFFSET - ADI_TABLE) // ADI_ENTRY_SIZE  # 448


def bar2_size(adis: int) -> int:
    """BAR2 size for ``adis`` ADIs: next power of two of adis * 0x2000, at least 0x2000."""
    need = max(adis, 1) * ADI_PORTAL_SIZE
    return 1 << (need - 1).bit_length()


class _Hole:
    """BAR2 beyond the last ADI: decoded (the BAR claims it) but empty -- reads 0, writes ignored."""

    __slots__ = ()

    @staticmethod
    def mmio_read(off: int, length: int) -> bytes:
        return bytes(4 * length)

    @staticmethod
    def mmio_write(off: int, tlp: Tlp) -> list[Emit]:
        return []


_HOLE = _Hole()


class SiovPf(Function):
    """The SIOV PF: a ``Function`` whose BAR0 page 0 also holds the ADI management registers."""

    __slots__ = ("device",)

    def _read_dw(self, off: int) -> int:
        if ADI_CAP <= off < IMS_OFFSET:
            return self.device.mgmt_read(off)
        return Function._read_dw(self, off)

    def _write_dw(self, off: int, value: int, be: int) -> list[Emit]:
        if ADI_CAP <= off < IMS_OFFSET:
            self.device.mgmt_write(off, value, be)
            return []
        return Function._write_dw(self, off, value, be)


class SiovDevice:
    """PF + ADIs behind one link; ``handle_tlp`` is the shell's only entry point."""

    def __init__(
        self,
        vendor_id: int = 0x1B36,
        device_id: int = 0x11A2,
        adis: int = 4,
        adi_ims_slots: int = 8,
        pf_vectors: int = 8,
        pf_ims_slots: int = 0,
        pasid_interrupts: bool = True,
        irq_generator: bool = False,
    ) -> None:
        """``adis``: ADIs (0..448).  ``adi_ims_slots``: device-kind IMS slots per ADI (0..256; each
        ADI also has 16 memory-kind slots).  ``pf_ims_slots``: the PF's own IMS (BAR0 page 1).
        ``pasid_interrupts``: whether the device can PASID-tag interrupt MWrs (case 3 vs 4).
        ``irq_generator``: the engines' IRQ_BURST works (``device.engine``)."""
        if not 0 <= adis <= MAX_ADIS:
            raise ValueError(f"{adis} ADIs do not fit in the ADI table (0..{MAX_ADIS})")
        if not 0 <= adi_ims_slots <= ADI_MAX_IMS_SLOTS:
            raise ValueError(f"{adi_ims_slots} IMS slots per ADI do not fit in a page (0..{ADI_MAX_IMS_SLOTS})")
        self.vendor_id = vendor_id
        self.pasid_interrupts = pasid_interrupts
        self.engines = EngineShared(irq_generator)   # what its engines share (device.engine)
        self.bus = 0
        pf = self.pf = SiovPf(0, vendor_id=vendor_id, device_id=device_id, vectors=pf_vectors,
                              on_flr=self._pf_flr, ims_slots=pf_ims_slots, pasid_interrupts=pasid_interrupts,
                              engines=self.engines)
        pf.device = self
        self.bar2_size = bar2_size(adis)
        pf.cfg.add_bar(BAR2_INDEX, self.bar2_size)
        self.pasid_cap = PasidCap(max_pasid_width=20)
        pf.cfg.add_ext_capability(self.pasid_cap, PASID_CAP_OFFSET)
        if pf.ims is not None:
            pf.ims.pasid_enabled = lambda: self.pasid_cap.enabled
        self.dvsec = IntelSiovDvsec(ims_supported=True)
        pf.cfg.add_ext_capability(self.dvsec, SIOV_DVSEC_OFFSET)
        pf.cfg.add_hook(PCI_COMMAND, 2, self._command_written)
        pf.cfg.seal()

        self.fetches = FetchTable()
        self._adis = [Adi(i, self, ims_slots=adi_ims_slots, ims_mem_slots=DEFAULT_IMS_MEM_SLOTS,
                          engines=self.engines)
                      for i in range(adis)]
        self._bar0: int | None = None
        self._bar2: int | None = None
        self._decode_dirty = True
        self.on_completion: Callable[[Tlp], list[Emit]] | None = None

        # device-level counters
        self.cfg_ur = 0
        self.mrd_unmapped = 0
        self.mwr_unmapped = 0
        self.poisoned_dropped = 0
        self.cpl_unexpected = 0
        self.cpl_orphaned = 0
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

    # ---- what the ADIs ask of their device (device.adi.AdiHost) ----------------------------------

    @property
    def rid(self) -> int:
        return self.pf.rid

    @property
    def bus_master(self) -> bool:
        return self.pf.cfg.bus_master_enabled

    @property
    def pasid_enabled(self) -> bool:
        return self.pasid_cap.enabled

    # ---- the entry point -------------------------------------------------------------------------

    def handle_tlp(self, tlp: Tlp) -> list[Emit]:
        """Consume one TLP from the link; return the TLPs to send, in order."""
        handler = self._handlers.get(tlp.type)
        if handler is None:
            self.unsupported += 1
            return []
        return handler(tlp)

    # ---- memory requests -------------------------------------------------------------------------

    def _decode(self, address: int) -> tuple[Function | Adi | _Hole | None, int]:
        """(target, offset): the PF and a BAR0 offset, an ADI and a portal offset, or (None, 0)."""
        if self._decode_dirty:
            self._rebuild_decode()
        base = self._bar0
        if base is not None and base <= address < base + BAR0_SIZE:
            return self.pf, address - base
        base = self._bar2
        if base is not None and base <= address < base + self.bar2_size:
            off = address - base
            i = off // ADI_PORTAL_SIZE
            if i < len(self._adis):
                return self._adis[i], off - i * ADI_PORTAL_SIZE
            return _HOLE, 0
        return None, 0

    def _rebuild_decode(self) -> None:
        cfg = self.pf.cfg
        if cfg.memory_space_enabled:
            self._bar0 = self.pf.bar0_address
            self._bar2 = cfg.bar_address(PCI_BASE_ADDRESS_2)
        else:
            self._bar0 = self._bar2 = None
        self._decode_dirty = False

    def _mem_write(self, tlp: Tlp) -> list[Emit]:
        target, off = self._decode(tlp.address)
        if target is None:
            self.mwr_unmapped += 1
            return []
        if tlp.ep:
            self.poisoned_dropped += 1
            return []
        return target.mmio_write(off, tlp)

    def _mem_read(self, tlp: Tlp) -> list[Emit]:
        target, off = self._decode(tlp.address)
        rid = self.pf.rid
        if target is None:
            self.mrd_unmapped += 1
            return [Emit(Tlp.completion(tlp, rid, CplStatus.UR))]
        return [Emit(Tlp.completion(tlp, rid, CplStatus.SC, target.mmio_read(off, tlp.length)))]

    # ---- ADI management registers (PF BAR0 page 0) -----------------------------------------------

    def mgmt_read(self, off: int) -> int:
        """DW at BAR0 offset ``off`` in [0x100, 0x1000)."""
        if off == ADI_CAP:
            return len(self._adis) | (ADI_CAP_PASID_INTERRUPTS if self.pasid_interrupts else 0)
        if off >= ADI_TABLE:
            i, field = divmod(off - ADI_TABLE, ADI_ENTRY_SIZE)
            if i < len(self._adis):
                adi = self._adis[i]
                return adi.ctrl if field == ADI_CTRL else adi.pasid
        return 0

    def mgmt_write(self, off: int, value: int, be: int = 0xF) -> None:
        """DW write at BAR0 offset ``off`` in [0x100, 0x1000) with byte enables ``be``."""
        if off < ADI_TABLE:
            return
        i, field = divmod(off - ADI_TABLE, ADI_ENTRY_SIZE)
        if i >= len(self._adis):
            return
        if be != 0xF:
            m = BE_MASK[be]
            value = (self.mgmt_read(off) & ~m) | (value & m)
        adi = self._adis[i]
        if field == ADI_CTRL:
            adi.write_ctrl(value)
        else:
            adi.write_pasid(value)

    # ---- configuration requests ------------------------------------------------------------------

    def _target(self, tlp: Tlp) -> SiovPf | None:
        target = tlp.completer_id & 0xFFFF
        if target & 0xFF:
            return None
        if target >> 8 != self.bus:
            self._set_bus(target >> 8)
        return self.pf

    def _cfg_read(self, tlp: Tlp) -> list[Emit]:
        pf = self._target(tlp)
        if pf is None:
            self.cfg_ur += 1
            return [Emit(Tlp.completion(tlp, self.pf.rid, CplStatus.UR, byte_count=4, lower_address=0))]
        value = pf.config_read(tlp.address, tlp.first_be)
        return [Emit(Tlp.completion(tlp, pf.rid, CplStatus.SC, value.to_bytes(4, "little"),
                                    byte_count=4, lower_address=0))]

    def _cfg_write(self, tlp: Tlp) -> list[Emit]:
        pf = self._target(tlp)
        if pf is None:
            self.cfg_ur += 1
            return [Emit(Tlp.completion(tlp, self.pf.rid, CplStatus.UR, byte_count=4, lower_address=0))]
        value = int.from_bytes(tlp.data[0:4], "little")
        # Completion first: an FLR inside the write must not change who completes it.
        out = [Emit(Tlp.completion(tlp, pf.rid, CplStatus.SC, byte_count=4, lower_address=0))]
        out += pf.config_write(tlp.address, value, tlp.first_be)
        self._decode_dirty = True
        return out

    def _set_bus(self, bus: int) -> None:
        self.bus = bus & 0xFF
        self.pf.rid = self.bus << 8

    def _command_written(self, reg: int, old: int, new: int) -> None:
        for adi in self._adis:
            adi.sync_gate()

    # ---- completions (memory-IMS slot reads) -----------------------------------------------------

    def _completion(self, tlp: Tlp) -> list[Emit]:
        if tlp.requester_id == self.pf.rid:
            entry = self.fetches.take(tlp.tag)
            if entry is not None:
                adi, slot, address = entry
                if adi < 0:
                    self.cpl_orphaned += 1
                    return self._issue_waiting()
                return self._adis[adi].fetch_completed(tlp, slot, address) + self._issue_waiting()
        if self.on_completion is not None:
            return self.on_completion(tlp)
        self.cpl_unexpected += 1
        return []

    def _issue_waiting(self) -> list[Emit]:
        """A tag came free: start the reads that queued for one, oldest first."""
        out: list[Emit] = []
        fetches = self.fetches
        while fetches.waiting and fetches.has_free():
            index, slot, address = fetches.waiting.popleft()
            adi = self._adis[index]
            if not adi.gate_open:
                adi.ims_mem_blocked += 1
                continue
            tag = fetches.alloc(index, slot, address)
            adi.ims_mem_fetches += 1
            out.append(Emit(Tlp.mem_read(address, 16, self.pf.rid, tag=tag, pasid=adi.dma_pasid), None))
        return out

    # ---- resets ----------------------------------------------------------------------------------

    def _pf_flr(self, pf: Function) -> None:
        self.fetches.clear()
        for adi in self._adis:
            adi.power_on()
        self._decode_dirty = True

    def function_level_reset(self, rid: int) -> bool:
        """FLR the function with routing ID ``rid`` (only the PF exists); False if there is none."""
        if rid != self.pf.rid:
            return False
        self.pf.flr()
        self._decode_dirty = True
        return True

    def adi_reset(self, index: int) -> bool:
        """Reset ADI ``index`` (engine, IMS slots, in-flight fetches); False if there is none."""
        if not 0 <= index < len(self._adis):
            return False
        self._adis[index].reset()
        return True

    # ---- control interface -----------------------------------------------------------------------

    def functions(self) -> dict[int, Function]:
        """RID -> function: just the PF (ADIs are not functions, see ``adis``)."""
        return {self.pf.rid: self.pf}

    def adis(self) -> list[Adi]:
        """The ADIs in index order."""
        return list(self._adis)

    def snapshot(self) -> dict[str, Any]:
        """Counters and state for the control interface (msgpack-friendly)."""
        pf = self.pf
        return {
            "kind": "siov",
            "bus": self.bus,
            "pf_rid": pf.rid,
            "pasid_enable": self.pasid_enabled,
            "pasid_interrupts": self.pasid_interrupts,
            "ims_supported": bool(self.dvsec.capabilities & 1),
            "num_adis": len(self._adis),
            "fetch_tags_in_flight": self.fetches.in_flight(),
            "counters": {
                "cfg_ur": self.cfg_ur,
                "mrd_unmapped": self.mrd_unmapped,
                "mwr_unmapped": self.mwr_unmapped,
                "poisoned_dropped": self.poisoned_dropped,
                "cpl_unexpected": self.cpl_unexpected,
                "cpl_orphaned": self.cpl_orphaned,
                "unsupported": self.unsupported,
            },
            "functions": {
                rid_str(pf.rid): {
                    "rid": pf.rid,
                    "origin": function_origin(pf.rid),
                    "kind": "PF",
                    "vf_index": None,
                    "bus_master": pf.msix.bus_master,
                    "msix_enabled": pf.msix.enabled,
                    "irq_mode": "ims" if pf.engine.irq_mode else "msix",
                    "ims_slots": pf.engine.ims_cap,
                    "ims": pf.ims.snapshot() if pf.ims is not None else [],
                    "completed": pf.engine.completed,
                    **pf.counters(),
                },
            },
            "adis": [adi.snapshot() for adi in self._adis],
        }

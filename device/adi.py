"""Assignable Device Interface (ADI) of a Scalable-IOV PF: portal, engine, IMS of both kinds.

An ADI is the unit a hypervisor assigns to a guest on a SIOV device (DESIGN.md
§1).  It has no RID of its own: every TLP it starts carries the PF's RID, and
the only thing on the wire that tells two ADIs apart is the PASID prefix.  The
device still knows which ADI emitted what; that ground truth travels out of
band as the interrupt's ``origin`` (``fabric.provenance.adi_origin``).

Portal (ADI ``i`` at PF BAR2 + i * 0x2000, two 4 KiB pages)::

    +---------+----------------------------------------------------------------+
    | 0x0000  | page 0: work-engine registers, ``device.engine`` layout, plus   |
    |         |         0x38 QCTX_BASE_LO, 0x3C QCTX_BASE_HI, 0x40 IMS_MEM_SLOTS|
    | 0x1000  | page 1: IMS slots of kind ``device`` (``device.ims``, IDXD     |
    |         |         layout), ``adi_ims_slots`` of them; reads 0 if none     |
    +---------+----------------------------------------------------------------+

Page 0 registers (32-bit, little-endian)::

    off    name               access  meaning
    -----  -----------------  ------  ----------------------------------------------------------
    0x00-0x34                         exactly as ``device.engine`` (ENGINE_ID ... IMS_PENDED),
                                      so the same driver code runs a PF engine and an ADI
    0x28   IRQ_MODE           RW      0 or 1 = device-kind IMS slot IRQ_VECTOR (an ADI has no
                                      MSI-X: mode 0 is its default path, as IDXD backs a guest's
                                      MSI-X vector with an IMS slot); 2 = memory-kind IMS slot
                                      IRQ_VECTOR; writes of any other value are ignored
    0x2C   IMS_CAP            RO      device-kind IMS slots of this ADI (page 1)
    0x30   IMS_SENT           RO      completion interrupts sent: device kind at once (not
                                      replays), memory kind when the slot's CplD arrives
    0x38   QCTX_BASE_LO       RW      queue-context base, a bus address in the ADI owner's
    0x3C   QCTX_BASE_HI       RW      memory, [63:4] (bits 3:0 read 0: slots are 16-byte aligned)
    0x40   IMS_MEM_SLOTS      RO      memory-kind IMS slots the queue context may hold (16)
    0x60   CMPL_FORMAT        RW      as ``device.engine``: 1 = DWORD completion records (the
                                      cookie alone, one full-DW MWr, PASID-tagged as DMA)

Memory-kind IMS slot ``s`` = 16 bytes at ``QCTX_BASE + 16 * s`` in the owner's
RAM, the IDXD slot layout of ``device.ims`` (addr lo, addr hi, data, ctrl; ctrl
bit 0 = mask).  The owner writes it with plain stores: nobody can trap them.

Management registers (the ADI's row of the table in PF BAR0 page 0; only the
PF's owner, the host, reaches BAR0)::

    ADI_CTRL   31 30                   3   2     1     0
              +---+---------------------+-----+-----+-----+
              |RST|      reserved       | MIE | PE  | EN  |
              +---+---------------------+-----+-----+-----+
       EN  Enable: the ADI may start TLPs (also needs the PF's Bus Master Enable)
       PE  PASID Enable: tag the ADI's TLPs with ADI_PASID (also needs the PF's
           PASID capability Enable)
       MIE Memory-IMS Enable: IRQ_MODE 2 (a message fetched from the owner's memory) is
           honoured only when the PF's owner set this bit.  A VMM sets it only where a
           message stored in guest memory is safe (tagged interrupts, PASID-checking
           IRTEs): the portal is the guest's, so without this gate a guest could select
           memory IMS on its own and send whatever it stored there (found by fuzzing)
       RST write 1 = reset the ADI (engine, IMS slots, pending fetches), then the
           write's EN/PE land; reads 0
    ADI_PASID  bits 19:0 RW: the PASID this ADI's TLPs carry; bits 31:20 read 0

Theory of operation
-------------------
*Tagging.*  Every TLP the ADI starts has requester ID = the PF's RID.  A DMA
request (completion-record MWr, memory-IMS slot MRd) carries a PASID prefix
with ADI_PASID iff ADI_CTRL.PE and the PF's PASID Enable are set.  An
interrupt MWr carries it only if, in addition, the device-level knob
``pasid_interrupts`` is set: the thread's case 3 (tagged) versus case 4 ("This
SIOV device cannot tag interrupts with PASID").  A memory-kind slot's message is
always tagged then; a device-kind slot's only when its ctrl PASID-enable (bit 3)
is set: the slot's writer (the owner's kernel, or the VMM when the page is
trapped) decides.  The PASID itself always comes from ADI_PASID, which only the
host programs, never from the slot's ctrl PASID field (stored and read back,
IDXD layout) nor from a memory slot (guest RAM).

*Doorbell.*  A full-DW write to DOORBELL completes one work item if the gate
(PF BME and ADI EN) is open, the ring is programmed and the work queue has room
(``device.engine``: WQ_DEPTH beyond CMPL_HEAD), else it is dropped
(``doorbells_dropped``; ``wq_full``).  On the wire, in list order:

    1. MWr of the completion record (``device.engine``), PASID-tagged as DMA;
    2. IRQ_MODE 0/1: the device-kind IMS slot's MWr (mask -> pending -> replay
       on unmask, as ``device.ims``);
       IRQ_MODE 2: an MRd of the 16-byte memory slot, tag from the device's
       fetch table, PASID-tagged as DMA.  When its CplD arrives the ADI sends
       one MWr with exactly the fetched address and data -- whatever the owner
       wrote there is what is sent (address bits 1:0 cannot be expressed on
       the wire and are dropped, as for an MSI-X entry).  A fetched slot with
       the mask bit sends nothing (``ims_mem_masked``; memory IMS has no
       pending bit: the device cannot watch RAM for the unmask); a UR/CA or
       malformed completion sends nothing (``ims_mem_fetch_failed``); if the
       gate closed while the read was in flight, nothing either
       (``ims_mem_blocked``).

*Fetch tags.*  The ADIs share the PF's RID, so they share its tag space: one
``FetchTable`` per device, 32 tags (5-bit tags: the PF does not set Extended
Tag Field Supported).  With every tag in flight a memory-IMS doorbell still
writes its record and its slot read waits in a FIFO for the next free tag
(``ims_mem_no_tag`` counts them).  The FIFO holds at most ``FETCH_WAIT_MAX``
reads; beyond that (a flood of doorbells) the read is abandoned
(``ims_mem_fetch_failed``).  An ADI reset drops its queued reads and *orphans* its in-flight fetches: the tag
stays taken until the completion arrives and is then dropped, so a late
completion can never be credited to another ADI that reused the tag.  A PF FLR
frees every tag (the FLR is the recovery of last resort; a completion that
arrives after it for a reused tag is indistinguishable, as on hardware).

*Reset.*  ADI reset: engine registers, device-kind IMS slots (all masked, no
pending) and in-flight fetches; ADI_CTRL and ADI_PASID are the host's and are
kept unless the resetting write changes them.  PF FLR: ``power_on()``, i.e.
also ADI_CTRL = ADI_PASID = 0.  Counters are statistics and survive both.
"""

from __future__ import annotations

from collections import deque

import struct
from typing import Any, Protocol

from device.config import BE_MASK
from device.emit import Emit, mem_write_dw
from device.engine import DOORBELL, IRQ_MODE, EngineShared, WorkEngine
from device.ims import IMS_CTRL_PASID_ENABLE, IMS_CTRL_VECTOR_MASKBIT, IMS_SLOT_SIZE, ImsStore
from fabric.provenance import ADI_FLAG, describe
from fabric.tlp import CplStatus, Tlp, TlpType

__all__ = [
    "Adi",
    "AdiEngine",
    "AdiIms",
    "FetchTable",
    "ADI_PORTAL_SIZE",
    "ADI_ENGINE_OFFSET",
    "ADI_IMS_OFFSET",
    "ADI_MAX_IMS_SLOTS",
    "QCTX_BASE_LO",
    "QCTX_BASE_HI",
    "IMS_MEM_SLOTS",
    "IRQ_MODE_IMS_DEVICE",
    "IRQ_MODE_IMS_MEMORY",
    "DEFAULT_IMS_MEM_SLOTS",
    "ADI_CTRL_ENABLE",
    "ADI_CTRL_PASID_ENABLE",
    "ADI_CTRL_RESET",
    "ADI_CTRL_MEM_IMS_ENABLE",
    "ADI_PASID_MASK",
    "FETCH_TAGS",
]

ADI_PORTAL_SIZE = 0x2000
ADI_ENGINE_OFFSET = 0x0000
ADI_IMS_OFFSET = 0x1000
ADI_MAX_IMS_SLOTS = (ADI_PORTAL_SIZE - ADI_IMS_OFFSET) // IMS_SLOT_SIZE  # 256

QCTX_BASE_LO = 0x38
QCTX_BASE_HI = 0x3C
IMS_MEM_SLOTS = 0x40

IRQ_MODE_IMS_DEVICE = 1     # 0 means the same on an ADI (no MSI-X)
IRQ_MODE_IMS_MEMORY = 2
DEFAULT_IMS_MEM_SLOTS = 16

ADI_CTRL_ENABLE = 0x1
ADI_CTRL_PASID_ENABLE = 0x2
ADI_CTRL_RESET = 0x8000_0000
ADI_CTRL_MEM_IMS_ENABLE = 0x4
ADI_CTRL_RW = ADI_CTRL_ENABLE | ADI_CTRL_PASID_ENABLE | ADI_CTRL_MEM_IMS_ENABLE
ADI_PASID_MASK = 0xF_FFFF

FETCH_TAGS = 32
_SLOT = struct.Struct("<IIII")
_ADDR_MASK = (1 << 64) - 1
_ORPHAN = -1


class AdiHost(Protocol):
    """What an ADI needs from the device it lives in (``SiovDevice`` provides it)."""

    @property
    def rid(self) -> int: ...                   # the PF's RID, stamped on every ADI TLP
    @property
    def bus_master(self) -> bool: ...           # the PF's Command.BME
    @property
    def pasid_enabled(self) -> bool: ...        # the PF's PASID capability Enable
    pasid_interrupts: bool                      # device-level knob: can interrupts be tagged?
    fetches: "FetchTable"


# ---- the device's shared tag space for memory-IMS slot reads -------------------------------------


#: slot reads that may wait for a tag before the fetch engine abandons new ones
FETCH_WAIT_MAX = 1024


class FetchTable:
    """Outstanding memory-IMS slot reads of one device, by tag (the ADIs share the PF's RID)."""

    __slots__ = ("ntags", "_free", "_entries", "orphaned", "waiting")

    def __init__(self, ntags: int = FETCH_TAGS) -> None:
        self.ntags = ntags
        self._entries: list[list[int] | None] = [None] * ntags
        self._free: list[int] = []
        self.orphaned = 0
        # Reads that found every tag in flight wait here, in order, for the next free tag
        # (a device stalls its fetch engine; it does not drop an interrupt).
        self.waiting: deque[tuple[int, int, int]] = deque()
        self.clear()

    def clear(self) -> None:
        """Every tag free (PF FLR)."""
        self._entries = [None] * self.ntags
        self._free = list(range(self.ntags - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.waiting.clear()

    def has_free(self) -> bool:
        return bool(self._free)

    def drop_waiting(self, adi: int) -> int:
        """ADI ``adi`` was reset: forget its queued reads."""
        keep = deque(w for w in self.waiting if w[0] != adi)
        n = len(self.waiting) - len(keep)
        self.waiting = keep
        return n

    def alloc(self, adi: int, slot: int, address: int) -> int | None:
        """A tag for ADI ``adi``'s read of memory slot ``slot`` at ``address``; None if all are in flight."""
        if not self._free:
            return None
        tag = self._free.pop()
        self._entries[tag] = [adi, slot, address]
        return tag

    def take(self, tag: int) -> tuple[int, int, int] | None:
        """Retire ``tag`` (its completion arrived): (adi or -1 if orphaned, slot, address), or None if not in flight."""
        if not 0 <= tag < self.ntags:
            return None
        entry = self._entries[tag]
        if entry is None:
            return None
        self._entries[tag] = None
        self._free.insert(0, tag)  # reuse last: a stray duplicate completion is less likely to match
        return entry[0], entry[1], entry[2]

    def orphan(self, adi: int) -> int:
        """ADI ``adi`` was reset: its reads stay in flight but their completions will be dropped."""
        n = 0
        for entry in self._entries:
            if entry is not None and entry[0] == adi:
                entry[0] = _ORPHAN
                n += 1
        self.orphaned += n
        return n

    def in_flight(self, adi: int | None = None) -> int:
        """Tags in flight (of ADI ``adi`` only, if given; orphans count only in the total)."""
        if adi is None:
            return self.ntags - len(self._free)
        return sum(1 for e in self._entries if e is not None and e[0] == adi)


# ---- the ADI's register blocks --------------------------------------------------------------------


class AdiEngine(WorkEngine):
    """``device.engine`` plus the queue-context registers and the memory-IMS IRQ_MODE."""

    __slots__ = ("ims_mem_slots", "qctx_base")

    def __init__(self, ims_slots: int, ims_mem_slots: int, shared: EngineShared | None = None) -> None:
        self.ims_mem_slots = ims_mem_slots
        super().__init__(ims_slots, shared)

    def reset(self) -> None:
        super().reset()
        self.qctx_base = 0

    def read32(self, off: int) -> int:
        if off == QCTX_BASE_LO:
            return self.qctx_base & 0xFFFFFFFF
        if off == QCTX_BASE_HI:
            return self.qctx_base >> 32
        if off == IMS_MEM_SLOTS:
            return self.ims_mem_slots
        return WorkEngine.read32(self, off)

    def write32(self, off: int, value: int) -> None:
        if off == IRQ_MODE:
            if value <= IRQ_MODE_IMS_MEMORY:
                self.irq_mode = value
        elif off == QCTX_BASE_LO:
            self.qctx_base = (self.qctx_base & ~0xFFFFFFFF) | (value & 0xFFFFFFF0)
        elif off == QCTX_BASE_HI:
            self.qctx_base = (self.qctx_base & 0xFFFFFFFF) | (value & 0xFFFFFFFF) << 32
        else:
            WorkEngine.write32(self, off, value)

    def slot_address(self, slot: int) -> int:
        """Bus address of memory-IMS slot ``slot`` (64-bit arithmetic wraps, as in hardware)."""
        return (self.qctx_base + slot * IMS_SLOT_SIZE) & _ADDR_MASK


class AdiIms(ImsStore):
    """Device-kind IMS slots of one ADI: the message is tagged and attributed as the ADI's."""

    __slots__ = ("adi",)

    def __init__(self, slots: int, adi: "Adi") -> None:
        self.adi = adi
        super().__init__(slots, requester_id=0, pasid_interrupts=False)

    def emit_message(self, address: int, data: int, ctrl: int) -> Emit:
        # A device-kind slot is written by the ADI's owner's kernel (or, trapped, by the VMM):
        # its ctrl.PASID-enable bit says whether the message goes out tagged.  The PASID value
        # is always the ADI's own (the slot's PASID field is not trusted to choose it).
        return self.adi.interrupt(address, data, tagged=bool(ctrl & IMS_CTRL_PASID_ENABLE))


# ---- the ADI ---------------------------------------------------------------------------------------


_COUNTERS = (
    "mem_reads", "mem_writes", "doorbells", "doorbells_dropped", "dma_writes", "ims_invalid",
    "ims_mem_fetches", "ims_mem_sent", "ims_mem_masked", "ims_mem_fetch_failed", "ims_mem_no_tag",
    "ims_mem_blocked", "ims_mem_orphaned", "resets",
)


class Adi:
    """One ADI: management registers, portal (engine + device IMS), memory-IMS fetches."""

    __slots__ = ("index", "host", "engine", "ims", "ctrl", "pasid", *_COUNTERS)

    def __init__(self, index: int, host: AdiHost, *, ims_slots: int = 8,
                 ims_mem_slots: int = DEFAULT_IMS_MEM_SLOTS, engines: EngineShared | None = None) -> None:
        if not 0 <= index <= 0xFFFF:
            raise ValueError(f"ADI index {index} does not fit in 16 bits")
        if not 0 <= ims_slots <= ADI_MAX_IMS_SLOTS:
            raise ValueError(f"{ims_slots} IMS slots do not fit in the ADI's IMS page")
        self.index = index
        self.host = host
        for name in _COUNTERS:
            setattr(self, name, 0)
        self.engine = AdiEngine(ims_slots, ims_mem_slots, engines)
        self.ims = AdiIms(ims_slots, self) if ims_slots else None
        self.ctrl = 0
        self.pasid = 0

    def __repr__(self) -> str:
        return f"<Adi {self.index} of {describe(self.host.rid)} pasid={self.pasid:#x} ctrl={self.ctrl:#x}>"

    # ---- identity and gating ---------------------------------------------------------------------

    @property
    def origin(self) -> int:
        """Out-of-band provenance of this ADI's interrupts (``fabric.provenance.adi_origin``)."""
        return ADI_FLAG | self.index << 16 | self.host.rid

    @property
    def enabled(self) -> bool:
        return bool(self.ctrl & ADI_CTRL_ENABLE)

    @property
    def gate_open(self) -> bool:
        """May the ADI start TLPs: the PF's Bus Master Enable and ADI_CTRL.EN."""
        return bool(self.ctrl & ADI_CTRL_ENABLE) and self.host.bus_master

    @property
    def dma_pasid(self) -> int | None:
        """PASID for the ADI's DMA requests, None = no prefix."""
        if self.ctrl & ADI_CTRL_PASID_ENABLE and self.host.pasid_enabled:
            return self.pasid
        return None

    @property
    def irq_pasid(self) -> int | None:
        """PASID for the ADI's interrupt MWrs: as DMA, and only if the device can tag interrupts."""
        return self.dma_pasid if self.host.pasid_interrupts else None

    def sync_gate(self) -> None:
        """Re-evaluate the gate after a PF Command, ADI_CTRL or reset change (the IMS replay path needs it)."""
        if self.ims is not None:
            self.ims.bus_master = self.gate_open

    def interrupt(self, address: int, data: int, tagged: bool = True) -> Emit:
        """The interrupt MWr of this ADI: ``data`` at ``address``, PF RID, PASID per ``irq_pasid``
        (device-kind slots: only when their ctrl asks for it, ``tagged``)."""
        rid = self.host.rid
        return Emit(mem_write_dw(address & ~3 & _ADDR_MASK, (data & 0xFFFFFFFF).to_bytes(4, "little"), rid,
                                 self.irq_pasid if tagged else None),
                    ADI_FLAG | self.index << 16 | rid)

    # ---- management registers (PF BAR0) ----------------------------------------------------------

    def write_ctrl(self, value: int) -> None:
        if value & ADI_CTRL_RESET:
            self.reset()
        self.ctrl = value & ADI_CTRL_RW
        self.sync_gate()

    def write_pasid(self, value: int) -> None:
        self.pasid = value & ADI_PASID_MASK

    def reset(self) -> None:
        """ADI reset: engine, device IMS and in-flight fetches (management registers kept)."""
        self.resets += 1
        self.engine.reset()
        if self.ims is not None:
            self.ims.reset()
        self.ims_mem_orphaned += self.host.fetches.orphan(self.index)
        self.host.fetches.drop_waiting(self.index)
        self.sync_gate()

    def power_on(self) -> None:
        """PF FLR: as ``reset`` plus ADI_CTRL = ADI_PASID = 0 (the device frees the tags)."""
        self.reset()
        self.ctrl = 0
        self.pasid = 0
        self.sync_gate()

    # ---- portal MMIO (offsets inside this ADI's 8 KiB) -------------------------------------------

    def mmio_read(self, off: int, length: int) -> bytes:
        """MRd of ``length`` DWs at DW-aligned portal offset ``off``: the CplD payload."""
        self.mem_reads += 1
        if length == 1:
            return self._read_dw(off).to_bytes(4, "little")
        return b"".join(self._read_dw(off + 4 * i).to_bytes(4, "little") for i in range(length))

    def mmio_write(self, off: int, tlp: Tlp) -> list[Emit]:
        """MWr at DW-aligned portal offset ``off``; returns the TLPs it causes."""
        self.mem_writes += 1
        data = tlp.data
        length = tlp.length
        if length == 1:
            return self._write_dw(off, int.from_bytes(data[0:4], "little"), tlp.first_be)
        out: list[Emit] = []
        for i in range(length):
            be = tlp.first_be if i == 0 else (tlp.last_be if i == length - 1 else 0xF)
            if be:
                out += self._write_dw(off + 4 * i, int.from_bytes(data[4 * i:4 * i + 4], "little"), be)
        return out

    def _read_dw(self, off: int) -> int:
        if off < ADI_IMS_OFFSET:
            return self.engine.read32(off)
        if off < ADI_PORTAL_SIZE and self.ims is not None:
            return self.ims.read(off - ADI_IMS_OFFSET)
        return 0

    def _write_dw(self, off: int, value: int, be: int) -> list[Emit]:
        if off < ADI_IMS_OFFSET:
            if off == DOORBELL:
                return self.doorbell(value) if be == 0xF else []
            engine = self.engine
            if be != 0xF:
                m = BE_MASK[be]
                value = (engine.read32(off) & ~m) | (value & m)
            engine.write32(off, value)
            return []
        ims = self.ims
        if ims is None or off >= ADI_PORTAL_SIZE:
            return []
        off -= ADI_IMS_OFFSET
        if be != 0xF:
            m = BE_MASK[be]
            value = (ims.read(off) & ~m) | (value & m)
        return ims.write(off, 4, value)

    # ---- work engine -----------------------------------------------------------------------------

    def doorbell(self, cookie: int) -> list[Emit]:
        """One work item: [record MWr, then the device-IMS MWr or the memory-slot MRd], see module doc."""
        self.doorbells += 1
        engine = self.engine
        if not engine.ring_entries or not self.gate_open or not engine.accepts():
            self.doorbells_dropped += 1
            return []
        rid = self.host.rid
        dma_pasid = self.dma_pasid
        address, record = engine.complete(cookie)
        self.dma_writes += 1
        # a DWORD record (CMPL_FORMAT) can be an interrupt request: it carries the ADI's provenance
        out = [Emit(mem_write_dw(address, record, rid, dma_pasid), self.origin if engine.cmpl_format else None)]
        vector = engine.irq_vector
        if engine.irq_mode == IRQ_MODE_IMS_MEMORY:
            if vector >= engine.ims_mem_slots or not self.ctrl & ADI_CTRL_MEM_IMS_ENABLE:
                self.ims_invalid += 1       # no such slot, or memory IMS not allowed by the host
                return out
            slot_addr = engine.slot_address(vector)
            fetches = self.host.fetches
            tag = fetches.alloc(self.index, vector, slot_addr) if not fetches.waiting else None
            if tag is None:
                # every tag in flight (or others already waiting): queue behind them
                self.ims_mem_no_tag += 1
                if len(fetches.waiting) >= FETCH_WAIT_MAX:
                    self.ims_mem_fetch_failed += 1     # a hostile flood: the fetch engine gives up
                    return out
                fetches.waiting.append((self.index, vector, slot_addr))
                return out
            self.ims_mem_fetches += 1
            out.append(Emit(Tlp.mem_read(slot_addr, IMS_SLOT_SIZE, rid, tag=tag, pasid=dma_pasid), None))
            return out
        ims = self.ims
        if ims is None:
            self.ims_invalid += 1
            return out
        irq = ims.notify(vector)
        if irq is not None:
            engine.ims_sent += engine.emit_burst(out, irq, ims)      # IRQ_BURST (device.engine)
        elif vector < ims.nslots and ims.is_pending(vector):
            engine.ims_pended += 1
        else:
            self.ims_invalid += 1
        return out

    def fetch_completed(self, cpl: Tlp, slot: int, address: int) -> list[Emit]:
        """The completion of this ADI's read of memory-IMS ``slot`` at ``address`` arrived."""
        if (cpl.type != TlpType.CPL_DATA or cpl.status != CplStatus.SC or cpl.ep or cpl.length != 4
                or cpl.byte_count != IMS_SLOT_SIZE or cpl.lower_address != address & 0x7F):
            self.ims_mem_fetch_failed += 1
            return []
        lo, hi, data, ctrl = _SLOT.unpack_from(cpl.data)
        if ctrl & IMS_CTRL_VECTOR_MASKBIT:
            self.ims_mem_masked += 1
            return []
        if not self.gate_open:
            self.ims_mem_blocked += 1
            return []
        self.ims_mem_sent += 1
        self.engine.ims_sent += 1
        return [self.interrupt(hi << 32 | lo, data)]

    # ---- observation -----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Monotonic statistics (they survive ADI reset and PF FLR)."""
        out = {name: getattr(self, name) for name in _COUNTERS}
        i = self.ims
        out["ims_sent"] = self.ims_mem_sent + (i.sent if i is not None else 0)
        out["ims_pended"] = i.pended if i is not None else 0
        out["ims_replayed"] = i.replayed if i is not None else 0
        return out

    def snapshot(self) -> dict[str, Any]:
        """State and counters for the control interface (msgpack-friendly)."""
        e = self.engine
        return {
            "index": self.index,
            "name": describe(self.origin),
            "origin": self.origin,
            "enabled": self.enabled,
            "pasid_enable": bool(self.ctrl & ADI_CTRL_PASID_ENABLE),
            "mem_ims_enable": bool(self.ctrl & ADI_CTRL_MEM_IMS_ENABLE),
            "pasid": self.pasid,
            "dma_pasid": self.dma_pasid,
            "irq_pasid": self.irq_pasid,
            "irq_mode": "ims-memory" if e.irq_mode == IRQ_MODE_IMS_MEMORY else "ims-device",
            "irq_vector": e.irq_vector,
            "qctx_base": e.qctx_base,
            "ims_slots": e.ims_cap,
            "ims_mem_slots": e.ims_mem_slots,
            "ims": self.ims.snapshot() if self.ims is not None else [],
            "ims_mem_in_flight": self.host.fetches.in_flight(self.index),
            "completed": e.completed,
            "wq_full": e.wq_full,
            **self.counters(),
        }

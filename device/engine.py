"""The work engine: a minimal doorbell -> DMA completion -> MSI-X / IMS interrupt block.

It is the lab's stand-in for a real device's work queue: software rings a
doorbell with a 32-bit cookie, the engine "completes" the work item by DMA-
writing a completion record into a ring in host memory, then raises an MSI-X
vector or an IMS slot.  Registers (BAR0 + 0x0000, 32-bit, little-endian)::

    off    name               access  meaning
    -----  -----------------  ------  --------------------------------------------------------
    0x00   ENGINE_ID          RO      0x4C515249 = b"IRQL" (little-endian magic)
    0x04   ENGINE_VERSION     RO      0x00010000 (major 16 bits . minor 16 bits)
    0x08   CMPL_BASE_LO       RW      completion ring bus address [31:4] (bits 3:0 read 0);
                                      [31:2] with DWORD records (bits 1:0 read 0)
    0x0C   CMPL_BASE_HI       RW      completion ring bus address [63:32]
    0x10   CMPL_RING_ENTRIES  RW      ring size in records; 0 (off) or a power of two,
                                      other values are ignored
    0x14   IRQ_VECTOR         RW      MSI-X vector or IMS slot raised on each completion
    0x18   DOORBELL           WO      full-DW write = one work item, value = cookie; reads 0
    0x1C   COMPLETED          RO      work items completed since reset (= next completion_seq)
    0x20   MSIX_SENT          RO      completion interrupts sent at once
    0x24   MSIX_PENDED        RO      completion interrupts found masked (PBA bit set instead)
    0x28   IRQ_MODE           RW      bit 0: 0 = raise MSI-X vector IRQ_VECTOR,
                                      1 = raise IMS slot IRQ_VECTOR; bits 31:1 read 0
    0x2C   IMS_CAP            RO      IMS slots of this function (0 = no IMS); the driver's
                                      IMS detection, like IDXD's GENCAP max_ims_mult
    0x30   IMS_SENT           RO      completion interrupts sent at once from an IMS slot
    0x34   IMS_PENDED         RO      completion interrupts found on a masked IMS slot
    0x44   CMPL_HEAD          RW      records the driver has consumed (free-running, like
                                      COMPLETED): frees work-queue space
    0x48   WQ_DEPTH           RO      work items accepted beyond CMPL_HEAD: min(64, ring size)
    0x4C   IRQ_BURST          RW      interrupts raised per completion, 1..256 (1 after reset;
                                      0 is taken as 1, more than 256 as 256): an interrupt
                                      generator, see below; reads 1 and ignores writes on a
                                      device built without it
    0x60   CMPL_FORMAT        RW      bit 0 DW: 0 = 16-byte completion records, 1 = DWORD
                                      records (the cookie alone, see below); bits 31:1 read 0
    0x80   DMA_SRC_LO         RW      copy descriptor: source bus address [31:0]
    0x84   DMA_SRC_HI         RW      source [63:32]
    0x88   DMA_DST_LO         RW      destination bus address [31:0]
    0x8C   DMA_DST_HI         RW      destination [63:32]
    0x90   DMA_LEN            RW      bytes to copy, 1..DMA_MAX_LEN (1 MiB)
    0x94   DMA_GO             WO      full-DW write = one copy work item, value = cookie
    0x98   DMA_COPIES         RO      copies completed since reset
    0x9C   DMA_ERRORS         RO      of those, copies a read of which completed UR/CA
    other                     -       read 0, writes ignored

*Work queue.*  Like a real device's work queue (an IDXD WQ's size, an NVMe SQ),
the engine holds at most WQ_DEPTH work items the driver has not consumed yet:
a doorbell while ``COMPLETED - CMPL_HEAD >= WQ_DEPTH`` is dropped (counted
``wq_full`` and ``doorbells_dropped``).  A driver writes CMPL_HEAD as it
consumes records (it need not on every record) and never rings more than
WQ_DEPTH ahead of it.  This is what bounds a function's work in flight end to
end: a guest ringing its doorbell as fast as it can (an interrupt storm) gets no
more of the device, the bus and the host than a driver that consumes its
completions, so the others' interrupts never queue behind its flood.

Completion record (16 bytes, little-endian), written to
``CMPL_BASE + (seq % CMPL_RING_ENTRIES) * 16``::

     0               4               8                              16
    +---------------+---------------+-------------------------------+
    | u32 cookie    | u32 status=1  | u64 completion_seq (0-based)  |
    +---------------+---------------+-------------------------------+

A doorbell completes only while Bus Master Enable is set and the ring is
programmed (CMPL_RING_ENTRIES != 0); otherwise it is dropped, COMPLETED does not
move and the function counts ``doorbells_dropped``.  The function, not this
block, turns the record into a DMA MWr followed by the MSI-X or IMS MWr
(IRQ_MODE = 1 on a function without IMS: the record only, counted
``ims_invalid``).  The *_SENT / *_PENDED registers restart from 0 on reset.

*DMA copy* (SR-IOV PF and VFs).  DMA_GO is a work item like DOORBELL (same
checks, same work queue) that first moves data: the function reads DMA_LEN
bytes at DMA_SRC with memory reads (MRd of at most DMA_MRRS = 512 bytes, never
crossing 4 KiB, at most DMA_TAGS = 32 outstanding per function; further reads
wait for a tag), and as each completion (CplD) arrives writes its bytes at the
same offset from DMA_DST (MWr of at most DMA_MPS = 256 bytes, never crossing
4 KiB).  Both go through the IOMMU like any DMA of the function, and the reads
are answered by whoever owns that memory (the host, or a guest's process).  When
every byte has been written the copy completes like a doorbell: its record, then
its interrupt -- so, posted ordering, software sees the data before the record.
Copies complete in the order they were started; a doorbell completes at once, so
records follow completion order, not submission order (the cookie tells which).
A read completed with UR or CA (an IOMMU fault, unmapped memory) ends the copy
early; it still completes (a record, status done) and counts in DMA_ERRORS.  The
descriptor registers are read at DMA_GO, so software may rewrite them at once.

*Interrupt generator* (IRQ_BURST).  Like the PCI endpoint test function's
RAISE_IRQ command, it lets software measure interrupt delivery without a work
item per interrupt: each completion writes its record, then raises its MSI-X
vector or device-IMS slot IRQ_BURST times in a row (all after the record; the
first announces it).  Each is a separate interrupt message on the bus, counted
in MSIX_SENT / IMS_SENT; a masked vector pends once.  A memory-kind IMS slot
(an ADI's, ``device.adi``) is fetched and raised once whatever IRQ_BURST says.
It is a test feature, present only on a device built with it
(``EngineShared.generator``; the topology's ``[[device]] irq_generator``): with
it a guest's one doorbell makes the device send 256 interrupt messages through
the shared fabric, work its VM's frame budget does not count.

DWORD records (CMPL_FORMAT.DW = 1, 0 after reset): the record is the u32 cookie
alone, written to ``CMPL_BASE + (seq % CMPL_RING_ENTRIES) * 4`` with CMPL_BASE
DWORD-aligned -- one full-DW MWr whose address and data software chose.  Pointed at
0xFEE0_0000-0xFEEF_FFFF it is, on the bus, exactly an interrupt request with the
function's RID (a 16-byte record there is not: the IR unit faults it 0x20), so a
guest can make its device send a forged interrupt by DMA, and the IR unit's IRTE
checks are what must stop it.
"""

from __future__ import annotations

import collections
import struct

ENGINE_ID = 0x00
ENGINE_VERSION = 0x04
CMPL_BASE_LO = 0x08
CMPL_BASE_HI = 0x0C
CMPL_RING_ENTRIES = 0x10
IRQ_VECTOR = 0x14
DOORBELL = 0x18
COMPLETED = 0x1C
MSIX_SENT = 0x20
MSIX_PENDED = 0x24
IRQ_MODE = 0x28
IMS_CAP = 0x2C
IMS_SENT = 0x30
IMS_PENDED = 0x34
CMPL_FORMAT = 0x60
CMPL_HEAD = 0x44
WQ_DEPTH = 0x48
IRQ_BURST = 0x4C
DMA_SRC_LO = 0x80
DMA_SRC_HI = 0x84
DMA_DST_LO = 0x88
DMA_DST_HI = 0x8C
DMA_LEN = 0x90
DMA_GO = 0x94
DMA_COPIES = 0x98
DMA_ERRORS = 0x9C

#: DMA copy: longest copy, largest read request (MRRS), largest write payload (MPS), reads in flight
DMA_MAX_LEN = 1 << 20
DMA_MRRS = 512
DMA_MPS = 256
DMA_TAGS = 32

#: the work queue's size (WQ_DEPTH reads min(this, CMPL_RING_ENTRIES))
WQ_SIZE = 64

#: IRQ_BURST's largest value: interrupts one completion may raise
IRQ_BURST_MAX = 256

IRQ_MODE_MSIX = 0
IRQ_MODE_IMS = 1

ENGINE_MAGIC = int.from_bytes(b"IRQL", "little")  # 0x4C515249
ENGINE_VERSION_1_0 = 0x00010000

CMPL_RECORD = struct.Struct("<IIQ")
CMPL_RECORD_SIZE = CMPL_RECORD.size  # 16
CMPL_STATUS_DONE = 1
CMPL_FORMAT_DW = 1
CMPL_DWORD = struct.Struct("<I")
_ADDR_MASK = (1 << 64) - 1


class EngineShared:
    """What every engine of one device shares: whether the device was built with the interrupt
    generator (IRQ_BURST works), and how many doorbells any of them refused for a full work
    queue -- the device shell reads that around each guest store to tell the fabric whose
    stores rang full queues (WASTED)."""

    __slots__ = ("generator", "refused")

    def __init__(self, generator: bool = False) -> None:
        self.generator = generator
        self.refused = 0


class DmaCopy:
    """One copy work item in flight."""

    __slots__ = ("cookie", "src", "dst", "length", "issued", "reads_out", "failed")

    def __init__(self, cookie: int, src: int, dst: int, length: int) -> None:
        self.cookie, self.src, self.dst, self.length = cookie, src, dst, length
        self.issued = 0          # bytes asked for so far
        self.reads_out = 0       # reads not completed yet
        self.failed = False


class WorkEngine:
    """Register file and completion bookkeeping of the work engine."""

    __slots__ = (
        "ims_cap", "cmpl_base", "cmpl_format", "ring_entries", "irq_vector", "irq_mode", "completed",
        "msix_sent", "msix_pended", "ims_sent", "ims_pended", "head", "wq_full", "irq_burst", "shared",
        "dma_src", "dma_dst", "dma_len", "dma_copies", "dma_errors", "copies", "_tags", "_free_tags",
    )

    def __init__(self, ims_slots: int = 0, shared: "EngineShared | None" = None) -> None:
        self.ims_cap = ims_slots
        self.shared = shared if shared is not None else EngineShared()   # the device's, for all its engines
        self.reset()

    def reset(self) -> None:
        self.cmpl_base = 0
        self.ring_entries = 0
        self.irq_vector = 0
        self.irq_mode = IRQ_MODE_MSIX
        self.cmpl_format = 0
        self.completed = 0
        self.msix_sent = 0
        self.msix_pended = 0
        self.ims_sent = 0
        self.ims_pended = 0
        self.head = 0
        self.wq_full = 0
        self.irq_burst = 1
        self.dma_src = self.dma_dst = self.dma_len = 0
        self.dma_copies = self.dma_errors = 0
        self.copies: collections.deque[DmaCopy] = collections.deque()   # in DMA_GO order
        self._tags: dict[int, list] = {}            # tag -> [copy, offset in the copy, bytes still due]
        self._free_tags = list(range(DMA_TAGS - 1, -1, -1))

    @property
    def wq_depth(self) -> int:
        return min(WQ_SIZE, self.ring_entries)

    def accepts(self) -> bool:
        """Room in the work queue: fewer than WQ_DEPTH completed records not yet consumed."""
        if (self.completed + len(self.copies) - self.head) & 0xFFFFFFFF < min(WQ_SIZE, self.ring_entries):
            return True
        self.wq_full += 1
        self.shared.refused += 1
        return False

    def emit_burst(self, out: list, irq, table) -> int:
        """Append the interrupt ``irq`` (an Emit) to ``out`` IRQ_BURST times -- the same message
        again: nothing can mask it in between -- and count the repeats in ``table.sent`` (the
        MSI-X table or IMS store that sent it).  Returns how many were sent."""
        burst = self.irq_burst
        out.append(irq)
        if burst > 1:
            out += (irq,) * (burst - 1)
            table.sent += burst - 1
        return burst

    def read32(self, off: int) -> int:
        if off == COMPLETED:
            return self.completed & 0xFFFFFFFF
        if off == MSIX_SENT:
            return self.msix_sent & 0xFFFFFFFF
        if off == MSIX_PENDED:
            return self.msix_pended & 0xFFFFFFFF
        if off == ENGINE_ID:
            return ENGINE_MAGIC
        if off == ENGINE_VERSION:
            return ENGINE_VERSION_1_0
        if off == CMPL_BASE_LO:
            return self.cmpl_base & (0xFFFFFFFC if self.cmpl_format else 0xFFFFFFF0)
        if off == CMPL_BASE_HI:
            return self.cmpl_base >> 32
        if off == CMPL_RING_ENTRIES:
            return self.ring_entries
        if off == IRQ_VECTOR:
            return self.irq_vector
        if off == IRQ_MODE:
            return self.irq_mode
        if off == IMS_CAP:
            return self.ims_cap
        if off == CMPL_FORMAT:
            return self.cmpl_format
        if off == IMS_SENT:
            return self.ims_sent & 0xFFFFFFFF
        if off == IMS_PENDED:
            return self.ims_pended & 0xFFFFFFFF
        if off == CMPL_HEAD:
            return self.head
        if off == WQ_DEPTH:
            return self.wq_depth
        if off == IRQ_BURST:
            return self.irq_burst
        if DMA_SRC_LO <= off <= DMA_ERRORS:
            return {DMA_SRC_LO: self.dma_src & 0xFFFFFFFF, DMA_SRC_HI: self.dma_src >> 32,
                    DMA_DST_LO: self.dma_dst & 0xFFFFFFFF, DMA_DST_HI: self.dma_dst >> 32,
                    DMA_LEN: self.dma_len, DMA_COPIES: self.dma_copies & 0xFFFFFFFF,
                    DMA_ERRORS: self.dma_errors & 0xFFFFFFFF}.get(off, 0)
        return 0

    def write32(self, off: int, value: int) -> None:
        """Write a RW register (DOORBELL is the function's business, see ``complete``)."""
        if off == CMPL_BASE_LO:
            # bits 3:2 are kept: they count with DWORD records (read32 hides them otherwise)
            self.cmpl_base = (self.cmpl_base & ~0xFFFFFFFF) | (value & 0xFFFFFFFC)
        elif off == CMPL_BASE_HI:
            self.cmpl_base = (self.cmpl_base & 0xFFFFFFFF) | (value & 0xFFFFFFFF) << 32
        elif off == CMPL_RING_ENTRIES:
            if value & (value - 1) == 0:
                self.ring_entries = value
        elif off == CMPL_FORMAT:
            self.cmpl_format = value & CMPL_FORMAT_DW
        elif off == IRQ_VECTOR:
            self.irq_vector = value & 0xFFFFFFFF
        elif off == IRQ_MODE:
            self.irq_mode = value & IRQ_MODE_IMS
        elif off == IRQ_BURST:
            if self.shared.generator:
                self.irq_burst = min(max(value & 0xFFFFFFFF, 1), IRQ_BURST_MAX)
        elif off == DMA_SRC_LO:
            self.dma_src = (self.dma_src & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
        elif off == DMA_SRC_HI:
            self.dma_src = (self.dma_src & 0xFFFFFFFF) | (value & 0xFFFFFFFF) << 32
        elif off == DMA_DST_LO:
            self.dma_dst = (self.dma_dst & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
        elif off == DMA_DST_HI:
            self.dma_dst = (self.dma_dst & 0xFFFFFFFF) | (value & 0xFFFFFFFF) << 32
        elif off == DMA_LEN:
            self.dma_len = value & 0xFFFFFFFF
        elif off == CMPL_HEAD:
            # a head beyond COMPLETED would grant space for records never written: clamp it
            value &= 0xFFFFFFFF
            if (self.completed - value) & 0xFFFFFFFF <= (self.completed - self.head) & 0xFFFFFFFF:
                self.head = value

    @property
    def ring_ready(self) -> bool:
        return self.ring_entries != 0

    def complete(self, cookie: int) -> tuple[int, bytes]:
        """Complete one work item: the (bus address, record) to DMA-write -- 16 bytes, or
        the 4-byte cookie alone with DWORD records (CMPL_FORMAT.DW).

        The caller checks ``ring_ready`` and Bus Master Enable first.
        """
        seq = self.completed
        self.completed = seq + 1
        slot = seq & (self.ring_entries - 1)
        # 64-bit address arithmetic wraps, as in hardware (a hostile base cannot make it overflow)
        if self.cmpl_format:
            return (self.cmpl_base + slot * 4) & _ADDR_MASK, CMPL_DWORD.pack(cookie & 0xFFFFFFFF)
        address = ((self.cmpl_base & ~0xF) + slot * CMPL_RECORD_SIZE) & _ADDR_MASK
        return address, CMPL_RECORD.pack(cookie & 0xFFFFFFFF, CMPL_STATUS_DONE, seq)

    # ---- DMA copy (DMA_GO) ----------------------------------------------------------------------

    def copy_start(self, cookie: int) -> list[tuple[int, int, int]] | None:
        """A DMA_GO: queue a copy of the descriptor as it reads now; return the reads to issue,
        ``(bus address, bytes, tag)``.  None (nothing queued) for DMA_LEN 0 or > DMA_MAX_LEN.
        The caller checks Bus Master Enable, the ring and ``accepts()`` first."""
        length = self.dma_len
        if not 0 < length <= DMA_MAX_LEN:
            return None
        self.copies.append(DmaCopy(cookie & 0xFFFFFFFF, self.dma_src, self.dma_dst, length))
        return self._issue()

    def _issue(self) -> list[tuple[int, int, int]]:
        out = []
        free = self._free_tags
        for c in self.copies:
            while free and c.issued < c.length:
                addr = (c.src + c.issued) & _ADDR_MASK
                n = min(DMA_MRRS, c.length - c.issued, 0x1000 - (addr & 0xFFF), (1 << 64) - addr)
                tag = free.pop()
                self._tags[tag] = [c, c.issued, n]
                c.issued += n
                c.reads_out += 1
                out.append((addr, n, tag))
            if not free:
                break
        return out

    def copy_data(self, tag: int, ok: bool, data: bytes):
        """A completion for read ``tag``: ``(writes, reads, done)`` -- the ``(bus address, bytes)``
        to write (each at most DMA_MPS, never crossing 4 KiB), the reads the freed tag lets out,
        and the cookies of the copies now complete, in order, each ``(cookie, ok)``.  None for a
        tag with no read outstanding (the device counts it as an unexpected completion)."""
        entry = self._tags.get(tag)
        if entry is None:
            return None
        c, off, due = entry
        writes = []
        if ok:
            data = data[:due]
            n = len(data)
            pos = 0
            while pos < n:
                addr = (c.dst + off + pos) & _ADDR_MASK
                k = min(DMA_MPS, n - pos, 0x1000 - (addr & 0xFFF), (1 << 64) - addr)
                writes.append((addr, data[pos:pos + k]))
                pos += k
            entry[1] = off + n
            entry[2] = due = due - n
        else:
            c.failed = True
            c.issued = c.length          # ask for nothing more of a failed copy
            due = 0
        if due:
            return writes, [], []        # more completions of this read are coming
        del self._tags[tag]
        self._free_tags.append(tag)
        c.reads_out -= 1
        done = []
        copies = self.copies
        while copies and copies[0].issued == copies[0].length and not copies[0].reads_out:
            first = copies.popleft()
            self.dma_copies += 1
            self.dma_errors += first.failed
            done.append((first.cookie, not first.failed))
        return writes, self._issue(), done

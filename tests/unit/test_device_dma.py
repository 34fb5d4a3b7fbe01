"""device.engine's DMA copy (DMA_GO): MRds of the source, MWrs of each completion's bytes at the
destination, then the work item's record and interrupt; tags, errors, drops and FLR."""

from __future__ import annotations

import collections
import struct

from device.engine import (
    CMPL_BASE_HI,
    CMPL_BASE_LO,
    CMPL_RING_ENTRIES,
    COMPLETED,
    DMA_COPIES,
    DMA_DST_HI,
    DMA_DST_LO,
    DMA_ERRORS,
    DMA_GO,
    DMA_LEN,
    DMA_MAX_LEN,
    DMA_MPS,
    DMA_MRRS,
    DMA_SRC_HI,
    DMA_SRC_LO,
    DMA_TAGS,
    IRQ_VECTOR,
)
from device.function import MSIX_TABLE_OFFSET
from device.sriov_device import SriovDevice
from fabric.tlp import CplStatus, Tlp, TlpType

PF = 2 << 8
BAR = 0xFEB0_0000
RING = 0x1_0000_2000
MSI = 0xFEE0_0000
SRC = 0x1_0004_0F00          # 256 bytes below a 4 KiB boundary: the first read stops there
DST = 0x1_0010_0F80          # 128 bytes below one: so does the first write
MEM = {}                     # bus address -> byte, the "memory" that answers the reads


class Link:
    """The device on one side; on the other, a memory that answers its reads and keeps its writes."""

    def __init__(self) -> None:
        self.dev = SriovDevice()
        self.written: dict[int, int] = {}

    def send(self, tlp: Tlp) -> list:
        out = self.dev.handle_tlp(tlp)
        for e in out:
            assert Tlp.unpack(e.tlp.pack()) == e.tlp      # everything survives the wire
        return out

    def w32(self, addr: int, value: int) -> list:
        return self.send(Tlp.mem_write(addr, value.to_bytes(4, "little")))

    def r32(self, addr: int) -> int:
        (e,) = self.send(Tlp.mem_read(addr, 4))
        return int.from_bytes(e.tlp.data, "little")

    def bring_up(self) -> None:
        self.send(Tlp.cfg_write(PF, 0x10, BAR))
        self.send(Tlp.cfg_write(PF, 0x04, 0x6))                     # memory decode + bus master
        self.send(Tlp.cfg_write(PF, 0x7C, 0x8000 << 16, first_be=0xC))   # MSI-X enable
        entry = BAR + MSIX_TABLE_OFFSET
        self.send(Tlp.mem_write(entry, MSI.to_bytes(8, "little")))
        self.send(Tlp.mem_write(entry + 8, (0x41).to_bytes(8, "little")))
        for reg, v in ((CMPL_BASE_LO, RING & 0xFFFF_FFFF), (CMPL_BASE_HI, RING >> 32),
                       (CMPL_RING_ENTRIES, 64), (IRQ_VECTOR, 0)):
            self.w32(BAR + reg, v)

    def descriptor(self, src: int, dst: int, length: int) -> None:
        for reg, v in ((DMA_SRC_LO, src & 0xFFFF_FFFF), (DMA_SRC_HI, src >> 32),
                       (DMA_DST_LO, dst & 0xFFFF_FFFF), (DMA_DST_HI, dst >> 32), (DMA_LEN, length)):
            self.w32(BAR + reg, v)

    def answer(self, mrd: Tlp, status: CplStatus = CplStatus.SC) -> list:
        """The memory's completion of one MRd (whole DWs, as the OS shells answer)."""
        if status != CplStatus.SC:
            return self.send(Tlp.completion(mrd, 0, status))
        base = mrd.address
        data = bytes(MEM.get(base + i, 0) for i in range(mrd.length * 4))
        return self.send(Tlp.completion(mrd, 0, CplStatus.SC, data))

    def keep(self, out: list) -> tuple[list, list, list]:
        """Split emitted TLPs into (data MWrs, MRds, other: record / interrupt), keeping the data."""
        data, reads, other = [], [], []
        for e in out:
            t = e.tlp
            if t.type in (TlpType.MEM_READ, TlpType.MEM_READ_64):
                reads.append(t)
            elif RING <= t.address < RING + 64 * 16 or t.address >> 20 == MSI >> 20:
                other.append(e)
            else:
                data.append(t)
                for i, b in enumerate(t.payload_bytes()):
                    self.written[t.byte_address() + i] = b
        return data, reads, other


def fill(addr: int, n: int) -> bytes:
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(n))
    for i, b in enumerate(pattern):
        MEM[addr + i] = b
    return pattern


def test_copy_reads_the_source_writes_the_destination_then_completes() -> None:
    link = Link()
    link.bring_up()
    n = 1300
    pattern = fill(SRC, n)
    link.descriptor(SRC, DST, n)
    data, reads, other = link.keep(link.w32(BAR + DMA_GO, 0xC0FFEE))
    assert not data and not other
    # MRds: the PF's RID, distinct tags, at most DMA_MRRS each, none across 4 KiB, covering the source
    assert [(r.address, r.length * 4) for r in reads] == [(SRC, 256), (SRC + 256, 512), (SRC + 768, 512),
                                                          (SRC + 1280, 20)]
    assert all(r.requester_id == PF for r in reads) and len({r.tag for r in reads}) == 4
    link.w32(BAR + DMA_DST_LO, 0)            # the descriptor was taken at DMA_GO
    tail = []
    for i, r in enumerate(reads):
        data, more, other = link.keep(link.answer(r))
        assert not more
        assert all(len(t.payload_bytes()) <= DMA_MPS and (t.address & 0xFFF) + t.length * 4 <= 0x1000 for t in data)
        assert all(t.requester_id == PF for t in data)
        if i < len(reads) - 1:
            assert not other and link.r32(BAR + COMPLETED) == 0
        tail = other
    assert bytes(link.written.get(DST + i) for i in range(n)) == pattern
    assert len(link.written) == n                       # not a byte more
    # the last completion's MWrs, then the record, then the interrupt: posted order
    rec, irq = tail
    assert rec.tlp.address == RING and struct.unpack("<IIQ", rec.tlp.data) == (0xC0FFEE, 1, 0)
    assert irq.tlp.address == MSI and irq.origin == PF
    assert link.r32(BAR + COMPLETED) == 1 and link.r32(BAR + DMA_COPIES) == 1 and link.r32(BAR + DMA_ERRORS) == 0
    c = link.dev.snapshot()["functions"]["02:00.0"]
    assert (c["dma_read_tlps"], c["dma_copies"]) == (4, 1) and c["dma_write_tlps"] >= 6


def test_at_most_dma_tags_reads_in_flight_and_copies_complete_in_order() -> None:
    link = Link()
    link.bring_up()
    n = DMA_MRRS * (DMA_TAGS + 8)
    fill(SRC, n)
    link.descriptor(SRC, DST, n)
    _, reads, _ = link.keep(link.w32(BAR + DMA_GO, 1))
    link.descriptor(SRC, DST + n + 0x1000, 64)
    _, more, _ = link.keep(link.w32(BAR + DMA_GO, 2))
    assert len(reads) == DMA_TAGS and more == []        # the second copy waits for tags too
    pending, done = list(reads), []
    while pending:
        r = pending.pop(0)
        _, more, other = link.keep(link.answer(r))
        pending += more
        assert len(pending) <= DMA_TAGS
        done += [struct.unpack("<IIQ", e.tlp.data)[0] for e in other if e.tlp.address >> 12 == RING >> 12]
    assert done == [1, 2]


def test_a_failed_read_ends_the_copy_which_still_completes_and_counts() -> None:
    link = Link()
    link.bring_up()
    link.descriptor(SRC, DST, 4 * DMA_MRRS * DMA_TAGS)     # more reads than tags
    _, reads, _ = link.keep(link.w32(BAR + DMA_GO, 7))
    _, more, other = link.keep(link.answer(reads[0], CplStatus.UR))
    assert more == [] and other == []                       # nothing more is asked for
    for r in reads[1:]:
        _, more, other = link.keep(link.answer(r))
        assert more == []
    rec, _irq = other
    assert struct.unpack("<IIQ", rec.tlp.data)[0] == 7
    assert link.r32(BAR + DMA_ERRORS) == 1 and link.r32(BAR + DMA_COPIES) == 1


def test_drops_and_unexpected_completions() -> None:
    link = Link()
    link.bring_up()
    for length in (0, DMA_MAX_LEN + 1):
        link.descriptor(SRC, DST, length)
        assert link.w32(BAR + DMA_GO, 1) == []
    link.descriptor(SRC, DST, 64)
    link.send(Tlp.cfg_write(PF, 0x04, 0x2))                  # bus master off
    assert link.w32(BAR + DMA_GO, 1) == []
    assert link.dev.snapshot()["functions"]["02:00.0"]["dma_dropped"] == 3
    stray = Tlp.completion(Tlp.mem_read(SRC, 64, PF, tag=3), 0, CplStatus.SC, bytes(64))
    assert link.send(stray) == [] and link.dev.cpl_unexpected == 1


def test_flr_forgets_copies_in_flight() -> None:
    link = Link()
    link.bring_up()
    link.descriptor(SRC, DST, 64)
    _, (r,), _ = link.keep(link.w32(BAR + DMA_GO, 1))
    link.send(Tlp.cfg_write(PF, 0x48, 0x8000 | 0x2810, first_be=0x3))    # DevCtl: Initiate FLR
    assert link.answer(r) == [] and link.dev.cpl_unexpected == 1
    assert link.dev.pf.engine.copies == collections.deque() and link.dev.pf.engine.dma_copies == 0

"""The VT-d DMA-remapping unit: host memory map, context entries, domains, ``translate``.

Pure and synchronous (stdlib only, no I/O, no logging).  The fabric feeds every DMA request
of a device (any memory request that is not an interrupt MemWr, with the RID the fabric
stamped and the PASID of the TLP prefix, if any) to ``Iommu.translate`` and gets back one of

* ``Translation(owner, local_addr, hpa)``: deliver the request to process ``owner`` at its own
  address ``local_addr`` (``hpa`` is the host-physical address it translated to);
* ``DmaFault(reason, rid, addr, write, pasid, ...)``: blocked by the remapping hardware, with a
  VT-d fault reason; recorded into the unit's ``fabric.dmar.FaultLog`` on the delivery path;
* ``Unclaimed(hpa)``: translated, but nothing in the host's memory map answers there.  Not a
  VT-d fault: the root complex sees a request nobody claims (the fabric counts it as a master
  abort and completes reads with UR).

Spec sections (VT-d, Intel Virtualization Technology for Directed I/O, rev. 3.x numbering):
3.4 "Mapping Devices to Domains" (3.4.2 legacy mode, 3.4.3 scalable mode), 3.7 second-level
translation, 7.1-7.2 fault conditions and non-recoverable fault reporting, 9.3 context entry,
9.5-9.6 scalable-mode PASID directory / table entries, 9.8 second-level paging entries; digest
``reference/interrupts-and-remapping.md`` section 5 (fault reasons and Linux log lines).

Layouts modelled
----------------
Context entry (legacy mode, VT-d 9.3), one per RID, found through the root entry of the bus::

    hi qword (bits 127:64)
     63 .................... 24 23 ................ 8  7   6 ... 3   2 ... 0
    +--------------------------+---------------------+---+---------+---------+
    |         reserved         |   DID (domain id)   | r |  AVAIL  |   AW    |
    +--------------------------+---------------------+---+---------+---------+
    lo qword (bits 63:0)
     63 ............................................ 12  11 ... 4  3 .. 2   1     0
    +--------------------------------------------------+----------+-------+-----+---+
    |  SLPTPTR: second-level page-table pointer (HPA)   | reserved |  TT   | FPD | P |
    +--------------------------------------------------+----------+-------+-----+---+
      TT (translation type): 00b second-level translation, 01b same + device-TLB (ATS),
      10b pass-through (IOVA = HPA), 11b reserved.  AW: adjusted guest address width.

    set_context(rid, "pt")              P=1, TT=10b
    set_context(rid, ("domain", did))   P=1, TT=00b, DID=did, SLPTPTR = the domain's table
    set_context(rid, "block")           P=1, a TT value that blocks the request (fault 0x0D,
                                        QEMU VTD_FR_CONTEXT_ENTRY_TT: "explicitly blocked due
                                        to the programming of the Translation Type field")
    clear_context(rid)                  P=0 (fault 0x02)

Second-level translation (VT-d 3.7, 4-level table for a 48-bit AGAW)::

          47      39 38      30 29      21 20      12 11            0
         +----------+----------+----------+----------+---------------+
    IOVA | SL-PML4  | SL-PDPT  |  SL-PD   |  SL-PT   |  page offset  |
         +----------+----------+----------+----------+---------------+

Real hardware walks four levels (SLPTPTR -> PML4E -> PDPTE -> PDE -> PTE).  The model keeps a
flat dict per domain, IOVA page number (IOVA[63:12]) -> leaf PTE, because what the lab needs is
per-4-KiB R/W permission and the fault codes; table-pointer faults (0x07, 0x09, 0x0C) and
superpages do not arise.  The leaf PTE is stored as the int hardware would hold (VT-d 9.8)::

     63   62   61 .. 52 51 ......................... 12  11   10 .. 8   7   6 .. 2   1   0
    +----+----+--------+-------------------------------+-----+--------+----+--------+---+---+
    |    | TM |        |  ADDR: host-physical page     | SNP |        | PS |        | W | R |
    +----+----+--------+-------------------------------+-----+--------+----+--------+---+---+
      modelled: R (bit 0), W (bit 1), ADDR (bits 51:12).  TM, SNP, PS: not modelled (zero).

An entry with R=W=0 is *not present*: second-level entries have no separate Present bit.

Theory of operation of ``translate(rid, addr, size, write, pasid)``
-------------------------------------------------------------------
The first rule that applies decides (QEMU ``vtd_do_iommu_translate`` / ``vtd_iova_to_slpte``
order).  ``size`` < 1 counts as 1 (a zero-length read still targets its address).

 1. pasid given (scalable-mode hook, see below): the (rid, pasid) PASID-table entry names
    the domain; no entry -> fault 0x31 / 0x51 / 0x59; go to 5.
 2. no context entry for rid                          -> fault 0x02
 3. context "block"                                   -> fault 0x0D
 4. context "pt": HPA = addr (no MGAW check, as QEMU's pass-through); go to 8.
 5. addr < 0 or the last byte addr+size-1 >= 2**mgaw  -> fault 0x04
 6. for each 4-KiB page the access touches, in address order: its PTE lacks W (write) or R
    (read) -- including "no PTE at all"               -> fault 0x05 (write) / 0x06 (read)
 7. HPA = PTE.ADDR | offset
 8. the HPA range must be one contiguous run inside one ``MemoryMap`` range, else
    ``Unclaimed(first HPA that cannot be delivered)``; otherwise ``Translation``.

Choices (where the spec, QEMU and Linux differ or are silent):

* Non-present PTE: VT-d reports a request that hits a not-present second-level entry as a
  permission fault, 0x05 "PTE Write access is not set" for writes and 0x06 "PTE Read access is
  not set" for reads (QEMU ``vtd_iova_to_slpte``: ``if (!(slpte & access_right_check)) return
  is_write ? -VTD_FR_WRITE : -VTD_FR_READ``).  This is the line Linux prints for a DMA to an
  unmapped IOVA; 0x07 is reserved for an invalid *next-level* pointer, which a flat table
  never has.
* Spanning accesses: a real PCIe request never crosses a 4-KiB boundary (PCIe Base 2.2.7).
  The lab allows it and checks every page.  ``DmaFault.addr`` is the request address;
  ``DmaFault.fault_addr`` (what FRCD.FI records, page-aligned by the log) is the first byte
  of the failing page that the access touches.  A spanning access whose pages map to
  non-contiguous HPAs cannot be delivered as one request: ``Unclaimed``.
* Scalable-mode hook (VT-d 3.4.3, 9.4-9.6).  Real hardware selects legacy or scalable mode for
  the whole unit (RTADDR_REG.TTM); here each RID is in scalable mode once it has a PASID table
  (``set_pasid``).  A request *without* PASID is translated through the context entry in both
  modes (it plays the role of the scalable-mode RID_PASID entry).  A request *with* PASID:
    - RID without PASID table (legacy mode, TTM=00b) -> 0x31 "SM: TTM 0 for request with
      PASID";
    - PASID directory entry (covers pasid[19:6], 64 PASIDs) not present -> 0x51 "SM: Present
      bit in Directory Entry is clear" (QEMU ``VTD_FR_PASID_DIR_ENTRY_P``);
    - PASID-table entry not present -> 0x59 "SM: Present bit in PASID Table Entry is clear"
      (QEMU ``VTD_FR_PASID_ENTRY_P``.  Older QEMU reported this as 0x58
      ``VTD_FR_PASID_TABLE_INV``, since corrected; Linux prints 0x58 as "SM: Error attempting
      to access PASID Table Entry", a memory-access error, not a missing entry).
  A directory entry is present while any PASID of its 64 has an entry (Linux allocates PASID
  tables per directory entry on demand).  Second-level faults of a PASID-tagged request keep
  the legacy codes 0x04/0x05/0x06, as QEMU's shared ``vtd_iova_to_slpte`` does in scalable
  mode (Linux's SM table also has codes for these, e.g. 0x79 "SM: Read/Write permission error
  in second-level paging entry"; the model does not use them).
* No FPD (fault processing disable) bit: every fault is recorded.  Writes to the tables are
  visible at once (no context-cache / IOTLB to invalidate).
* ``do_fault=False`` (QEMU's probe semantics) returns the same result but leaves no trace:
  nothing is recorded in the fault log and no counter moves.

The hot path: the context entry of each RID is resolved once, when written, to
``(kind, ptes)`` where ``ptes`` is the domain's live page dict; a hit costs two dict lookups,
a bisect in the memory map and one ``Translation`` tuple (about 0.5 us for a domain hit,
0.3 us for pass-through, on the lab's 2-core machine), and raises nothing on integer input.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from operator import index as _as_int
from typing import Any, NamedTuple, Union

from fabric.dmar import FaultLog, FaultReason, FaultRecord

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "SL_R",
    "SL_W",
    "FR_SM_TTM0_PASID",
    "FR_PASID_DIR_ENTRY_P",
    "FR_PASID_ENTRY_P",
    "MemoryMap",
    "Translation",
    "DmaFault",
    "Unclaimed",
    "TranslateResult",
    "Iommu",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_OFFSET = PAGE_SIZE - 1
_U64 = (1 << 64) - 1

# Second-level PTE bits (VT-d 9.8)
SL_R = 1 << 0
SL_W = 1 << 1
_SL_ADDR = ~_OFFSET        # bits 63:12 (hpa < 2**64, so effectively ADDR)

# Scalable-mode fault reasons used by the PASID hook (Linux dma_remap_sm_fault_reasons)
FR_SM_TTM0_PASID = 0x31       # request with PASID, RID in legacy mode
FR_PASID_DIR_ENTRY_P = 0x51   # PASID directory entry not present
FR_PASID_ENTRY_P = 0x59       # PASID-table entry not present

_R_CTX_P = FaultReason.CONTEXT_ENTRY_P
_R_CTX_TT = FaultReason.CONTEXT_ENTRY_TT
_R_MGAW = FaultReason.ADDR_BEYOND_MGAW
_R_WRITE = FaultReason.WRITE
_R_READ = FaultReason.READ

# Resolved context kinds
_PT = 0
_BLOCK = 1
_DOMAIN = 2


def _page_args(what: str, value: int) -> int:
    v = _as_int(value)
    if v < 0 or v & _OFFSET:
        raise ValueError(f"{what} 0x{v:x} is not a non-negative multiple of 4 KiB")
    return v


def _rid(rid: int) -> int:
    r = _as_int(rid)
    if not 0 <= r <= 0xFFFF:
        raise ValueError(f"RID 0x{r:x} does not fit in 16 bits")
    return r


def _pasid(pasid: int) -> int:
    p = _as_int(pasid)
    if not 0 <= p <= 0xFFFFF:
        raise ValueError(f"PASID 0x{p:x} does not fit in 20 bits")
    return p


def _did(domain_id: int) -> int:
    d = _as_int(domain_id)
    if not 0 <= d <= 0xFFFF:
        raise ValueError(f"domain id {d} does not fit in 16 bits (context entry DID)")
    return d


# ---------------------------------------------------------------------------------------------
# The host-physical memory map


class MemoryMap:
    """Which process answers for each host-physical RAM address.

    A range ``[hpa, hpa+size)`` belongs to process ``owner``; HPA ``h`` in it is that process's
    local address ``owner_base + (h - hpa)``.  The host's RAM is ``("host", owner_base 0)``; a
    guest's RAM window is e.g. ``("g1", owner_base 0)``: guest-physical 0 at ``hpa``.  Ranges
    never overlap (``map_range`` refuses with ValueError); adjacent ranges may belong to
    different owners.  The MSI range 0xFEEx_xxxx and device BARs are not RAM and are not here.

    Lookups bisect a sorted list of range starts.
    """

    __slots__ = ("_starts", "_ranges")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, str, int]] = []   # (start, stop, owner, owner_base)

    def map_range(self, hpa: int, size: int, owner: str, owner_base: int = 0) -> None:
        """Claim ``[hpa, hpa+size)`` for ``owner`` at its local address ``owner_base``."""
        hpa, size, owner_base = _as_int(hpa), _as_int(size), _as_int(owner_base)
        if size <= 0 or hpa < 0 or hpa + size > 1 << 64:
            raise ValueError(f"range 0x{hpa:x}+0x{size:x} is empty or outside 64-bit HPA space")
        if owner_base < 0:
            raise ValueError("owner_base must be non-negative")
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"owner must be a non-empty process name, not {owner!r}")
        stop = hpa + size
        i = bisect_right(self._starts, hpa)
        clash = None
        if i > 0 and self._ranges[i - 1][1] > hpa:
            clash = self._ranges[i - 1]
        elif i < len(self._starts) and self._starts[i] < stop:
            clash = self._ranges[i]
        if clash is not None:
            s, e, o, _ = clash
            raise ValueError(f"range 0x{hpa:x}-0x{stop - 1:x} ({owner}) overlaps "
                             f"0x{s:x}-0x{e - 1:x} ({o})")
        self._starts.insert(i, hpa)
        self._ranges.insert(i, (hpa, stop, owner, owner_base))

    def unmap_owner(self, owner: str) -> int:
        """Forget every range of ``owner``; return how many there were."""
        keep = [r for r in self._ranges if r[2] != owner]
        dropped = len(self._ranges) - len(keep)
        self._ranges = keep
        self._starts = [r[0] for r in keep]
        return dropped

    def unmap_range(self, hpa: int) -> bool:
        """Forget the range that starts exactly at ``hpa``; False if there is none."""
        i = bisect_right(self._starts, hpa) - 1
        if i >= 0 and self._starts[i] == hpa:
            del self._starts[i], self._ranges[i]
            return True
        return False

    def lookup(self, hpa: int) -> tuple[str, int, int] | None:
        """``(owner, local_addr, bytes_left_in_range)`` for ``hpa``, or None if unclaimed."""
        i = bisect_right(self._starts, hpa) - 1
        if i >= 0:
            start, stop, owner, base = self._ranges[i]
            if hpa < stop:
                return owner, base + hpa - start, stop - hpa
        return None

    def ranges(self) -> list[dict[str, Any]]:
        """Plain-data view, sorted by HPA: ``{"hpa", "size", "owner", "owner_base"}``."""
        return [{"hpa": s, "size": e - s, "owner": o, "owner_base": b}
                for s, e, o, b in self._ranges]

    def __len__(self) -> int:
        return len(self._ranges)

    def __repr__(self) -> str:
        return f"MemoryMap({len(self._ranges)} ranges)"


# ---------------------------------------------------------------------------------------------
# Results of translate()


class Translation(NamedTuple):
    """Deliver to process ``owner`` at its local address ``local_addr`` (HPA ``hpa``).

    A NamedTuple rather than a frozen dataclass: it is built on every hit, and
    ``tuple.__new__`` costs a quarter of a frozen dataclass's ``__init__``.  Compare results
    by type (``type(res) is Translation``), not by truthiness.
    """

    owner: str
    local_addr: int
    hpa: int


_tuple_new = tuple.__new__


@dataclass(frozen=True, slots=True)
class DmaFault:
    """The request was blocked with VT-d fault ``reason`` (a ``FaultReason`` or SM code).

    ``addr`` is the request address; ``fault_addr`` the first byte of the failing page the
    access touches (equal to ``addr`` unless a later page of a spanning access failed) and is
    what the fault record carries.  ``detail``: which check failed, for the lab's reports.
    """

    reason: int
    rid: int
    addr: int
    write: bool
    pasid: int | None
    fault_addr: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Unclaimed:
    """Translated to ``hpa``, but no memory range can take the request there.

    Lab-specific (not a VT-d fault): the fabric counts it as a master abort.  ``hpa`` is the
    first host-physical byte that cannot be delivered; ``detail`` says why.
    """

    hpa: int
    detail: str = ""


TranslateResult = Union[Translation, DmaFault, Unclaimed]


# ---------------------------------------------------------------------------------------------
# The remapping unit


class Iommu:
    """One VT-d DMA-remapping unit (see the module docstring).

    Parameters
    ----------
    fault_log:
        The unit's primary fault log (shared with its interrupt-remapping half); a new
        8-record one if None.
    mgaw:
        Address width of every domain (the context entries' AGAW, bounded by CAP.MGAW):
        IOVAs at or above ``2**mgaw`` fault 0x04.  48 = 4-level tables.
    memory:
        The host-physical memory map translations resolve against; a new empty one if None.
    """

    __slots__ = ("_mgaw", "fault_log", "memory", "_contexts", "_ctx", "_domains",
                 "_pasid_entries", "_pasid_ctx", "_pasid_dirs", "_pasid_rids", "translations",
                 "unclaimed", "faults")

    def __init__(self, fault_log: FaultLog | None = None, mgaw: int = 48, *,
                 memory: MemoryMap | None = None) -> None:
        mgaw = _as_int(mgaw)
        if not PAGE_SHIFT < mgaw <= 64:
            raise ValueError(f"MGAW {mgaw} outside 13..64")
        self._mgaw = mgaw
        self.fault_log = fault_log if fault_log is not None else FaultLog()
        self.memory = memory if memory is not None else MemoryMap()
        self._contexts: dict[int, str | tuple[str, int]] = {}    # as programmed
        self._ctx: dict[int, tuple[int, dict[int, int] | None]] = {}  # resolved
        self._domains: dict[int, dict[int, int]] = {}             # DID -> {IOVA page: PTE}
        self._pasid_entries: dict[tuple[int, int], int] = {}      # (rid, pasid) -> DID
        self._pasid_ctx: dict[tuple[int, int], dict[int, int]] = {}  # resolved
        self._pasid_dirs: Counter[tuple[int, int]] = Counter()    # (rid, pasid>>6) -> entries
        self._pasid_rids: Counter[int] = Counter()                # rid -> PASID entries
        # counters (delivery path only: probes with do_fault=False leave no trace)
        self.translations = 0
        self.unclaimed = 0
        self.faults: Counter[int] = Counter()

    @property
    def mgaw(self) -> int:
        return self._mgaw

    # --- context entries (VT-d 9.3) ------------------------------------------------------

    def set_context(self, rid: int, mode: str | tuple[str, int] | list) -> None:
        """Program the context entry of ``rid``: ``"pt"``, ``"block"`` or ``("domain", did)``.

        A list ``["domain", did]`` (what msgpack delivers) is accepted as the tuple.
        """
        rid = _rid(rid)
        if isinstance(mode, str):
            if mode == "pt":
                self._contexts[rid], self._ctx[rid] = "pt", (_PT, None)
                return
            if mode == "block":
                self._contexts[rid], self._ctx[rid] = "block", (_BLOCK, None)
                return
        elif isinstance(mode, (tuple, list)) and len(mode) == 2 and mode[0] == "domain":
            did = _did(mode[1])
            ptes = self._domains.get(did)
            if ptes is None:
                raise ValueError(f"domain {did} does not exist")
            self._contexts[rid], self._ctx[rid] = ("domain", did), (_DOMAIN, ptes)
            return
        raise ValueError(f"context mode {mode!r} (expected 'pt', 'block' or ('domain', did))")

    def clear_context(self, rid: int) -> None:
        """Clear the context entry's P bit: requests without PASID then fault 0x02."""
        rid = _rid(rid)
        self._contexts.pop(rid, None)
        self._ctx.pop(rid, None)

    def context(self, rid: int) -> str | tuple[str, int] | None:
        """The context entry of ``rid`` as programmed, or None if not present."""
        return self._contexts.get(rid)

    def contexts(self) -> dict[int, str | tuple[str, int]]:
        """Plain-data view: RID -> ``"pt"`` | ``"block"`` | ``("domain", did)``, by RID."""
        return {rid: self._contexts[rid] for rid in sorted(self._contexts)}

    # --- domains and their second-level tables (VT-d 3.7, 9.8) ---------------------------

    def create_domain(self, domain_id: int) -> None:
        """Allocate an empty second-level table for ``domain_id`` (ValueError if it exists)."""
        did = _did(domain_id)
        if did in self._domains:
            raise ValueError(f"domain {did} already exists")
        self._domains[did] = {}

    def destroy_domain(self, domain_id: int) -> None:
        """Free ``domain_id``; context and PASID entries pointing at it become not present."""
        did = _did(domain_id)
        if self._domains.pop(did, None) is None:
            raise ValueError(f"domain {did} does not exist")
        for rid in [r for r, m in self._contexts.items() if m == ("domain", did)]:
            self.clear_context(rid)
        for rid, pasid in [k for k, d in self._pasid_entries.items() if d == did]:
            self.clear_pasid(rid, pasid)

    def domains(self) -> list[int]:
        """The existing domain ids, sorted."""
        return sorted(self._domains)

    def _table(self, domain_id: int) -> dict[int, int]:
        did = _did(domain_id)
        ptes = self._domains.get(did)
        if ptes is None:
            raise ValueError(f"domain {did} does not exist")
        return ptes

    def map(self, domain_id: int, iova: int, hpa: int, size: int,
            read: bool = True, write: bool = True) -> None:
        """Map ``[iova, iova+size)`` -> ``[hpa, hpa+size)`` in 4-KiB leaf PTEs with R/W.

        All three must be 4-KiB aligned and ``size`` > 0; the IOVA range must lie below
        ``2**mgaw``; R=W=0 would be a not-present entry (use ``unmap``).  Like Linux
        ``iommu_map``, mapping over a present PTE is refused; the check is done for the whole
        range before anything changes.  ValueError on any of these.
        """
        ptes = self._table(domain_id)
        iova, hpa, size = (_page_args("iova", iova), _page_args("hpa", hpa),
                           _page_args("size", size))
        if size == 0:
            raise ValueError("size must be positive")
        if iova + size > 1 << self._mgaw:
            raise ValueError(f"IOVA range ends beyond MGAW ({self._mgaw} bits)")
        if hpa + size > 1 << 64:
            raise ValueError("HPA range ends beyond 64 bits")
        if not read and not write:
            raise ValueError("a PTE with R=W=0 is not present; use unmap")
        first, n = iova >> PAGE_SHIFT, size >> PAGE_SHIFT
        for p in range(first, first + n):
            if p in ptes:
                raise ValueError(f"IOVA 0x{p << PAGE_SHIFT:x} is already mapped "
                                 f"in domain {_as_int(domain_id)}")
        perm = (SL_R if read else 0) | (SL_W if write else 0)
        for k in range(n):
            ptes[first + k] = (hpa + (k << PAGE_SHIFT)) | perm

    def unmap(self, domain_id: int, iova: int, size: int) -> int:
        """Clear the PTEs of ``[iova, iova+size)`` (4-KiB aligned); return bytes unmapped."""
        ptes = self._table(domain_id)
        iova, size = _page_args("iova", iova), _page_args("size", size)
        first = iova >> PAGE_SHIFT
        n = 0
        if size >> PAGE_SHIFT > len(ptes):
            for p in [p for p in ptes if first <= p < first + (size >> PAGE_SHIFT)]:
                del ptes[p]
                n += 1
        else:
            for p in range(first, first + (size >> PAGE_SHIFT)):
                if ptes.pop(p, None) is not None:
                    n += 1
        return n << PAGE_SHIFT

    def pte(self, domain_id: int, iova: int) -> int:
        """The raw leaf PTE for the page holding ``iova`` (0: not present)."""
        return self._table(domain_id).get(_as_int(iova) >> PAGE_SHIFT, 0)

    def domain_mappings(self, domain_id: int) -> list[dict[str, Any]]:
        """Plain-data view of a domain, contiguous pages with equal R/W merged.

        ``[{"iova", "hpa", "size", "read", "write"}, ...]`` sorted by IOVA.
        """
        ptes = self._table(domain_id)
        out: list[dict[str, Any]] = []
        run: dict[str, Any] | None = None
        for page in sorted(ptes):
            pte = ptes[page]
            iova, hpa = page << PAGE_SHIFT, pte & _SL_ADDR
            r, w = bool(pte & SL_R), bool(pte & SL_W)
            if (run is not None and run["iova"] + run["size"] == iova
                    and run["hpa"] + run["size"] == hpa and run["read"] == r
                    and run["write"] == w):
                run["size"] += PAGE_SIZE
                continue
            run = {"iova": iova, "hpa": hpa, "size": PAGE_SIZE, "read": r, "write": w}
            out.append(run)
        return out

    # --- scalable-mode PASID hook (VT-d 9.4-9.6) -----------------------------------------

    def set_pasid(self, rid: int, pasid: int, domain_id: int) -> None:
        """Point the PASID-table entry (rid, pasid) at ``domain_id`` (second-level only).

        The first entry of a RID puts it in scalable mode: from then on its requests with
        PASID are translated here (and no longer fault 0x31).
        """
        rid, pasid, did = _rid(rid), _pasid(pasid), _did(domain_id)
        ptes = self._domains.get(did)
        if ptes is None:
            raise ValueError(f"domain {did} does not exist")
        key = (rid, pasid)
        if key not in self._pasid_entries:
            self._pasid_dirs[(rid, pasid >> 6)] += 1
            self._pasid_rids[rid] += 1
        self._pasid_entries[key] = did
        self._pasid_ctx[key] = ptes

    def clear_pasid(self, rid: int, pasid: int) -> None:
        """Clear the PASID-table entry (rid, pasid) (P=0); no-op if it is not present."""
        rid, pasid = _rid(rid), _pasid(pasid)
        key = (rid, pasid)
        if self._pasid_entries.pop(key, None) is None:
            return
        del self._pasid_ctx[key]
        for counter, k in ((self._pasid_dirs, (rid, pasid >> 6)), (self._pasid_rids, rid)):
            counter[k] -= 1
            if not counter[k]:
                del counter[k]

    def pasid_entries(self) -> dict[tuple[int, int], int]:
        """Plain-data view: (rid, pasid) -> domain id, sorted."""
        return {k: self._pasid_entries[k] for k in sorted(self._pasid_entries)}

    # --- the hot path ---------------------------------------------------------------------

    def translate(self, rid: int, addr: int, size: int, write: bool, pasid: int | None = None,
                  *, do_fault: bool = True) -> TranslateResult:
        """Translate one DMA request of ``size`` bytes at IOVA ``addr`` from ``rid``.

        ``rid``: the 16-bit RID as a plain int (``int(bdf)``); ``pasid``: the TLP's PASID
        prefix or None.  Returns ``Translation``, ``DmaFault`` or ``Unclaimed`` and never raises
        on integer input (see the module docstring for the rules).  ``do_fault=False`` probes:
        the result is the same, but nothing is recorded or counted.
        """
        n = size if size > 0 else 1
        if pasid is None:
            ctx = self._ctx.get(rid)
            if ctx is None:
                return self._fault(_R_CTX_P, rid, addr, write, None, addr, do_fault,
                                   "context entry not present")
            kind, ptes = ctx
            if kind != _DOMAIN:
                if kind == _BLOCK:
                    return self._fault(_R_CTX_TT, rid, addr, write, None, addr, do_fault,
                                       "context entry blocks the request")
                hpa = addr                                  # pass-through
        else:
            ptes = self._pasid_ctx.get((rid, pasid))
            if ptes is None:
                return self._pasid_miss(rid, addr, write, pasid, do_fault)
        if ptes is not None:
            last = addr + n - 1
            if addr < 0 or last >> self._mgaw:
                return self._fault(_R_MGAW, rid, addr, write, pasid,
                                   addr if addr < 0 or addr >> self._mgaw else 1 << self._mgaw,
                                   do_fault, f"beyond {self._mgaw}-bit MGAW")
            page = addr >> PAGE_SHIFT
            pte = ptes.get(page, 0)
            if not pte & (SL_W if write else SL_R):
                return self._perm_fault(rid, addr, write, pasid, addr, pte, do_fault)
            if last >> PAGE_SHIFT != page:
                return self._span(rid, addr, n, write, pasid, ptes, do_fault)
            hpa = (pte & _SL_ADDR) | (addr & _OFFSET)
        # the memory map (inlined MemoryMap.lookup: this is the hit path)
        mm = self.memory
        i = bisect_right(mm._starts, hpa) - 1
        if i >= 0:
            start, stop, owner, base = mm._ranges[i]
            if hpa + n <= stop:
                if do_fault:
                    self.translations += 1
                return _tuple_new(Translation, (owner, base + hpa - start, hpa))
        return self._claim(hpa, n, do_fault)

    def _claim(self, hpa: int, n: int, do_fault: bool) -> Translation | Unclaimed:
        mm = self.memory
        i = bisect_right(mm._starts, hpa) - 1
        if i >= 0:
            start, stop, owner, base = mm._ranges[i]
            if hpa + n <= stop:
                if do_fault:
                    self.translations += 1
                return _tuple_new(Translation, (owner, base + hpa - start, hpa))
            if hpa < stop:
                return self._unclaimed(stop, do_fault, "crosses the end of a memory range")
        return self._unclaimed(hpa, do_fault, "no memory range")

    def _span(self, rid: int, addr: int, n: int, write: bool, pasid: int | None,
              ptes: dict[int, int], do_fault: bool) -> TranslateResult:
        """An access over several pages: check each, then deliver only a contiguous run."""
        need = SL_W if write else SL_R
        first, last = addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT
        hpa0 = (ptes[first] & _SL_ADDR) | (addr & _OFFSET)
        expect = (ptes[first] & _SL_ADDR) + PAGE_SIZE
        brk = -1
        for p in range(first + 1, last + 1):
            pte = ptes.get(p, 0)
            if not pte & need:
                return self._perm_fault(rid, addr, write, pasid, p << PAGE_SHIFT, pte, do_fault)
            if brk < 0 and pte & _SL_ADDR != expect:
                brk = p
            expect = (pte & _SL_ADDR) + PAGE_SIZE
        if brk < 0:
            return self._claim(hpa0, n, do_fault)
        run = (brk << PAGE_SHIFT) - addr        # bytes delivered contiguously from hpa0
        res = self._claim(hpa0, run, False)
        if type(res) is Unclaimed:
            return self._unclaimed(res.hpa, do_fault, res.detail)
        return self._unclaimed(ptes[brk] & _SL_ADDR, do_fault,
                               "pages not contiguous in host memory")

    def _unclaimed(self, hpa: int, do_fault: bool, why: str) -> Unclaimed:
        if do_fault:
            self.unclaimed += 1
        return Unclaimed(hpa, why)

    def _perm_fault(self, rid: int, addr: int, write: bool, pasid: int | None,
                    fault_addr: int, pte: int, do_fault: bool) -> DmaFault:
        why = "PTE not present" if not pte & (SL_R | SL_W) else (
            "PTE is read-only" if write else "PTE is write-only")
        return self._fault(_R_WRITE if write else _R_READ, rid, addr, write, pasid,
                           fault_addr, do_fault, why)

    def _pasid_miss(self, rid: int, addr: int, write: bool, pasid: int,
                    do_fault: bool) -> DmaFault:
        if not self._pasid_rids.get(rid):
            return self._fault(FR_SM_TTM0_PASID, rid, addr, write, pasid, addr, do_fault,
                               "request with PASID, RID in legacy mode")
        if not self._pasid_dirs.get((rid, pasid >> 6)):
            return self._fault(FR_PASID_DIR_ENTRY_P, rid, addr, write, pasid, addr, do_fault,
                               "PASID directory entry not present")
        return self._fault(FR_PASID_ENTRY_P, rid, addr, write, pasid, addr, do_fault,
                           "PASID-table entry not present")

    def _fault(self, reason: int, rid: int, addr: int, write: bool, pasid: int | None,
               fault_addr: int, do_fault: bool, why: str) -> DmaFault:
        if do_fault:
            self.faults[reason] += 1
            self.fault_log.record(FaultRecord(
                reason, rid & 0xFFFF, "dma-write" if write else "dma-read",
                addr=fault_addr & _U64, pasid=None if pasid is None else pasid & 0xFFFFF,
                detail={"addr": addr, "check": why}))
        return DmaFault(reason, rid, addr, bool(write), pasid, fault_addr, why)

    # --- views ----------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Plain-data counters: translations, unclaimed, faults by reason code."""
        return {"translations": self.translations, "unclaimed": self.unclaimed,
                "faults": {int(k): v for k, v in sorted(self.faults.items())}}

    def __repr__(self) -> str:
        return (f"Iommu(mgaw={self._mgaw}, contexts={len(self._contexts)}, "
                f"domains={len(self._domains)}, pasid_entries={len(self._pasid_entries)})")

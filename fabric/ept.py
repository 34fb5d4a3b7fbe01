"""The second-level CPU mapping of one guest: Intel EPT (extended page tables), one per VM.

Pure and synchronous (stdlib only, no I/O, no logging).  The fabric holds one ``Ept`` per guest
port and asks it about every memory access the guest's CPUs put on the wire
(``lookup(gpa, size)``); the host (the VMM) programs it with ``map`` / ``unmap``.

Spec sections: Intel SDM Vol. 3C, "The Extended Page Table Mechanism (EPT)" (section 28.3 in
older editions, 29.3 in 2023+): EPT translation, "EPT-Induced VM Exits" (EPT violations, exit
reason 48; EPT misconfigurations, exit reason 49).

What is in the table, and what is not
-------------------------------------
Guest RAM is **not** here.  A guest's memory is a buffer inside its own process: its CPUs'
loads and stores to RAM are satisfied locally and never cross the wire, so there is nothing
for the fabric to translate (on a real machine those EPT entries exist and point at the
host pages backing the VM; in the lab they are the guest process's own address space).  What
reaches the fabric is everything the guest's memory model did not claim, and for that the
table says, per 4-KiB guest-physical page:

* ``"mmio"``: pass-through.  The page maps to a host-physical page of a device BAR (an assigned
  VF's registers, an ADI's portal); the access is forwarded to the device at that HPA.  Real
  hardware: a present EPT entry with ADDR = the BAR page, memory type UC.
* ``"trap"``: every access is a VM exit to the hypervisor, which emulates it (the MSI-X table
  page of an assigned VF, a device-IMS page, emulated registers).  Real hardware: an entry
  that is not present (EPT violation) or, as KVM does for emulated MMIO it has seen before,
  one with a reserved-bit pattern (EPT misconfiguration); either way the access exits.
* no entry: the guest touched guest-physical space nobody gave it -> ``EptViolation`` with
  reason ``"not mapped"`` (the hypervisor sees an EPT violation it has no memslot for).

Layouts modelled
----------------
Guest-physical address, 4-level EPT walk (EPTP -> PML4E -> PDPTE -> PDE -> PTE)::

         47      39 38      30 29      21 20      12 11            0
        +----------+----------+----------+----------+---------------+
    GPA | EPT PML4 | EPT PDPT |  EPT PD  |  EPT PT  |  page offset  |
        +----------+----------+----------+----------+---------------+

EPT PTE that maps a 4-KiB page (SDM "Format of an EPT Page-Table Entry")::

     63   62 .. 52  51 ....................... 12  11 .. 10  9   8   7   6   5..3  2   1   0
    +----+---------+-----------------------------+---------+---+---+---+----+----+---+---+---+
    |SVE | (other) |  ADDR: host-physical page   | (other) | D | A |   |IPAT| MT | X | W | R |
    +----+---------+-----------------------------+---------+---+---+---+----+----+---+---+---+
      SVE: suppress #VE.  MT: EPT memory type (UC for device BARs).  A/D: accessed/dirty.

The model keeps a flat dict GPA page -> entry (the 4-level walk is what hardware does; the
lab needs only the per-page outcome): an ``"mmio"`` entry is its ADDR (HPA page base, >= 0),
a ``"trap"`` entry is -1.  R/W/X are not modelled separately: an mmio page allows every access.

Theory of operation of ``lookup(gpa, size)``
--------------------------------------------
``size`` < 1 counts as 1.  For each 4-KiB page the access touches, in address order:

 1. no entry                                           -> ``EptViolation(gpa, "not mapped")``
 2. a page of another kind than the first page         -> ``EptViolation(.., "spans kinds")``
 3. mmio page whose HPA does not follow the previous   -> ``EptViolation(.., "not contiguous")``

then ``EptHit("trap", None)`` or ``EptHit("mmio", hpa of the first byte)``.  The violation's
``gpa`` is the first byte of the failing page that the access touches (the access address
itself unless a later page failed), as the exit qualification's guest-physical address is.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from operator import index as _as_int
from typing import Any, Literal, NamedTuple, Union

__all__ = [
    "EPT_KINDS",
    "V_NOT_MAPPED",
    "V_SPANS_KINDS",
    "V_NOT_CONTIGUOUS",
    "EptHit",
    "EptViolation",
    "EptResult",
    "Ept",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_OFFSET = PAGE_SIZE - 1
_TRAP = -1

EptKind = Literal["mmio", "trap"]
EPT_KINDS: frozenset[str] = frozenset({"mmio", "trap"})

V_NOT_MAPPED = "not mapped"
V_SPANS_KINDS = "spans kinds"
V_NOT_CONTIGUOUS = "not contiguous"


class EptHit(NamedTuple):
    """The access resolves to ``kind``: ``"mmio"`` at host-physical ``hpa``, or ``"trap"``.

    A NamedTuple (built on every mmio hit: ``tuple.__new__`` is much cheaper than a frozen
    dataclass's ``__init__``); dispatch on ``type(res) is EptHit``.
    """

    kind: str
    hpa: int | None


@dataclass(frozen=True, slots=True)
class EptViolation:
    """The access cannot be resolved; ``gpa`` is the first byte at fault."""

    gpa: int
    reason: str


EptResult = Union[EptHit, EptViolation]

_TRAP_HIT = EptHit("trap", None)
_tuple_new = tuple.__new__


class Ept:
    """The EPT of one guest (see the module docstring).

    Parameters
    ----------
    gaw:
        Guest-physical address width: ``map`` refuses pages at or above ``2**gaw``
        (48 = 4-level EPT).  Lookups there are simply ``"not mapped"``.
    """

    __slots__ = ("_gaw", "_pages", "mmio_hits", "trap_hits", "violations")

    def __init__(self, gaw: int = 48) -> None:
        gaw = _as_int(gaw)
        if not PAGE_SHIFT < gaw <= 64:
            raise ValueError(f"guest address width {gaw} outside 13..64")
        self._gaw = gaw
        self._pages: dict[int, int] = {}      # GPA page -> HPA page base (mmio) | -1 (trap)
        self.mmio_hits = 0
        self.trap_hits = 0
        self.violations: Counter[str] = Counter()

    @property
    def gaw(self) -> int:
        return self._gaw

    # --- programming (the host / VMM) -----------------------------------------------------

    def map(self, gpa: int, size: int, kind: str, hpa: int | None = None) -> None:
        """Map ``[gpa, gpa+size)`` as ``kind`` in 4-KiB pages.

        ``"mmio"`` requires ``hpa`` (4-KiB aligned; page i maps to ``hpa + i*4096``);
        ``"trap"`` takes none.  Mapping over an existing entry is refused (as KVM refuses
        overlapping memslots); everything is checked before anything changes.  ValueError on
        misaligned, empty or out-of-range arguments.
        """
        gpa, size = _as_int(gpa), _as_int(size)
        if gpa < 0 or size <= 0 or (gpa | size) & _OFFSET:
            raise ValueError(f"gpa 0x{gpa:x} / size 0x{size:x}: not 4-KiB aligned and positive")
        if gpa + size > 1 << self._gaw:
            raise ValueError(f"range ends beyond the {self._gaw}-bit guest-physical space")
        if kind == "mmio":
            if hpa is None:
                raise ValueError("an mmio mapping needs the host-physical address of the BAR page")
            hpa = _as_int(hpa)
            if hpa < 0 or hpa & _OFFSET or hpa + size > 1 << 64:
                raise ValueError(f"hpa 0x{hpa:x} not 4-KiB aligned or range beyond 64 bits")
        elif kind == "trap":
            if hpa is not None:
                raise ValueError("a trap mapping has no host-physical address")
        else:
            raise ValueError(f"EPT kind {kind!r} not one of {sorted(EPT_KINDS)}")
        first, n = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
        pages = self._pages
        for p in range(first, first + n):
            if p in pages:
                raise ValueError(f"GPA 0x{p << PAGE_SHIFT:x} is already mapped")
        if hpa is None:
            for p in range(first, first + n):
                pages[p] = _TRAP
        else:
            for k in range(n):
                pages[first + k] = hpa + (k << PAGE_SHIFT)

    def unmap(self, gpa: int, size: int) -> int:
        """Remove the entries of ``[gpa, gpa+size)`` (4-KiB aligned); return bytes unmapped."""
        gpa, size = _as_int(gpa), _as_int(size)
        if gpa < 0 or size < 0 or (gpa | size) & _OFFSET:
            raise ValueError(f"gpa 0x{gpa:x} / size 0x{size:x}: not 4-KiB aligned")
        first, n = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
        pages = self._pages
        done = 0
        if n > len(pages):
            for p in [p for p in pages if first <= p < first + n]:
                del pages[p]
                done += 1
        else:
            for p in range(first, first + n):
                if pages.pop(p, None) is not None:
                    done += 1
        return done << PAGE_SHIFT

    # --- the hot path ---------------------------------------------------------------------

    def lookup(self, gpa: int, size: int = 1) -> EptResult:
        """Resolve a guest access of ``size`` bytes at ``gpa``; never raises on integer input."""
        page = gpa >> PAGE_SHIFT
        e = self._pages.get(page)
        if e is None:
            return self._violation(gpa, V_NOT_MAPPED)
        n = size if size > 0 else 1
        if (gpa + n - 1) >> PAGE_SHIFT != page:
            return self._span(gpa, n, page, e)
        if e < 0:
            self.trap_hits += 1
            return _TRAP_HIT
        self.mmio_hits += 1
        return _tuple_new(EptHit, ("mmio", e | (gpa & _OFFSET)))

    def _span(self, gpa: int, n: int, page: int, e: int) -> EptResult:
        pages = self._pages
        for p in range(page + 1, ((gpa + n - 1) >> PAGE_SHIFT) + 1):
            e2 = pages.get(p)
            if e2 is None:
                return self._violation(p << PAGE_SHIFT, V_NOT_MAPPED)
            if (e2 < 0) != (e < 0):
                return self._violation(p << PAGE_SHIFT, V_SPANS_KINDS)
            if e >= 0 and e2 != pages[p - 1] + PAGE_SIZE:
                return self._violation(p << PAGE_SHIFT, V_NOT_CONTIGUOUS)
        if e < 0:
            self.trap_hits += 1
            return _TRAP_HIT
        self.mmio_hits += 1
        return _tuple_new(EptHit, ("mmio", e | (gpa & _OFFSET)))

    def _violation(self, gpa: int, reason: str) -> EptViolation:
        self.violations[reason] += 1
        return EptViolation(gpa, reason)

    # --- views ----------------------------------------------------------------------------

    def entry(self, gpa: int) -> EptHit | None:
        """The entry of the page holding ``gpa`` (as an ``EptHit`` for its first byte), or None."""
        page = _as_int(gpa) >> PAGE_SHIFT
        e = self._pages.get(page)
        if e is None:
            return None
        return _TRAP_HIT if e < 0 else EptHit("mmio", e)

    def mappings(self) -> list[dict[str, Any]]:
        """Plain-data view, sorted by GPA, contiguous pages merged into ranges.

        ``[{"gpa", "size", "kind", "hpa"}, ...]``: adjacent trap pages merge; adjacent mmio
        pages merge when their HPAs are contiguous too.  ``hpa`` is None for traps.
        """
        out: list[dict[str, Any]] = []
        run: dict[str, Any] | None = None
        for page in sorted(self._pages):
            e = self._pages[page]
            gpa = page << PAGE_SHIFT
            kind, hpa = ("trap", None) if e < 0 else ("mmio", e)
            if (run is not None and run["kind"] == kind and run["gpa"] + run["size"] == gpa
                    and (hpa is None or run["hpa"] + run["size"] == hpa)):
                run["size"] += PAGE_SIZE
                continue
            run = {"gpa": gpa, "size": PAGE_SIZE, "kind": kind, "hpa": hpa}
            out.append(run)
        return out

    def counters(self) -> dict[str, Any]:
        """Plain-data counters: hits per kind, violations per reason."""
        return {"mmio": self.mmio_hits, "trap": self.trap_hits,
                "violations": dict(sorted(self.violations.items()))}

    def __len__(self) -> int:
        """Number of mapped 4-KiB pages."""
        return len(self._pages)

    def __repr__(self) -> str:
        return f"Ept(gaw={self._gaw}, pages={len(self._pages)})"

"""fabric.ept: the per-guest second-level CPU mapping (mmio pass-through pages, trap pages)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.ept import (
    V_NOT_CONTIGUOUS,
    V_NOT_MAPPED,
    V_SPANS_KINDS,
    Ept,
    EptHit,
    EptViolation,
)

P = 4096
BAR = 0xF000_0000           # a VF's BAR in host-physical space


def vf_ept() -> Ept:
    """A guest with an assigned VF: BAR pages 0-1 passed through, the MSI-X table page 2 trapped."""
    e = Ept()
    e.map(0xC000_0000, 2 * P, "mmio", BAR)
    e.map(0xC000_2000, P, "trap")
    return e


def test_mmio_and_trap_hits() -> None:
    e = vf_ept()
    assert e.lookup(0xC000_0000, 4) == EptHit("mmio", BAR)
    assert e.lookup(0xC000_1ABC, 4) == EptHit("mmio", BAR + 0x1ABC)
    assert e.lookup(0xC000_2010, 4) == EptHit("trap", None)
    assert e.lookup(0xC000_2010) is e.lookup(0xC000_2FFF)          # shared result object
    assert e.counters() == {"mmio": 2, "trap": 3, "violations": {}}


def test_unmapped_is_a_violation_and_guest_ram_is_not_here() -> None:
    e = vf_ept()
    # guest RAM (e.g. GPA 0x1000) is local to the guest process: it is never in the EPT
    assert e.lookup(0x1000, 8) == EptViolation(0x1000, V_NOT_MAPPED)
    assert e.lookup(0xC000_3000, 4) == EptViolation(0xC000_3000, "not mapped")
    assert e.lookup(-1, 4) == EptViolation(-1, V_NOT_MAPPED)
    assert e.lookup(1 << 60, 4).reason == V_NOT_MAPPED
    assert e.counters()["violations"] == {V_NOT_MAPPED: 4}


def test_spanning_accesses() -> None:
    e = vf_ept()
    e.map(0xD000_0000, P, "mmio", BAR + 0x10000)
    e.map(0xD000_1000, P, "mmio", BAR + 0x30000)        # next GPA page, non-contiguous HPA
    e.map(0xD000_4000, 2 * P, "trap")
    # mmio pages 0-1 are contiguous: one hit
    assert e.lookup(0xC000_0FFC, 8) == EptHit("mmio", BAR + 0xFFC)
    # mmio page 1 then trap page 2: different kinds
    assert e.lookup(0xC000_1FFC, 8) == EptViolation(0xC000_2000, V_SPANS_KINDS)
    # trap page 2 then nothing
    assert e.lookup(0xC000_2FFC, 8) == EptViolation(0xC000_3000, V_NOT_MAPPED)
    # mmio with a gap in host-physical space
    assert e.lookup(0xD000_0FFC, 8) == EptViolation(0xD000_1000, V_NOT_CONTIGUOUS)
    # two trap pages: one trap
    assert e.lookup(0xD000_4FFC, 8) == EptHit("trap", None)
    # three pages, the last unmapped
    assert e.lookup(0xC000_0000, 3 * P + 1).reason == V_SPANS_KINDS
    # size < 1 counts as one byte: stays in its page
    assert e.lookup(0xC000_1FFF, 0) == EptHit("mmio", BAR + 0x1FFF)
    assert e.lookup(0xC000_1FFF, -3) == EptHit("mmio", BAR + 0x1FFF)


@pytest.mark.parametrize("args,match", [
    ((0x1000, P, "mmio"), "needs the host-physical"),
    ((0x1000, P, "trap", BAR), "no host-physical"),
    ((0x1000, P, "ram"), "not one of"),
    ((0x1800, P, "trap"), "aligned"),
    ((0x1000, 0x800, "trap"), "aligned"),
    ((0x1000, 0, "trap"), "aligned"),
    ((-P, P, "trap"), "aligned"),
    ((0x1000, P, "mmio", BAR + 0x10), "aligned"),
    ((0x1000, P, "mmio", -P), "aligned"),
    (((1 << 48) - P, 2 * P, "trap"), "beyond"),
])
def test_map_validation(args: tuple, match: str) -> None:
    e = Ept()
    with pytest.raises(ValueError, match=match):
        e.map(*args)
    assert len(e) == 0


def test_map_over_an_entry_is_refused_atomically() -> None:
    e = vf_ept()
    before = e.mappings()
    with pytest.raises(ValueError, match="already mapped"):
        e.map(0xBFFF_E000, 4 * P, "trap")               # 2 free pages, then the mmio page
    assert e.mappings() == before


def test_unmap() -> None:
    e = vf_ept()
    assert e.unmap(0xC000_1000, 2 * P) == 2 * P
    assert e.unmap(0xC000_1000, 2 * P) == 0
    assert e.lookup(0xC000_2000).reason == V_NOT_MAPPED
    assert e.lookup(0xC000_0000) == EptHit("mmio", BAR)
    assert e.unmap(0, 1 << 40) == P                   # huge range: walks the entries instead
    assert len(e) == 0
    with pytest.raises(ValueError):
        e.unmap(0x10, P)


def test_mappings_merge_contiguous_pages() -> None:
    e = Ept()
    e.map(0x0000, P, "mmio", 0x10000)
    e.map(0x1000, P, "mmio", 0x11000)                 # contiguous: merges
    e.map(0x2000, P, "mmio", 0x20000)                 # HPA gap: new range
    e.map(0x3000, P, "trap")                          # other kind: new range
    e.map(0x4000, 2 * P, "trap")                      # adjacent traps merge
    e.map(0x7000, P, "trap")                          # GPA gap: new range
    e.map(0x8000, P, "mmio", 0x21000)                 # HPA follows 0x20000's run, GPA does not
    assert e.mappings() == [
        {"gpa": 0x0000, "size": 2 * P, "kind": "mmio", "hpa": 0x10000},
        {"gpa": 0x2000, "size": P, "kind": "mmio", "hpa": 0x20000},
        {"gpa": 0x3000, "size": 3 * P, "kind": "trap", "hpa": None},
        {"gpa": 0x7000, "size": P, "kind": "trap", "hpa": None},
        {"gpa": 0x8000, "size": P, "kind": "mmio", "hpa": 0x21000},
    ]
    assert e.entry(0x1234) == EptHit("mmio", 0x11000)
    assert e.entry(0x3FFF) == EptHit("trap", None)
    assert e.entry(0x6000) is None


def test_gaw_bounds() -> None:
    for bad in (12, 65):
        with pytest.raises(ValueError):
            Ept(bad)
    e = Ept(39)
    assert e.gaw == 39
    with pytest.raises(ValueError):
        e.map(1 << 39, P, "trap")
    e.map((1 << 39) - P, P, "trap")


@settings(max_examples=1000, deadline=None)
@given(gpa=st.integers(-(1 << 70), 1 << 70) | st.integers(0xBFFF_F000, 0xC000_4000),
       size=st.integers(-(1 << 20), 1 << 20) | st.integers(0, 3 * P))
def test_lookup_never_raises(gpa: int, size: int) -> None:
    res = vf_ept().lookup(gpa, size)
    assert type(res) in (EptHit, EptViolation)


# --- map/unmap sequences against a reference model -------------------------------------------

PAGES = 20

op = st.one_of(
    st.tuples(st.just("mmio"), st.integers(0, PAGES), st.integers(1, 4), st.integers(0, 40)),
    st.tuples(st.just("trap"), st.integers(0, PAGES), st.integers(1, 4), st.none()),
    st.tuples(st.just("unmap"), st.integers(0, PAGES), st.integers(0, 5), st.none()),
)


def ref_lookup(ref: dict[int, int | None], gpa: int, size: int):
    """Reference: per page in order (not mapped / spans kinds / not contiguous), then the hit."""
    n = max(size, 1)
    pages = range(gpa // P, (gpa + n - 1) // P + 1)
    for i, p in enumerate(pages):
        if p not in ref:
            return EptViolation(max(gpa, p * P), V_NOT_MAPPED)
        if i and (ref[p] is None) != (ref[pages[0]] is None):
            return EptViolation(p * P, V_SPANS_KINDS)
        if i and ref[p] is not None and ref[p] != ref[p - 1] + P:
            return EptViolation(p * P, V_NOT_CONTIGUOUS)
    first = ref[pages[0]]
    return EptHit("trap", None) if first is None else EptHit("mmio", first + gpa % P)


@settings(max_examples=400, deadline=None)
@given(ops=st.lists(op, max_size=25),
       probes=st.lists(st.tuples(st.integers(0, (PAGES + 5) * P), st.integers(0, 3 * P)),
                       max_size=25))
def test_map_unmap_sequences_match_reference(ops: list, probes: list) -> None:
    e = Ept()
    ref: dict[int, int | None] = {}          # GPA page -> HPA page base, None for trap
    for kind, page, n, hpage in ops:
        if kind == "unmap":
            gone = [p for p in range(page, page + n) if p in ref]
            assert e.unmap(page * P, n * P) == len(gone) * P
            for p in gone:
                del ref[p]
            continue
        hpa = None if hpage is None else hpage * P
        if any(page + k in ref for k in range(n)):
            with pytest.raises(ValueError):
                e.map(page * P, n * P, kind, hpa)
            continue
        e.map(page * P, n * P, kind, hpa)
        for k in range(n):
            ref[page + k] = None if hpa is None else hpa + k * P
    assert len(e) == len(ref)
    # mappings() expands back to the reference, and its runs are maximal
    expanded: dict[int, int | None] = {}
    runs = e.mappings()
    for m in runs:
        for k in range(m["size"] // P):
            expanded[m["gpa"] // P + k] = None if m["hpa"] is None else m["hpa"] + k * P
    assert expanded == ref
    for a, b in zip(runs, runs[1:]):
        assert a["gpa"] + a["size"] <= b["gpa"]
        mergeable = (a["gpa"] + a["size"] == b["gpa"] and a["kind"] == b["kind"]
                     and (a["hpa"] is None or a["hpa"] + a["size"] == b["hpa"]))
        assert not mergeable
    for gpa, size in probes:
        assert e.lookup(gpa, size) == ref_lookup(ref, gpa, size)

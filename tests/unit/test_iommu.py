"""fabric.iommu: host memory map and the VT-d DMA-remapping unit (0x02..0x0D, 0x31/0x51/0x59)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.bdf import Bdf
from fabric.dmar import FaultLog, FaultReason, dmar_line
from fabric.iommu import (
    FR_PASID_DIR_ENTRY_P,
    FR_PASID_ENTRY_P,
    FR_SM_TTM0_PASID,
    PAGE_SIZE,
    SL_R,
    SL_W,
    DmaFault,
    Iommu,
    MemoryMap,
    Translation,
    Unclaimed,
)

DEV = 0x0100                       # 01:00.0
DEV_FN1 = int(Bdf(1, 0, 1))        # 01:00.1
OTHER = 0x0200                     # 02:00.0
P = PAGE_SIZE
GiB = 1 << 30


def unit(mgaw: int = 48, records: int = 8) -> Iommu:
    """A unit whose memory map has host RAM at [0, 1 GiB) and guest g1's RAM at [4 GiB, 5 GiB)."""
    mm = MemoryMap()
    mm.map_range(0, GiB, "host", 0)
    mm.map_range(4 * GiB, GiB, "g1", 0)
    return Iommu(FaultLog(records), mgaw, memory=mm)


# ---------------------------------------------------------------------------------------------
# MemoryMap


def test_memory_map_lookup_and_owner_base() -> None:
    mm = MemoryMap()
    mm.map_range(0x1000_0000, 0x10_0000, "g1", 0)
    mm.map_range(0, 0x1000_0000, "host", 0)
    mm.map_range(0x2000_0000, 0x2000, "g2", 0x5000)
    assert mm.lookup(0) == ("host", 0, 0x1000_0000)
    assert mm.lookup(0x0FFF_FFFF) == ("host", 0x0FFF_FFFF, 1)
    assert mm.lookup(0x1000_0000) == ("g1", 0, 0x10_0000)          # adjacent ranges are fine
    assert mm.lookup(0x1000_0123) == ("g1", 0x123, 0x10_0000 - 0x123)
    assert mm.lookup(0x1010_0000) is None                          # just past g1
    assert mm.lookup(0x2000_1001) == ("g2", 0x6001, 0xFFF)
    assert mm.lookup(0x2000_2000) is None
    assert mm.lookup(-1) is None
    assert [r["owner"] for r in mm.ranges()] == ["host", "g1", "g2"]
    assert len(mm) == 3


@pytest.mark.parametrize("hpa,size", [
    (0x1000, 0x1000),        # identical
    (0x0800, 0x1000),        # overlaps the start
    (0x1800, 0x1000),        # overlaps the end
    (0x0000, 0x4000),        # contains
    (0x1400, 0x0100),        # contained
    (0x1FFF, 0x0001),        # last byte
])
def test_memory_map_refuses_overlaps(hpa: int, size: int) -> None:
    mm = MemoryMap()
    mm.map_range(0x1000, 0x1000, "host")
    with pytest.raises(ValueError, match="overlaps"):
        mm.map_range(hpa, size, "g1")
    assert mm.ranges() == [{"hpa": 0x1000, "size": 0x1000, "owner": "host", "owner_base": 0}]


@pytest.mark.parametrize("args", [
    (0, 0, "host"), (-4096, 4096, "host"), ((1 << 64) - 4096, 8192, "host"), (0, 4096, ""),
    (0, 4096, None), (0, 4096, "host", -1),
])
def test_memory_map_rejects_bad_ranges(args: tuple) -> None:
    with pytest.raises(ValueError):
        MemoryMap().map_range(*args)


def test_memory_map_unmap_owner_and_range() -> None:
    mm = MemoryMap()
    mm.map_range(0, 0x1000, "g1")
    mm.map_range(0x1000, 0x1000, "host")
    mm.map_range(0x8000, 0x1000, "g1", 0x1000)
    assert mm.unmap_owner("g1") == 2
    assert mm.unmap_owner("g1") == 0
    assert mm.lookup(0x8000) is None and mm.lookup(0x1000) == ("host", 0, 0x1000)
    mm.map_range(0, 0x1000, "g2")                     # the freed space can be claimed again
    assert mm.unmap_range(0x1000) is True
    assert mm.unmap_range(0x1000) is False
    assert mm.unmap_range(0x800) is False
    assert [r["owner"] for r in mm.ranges()] == ["g2"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16), st.sampled_from("abc")),
                max_size=20),
       st.lists(st.integers(-2, 90), max_size=30))
def test_memory_map_matches_reference(ops: list, probes: list) -> None:
    """Random claims against a byte-level reference: accepted iff free, lookups agree."""
    mm = MemoryMap()
    ref: dict[int, tuple[str, int]] = {}         # unit address -> (owner, local)
    for start, size, owner in ops:
        free = all(a not in ref for a in range(start, start + size))
        if free:
            mm.map_range(start, size, owner, 100 * start)
            for a in range(start, start + size):
                ref[a] = (owner, 100 * start + a - start)
        else:
            with pytest.raises(ValueError):
                mm.map_range(start, size, owner, 0)
    for a in probes:
        got = mm.lookup(a)
        if a not in ref:
            assert got is None
        else:
            left = 1
            while a + left in ref and ref[a + left][0] == ref[a][0] and \
                    ref[a + left][1] == ref[a][1] + left:
                left += 1
            owner, local, got_left = got
            assert (owner, local) == ref[a]
            assert 1 <= got_left <= left      # ranges may be adjacent, never overlapping


# ---------------------------------------------------------------------------------------------
# Context entries: 0x02, 0x0D, pass-through


def test_no_context_faults_0x02() -> None:
    u = unit()
    res = u.translate(DEV, 0x1000, 4, write=False)
    assert res == DmaFault(FaultReason.CONTEXT_ENTRY_P, DEV, 0x1000, False, None, 0x1000,
                           "context entry not present")
    assert u.fault_log.pending()[0].line() == (
        "DMAR: [DMA Read NO_PASID] Request device [01:00.0] fault addr 0x1000 "
        "[fault reason 0x02] Present bit in context entry is clear")


def test_block_context_faults_0x0d() -> None:
    u = unit()
    u.set_context(DEV, "block")
    res = u.translate(DEV, 0x2345, 8, write=True)
    assert type(res) is DmaFault and res.reason == 0x0D and res.write is True
    assert dmar_line(u.fault_log.pending()[0]) == (
        "DMAR: [DMA Write NO_PASID] Request device [01:00.0] fault addr 0x2000 "
        "[fault reason 0x0d] PCE for translation request specifies blocking")


def test_pass_through_is_identity_into_the_memory_map() -> None:
    u = unit()
    u.set_context(DEV, "pt")
    assert u.translate(DEV, 0x1234, 64, True) == Translation("host", 0x1234, 0x1234)
    assert u.translate(DEV, 4 * GiB + 0x10, 4, False) == Translation("g1", 0x10, 4 * GiB + 0x10)
    # pass-through skips the MGAW check (QEMU): far addresses are simply unclaimed
    assert u.translate(DEV, 1 << 60, 4, False) == Unclaimed(1 << 60, "no memory range")
    assert u.translate(DEV, GiB - 2, 4, True) == Unclaimed(GiB, "crosses the end of a memory range")
    assert u.fault_log.recorded == 0
    assert u.counters() == {"translations": 2, "unclaimed": 2, "faults": {}}


def test_context_entries_are_per_rid_and_clearable() -> None:
    u = unit()
    u.set_context(DEV, "pt")
    assert type(u.translate(OTHER, 0x1000, 4, False)) is DmaFault
    u.clear_context(DEV)
    assert u.translate(DEV, 0x1000, 4, False).reason == 0x02
    u.clear_context(DEV)                                 # idempotent


@pytest.mark.parametrize("rid,mode", [
    (DEV, "passthrough"), (DEV, ("domain",)), (DEV, ("domain", 99)), (DEV, ("dom", 1)),
    (0x10000, "pt"), (-1, "pt"), (DEV, None),
])
def test_set_context_rejects_bad_entries(rid: int, mode) -> None:
    u = unit()
    u.create_domain(1)
    with pytest.raises(ValueError):
        u.set_context(rid, mode)
    assert u.contexts() == {}


def test_contexts_view_and_msgpack_list_form() -> None:
    u = unit()
    u.create_domain(7)
    u.set_context(OTHER, "block")
    u.set_context(DEV, ["domain", 7])                 # msgpack turns tuples into lists
    u.set_context(Bdf(1, 0, 1), "pt")                 # a Bdf is accepted where programming
    assert u.contexts() == {DEV: ("domain", 7), DEV_FN1: "pt", OTHER: "block"}
    assert list(u.contexts()) == [DEV, DEV_FN1, OTHER]
    assert u.context(DEV) == ("domain", 7) and u.context(0x0300) is None


# ---------------------------------------------------------------------------------------------
# Domains: second-level PTEs, 0x04 / 0x05 / 0x06


def domain_unit() -> Iommu:
    u = unit()
    u.create_domain(1)
    u.set_context(DEV_FN1, ("domain", 1))
    u.map(1, 0x0000, 4 * GiB + 0x10_0000, 2 * P)                      # RW  -> g1 0x100000
    u.map(1, 0x3000, 0x5000, P, read=True, write=False)               # RO  -> host 0x5000
    u.map(1, 0x4000, 0x9000, P, read=False, write=True)               # WO  -> host 0x9000
    return u


def test_domain_translation_hit() -> None:
    u = domain_unit()
    assert u.translate(DEV_FN1, 0x0010, 4, True) == \
        Translation("g1", 0x10_0010, 4 * GiB + 0x10_0010)
    assert u.translate(DEV_FN1, 0x3FFC, 4, False) == Translation("host", 0x5FFC, 0x5FFC)
    assert u.translate(DEV_FN1, 0x4800, 128, True) == Translation("host", 0x9800, 0x9800)
    assert u.translations == 3 and u.fault_log.recorded == 0


def test_write_to_read_only_page_faults_0x05_exact_line() -> None:
    u = domain_unit()
    res = u.translate(DEV_FN1, 0x3000, 4, write=True)
    assert res == DmaFault(FaultReason.WRITE, DEV_FN1, 0x3000, True, None, 0x3000,
                           "PTE is read-only")
    assert u.fault_log.lines() == [
        "DMAR: [DMA Write NO_PASID] Request device [01:00.1] fault addr 0x3000 "
        "[fault reason 0x05] PTE Write access is not set"]


def test_read_of_write_only_page_faults_0x06() -> None:
    u = domain_unit()
    res = u.translate(DEV_FN1, 0x4010, 4, write=False)
    assert res.reason == FaultReason.READ and res.detail == "PTE is write-only"
    assert u.fault_log.lines() == [
        "DMAR: [DMA Read NO_PASID] Request device [01:00.1] fault addr 0x4000 "
        "[fault reason 0x06] PTE Read access is not set"]


def test_unmapped_page_faults_0x05_for_writes_and_0x06_for_reads() -> None:
    """A not-present SL-PTE (R=W=0) is a permission fault, as QEMU vtd_iova_to_slpte reports."""
    u = domain_unit()
    w = u.translate(DEV_FN1, 0x7_0000, 4, True)
    r = u.translate(DEV_FN1, 0x7_0000, 4, False)
    assert (w.reason, r.reason) == (0x05, 0x06)
    assert w.detail == r.detail == "PTE not present"
    assert u.faults == {0x05: 1, 0x06: 1}


def test_beyond_mgaw_faults_0x04() -> None:
    u = domain_unit()
    u2 = unit(mgaw=39)
    u2.create_domain(1)
    u2.set_context(DEV, ("domain", 1))
    for iommu, rid, width in ((u, DEV_FN1, 48), (u2, DEV, 39)):
        top = 1 << width
        res = iommu.translate(rid, top, 4, False)
        assert res.reason == FaultReason.ADDR_BEYOND_MGAW and res.fault_addr == top
        # starts below, ends above: the first byte beyond the width is what is recorded
        res = iommu.translate(rid, top - 2, 4, True)
        assert res.reason == 0x04 and res.addr == top - 2 and res.fault_addr == top
    assert u.translate(DEV_FN1, -4096, 4, False).reason == 0x04
    assert u.fault_log.lines()[0] == (
        "DMAR: [DMA Read NO_PASID] Request device [01:00.1] fault addr 0x1000000000000 "
        "[fault reason 0x04] Access beyond MGAW")


def test_spanning_access_checks_both_pages() -> None:
    u = domain_unit()
    # pages 0 and 1 are RW and contiguous in g1
    assert u.translate(DEV_FN1, 0x0FFC, 8, True) == \
        Translation("g1", 0x10_0FFC, 4 * GiB + 0x10_0FFC)
    # page 1 RW, page 2 not mapped: faults on the second page
    res = u.translate(DEV_FN1, 0x1FFC, 8, True)
    assert res.reason == 0x05 and res.addr == 0x1FFC and res.fault_addr == 0x2000
    # page 3 RO then page 4 WO: a read faults on page 4, a write on page 3
    assert u.translate(DEV_FN1, 0x3FF0, 0x20, False).fault_addr == 0x4000
    assert u.translate(DEV_FN1, 0x3FF0, 0x20, True).fault_addr == 0x3FF0
    assert [ln.split(" fault addr ")[1][:6] for ln in u.fault_log.lines()] == \
        ["0x2000", "0x4000", "0x3000"]


def test_spanning_access_with_non_contiguous_hpas_is_unclaimed() -> None:
    u = unit()
    u.create_domain(2)
    u.set_context(DEV, ("domain", 2))
    u.map(2, 0x0000, 0x8000, P)
    u.map(2, 0x1000, 0x2000, P)
    assert u.translate(DEV, 0xFF0, 0x20, True) == \
        Unclaimed(0x2000, "pages not contiguous in host memory")
    assert u.fault_log.recorded == 0 and u.unclaimed == 1


def test_translation_must_stay_in_one_memory_range() -> None:
    u = unit()
    u.create_domain(3)
    u.set_context(DEV, ("domain", 3))
    u.map(3, 0x0000, GiB - P, 2 * P)                  # last host page, then an unclaimed page
    u.map(3, 0x10000, 8 * GiB, P)                     # nobody's RAM
    assert u.translate(DEV, 0x0FF0, 0x20, False) == \
        Unclaimed(GiB, "crosses the end of a memory range")
    assert u.translate(DEV, 0x10000, 4, False) == Unclaimed(8 * GiB, "no memory range")
    assert u.translate(DEV, 0x0010, 4, False) == Translation("host", GiB - P + 0x10, GiB - P + 0x10)


def test_size_zero_counts_as_one_byte() -> None:
    u = domain_unit()
    assert u.translate(DEV_FN1, 0x3000, 0, False) == Translation("host", 0x5000, 0x5000)
    assert u.translate(DEV_FN1, 0x2000, -5, False).reason == 0x06


def test_map_validation() -> None:
    u = unit()
    u.create_domain(1)
    for args in [(1, 0x800, 0, P), (1, 0, 0x800, P), (1, 0, 0, 0x800), (1, 0, 0, 0),
                 (1, -P, 0, P), (1, (1 << 48) - P, 0, 2 * P), (1, 0, (1 << 64) - P, 2 * P),
                 (2, 0, 0, P)]:
        with pytest.raises(ValueError):
            u.map(*args)
    with pytest.raises(ValueError, match="not present"):
        u.map(1, 0, 0, P, read=False, write=False)
    assert u.domain_mappings(1) == []


def test_map_over_present_pte_is_refused_atomically() -> None:
    u = unit()
    u.create_domain(1)
    u.map(1, 0x3000, 0x3000, P)
    with pytest.raises(ValueError, match="already mapped"):
        u.map(1, 0x1000, 0x10000, 4 * P)             # pages 1,2 free; page 3 taken
    assert u.domain_mappings(1) == [
        {"iova": 0x3000, "hpa": 0x3000, "size": P, "read": True, "write": True}]


def test_unmap_returns_bytes_and_faults_afterwards() -> None:
    u = domain_unit()
    assert u.unmap(1, 0x0000, 0x10_0000) == 4 * P      # big range: only the present pages count
    assert u.unmap(1, 0x0000, 2 * P) == 0
    assert u.translate(DEV_FN1, 0x10, 4, True).reason == 0x05
    u.map(1, 0x0000, 0x7000, P, write=False)
    assert u.unmap(1, 0x0000, P) == P
    with pytest.raises(ValueError):
        u.unmap(1, 0x10, P)
    with pytest.raises(ValueError):
        u.unmap(9, 0, P)


def test_pte_encoding_is_vtd_second_level_format() -> None:
    u = domain_unit()
    assert u.pte(1, 0x3123) == 0x5000 | SL_R
    assert u.pte(1, 0x4000) == 0x9000 | SL_W
    assert u.pte(1, 0x0000) == (4 * GiB + 0x10_0000) | SL_R | SL_W
    assert u.pte(1, 0x9000) == 0


def test_domain_mappings_merge_contiguous_runs() -> None:
    u = unit()
    u.create_domain(4)
    u.map(4, 0x0000, 0x10000, 2 * P)
    u.map(4, 0x2000, 0x12000, P)                      # continues the run
    u.map(4, 0x3000, 0x13000, P, write=False)         # same HPA run, other permission
    u.map(4, 0x5000, 0x15000, P)                      # IOVA gap
    u.map(4, 0x6000, 0x30000, P)                      # HPA gap
    assert u.domain_mappings(4) == [
        {"iova": 0x0000, "hpa": 0x10000, "size": 3 * P, "read": True, "write": True},
        {"iova": 0x3000, "hpa": 0x13000, "size": P, "read": True, "write": False},
        {"iova": 0x5000, "hpa": 0x15000, "size": P, "read": True, "write": True},
        {"iova": 0x6000, "hpa": 0x30000, "size": P, "read": True, "write": True},
    ]
    with pytest.raises(ValueError):
        u.domain_mappings(5)


def test_destroy_domain_makes_its_contexts_not_present() -> None:
    u = domain_unit()
    u.set_context(DEV, ("domain", 1))
    u.set_context(OTHER, "pt")
    u.set_pasid(DEV, 5, 1)
    u.destroy_domain(1)
    assert u.contexts() == {OTHER: "pt"}
    assert u.pasid_entries() == {}
    assert u.domains() == []
    assert u.translate(DEV_FN1, 0x10, 4, True).reason == 0x02
    assert u.translate(DEV, 0x10, 4, True, pasid=5).reason == FR_SM_TTM0_PASID
    with pytest.raises(ValueError):
        u.destroy_domain(1)
    u.create_domain(1)                                # a fresh, empty domain 1
    u.set_context(DEV_FN1, ("domain", 1))
    assert u.translate(DEV_FN1, 0x10, 4, True).reason == 0x05
    with pytest.raises(ValueError):
        u.create_domain(1)
    with pytest.raises(ValueError):
        u.create_domain(0x10000)


def test_context_sees_later_mappings() -> None:
    """The cached context entry points at the live table: map/unmap are visible at once."""
    u = unit()
    u.create_domain(1)
    u.set_context(DEV, ("domain", 1))
    assert u.translate(DEV, 0x1000, 4, False).reason == 0x06
    u.map(1, 0x1000, 0x1000, P)
    assert type(u.translate(DEV, 0x1000, 4, False)) is Translation
    u.unmap(1, 0x1000, P)
    assert u.translate(DEV, 0x1000, 4, False).reason == 0x06


# ---------------------------------------------------------------------------------------------
# Scalable-mode PASID hook: 0x31, 0x51, 0x59


def pasid_unit() -> Iommu:
    u = unit()
    u.create_domain(1)                      # the PF's own domain (requests without PASID)
    u.create_domain(2)                      # an ADI assigned to g1
    u.map(1, 0, 0x10000, P)
    u.map(2, 0, 4 * GiB + 0x2000, P)
    u.set_context(DEV_FN1, ("domain", 1))
    u.set_pasid(DEV_FN1, 0x45, 2)
    return u


def test_pasid_entry_selects_the_domain() -> None:
    u = pasid_unit()
    assert u.translate(DEV_FN1, 0x10, 4, True) == Translation("host", 0x10010, 0x10010)
    assert u.translate(DEV_FN1, 0x10, 4, True, pasid=0x45) == \
        Translation("g1", 0x2010, 4 * GiB + 0x2010)
    assert u.pasid_entries() == {(DEV_FN1, 0x45): 2}


def test_pasid_faults_name_the_missing_structure() -> None:
    u = pasid_unit()
    # 0x45 >> 6 == 1: PASIDs 0x40..0x7F share a present directory entry
    assert u.translate(DEV_FN1, 0x10, 4, False, pasid=0x46).reason == FR_PASID_ENTRY_P == 0x59
    assert u.translate(DEV_FN1, 0x10, 4, False, pasid=0x80).reason == FR_PASID_DIR_ENTRY_P == 0x51
    assert u.translate(DEV, 0x10, 4, False, pasid=0x45).reason == FR_SM_TTM0_PASID == 0x31
    u.set_context(DEV, "pt")                 # a legacy pass-through RID still refuses PASIDs
    assert u.translate(DEV, 0x10, 4, True, pasid=1).reason == 0x31
    assert u.fault_log.lines() == [
        "DMAR: [DMA Read PASID 0x46] Request device [01:00.1] fault addr 0x0 "
        "[fault reason 0x59] SM: Present bit in PASID Table Entry is clear",
        "DMAR: [DMA Read PASID 0x80] Request device [01:00.1] fault addr 0x0 "
        "[fault reason 0x51] SM: Present bit in Directory Entry is clear",
        "DMAR: [DMA Read PASID 0x45] Request device [01:00.0] fault addr 0x0 "
        "[fault reason 0x31] SM: TTM 0 for request with PASID",
        "DMAR: [DMA Write PASID 0x1] Request device [01:00.0] fault addr 0x0 "
        "[fault reason 0x31] SM: TTM 0 for request with PASID",
    ]


def test_pasid_request_second_level_faults_keep_legacy_codes() -> None:
    u = pasid_unit()
    res = u.translate(DEV_FN1, 0x5000, 4, True, pasid=0x45)
    assert res.reason == 0x05 and res.pasid == 0x45
    assert u.fault_log.lines() == [
        "DMAR: [DMA Write PASID 0x45] Request device [01:00.1] fault addr 0x5000 "
        "[fault reason 0x05] PTE Write access is not set"]


def test_clear_pasid_walks_back_to_dir_and_legacy() -> None:
    u = pasid_unit()
    u.set_pasid(DEV_FN1, 0x45, 1)            # re-pointing keeps one entry
    assert u.translate(DEV_FN1, 0x10, 4, False, pasid=0x45).owner == "host"
    u.clear_pasid(DEV_FN1, 0x45)
    u.clear_pasid(DEV_FN1, 0x45)             # no-op
    assert u.translate(DEV_FN1, 0x10, 4, False, pasid=0x45).reason == 0x31
    # without a PASID the context entry still translates
    assert type(u.translate(DEV_FN1, 0x10, 4, False)) is Translation
    with pytest.raises(ValueError):
        u.set_pasid(DEV_FN1, 1 << 20, 1)
    with pytest.raises(ValueError):
        u.set_pasid(DEV_FN1, 1, 99)


# ---------------------------------------------------------------------------------------------
# do_fault, counters, robustness


def test_probe_leaves_no_trace() -> None:
    u = domain_unit()
    u.set_context(OTHER, "pt")
    cases = [(DEV_FN1, 0x3000, 4, True, None), (0x0300, 0, 4, False, None),
             (DEV_FN1, 0x10, 4, True, None), (OTHER, 1 << 40, 4, False, None),
             (DEV_FN1, 0, 4, False, 3)]
    probed = [u.translate(*c, do_fault=False) for c in cases]
    assert u.fault_log.recorded == 0 and sum(u.fault_log.totals.values()) == 0
    assert u.counters() == {"translations": 0, "unclaimed": 0, "faults": {}}
    delivered = [u.translate(*c) for c in cases]
    assert probed == delivered
    assert u.fault_log.recorded == 3
    assert u.counters() == {"translations": 1, "unclaimed": 1,
                            "faults": {0x02: 1, 0x05: 1, 0x31: 1}}


def test_fault_log_overflow_still_returns_faults() -> None:
    u = unit(records=2)
    for i in range(5):
        assert u.translate(DEV, i * P, 4, False).reason == 0x02
    assert u.fault_log.recorded == 2 and u.fault_log.overflow == 3 and u.fault_log.pfo
    assert u.faults[0x02] == 5


def test_mgaw_bounds() -> None:
    for bad in (12, 65):
        with pytest.raises(ValueError):
            Iommu(FaultLog(), bad)
    assert Iommu(None).mgaw == 48 and isinstance(Iommu().fault_log, FaultLog)


WIDE = st.integers(-(1 << 70), 1 << 70)


@settings(max_examples=1500, deadline=None)
@given(rid=st.one_of(st.sampled_from([DEV, DEV_FN1, OTHER, 0x0300]), WIDE),
       addr=st.one_of(st.integers(0, 0x8000), st.integers(-(1 << 66), 1 << 66), WIDE),
       size=st.one_of(st.integers(-4, 0x3000), WIDE.filter(lambda s: s < 1 << 20)),
       write=st.booleans(), pasid=st.one_of(st.none(), st.integers(0, 0x80), WIDE),
       do_fault=st.booleans())
def test_translate_never_raises(rid: int, addr: int, size: int, write: bool, pasid,
                                do_fault: bool) -> None:
    u = pasid_unit()
    u.set_context(OTHER, "pt")
    u.set_context(0x0300, "block")
    before = u.fault_log.recorded
    res = u.translate(rid, addr, size, write, pasid, do_fault=do_fault)
    assert type(res) in (Translation, DmaFault, Unclaimed)
    if type(res) is DmaFault:
        assert res.reason in (0x02, 0x04, 0x05, 0x06, 0x0D, 0x31, 0x51, 0x59)
        assert (res.reason == 0x05) == (write and res.reason in (0x05, 0x06))
        assert u.fault_log.recorded == before + do_fault
        if do_fault:
            rec = u.fault_log.pending()[-1]
            assert rec.reason == res.reason and rec.kind == ("dma-write" if write else "dma-read")
            assert dmar_line(rec).startswith("DMAR: [DMA ")
    else:
        assert u.fault_log.recorded == before


# --- map/unmap sequences against a reference model -------------------------------------------

PAGES = 24
HOST_PAGES = 1 << 18                     # host RAM: [0, 1 GiB); g1: [4 GiB, 5 GiB)

op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, PAGES), st.integers(0, (6 * GiB) // P),
              st.integers(1, 4), st.booleans(), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, PAGES), st.integers(0, 6)),
)


def ref_translate(ref: dict[int, tuple[int, bool, bool]], addr: int, size: int, write: bool):
    """Reference semantics, written page by page from the module docstring (rules 5-8)."""
    n = max(size, 1)
    pages = range(addr // P, (addr + n - 1) // P + 1)
    for p in pages:
        hpa, r, w = ref.get(p, (0, False, False))
        if not (w if write else r):
            return ("fault", 0x05 if write else 0x06, max(addr, p * P))
    hpa0 = ref[pages[0]][0] + addr % P
    # rule 8: the bytes up to the first break in host contiguity are delivered from hpa0; the
    # first HPA that cannot be delivered is the end of hpa0's range if that run crosses it,
    # else the HPA after the break
    brk = next((p for p in pages[1:] if ref[p][0] != ref[p - 1][0] + P), None)
    run = n if brk is None else brk * P - addr
    for base, owner in ((0, "host"), (4 * GiB, "g1")):
        if base <= hpa0 < base + GiB:
            if hpa0 + run > base + GiB:
                return ("unclaimed", base + GiB)
            if brk is not None:
                return ("unclaimed", ref[brk][0])
            return ("ok", owner, hpa0 - base, hpa0)
    return ("unclaimed", hpa0)


def as_tuple(res) -> tuple:
    if type(res) is DmaFault:
        return ("fault", int(res.reason), res.fault_addr)
    if type(res) is Unclaimed:
        return ("unclaimed", res.hpa)
    return ("ok", res.owner, res.local_addr, res.hpa)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=25),
       probes=st.lists(st.tuples(st.integers(0, (PAGES + 5) * P), st.integers(0, 3 * P),
                                 st.booleans()), max_size=25))
def test_map_unmap_sequences_match_reference(ops: list, probes: list) -> None:
    u = unit()
    u.create_domain(1)
    u.set_context(DEV, ("domain", 1))
    ref: dict[int, tuple[int, bool, bool]] = {}
    for o in ops:
        if o[0] == "map":
            _, page, hpage, n, r, w = o
            if not (r or w):
                with pytest.raises(ValueError):
                    u.map(1, page * P, hpage * P, n * P, r, w)
            elif any(page + k in ref for k in range(n)):
                with pytest.raises(ValueError):
                    u.map(1, page * P, hpage * P, n * P, r, w)
            else:
                u.map(1, page * P, hpage * P, n * P, r, w)
                for k in range(n):
                    ref[page + k] = ((hpage + k) * P, r, w)
        else:
            _, page, n = o
            gone = [p for p in range(page, page + n) if p in ref]
            assert u.unmap(1, page * P, n * P) == len(gone) * P
            for p in gone:
                del ref[p]
    # the view is the reference, merged
    expanded = {}
    for m in u.domain_mappings(1):
        for k in range(m["size"] // P):
            expanded[m["iova"] // P + k] = (m["hpa"] + k * P, m["read"], m["write"])
    assert expanded == ref
    for a, b in zip(u.domain_mappings(1), u.domain_mappings(1)[1:]):
        assert not (a["iova"] + a["size"] == b["iova"] and a["hpa"] + a["size"] == b["hpa"]
                    and (a["read"], a["write"]) == (b["read"], b["write"])), "runs not maximal"
    for addr, size, write in probes:
        got = u.translate(DEV, addr, size, write)
        assert as_tuple(got) == ref_translate(ref, addr, size, write)
    for page, (hpa, r, w) in ref.items():
        assert u.pte(1, page * P) == hpa | (SL_R if r else 0) | (SL_W if w else 0)

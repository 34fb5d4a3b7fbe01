"""Case 1 end to end: a real device process raises MSI-X interrupts through a real fabric
process and its IR unit into a real host process (PF + VFs, bare metal)."""

from __future__ import annotations

import re

from tests.conftest import CASE1


async def test_pf_and_vfs_deliver_every_interrupt_in_order(start_lab):
    lab = await start_lab(CASE1)
    report = await lab.run_workload(per_function=400, inflight=16)
    rows = {r["rid"]: r for r in report["functions"]}
    assert set(rows) == {"01:00.0", "01:00.1", "01:00.2"}, rows.keys()
    for rid, r in rows.items():
        assert r["sent"] == 400, (rid, r)
        assert r["interrupts"] == 400, (rid, r)
        assert r["delivered"] == 400, (rid, r)
        assert r["lost"] == 0 and r["record_missing"] == 0, (rid, r)
        assert r["latency"]["count"] == 400
    assert report["ok"], report
    assert report["host"]["breaches"] == 0
    assert report["fabric"]["irqs_delivered"] >= 1200
    assert report["fabric"]["ir_faults_total"] == 0


async def test_boot_builds_the_bare_metal_hierarchy_and_views(start_lab):
    lab = await start_lab({**CASE1, "workload": {"per_function": 10}})
    assert "bare metal" in lab.boot_info["cpuid"]
    await lab.run_workload(per_function=50, inflight=4)
    views = await lab.call("host", "views")
    domains = views["domains"]
    # VECTOR -> INTEL-IR-0 -> IR-PCI-MSIX-<dev>, one per function
    assert re.search(r"^VECTOR\b", domains, re.M), domains
    assert re.search(r"^\s+INTEL-IR-0\b.*parent=VECTOR", domains, re.M), domains
    for fn in ("01:00.0", "01:00.1", "01:00.2"):
        assert re.search(rf"^\s+IR-PCI-MSIX-0000:{fn}\b.*parent=INTEL-IR-0", domains, re.M), domains
    proc = views["proc_interrupts"]
    lines = [l for l in proc.splitlines() if "IR-PCI-MSIX-0000:01:00.1" in l]
    assert len(lines) == 1, proc
    counts = [int(x) for x in lines[0].split(":", 1)[1].split()[:2]]
    assert sum(counts) == 50, lines[0]
    assert "0-edge" in lines[0] and "irqlab-engine:01:00.1" in lines[0]
    lspci = views["lspci"]
    assert "01:00.0 " in lspci and "Single Root I/O Virtualization (SR-IOV)" in lspci
    assert "Number of VFs: 2" in lspci and "MSI-X: Enable+ Count=8" in lspci
    assert "01:00.2 " in lspci and "(virtual function)" in lspci


async def test_irte_is_source_checked_and_points_at_the_vector(start_lab):
    lab = await start_lab(CASE1)
    irt = await lab.call("fabric", "irt")
    # one IRTE per function, each present, remapped, SVT=1 with its function's RID
    header, *entries = irt
    assert header.split()[:4] == ["Entry", "SrcID", "DstID", "Vct"], irt
    assert len(entries) == 3, irt
    assert sorted(e.split()[1] for e in entries) == ["01:00.0", "01:00.1", "01:00.2"], irt
    for e in entries:
        _idx, _sid, _dst, _vct, _hi, _lo, sq, svt, present, mode, pasid = e.split()
        assert (sq, svt, present, mode, pasid) == ("0", "1", "1", "remapped", "-"), e

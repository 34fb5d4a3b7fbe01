"""A guest's VF copying by DMA (device/engine.py DMA_GO, guest/dma.py): the reads and writes go
through the IOMMU into the guest's RAM and the data arrives; a copy from outside the VM's memory
is stopped by the IOMMU (DMA fault, UR) and reported by the engine."""

from __future__ import annotations

ONE_GUEST = {"device": [{"name": "d0", "total_vfs": 1, "vfs": 1}],
             "guest": [{"name": "g1", "assign": ["d0.vf0"]}]}


async def test_guest_dma_copy_through_the_iommu(start_lab):
    lab = await start_lab(ONE_GUEST)
    before = await lab.call("fabric", "counters")
    r = await lab.call("g1", "dma.copy", {"bytes": 5000, "copies": 12, "inflight": 3, "timeout_s": 60}, timeout=90)
    assert r["copies"] == 12 and not r["timed_out"] and r["verified"] is True and r["dma_errors"] == 0, r
    after = await lab.call("fabric", "counters")
    vf = (await lab.call("d0", "stats"))["functions"]["01:00.1"]
    # 5000 bytes: reads of <= 512 B that never cross 4 KiB, each answered by one CplD from g1
    assert vf["dma_copies"] == 12 and vf["dma_read_tlps"] == 12 * 10, vf
    assert after["dma_tlps"] - before["dma_tlps"] >= vf["dma_read_tlps"] + vf["dma_write_tlps"]
    assert after.get("dma_faults_total", 0) == before.get("dma_faults_total", 0)

    # the guest's RAM is 16 MiB at IOVA 0: a source at 1 GiB is outside its IOMMU domain
    r = await lab.call("g1", "dma.copy", {"bytes": 1024, "copies": 2, "inflight": 1, "src": 1 << 30,
                                          "timeout_s": 60}, timeout=90)
    assert r["copies"] == 2 and r["dma_errors"] == 2 and r["verified"] is None, r
    faults = await lab.call("fabric", "faults")
    assert faults["by_source"].get("01:00.1"), faults

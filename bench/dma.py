"""DMA write+read throughput through the IOMMU: a VF copying inside its guest's memory.

    python -m bench.dma             # also part of ``python -m bench``

One ``Lab``: one SR-IOV device, one guest with one VF assigned (case 2).  The
guest's ``dma.copy`` control operation (``guest/dma.py``) programs the VF's
copy descriptor (``device/engine.py``: DMA_SRC, DMA_DST, DMA_LEN, DMA_GO) with
two buffers in its own RAM, by guest-physical address, and keeps ``inflight``
copies going.  For each copy the device reads the source with MRds (<= 512 B;
32 tags per function), which the fabric translates through the IOMMU (the VF's
context -> the VM's domain -> the guest's RAM window) and hands to the guest's
process, which answers each with a CplD; the device writes each CplD's bytes to
the destination with MWrs (<= 256 B), translated the same way; then the copy's
completion record and interrupt.  The guest checks that the destination holds
the source after every run.

Figures: copy MB/s (bytes copied / s; each byte crosses the bus twice, read and
written), TLPs/s (the fabric's TLP counter over the run: per copy the guest's
DMA_GO MWr, the MRds and their CplDs, the data MWrs, the record and interrupt
MWrs; plus the guest's few CMPL_HEAD writes), and TLPs/s over the raw relay's msg/s
(one TLP = one two-hop crossing of the fabric, like one relay message).
"""

from __future__ import annotations

from typing import Callable

from bench.interrupts import median_run
from irqlab.lab import Lab
from irqlab.topology import Topology

MB = 1_000_000


def topology() -> Topology:
    return Topology.from_dict({
        "name": "dma",
        "platform": {"ir": True, "cpus": 2, "memory_mib": 64},
        "device": [{"name": "d0", "kind": "sriov", "total_vfs": 1, "vfs": 1, "pf_vectors": 8, "vf_vectors": 4}],
        "guest": [{"name": "g1", "cpus": 1, "memory_mib": 32, "cpuid": "kvm", "assign": ["d0.vf0"]}],
    }, source="bench: DMA through the IOMMU")


def _vf(stats: dict) -> dict:
    return stats["functions"]["01:00.1"]


async def _one(lab: Lab, size: int, copies: int, inflight: int, what: str) -> dict:
    d0 = _vf(await lab.call("d0", "stats"))
    f0 = await lab.call("fabric", "counters")
    r = await lab.call("g1", "dma.copy", {"bytes": size, "copies": copies, "inflight": inflight,
                                          "timeout_s": 120}, timeout=150)
    d1 = _vf(await lab.call("d0", "stats"))
    f1 = await lab.call("fabric", "counters")
    if r["timed_out"] or r["copies"] != copies or not r["verified"] or r["dma_errors"]:
        raise RuntimeError(f"{what}: the DMA run was not clean: {r['copies']}/{copies} copies, "
                           f"verified={r['verified']}, DMA errors {r['dma_errors']}, timed out={r['timed_out']}")
    reads = d1["dma_read_tlps"] - d0["dma_read_tlps"]
    writes = d1["dma_write_tlps"] - d0["dma_write_tlps"]
    tlps = f1.get("tlps", 0) - f0.get("tlps", 0)
    faults = f1.get("dma_faults_total", 0) - f0.get("dma_faults_total", 0)
    el = r["elapsed_s"]
    return {"bytes": size, "copies": copies, "inflight": r["inflight"], "elapsed_s": el,
            "mb_per_s": size * copies / el / MB, "tlps": tlps, "tlps_per_s": tlps / el,
            "mrd": reads, "mwr_data": writes, "dma_faults": faults,
            # every copy: the guest's DMA_GO MWr, MRd + its CplD, the data MWrs, the record and the
            # interrupt (the rest of ``tlps``: the guest's CMPL_HEAD writes and register accesses)
            "tlps_copies": 2 * reads + writes + 3 * copies}


async def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict:
    size = 65536
    copies, repeat, inflight = (60, 1, 4) if quick else (300, 3, 4)
    out: dict = {"topology": "1 guest, 1 VF (case 2), IOMMU domain = the VM's", "bytes": size,
                 "copies": copies, "inflight": inflight}
    async with Lab(topology(), on_progress=lambda m: progress(f"lab: {m}")) as lab:
        await _one(lab, size, 10, inflight, "DMA warm-up")
        runs = []
        for i in range(repeat):
            progress(f"dma: run {i + 1}/{repeat}: {copies} copies of {size // 1024} KiB, {inflight} in flight")
            r = await _one(lab, size, copies, inflight, "DMA run")
            runs.append(r)
            progress(f"dma: run {i + 1}/{repeat}: {r['mb_per_s']:.1f} MB/s, {r['tlps_per_s']:,.0f} TLPs/s "
                     f"({r['tlps']:,} TLPs, {r['mrd']:,} MRd, {r['mwr_data']:,} data MWr)")
        median = median_run(runs, "mb_per_s")
        out.update(runs=runs, mb_per_s=median["mb_per_s"], tlps_per_s=median["tlps_per_s"],
                   tlps_per_copy=median["tlps"] / copies)
    return out


def main() -> int:
    from fabric.loop import run as run_loop
    res: dict = {}

    async def go():
        res.update(await run())

    run_loop(go())
    print(f"DMA copy: {res['mb_per_s']:.1f} MB/s, {res['tlps_per_s']:,.0f} TLPs/s "
          f"({res['tlps_per_copy']:.0f} TLPs per {res['bytes'] // 1024} KiB copy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

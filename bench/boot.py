"""Boot time and memory per process for topologies of 1, 8, 32 and 64 VMs.

    python -m bench.boot            # 1, 8, 32, 64 VMs (also part of ``python -m bench``)
    python -m bench.boot 64         # just those sizes

Each topology is one SR-IOV device with one VF per VM (an SR-IOV device has at
most 64 VFs, ``irqlab.topology``), the host, and N guests of 1 vCPU and 16 MiB,
each with one VF assigned (case 2).  Measured:

* **boot wall time**: from ``Lab.start()`` being called to its return, which is
  when every guest has reported "ready" (CPUID probed, its PCI bus enumerated by
  trapped config reads, the engine driver bound with MSI-X).  The lab's progress
  messages give two marks inside it: the host's "ready" (enumeration, SR-IOV,
  drivers and every VM created) and the first guest started.
* **memory**: VmRSS (``/proc/PID/status``) of the fabric, the device, the host
  and every guest (median and max), read once all are ready; and Pss
  (``/proc/PID/smaps_rollup``), which splits pages shared between processes
  (the guests forked from one pre-imported parent share their code) among them.
* **CPU** used by each process until ready (utime + stime), which says where the
  boot time goes on a machine with fewer cores than processes.  With 4 VMs or more
  the guests are forked from the lab's zygote (``irqlab/zygote.py``), which did
  their imports: it is listed beside the fabric, the device and the host.

Goal (issue 7): 64 VMs boot in <= 10 s on a 2-core machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

from bench.interrupts import _cpu_s
from irqlab.lab import Lab
from irqlab.topology import Topology

SIZES = (1, 8, 32, 64)
GOAL_VMS, GOAL_S = 64, 10.0


def topology(n: int) -> Topology:
    """N guests, each with one VF of one SR-IOV device (n <= 64)."""
    return Topology.from_dict({
        "name": f"boot-{n}",
        "platform": {"ir": True, "cpus": 2, "memory_mib": 64},
        "device": [{"name": "d0", "kind": "sriov", "total_vfs": max(n, 1), "vfs": n,
                    "pf_vectors": 8, "vf_vectors": 4}],
        "guest": [{"name": f"g{i + 1}", "cpus": 1, "memory_mib": 16, "cpuid": "kvm",
                   "assign": [f"d0.vf{i}"]} for i in range(n)],
    }, source=f"bench: {n} VMs")


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None




def summarize(values: list[float]) -> dict:
    """Median, max and count of a list of per-guest figures (pure; ``None`` entries ignored)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(vals), "median": statistics.median(vals), "max": vals[-1]}


async def boot_once(n: int, progress: Callable[[str], None] = print) -> dict:
    topo = topology(n)
    marks: dict[str, float] = {}
    t0 = time.monotonic()

    def on_progress(msg: str) -> None:
        now = time.monotonic() - t0
        if msg.startswith("starting host"):
            marks.setdefault("host_started_s", now)
        elif msg.startswith("starting guest"):
            marks.setdefault("host_ready_s", now)      # guests start when the host is ready

    lab = Lab(topo, on_progress=on_progress, start_timeout=120.0)
    try:
        await lab.start()
        wall = time.monotonic() - t0
        pids = {name: c.proc.pid for name, c in lab.children.items()}
        zygote = getattr(lab, "_zygote", None)          # the guests' pre-imported parent, if any
        if zygote is not None and zygote.proc is not None:
            pids["zygote"] = zygote.proc.pid
        rss = {name: _status_kib(pid, "VmRSS") for name, pid in pids.items()}
        pss = {name: _pss_kib(pid) for name, pid in pids.items()}
        cpu = {name: _cpu_s(pid) for name, pid in pids.items()}
        guests = [g.name for g in topo.guests]
        ready = sum(1 for g in guests if g in lab.guest_info)
    finally:
        await lab.stop()
    if ready != n:
        raise RuntimeError(f"boot {n} VMs: only {ready} guests reported ready")
    others = [k for k in pids if k not in guests]
    out = {"vms": n, "wall_s": wall, **marks,
           "rss_kib": {k: rss[k] for k in others}, "pss_kib": {k: pss[k] for k in others},
           "cpu_s": {k: cpu[k] for k in others},
           "guest_rss_kib": summarize([rss[g] for g in guests]),
           "guest_pss_kib": summarize([pss[g] for g in guests]),
           "guest_cpu_s": summarize([cpu[g] for g in guests]),
           "guest_cpu_total_s": sum(cpu[g] or 0.0 for g in guests),
           "shutdown": lab.shutdown_status.value if lab.shutdown_status else None}
    g = out["guest_rss_kib"]
    progress(f"boot: {n} VMs ready in {wall:.2f} s (host ready at {marks.get('host_ready_s', wall):.2f} s); "
             f"guest RSS median {(g['median'] or 0) / 1024:.1f} MiB, max {(g['max'] or 0) / 1024:.1f} MiB; "
             f"guest CPU {out['guest_cpu_total_s']:.1f} s in all")
    return out


async def run(sizes=SIZES, progress: Callable[[str], None] = print) -> dict:
    out: dict = {"sizes": list(sizes), "goal": {"vms": GOAL_VMS, "seconds": GOAL_S}, "runs": {}}
    for n in sizes:
        progress(f"boot: starting {n} VMs")
        out["runs"][str(n)] = await boot_once(n, progress)
    big = out["runs"].get(str(GOAL_VMS))
    out["goal_met"] = None if big is None else big["wall_s"] <= GOAL_S
    return out


def main(argv: list[str] | None = None) -> int:
    from fabric.loop import run as run_loop
    argv = sys.argv[1:] if argv is None else argv
    try:
        sizes = tuple(int(a) for a in argv) or SIZES
    except ValueError:
        print(f"usage: python -m bench.boot [N ...]  (N VMs, 1..64; default {' '.join(map(str, SIZES))})")
        return 2
    if any(not 1 <= n <= 64 for n in sizes):
        print("bench.boot: an SR-IOV device has at most 64 VFs, so 1 <= N <= 64")
        return 2
    res: dict = {}

    async def go():
        res.update(await run(sizes))

    run_loop(go())
    if res.get("goal_met") is not None:
        w = res["runs"][str(GOAL_VMS)]["wall_s"]
        print(f"{GOAL_VMS} VMs in {w:.2f} s: goal (<= {GOAL_S:.0f} s) {'met' if res['goal_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

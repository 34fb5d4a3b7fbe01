"""irqlab case 1 through real processes: device -> fabric IR unit -> host, via ``Lab``.

One ``Lab`` is started once on the default topology's platform and devices
with the guests removed (case 1: one device, PF + 2 VFs, all bound in the host,
ipc://), and runs, in order:

* a short warm-up (not reported);
* saturation: closed loop, ``inflight`` doorbells outstanding per function;
  interrupts/s total = interrupts delivered / the host's elapsed time of the run;
* latency: closed loop with one doorbell outstanding per function; the host
  records device emit -> handler for every interrupt (the device stamps
  ``time.monotonic_ns()`` into the frame out of band); the per-function hdrh
  histograms are merged for p50/p99/p99.9.

Each interrupt costs three fabric crossings: the doorbell MWr host -> device,
then the completion-record DMA MWr and the interrupt MWr device -> host (the
fabric's TLP counter is read around each saturation run to check it).

``run_injection`` and ``run_posted`` measure the two ways a guest gets its VF's
interrupts, on the default topology's two guests (the host's PF idle): the
injection path (IR unit -> host vector -> INJECT -> guest, 4 crossings) and the
posted path (IR unit -> the vCPU's posted-interrupt descriptor -> POSTED
notification to the guest, 3 crossings, the host not involved).  Each checks
that the path it measures is the one taken (the host's injection counter).

Each also measures *interrupt delivery* alone (``delivery``): the engine's
interrupt generator (IRQ_BURST, ``device.engine``; every topology here builds its
devices with it, ``irq_generator``) raises each completion's
interrupt ``DELIVERY_BURST`` times, so one doorbell and one record go with 32
interrupt messages, and the figure is what the IR unit and the path after it
deliver: one fabric crossing per interrupt, like one relayed message of the
raw relay.  Every interrupt is a separate MWr the IR unit remaps; the run checks
that each function's device sent ``per_function * DELIVERY_BURST`` and its OS
received as many.
Just these two, briefly::

    python -m bench.interrupts --posted --injection [--quick] [--burst N] [--json]
"""

from __future__ import annotations

import os
from typing import Callable

from bench.relay import merged_latency
from irqlab.lab import Lab
from irqlab.topology import BURST_MAX, Topology, load

FABRIC_FRAMES_PER_INTERRUPT = 3

#: interrupt delivery runs: interrupts per work item (the engine's IRQ_BURST), work items in
#: flight per function, and interrupts per function per run (a multiple of the per_function
#: the caller gives for the work-item runs: the delivery runs are faster)
DELIVERY_BURST = 32
DELIVERY_INFLIGHT = 16
DELIVERY_SCALE = 5


def _cpu_s(pid: int) -> float | None:
    """utime + stime of a process so far (Linux /proc), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu(lab: Lab) -> dict[str, float | None]:
    return {name: _cpu_s(c.proc.pid) for name, c in lab.children.items()}


def cpu_per(cpu0: dict, cpu1: dict, n: int) -> dict[str, float]:
    """CPU µs per item (``n`` of them) of each process between two ``_cpu`` readings."""
    return {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in cpu1 if cpu0.get(k) is not None and cpu1[k] is not None}


def median_run(runs: list[dict], key: str = "rate_per_s") -> dict:
    """The run whose ``key`` is the median (the upper one of an even count)."""
    values = sorted(r[key] for r in runs)
    return next(r for r in runs if r[key] == values[len(values) // 2])


def _delivered(report: dict, what: str) -> int:
    """Interrupts of one clean run: each function's device sent exactly its target and the OS
    completed every work item, in order.  (Uses the devices' per-run ``sent`` rather than the
    OS's ``interrupts`` count, which some versions of the report keep since boot.)"""
    rows = report["functions"]
    short = [r["function"] for r in rows
             if r["sent"] != r["target"] * r.get("burst", 1) or r["interrupts"] != r["sent"]
             or r["delivered"] != r["target"] or r["record_missing"] or r.get("breaches")]
    if report["timed_out"] or short or not rows or report.get("host", {}).get("breaches"):
        raise RuntimeError(f"{what}: the lab run was not clean (timed_out={report['timed_out']}, "
                           f"sent {report['total_sent']:,}; functions short or out of order: {short})")
    return sum(r["sent"] for r in rows)


async def run_injection(per_function: int = 20_000, inflight: int = 32, latency_per_function: int = 10_000,
                        warmup_per_function: int = 1_000, progress: Callable[[str], None] = print,
                        repeat: int = 1, delivery_burst: int = DELIVERY_BURST) -> dict:
    """Case 2 (the injection path): device -> fabric IR unit -> host vector -> INJECT -> guest.

    The default topology as shipped: g1 and g2 each own one VF; only the guests run the
    workload (the host's PF stays idle), so every interrupt measured is remapped to a host
    vector whose handler injects it into a guest: 4 fabric crossings per interrupt.
    """
    return await _run_guests(injection_topology(), "injection", per_function, inflight, latency_per_function,
                             warmup_per_function, progress, repeat, delivery_burst)


async def _delivery(lab: Lab, per_function: int, repeat: int, what: str, progress: Callable[[str], None],
                    oses: list[str] | None = None, check: Callable[[dict], None] | None = None,
                    burst: int = DELIVERY_BURST) -> dict:
    """Interrupt delivery at saturation: ``repeat`` runs of ``per_function`` interrupts per function,
    ``burst`` per work item, ``DELIVERY_INFLIGHT`` work items in flight; the median run's
    figures and every run's."""
    items = max(1, per_function // burst)
    runs = []
    for i in range(repeat):
        progress(f"lab: {what} delivery {i + 1}/{repeat}: {items * burst:,} interrupts per function, "
                 f"{burst} per work item, {DELIVERY_INFLIGHT} work items in flight")
        cpu0 = _cpu(lab)
        rep = await lab.run_workload(per_function=items, inflight=DELIVERY_INFLIGHT, oses=oses,
                                     burst=burst)
        cpu1 = _cpu(lab)
        n = _delivered(rep, f"{what} delivery")
        if check is not None:
            check(rep)
        handled = sum(r.get("handled", 0) for r in rep["functions"])
        runs.append({"interrupts": n, "elapsed_s": rep["elapsed_s"], "rate_per_s": n / rep["elapsed_s"],
                     "handler_runs_per_interrupt": handled / n, "cpu_us_per_interrupt": cpu_per(cpu0, cpu1, n)})
        progress(f"lab: {what} delivery {i + 1}/{repeat}: {runs[-1]['rate_per_s']:,.0f} interrupts/s")
    median = median_run(runs)
    return {"burst": burst, "inflight": DELIVERY_INFLIGHT, "per_function": items * burst,
            "runs": runs, "rate_per_s": median["rate_per_s"], "cpu_us_per_interrupt": median["cpu_us_per_interrupt"],
            "handler_runs_per_interrupt": median["handler_runs_per_interrupt"]}


def _default_with_generator() -> dict:
    """The default topology, its devices built with the interrupt generator (the delivery runs)."""
    d = load(None).to_dict()
    for dev in d["device"]:
        dev["irq_generator"] = True
    return d


def injection_topology() -> Topology:
    """The default topology (both guests' VFs injected by the host), with the generator."""
    return Topology.from_dict(_default_with_generator(), source="bench: default topology")


def posted_topology() -> Topology:
    """The default topology on a platform with posted interrupts: both guests' VFs post."""
    d = _default_with_generator()
    d["platform"]["posted"] = True
    return Topology.from_dict(d, source="bench: default topology, posted interrupts")


async def run_posted(per_function: int = 20_000, inflight: int = 32, latency_per_function: int = 10_000,
                     warmup_per_function: int = 1_000, progress: Callable[[str], None] = print,
                     repeat: int = 1, delivery_burst: int = DELIVERY_BURST) -> dict:
    """The posted path: device -> fabric IR unit -> the vCPU's posted-interrupt descriptor ->
    POSTED notification -> guest.  Same topology, workload and figures as ``run_injection``
    (saturation interrupts/s; one-way latency device emit -> guest handler at inflight 1),
    on a platform with posted interrupts: 3 fabric crossings per interrupt, no host hop."""
    return await _run_guests(posted_topology(), "posted", per_function, inflight, latency_per_function,
                             warmup_per_function, progress, repeat, delivery_burst)


def _check_path(rep: dict, guests: list[str], delivery: str, what: str) -> None:
    """The run went the way it claims: injected by the host, or posted with the host idle."""
    vms = rep["vms"]
    wrong = [g for g in guests if vms[g]["delivery"] != delivery]
    if wrong:
        raise RuntimeError(f"{what}: {wrong} do not use {delivery} delivery")
    posted = rep["fabric"].get("irq:posted", 0)
    injected = sum(vms[g]["injected"] for g in guests)
    if delivery == "posted" and (injected or not posted):
        raise RuntimeError(f"{what}: the host injected {injected} interrupts, the IR unit posted {posted}")
    if delivery == "injection" and (posted or not injected):
        raise RuntimeError(f"{what}: the host injected {injected} interrupts, the IR unit posted {posted}")


async def _run_guests(topo: Topology, delivery: str, per_function: int, inflight: int,
                      latency_per_function: int, warmup_per_function: int,
                      progress: Callable[[str], None], repeat: int = 1,
                      delivery_burst: int = DELIVERY_BURST) -> dict:
    guests = [g.name for g in topo.guests]
    out: dict = {"topology": topo.name, "guests": guests, "delivery": delivery}
    async with Lab(topo, on_progress=lambda m: progress(f"lab: {m}")) as lab:
        rep = await lab.run_workload(per_function=warmup_per_function, inflight=inflight, oses=guests)
        _delivered(rep, f"{delivery} warm-up")
        _check_path(rep, guests, delivery, f"{delivery} warm-up")
        progress(f"lab: {delivery} saturation: {per_function:,} interrupts on each of {len(guests)} guests")
        cpu0 = _cpu(lab)
        rep = await lab.run_workload(per_function=per_function, inflight=inflight, oses=guests)
        cpu1 = _cpu(lab)
        n = _delivered(rep, f"{delivery} saturation")
        cpu = cpu_per(cpu0, cpu1, n)
        out["saturation"] = {"per_function": per_function, "inflight": inflight,
                             "rate_per_s": n / rep["elapsed_s"], "interrupts": n, "cpu_us_per_interrupt": cpu}
        progress(f"lab: {delivery} saturation: {out['saturation']['rate_per_s']:,.0f} interrupts/s")
        out["delivery"] = await _delivery(lab, per_function * DELIVERY_SCALE, repeat, delivery, progress, guests,
                                          lambda r: _check_path(r, guests, delivery, f"{delivery} delivery"),
                                          delivery_burst)
        rep = await lab.run_workload(per_function=latency_per_function, inflight=1, oses=guests)
        n = _delivered(rep, f"{delivery} latency")
        _check_path(rep, guests, delivery, f"{delivery} latency")
        out["latency"] = {"per_function": latency_per_function, "inflight": 1,
                          "rate_per_s": n / rep["elapsed_s"], "latency": merged_latency(rep)}
        progress(f"lab: {delivery} latency: p50 {out['latency']['latency']['p50_us']:.0f} µs")
    return out


def case1_topology():
    """The default topology's machine and devices with no guests: every function is the host's."""
    d = _default_with_generator()
    for key in ("guest", "guests"):
        d.pop(key, None)
    return Topology.from_dict(d, source="bench: default topology without guests")


async def run(per_function: int = 20_000, inflight: int = 32, repeat: int = 3,
              latency_per_function: int = 10_000, warmup_per_function: int = 1_000,
              progress: Callable[[str], None] = print, delivery_burst: int = DELIVERY_BURST) -> dict:
    topo = case1_topology()
    functions = sum(1 + d.vfs for d in topo.devices)
    out: dict = {"topology": topo.name, "transport": topo.transport, "functions": functions}
    async with Lab(topo, on_progress=lambda m: progress(f"lab: {m}")) as lab:
        progress(f"lab: warm-up, {warmup_per_function:,} interrupts per function")
        rep = await lab.run_workload(per_function=warmup_per_function, inflight=inflight)
        _delivered(rep, "warm-up")
        tlps = rep["fabric"].get("tlps", 0)

        runs = []
        for i in range(repeat):
            progress(f"lab: saturation {i + 1}/{repeat}: {per_function:,} interrupts on each of "
                     f"{functions} functions, inflight {inflight}")
            cpu0 = _cpu(lab)
            rep = await lab.run_workload(per_function=per_function, inflight=inflight)
            cpu1 = _cpu(lab)
            n = _delivered(rep, "saturation")
            rate = n / rep["elapsed_s"]
            tlps, frames = rep["fabric"].get("tlps", 0), (rep["fabric"].get("tlps", 0) - tlps) / n
            cpu = cpu_per(cpu0, cpu1, n)
            runs.append({"interrupts": n, "elapsed_s": rep["elapsed_s"], "rate_per_s": rate,
                         "per_function_rate_per_s": [r["rate_per_s"] for r in rep["functions"]],
                         "cpu_us_per_interrupt": cpu, "fabric_tlps_per_interrupt": frames})
            progress(f"lab: saturation {i + 1}/{repeat}: {rate:,.0f} interrupts/s")
        median = median_run(runs)
        out["saturation"] = {"per_function": per_function, "inflight": inflight, "runs": runs,
                             "rate_per_s": median["rate_per_s"],
                             "cpu_us_per_interrupt": median["cpu_us_per_interrupt"],
                             "fabric_tlps_per_interrupt": median["fabric_tlps_per_interrupt"]}

        out["delivery"] = await _delivery(lab, per_function * DELIVERY_SCALE, repeat, "case 1", progress,
                                          burst=delivery_burst)

        progress(f"lab: latency: {latency_per_function:,} interrupts on each of {functions} functions, inflight 1")
        rep = await lab.run_workload(per_function=latency_per_function, inflight=1)
        n = _delivered(rep, "latency")
        out["latency"] = {"per_function": latency_per_function, "inflight": 1,
                          "rate_per_s": n / rep["elapsed_s"],
                          "latency": merged_latency(rep),
                          "functions": {r["function"]: r["latency"] for r in rep["functions"]}}
        progress(f"lab: latency: p50 {out['latency']['latency']['p50_us']:.0f} µs "
                 f"at {out['latency']['rate_per_s']:,.0f} interrupts/s")
    out["shutdown"] = lab.shutdown_status.value if lab.shutdown_status else None
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.interrupts --posted [--injection] [--quick]``: just the guest paths."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m bench.interrupts",
                                 description="interrupts/s and one-way latency into guests: posted and/or "
                                             "injection (the full suite is python -m bench)")
    ap.add_argument("--posted", action="store_true", help="the posted path (IR unit -> vCPU descriptor)")
    ap.add_argument("--injection", action="store_true", help="the injection path (IR unit -> host -> guest)")
    ap.add_argument("--quick", action="store_true", help="small counts (a few seconds each)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--burst", type=int, default=DELIVERY_BURST, metavar="N",
                    help=f"interrupts per work item in the delivery runs, 1..{BURST_MAX} (default {DELIVERY_BURST})")
    args = ap.parse_args(argv)
    if not 1 <= args.burst <= BURST_MAX:
        ap.error(f"--burst must be 1..{BURST_MAX}")
    paths = [p for p in ("posted", "injection") if getattr(args, p)] or ["posted"]
    counts = (dict(per_function=4_000, latency_per_function=1_000, warmup_per_function=200) if args.quick
              else dict(per_function=20_000, latency_per_function=10_000, warmup_per_function=1_000))
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    results: dict = {}

    async def go() -> None:
        for p in paths:
            fn = run_posted if p == "posted" else run_injection
            results[p] = await fn(inflight=32, progress=log, delivery_burst=args.burst, **counts)

    from fabric.loop import run as run_loop
    try:
        run_loop(go())
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"bench.interrupts: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for p, r in results.items():
        lat = r["latency"]["latency"]
        print(f"{p:>9}: {r['saturation']['rate_per_s']:>9,.0f} interrupts/s at saturation (inflight 32); "
              f"one-way latency p50 {lat['p50_us']:.0f} µs, p99 {lat['p99_us']:.0f} µs, "
              f"p99.9 {lat['p999_us']:.0f} µs ({lat['count']:,} samples)")
        d = r["delivery"]
        print(f"{'':>9}  delivery, {d['burst']} interrupts per work item: {d['rate_per_s']:>9,.0f} interrupts/s, "
              f"{d['handler_runs_per_interrupt']:.2f} handler runs and "
              f"{sum(d['cpu_us_per_interrupt'].values()):.1f} µs of CPU per interrupt")
    if len(results) == 2:
        for what in ("saturation", "delivery"):
            ratio = results["posted"][what]["rate_per_s"] / results["injection"][what]["rate_per_s"]
            print(f"posted / injection interrupts/s, {'one per work item' if what == 'saturation' else 'delivery'}: "
                  f"{ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""irqlab benchmark: the raw two-hop relay and the lab's interrupt path, in one run.

    python -m bench                 # full run (about a minute on 2 cores)
    python -m bench --quick         # smoke run (well under 30 s)
    python -m bench --json out.json # also write the results there (default bench/results/latest.json)

Run from the repository root.  See docs/performance.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import sys
import time

if __package__ in (None, ""):          # python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(REPO_ROOT, "bench", "results", "latest.json")

FULL = {"relay_n": 500_000, "relay_repeat": 3, "relay_rate": 2000.0, "relay_seconds": 5.0,
        "lab_per_function": 20_000, "lab_inflight": 32, "lab_repeat": 3,
        "lab_latency_per_function": 10_000, "lab_warmup_per_function": 1_000}
QUICK = {"relay_n": 100_000, "relay_repeat": 1, "relay_rate": 2000.0, "relay_seconds": 1.5,
         "lab_per_function": 4_000, "lab_inflight": 32, "lab_repeat": 1,
         "lab_latency_per_function": 1_000, "lab_warmup_per_function": 200}


def _machine() -> dict:
    import msgpack
    import uvloop
    import zmq
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "uvloop": uvloop.__version__, "msgpack": ".".join(map(str, msgpack.version))}


def run_relay(p: dict, log) -> dict:
    from bench import relay
    runs = []
    for i in range(p["relay_repeat"]):
        log(f"relay: throughput {i + 1}/{p['relay_repeat']}: {p['relay_n']:,} frames of "
            f"{relay.frame_size()} bytes, sender -> relay -> receiver")
        r = relay.throughput(p["relay_n"])
        if r["timed_out"]:
            raise RuntimeError(f"relay throughput run timed out ({r['received']:,} of {p['relay_n']:,} received)")
        runs.append(r)
        log(f"relay: throughput {i + 1}/{p['relay_repeat']}: {r['rate_per_s']:,.0f} msg/s")
    rates = sorted(r["rate_per_s"] for r in runs)
    median = next(r for r in runs if r["rate_per_s"] == rates[len(rates) // 2])
    log(f"relay: latency at {p['relay_rate']:,.0f} msg/s for {p['relay_seconds']} s")
    lat = relay.latency(p["relay_rate"], p["relay_seconds"])
    lat.pop("hist", None)
    log(f"relay: latency p50 {lat['latency']['p50_us']:.0f} µs")
    return {"frame_bytes": relay.frame_size(),
            "throughput": {"n": p["relay_n"], "runs": runs, "rate_per_s": median["rate_per_s"],
                           "cpu_us_per_msg": median["cpu_us_per_msg"]},
            "latency": lat}


async def _run_lab(p: dict, log) -> dict:
    from bench import interrupts
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)   # so that the Lab's stop() runs
    out = await interrupts.run(per_function=p["lab_per_function"], inflight=p["lab_inflight"],
                               repeat=p["lab_repeat"], latency_per_function=p["lab_latency_per_function"],
                               warmup_per_function=p["lab_warmup_per_function"], progress=log)
    out["injection"] = await interrupts.run_injection(
        per_function=p["lab_per_function"], inflight=p["lab_inflight"],
        latency_per_function=p["lab_latency_per_function"],
        warmup_per_function=p["lab_warmup_per_function"], progress=log)
    return out


def run_lab(p: dict, log) -> dict:
    from fabric.loop import run
    out: dict = {}

    async def go():
        out.update(await _run_lab(p, log))

    run(go())
    return out


def ratios(relay: dict, lab: dict) -> dict:
    from bench.interrupts import FABRIC_FRAMES_PER_INTERRUPT
    rr, lr = relay["latency"]["latency"], lab["latency"]["latency"]
    sat = lab["saturation"]["rate_per_s"] / relay["throughput"]["rate_per_s"]
    out = {"interrupts_per_relay_msg": sat, "fabric_frames_per_relay_msg": sat * FABRIC_FRAMES_PER_INTERRUPT}
    for k in ("p50_us", "p99_us", "p999_us"):
        out[f"latency_{k[:-3]}"] = lr[k] / rr[k] if rr[k] else None
    fabric_cpu = lab["saturation"]["cpu_us_per_interrupt"].get("fabric")
    relay_cpu = relay["throughput"]["cpu_us_per_msg"]["relay"]
    out["fabric_cpu_per_frame_vs_relay"] = (fabric_cpu / FABRIC_FRAMES_PER_INTERRUPT / relay_cpu
                                            if fabric_cpu and relay_cpu else None)
    return out


def render(res: dict, console) -> None:
    from rich.table import Table

    from bench.interrupts import FABRIC_FRAMES_PER_INTERRUPT
    relay, lab, q = res["relay"], res["lab"], res["ratios"]
    rt, lt = relay["throughput"]["rate_per_s"], lab["saturation"]["rate_per_s"]
    rl, ll = relay["latency"]["latency"], lab["latency"]["latency"]
    t = Table(title=f"irqlab bench — {res['date']} — {res['machine']['cpus']} CPUs, {lab['transport']}://",
              title_justify="left")
    for col, just in (("figure", "left"), ("raw relay", "right"), ("irqlab", "right"), ("ratio", "right")):
        t.add_column(col, justify=just)
    t.add_row("saturation: msg/s | interrupts/s", f"{rt:,.0f}", f"{lt:,.0f}",
              f"{q['interrupts_per_relay_msg']:.3f}")
    t.add_row(f"  fabric frames/s (×{lab['saturation']['fabric_tlps_per_interrupt']:.2f})", f"{rt:,.0f}",
              f"{lt * FABRIC_FRAMES_PER_INTERRUPT:,.0f}",
              f"{q['fabric_frames_per_relay_msg']:.3f}")
    for k, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        r = q[f"latency_{name.replace('.', '')}"]
        t.add_row(f"one-way latency {name} µs", f"{rl[k]:,.0f}", f"{ll[k]:,.0f}", "-" if r is None else f"{r:.2f}")
    rc, lc = relay["throughput"]["cpu_us_per_msg"], lab["saturation"]["cpu_us_per_interrupt"]
    r = q["fabric_cpu_per_frame_vs_relay"]
    fabric = "-" if lc.get("fabric") is None else f"{lc['fabric'] / FABRIC_FRAMES_PER_INTERRUPT:.2f}"
    t.add_row("relay|fabric CPU µs per frame", f"{rc['relay']:.2f}", fabric, "-" if r is None else f"{r:.2f}")
    t.add_row("  rate in the latency run (/s)", f"{relay['latency']['rate_per_s']:,.0f}",
              f"{lab['latency']['rate_per_s']:,.0f}", "")
    inj = lab.get("injection")
    if inj:
        it, il = inj["saturation"]["rate_per_s"], inj["latency"]["latency"]
        t.add_row("injection path (-> host -> guest): interrupts/s", f"{rt:,.0f}", f"{it:,.0f}", f"{it / rt:.3f}")
        for k, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            t.add_row(f"  injection one-way latency {name} µs", f"{rl[k]:,.0f}", f"{il[k]:,.0f}",
                      f"{il[k] / rl[k]:.2f}" if rl[k] else "-")
    t.add_row("  samples", f"{rl['count']:,}", f"{ll['count']:,}", "")
    console.print(t)
    console.print("CPU µs per message, relay run: " + ", ".join(f"{k} {v:.2f}" for k, v in rc.items())
                  + ";  CPU µs per interrupt, lab: " + ", ".join(f"{k} {v:.1f}" for k, v in lc.items()))
    console.print("ratio = irqlab ÷ raw relay, same machine, same run. One interrupt = 3 fabric "
                  "crossings (doorbell, DMA MWr, interrupt MWr): see docs/performance.md.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts: a smoke run in well under 30 s")
    ap.add_argument("--json", metavar="PATH", default=DEFAULT_JSON,
                    help=f"write the results as JSON here (default: {os.path.relpath(DEFAULT_JSON)})")
    args = ap.parse_args(argv)

    from rich.console import Console
    console = Console()
    log = console.log
    p = QUICK if args.quick else FULL
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"[yellow]the machine is busy (load average {load:.2f}): the figures will be noisy[/]")
    res = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "mode": "quick" if args.quick else "full", "params": p, "machine": _machine()}
    try:
        res["relay"] = run_relay(p, log)
        res["lab"] = run_lab(p, log)
    except (RuntimeError, asyncio.CancelledError, KeyboardInterrupt) as exc:
        console.print(f"[bold red]bench failed[/]: {type(exc).__name__}: {exc}")
        return 1
    res["ratios"] = ratios(res["relay"], res["lab"])
    res["wall_s"] = time.monotonic() - t0
    res["machine"]["loadavg_1min"] = {"start": load, "end": os.getloadavg()[0]}
    render(res, console)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    console.log(f"wrote {args.json} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

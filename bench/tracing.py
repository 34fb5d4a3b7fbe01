"""The cost of tracing (``launch.py --trace``): the same topology, the same run, off and on.

    python -m bench.tracing            # about a minute on 2 cores
    python -m bench.tracing --quick    # a smoke run (~20 s)

One ``Lab`` on the built-in default topology (the host's PF, g1's and g2's VFs: every hop
an interrupt can take -- device, fabric IR unit, host handler, VMM injection, guest) runs,
after a warm-up, rounds that alternate tracing off and on (so that drift in a shared
machine's load falls on both alike), each round:

* saturation: ``inflight`` doorbells outstanding per function; interrupts/s;
* latency: one doorbell outstanding per function; one-way latency (device emit -> handler,
  merged hdrh histograms of every function) p50/p99.

With tracing on, every process is asked ``trace.start`` before the run and the launcher
collects every process's events after it (``Lab.trace_collect``: the chunked ``trace.dump``
over the control interface), then exports them (``fabric.trace.to_chrome`` and the JSON
text, in memory).  The figures are the median over rounds; ``overhead`` is on / off.

``run(quick)`` returns the figures as a dict (``bench/run.py`` may call it);
``python -m bench.tracing`` prints them as a table.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import time
from typing import Callable

if __package__ in (None, ""):          # python bench/tracing.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.interrupts import _cpu, _delivered, cpu_per  # noqa: E402
from bench.relay import merged_latency  # noqa: E402

FULL = {"per_function": 10_000, "inflight": 32, "latency_per_function": 2_000, "warmup_per_function": 500,
        "rounds": 3}
QUICK = {"per_function": 2_000, "inflight": 32, "latency_per_function": 400, "warmup_per_function": 200,
         "rounds": 1}


async def _round(lab, p: dict, traced: bool, log: Callable[[str], None]) -> dict:
    from fabric.trace import to_chrome
    out: dict = {"traced": traced}
    label = "on " if traced else "off"
    for kind, per, inflight in (("saturation", p["per_function"], p["inflight"]),
                                ("latency", p["latency_per_function"], 1)):
        if traced:
            await lab.trace_start()
        cpu0 = _cpu(lab)
        rep = await lab.run_workload(per_function=per, inflight=inflight)
        cpu1 = _cpu(lab)
        n = _delivered(rep, f"tracing {label} {kind}")
        fig = {"interrupts": n, "rate_per_s": n / rep["elapsed_s"],
               "cpu_us_per_interrupt": cpu_per(cpu0, cpu1, n)}
        if kind == "latency":
            fig["latency"] = merged_latency(rep)
        if traced:
            col = await lab.trace_collect()
            t0 = time.monotonic()
            doc = to_chrome(col["dumps"])
            text = json.dumps(doc, separators=(",", ":"))
            events = sum(len(d["events"]) for d in col["dumps"])
            fig["trace"] = {"events": events, "events_per_interrupt": events / n,
                            "dropped": sum(d["dropped"] for d in col["dumps"]), "flows": doc["otherData"]["flows"],
                            "collect_s": col["seconds"], "chunks": col["chunks"], "wire_bytes": col["bytes"],
                            "export_s": time.monotonic() - t0, "json_bytes": len(text)}
            del doc, text, col
            if fig["trace"]["flows"] != n:
                raise RuntimeError(f"tracing on {kind}: {fig['trace']['flows']} flows for {n} interrupts")
        out[kind] = fig
        log(f"tracing {label}: {kind}: {fig['rate_per_s']:,.0f} interrupts/s"
            + (f", p50 {fig['latency']['p50_us']:.0f} µs p99 {fig['latency']['p99_us']:.0f} µs"
               if kind == "latency" else "")
            + (f"; {fig['trace']['events']:,} events collected in {fig['trace']['collect_s']:.2f} s"
               if traced else ""))
    return out


def recorder_cost(n: int = 200_000) -> dict:
    """In-process cost of one recording site, ns per event: disabled (the attribute test),
    the hot-path form (``Tracer.rec``), the keyword form (``Tracer.instant``); best of 3."""
    from fabric.trace import Tracer
    keys = ("src", "rid", "key")

    def off() -> float:
        tr = Tracer("bench")
        t = time.perf_counter_ns()
        for i in range(n):
            if tr.on:
                tr.rec("i", "MWr32", "tlp", None, keys, "d0", 0x100, i)
        return (time.perf_counter_ns() - t) / n

    def rec() -> float:
        tr = Tracer("bench", on=True, limit=n)
        t = time.perf_counter_ns()
        for i in range(n):
            if tr.on:
                tr.rec("i", "MWr32", "tlp", None, keys, "d0", 0x100, i)
        return (time.perf_counter_ns() - t) / n

    def kwargs() -> float:
        tr = Tracer("bench", on=True, limit=n)
        t = time.perf_counter_ns()
        for i in range(n):
            if tr.on:
                tr.instant("MWr32", "tlp", src="d0", rid=0x100, key=i)
        return (time.perf_counter_ns() - t) / n

    return {"off_ns": min(off() for _ in range(3)), "rec_ns": min(rec() for _ in range(3)),
            "kwargs_ns": min(kwargs() for _ in range(3))}


def _median(rounds: list[dict], *path: str) -> float:
    vals = []
    for r in rounds:
        v = r
        for k in path:
            v = v[k]
        vals.append(v)
    return statistics.median(vals)


async def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict:
    """Interrupts/s and one-way latency p50/p99 with tracing off and on, the events recorded
    and the time to collect and export them; see the module docstring."""
    from irqlab.lab import Lab
    from irqlab.topology import load
    p = QUICK if quick else FULL
    topo = load(None)
    functions = sum(1 + d.vfs for d in topo.devices)
    out: dict = {"topology": topo.name, "functions": functions, "mode": "quick" if quick else "full", "params": p}
    rounds: dict[bool, list[dict]] = {False: [], True: []}
    async with Lab(topo, on_progress=lambda m: progress(f"lab: {m}")) as lab:
        progress(f"warm-up: {p['warmup_per_function']:,} interrupts per function")
        _delivered(await lab.run_workload(per_function=p["warmup_per_function"], inflight=p["inflight"]), "warm-up")
        for i in range(p["rounds"]):
            for traced in ((False, True) if i % 2 == 0 else (True, False)):
                progress(f"round {i + 1}/{p['rounds']}, tracing {'on' if traced else 'off'}")
                rounds[traced].append(await _round(lab, p, traced, progress))
    for traced, key in ((False, "off"), (True, "on")):
        rs = rounds[traced]
        out[key] = {"rate_per_s": _median(rs, "saturation", "rate_per_s"),
                    "latency_p50_us": _median(rs, "latency", "latency", "p50_us"),
                    "latency_p99_us": _median(rs, "latency", "latency", "p99_us"),
                    "latency_rate_per_s": _median(rs, "latency", "rate_per_s"),
                    "cpu_us_per_interrupt": {k: statistics.median(r["saturation"]["cpu_us_per_interrupt"][k]
                                                                  for r in rs)
                                             for k in rs[0]["saturation"]["cpu_us_per_interrupt"]}}
    on = rounds[True]
    out["trace"] = {k: _median(on, "saturation", "trace", k) for k in
                    ("events", "events_per_interrupt", "dropped", "collect_s", "chunks", "wire_bytes",
                     "export_s", "json_bytes")}
    out["trace"]["interrupts"] = _median(on, "saturation", "interrupts")
    off_, on_ = out["off"], out["on"]
    out["overhead"] = {"rate": on_["rate_per_s"] / off_["rate_per_s"],
                       "latency_p50": on_["latency_p50_us"] / off_["latency_p50_us"],
                       "latency_p99": on_["latency_p99_us"] / off_["latency_p99_us"]}
    out["rounds"] = {"off": rounds[False], "on": rounds[True]}
    out["recorder"] = recorder_cost()
    out["loadavg_1min"] = os.getloadavg()[0]
    return out


def render(res: dict) -> str:
    off, on, ov, tr = res["off"], res["on"], res["overhead"], res["trace"]
    rows = [("figure", "tracing off", "tracing on", "on / off"),
            ("saturation, interrupts/s", f"{off['rate_per_s']:,.0f}", f"{on['rate_per_s']:,.0f}", f"{ov['rate']:.2f}"),
            ("one-way latency p50, µs", f"{off['latency_p50_us']:,.0f}", f"{on['latency_p50_us']:,.0f}",
             f"{ov['latency_p50']:.2f}"),
            ("one-way latency p99, µs", f"{off['latency_p99_us']:,.0f}", f"{on['latency_p99_us']:,.0f}",
             f"{ov['latency_p99']:.2f}")]
    for name in off["cpu_us_per_interrupt"]:
        a, b = off["cpu_us_per_interrupt"][name], on["cpu_us_per_interrupt"].get(name)
        if b is not None:
            rows.append((f"CPU µs per interrupt, {name}", f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}" if a else "-"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"irqlab tracing cost -- topology {res['topology']!r} ({res['functions']} functions), "
             f"{res['mode']} mode, median of {res['params']['rounds']} round(s), load average "
             f"{res['loadavg_1min']:.2f}"]
    for n, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(w[0])] + [c.rjust(w[i]) for i, c in enumerate(r) if i]))
        if n == 0:
            lines.append("  ".join("-" * x for x in w))
    rc = res["recorder"]
    lines.append(f"one recording site, in process: {rc['off_ns']:.0f} ns disabled (the test), {rc['rec_ns']:.0f} ns "
                 f"enabled (Tracer.rec; {rc['kwargs_ns']:.0f} ns with keyword arguments)")
    lines.append(f"trace of one saturation run ({tr['interrupts']:,.0f} interrupts): {tr['events']:,.0f} events "
                 f"({tr['events_per_interrupt']:.1f} per interrupt, {tr['dropped']:,.0f} dropped); collected over "
                 f"the control interface in {tr['collect_s']:.2f} s ({tr['chunks']:,.0f} chunks, "
                 f"{tr['wire_bytes'] / 1e6:.1f} MB msgpack); exported in {tr['export_s']:.2f} s "
                 f"({tr['json_bytes'] / 1e6:.1f} MB JSON)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, one round (a smoke run)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    from fabric.loop import run as run_loop
    res: dict = {}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    async def go():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)     # so that the Lab's stop() runs
        res.update(await run(args.quick, log))

    try:
        run_loop(go())
    except (RuntimeError, asyncio.CancelledError, KeyboardInterrupt) as exc:   # LabError too
        print(f"bench.tracing: failed: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

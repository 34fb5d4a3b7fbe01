"""Fairness under a storm: does one VM flooding interrupts hurt the others' latency?

    python -m bench.fairness              # quiet run, then the same run with g1 storming
    python -m bench.fairness --rate 500 --seconds 6

The default topology (host on the PF, g1 and g2 one VF each).  g2 and the host run a paced
workload (``--rate`` interrupts/s per function, one outstanding) and record one-way latency
device -> handler.  First quietly, then while g1 rings its doorbell as fast as it can
(``guest.hostile.storm``).  Prints p50/p99/p99.9 of both runs and the ratio; the goal is
p99(storm) <= 2 x p99(quiet).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.relay import merged_latency  # noqa: E402
from irqlab.lab import Lab  # noqa: E402
from irqlab.topology import load  # noqa: E402


async def run(rate: float, seconds: float, log) -> dict:
    per_function = int(rate * seconds)
    out: dict = {"rate_per_function": rate, "seconds": seconds}
    async with Lab(load(None), on_progress=lambda m: log(f"lab: {m}")) as lab:
        await lab.run_workload(per_function=200, inflight=1, oses=["host", "g2"])   # warm-up
        log(f"quiet: host and g2 at {rate:,.0f} interrupts/s each for {seconds} s")
        quiet = await lab.run_workload(per_function=per_function, inflight=1, rate=rate, oses=["host", "g2"])
        log("storm: the same, while g1 rings its doorbell as fast as it can")
        storm_call = lab.call("g1", "hostile", {"action": "storm", "seconds": seconds + 1}, timeout=seconds + 60)
        work = lab.run_workload(per_function=per_function, inflight=1, rate=rate, oses=["host", "g2"])
        storm_res, stormy = await asyncio.gather(storm_call, work)
        for name, rep in (("quiet", quiet), ("storm", stormy)):
            out[name] = {"latency": merged_latency(rep, {"host", "g2"}),
                         "lost": sum(r["lost"] for r in rep["functions"]),
                         "outcomes": sorted({r["outcome"] for r in rep["functions"]})}
        out["storm"]["doorbells"] = storm_res["doorbells"]
    q, s = out["quiet"]["latency"], out["storm"]["latency"]
    out["p99_ratio"] = s["p99_us"] / q["p99_us"] if q["p99_us"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="paced interrupts/s per measured function")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from fabric.loop import run as run_loop
    console = Console()
    res: dict = {}

    async def go():
        res.update(await run(args.rate, args.seconds, console.log))

    run_loop(go())
    t = Table(title=f"fairness: host + g2 at {args.rate:,.0f}/s each; g1 storms "
                    f"({res['storm']['doorbells']:,} doorbells)", title_justify="left")
    for col in ("run", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "lost", "outcomes"):
        t.add_column(col)
    for name in ("quiet", "storm"):
        lat = res[name]["latency"]
        t.add_row(name, f"{lat['p50_us']:,.0f}", f"{lat['p99_us']:,.0f}", f"{lat['p999_us']:,.0f}",
                  f"{lat['max_us']:,.0f}", str(res[name]["lost"]), ", ".join(res[name]["outcomes"]))
    console.print(t)
    ratio = res["p99_ratio"]
    console.print(f"p99 storm / quiet = {ratio:.2f} (goal <= 2)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

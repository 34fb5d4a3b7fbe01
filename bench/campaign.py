"""A process-level hostile campaign: many random misbehaviours against real processes.

    python -m bench.campaign                 # >= 100,000 actions against a secure topology,
                                             # then the 4-unsafe topology
    python -m bench.campaign --actions 20000 # a quick run: below the issue's bar, said so

Exit status: 0 "as expected" -- the secure topology took at least 100,000 hostile actions
(issue 6's bar) with 0 breaches, 0 lost legitimate interrupts and no process death, and the
4-unsafe topology was breached; 2 when all of that held but the secure run was below the
bar (a quick ``--actions`` run: it proves less, and says so); 1 otherwise.

Per configuration it prints the actions tried (by kind), what the platform blocked (IR and
DMA faults by reason, EPT violations, refusals, dropped frames), the isolation breaches,
the victims' legitimate interrupts (sent / delivered / lost) and whether any process died.

The secure topology puts one attacker next to one victim on every kind of shared hardware
the matrix covers: SR-IOV VFs with IMS on the VF (RID-checked IRTEs), a PASID-tagging SIOV
device with memory IMS (RID+PASID-checked IRTEs) and a non-tagging SIOV device with device
IMS emulated by the VMM.  The attackers run ``guest.hostile.campaign`` while the victims run
their normal workload; the campaign is expected to find nothing.  The 4-unsafe topology (a
naive VMM composing memory IMS for a non-tagging device) is expected to yield breaches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from irqlab.lab import Lab  # noqa: E402
from irqlab.topology import Topology  # noqa: E402

#: issue 6: "the process-level campaign runs >= 100,000 hostile actions against a secure topology"
ISSUE_BAR = 100_000

SECURE = {
    "name": "campaign-secure",
    "platform": {"pasid_ir": True, "cpus": 2},
    "device": [{"name": "d0", "kind": "sriov", "total_vfs": 4, "vfs": 2, "vf_ims_slots": 8},
               {"name": "m0", "kind": "siov", "adis": 2, "ims": "memory", "pasid_interrupts": True},
               {"name": "v0", "kind": "siov", "adis": 2, "ims": "device", "pasid_interrupts": False}],
    "guest": [{"name": "evil1", "irq": "ims", "assign": ["d0.vf0"]},
              {"name": "vict1", "irq": "ims", "assign": ["d0.vf1"]},
              {"name": "evil2", "irq": "ims", "assign": ["m0.adi0"]},
              {"name": "vict2", "irq": "ims", "assign": ["m0.adi1"]},
              {"name": "evil3", "irq": "ims", "assign": ["v0.adi0"]},
              {"name": "vict3", "irq": "ims", "assign": ["v0.adi1"]}],
}
UNSAFE = {
    "name": "campaign-4-unsafe",
    "platform": {"vmm_unsafe_ims": True},
    "device": [{"name": "m0", "kind": "siov", "adis": 2, "ims": "memory", "pasid_interrupts": False}],
    "guest": [{"name": "evil1", "irq": "ims", "assign": ["m0.adi0"]},
              {"name": "vict1", "irq": "ims", "assign": ["m0.adi1"]}],
}


async def run_config(cfg: dict, actions: int, victim_interrupts: int, log) -> dict:
    topo = Topology.from_dict(cfg, source=f"<{cfg['name']}>")
    evils = [g["name"] for g in cfg["guest"] if g["name"].startswith("evil")]
    victims = [g["name"] for g in cfg["guest"] if g["name"].startswith("vict")]
    per_evil = -(-actions // len(evils))
    t0 = time.monotonic()
    async with Lab(topo, on_progress=lambda m: log(f"{cfg['name']}: {m}")) as lab:
        log(f"{cfg['name']}: {len(evils)} attackers x {per_evil:,} actions, while {len(victims)} victims "
            f"and the host run {victim_interrupts:,} interrupts per function")
        attacks = [lab.call(e, "hostile", {"action": "campaign", "count": per_evil, "seed": i + 1,
                                           "hypercall_every": 500}, timeout=1800)
                   for i, e in enumerate(evils)]
        work = lab.run_workload(per_function=victim_interrupts, inflight=8, oses=["host"] + victims,
                                timeout_s=1800, stall_s=10.0)
        *tried, report = await asyncio.gather(*attacks, work)
        # The attackers' last actions may still be in flight (a campaign returns once it has
        # *sent* them).  A second, short run of the victims settles them: everything the
        # attackers sent was handled before its frames, and OS breach counts are cumulative.
        log(f"{cfg['name']}: settling with one more short victim run")
        settle = await lab.run_workload(per_function=200, inflight=4, oses=["host"] + victims, stall_s=10.0)
        counters = await lab.call("fabric", "counters")
        vms = await lab.call("host", "vms")
    kinds: dict[str, int] = {}
    for t in tried:
        for k, n in t["tried"].items():
            kinds[k] = kinds.get(k, 0) + n
    rows = report["functions"] + settle["functions"]
    blocked = {k: v for k, v in counters.items()
               if k.startswith(("irq:fault", "dma:fault", "drop:", "ept:violation", "dma:unmapped"))}
    return {"config": cfg["name"], "seconds": round(time.monotonic() - t0, 1),
            "actions": sum(t["total"] for t in tried), "by_kind": kinds, "blocked": blocked,
            "refused": {n: vm["refused_total"] for n, vm in vms.items()},
            "breaches": sum(o.get("breaches", 0) for o in settle["oses"].values()),
            "breach_samples": [b for o in settle["oses"].values() for b in o.get("breach_samples", [])][:3],
            "victims": {f"{r['os']} {r['function']}": {"sent": r["sent"], "delivered": r["interrupts"],
                                                        "lost": r["lost"], "outcome": r["outcome"]}
                        for r in report["functions"]},
            "lost": sum(r["lost"] for r in rows), "deaths": settle.get("deaths", []),
            "settle_outcomes": sorted({r["outcome"] for r in settle["functions"]})}


def render(res: dict, console) -> None:
    console.print(f"[bold]{res['config']}[/]: {res['actions']:,} hostile actions in {res['seconds']} s")
    console.print("  tried:   " + ", ".join(f"{k} {v:,}" for k, v in sorted(res["by_kind"].items())))
    console.print("  blocked: " + ", ".join(f"{k} {v:,}" for k, v in sorted(res["blocked"].items())), highlight=False)
    console.print("  refused by the host: " + ", ".join(f"{k} {v}" for k, v in sorted(res["refused"].items())))
    for name, v in res["victims"].items():
        console.print(f"  legit {name}: {v['sent']:,} sent, {v['delivered']:,} delivered, {v['lost']} lost "
                      f"({v['outcome']})")
    style = "bold red" if res["breaches"] else "green"
    console.print(f"  [{style}]breaches: {res['breaches']}[/]; processes died: {len(res['deaths'])}")
    for b in res["breach_samples"]:
        console.print(f"    {b}", highlight=False)


def verdict(secure: dict, unsafe: dict) -> tuple[int, str]:
    """(exit status, the line to print) for the two configurations' results (module doc)."""
    wrong = []
    if secure["breaches"]:
        wrong.append(f"{secure['breaches']} breach(es) in the secure topology")
    if secure["lost"]:
        wrong.append(f"{secure['lost']} legitimate interrupt(s) lost")
    if secure["deaths"]:
        wrong.append(f"{len(secure['deaths'])} process(es) died")
    bad = sorted({v["outcome"] for v in secure["victims"].values()} - {"delivered"})
    if bad or secure["settle_outcomes"] != ["delivered"]:
        wrong.append("victims' outcomes " + ", ".join(bad or secure["settle_outcomes"]))
    if not unsafe["breaches"]:
        wrong.append("no breach found in 4-unsafe")
    if wrong:
        return 1, "NOT as expected: " + "; ".join(wrong)
    if secure["actions"] < ISSUE_BAR:
        return 2, (f"held, and 4-unsafe was breached, but only {secure['actions']:,} hostile actions against "
                   f"the secure topology: below the issue's bar of {ISSUE_BAR:,} (a quick run, not the campaign)")
    return 0, (f"as expected: the secure topology held through {secure['actions']:,} hostile actions, "
               f"4-unsafe was breached")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("--actions", type=int, default=102_000,
                    help=f"hostile actions against the secure topology (the issue's bar: {ISSUE_BAR:,}; "
                         "fewer is a quick run, exit status 2)")
    ap.add_argument("--unsafe-actions", type=int, default=5_000, help="hostile actions against 4-unsafe")
    ap.add_argument("--victim-interrupts", type=int, default=5_000, help="legitimate interrupts per function")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    from rich.console import Console

    from fabric.loop import run
    console = Console()
    out: list[dict] = []

    async def go():
        out.append(await run_config(SECURE, args.actions, args.victim_interrupts, console.log))
        out.append(await run_config(UNSAFE, args.unsafe_actions, 1000, console.log))

    run(go())
    for res in out:
        render(res, console)
    secure, unsafe = out
    rc, line = verdict(secure, unsafe)
    console.print(line, style={0: "bold green", 1: "bold red", 2: "bold yellow"}[rc], highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"configs": out, "status": rc, "verdict": line}, f, indent=2)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Rendering a run's report for people (a rich table) and machines (JSON)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table


def _us(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


_OUTCOME_STYLE = {"delivered": "green", "clean error": "yellow", "silent loss detected": "bold magenta",
                  "blocked": "yellow", "breach": "bold red"}


def render(report: dict, console: Console) -> None:
    """The table, then one line per explanation, DMAR fault, breach, VM and assigned device.
    Those lines are never folded at the console's width (``soft_wrap``): each stays one line
    in a pipe or a file, where tools grep them."""
    t = Table(title=f"irqlab: {report['topology']}: interrupts per function "
                    f"(device -> fabric IR unit -> host vector [-> injected into a guest], or posted to a vCPU)",
              title_justify="left", box=box.SIMPLE_HEAD)
    for col, just in (("os", "left"), ("function", "left"), ("irq", "left"), ("sent", "right"),
                      ("delivered", "right"), ("lost", "right"), ("irq/s", "right"), ("p50 µs", "right"),
                      ("p99 µs", "right"), ("max µs", "right"), ("outcome", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    for r in report["functions"]:
        lat = r["latency"]
        lost_style = "bold red" if r["lost"] else "green"
        fn = r["function"].upper()
        if r["os"] != "host" and r["phys"] != r["rid"]:
            fn += f" (= {r['phys']})"
        style = _OUTCOME_STYLE.get(r["outcome"], "bold red")
        irq = {"msix": "MSI-X", "ims": "IMS", "ims-memory": "IMS-MEM", "none": "-"}.get(r.get("irq_mode", "msix"), "?")
        t.add_row(r["os"], fn, irq, f"{r['sent']:,}", f"{r['interrupts']:,}",
                  f"[{lost_style}]{r['lost']:,}[/]",
                  "-" if not r["rate_per_s"] else f"{r['rate_per_s']:,.0f}",
                  _us(lat["p50_us"]), _us(lat["p99_us"]), _us(lat["max_us"]), f"[{style}]{r['outcome']}[/]")
    console.print(t)
    for r in report["functions"]:
        if r["why"]:
            console.print(f"  {r['os']} {r['function']}: {r['outcome']}: {r['why']}", markup=False, highlight=False,
                          soft_wrap=True)
    fab = report["fabric"]
    faults = report["faults"]
    breaches = sum(o.get("breaches", 0) for o in report.get("oses", {}).values())
    console.print(f"total: {report['total_sent']:,} sent, {report['total_delivered']:,} delivered in "
                  f"{report['elapsed_s']:.2f} s; fabric routed {fab.get('tlps', 0):,} TLPs, injected "
                  f"{fab.get('injected', 0):,}, posted {fab.get('irq:posted', 0):,}, IR faults {fab.get('ir_faults_total', 0)}, DMA faults "
                  f"{fab.get('dma_faults_total', 0)}; isolation breaches {breaches}")
    bursts = sorted({r.get("burst", 1) for r in report["functions"]} - {1})
    if bursts:
        console.print(f"  interrupt generator on: each work item raised its interrupt "
                      f"{'/'.join(map(str, bursts))} times (workload.burst, the engine's IRQ_BURST)",
                      soft_wrap=True)
    for line in faults.get("lines", [])[:10]:
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    for name, o in report.get("oses", {}).items():
        for b in o.get("breach_samples", []):
            console.print(f"  [bold red]BREACH[/] {name}: {b}", soft_wrap=True)
    for name, vm in report.get("vms", {}).items():
        if vm.get("delivery") == "posted":
            console.print(f"  {name}: interrupt delivery posted (IR unit -> vCPU descriptors, the host not on "
                          f"the path); {vm.get('injected', 0):,} injected", markup=False, highlight=False,
                          soft_wrap=True)
        elif vm.get("delivery"):
            console.print(f"  {name}: interrupt delivery injection (host vector -> injected by the VMM); "
                          f"{vm.get('injected', 0):,} injected", markup=False, highlight=False,
                          soft_wrap=True)
        pasids = vm.get("pasids", {})
        for gdev, phys in vm.get("assigned", {}).items():
            pasid = pasids.get(gdev)
            line = f"  {name}: {gdev} = {phys}" + (f", PASID 0x{pasid:x}" if pasid is not None else "")
            path = vm.get("paths", {}).get(gdev)
            if path:
                line += f"; {path['path']}"
                if path["device_specific_lines"]:
                    line += f" [{path['device_specific_lines']} lines of device-specific VMM code]"
            binds = [b for b in vm.get("irte_bindings", []) if b["dev"] == gdev]
            for b in binds:
                where = "checks PASID 0x%x" % b["pasid"] if b.get("pasid") is not None else "checks the RID only"
                line += (f"; IRTE {b['irte']} ({b['kind']} pair, {where}) -> vCPU{b['vcpu']} "
                         f"vector 0x{b['vector']:02x}")
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if vm.get("refused_total"):
            console.print(f"  {name}: the host refused {vm['refused_total']} requests, e.g. "
                          f"{vm['refused'][0]}", markup=False, highlight=False, soft_wrap=True)
    for d in report.get("deaths", []):
        console.print(f"  [bold red]died[/]: {d['role']} {d['name']} ({d['how']}); "
                      f"host: {d.get('host', d.get('error', '?'))}", highlight=False, soft_wrap=True)
    if report["timed_out"]:
        console.print("[bold red]the workload timed out before every interrupt arrived[/]")
    console.print("[bold green]PASS[/]: every outcome as it should be" if report["ok"] else "[bold red]FAIL[/]")

"""Rendering a run's report for people (a rich table) and machines (JSON)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table


def _us(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def render(report: dict, console: Console) -> None:
    t = Table(title=f"irqlab: {report['topology']}: MSI-X interrupts per function "
                    f"(device -> fabric IR unit -> host vector)", title_justify="left", box=box.SIMPLE_HEAD)
    for col, just in (("function", "left"), ("sent", "right"), ("delivered", "right"),
                      ("lost", "right"), ("irq/s", "right"), ("p50 µs", "right"), ("p99 µs", "right"),
                      ("max µs", "right"), ("ordering", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    for r in report["functions"]:
        lat = r["latency"]
        lost_style = "bold red" if r["lost"] else "green"
        t.add_row(r["function"].upper().replace(" ", " "), f"{r['sent']:,}", f"{r['interrupts']:,}",
                  f"[{lost_style}]{r['lost']:,}[/]",
                  "-" if not r["rate_per_s"] else f"{r['rate_per_s']:,.0f}",
                  _us(lat["p50_us"]), _us(lat["p99_us"]), _us(lat["max_us"]),
                  "ok" if r["record_missing"] == 0 else f"[bold red]{r['record_missing']} interrupts before their record[/]")
    console.print(t)
    host = report["host"]
    fab = report["fabric"]
    faults = report["faults"]
    console.print(f"total: {report['total_sent']:,} sent, {report['total_delivered']:,} delivered in "
                  f"{report['elapsed_s']:.2f} s; fabric routed {fab.get('tlps', 0):,} TLPs, "
                  f"IR faults {fab.get('ir_faults_total', 0)}, DMA faults {fab.get('dma_faults_total', 0)}; "
                  f"isolation breaches {host.get('breaches', 0)}")
    for line in faults.get("lines", [])[:10]:
        console.print(f"  {line}", markup=False, highlight=False)
    for b in host.get("breach_samples", []):
        console.print(f"  [bold red]BREACH[/] {b}")
    if report["timed_out"]:
        console.print("[bold red]the workload timed out before every interrupt arrived[/]")
    console.print("[bold green]PASS[/]: nothing lost" if report["ok"] else "[bold red]FAIL[/]")

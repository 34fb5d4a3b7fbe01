"""irqlab benchmark suite: every figure in one run, each beside a baseline measured in that run.

    python -m bench                       # full run (3-4 minutes on 2 cores)
    python -m bench --quick               # smoke run (about a minute)
    python -m bench --only relay,codec    # some sections (names below)
    python -m bench --json out.json       # results there (default bench/results/latest.json)

Sections, in the order they run:

    relay      the raw DEALER -> ROUTER -> DEALER relay: the baseline of every ratio
    case1      device -> fabric IR unit -> host vector (bench/interrupts.py run); each of
               case1, injection and posted measures the work-item loop (one interrupt per
               doorbell) and interrupt delivery (32 per doorbell, the engine's IRQ_BURST)
    injection  device -> IR unit -> host -> INJECT -> guest (run_injection)
    posted     device -> IR unit -> posted descriptor -> guest, no host (run_posted)
    dma        DMA copy throughput through the IOMMU (bench/dma.py)
    boot       boot time and memory per process, 1/8/32/64 VMs (bench/boot.py)
    tracing    the cost of tracing on (bench/tracing.py)
    codec      the TLP codec beside cocotbext-pcie (bench/codec.py)

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

SECTIONS = ("relay", "case1", "injection", "posted", "dma", "boot", "tracing", "codec")

FULL = {"relay_n": 500_000, "relay_repeat": 3, "relay_rate": 2000.0, "relay_seconds": 5.0,
        "lab_per_function": 20_000, "lab_inflight": 32, "lab_repeat": 3,
        "lab_latency_per_function": 10_000, "lab_warmup_per_function": 1_000,
        "boot_sizes": [1, 8, 32, 64]}
QUICK = {"relay_n": 100_000, "relay_repeat": 1, "relay_rate": 2000.0, "relay_seconds": 1.5,
         "lab_per_function": 4_000, "lab_inflight": 32, "lab_repeat": 1,
         "lab_latency_per_function": 1_000, "lab_warmup_per_function": 200,
         "boot_sizes": [1, 8]}

#: the goals of issue 7 (and where the others come from), as the table states them
GOALS = {
    "posted_rate": 0.5,          # posted interrupts/s >= 0.5 x relay msg/s (0.8 beyond issue 7)
    "posted_p50": 1.5,           # posted one-way p50 <= 1.5 x relay one-way p50
    "posted_vs_injection": 1.4,  # posted interrupts/s >= 1.4 x injection interrupts/s
    "coalesced": 1.0,            # coalesced posted interrupts/s above the per-message relay's msg/s
    "boot_64_s": 10.0,           # 64 VMs boot in <= 10 s
    "codec": 0.1,                # ours <= 0.1 x cocotbext's time per TLP (>= 10x faster)
}


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


def parse_only(text: str | None) -> tuple[str, ...]:
    """``--only a,b``: the sections to run, in suite order; ValueError names an unknown one."""
    if not text:
        return SECTIONS
    want = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in want if w not in SECTIONS]
    if unknown or not want:
        raise ValueError(f"unknown section {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(SECTIONS)}")
    return tuple(s for s in SECTIONS if s in want)


# ---------------------------------------------------------------------------------------------
# the sections


def run_relay(p: dict, log) -> dict:
    from bench import relay
    from bench.interrupts import median_run
    runs = []
    for i in range(p["relay_repeat"]):
        log(f"relay: throughput {i + 1}/{p['relay_repeat']}: {p['relay_n']:,} frames of "
            f"{relay.frame_size()} bytes, sender -> relay -> receiver")
        r = relay.throughput(p["relay_n"])
        if r["timed_out"]:
            raise RuntimeError(f"relay throughput run timed out ({r['received']:,} of {p['relay_n']:,} received)")
        runs.append(r)
        log(f"relay: throughput {i + 1}/{p['relay_repeat']}: {r['rate_per_s']:,.0f} msg/s")
    median = median_run(runs)
    log(f"relay: latency at {p['relay_rate']:,.0f} msg/s for {p['relay_seconds']} s")
    lat = relay.latency(p["relay_rate"], p["relay_seconds"])
    lat.pop("hist", None)
    log(f"relay: latency p50 {lat['latency']['p50_us']:.0f} µs")
    return {"frame_bytes": relay.frame_size(),
            "throughput": {"n": p["relay_n"], "runs": runs, "rate_per_s": median["rate_per_s"],
                           "cpu_us_per_msg": median["cpu_us_per_msg"]},
            "latency": lat}


async def _section(name: str, p: dict, quick: bool, log) -> dict | None:
    """One process-level section; None if this checkout does not have it (posted, tracing)."""
    from bench import interrupts
    lab_args = dict(per_function=p["lab_per_function"], inflight=p["lab_inflight"],
                    latency_per_function=p["lab_latency_per_function"],
                    warmup_per_function=p["lab_warmup_per_function"], progress=log)
    if name == "case1":
        return await interrupts.run(repeat=p["lab_repeat"], **lab_args)
    if name == "injection":
        return await interrupts.run_injection(repeat=p["lab_repeat"], **lab_args)
    if name == "posted":
        fn = getattr(interrupts, "run_posted", None)
        return None if fn is None else await fn(repeat=p["lab_repeat"], **lab_args)
    if name == "dma":
        from bench import dma
        return await dma.run(quick, log)
    if name == "boot":
        from bench import boot
        return await boot.run(p["boot_sizes"], log)
    if name == "tracing":
        try:
            from bench import tracing
        except ImportError:
            return None
        fn = getattr(tracing, "run", None)
        return None if fn is None else await fn(quick, log)
    raise ValueError(name)


def run_processes(names: list[str], p: dict, quick: bool, log) -> tuple[dict, dict]:
    """Run the process-level sections in one event loop; (results, errors by section).  A
    section that fails is recorded and the next one runs; Ctrl-C stops them all."""
    from fabric.loop import run
    out: dict = {}
    errors: dict = {}

    async def go():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)   # so that every Lab's stop() runs
        for name in names:
            log(f"[bold]== {name}[/]")
            try:
                res = await _section(name, p, quick, log)
            except (RuntimeError, ValueError, OSError, TimeoutError) as exc:   # LabError is a RuntimeError
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log(f"[red]{name} failed[/]: {errors[name]}")
                continue
            out[name] = res if res is not None else {"not_measured": f"this checkout has no bench for {name}"}

    run(go())
    return out, errors


def run_codec(quick: bool, log) -> dict:
    from bench import codec
    return codec.run(quick, log)


# ---------------------------------------------------------------------------------------------
# the table (pure: rows from the results dict; tests/unit/test_bench_table.py)


def _r(a, b):
    return a / b if a is not None and b else None


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _goal(ratio, limit: float, at_least: bool) -> str:
    if ratio is None:
        return f"{'>=' if at_least else '<='} {limit:g}"
    met = ratio >= limit if at_least else ratio <= limit
    return f"{'>=' if at_least else '<='} {limit:g} {'met' if met else 'NOT met'}"


def build_rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """The table: ``(figure, baseline, irqlab, ratio, goal)`` strings, one per figure.

    The baseline is the raw relay measured in the same run (msg/s, its one-way latency),
    except where the row says otherwise (cocotbext-pcie for the codec, tracing off for
    tracing, the injection path for posted ÷ injection); ratio = irqlab ÷ baseline.  A section
    that did not run says so; one this checkout has no bench for says "not measured"; no
    figure is ever made up."""
    rows: list[tuple[str, str, str, str, str]] = []
    relay = res.get("relay") or {}
    rt = (relay.get("throughput") or {}).get("rate_per_s")
    rl = (relay.get("latency") or {}).get("latency") or {}
    errors = res.get("errors", {})
    ran = res.get("sections", SECTIONS)

    def head(title: str) -> None:
        rows.append((title, "", "", "", ""))

    def missing(name: str, what: str) -> bool:
        sec = res.get(name)
        if name in errors:
            rows.append((what, "", "failed (see below)", "", ""))
            return True
        if name not in ran:
            rows.append((what, "", "not run (--only)", "", ""))
            return True
        if sec is None or "not_measured" in sec:
            rows.append((what, "", "not measured", "", ""))
            return True
        return False

    head("raw relay (baseline) and case 1: device -> IR unit -> host")
    if "relay" in errors:
        rows.append(("raw relay", "", "failed (see below): no ratios", "", ""))
    elif rt is not None:
        rows.append(("relay: msg/s (two hops, no work)", _fmt(rt), "", "", ""))
        rows.append(("relay: one-way latency p50 / p99 µs", f"{_fmt(rl.get('p50_us'))} / {_fmt(rl.get('p99_us'))}",
                     "", "", ""))
    else:
        rows.append(("raw relay", "", "not run (--only): no ratios", "", ""))
    if not missing("case1", "case 1"):
        c1 = res["case1"]
        lt = c1["saturation"]["rate_per_s"]
        ll = c1["latency"]["latency"]
        rows.append(("case 1: interrupts/s", _fmt(rt), _fmt(lt), _fmt(_r(lt, rt), ".3f"), ""))
        rows.append(("  fabric frames/s (3 per interrupt)", _fmt(rt), _fmt(lt * 3), _fmt(_r(lt * 3, rt), ".3f"), ""))
        for k, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            rows.append((f"  one-way latency {name} µs", _fmt(rl.get(k)), _fmt(ll.get(k)),
                         _fmt(_r(ll.get(k), rl.get(k)), ".2f"), ""))
        fc = c1["saturation"].get("cpu_us_per_interrupt", {}).get("fabric")
        rc = ((relay.get("throughput") or {}).get("cpu_us_per_msg") or {}).get("relay")
        rows.append(("  relay | fabric CPU µs per frame", _fmt(rc, ".2f"), _fmt(None if fc is None else fc / 3, ".2f"),
                     _fmt(_r(None if fc is None else fc / 3, rc), ".2f"), ""))
        rows.append(("  rate in the latency run (/s)", _fmt((relay.get("latency") or {}).get("rate_per_s")),
                     _fmt(c1["latency"].get("rate_per_s")), "", ""))

    dl = {name: (res.get(name) or {}).get("delivery") if name in ran and name not in errors else None
          for name in ("case1", "injection", "posted")}
    bursts = sorted({d.get("burst", 32) for d in dl.values() if d}) or [32]
    head(f"interrupt delivery: the device raises {'/'.join(map(str, bursts))} interrupts per work item "
         "(IRQ_BURST), one fabric crossing each, like one relayed message")
    for name, what in (("case1", "case 1 (-> host vector)"), ("injection", "injection (-> host -> guest)"),
                       ("posted", "posted (-> vCPU, no host)")):
        if not dl[name]:
            continue                               # the work-item section below says why
        d = dl[name]
        q = _r(d["rate_per_s"], rt)
        goal = ""
        if name == "posted":
            goal = (f"{_goal(q, GOALS['posted_rate'], True)}; coalesced above the relay: "
                    f"{_goal(q, GOALS['coalesced'], True)}")
        rows.append((f"{what}: interrupts/s", _fmt(rt), _fmt(d["rate_per_s"]), _fmt(q, ".3f"), goal))
        rows.append(("  handler runs per interrupt | CPU µs per interrupt (all processes)", "",
                     f"{_fmt(d.get('handler_runs_per_interrupt'), '.2f')} | "
                     f"{_fmt(sum((d.get('cpu_us_per_interrupt') or {}).values()) or None, '.1f')}", "", ""))
    if dl["posted"] and dl["injection"]:
        q = _r(dl["posted"]["rate_per_s"], dl["injection"]["rate_per_s"])
        rows.append(("  posted ÷ injection interrupts/s (baseline: injection)", _fmt(dl["injection"]["rate_per_s"]),
                     _fmt(dl["posted"]["rate_per_s"]), _fmt(q, ".2f"), _goal(q, GOALS["posted_vs_injection"], True)))

    head("into a guest, one interrupt per work item (doorbell, record, interrupt: 3 crossings each): "
         "injection (via the host) and posted (IR unit -> vCPU)")
    inj_rate = None
    if not missing("injection", "injection path"):
        inj = res["injection"]
        inj_rate = inj["saturation"]["rate_per_s"]
        il = inj["latency"]["latency"]
        rows.append(("injection: interrupts/s", _fmt(rt), _fmt(inj_rate), _fmt(_r(inj_rate, rt), ".3f"), ""))
        rows.append(("  one-way latency p50 / p99 µs", f"{_fmt(rl.get('p50_us'))} / {_fmt(rl.get('p99_us'))}",
                     f"{_fmt(il.get('p50_us'))} / {_fmt(il.get('p99_us'))}",
                     f"{_fmt(_r(il.get('p50_us'), rl.get('p50_us')), '.2f')} / "
                     f"{_fmt(_r(il.get('p99_us'), rl.get('p99_us')), '.2f')}", ""))
    if not missing("posted", "posted path"):
        po = res["posted"]
        pr = po["saturation"]["rate_per_s"]
        pl = po["latency"]["latency"]
        q = _r(pr, rt)
        rows.append(("posted: interrupts/s", _fmt(rt), _fmt(pr), _fmt(q, ".3f"), ""))
        q = _r(pl.get("p50_us"), rl.get("p50_us"))
        rows.append(("  one-way latency p50 µs", _fmt(rl.get("p50_us")), _fmt(pl.get("p50_us")), _fmt(q, ".2f"),
                     _goal(q, GOALS["posted_p50"], False)))
        rows.append(("  one-way latency p99 µs", _fmt(rl.get("p99_us")), _fmt(pl.get("p99_us")),
                     _fmt(_r(pl.get("p99_us"), rl.get("p99_us")), ".2f"), ""))
        q = _r(pr, inj_rate)
        rows.append(("  posted ÷ injection, one per work item (baseline: injection)", _fmt(inj_rate), _fmt(pr),
                     _fmt(q, ".2f"), ""))

    head("DMA through the IOMMU (a VF copying inside its guest's RAM)")
    if not missing("dma", "DMA copy"):
        d = res["dma"]
        rows.append((f"DMA copy MB/s ({d['bytes'] // 1024} KiB copies, read + write)", "", _fmt(d["mb_per_s"], ".1f"),
                     "", ""))
        rows.append(("  TLPs/s through the fabric (MRd, CplD, MWr)", _fmt(rt), _fmt(d["tlps_per_s"]),
                     _fmt(_r(d["tlps_per_s"], rt), ".3f"), ""))

    head("boot: Lab.start() to every guest ready; memory per process when ready")
    if not missing("boot", "boot"):
        runs = res["boot"]["runs"]
        for n, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
            goal = _goal(r["wall_s"], GOALS["boot_64_s"], False).replace(" met", " s met").replace(
                " NOT", " s NOT") if int(n) == 64 else ""
            rows.append((f"{n} VM{'s' if int(n) > 1 else ''}: boot s", "", _fmt(r["wall_s"], ".2f"), "", goal))
        big = runs[max(runs, key=int)]
        g, gp = big["guest_rss_kib"], big["guest_pss_kib"]
        mib = lambda k: None if k is None else k / 1024  # noqa: E731
        rows.append((f"  {big['vms']} VMs: guest RSS MiB median / max", "",
                     f"{_fmt(mib(g['median']), '.1f')} / {_fmt(mib(g['max']), '.1f')}", "", ""))
        rows.append((f"  {big['vms']} VMs: guest PSS MiB median (shared pages split)", "",
                     _fmt(mib(gp["median"]), ".1f"), "", ""))
        rows.append((f"  {big['vms']} VMs: RSS MiB " + " / ".join(big["rss_kib"]), "",
                     " / ".join(_fmt(mib(v), ".1f") for v in big["rss_kib"].values()), "", ""))

    head("tracing on (baseline: tracing off, same lab, alternating rounds)")
    if not missing("tracing", "tracing cost"):
        t = res["tracing"]
        rows.append(("tracing on: interrupts/s", _fmt(t["off"]["rate_per_s"]), _fmt(t["on"]["rate_per_s"]),
                     _fmt(t["overhead"]["rate"], ".2f"), ""))
        rows.append(("  one-way latency p50 µs", _fmt(t["off"]["latency_p50_us"]), _fmt(t["on"]["latency_p50_us"]),
                     _fmt(t["overhead"]["latency_p50"], ".2f"), ""))

    head("TLP codec, µs per TLP (baseline: cocotbext-pcie Tlp.pack/unpack, same TLPs)")
    if not missing("codec", "codec"):
        for kind, k in res["codec"]["kinds"].items():
            for op in ("encode", "decode"):
                q = _r(k[f"ours_{op}_us"], k[f"theirs_{op}_us"])
                rows.append((f"{op} {kind}" + (" (cocotbext: no prefix)" if k.get("cocotbext_without_prefix")
                                               and op == "encode" else ""),
                             _fmt(k[f"theirs_{op}_us"], ".2f"), _fmt(k[f"ours_{op}_us"], ".2f"), _fmt(q, ".3f"),
                             _goal(q, GOALS["codec"], False)))
    return rows


def render(res: dict, console) -> None:
    from rich.table import Table
    m = res["machine"]
    t = Table(title=f"irqlab bench — {res['date']} — {res['mode']} — {m['cpus']} CPUs, load average "
                    f"{m['loadavg_1min']['start']:.2f} -> {m['loadavg_1min']['end']:.2f}", title_justify="left")
    for col, just in (("figure", "left"), ("baseline", "right"), ("irqlab", "right"), ("ratio", "right"),
                      ("goal", "left")):
        t.add_column(col, justify=just)
    for row in res["rows"]:
        if not any(row[1:]):                       # a section's title
            t.add_row(f"[bold]{row[0]}[/]", "", "", "", "")
        else:
            t.add_row(*row)
    console.print(t)
    console.print("ratio = irqlab ÷ baseline; the baseline is the raw relay (msg/s; one-way two-hop latency) "
                  "measured in this run unless the section says otherwise. See docs/performance.md.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts: a smoke run")
    ap.add_argument("--only", metavar="NAMES", help=f"comma-separated sections: {','.join(SECTIONS)}")
    ap.add_argument("--json", metavar="PATH", default=DEFAULT_JSON,
                    help=f"write the results as JSON here (default: {os.path.relpath(DEFAULT_JSON)})")
    args = ap.parse_args(argv)
    try:
        sections = parse_only(args.only)
    except ValueError as exc:
        print(f"python -m bench: --only: {exc}", file=sys.stderr)
        return 2

    from rich.console import Console
    console = Console(width=None if sys.stdout.isatty() else 150)   # a file or pipe: no wrapping
    log = console.log
    p = QUICK if args.quick else FULL
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"[yellow]the machine is busy (load average {load:.2f}): the figures will be noisy[/]")
    res: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "mode": "quick" if args.quick else "full", "params": p, "machine": _machine(),
                 "sections": list(sections), "errors": {}}
    try:
        if "relay" in sections:
            log("[bold]== relay[/]")
            try:
                res["relay"] = run_relay(p, log)
            except (RuntimeError, OSError) as exc:
                res["errors"]["relay"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        procs = [s for s in sections if s not in ("relay", "codec")]
        if procs:
            out, errors = run_processes(procs, p, args.quick, log)
            res.update(out)
            res["errors"].update(errors)
        if "codec" in sections:
            log("[bold]== codec[/]")
            try:
                res["codec"] = run_codec(args.quick, log)
            except RuntimeError as exc:
                res["errors"]["codec"] = str(exc).splitlines()[0]
    except (asyncio.CancelledError, KeyboardInterrupt):
        console.print("[bold red]bench interrupted[/]: every process it started has been stopped")
        return 1
    res["wall_s"] = time.monotonic() - t0
    res["machine"]["loadavg_1min"] = {"start": load, "end": os.getloadavg()[0]}
    res["rows"] = build_rows(res)
    render(res, console)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    for name, err in res["errors"].items():
        console.print(f"[bold red]{name} failed[/]: {err}")
    console.log(f"wrote {args.json} ({res['wall_s']:.0f} s)")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

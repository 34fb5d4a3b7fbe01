#!/usr/bin/env python3
"""irqlab launcher: start a topology of real processes, run its workload, print the report.

    python launch.py                       # the built-in default topology
    python launch.py run topo.toml         # a topology file
    python launch.py run --json            # the report as JSON on stdout
    python launch.py --trace run.json      # also write a trace (Perfetto / chrome://tracing JSON)
    python launch.py show-default          # print the built-in topology (a starting point)
    python launch.py run --hold            # keep the topology running after the report, then:
    python launch.py views [--runtime DIR] [g1 ...]   # kernel-style views of a running OS
    python launch.py ctl [--runtime DIR] PEER OP [JSON]   # any control request
    python launch.py commands topo.toml --listen 10.0.0.1:5555   # per-machine commands for a
                                           # tcp topology split across hosts (docs/multihost.md)

Exit status: 0 when every interrupt sent was delivered (and nothing broke
isolation or ordering), 1 when the run completed but something was lost, 2 for
a bad topology or command line, 3 when a process died or the lab could not
start.  Nothing is left running in any case: every child is in its own
process group, is stopped politely then with SIGTERM then SIGKILL, and dies
with the launcher even if the launcher is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

EXIT_OK, EXIT_LOST, EXIT_USAGE, EXIT_LAB = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    from irqlab.topology import BURST_MAX
    ap = argparse.ArgumentParser(
        prog="launch.py",
        description="Run an irqlab topology: a fabric (PCIe bus + IOMMU + IR unit), device and host "
                    "processes, and report interrupt delivery per function.",
        epilog="Without a command, 'run' on the built-in default topology. Topology format: docs/topology.md")
    sub = ap.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="start a topology, run its workload, print the report (the default)")
    run.add_argument("topology", nargs="?", help="TOML topology file (default: the built-in one)")
    run.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    run.add_argument("--per-function", type=int, metavar="N", help="override workload.per_function")
    run.add_argument("--inflight", type=int, metavar="N", help="override workload.inflight")
    run.add_argument("--rate", type=float, metavar="R", help="override workload.rate (doorbells/s per function)")
    run.add_argument("--burst", type=int, metavar="N",
                     help=f"override workload.burst: interrupts each work item raises (1..{BURST_MAX}, the "
                          "engine's interrupt generator)")
    run.add_argument("--views", action="store_true",
                     help="also print every OS's /proc/interrupts, irq-domain hierarchy, lspci -vv, ADIs and "
                          "boot log, and the fabric's DMAR fault log and interrupt remapping table")
    run.add_argument("--hold", action="store_true",
                     help="keep the topology running after the report until Ctrl-C (for 'views' and 'ctl')")
    run.add_argument("--keep-runtime", action="store_true",
                     help="keep the runtime directory (process logs, configs) and print its path")
    run.add_argument("--trace", metavar="FILE",
                     help="record every TLP, VM exit, hypercall, injection, posted notification and fault in "
                          "every process, from boot, and write them to FILE as Chrome trace-event JSON with "
                          "one flow per interrupt (open it in https://ui.perfetto.dev; docs/tracing.md)")
    sub.add_parser("show-default", help="print the built-in default topology (TOML)")
    sub.add_parser("behaviours", help="list the misbehaviours a guest can commit (topology guest.behaviours, "
                                      "or 'ctl GUEST hostile {\"action\": NAME}')")
    mx = sub.add_parser("matrix", help="run every row of the DESIGN.md §5 matrix, quiet and with a hostile guest, "
                                       "and compare observed with expected outcomes")
    mx.add_argument("rows", nargs="*", help="row ids (default: all): 1 2 2-ims 2-oldkvm 2-hidden 2-legacy 3 "
                                            "3-noplat 4 4-unsafe 4-noemul mangle")
    mx.add_argument("--json", action="store_true", help="print the results as JSON")
    mx.add_argument("--quiet-only", action="store_true", help="skip the hostile variants")
    views = sub.add_parser("views", help="print kernel-style views from a running topology ('run --hold'): "
                                         "each OS's, then (without OS names) the fabric's DMAR fault log and IRT")
    views.add_argument("oses", nargs="*", help="host and/or guest names (default: all)")
    views.add_argument("--runtime", help="the running topology's runtime directory (default: the newest)")
    views.add_argument("--only", choices=("interrupts", "domains", "lspci", "adis", "vms", "dmesg") + FABRIC_VIEWS,
                       help="print just one view (faults and irt are the fabric's)")
    ctl = sub.add_parser("ctl", help="send one control request to a process of a running topology")
    ctl.add_argument("peer", help="fabric, host, a device or a guest name")
    ctl.add_argument("op", help="operation, e.g. counters, stats, views, vms, hostile")
    ctl.add_argument("args", nargs="?", default="{}", help="JSON object of arguments")
    ctl.add_argument("--runtime", help="the running topology's runtime directory (default: the newest)")
    cmds = sub.add_parser("commands", help="split a tcp topology across machines: write its runtime directory "
                                           "(tokens, CURVE keys) and print, per process, the files to copy and "
                                           "the command to run (docs/multihost.md)")
    cmds.add_argument("topology", help="TOML topology file with transport = \"tcp\"")
    cmds.add_argument("--listen", required=True, metavar="HOST:PORT",
                      help="where the fabric binds and every process connects: an IPv4 address of the "
                           "fabric's machine and a port")
    cmds.add_argument("--python", default="python", metavar="CMD",
                      help="the Python command on the other machines (default: python)")
    cmds.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def _listen_address(text: str) -> str:
    """Validate ``HOST:PORT`` for ``commands --listen``; ValueError with a one-line reason."""
    import ipaddress
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"--listen: expected HOST:PORT, e.g. 10.0.0.1:5555; got {text!r}")
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"--listen: HOST must be an IPv4 address of the fabric's machine "
                         f"(ZeroMQ binds addresses, not names); got {host!r}") from None
    if addr.is_unspecified:
        raise ValueError("--listen: every process connects to this address too, so it cannot be 0.0.0.0; "
                         "give the fabric machine's own address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--listen: PORT must be 1..65535; got {port!r}")
    return f"{addr}:{int(port)}"


def _commands(args) -> int:
    import shlex
    from irqlab.lab import Lab, LabError
    from irqlab.topology import TopologyError, load
    try:
        listen = _listen_address(args.listen)
        topo = load(args.topology)
        lab = Lab(topo, listen=listen)
        entries = lab.commands(python=args.python)
    except (TopologyError, ValueError, LabError) as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"launch.py: cannot write the runtime directory: {exc}", file=sys.stderr)
        return EXIT_LAB
    if args.json:
        json.dump({"topology": topo.name, "endpoint": lab.endpoint, "runtime": lab.runtime,
                   "processes": entries}, sys.stdout, indent=2)
        print()
        return EXIT_OK
    rt = lab.runtime
    print(f"topology {topo.name!r} split across machines; the fabric listens on {lab.endpoint}\n"
          f"runtime directory {rt} (mode 0700): every file in it is a secret (tokens, CURVE keys).\n"
          f"On each machine: an irqlab checkout, run from its top directory with its venv active;\n"
          f"  mkdir -m 0700 -p {shlex.quote(rt)}   and copy that machine's files into it (scp -p keeps mode 0600).\n"
          f"Only the processes below can join: the fabric admits exactly these CURVE keys, and each token works once.\n")
    for i, e in enumerate(entries, 1):
        label = e["role"] if e["role"] in ("fabric", "host", "control") else f"{e['role']} {e['name']}"
        print(f"{i}. {label}  -- {e['when']}")
        print(f"   copy: {' '.join(shlex.quote(f) for f in e['files'])}")
        if e["argv"]:
            print(f"   run:  {shlex.join(e['argv'])}")
        else:
            print("   run:  your controller: a fabric.port.Port built from control.json "
                  "(docs/multihost.md, 'Driving a split topology')")
    return EXIT_OK


def _newest_runtime() -> str | None:
    import glob
    import os
    import tempfile
    cands = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), "irqlab-*"))
             if os.path.exists(os.path.join(d, "launcher.sock"))]
    return max(cands, key=os.path.getmtime) if cands else None


def _print_views(console, name: str, views: dict, only: str | None = None) -> None:
    sections = (("interrupts", "/proc/interrupts", "proc_interrupts"), ("domains", "irq domains", "domains"),
                ("lspci", "lspci -vv", "lspci"), ("adis", "ADIs", "adis"),
                ("vms", "VMs (interrupt delivery)", "vms"), ("dmesg", "dmesg", "dmesg"))
    for key, title, field in sections:
        if only and only != key:
            continue
        if field in ("adis", "vms") and not views.get(field):
            continue
        console.print(f"[bold]== {name}: {title} ==[/]")
        console.print(views.get(field, "").rstrip() or "(empty)", markup=False, highlight=False)


#: the fabric's own views: what its IR unit and fault log hold (``fabric`` control ops)
FABRIC_VIEWS = ("faults", "irt")


async def _fabric_views(lab) -> dict:
    """The fabric's views: the DMAR fault log (``faults``: the fault records still held, totals
    per reason, overflow) and the IRT (``irt``: a header line, then one line per IRTE)."""
    return {v: await lab.call("fabric", v) for v in FABRIC_VIEWS}


def _print_fabric_views(console, views: dict, only: str | None = None) -> None:
    """The DMAR fault log as the kernel logs it and the IRT as Linux's debugfs
    (``intel_iommu/ir_translation_struct``) prints it."""
    if only in (None, "faults"):
        faults = views["faults"]
        console.print("[bold]== fabric: DMAR fault log ==[/]")
        lines = list(faults.get("lines", []))
        totals = faults.get("totals", {})
        if sum(totals.values()) > len(lines) or faults.get("overflow"):
            lines.append(f"({sum(totals.values())} faults in all, "
                         + ", ".join(f"reason {r} x{n}" for r, n in sorted(totals.items()))
                         + f"; the {len(faults.get('lines', []))} fault records above are the ones still held"
                         + (f"; {faults['overflow']} lost to fault-log overflow" if faults.get("overflow") else "")
                         + ")")
        console.print("\n".join(lines) or "(no faults)", markup=False, highlight=False)
    if only in (None, "irt"):
        console.print("[bold]== fabric: interrupt remapping table ==[/]")
        irt = views["irt"]
        console.print("\n".join(irt) if len(irt) > 1 else "(no IRTE programmed)", markup=False, highlight=False)


def _run_matrix(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fabric.loop import run
    from irqlab import matrix

    try:
        rows = matrix.select(args.rows)
    except ValueError as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    console = _console()
    jobs = [(row, hostile) for row in rows for hostile in ((False,) if args.quiet_only else (False, True))]
    results: list[dict] = []

    async def go():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                      disable=args.json) as progress:
            bar = progress.add_task("matrix", total=len(jobs))
            for row, hostile in jobs:
                progress.update(bar, description=f"row {row.id}{' + hostile guest' if hostile else ''}")
                # whatever a row raises is reported as a row that did not pass (matrix.NOT_RUN)
                results.append(await matrix.run_row_reported(row, hostile))
                progress.advance(bar)

    from rich.console import Console
    try:
        run(go())
    except asyncio.CancelledError:
        print("launch.py: interrupted", file=sys.stderr)
        return 130
    if args.json:
        json.dump(matrix.to_json(results), sys.stdout, indent=2, default=str)
        print()
    else:
        t = Table(title="irqlab matrix (DESIGN.md §5): expected vs observed, real processes", title_justify="left")
        for col in ("row", "what", "guest", "expected", "observed", "", "how"):
            t.add_column(col, overflow="fold")
        for r in results:
            mark = "[green]✓[/]" if r["ok"] else "[bold red]✗[/]"
            how = matrix.how(r)
            t.add_row(r["row"], r["title"], "hostile" if r["hostile"] else "quiet", r["expected"],
                      r["observed"], mark, how)
        console.print(t)
        bad = [r for r in results if not r["ok"]]
        console.print(f"{len(results) - len(bad)}/{len(results)} as expected"
                      + ("" if not bad else "; mismatches: " + ", ".join(
                          f"{r['row']}{' (hostile)' if r['hostile'] else ''}" for r in bad)))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_LOST


def _console():
    from rich.console import Console
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or a file: don't fold tables and views at 80 columns
    return console


def _remote(args) -> int:
    import json
    from irqlab.lab import LabError, control_request
    console = _console()
    runtime = args.runtime or _newest_runtime()
    if runtime is None:
        print("launch.py: no running topology found; start one with 'launch.py run --hold' "
              "or pass --runtime DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.cmd == "ctl":
            try:
                cargs = json.loads(args.args)
            except json.JSONDecodeError as exc:
                print(f"launch.py: ctl arguments are not JSON: {exc}", file=sys.stderr)
                return EXIT_USAGE
            if not isinstance(cargs, dict):
                print("launch.py: ctl arguments must be a JSON object", file=sys.stderr)
                return EXIT_USAGE
            print(json.dumps(control_request(runtime, args.peer, args.op, cargs), indent=2, default=str))
            return EXIT_OK
        if args.only in FABRIC_VIEWS:
            _print_fabric_views(console, {args.only: control_request(runtime, "fabric", args.only)}, args.only)
            return EXIT_OK
        oses = args.oses or ["host"] + sorted(control_request(runtime, "host", "vms"))
        for name in oses:
            _print_views(console, name, control_request(runtime, name, "views"), args.only)
        if not args.oses and not args.only:
            _print_fabric_views(console, {v: control_request(runtime, "fabric", v) for v in FABRIC_VIEWS})
    except LabError as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return EXIT_LAB
    return EXIT_OK


async def _run(args, console) -> int:
    from rich.console import Console
    from irqlab.lab import Lab, LabError
    from irqlab.topology import BURST_MAX, TopologyError, burst_problem, load

    try:
        topo = load(args.topology)
    except TopologyError as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.rate is not None and not args.rate >= 0:
        print("launch.py: --rate must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    for opt in ("per_function", "inflight"):
        v = getattr(args, opt)
        if v is not None and v < (0 if opt == "per_function" else 1):
            print(f"launch.py: --{opt.replace('_', '-')} must be >= {0 if opt == 'per_function' else 1}",
                  file=sys.stderr)
            return EXIT_USAGE
    if args.burst is not None and not 1 <= args.burst <= BURST_MAX:
        print(f"launch.py: --burst must be 1..{BURST_MAX}", file=sys.stderr)
        return EXIT_USAGE
    if args.burst is not None and (why := burst_problem(args.burst, topo.devices)):
        print(f"launch.py: --burst: {why}", file=sys.stderr)
        return EXIT_USAGE

    if args.trace:
        why = _trace_path_problem(args.trace)
        if why:
            print(f"launch.py: --trace {args.trace}: {why}", file=sys.stderr)
            return EXIT_USAGE

    err_console = Console(stderr=True)
    progress = (lambda msg: None) if args.json else (lambda msg: err_console.log(msg))
    lab = Lab(topo, keep_runtime=args.keep_runtime, on_progress=progress, trace=bool(args.trace))
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        try:
            await lab.start()
            n = sum(1 + d.vfs + d.adis for d in topo.devices)
            per = topo.workload.per_function if args.per_function is None else args.per_function
            burst = topo.workload.burst if args.burst is None else args.burst
            progress(f"booted: host {lab.boot_info.get('cpuid')}, {len(topo.guests)} guests; "
                     f"running {per * burst:,} interrupts on each of {n} functions"
                     + (f" ({per:,} work items of {burst})" if burst > 1 else ""))
            report = await lab.run_workload(per_function=args.per_function, inflight=args.inflight,
                                            rate=args.rate, burst=args.burst)
            views = {}
            if args.views:
                for name in ["host"] + [g.name for g in topo.guests]:
                    views[name] = await lab.call(name, "views")
                views["fabric"] = await _fabric_views(lab)
            if args.trace:
                report["trace"] = await _write_trace(lab, args.trace, progress)
            if args.hold:
                rc = _show(args, console, report, views)
                print(f"launch.py: holding the topology; runtime {lab.runtime}\n"
                      f"  python launch.py views --runtime {lab.runtime} [host|guest ...]\n"
                      f"  python launch.py ctl --runtime {lab.runtime} fabric counters\n"
                      f"Ctrl-C stops it.", file=sys.stderr, flush=True)
                try:
                    await lab.serve_control()
                except asyncio.CancelledError:
                    print("launch.py: stopping the topology", file=sys.stderr)
                return rc
        except LabError as exc:
            print(f"launch.py: {exc}", file=sys.stderr)
            return EXIT_LAB
        except LabTraceError as exc:
            print(f"launch.py: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except asyncio.CancelledError:
            print("launch.py: interrupted; stopping the topology", file=sys.stderr)
            return 130
    finally:
        status = await lab.stop()
        if args.keep_runtime and lab.runtime:
            print(f"launch.py: runtime directory kept at {lab.runtime}", file=sys.stderr)
        if status is not None and status.value != "polite":
            print(f"launch.py: processes had to be {status.value}", file=sys.stderr)

    return _show(args, console, report, views)


def _trace_path_problem(path: str) -> str | None:
    """Why the trace cannot be written to ``path`` (checked before anything starts), or None."""
    import os
    if os.path.isdir(path):
        return "is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"no such directory {parent}"
    if not os.access(parent, os.W_OK):
        return f"directory {parent} is not writable"
    return None


async def _write_trace(lab, path: str, progress) -> dict:
    """Collect every process's trace over the control interface and write one Chrome
    trace-event JSON file (``fabric.trace.to_chrome``); return a summary for the report."""
    import os
    import time
    from fabric.trace import to_chrome
    progress("collecting the trace from every process")
    col = await lab.trace_collect()
    t0 = time.monotonic()
    doc = to_chrome(col["dumps"], meta={"topology": lab.topology.name, "missing": col["missing"]})
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        text = json.dumps(doc, separators=(",", ":"))      # one shot: the C encoder (json.dump is not)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise LabTraceError(f"cannot write the trace to {path}: {exc.strerror or exc}") from None
    other = doc["otherData"]
    summary = {"file": path, "events": sum(other["events"].values()), "flows": other["flows"],
               "dropped": other["dropped"], "missing": col["missing"], "chunks": col["chunks"],
               "collect_s": round(col["seconds"], 3), "write_s": round(time.monotonic() - t0, 3),
               "bytes": os.path.getsize(path)}
    dropped = sum(other["dropped"].values())
    print(f"launch.py: trace: {summary['events']:,} events from {len(col['dumps'])} processes, "
          f"{summary['flows']:,} interrupt flows"
          + (f", {dropped:,} events dropped (buffer full)" if dropped else "")
          + "".join(f", no trace from {n}: {why}" for n, why in col["missing"].items())
          + f"; collected in {col['seconds']:.1f} s, written in {summary['write_s']:.1f} s "
          f"-> {path} ({summary['bytes'] / 1e6:.1f} MB; open it in https://ui.perfetto.dev)",
          file=sys.stderr, flush=True)
    return summary


class LabTraceError(RuntimeError):
    """The trace could not be written (one line for the user)."""


def _show(args, console, report: dict, views: dict) -> int:
    if args.json:
        for r in report["functions"]:
            r.pop("hist", None)
        if views:
            report["views"] = views
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        from irqlab.report import render
        render(report, console)
        for name, v in views.items():
            if name == "fabric":
                _print_fabric_views(console, v)
            else:
                _print_views(console, name, v)
    return EXIT_OK if report["ok"] else EXIT_LOST


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv
    args = _parser().parse_args(argv)
    if args.cmd in ("views", "ctl"):
        return _remote(args)
    if args.cmd == "matrix":
        return _run_matrix(args)
    if args.cmd == "commands":
        return _commands(args)
    if args.cmd == "behaviours":
        from guest.hostile import ACTIONS
        width = max(map(len, ACTIONS))
        for name, (help_line, _) in sorted(ACTIONS.items()):
            print(f"{name:<{width}}  {help_line}")
        return EXIT_OK
    if args.cmd == "show-default":
        import importlib.resources
        sys.stdout.write(importlib.resources.files("irqlab").joinpath("default_topology.toml").read_text())
        return EXIT_OK
    console = _console()

    from fabric.loop import run
    rc = EXIT_LAB

    async def go():
        nonlocal rc
        rc = await _run(args, console)

    run(go())
    return rc


if __name__ == "__main__":
    sys.exit(main())

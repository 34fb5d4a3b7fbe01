"""Tracing: what every process records when ``launch.py --trace FILE`` asks, and the Chrome
trace-event JSON (the format Perfetto's and chrome://tracing's JSON importers read) it becomes.

Each process owns one ``Tracer``.  Disabled, it costs its callers one attribute test
(``if tracer.on:``); enabled, each event is one tuple appended to a bounded list.  The
launcher collects every process's events over the control interface at the end of the run
and writes one file: one track (pid) per process, and one *flow* per interrupt — from the
device that emitted it, through the IR unit, to the CPU (and, for a guest, through the host
that injected it to the vCPU).  A flow's id is derived from the interrupt's out-of-band
provenance (emitter, emit time), which every hop already carries, so tracing adds nothing
to the wire.

Event tuple: ``(t_ns, phase, name, category, args)`` with phase "i" (instant), "s"/"t"/"f"
(flow start/step/end: ``args["id"]``), "X" (complete: ``args["dur_ns"]``).
"""

from __future__ import annotations

import time
from typing import Any

#: events one process keeps (older ones are dropped and counted)
MAX_EVENTS = 2_000_000


def flow_id(origin: int | None, t_ns: int) -> int:
    """One interrupt's flow id: stable across processes, from its out-of-band provenance."""
    return ((origin or 0) * 0x9E3779B1 ^ t_ns) & 0xFFFF_FFFF_FFFF


class Tracer:
    __slots__ = ("on", "events", "dropped", "process")

    def __init__(self, process: str, on: bool = False):
        self.process = process
        self.on = on
        self.events: list[tuple] = []
        self.dropped = 0

    def instant(self, name: str, cat: str, **args: Any) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append((time.monotonic_ns(), "i", name, cat, args))
        else:
            self.dropped += 1

    def flow(self, phase: str, name: str, cat: str, fid: int, **args: Any) -> None:
        """``phase``: "s" start, "t" step, "f" end of the flow ``fid``."""
        if len(self.events) < MAX_EVENTS:
            args["id"] = fid
            self.events.append((time.monotonic_ns(), phase, name, cat, args))
        else:
            self.dropped += 1

    def dump(self) -> dict:
        return {"process": self.process, "events": self.events, "dropped": self.dropped}


def to_chrome(dumps: list[dict]) -> dict:
    """Merge per-process dumps into a Chrome trace-event document (``traceEvents`` array form)."""
    events: list[dict] = []
    t0 = min((e[0] for d in dumps for e in d["events"]), default=0)
    for pid, d in enumerate(dumps, start=1):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": d["process"]}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for t_ns, phase, name, cat, args in d["events"]:
            ts = (t_ns - t0) / 1000.0            # microseconds
            ev: dict[str, Any] = {"name": name, "cat": cat, "ph": phase, "ts": ts, "pid": pid, "tid": 0}
            if phase in ("s", "t", "f"):
                ev["id"] = args.get("id", 0)
                ev["bp"] = "e"                   # bind to the enclosing slice
                # a zero-length slice for the flow to attach to, with the details
                events.append({"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": 1, "pid": pid,
                               "tid": 0, "args": {k: v for k, v in args.items() if k != "id"}})
            elif phase == "i":
                ev["s"] = "t"
                ev["args"] = args
            events.append(ev)
        if d.get("dropped"):
            events.append({"name": f"{d['dropped']} events dropped", "ph": "i", "s": "p", "ts": 0,
                           "pid": pid, "tid": 0})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"generator": "irqlab", "processes": [d["process"] for d in dumps]}}

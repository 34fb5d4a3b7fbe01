"""Tracing: what every process records when ``launch.py --trace FILE`` asks, and the Chrome
trace-event JSON it becomes (written for Perfetto's JSON importer; docs/tracing.md).

Recording
---------
Each process owns one ``Tracer``.  Disabled, it costs its callers one attribute test
(``if tracer.on:``); enabled, each event is one tuple appended to a bounded list (past
``limit`` events, new ones are dropped and counted).  Names and arguments are recorded raw
(ints, the process's own constant strings) and formatted only when the trace is exported.

Event tuple: ``(t_ns, phase, name, category, flow, keys, values)``; ``t_ns`` is
``time.monotonic_ns()`` (CLOCK_MONOTONIC: one clock for every process of one machine).
``phase`` is "i" (an instant: a TLP, a VM exit, a fault ...) or a *hop* of an interrupt's
flow: "s" (the device emitted it), "t" (a hop: IR remap, the host's handler, the VMM's
injection ...), "f" (where it ended: a CPU's handler, an IR fault); ``flow`` is the hop's
flow id (None for an instant).  The arguments are ``keys`` (a constant tuple of names at the
call site) and ``values`` (a tuple): hot paths call ``rec(phase, name, cat, flow, KEYS, *values)``,
which allocates no dict; ``instant``/``flow`` take keyword arguments (``keys`` None, ``values``
the dict) for the cold ones.

A flow's id is derived from the interrupt's out-of-band provenance (``origin``: which
function/ADI emitted it, and ``t_ns``: when), which every hop already carries next to the
interrupt (``wire.TLP``/``IRQ``/``INJECT``/``POSTED``), so tracing adds nothing to the wire.

Collection
----------
Two control operations, served by every process (fabric, devices, host, guests):

* ``trace.start`` ``{"max_events": N?}`` -- clear the buffer and record;
* ``trace.dump`` ``{"offset": i}`` -- stop recording and return the events from ``i`` on,
  as many as fit in one control frame: ``{"process", "events": bytes, "count", "next",
  "total", "dropped"}``; ``events`` is the concatenation of one msgpack array per event
  (``unpack_events``).  The caller repeats with ``offset = next`` until ``next == total``.

The chunk size is set by the sender's frame limit (``chunk_budget``): the fabric drops any
frame above ``wire.MAX_DATA_FRAME`` (8 KiB) from a device or a guest port, and the control
port decodes at most ``wire.MAX_CONTROL_FRAME``.

Export
------
``to_chrome(dumps)`` merges every process's dump into one trace-event document: one track
(pid, with ``process_name``/``thread_name`` metadata) per process, each hop as a short
complete slice ("X") and one flow per interrupt ("s"/"t"/"f" events that all share the flow's
``id``, name ``"interrupt"`` and category ``"irq"``, as Perfetto keys v1 flows by (id, cat,
name)), each placed inside its hop's slice so that it binds to it ("bp": "e").
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

import msgpack

from fabric import wire
from fabric.bdf import rid_str
from fabric.provenance import describe

#: events one process keeps by default (later ones are dropped and counted); at ~300 bytes an
#: event, ~150 MB at most per process
MAX_EVENTS = 500_000

#: the environment variable that makes a process record from its first instruction (boot
#: included): the launcher sets it for ``launch.py --trace`` (``Lab(trace=True)``)
ENV = "IRQLAB_TRACE"

#: every flow event's name and category (Perfetto joins v1 flow events by (id, cat, name))
FLOW_NAME = "interrupt"
FLOW_CAT = "irq"

#: the width of a hop's slice, shortened so that it never overlaps the next event of its track
SLICE_NS = 1_000

#: room for the reply's envelope (CTL_REP header, the dict's other keys) in one frame
_ENVELOPE = 512

#: TLP kinds by Fmt/Type byte, as engineers write them
TLP_NAMES = {0x00: "MRd32", 0x20: "MRd64", 0x40: "MWr32", 0x60: "MWr64", 0x04: "CfgRd0", 0x44: "CfgWr0",
             0x0A: "Cpl", 0x4A: "CplD"}

#: argument names formatted at export: hex numbers, bus:device.function
_HEX_ARGS = frozenset(("addr", "data", "vector", "pasid", "key"))
_BDF_ARGS = frozenset(("rid", "sid"))


def flow_id(origin: int | None, t_ns: int) -> int:
    """One interrupt's flow id: stable across processes, from its out-of-band provenance.
    48 bits, so that JSON readers that hold numbers in doubles keep it exact."""
    return ((origin or 0) * 0x9E3779B1 ^ t_ns) & 0xFFFF_FFFF_FFFF


def requested(environ: dict | None = None) -> bool:
    """Did the launcher ask this process to trace from its start (``IRQLAB_TRACE``)?"""
    v = (os.environ if environ is None else environ).get(ENV, "")
    return v not in ("", "0")


def chunk_budget(role: str) -> int:
    """Bytes of events one ``trace.dump`` reply may carry from a process of ``role``."""
    if role in ("device", "guest"):
        return wire.MAX_DATA_FRAME - _ENVELOPE
    return wire.MAX_CONTROL_FRAME // 2


class Tracer:
    __slots__ = ("on", "events", "dropped", "process", "limit", "_packer")

    def __init__(self, process: str, on: bool = False, limit: int = MAX_EVENTS):
        self.process = process
        self.on = on
        self.limit = limit
        self.events: list[tuple] = []
        self.dropped = 0
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    # -- recording (callers test ``on`` first) --------------------------------

    def rec(self, phase: str, name: str, cat: str, fid: int | None, keys: tuple, *values: Any) -> None:
        """The hot-path form: ``keys`` a constant tuple of argument names, ``values`` theirs."""
        if len(self.events) < self.limit:
            self.events.append((time.monotonic_ns(), phase, name, cat, fid, keys, values))
        else:
            self.dropped += 1

    def rec_at(self, t_ns: int, phase: str, name: str, cat: str, fid: int | None, keys: tuple,
               *values: Any) -> None:
        """``rec`` with a time the caller already read (the device stamps the same value on
        the wire beside the interrupt)."""
        if len(self.events) < self.limit:
            self.events.append((t_ns, phase, name, cat, fid, keys, values))
        else:
            self.dropped += 1

    def instant(self, name: str, cat: str, **args: Any) -> None:
        if len(self.events) < self.limit:
            self.events.append((time.monotonic_ns(), "i", name, cat, None, None, args))
        else:
            self.dropped += 1

    def flow(self, phase: str, name: str, cat: str, fid: int, **args: Any) -> None:
        """A hop of the interrupt flow ``fid``: ``phase`` "s" start, "t" step, "f" end;
        ``name``/``cat`` name the hop (its slice in the viewer)."""
        if len(self.events) < self.limit:
            self.events.append((time.monotonic_ns(), phase, name, cat, fid, None, args))
        else:
            self.dropped += 1

    # -- control --------------------------------------------------------------

    def start(self, max_events: int | None = None) -> dict:
        """``trace.start``: forget what was recorded, record from now on."""
        if max_events is not None:
            if type(max_events) is not int or max_events < 1:
                raise ValueError(f"max_events must be a positive int, got {max_events!r}")
            self.limit = max_events
        self.events = []
        self.dropped = 0
        self.on = True
        return {"process": self.process, "max_events": self.limit}

    def dump_chunk(self, offset: int = 0, budget: int = wire.MAX_DATA_FRAME - _ENVELOPE) -> dict:
        """``trace.dump``: stop recording; the events from ``offset`` that fit in ``budget``
        bytes (at least one, whatever its size, so that a dump always progresses)."""
        self.on = False
        if type(offset) is not int or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        events = self.events
        total = len(events)
        pack = self._packer.pack
        parts: list[bytes] = []
        size = 0
        i = min(offset, total)
        while i < total:
            b = pack(events[i])
            if parts and size + len(b) > budget:
                break
            parts.append(b)
            size += len(b)
            i += 1
        return {"process": self.process, "events": b"".join(parts), "count": len(parts), "offset": offset,
                "next": i, "total": total, "dropped": self.dropped}

    def dump(self) -> dict:
        """Everything at once (in-process use: tests, tools); stops recording."""
        self.on = False
        return {"process": self.process, "events": list(self.events), "dropped": self.dropped}


_PHASES = frozenset(("i", "s", "t", "f"))
_ARG = (int, str, float, bool, type(None))


def _well_formed(e: object) -> bool:
    """An event as ``Tracer`` records it (a guest's dump is checked like anything it sends)."""
    if type(e) is not tuple or len(e) != 7:
        return False
    t, ph, name, cat, fid, keys, values = e
    if type(t) is not int or ph not in _PHASES or type(name) is not str or type(cat) is not str:
        return False
    if (fid is None) != (ph == "i") or (fid is not None and type(fid) is not int):
        return False
    if keys is None:
        return type(values) is dict and all(type(k) is str and type(v) in _ARG for k, v in values.items())
    return (type(keys) is tuple and type(values) is tuple and len(keys) == len(values)
            and all(type(k) is str for k in keys) and all(type(v) in _ARG for v in values))


def unpack_events(blob: bytes) -> list[tuple]:
    """The well-formed events of one ``trace.dump`` chunk (anything else is left out)."""
    up = msgpack.Unpacker(raw=False, use_list=False, strict_map_key=False,
                          max_buffer_size=max(len(blob), 1))
    up.feed(blob)
    out = []
    try:
        for e in up:
            if _well_formed(e):
                out.append(e)
    except Exception:     # noqa: BLE001 - msgpack raises a zoo of exception types on junk
        pass
    return out


# ---------------------------------------------------------------------------
# export


def args_of(event: tuple) -> dict:
    """An event's arguments as a dict (raw values)."""
    keys, values = event[5], event[6]
    return dict(values) if keys is None else dict(zip(keys, values))


def _fmt_args(event: tuple) -> dict:
    out = {}
    for k, v in args_of(event).items():
        if v is None:
            continue
        if type(v) is int:
            if k in _HEX_ARGS:
                v = f"0x{v:x}"
            elif k in _BDF_ARGS and 0 <= v <= 0xFFFF:
                v = rid_str(v)
            elif k == "origin":
                v = describe(v)
        out[k] = v
    return out


def to_chrome(dumps: Iterable[dict], meta: dict | None = None) -> dict:
    """Merge per-process dumps (``{"process", "events", "dropped"}``, in track order) into one
    Chrome trace-event document (the JSON object form, ``traceEvents`` array).

    Each process is a pid (1, 2, ... in the order given) with one thread (tid = pid).  A hop
    of an interrupt becomes a complete slice ("X", named by the hop) and a flow event inside
    it; the flow events of one interrupt are re-phased by time ("s" the first, "f" the last,
    "t" between), so every exported flow has exactly one start and one end even when some hop
    was not recorded.  An interrupt with a single recorded hop has no flow (just its slice).
    ``otherData`` says how many flows lacked their recorded start or end."""
    dumps = list(dumps)
    t0 = min((e[0] for d in dumps for e in d["events"]), default=0)

    # the hops of every flow, across processes, by time
    hops: dict[int, list[tuple[int, int, int]]] = {}
    for p, d in enumerate(dumps):
        for j, e in enumerate(d["events"]):
            if e[1] != "i":
                hops.setdefault(e[4] or 0, []).append((e[0], p, j))
    phase_of: dict[tuple[int, int], str] = {}
    no_start = no_end = single = 0
    for fid, hs in hops.items():
        hs.sort()
        recorded = [dumps[p]["events"][j][1] for _, p, j in hs]
        if "s" not in recorded:
            no_start += 1
        if "f" not in recorded:
            no_end += 1
        if len(hs) == 1:
            single += 1
            continue
        for k, (_, p, j) in enumerate(hs):
            phase_of[(p, j)] = "s" if k == 0 else "f" if k == len(hs) - 1 else "t"

    events: list[dict] = []
    for p, d in enumerate(dumps):
        pid = p + 1
        name = d["process"]
        events.append({"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": pid, "args": {"name": name}})
        events.append({"name": "process_sort_index", "ph": "M", "ts": 0, "pid": pid, "tid": pid,
                       "args": {"sort_index": pid}})
        events.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": pid, "args": {"name": name}})
        evs = d["events"]
        order = sorted(range(len(evs)), key=lambda j: evs[j][0])
        for n, j in enumerate(order):
            e = evs[j]
            t_ns, phase, ename, cat, fid = e[0], e[1], e[2], e[3], e[4] or 0
            ts = (t_ns - t0) / 1000.0             # microseconds
            if phase == "i":
                events.append({"name": ename, "cat": cat, "ph": "i", "s": "t", "ts": ts, "pid": pid, "tid": pid,
                               "args": _fmt_args(e)})
                continue
            # a hop: a slice that ends before the next event of this track begins (slices on one
            # track must nest), and the flow event in its middle, bound to it
            nxt = evs[order[n + 1]][0] if n + 1 < len(order) else t_ns + SLICE_NS + 1
            # 1 ns short of the next event: in microseconds (floats) ts + dur could round past it
            # when events are under SLICE_NS apart (a coalesced batch)
            dur = max(min(SLICE_NS, nxt - t_ns - 1), 0)
            sargs = _fmt_args(e)
            sargs["flow"] = f"0x{fid:x}"
            events.append({"name": ename, "cat": cat, "ph": "X", "ts": ts, "dur": dur / 1000.0,
                           "pid": pid, "tid": pid, "args": sargs})
            fph = phase_of.get((p, j))
            if fph is not None:
                events.append({"name": FLOW_NAME, "cat": FLOW_CAT, "ph": fph, "id": fid,
                               "ts": (t_ns + dur // 2 - t0) / 1000.0, "pid": pid, "tid": pid, "bp": "e"})
        if d.get("dropped"):
            events.append({"name": f"trace buffer full: {d['dropped']} events dropped", "cat": "trace",
                           "ph": "i", "s": "p", "ts": (max((e[0] for e in evs), default=t0) - t0) / 1000.0,
                           "pid": pid, "tid": pid, "args": {"dropped": d["dropped"]}})
    flows = len(hops) - single
    other = {"generator": "irqlab", "clock": "CLOCK_MONOTONIC", "t0_ns": t0,
             "processes": [d["process"] for d in dumps],
             "events": {d["process"]: len(d["events"]) for d in dumps},
             "dropped": {d["process"]: d.get("dropped", 0) for d in dumps},
             "malformed": {d["process"]: d.get("malformed", 0) for d in dumps},
             "flows": flows, "single_hop_interrupts": single,
             "flows_without_recorded_start": no_start, "flows_without_recorded_end": no_end}
    if meta:
        other.update(meta)
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": other}

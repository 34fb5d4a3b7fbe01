"""The host's workload: ring doorbells on every bound engine function and count
what comes back.

Closed loop per function: ``inflight`` doorbells are outstanding at any time;
each completion the interrupt handler consumes rings the next one, until
``per_function`` work items have completed.  With a ``rate`` (work items per
second per function) doorbells are paced instead: the shell calls ``tick(now)``
from a timer, which rings what is due, never more than ``inflight`` outstanding.
With an instance's ``burst``
above 1 (``EngineInstance.set_burst``, which the shell awaits first) the engine
raises each completion's interrupt that many times (IRQ_BURST, the device's
interrupt generator): a run then waits for ``burst`` interrupts per work item,
and measures interrupt delivery with one doorbell per ``burst`` interrupts.
Pure and synchronous; the shell awaits ``done``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from guest.drivers.engine import EngineInstance

HIST_LOWEST_NS = 1_000
HIST_HIGHEST_NS = 60_000_000_000
HIST_DIGITS = 3


def histogram(values_ns: list[int]) -> HdrHistogram:
    h = HdrHistogram(HIST_LOWEST_NS, HIST_HIGHEST_NS, HIST_DIGITS)
    for v in values_ns:
        h.record_value(min(max(v, HIST_LOWEST_NS), HIST_HIGHEST_NS))
    return h


def latency_summary(h: HdrHistogram) -> dict:
    if h.get_total_count() == 0:
        return {"count": 0, "p50_us": None, "p99_us": None, "p999_us": None, "max_us": None}
    return {"count": h.get_total_count(),
            "p50_us": h.get_value_at_percentile(50) / 1000,
            "p99_us": h.get_value_at_percentile(99) / 1000,
            "p999_us": h.get_value_at_percentile(99.9) / 1000,
            "max_us": h.get_max_value() / 1000}


@dataclass
class FunctionRun:
    inst: EngineInstance
    target: int
    inflight: int
    burst: int = 1           # interrupts per work item (IRQ_BURST in force)
    issued: int = 0
    done: int = 0
    lat_start: int = 0       # index into inst.latencies_ns where this run started
    arrivals_start: int = 0
    interrupts_start: int = 0
    t_first: int = 0
    t_last: int = 0
    next_due: int = 0        # paced runs: when the next doorbell is due (monotonic ns)


@dataclass
class Workload:
    runs: list[FunctionRun] = field(default_factory=list)
    t_start: int = 0
    on_finished: object = None
    finished: bool = False
    interval_ns: int = 0     # 0: closed loop; else one doorbell per interval per function
    on_quiet: object = None
    stopping: bool = False   # ring no more doorbells (the run is being stopped)

    @classmethod
    def start(cls, instances: list[EngineInstance], per_function: int, inflight: int,
              on_finished=None, rate: float = 0.0) -> "Workload":
        wl = cls(on_finished=on_finished, t_start=time.monotonic_ns(),
                 interval_ns=int(1e9 / rate) if rate > 0 else 0)
        for inst in instances:
            run = FunctionRun(inst, per_function, inflight, inst.burst, lat_start=len(inst.latencies_ns),
                              arrivals_start=inst.kernel.arrivals.get(inst.irq, 0),
                              interrupts_start=inst.interrupts)
            wl.runs.append(run)
            inst.on_complete = wl._completion_cb(run)
            inst.on_irq = wl._irq_cb(run)
            inst.on_remove = lambda inst, wl=wl: wl._check_finished()
        if wl.interval_ns:
            for run in wl.runs:
                run.next_due = wl.t_start
            wl.tick(wl.t_start)
        else:
            for run in wl.runs:
                for _ in range(min(run.inflight, run.target)):
                    wl._issue(run)
        wl._check_finished()
        return wl

    def tick(self, now: int) -> int:
        """Paced runs: ring every doorbell due by ``now``; returns when the next one is due."""
        nxt = now + self.interval_ns
        for run in self.runs:
            while (not self.stopping and not run.inst.removed and run.issued < run.target and run.next_due <= now
                   and run.issued - run.done < run.inflight):
                self._issue(run)
                run.next_due += self.interval_ns
            if run.issued < run.target:
                nxt = min(nxt, max(run.next_due, now + 1))
        return nxt

    def _completion_cb(self, run: FunctionRun):
        def on_complete(inst: EngineInstance, cookie: int) -> None:
            run.done += 1
            run.t_last = time.monotonic_ns()
            if run.issued < run.target and not self.interval_ns and not self.stopping:
                self._issue(run)
            elif run.done >= run.target:
                self._check_finished()
        return on_complete

    def _irq_cb(self, run: FunctionRun):
        def on_irq(inst: EngineInstance) -> None:
            if run.done >= run.target:
                self._check_finished()
            if self.on_quiet is not None and self.quiesced():
                self.on_quiet()
        return on_irq

    def quiesced(self) -> bool:
        """Nothing of this run is in flight: every doorbell rung has completed and interrupted
        (or its function is gone).  A stopped run waits for this so that the next run does not
        count its stragglers."""
        return all(r.inst.removed or (r.done >= r.issued and self._arrived(r) >= r.issued * r.burst)
                   for r in self.runs)

    @staticmethod
    def _arrived(run: FunctionRun) -> int:
        return run.inst.kernel.arrivals.get(run.inst.irq, 0) - run.arrivals_start

    def _issue(self, run: FunctionRun) -> None:
        if not run.t_first:
            run.t_first = time.monotonic_ns()
        run.inst.ring_doorbell(run.issued)
        run.issued += 1

    def _check_finished(self) -> None:
        # Finished when every record is consumed AND every interrupt announcing one has
        # arrived (records can be consumed by an earlier interrupt, ahead of their own).
        if not self.finished and all(r.inst.removed or (r.done >= r.target and self._arrived(r) >= r.target * r.burst)
                                     for r in self.runs):
            self.finished = True
            if self.on_finished:
                self.on_finished()

    def completed(self) -> int:
        return sum(r.done for r in self.runs)

    def detach(self) -> None:
        for r in self.runs:
            r.inst.on_complete = None
            r.inst.on_irq = None
            r.inst.on_remove = None

    def report(self) -> dict:
        """Per function: doorbells, interrupts, completions, ordering check, latency."""
        out = {}
        now = time.monotonic_ns()
        for r in self.runs:
            inst = r.inst
            lat = inst.latencies_ns[r.lat_start:]
            h = histogram(lat)
            span = ((r.t_last or now) - (r.t_first or now)) / 1e9
            out[inst.name] = {
                "rid": inst.dev.rid,
                "origin": inst.origin,
                "irq_mode": inst.irq_mode,
                "ims_error": inst.ims_error,
                "target": r.target,
                "burst": r.burst,
                "doorbells": r.issued,
                "completed": r.done,
                "interrupts": inst.kernel.arrivals.get(inst.irq, 0) - r.arrivals_start,
                "handled": inst.interrupts - r.interrupts_start,
                "record_missing": inst.record_missing,
                "removed": inst.removed,
                "breaches": inst.kernel.breach_irqs.get(inst.irq, 0),
                "rate_per_s": r.done * r.burst / span if span > 0 else None,   # interrupts/s
                "latency": latency_summary(h),
                # HdrHistogram.encode() is already base64 text (compressed V2 encoding)
                "hist": h.encode().decode() if h.get_total_count() else "",
            }
        return out

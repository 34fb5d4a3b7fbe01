"""fabric/trace.py: the recorder, the chunked dump, and ``to_chrome`` checked against the
trace-event format rules that Perfetto's JSON importer applies (``check_chrome_trace``,
also used by tests/integration/test_trace.py)."""

from __future__ import annotations

import json
import math

import pytest

from fabric import trace, wire
from fabric.bus import Platform
from fabric.trace import FLOW_CAT, FLOW_NAME, Tracer, args_of, flow_id, to_chrome, unpack_events

# ---------------------------------------------------------------------------------------------
# the validator


_PHASES = set("BEXiIstfMCbenNODPR")


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def check_chrome_trace(doc: dict) -> list[str]:
    """The trace-event format rules a viewer relies on; returns what is wrong (empty: valid).

    * the object form: ``traceEvents`` list, ``displayTimeUnit`` "ms" or "ns";
    * every event: ``name`` str, ``ph`` a known phase, ``ts`` a finite number >= 0 (µs),
      ``pid``/``tid`` ints; "X" has ``dur`` >= 0; "i" has scope ``s`` in t/p/g;
    * one ``process_name`` metadata event per pid that has events, and none for a pid without;
    * complete slices on one thread nest (no partial overlap);
    * flows (v1): each ``id`` has exactly one "s" and one "f", every event of it has the same
      ``cat`` and ``name`` (Perfetto keys v1 flows by (id, cat, name)), "s" <= "t"... <= "f" in
      time, "f" has ``bp`` "e"; each flow event lies inside a complete slice of its thread
      (the latest one begun at or before it) with no other event of that thread between the
      slice's start and it -- what Perfetto's importer binds it to.
    """
    bad: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["not an object with a traceEvents list"]
    if doc.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        bad.append(f"displayTimeUnit {doc['displayTimeUnit']!r}")
    names: dict[int, list[str]] = {}
    pids_with_events: set[int] = set()
    tracks: dict[tuple[int, int], list[dict]] = {}
    flows: dict[object, list[dict]] = {}
    for n, e in enumerate(doc["traceEvents"]):
        where = f"event {n} ({e.get('name')!r} ph={e.get('ph')!r})"
        if type(e.get("name")) is not str:
            bad.append(f"{where}: name is not a string")
        ph = e.get("ph")
        if type(ph) is not str or ph not in _PHASES:
            bad.append(f"{where}: unknown phase")
            continue
        if not _number(e.get("ts")) or e["ts"] < 0:
            bad.append(f"{where}: ts {e.get('ts')!r} is not a number >= 0")
            continue
        if type(e.get("pid")) is not int or type(e.get("tid")) is not int:
            bad.append(f"{where}: pid/tid {e.get('pid')!r}/{e.get('tid')!r} are not ints")
            continue
        if ph == "M":
            if e["name"] == "process_name":
                names.setdefault(e["pid"], []).append(e.get("args", {}).get("name"))
            continue
        pids_with_events.add(e["pid"])
        if ph != "i" or e.get("s", "t") == "t":      # process/global instants have tracks of their own
            tracks.setdefault((e["pid"], e["tid"]), []).append(e)
        if ph == "X" and (not _number(e.get("dur")) or e["dur"] < 0):
            bad.append(f"{where}: dur {e.get('dur')!r}")
        if ph == "i" and e.get("s", "t") not in ("t", "p", "g"):
            bad.append(f"{where}: instant scope {e.get('s')!r}")
        if ph in "stf":
            if type(e.get("id")) not in (int, str):
                bad.append(f"{where}: flow id {e.get('id')!r}")
                continue
            if type(e.get("cat")) is not str:
                bad.append(f"{where}: flow without a category")
            if ph == "f" and e.get("bp") != "e":
                bad.append(f"{where}: flow end without bp 'e' (it would bind to the next slice)")
            flows.setdefault(e["id"], []).append(e)
    for pid in pids_with_events:
        if len(names.get(pid, [])) != 1 or not isinstance(names[pid][0], str):
            bad.append(f"pid {pid}: {len(names.get(pid, []))} process_name metadata events, expected 1")
    for pid in set(names) - pids_with_events:
        bad.append(f"pid {pid} is named but has no events")
    for fid, evs in flows.items():
        kinds = [e["ph"] for e in evs]
        if kinds.count("s") != 1 or kinds.count("f") != 1:
            bad.append(f"flow {fid}: {kinds.count('s')} starts and {kinds.count('f')} ends")
            continue
        if len({(e.get("cat"), e["name"]) for e in evs}) != 1:
            bad.append(f"flow {fid}: events differ in cat/name {sorted({(e.get('cat'), e['name']) for e in evs})}")
        s = next(e for e in evs if e["ph"] == "s")
        f = next(e for e in evs if e["ph"] == "f")
        if any(not s["ts"] <= e["ts"] <= f["ts"] for e in evs):
            bad.append(f"flow {fid}: a step outside [start, end]")
    for (pid, tid), evs in tracks.items():
        evs.sort(key=lambda e: e["ts"])
        open_end: list[float] = []
        current = None               # the latest slice begun
        since = 0                    # events of the track after it began
        for e in evs:
            if e["ph"] == "X":
                while open_end and open_end[-1] <= e["ts"]:
                    open_end.pop()
                end = e["ts"] + e["dur"]
                if open_end and end > open_end[-1]:
                    bad.append(f"pid {pid}: slice {e['name']!r} at {e['ts']} overlaps its parent's end")
                open_end.append(end)
                current, since = e, 0
            elif e["ph"] in "stf":
                if current is None or not current["ts"] <= e["ts"] <= current["ts"] + current["dur"] or since:
                    bad.append(f"pid {pid}: flow event {e['id']} at {e['ts']} is not inside the slice before it")
            else:
                since += 1
    return bad


# ---------------------------------------------------------------------------------------------
# hand-built dumps


def _hop(t, ph, name, cat, fid, **args):
    return (t, ph, name, cat, fid, None, args)


def _inst(t, name, cat, **args):
    return (t, "i", name, cat, None, None, args)


def two_interrupts() -> list[dict]:
    """Interrupt A: device -> IR remap -> host handler (case 1).  Interrupt B: device -> IR remap
    -> host handler -> VMM inject -> fabric INJECT -> guest handler (case 2).  Times in ns."""
    t = 5_000_000
    a, b = flow_id(0x100, t), flow_id(0x101, t + 10)
    return [
        {"process": "d0", "dropped": 0, "events": [
            _inst(t - 3_000, "MWr32", "tlp", dir="rx", rid=0, key=0xE000_0000),
            _hop(t, "s", "interrupt MWr", "irq", a, origin=0x100, rid=0x100, addr=0xFEE0_0010, data=0),
            _hop(t + 10, "s", "interrupt MWr", "irq", b, origin=0x101, rid=0x101, addr=0xFEE0_0030, data=0)]},
        {"process": "fabric", "dropped": 0, "events": [
            _inst(t + 3_000, "MWr32", "tlp", src="d0", rid=0x100, key=0xFEE0_0010),
            _hop(t + 4_000, "t", "IR remap", "ir", a, sid=0x100, vector=0x21, irte=0),
            (t + 5_000, "i", "MWr32", "tlp", None, ("src", "rid", "key"), ("d0", 0x101, 0xFEE0_0030)),
            _hop(t + 5_300, "t", "IR remap", "ir", b, sid=0x101, vector=0x22, irte=1),
            _hop(t + 40_000, "t", "INJECT", "irq", b, vm="g1", apic=0, vector=0x21)]},
        {"process": "host", "dropped": 0, "events": [
            _hop(t + 20_000, "f", "IRQ handler", "irq", a, apic=0, vector=0x21),
            _hop(t + 30_000, "t", "IRQ handler", "irq", b, apic=0, vector=0x22),
            _hop(t + 30_400, "t", "inject g1 vector 0x21", "irq", b, vcpu=0)]},
        {"process": "g1", "dropped": 0, "events": [
            _hop(t + 60_000, "f", "IRQ handler", "irq", b, apic=0, vector=0x21)]},
    ]


def _flows(doc: dict) -> dict:
    out: dict = {}
    for e in doc["traceEvents"]:
        if e["ph"] in "stf":
            out.setdefault(e["id"], []).append(e)
    return {k: sorted(v, key=lambda e: e["ts"]) for k, v in out.items()}


def _pid_names(doc: dict) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
            if e["ph"] == "M" and e["name"] == "process_name"}


def test_to_chrome_is_valid_trace_event_json():
    doc = to_chrome(two_interrupts())
    assert check_chrome_trace(doc) == []
    assert doc["displayTimeUnit"] == "ns"
    assert json.loads(json.dumps(doc)) == doc          # plain JSON, nothing Python-only


def test_one_track_per_process_named_and_ordered():
    doc = to_chrome(two_interrupts())
    assert _pid_names(doc) == {1: "d0", 2: "fabric", 3: "host", 4: "g1"}
    sort = {e["pid"]: e["args"]["sort_index"] for e in doc["traceEvents"] if e["name"] == "process_sort_index"}
    assert sort == {1: 1, 2: 2, 3: 3, 4: 4}
    assert all(e["tid"] == e["pid"] for e in doc["traceEvents"])


def test_one_flow_per_interrupt_across_processes():
    doc = to_chrome(two_interrupts())
    flows = _flows(doc)
    names = _pid_names(doc)
    assert len(flows) == 2 and doc["otherData"]["flows"] == 2
    paths = sorted([names[e["pid"]] for e in evs] for evs in flows.values())
    assert paths == [["d0", "fabric", "host"], ["d0", "fabric", "host", "host", "fabric", "g1"]]
    for evs in flows.values():
        assert [e["ph"] for e in evs] == ["s"] + ["t"] * (len(evs) - 2) + ["f"]
        assert {(e["name"], e["cat"]) for e in evs} == {(FLOW_NAME, FLOW_CAT)}
        assert all(e["bp"] == "e" for e in evs)


def test_timestamps_are_microseconds_from_the_first_event():
    doc = to_chrome(two_interrupts())
    first = min(e["ts"] for e in doc["traceEvents"] if e["ph"] != "M")
    assert first == 0.0
    remap = next(e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"] == "IR remap")
    assert remap["ts"] == pytest.approx((4_000 + 3_000) / 1000)        # t+4000 ns, t0 = t-3000 ns
    assert doc["otherData"]["t0_ns"] == 5_000_000 - 3_000


def test_each_flow_event_sits_inside_its_own_hop_slice():
    doc = to_chrome(two_interrupts())
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    for fe in (e for e in doc["traceEvents"] if e["ph"] in "stf"):
        hosts = [x for x in xs if x["pid"] == fe["pid"] and x["ts"] <= fe["ts"] <= x["ts"] + x["dur"]]
        assert len(hosts) == 1, (fe, hosts)
        assert hosts[0]["args"]["flow"] == f"0x{fe['id']:x}"


def test_dense_events_get_slices_that_never_overlap():
    fid = [flow_id(0x100, i) for i in range(50)]
    events = []
    for i in range(50):               # a hop every 300 ns, an instant 100 ns after each
        events.append(_hop(1_000 + i * 300, "s", "interrupt MWr", "irq", fid[i]))
        events.append(_inst(1_100 + i * 300, "MWr32", "tlp"))
    ends = [_hop(1_000_000 + i * 1000, "f", "IRQ handler", "irq", fid[i]) for i in range(50)]
    doc = to_chrome([{"process": "d0", "events": events, "dropped": 0},
                     {"process": "host", "events": ends, "dropped": 0}])
    assert check_chrome_trace(doc) == []
    d0 = [e for e in doc["traceEvents"] if e["pid"] == 1 and e["ph"] == "X"]
    assert all(x["dur"] == pytest.approx(0.099) for x in d0)       # cut 1 ns short of the next instant
    assert len(_flows(doc)) == 50


def test_dense_slices_far_from_t0_never_round_past_the_next_event():
    """Microsecond floats: ts + dur of a slice cut at the next event must not pass it, however
    far from t0 (a coalesced batch in a long run: the fabric's hops 50-300 ns apart)."""
    import random
    rng = random.Random(5)
    events, ends = [], []
    t = 490_883_578_123
    for i in range(2000):
        t += rng.randrange(1, 400)
        events.append(_hop(t, "t", "IR posted" if i % 2 else "coalesced in PIR", "ir", flow_id(0x100, i)))
        ends.append(_hop(t + 10_000_000, "f", "IRQ handler", "irq", flow_id(0x100, i)))
    starts = [_hop(1_000 + i, "s", "interrupt MWr", "irq", flow_id(0x100, i)) for i in range(2000)]
    doc = to_chrome([{"process": "d0", "events": starts, "dropped": 0},
                     {"process": "fabric", "events": events, "dropped": 0},
                     {"process": "g1", "events": ends, "dropped": 0}])
    assert check_chrome_trace(doc) == []


def test_args_are_formatted_the_way_engineers_read_them():
    doc = to_chrome(two_interrupts())
    mwr = next(e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"] == "interrupt MWr")
    assert mwr["args"]["rid"] == "01:00.0" and mwr["args"]["addr"] == "0xfee00010"
    assert mwr["args"]["origin"] == "01:00.0" and mwr["args"]["data"] == "0x0"
    remap = next(e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"] == "IR remap")
    assert remap["args"]["sid"] == "01:00.0" and remap["args"]["vector"] == "0x21"
    assert remap["args"]["irte"] == 0
    tlps = [e for e in doc["traceEvents"] if e["ph"] == "i" and e["pid"] == 2]
    assert tlps[0]["args"] == {"src": "d0", "rid": "01:00.0", "key": "0xfee00010"} and tlps[0]["s"] == "t"
    assert tlps[1]["args"] == {"src": "d0", "rid": "01:00.1", "key": "0xfee00030"}   # the rec() form
    tr = Tracer("x", on=True)
    tr.rec("i", "MWr32", "tlp", None, ("rid", "pasid", "origin"), 0x105, None, (1 << 32) | 2 << 16 | 0x100)
    ev = next(e for e in to_chrome([tr.dump()])["traceEvents"] if e["ph"] == "i")
    assert ev["args"] == {"rid": "01:00.5", "origin": "01:00.0 ADI 2"}                  # None left out


def test_hops_are_rephased_by_time_when_the_start_was_not_recorded():
    dumps = two_interrupts()
    dumps = [d for d in dumps if d["process"] != "d0"]            # the device's trace is missing
    doc = to_chrome(dumps)
    assert check_chrome_trace(doc) == []
    other = doc["otherData"]
    assert other["flows"] == 2 and other["flows_without_recorded_start"] == 2
    names = _pid_names(doc)
    for evs in _flows(doc).values():
        assert names[evs[0]["pid"]] == "fabric" and evs[0]["ph"] == "s"


def test_an_interrupt_seen_by_one_process_only_has_a_slice_but_no_flow():
    fid = flow_id(0x100, 7)
    doc = to_chrome([{"process": "fabric", "dropped": 0,
                      "events": [_hop(7, "t", "IR remap", "ir", fid)]}])
    assert check_chrome_trace(doc) == []
    assert _flows(doc) == {}
    assert [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"] == ["IR remap"]
    assert doc["otherData"]["single_hop_interrupts"] == 1 and doc["otherData"]["flows"] == 0


def test_an_unfinished_flow_ends_at_its_last_recorded_hop():
    dumps = two_interrupts()
    dumps = [d for d in dumps if d["process"] != "g1"]            # the guest died: no end for B
    doc = to_chrome(dumps)
    assert check_chrome_trace(doc) == []
    assert doc["otherData"]["flows_without_recorded_end"] == 1
    ends = [evs[-1] for evs in _flows(doc).values()]
    assert sorted(_pid_names(doc)[e["pid"]] for e in ends) == ["fabric", "host"]


def test_dropped_events_are_reported_in_the_trace():
    dumps = two_interrupts()
    dumps[1]["dropped"] = 17
    doc = to_chrome(dumps)
    assert check_chrome_trace(doc) == []
    note = [e for e in doc["traceEvents"] if e["pid"] == 2 and e["ph"] == "i" and e.get("s") == "p"]
    assert len(note) == 1 and "17 events dropped" in note[0]["name"]
    assert doc["otherData"]["dropped"]["fabric"] == 17


def test_the_validator_catches_what_perfetto_would_not_bind():
    doc = to_chrome(two_interrupts())
    # a flow end without bp: Perfetto would bind it to the next slice instead
    f = next(e for e in doc["traceEvents"] if e["ph"] == "f")
    del f["bp"]
    assert any("bp" in p for p in check_chrome_trace(doc))
    # a flow whose events differ in name: Perfetto would see two flows
    doc = to_chrome(two_interrupts())
    next(e for e in doc["traceEvents"] if e["ph"] == "t")["name"] = "other"
    assert any("differ" in p for p in check_chrome_trace(doc))
    # a flow event outside any slice
    doc = to_chrome(two_interrupts())
    next(e for e in doc["traceEvents"] if e["ph"] == "s")["ts"] += 50
    assert any("not inside" in p for p in check_chrome_trace(doc))
    # two process names for one pid, ts in the wrong type
    doc = to_chrome(two_interrupts())
    doc["traceEvents"].append({"name": "process_name", "ph": "M", "ts": 0, "pid": 1, "tid": 1,
                               "args": {"name": "again"}})
    doc["traceEvents"].append({"name": "x", "ph": "i", "s": "t", "ts": "1", "pid": 1, "tid": 1})
    problems = check_chrome_trace(doc)
    assert any("process_name" in p for p in problems) and any("ts" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# the recorder and the chunked dump


def test_flow_id_is_stable_48_bit_and_tells_interrupts_apart():
    assert flow_id(0x100, 123) == flow_id(0x100, 123)
    ids = {flow_id(o, t) for o in (0x100, 0x101, (1 << 32) | 0x100) for t in range(1000, 1100)}
    assert len(ids) == 300
    assert all(0 <= i < 1 << 48 for i in ids)          # exact in a JSON reader's double
    assert flow_id(None, 5) == flow_id(0, 5)


def test_tracer_is_bounded_and_counts_what_it_dropped():
    tr = Tracer("d0", limit=3)
    for i in range(5):
        tr.instant("MWr32", "tlp", key=i)
    assert len(tr.events) == 3 and tr.dropped == 2
    tr.flow("s", "interrupt MWr", "irq", 9)
    assert tr.dropped == 3
    d = tr.dump()
    assert d["dropped"] == 3 and [args_of(e)["key"] for e in d["events"]] == [0, 1, 2]
    assert tr.on is False


def test_start_clears_and_records_and_checks_its_limit():
    tr = Tracer("g1")
    tr.instant("x", "tlp")
    assert tr.start(max_events=10) == {"process": "g1", "max_events": 10}
    assert tr.on and tr.events == [] and tr.dropped == 0
    with pytest.raises(ValueError):
        tr.start(max_events=0)


def test_requested_reads_the_launchers_environment_variable():
    assert trace.requested({trace.ENV: "1"})
    assert not trace.requested({trace.ENV: "0"}) and not trace.requested({})


@pytest.mark.parametrize("role", ["device", "guest", "host", "fabric"])
def test_a_dump_comes_back_whole_in_frames_the_fabric_accepts(role):
    tr = Tracer("p")
    tr.start()
    for i in range(3000):
        tr.rec("i", "MWr32", "tlp", None, ("src", "rid", "key"), "g1", 0x101, 0xE000_0000 + i * 4)
        tr.flow("t", "IR remap", "ir", flow_id(0x101, i), sid=0x101, addr=0xFEE0_0000, data=i, vector=0x21)
    limit = wire.MAX_DATA_FRAME if role in ("device", "guest") else wire.MAX_CONTROL_FRAME
    got, offset, frames = [], 0, 0
    while True:
        chunk = tr.dump_chunk(offset, trace.chunk_budget(role))
        frame = wire.ctl_rep(123456, True, chunk)     # what the process sends
        assert len(frame) <= limit, (len(frame), limit)
        chunk = wire.decode(frame)[3]                  # what the controller decodes
        got.extend(unpack_events(chunk["events"]))
        frames += 1
        assert chunk["count"] == chunk["next"] - offset > 0
        if chunk["next"] >= chunk["total"]:
            break
        offset = chunk["next"]
    assert not tr.on                                   # the first dump stopped recording
    assert got == tr.events
    assert (frames > 1) == (role in ("device", "guest"))


def test_a_lying_dump_loses_only_its_malformed_events():
    import msgpack
    pack = msgpack.Packer(use_bin_type=True).pack
    good = (5, "i", "MWr32", "tlp", None, ("rid",), (0x100,))
    hop = (6, "f", "IRQ handler", "irq", 77, None, {"apic": 0})
    bad = [(5, "x", "n", "c", None, None, {}),                  # unknown phase
           (5, "i", "n", "c", 3, None, {}),                     # an instant with a flow id
           (5, "s", "n", "c", None, None, {}),                  # a hop without one
           ("5", "i", "n", "c", None, None, {}),                # time not an int
           (5, "i", "n", "c", None, ("a", "b"), (1,)),          # keys and values differ
           (5, "i", "n", "c", None, None, {"a": [1, 2]}),       # a value that is not a scalar
           [1, 2, 3], "junk"]
    blob = b"".join(pack(e) for e in [good, *bad, hop]) + b"\xc1\xc1"   # and bytes no msgpack reads
    assert unpack_events(blob) == [good, hop]


def test_a_dump_past_the_end_is_empty_and_bad_offsets_are_refused():
    tr = Tracer("p")
    tr.start()
    tr.instant("x", "tlp")
    assert tr.dump_chunk(5)["count"] == 0
    with pytest.raises(ValueError):
        tr.dump_chunk(-1)


# ---------------------------------------------------------------------------------------------
# the real models, in memory: the fabric's and the host's recorders give one flow per interrupt


async def test_in_memory_machine_trace_has_a_flow_per_delivered_interrupt():
    from tests.unit.test_machine_inproc import boot
    net, host, _ = await boot(Platform(max_bus=2))
    net.fabric.tracer.start()
    host.tracer.start()
    res = await host.op_workload_run({"per_function": 40, "inflight": 4, "timeout_s": 30})
    delivered = sum(f["interrupts"] for f in res["functions"].values())
    assert delivered == 120
    doc = to_chrome([net.fabric.tracer.dump(), host.tracer.dump()])
    assert check_chrome_trace(doc) == []
    flows = _flows(doc)
    assert len(flows) == delivered                      # the device here is not traced: fabric -> host
    assert all([e["pid"] for e in evs] == [1, 2] for evs in flows.values())
    assert doc["otherData"]["flows_without_recorded_start"] == delivered
    names = {e["name"] for e in doc["traceEvents"] if e["ph"] in "Xi"}
    assert {"IR remap", "IRQ handler", "MWr32"} <= names


# ---------------------------------------------------------------------------------------------
# the launcher's collection, against processes that answer whatever they like


class _Proc:
    def __init__(self, returncode=None):
        self.returncode = returncode


def _lab_with(answers: dict):
    """A Lab (never started) whose processes answer ``trace.dump`` with ``answers[name](offset)``."""
    from irqlab.lab import Child, Lab, LabError
    from irqlab.pytest_plugin import irqlab_topology
    lab = Lab(irqlab_topology({"guest": [{"name": "g1", "assign": ["d0.vf0"]}]}))
    roles = {"d0": "device", "fabric": "fabric", "host": "host", "g1": "guest"}
    lab.children = {n: Child(n, r, _Proc(), "/dev/null") for n, r in roles.items()}

    async def call(peer, op, args=None, timeout=60.0):
        assert op == "trace.dump"
        res = answers[peer](args["offset"])
        if isinstance(res, Exception):
            raise res
        return res
    lab.call = call
    return lab, LabError


def _honest(n: int, budget: int = 200):
    tr = Tracer("p")
    tr.start()
    for i in range(n):
        tr.rec("i", "MWr32", "tlp", None, ("key",), i)
    return lambda offset: tr.dump_chunk(offset, budget)


async def test_collect_reads_every_process_in_chunks_in_track_order():
    lab, _ = _lab_with({"d0": _honest(100), "fabric": _honest(50, 1 << 20), "host": _honest(10, 1 << 20),
                        "g1": _honest(30)})
    col = await lab.trace_collect()
    assert [(d["process"], len(d["events"]), d["malformed"]) for d in col["dumps"]] == [
        ("d0", 100, 0), ("fabric", 50, 0), ("host", 10, 0), ("g1", 30, 0)]
    assert col["missing"] == {} and col["chunks"] > 4


async def test_collect_leaves_out_a_guest_that_lies_and_keeps_the_rest():
    endless = lambda offset: {"process": "g1", "events": b"", "count": 0, "offset": offset,   # noqa: E731
                              "next": offset, "total": 10**9, "dropped": 0}
    for lie, why in ((endless, "no progress"),
                     (lambda offset: {"events": "not bytes"}, "not a trace chunk"),
                     (lambda offset: [1, 2], "not a trace chunk")):
        lab, _ = _lab_with({"d0": _honest(5), "fabric": _honest(5), "host": _honest(5), "g1": lie})
        col = await lab.trace_collect()
        assert [d["process"] for d in col["dumps"]] == ["d0", "fabric", "host"]
        assert why in col["missing"]["g1"], col["missing"]


async def test_collect_bounds_what_a_process_may_claim_to_hold(monkeypatch):
    import fabric.trace as ft
    monkeypatch.setattr(ft, "MAX_EVENTS", 1000)          # the bound, when trace_start set none
    tr = Tracer("g1")
    tr.start()
    for _ in range(10):
        tr.rec("i", "x", "tlp", None, ())
    # the same 10 events again and again, "next" always moving, "total" never reached
    growing = lambda offset: {**tr.dump_chunk(0, 1 << 20), "next": offset + 10, "total": 10**12}  # noqa: E731
    lab, _ = _lab_with({"d0": _honest(5), "fabric": _honest(5), "host": _honest(5), "g1": growing})
    col = await lab.trace_collect()
    assert "more than the 1,000 events" in col["missing"]["g1"], col["missing"]
    assert [d["process"] for d in col["dumps"]] == ["d0", "fabric", "host"]


async def test_collect_fails_loudly_when_the_fabric_or_host_cannot_answer():
    for who in ("fabric", "host"):
        answers = {"d0": _honest(5), "fabric": _honest(5), "host": _honest(5), "g1": _honest(5)}
        lab, LabError = _lab_with(answers)
        answers[who] = lambda offset, LabError=LabError: LabError("no answer from it")
        with pytest.raises(LabError, match="no answer"):
            await lab.trace_collect()

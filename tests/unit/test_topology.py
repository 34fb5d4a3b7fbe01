"""irqlab.topology: the default, round trips, one-line errors, buses, names, assignments."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irqlab import topology as T
from irqlab.topology import (
    Device,
    Guest,
    Platform,
    Topology,
    TopologyError,
    Workload,
    bus_span,
    load,
    loads,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "topology.md"

D0 = '[[device]]\nname = "d0"\n'


def err(text: str, source: str = "topo.toml") -> str:
    """The message ``loads(text)`` fails with (and check it is one line)."""
    with pytest.raises(TopologyError) as info:
        loads(text, source)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{source}: ")
    return msg


def dict_err(d: Any) -> str:
    with pytest.raises(TopologyError) as info:
        Topology.from_dict(d)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# The built-in default


def test_default_loads() -> None:
    t = load(None)
    assert t.name == "default" and t.source == "<default>" and t.transport == "ipc"
    assert t.platform == Platform()
    assert t.devices == (Device(name="d0", kind="sriov", total_vfs=4, vfs=2, pf_vectors=8,
                                vf_vectors=4, bus=1),)
    # Two VMs, one VF each (case 2); the host keeps the PF (case 1).
    assert t.guests == (Guest(name="g1", cpus=2, memory_mib=16, cpuid="kvm", assign=("d0.vf0",)),
                        Guest(name="g2", cpus=1, memory_mib=16, cpuid="kvm", assign=("d0.vf1",)))
    assert [t.delivery(g) for g in t.guests] == ["injection", "injection"]   # no posted interrupts
    assert [g.kernel for g in t.guests] == ["modern", "modern"]
    assert [g.irq for g in t.guests] == ["msix", "msix"]
    assert t.workload == Workload(per_function=10000, inflight=8)
    # PF + 2 VFs, 10,000 each
    assert (1 + t.device("d0").vfs) * t.workload.per_function == 30_000
    # Every enabled VF is assigned, none twice.
    assigned = [a for g in t.guests for a in g.assign]
    assert sorted(assigned) == [f"d0.vf{i}" for i in range(t.device("d0").vfs)]


# What the default file states beyond the built-in defaults: its two guests and a longer run.
DEFAULT_EXTRAS = ('[[guest]]\nname = "g1"\ncpus = 2\nassign = ["d0.vf0"]\n'
                  '[[guest]]\nname = "g2"\nassign = ["d0.vf1"]\n'
                  '[workload]\nper_function = 10000\n')


def test_default_file_states_every_default() -> None:
    # Parsing the default file explicitly vs. an almost empty one gives the same topology:
    # apart from the guests and per_function (noted in its header), it states only defaults.
    assert load(None) == loads('name = "default"\n' + D0 + DEFAULT_EXTRAS, "<default>")
    assert Workload().per_function != load(None).workload.per_function


def test_device_and_guest_lookup() -> None:
    t = loads(D0 + '[[guest]]\nname = "g1"\n', "x.toml")
    assert t.device("d0").name == "d0" and t.guest("g1").name == "g1"
    with pytest.raises(KeyError):
        t.device("d1")
    with pytest.raises(KeyError):
        t.guest("d0")


def test_rids() -> None:
    d = load(None).device("d0")
    assert d.buses == 1 and d.bus_range == (1, 1)
    assert d.pf_rid == 0x0100
    assert [d.vf_rid(i) for i in range(4)] == [0x0101, 0x0102, 0x0103, 0x0104]
    with pytest.raises(IndexError):
        d.vf_rid(4)
    with pytest.raises(ValueError):
        _ = Device(name="x").pf_rid


# ---------------------------------------------------------------------------------------------
# Round trips


FULL = """
name = "full"
transport = "tcp"
[platform]
ir = true
ir_entries = 256
cpus = 4
memory_mib = 128
posted = true
pasid_ir = true
pasid_interrupts = false
[[device]]
name = "nic"
total_vfs = 8
vfs = 3
bus = 5
[[device]]
name = "dsa"
kind = "siov"
total_vfs = 0
vfs = 0
adis = 4
ims = "memory"
pasid_interrupts = false
[[guest]]
name = "g1"
cpus = 2
assign = ["nic.vf0", "dsa.adi3"]
cpuid = "oldkvm"
kernel = "legacy2020"
behaviours = ["ims-redirect", "storm"]
[[guest]]
name = "g2"
assign = ["nic.vf2"]
[workload]
per_function = 0
inflight = 4096
rate = 1000
timeout_s = 0.5
"""


def test_full_file() -> None:
    t = loads(FULL, "full.toml")
    assert [(d.name, d.bus) for d in t.devices] == [("nic", 5), ("dsa", 1)]
    assert t.guests[0] == Guest(name="g1", cpus=2, memory_mib=16, cpuid="oldkvm",
                                assign=("nic.vf0", "dsa.adi3"), kernel="legacy2020",
                                behaviours=("ims-redirect", "storm"))
    assert t.delivery("g1") == t.delivery(t.guests[1]) == "posted"   # the platform has posted interrupts
    assert t.workload.rate == 1000.0 and isinstance(t.workload.rate, float)


@pytest.mark.parametrize("text", [FULL, "name = 'x'\n" + D0])
def test_to_dict_round_trip(text: str) -> None:
    t = loads(text, "a/b.toml")
    d = t.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Topology.from_dict(d, source=t.source) == t
    assert Topology.from_dict(json.loads(json.dumps(d)), source=t.source) == t


def test_to_dict_layout_is_the_file_layout() -> None:
    d = load(None).to_dict()
    assert list(d) == ["name", "transport", "platform", "device", "guest", "workload"]
    assert "source" not in d and d["device"][0]["bus"] == 1
    assert d["guest"] == [
        {"name": "g1", "cpus": 2, "memory_mib": 16, "cpuid": "kvm", "assign": ["d0.vf0"],
         "kernel": "modern", "behaviours": [], "irq": "msix"},
        {"name": "g2", "cpus": 1, "memory_mib": 16, "cpuid": "kvm", "assign": ["d0.vf1"],
         "kernel": "modern", "behaviours": [], "irq": "msix"},
    ]
    assert d["workload"] == {"per_function": 10000, "inflight": 8, "rate": 0.0, "timeout_s": 120.0, "burst": 1}


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    p = tmp_path / "my-lab.toml"
    p.write_text(D0)
    t = load(p)
    assert t.name == "my-lab" and t.source == str(p)
    assert Topology.from_dict({"device": [{"name": "d0"}]}).name == "dict"


# Valid topologies, generated: the round trip holds for all of them.

_names = st.lists(st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True), min_size=1,
                  max_size=6, unique=True)


@st.composite
def topologies(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(_names)
    ndev = draw(st.integers(1, len(names)))
    devices = []
    for n in names[:ndev]:
        kind = draw(st.sampled_from(["sriov", "siov"]))
        total = draw(st.integers(0, 64)) if kind == "sriov" else 0   # a siov device has ADIs, no VFs
        devices.append({
            "name": n, "kind": kind, "total_vfs": total, "vfs": draw(st.integers(0, total)),
            "pf_vectors": draw(st.integers(1, 2048)), "vf_vectors": draw(st.integers(1, 2048)),
            "adis": draw(st.integers(0, 64)) if kind == "siov" else 0,
            "ims": draw(st.sampled_from(["device", "memory"])),
            "pasid_interrupts": draw(st.booleans()),
            "irq_generator": draw(st.booleans()),
        })
        if kind == "siov":
            devices[-1].update(adi_ims_slots=draw(st.integers(0, 256)), vmm_emulation=draw(st.booleans()),
                               mangle=draw(st.booleans()))
        if draw(st.booleans()):
            devices[-1]["bus"] = draw(st.integers(1, 255))
    explicit = [d["bus"] for d in devices if "bus" in d]
    if len(set(explicit)) != len(explicit):         # keep explicit buses apart
        for d in devices:
            d.pop("bus", None)
    targets = [f"{d['name']}.vf{i}" for d in devices for i in range(d["vfs"])]
    targets += [f"{d['name']}.adi{i}" for d in devices for i in range(d["adis"])]
    chosen = draw(st.lists(st.sampled_from(targets), unique=True, max_size=6)) if targets else []
    guests = []
    for gi, n in enumerate(names[ndev:]):
        guests.append({
            "name": n, "cpus": draw(st.integers(1, 64)), "memory_mib": draw(st.integers(4, 4096)),
            "cpuid": draw(st.sampled_from(["kvm", "oldkvm", "hidden"])),
            "kernel": draw(st.sampled_from(["modern", "legacy2020"])),
            "assign": chosen[gi::len(names) - ndev],
            "behaviours": draw(st.lists(st.sampled_from(["storm", "malformed-frames", "spoof-identity"]),
                                        unique=True)),
        })
    ir = draw(st.booleans())
    posted = ir and draw(st.booleans())
    for g in guests:
        if draw(st.booleans()):
            g["delivery"] = draw(st.sampled_from(["posted", "injection"] if posted else ["injection"]))
    return {
        "name": draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF),
                             min_size=1, max_size=20).filter(lambda s: "\x7f" not in s)),
        "transport": draw(st.sampled_from(["ipc", "tcp"])),
        "platform": {"ir": ir, "ir_entries": 2 ** draw(st.integers(1, 16)),
                     "cpus": draw(st.integers(1, 64)), "memory_mib": draw(st.integers(4, 4096)),
                     "posted": posted, "pasid_ir": ir and draw(st.booleans()),
                     "pasid_interrupts": draw(st.booleans())},
        "device": devices,
        "guest": guests,
        "workload": {"per_function": draw(st.integers(0, 10**9)),
                     "inflight": draw(st.integers(1, 4096)),
                     "rate": draw(st.floats(0, 1e9)),
                     "timeout_s": draw(st.floats(1e-3, 1e6)),
                     "burst": draw(st.integers(1, 256)) if all(dv.get("irq_generator") for dv in devices) else 1},
    }


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_generated_round_trip(d: dict[str, Any]) -> None:
    t = Topology.from_dict(d, source="gen.toml")
    assert len({dv.bus for dv in t.devices}) == len(t.devices)
    back = t.to_dict()
    assert json.loads(json.dumps(back)) == back
    assert Topology.from_dict(back, source="gen.toml") == t


# ---------------------------------------------------------------------------------------------
# Interrupt delivery: posted by default where the platform has it, injection as the option


def test_delivery_defaults_to_the_platform() -> None:
    guests = '[[guest]]\nname = "g1"\n[[guest]]\nname = "g2"\ndelivery = "injection"\n'
    t = loads("[platform]\nposted = true\n" + D0 + guests, "p.toml")
    assert [t.delivery(g) for g in t.guests] == ["posted", "injection"]
    assert t.guest("g1").delivery is None            # unset: it follows the platform
    t = loads(D0 + guests, "p.toml")
    assert [t.delivery(g) for g in t.guests] == ["injection", "injection"]
    # unset stays unset in to_dict, so a topology built over another follows its platform
    d = t.to_dict()
    assert "delivery" not in d["guest"][0] and d["guest"][1]["delivery"] == "injection"
    d["platform"]["posted"] = True
    t = Topology.from_dict(d)
    assert [t.delivery(g) for g in t.guests] == ["posted", "injection"]


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line each, naming the file, the key path and the problem

BAD: list[tuple[str, str]] = [
    # ranges and relations
    ('[[device]]\nname = "d0"\ntotal_vfs = 4\nvfs = 9\n',
     "device[0].vfs: 9 exceeds device[0].total_vfs = 4"),
    (D0 + "vfs = -1\n", "device[0].vfs: -1 is less than the minimum 0"),
    (D0 + "total_vfs = 65\n", "device[0].total_vfs: 65 is out of range 0..64"),
    (D0 + "pf_vectors = 0\n", "device[0].pf_vectors: 0 is out of range 1..2048"),
    (D0 + "vf_vectors = 2049\n", "device[0].vf_vectors: 2049 is out of range 1..2048"),
    (D0 + "adis = 65\nkind = 'siov'\n", "device[0].adis: 65 is out of range 0..64"),
    (D0 + "adis = 2\n", "device[0].adis: 2 ADIs need kind = 'siov' (device[0].kind is 'sriov')"),
    ("[platform]\ncpus = 0\n" + D0, "platform.cpus: 0 is out of range 1..64"),
    ("[platform]\ncpus = 65\n" + D0, "platform.cpus: 65 is out of range 1..64"),
    ("[platform]\nmemory_mib = 3\n" + D0, "platform.memory_mib: 3 is out of range 4..4096"),
    ("[platform]\nir_entries = 1000\n" + D0,
     "platform.ir_entries: 1000 is not a power of two in 2..65536"),
    ("[platform]\nir_entries = 1\n" + D0,
     "platform.ir_entries: 1 is not a power of two in 2..65536"),
    ("[platform]\nir_entries = 131072\n" + D0,
     "platform.ir_entries: 131072 is not a power of two in 2..65536"),
    ("[platform]\nir = false\nposted = true\n" + D0,
     "platform.posted: posted interrupts need interrupt remapping (ir = true)"),
    ("[platform]\nir = false\npasid_ir = true\n" + D0,
     "platform.pasid_ir: PASID-checking IRTEs need interrupt remapping (ir = true)"),
    (D0 + "[workload]\nper_function = -1\n",
     "workload.per_function: -1 is less than the minimum 0"),
    (D0 + "[workload]\ninflight = 0\n", "workload.inflight: 0 is out of range 1..4096"),
    (D0 + "[workload]\ninflight = 4097\n", "workload.inflight: 4097 is out of range 1..4096"),
    (D0 + "[workload]\nrate = -0.5\n", "workload.rate: -0.5 is less than the minimum 0"),
    (D0 + "[workload]\nrate = nan\n", "workload.rate: nan is not a finite number"),
    (D0 + "[workload]\ntimeout_s = 0\n", "workload.timeout_s: 0 must be greater than 0"),
    (D0 + "[workload]\ntimeout_s = inf\n", "workload.timeout_s: inf is not a finite number"),
    (D0 + '[[guest]]\nname = "g1"\nmemory_mib = 5000\n',
     "guest[0].memory_mib: 5000 is out of range 4..4096"),
    # types (bool is not an integer, and an integer is not a bool)
    ("[platform]\ncpus = true\n" + D0, "platform.cpus: expected an integer, got boolean true"),
    ("[platform]\nir = 1\n" + D0,
     "platform.ir: expected a boolean (true or false), got integer 1"),
    (D0 + 'total_vfs = "4"\n', "device[0].total_vfs: expected an integer, got string '4'"),
    (D0 + "pf_vectors = 8.0\n", "device[0].pf_vectors: expected an integer, got float 8.0"),
    (D0 + "bus = false\n", "device[0].bus: expected an integer, got boolean false"),
    (D0 + "[workload]\nrate = true\n", "workload.rate: expected a number, got boolean true"),
    (D0 + "[workload]\nper_function = [1]\n",
     "workload.per_function: expected an integer, got an array"),
    ("[platform]\ncpus = 1979-05-27\n" + D0, "platform.cpus: expected an integer, got a date"),
    ("platform = 3\n" + D0, "platform: expected a table ([platform]), got integer 3"),
    ("workload = {rate = 'fast'}\n" + D0, "workload.rate: expected a number, got string 'fast'"),
    ("name = 3\n" + D0, "name: expected a string, got integer 3"),
    ('name = ""\n' + D0, "name: '' must be a non-empty single line"),
    ('name = "a\\nb"\n' + D0, "name: 'a\\nb' must be a non-empty single line"),
    (D0 + '[[guest]]\nname = "g1"\nassign = "d0.vf0"\n',
     "guest[0].assign: expected an array of strings, got string 'd0.vf0'"),
    (D0 + '[[guest]]\nname = "g1"\nassign = [1]\n',
     "guest[0].assign[0]: expected a string, got integer 1"),
    (D0 + '[[guest]]\nname = "g1"\nbehaviours = ["storm", ""]\n',
     "guest[0].behaviours[1]: '' must be a non-empty single line"),
    (D0 + '[[guest]]\nname = "g1"\nbehaviours = ["storm", "storm"]\n',
     "guest[0].behaviours[1]: 'storm' is listed twice (also guest[0].behaviours[0])"),
    (D0 + '[[guest]]\nname = "g1"\nbehaviours = ["strom"]\n',
     "guest[0].behaviours[0]: unknown behaviour 'strom' (did you mean 'storm'?)"),
    # choices
    ('transport = "icp"\n' + D0, "transport: 'icp' is not one of 'ipc', 'tcp' (did you mean 'ipc'?)"),
    (D0 + 'kind = "pci"\n', "device[0].kind: 'pci' is not one of 'sriov', 'siov'"),
    (D0 + 'kind = "sirov"\n',
     "device[0].kind: 'sirov' is not one of 'sriov', 'siov' (did you mean 'sriov'?)"),
    (D0 + 'ims = "mem"\n',
     "device[0].ims: 'mem' is not one of 'device', 'memory' (did you mean 'memory'?)"),
    (D0 + '[[guest]]\nname = "g1"\ncpuid = "kvmm"\n',
     "guest[0].cpuid: 'kvmm' is not one of 'kvm', 'oldkvm', 'hidden' (did you mean 'kvm'?)"),
    (D0 + '[[guest]]\nname = "g1"\ndelivery = "post"\n',
     "guest[0].delivery: 'post' is not one of 'posted', 'injection' (did you mean 'posted'?)"),
    (D0 + '[[guest]]\nname = "g1"\ndelivery = "posted"\n',
     "guest[0].delivery: 'posted' needs a platform with posted interrupts (platform.posted = true)"),
    ("[platform]\nposted = false\n" + D0 + '[[guest]]\nname = "g1"\n[[guest]]\nname = "g2"\n'
                                          'delivery = "posted"\n',
     "guest[1].delivery: 'posted' needs a platform with posted interrupts (platform.posted = true)"),
    (D0 + '[[guest]]\nname = "g1"\ndelivery = true\n',
     "guest[0].delivery: expected a string, got boolean true"),
    (D0 + '[[guest]]\nname = "g1"\nkernel = "legacy"\n',
     "guest[0].kernel: 'legacy' is not one of 'modern', 'legacy2020' (did you mean 'legacy2020'?)"),
    # unknown keys
    (D0 + "[workload]\nrat = 3\n", "workload.rat: unknown key 'rat' (did you mean 'rate'?)"),
    (D0 + "[workload]\nburst = 0\n", "workload.burst: 0 is out of range 1..256"),
    (D0 + "[workload]\nburst = 8\n", "workload.burst: 8 interrupts per work item need the interrupt "
                                      "generator on every device (irq_generator = true); device[0] (d0) "
                                      "does not have it"),
    (D0 + "[workload]\nburst = 257\n", "workload.burst: 257 is out of range 1..256"),
    ('[[devices]]\nname = "d0"\n', "devices: unknown key 'devices' (did you mean 'device'?)"),
    (D0 + "vf = 3\n", "device[0].vf: unknown key 'vf' (did you mean 'vfs'?)"),
    (D0 + '[[guest]]\nname = "g1"\nbehaviors = []\n',
     "guest[0].behaviors: unknown key 'behaviors' (did you mean 'behaviours'?)"),
    ("[platform]\nzzz = 1\n" + D0,
     "platform.zzz: unknown key 'zzz' (known keys: ir, ir_entries, cpus, memory_mib, posted, "
     "pasid_ir, pasid_interrupts, vmm_unsafe_ims, vm_frame_rate, vm_frame_burst, waste_penalty)"),
    ('[platform]\n"a b" = 1\n' + D0,
     'platform."a b": unknown key \'a b\' (known keys: ir, ir_entries, cpus, memory_mib, posted, '
     "pasid_ir, pasid_interrupts, vmm_unsafe_ims, vm_frame_rate, vm_frame_burst, waste_penalty)"),
    # required things and shape
    ("[[device]]\nvfs = 1\n", "device[0].name: required key is missing"),
    ('[[guest]]\nname = "g1"\n', "device: at least one [[device]] is required"),
    ("device = []\n", "device: at least one [[device]] is required"),
    ('[device]\nname = "d0"\n',
     "device: expected an array of tables ([[device]]), got a single table ([device])"),
    ("device = [1]\n", "device[0]: expected a table, got integer 1"),
    # names
    ('[[device]]\nname = "D0"\n',
     "device[0].name: 'D0' is not a valid name (a-z first, then up to 15 of a-z 0-9 _ -)"),
    ('[[device]]\nname = "0d"\n',
     "device[0].name: '0d' is not a valid name (a-z first, then up to 15 of a-z 0-9 _ -)"),
    ('[[device]]\nname = "abcdefghijklmnopq"\n',
     "device[0].name: 'abcdefghijklmnopq' is not a valid name (a-z first, then up to 15 of a-z "
     "0-9 _ -)"),
    (D0 + D0, "device[1].name: duplicate name 'd0' (already used by device[0])"),
    (D0 + '[[guest]]\nname = "d0"\n', "guest[0].name: duplicate name 'd0' (already used by device[0])"),
    (D0 + '[[guest]]\nname = "g"\n[[guest]]\nname = "g"\n',
     "guest[1].name: duplicate name 'g' (already used by guest[0])"),
    # buses
    (D0 + "bus = 0\n", "device[0].bus: 0 is out of range 1..255"),
    (D0 + "bus = 256\n", "device[0].bus: 256 is out of range 1..255"),
    (D0 + 'bus = 3\n[[device]]\nname = "d1"\nbus = 3\n',
     "device[1].bus: buses 3 overlap device[0] (d0, buses 3)"),
    # assignments
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d9.vf0"]\n',
     "guest[0].assign[0]: 'd9.vf0': no device named 'd9'"),
    ('[[device]]\nname = "nic"\n[[guest]]\nname = "g1"\nassign = ["nics.vf0"]\n',
     "guest[0].assign[0]: 'nics.vf0': no device named 'nics' (did you mean 'nic'?)"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["g1.vf0"]\n',
     "guest[0].assign[0]: 'g1.vf0': no device named 'g1'"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d0.vf2"]\n',
     "guest[0].assign[0]: 'd0.vf2': device[0] (d0) has vfs = 2, so vf0..vf1"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d0.vf99999999"]\n',
     "guest[0].assign[0]: 'd0.vf99999999': device[0] (d0) has vfs = 2, so vf0..vf1"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d0.adi0"]\n',
     "guest[0].assign[0]: 'd0.adi0': device[0] (d0) has adis = 0"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d0.pf"]\n',
     "guest[0].assign[0]: 'd0.pf' is not '<device>.vf<N>' or '<device>.adi<N>'"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d0.vf01"]\n',
     "guest[0].assign[0]: 'd0.vf01' is not '<device>.vf<N>' or '<device>.adi<N>'"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d0.vf1"]\n[[guest]]\nname = "g2"\n'
          'assign = ["d0.vf0", "d0.vf1"]\n',
     "guest[1].assign[1]: 'd0.vf1' is already assigned by guest[0].assign[0] (g1)"),
    (D0 + '[[guest]]\nname = "g1"\nassign = ["d0.vf1", "d0.vf1"]\n',
     "guest[0].assign[1]: 'd0.vf1' is listed twice (also guest[0].assign[0])"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] + f"#{i}"
                                                        for i, (_, m) in enumerate(BAD)])
def test_bad_input(text: str, message: str) -> None:
    assert err(text) == f"topo.toml: {message}"


def test_error_attributes() -> None:
    with pytest.raises(TopologyError) as info:
        loads(D0 + "vfs = 9\n", "x/topo.toml")
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.source, e.path, e.line, e.column) == ("x/topo.toml", "device[0].vfs", None, None)
    assert e.problem == "9 exceeds device[0].total_vfs = 4"


def test_long_values_are_shortened() -> None:
    msg = err(D0 + f'kind = "{"x" * 500}"\n')
    assert len(msg) < 150 and "...'" in msg


# ---------------------------------------------------------------------------------------------
# TOML syntax errors and files


@pytest.mark.parametrize(("text", "message"), [
    ('name = "x"\n\n[platform]\ncpus 2\n', "line 4, column 6: Expected '=' after a key in a "
                                           "key/value pair"),
    (D0 + 'name = "d1"\n', "line 3, column 12: Cannot overwrite a value"),
    ("a = [1,", "at end of file: Invalid value"),
])
def test_toml_syntax_error(text: str, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        loads(text, "topo.toml")
    assert str(info.value) == f"topo.toml: {message}"
    assert info.value.path == ""


def test_syntax_error_from_file(tmp_path: Path) -> None:
    p = tmp_path / "topo.toml"
    p.write_text("transport = 'ipc'\n[[device]]\nname = = 'd0'\n")
    with pytest.raises(TopologyError) as info:
        load(p)
    assert str(info.value) == f"{p}: line 3, column 8: Invalid value"
    assert (info.value.line, info.value.column) == (3, 8)


def test_file_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("topo.toml").write_text(D0 + "vfs = 9\n")
    with pytest.raises(TopologyError, match=r"^topo\.toml: device\[0\]\.vfs: 9 exceeds"):
        load("topo.toml")


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(TopologyError) as info:
        load(missing)
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"
    with pytest.raises(TopologyError, match=r": cannot read: Is a directory$"):
        load(tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(TopologyError) as info:
        load(latin)
    assert str(info.value) == f"{latin}: not UTF-8 text: byte 0xe9 at offset 11"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf" + D0.encode())
    assert load(p).device("d0").bus == 1


def test_from_dict_checks_like_a_file() -> None:
    assert dict_err([1]) == "<dict>: expected a table at the top level, got an array"
    assert dict_err({"device": [{"name": "d0", "vfs": True}]}) == (
        "<dict>: device[0].vfs: expected an integer, got boolean true")
    assert dict_err({1: 2}) == "<dict>: keys must be strings, got integer 1"
    assert dict_err({"device": [{"name": "d0", "bus": None}], "guest": [{"name": "g", "cpus": None}]}) == (
        "<dict>: guest[0].cpus: expected an integer, got null")
    # tuples are accepted where TOML has arrays
    t = Topology.from_dict({"device": ({"name": "d0"},), "guest": ({"name": "g", "assign": ("d0.vf0",)},)})
    assert t.guests[0].assign == ("d0.vf0",)


# Nothing but TopologyError ever comes out, for any text or any value at any key.

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_topology_or_one_line_error(text: str) -> None:
    try:
        loads(text, "fuzz.toml")
    except TopologyError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.toml: ")


_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.datetimes() | st.dates() | st.times(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_value_anywhere_gives_topology_or_one_line_error(data: st.DataObject) -> None:
    d = loads(FULL, "full.toml").to_dict()
    section = data.draw(st.sampled_from(["name", "transport", "platform", "device", "guest",
                                         "workload"]))
    if section in ("name", "transport"):
        d[section] = data.draw(_junk)
    else:
        table = d[section] if section in ("platform", "workload") else \
            d[section][data.draw(st.integers(0, len(d[section]) - 1))]
        key = data.draw(st.sampled_from(sorted(table)) | st.text(max_size=8))
        table[key] = data.draw(_junk)
    try:
        Topology.from_dict(d, source="full.toml")
    except TopologyError as e:
        assert "\n" not in str(e) and str(e).startswith("full.toml: ")


# ---------------------------------------------------------------------------------------------
# Buses


def test_bus_span() -> None:
    # PF at devfn 0, VF i at devfn 1+i: 255 VFs still fit one bus, 256 do not.
    assert [bus_span(n) for n in (0, 1, 64, 255, 256, 511, 512)] == [1, 1, 1, 1, 2, 2, 3]


def test_buses_auto_assigned_in_order() -> None:
    t = loads(D0 + '[[device]]\nname = "d1"\n[[device]]\nname = "d2"\n', "x.toml")
    assert [d.bus for d in t.devices] == [1, 2, 3]


def test_auto_assignment_skips_explicit_buses() -> None:
    t = loads('[[device]]\nname = "a"\n[[device]]\nname = "b"\nbus = 2\n'
              '[[device]]\nname = "c"\n[[device]]\nname = "d"\nbus = 255\n', "x.toml")
    assert [d.bus for d in t.devices] == [1, 2, 3, 255]


@pytest.fixture
def big_vfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift the total_vfs limit so a device's VF RIDs spill into the following buses."""
    monkeypatch.setitem(T._DEVICE_KEYS, "total_vfs", T._Int(0, 0xFFFF))


def test_auto_assignment_with_big_total_vfs_spanning_buses(big_vfs: None) -> None:
    t = loads('[[device]]\nname = "big"\ntotal_vfs = 600\n'       # RIDs 01:00.0 .. 03:0b.0
              '[[device]]\nname = "small"\n'
              '[[device]]\nname = "mid"\ntotal_vfs = 256\n', "x.toml")
    big, small, mid = t.devices
    assert big.buses == 3 and big.bus_range == (1, 3)
    assert big.vf_rid(599) == 0x0358 and big.vf_rid(599) >> 8 == 3
    assert small.bus_range == (4, 4)
    assert mid.bus_range == (5, 6)


def test_spanning_device_fits_around_explicit_bus(big_vfs: None) -> None:
    t = loads('[[device]]\nname = "big"\ntotal_vfs = 300\n'
              '[[device]]\nname = "pin"\nbus = 2\n'
              '[[device]]\nname = "one"\n', "x.toml")
    assert [d.bus_range for d in t.devices] == [(3, 4), (2, 2), (1, 1)]


def test_spanning_device_errors(big_vfs: None) -> None:
    assert err('[[device]]\nname = "big"\ntotal_vfs = 300\nbus = 255\n') == (
        "topo.toml: device[0].bus: 255: 300 VFs need buses 255..256, past the last bus 255")
    assert err('[[device]]\nname = "a"\nbus = 4\n[[device]]\nname = "b"\ntotal_vfs = 300\nbus = 3\n') == (
        "topo.toml: device[1].bus: buses 3..4 overlap device[0] (a, buses 4)")
    assert err('[[device]]\nname = "a"\nbus = 100\n[[device]]\nname = "b"\ntotal_vfs = 60000\n') == (
        "topo.toml: device[1]: no free range of 235 buses left at or below bus 255 for b")


def test_buses_must_fit_below_256() -> None:
    devs = [{"name": f"d{i}"} for i in range(255)]
    assert Topology.from_dict({"device": devs}).devices[-1].bus == 255
    assert dict_err({"device": devs + [{"name": "last"}]}) == (
        "<dict>: device[255]: no free range of 1 bus left at or below bus 255 for last")


# ---------------------------------------------------------------------------------------------
# The docs describe exactly the schema


def _doc_rows() -> dict[str, dict[str, str]]:
    """section -> key -> default cell, from the '## [section]' tables of docs/topology.md."""
    rows: dict[str, dict[str, str]] = {}
    section = None
    for line in DOCS.read_text().splitlines():
        m = re.match(r"^##+ .*`\[\[?(\w+)\]?\]`", line)
        if m:
            section = m.group(1)
            rows[section] = {}
            continue
        m = re.match(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", line)
        if m and section:
            rows[section][m.group(1)] = m.group(2).strip().strip("`")
    return rows


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, tuple):
        return "[]"
    if v is None:
        return "auto"
    return repr(v)


def test_docs_match_schema() -> None:
    rows = _doc_rows()
    for section, (cls, keys) in T.SCHEMA.items():
        assert set(rows.get(section, {})) == set(keys), section
        for f in dataclasses.fields(cls):
            want = "required" if f.default is dataclasses.MISSING else _toml_value(f.default)
            assert rows[section][f.name] == want, (section, f.name)


# ---------------------------------------------------------------------------------------------
# python -m irqlab.topology


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert T.main([]) == 0
    assert json.loads(capsys.readouterr().out) == load(None).to_dict()
    bad = tmp_path / "bad.toml"
    bad.write_text(D0 + "[workload]\nrat = 1\n")
    assert T.main([str(bad)]) == 1
    assert capsys.readouterr().err == f"{bad}: workload.rat: unknown key 'rat' (did you mean 'rate'?)\n"
    assert T.main(["a", "b"]) == 2

"""Topology files: what ``launch.py`` starts (platform, devices, guests, workload).

A topology is a TOML file read with the stdlib ``tomllib``, or the built-in
``irqlab/default_topology.toml`` when none is given::

    topo = load("topo.toml")        # or load(None) for the built-in default
    topo.device("d0").bus           # buses are resolved at load time

Every entry point returns a fully checked, frozen :class:`Topology` or raises
:class:`TopologyError`, whose ``str()`` is one line naming the file, the key
path and the problem::

    topo.toml: device[0].vfs: 9 exceeds device[0].total_vfs = 4
    topo.toml: line 3, column 7: Expected '=' after a key in a key/value pair
    topo.toml: workload.rat: unknown key 'rat' (did you mean 'rate'?)

Theory of operation
-------------------
*One schema, three readers.*  Each section's keys are a dict literal of small
checkers (``_PLATFORM_KEYS`` ...).  The defaults live on the dataclasses, the
ranges in the checkers, and ``docs/topology.md`` describes both; a unit test
keeps the docs' tables and the schema in step.  TOML text (``loads``), files
(``load``) and plain dicts (``Topology.from_dict``, which also reads back
``Topology.to_dict``) all go through the same ``_build``.

*Checking order.*  Unknown keys first (with a ``difflib`` suggestion), then each
key's type (``bool`` is never an integer, integers are accepted for floats,
``nan``/``inf`` are not), then its range, then the rules that relate keys:
``vfs <= total_vfs``, unique names, a guest's ``delivery`` against
``platform.posted``, bus ranges, assignment targets.  The first problem found
is the one reported.

*Interrupt delivery.*  ``platform.posted`` says the machine has posted
interrupts; each guest's ``delivery`` (``"posted"`` or ``"injection"``) says
how the host delivers its assigned functions' interrupts.  Left out, it stays
unset (so a topology merged over another follows its platform) and
``Topology.delivery(guest)`` gives ``"posted"`` on a platform that has it,
else ``"injection"``.

*Buses.*  Bus 0 is the root complex's.  A device's PF sits at devfn 0 of its
first bus and VF ``i`` (0-based) at routing ID ``PF + FIRST_VF_OFFSET + i *
VF_STRIDE`` (offset 1, stride 1), so a device owns ``bus_span(total_vfs)``
consecutive buses -- its port's secondary..subordinate range.  Devices with an
explicit ``bus`` claim theirs first; the rest get the lowest free range at or
above bus 1, in file order.  Every range must end at or below bus 255.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.resources
import json
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "Device",
    "FIRST_VF_OFFSET",
    "Guest",
    "LAST_BUS",
    "Platform",
    "Topology",
    "TopologyError",
    "VF_STRIDE",
    "Workload",
    "bus_span",
    "load",
    "loads",
]

FIRST_VF_OFFSET = 1     # SR-IOV First VF Offset: VF 0 is the PF's RID + 1
VF_STRIDE = 1           # SR-IOV VF Stride
FIRST_BUS = 1           # bus 0 belongs to the root complex
LAST_BUS = 255

DEFAULT_SOURCE = "<default>"
_DEFAULT_RESOURCE = "default_topology.toml"


# ---------------------------------------------------------------------------------------------
# The error


class TopologyError(ValueError):
    """A topology that cannot be used.  ``str(e)`` is the one line to show the user.

    Attributes: ``source`` (the file as given, or ``"<default>"``/``"<dict>"``),
    ``path`` (key path such as ``device[0].vfs``, ``""`` when none applies),
    ``problem``, and ``line``/``column`` for TOML syntax errors (else ``None``).
    """

    def __init__(self, source: str, path: str, problem: str,
                 line: int | None = None, column: int | None = None) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        self.line = line
        self.column = column
        where = [source]
        if line is not None:
            where.append(f"line {line}, column {column}")
        elif path:
            where.append(path)
        super().__init__(": ".join(where + [problem]))


class _Problem(Exception):
    """Raised inside the checkers; ``_build`` adds the source and makes a TopologyError."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Platform:
    """The machine: interrupt remapping, host CPUs (APIC IDs 0..cpus-1) and host RAM."""

    ir: bool = True
    ir_entries: int = 65536
    cpus: int = 2
    memory_mib: int = 64
    posted: bool = False            # posted-format IRTEs: interrupts of assigned functions go
                                    # straight to the vCPU's posted-interrupt descriptor
    pasid_ir: bool = False          # IRTEs can also check the request's PASID (not in real VT-d)
    pasid_interrupts: bool = True   # the root complex accepts PASID-tagged interrupt requests
    vmm_unsafe_ims: bool = False    # a naive VMM: composes for memory IMS even when nothing can
                                    # check the message's origin beyond the RID (row 4-unsafe)
    vm_frame_rate: int = 50_000     # frames/s each VM may send to the bus (0: no limit) ...
    vm_frame_burst: int = 2_048     # ... in bursts of this many; over it, its vCPU is throttled
    waste_penalty: int = 50         # frames charged for a store that rings a full work queue


@dataclass(frozen=True)
class Device:
    """One physical device process: a PF plus VFs (``sriov``) or ADIs (``siov``)."""

    name: str
    kind: str = "sriov"
    total_vfs: int = 4
    vfs: int = 2
    pf_vectors: int = 8
    vf_vectors: int = 4
    bus: int | None = None          # None only before resolution; a loaded Topology has ints
    adis: int = 0                   # siov: ADIs (default 4 for a siov device)
    adi_ims_slots: int = 8          # siov: device-kind IMS slots per ADI
    vmm_emulation: bool = True      # siov: the VMM has IMS emulation for this device (case 4)
    mangle: bool = False            # siov: the VMM hides the IMS capability from guests (Intel's path)
    pf_ims_slots: int = 0           # IMS slots (kind "device", in BAR0 page 1) on the PF
    vf_ims_slots: int = 0           # ... and on each VF
    ims: str = "device"             # which IMS kind drivers prefer: "device" (BAR slots) or "memory"
    pasid_interrupts: bool = True   # the device tags interrupt MWrs with the ADI's PASID
    irq_generator: bool = False     # the engines' IRQ_BURST works (a test feature: workload.burst)

    @property
    def buses(self) -> int:
        """How many consecutive buses the device's VF routing IDs need."""
        return bus_span(self.total_vfs)

    @property
    def bus_range(self) -> tuple[int, int]:
        """(secondary, subordinate): the bus range behind the device's port."""
        bus = self._resolved_bus()
        return bus, bus + self.buses - 1

    @property
    def pf_rid(self) -> int:
        """The PF's routing ID: devfn 0 on the device's first bus."""
        return self._resolved_bus() << 8

    def vf_rid(self, index: int) -> int:
        """Routing ID of VF ``index`` (0-based, ``0 <= index < total_vfs``)."""
        if not 0 <= index < self.total_vfs:
            raise IndexError(f"{self.name}: VF {index} out of range 0..{self.total_vfs - 1}")
        return self.pf_rid + FIRST_VF_OFFSET + index * VF_STRIDE

    def _resolved_bus(self) -> int:
        if self.bus is None:
            raise ValueError(f"{self.name}: bus not assigned (build it through load/from_dict)")
        return self.bus


@dataclass(frozen=True)
class Guest:
    """One VM process (``python -m guest``) and what the host gives it."""

    name: str
    cpus: int = 1
    memory_mib: int = 16
    cpuid: str = "kvm"
    assign: tuple[str, ...] = ()
    kernel: str = "modern"
    behaviours: tuple[str, ...] = ()
    irq: str = "msix"               # the engine driver's interrupt kind: "msix" or "ims"
    delivery: str | None = None     # "posted" or "injection"; None: the platform's default
                                    # (Topology.delivery(guest) resolves it)


#: the most interrupts a work item may raise (the engine's IRQ_BURST_MAX)
BURST_MAX = 256


@dataclass(frozen=True)
class Workload:
    """What every function does once the system is up."""

    per_function: int = 4000    # work items each PF/VF runs (an interrupt each, ``burst`` with it)
    inflight: int = 8           # doorbells outstanding per function
    rate: float = 0.0           # doorbells/s per function; 0 = as fast as possible
    timeout_s: float = 120.0    # the whole run's deadline
    burst: int = 1              # interrupts each work item raises (the engine's IRQ_BURST)


@dataclass(frozen=True)
class Topology:
    """A checked topology; build it with :func:`load`, :func:`loads` or :meth:`from_dict`."""

    name: str
    source: str
    transport: str = "ipc"
    platform: Platform = field(default_factory=Platform)
    devices: tuple[Device, ...] = ()
    guests: tuple[Guest, ...] = ()
    workload: Workload = field(default_factory=Workload)

    def device(self, name: str) -> Device:
        """The device called ``name``; KeyError if there is none."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"{self.source}: no device named {name!r}")

    def guest(self, name: str) -> Guest:
        """The guest called ``name``; KeyError if there is none."""
        for g in self.guests:
            if g.name == name:
                return g
        raise KeyError(f"{self.source}: no guest named {name!r}")

    def delivery(self, guest: "Guest | str") -> str:
        """How the host delivers ``guest``'s interrupts: its ``delivery``, or by default
        ``"posted"`` on a platform with posted interrupts, else ``"injection"``."""
        g = self.guest(guest) if isinstance(guest, str) else guest
        if g.delivery is not None:
            return g.delivery
        return "posted" if self.platform.posted else "injection"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able (and TOML-able) dict in the file's layout; ``source`` is not included.

        ``Topology.from_dict(t.to_dict(), source=t.source) == t``.
        """
        return {
            "name": self.name,
            "transport": self.transport,
            "platform": _plain(self.platform),
            "device": [_plain(d) for d in self.devices],
            "guest": [_plain(g) for g in self.guests],
            "workload": _plain(self.workload),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Topology":
        """Check ``d`` (the layout ``tomllib`` returns) exactly as a file would be checked."""
        try:
            return _build(d, source)
        except _Problem as p:
            raise TopologyError(source, p.path, p.problem) from None


def _plain(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def bus_span(total_vfs: int) -> int:
    """Buses needed by a PF at devfn 0 plus ``total_vfs`` VFs (offset 1, stride 1)."""
    last = 0 if total_vfs <= 0 else FIRST_VF_OFFSET + (total_vfs - 1) * VF_STRIDE
    return last // 256 + 1


# ---------------------------------------------------------------------------------------------
# Reading


def load(path: str | os.PathLike[str] | None) -> Topology:
    """Read and check a topology file; ``None`` reads the built-in default.

    Raises TopologyError (also for a missing or unreadable file), nothing else.
    """
    if path is None:
        text = importlib.resources.files("irqlab").joinpath(_DEFAULT_RESOURCE).read_text("utf-8")
        return loads(text, DEFAULT_SOURCE)
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as e:
        raise TopologyError(source, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TopologyError(source, "", f"not UTF-8 text: byte 0x{raw[e.start]:02x} "
                                        f"at offset {e.start}") from None
    return loads(text, source)


_TOML_POS = re.compile(r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$",
                       re.S)


def loads(text: str, source: str) -> Topology:
    """Parse and check TOML ``text``; ``source`` names it in errors and in ``Topology.source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS.match(msg)
        if m is None:
            raise TopologyError(source, "", _one_line(msg)) from None
        problem = _one_line(m["msg"])
        if m["line"] is None:
            raise TopologyError(source, "", f"at end of file: {problem}") from None
        raise TopologyError(source, "", problem, line=int(m["line"]), column=int(m["col"])) from None
    return Topology.from_dict(data, source)


def _one_line(s: str) -> str:
    return " ".join(s.split())


# ---------------------------------------------------------------------------------------------
# Showing values and paths in messages


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(path: str, key: str) -> str:
    k = key if _BARE_KEY.match(key) else json.dumps(key)
    return f"{path}.{k}" if path else k


def _show(v: Any) -> str:
    """A value the way the user wrote it, kept short and on one line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        s = repr(v)
        return s if len(s) <= 40 else s[:36] + "...'"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf
                                           else repr(v))
    if isinstance(v, int):
        s = str(v)
        return s if len(s) <= 24 else s[:20] + "..."
    return _describe(v)


def _describe(v: Any) -> str:
    """'boolean true', 'string 'x'', 'an array', 'a table' ..."""
    if isinstance(v, bool):
        return f"boolean {_show(v)}"
    if isinstance(v, int):
        return f"integer {_show(v)}"
    if isinstance(v, float):
        return f"float {_show(v)}"
    if isinstance(v, str):
        return f"string {_show(v)}"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, Mapping):
        return "a table"
    if isinstance(v, datetime.datetime):
        return "a date-time"
    if isinstance(v, datetime.date):
        return "a date"
    if isinstance(v, datetime.time):
        return "a time"
    if v is None:
        return "null"
    return f"a {type(v).__name__}"


def _suggest(word: str, options: Sequence[str]) -> str:
    """' (did you mean 'x'?)' or ''.  A swap of two neighbouring letters wins; else difflib."""
    swaps = {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)}
    close = [o for o in options if o in swaps]
    close = close or difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Checkers: one per kind of value; each returns the clean value or raises _Problem


@dataclass(frozen=True)
class _Int:
    lo: int
    hi: int | None = None
    pow2: bool = False
    optional: bool = False      # None allowed (dicts only: TOML has no null)

    def __call__(self, v: Any, path: str) -> int | None:
        if v is None and self.optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Problem(path, f"expected an integer, got {_describe(v)}")
        if self.pow2 and (v < self.lo or (self.hi is not None and v > self.hi) or v & (v - 1)):
            raise _Problem(path, f"{_show(v)} is not a power of two in {self.lo}..{self.hi}")
        if self.hi is None and v < self.lo:
            raise _Problem(path, f"{_show(v)} is less than the minimum {self.lo}")
        if self.hi is not None and not self.lo <= v <= self.hi:
            raise _Problem(path, f"{_show(v)} is out of range {self.lo}..{self.hi}")
        return v


@dataclass(frozen=True)
class _Float:
    lo: float
    lo_open: bool = False       # True: v > lo, else v >= lo

    def __call__(self, v: Any, path: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Problem(path, f"expected a number, got {_describe(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise _Problem(path, f"{_show(v)} is not a finite number")
        if isinstance(v, int) and abs(v) > 2**53:
            raise _Problem(path, f"{_show(v)} is too large")
        if self.lo_open and not v > self.lo:
            raise _Problem(path, f"{_show(v)} must be greater than {self.lo:g}")
        if not self.lo_open and v < self.lo:
            raise _Problem(path, f"{_show(v)} is less than the minimum {self.lo:g}")
        return float(v)


@dataclass(frozen=True)
class _Bool:
    def __call__(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise _Problem(path, f"expected a boolean (true or false), got {_describe(v)}")
        return v


@dataclass(frozen=True)
class _Choice:
    options: tuple[str, ...]

    def __call__(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise _Problem(path, f"expected a string, got {_describe(v)}")
        if v not in self.options:
            opts = ", ".join(repr(o) for o in self.options)
            raise _Problem(path, f"{_show(v)} is not one of {opts}{_suggest(v, self.options)}")
        return v


_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")


@dataclass(frozen=True)
class _Name:
    """Device and guest names: ``^[a-z][a-z0-9_-]{0,15}$``."""

    def __call__(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise _Problem(path, f"expected a string, got {_describe(v)}")
        if not _NAME_RE.match(v):
            raise _Problem(path, f"{_show(v)} is not a valid name "
                                 "(a-z first, then up to 15 of a-z 0-9 _ -)")
        return v


@dataclass(frozen=True)
class _Text:
    """A non-empty single-line string (the topology's name)."""

    def __call__(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise _Problem(path, f"expected a string, got {_describe(v)}")
        if not v or any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise _Problem(path, f"{_show(v)} must be a non-empty single line")
        return v


@dataclass(frozen=True)
class _StrList:
    """An array of unique non-empty single-line strings, kept as a tuple."""

    def __call__(self, v: Any, path: str) -> tuple[str, ...]:
        if not isinstance(v, (list, tuple)):
            raise _Problem(path, f"expected an array of strings, got {_describe(v)}")
        seen: dict[str, int] = {}
        for i, item in enumerate(v):
            p = f"{path}[{i}]"
            _Text()(item, p)
            if item in seen:
                raise _Problem(p, f"{_show(item)} is listed twice (also {path}[{seen[item]}])")
            seen[item] = i
        return tuple(v)


_Checker = Callable[[Any, str], Any]

# ---------------------------------------------------------------------------------------------
# The schema: key -> checker per section (defaults are the dataclasses')

_TOP_KEYS = ("name", "transport", "platform", "device", "guest", "workload")

_TOPLEVEL: dict[str, _Checker] = {
    "name": _Text(),
    "transport": _Choice(("ipc", "tcp")),
}

_PLATFORM_KEYS: dict[str, _Checker] = {
    "ir": _Bool(),
    "ir_entries": _Int(2, 65536, pow2=True),
    "cpus": _Int(1, 64),
    "memory_mib": _Int(4, 4096),
    "posted": _Bool(),
    "pasid_ir": _Bool(),
    "pasid_interrupts": _Bool(),
    "vmm_unsafe_ims": _Bool(),
    "vm_frame_rate": _Int(0, 10_000_000),
    "vm_frame_burst": _Int(1, 1_000_000),
    "waste_penalty": _Int(0, 1_000_000),
}

_DEVICE_KEYS: dict[str, _Checker] = {
    "name": _Name(),
    "kind": _Choice(("sriov", "siov")),
    "total_vfs": _Int(0, 64),
    "vfs": _Int(0),                         # upper bound: total_vfs (checked after)
    "pf_vectors": _Int(1, 2048),
    "vf_vectors": _Int(1, 2048),
    "bus": _Int(FIRST_BUS, LAST_BUS, optional=True),
    "adis": _Int(0, 64),
    "adi_ims_slots": _Int(0, 256),
    "vmm_emulation": _Bool(),
    "mangle": _Bool(),
    "pf_ims_slots": _Int(0, 256),
    "vf_ims_slots": _Int(0, 256),
    "ims": _Choice(("device", "memory")),
    "pasid_interrupts": _Bool(),
    "irq_generator": _Bool(),
}

_GUEST_KEYS: dict[str, _Checker] = {
    "name": _Name(),
    "cpus": _Int(1, 64),
    "memory_mib": _Int(4, 4096),
    "cpuid": _Choice(("kvm", "oldkvm", "hidden")),
    "assign": _StrList(),
    "kernel": _Choice(("modern", "legacy2020")),
    "behaviours": _StrList(),
    "irq": _Choice(("msix", "ims")),
    "delivery": _Choice(("posted", "injection")),
}

_WORKLOAD_KEYS: dict[str, _Checker] = {
    "per_function": _Int(0),
    "inflight": _Int(1, 4096),
    "rate": _Float(0.0),
    "timeout_s": _Float(0.0, lo_open=True),
    "burst": _Int(1, BURST_MAX),
}

# For docs/tests: section name -> (dataclass, schema)
SCHEMA: dict[str, tuple[type, dict[str, _Checker]]] = {
    "platform": (Platform, _PLATFORM_KEYS),
    "device": (Device, _DEVICE_KEYS),
    "guest": (Guest, _GUEST_KEYS),
    "workload": (Workload, _WORKLOAD_KEYS),
}


def _check_keys(table: Mapping[str, Any], known: Sequence[str], path: str) -> None:
    for k in table:
        if k not in known:
            if not isinstance(k, str):
                raise _Problem(path, f"keys must be strings, got {_describe(k)}")
            hint = _suggest(k, known) or f" (known keys: {', '.join(known)})"
            raise _Problem(_key(path, k), f"unknown key {_show(k)}{hint}")


def _table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        hint = f" ([{path}])" if _BARE_KEY.match(path) else ""
        raise _Problem(path, f"expected a table{hint}, got {_describe(v)}")
    return v


def _section(cls: type, keys: dict[str, _Checker], table: Any, path: str) -> Any:
    """Check one table against ``keys`` and build ``cls`` from it."""
    table = _table(table, path)
    _check_keys(table, list(keys), path)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in table:
            kwargs[f.name] = keys[f.name](table[f.name], _key(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Problem(_key(path, f.name), "required key is missing")
    return cls(**kwargs)


def _array_of_tables(v: Any, path: str) -> Sequence[Any]:
    if isinstance(v, Mapping):
        raise _Problem(path, f"expected an array of tables ([[{path}]]), got a single table "
                             f"([{path}])")
    if not isinstance(v, (list, tuple)):
        raise _Problem(path, f"expected an array of tables ([[{path}]]), got {_describe(v)}")
    return v


# ---------------------------------------------------------------------------------------------
# Building a Topology


def _build(d: Any, source: str) -> Topology:
    if not isinstance(d, Mapping):
        raise _Problem("", f"expected a table at the top level, got {_describe(d)}")
    _check_keys(d, _TOP_KEYS, "")

    name = _TOPLEVEL["name"](d["name"], "name") if "name" in d else _default_name(source)
    transport = _TOPLEVEL["transport"](d["transport"], "transport") if "transport" in d else "ipc"
    platform = _section(Platform, _PLATFORM_KEYS, d.get("platform", {}), "platform")
    if platform.posted and not platform.ir:
        raise _Problem("platform.posted", "posted interrupts need interrupt remapping (ir = true)")
    if platform.pasid_ir and not platform.ir:
        raise _Problem("platform.pasid_ir", "PASID-checking IRTEs need interrupt remapping "
                                            "(ir = true)")

    if "device" not in d:
        raise _Problem("device", "at least one [[device]] is required")
    raw_devices = _array_of_tables(d["device"], "device")
    if not raw_devices:
        raise _Problem("device", "at least one [[device]] is required")
    devices = [_device(t, f"device[{i}]") for i, t in enumerate(raw_devices)]

    raw_guests = _array_of_tables(d.get("guest", []), "guest")
    guests = [_section(Guest, _GUEST_KEYS, t, f"guest[{i}]") for i, t in enumerate(raw_guests)]
    workload = _section(Workload, _WORKLOAD_KEYS, d.get("workload", {}), "workload")

    _check_unique_names(devices, guests)
    _check_delivery(platform, guests)
    _check_burst(workload, devices)
    devices = _assign_buses(devices)
    _check_assignments(devices, guests)
    _check_behaviours(guests)
    return Topology(name=name, source=source, transport=transport, platform=platform,
                    devices=tuple(devices), guests=tuple(guests), workload=workload)


def _default_name(source: str) -> str:
    if source.startswith("<") and source.endswith(">") and len(source) > 2:
        return source[1:-1]
    return Path(source).stem or "topology"


def _device(table: Any, path: str) -> Device:
    dev: Device = _section(Device, _DEVICE_KEYS, table, path)
    if dev.kind == "siov":
        tbl = _table(table, path)
        for key in ("vfs", "total_vfs", "vf_ims_slots"):
            if tbl.get(key):
                raise _Problem(f"{path}.{key}", f"a 'siov' device has ADIs, not VFs (set {path}.adis)")
        dev = dataclasses.replace(dev, vfs=0, total_vfs=0, adis=dev.adis if "adis" in tbl else 4)
    else:
        for key in ("adi_ims_slots", "vmm_emulation", "mangle"):
            if getattr(dev, key) != getattr(Device, key):
                raise _Problem(f"{path}.{key}", f"only a 'siov' device has ADIs ({path}.kind is {dev.kind!r})")
    if dev.vfs > dev.total_vfs:
        raise _Problem(f"{path}.vfs", f"{dev.vfs} exceeds {path}.total_vfs = {dev.total_vfs}")
    if dev.adis and dev.kind != "siov":
        raise _Problem(f"{path}.adis", f"{dev.adis} ADIs need kind = 'siov' "
                                       f"({path}.kind is {dev.kind!r})")
    return dev


def burst_problem(burst: int, devices: Sequence[Device]) -> str:
    """Why a workload cannot raise ``burst`` interrupts per work item here ("" if it can):
    only a device built with the interrupt generator has a working IRQ_BURST."""
    without = [f"device[{i}] ({d.name})" for i, d in enumerate(devices) if not d.irq_generator]
    if burst > 1 and without:
        return (f"{burst} interrupts per work item need the interrupt generator on every device "
                f"(irq_generator = true); {', '.join(without)} do{'es' if len(without) == 1 else ''} not have it")
    return ""


def _check_burst(workload: Workload, devices: Sequence[Device]) -> None:
    why = burst_problem(workload.burst, devices)
    if why:
        raise _Problem("workload.burst", why)


def _check_delivery(platform: Platform, guests: Sequence[Guest]) -> None:
    for i, g in enumerate(guests):
        if g.delivery == "posted" and not platform.posted:
            raise _Problem(f"guest[{i}].delivery", "'posted' needs a platform with posted interrupts "
                                                   "(platform.posted = true)")


def _check_unique_names(devices: Sequence[Device], guests: Sequence[Guest]) -> None:
    owner: dict[str, str] = {}
    entries = [(f"device[{i}]", d.name) for i, d in enumerate(devices)]
    entries += [(f"guest[{i}]", g.name) for i, g in enumerate(guests)]
    for path, name in entries:
        if name in owner:
            raise _Problem(f"{path}.name", f"duplicate name {name!r} (already used by "
                                           f"{owner[name]})")
        owner[name] = path


def _assign_buses(devices: Sequence[Device]) -> list[Device]:
    """Give every device a bus range: explicit ones first, then lowest free ranges in order."""
    taken: list[tuple[int, int, int]] = []      # (first, last, device index)

    def clash(first: int, last: int) -> tuple[int, int, int] | None:
        return next((t for t in taken if first <= t[1] and t[0] <= last), None)

    for i, dev in enumerate(devices):
        if dev.bus is None:
            continue
        first, last = dev.bus, dev.bus + dev.buses - 1
        path = f"device[{i}].bus"
        if last > LAST_BUS:
            raise _Problem(path, f"{first}: {dev.total_vfs} VFs need buses {first}..{last}, "
                                 f"past the last bus {LAST_BUS}")
        other = clash(first, last)
        if other is not None:
            o = devices[other[2]]
            raise _Problem(path, f"buses {_range(first, last)} overlap device[{other[2]}] "
                                 f"({o.name}, buses {_range(other[0], other[1])})")
        taken.append((first, last, i))

    out = list(devices)
    for i, dev in enumerate(devices):
        if dev.bus is not None:
            continue
        first = FIRST_BUS
        while True:
            last = first + dev.buses - 1
            if last > LAST_BUS:
                n = dev.buses
                raise _Problem(f"device[{i}]", f"no free range of {n} bus{'es' if n > 1 else ''} "
                                               f"left at or below bus {LAST_BUS} for {dev.name}")
            other = clash(first, last)
            if other is None:
                break
            first = other[1] + 1
        taken.append((first, last, i))
        out[i] = dataclasses.replace(dev, bus=first)
    return out


def _range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


_ASSIGN_RE = re.compile(r"^(?P<dev>[^.]+)\.(?P<kind>vf|adi)(?P<idx>0|[1-9][0-9]*)$")


def _check_behaviours(guests: Sequence[Guest]) -> None:
    from guest.hostile import ACTIONS       # the misbehaviours a guest process knows
    for gi, g in enumerate(guests):
        for bi, name in enumerate(g.behaviours):
            if name not in ACTIONS:
                hint = _suggest(name, sorted(ACTIONS)) or f" (known: {', '.join(sorted(ACTIONS))})"
                raise _Problem(f"guest[{gi}].behaviours[{bi}]", f"unknown behaviour {_show(name)}{hint}")


def _check_assignments(devices: Sequence[Device], guests: Sequence[Guest]) -> None:
    by_name = {d.name: (i, d) for i, d in enumerate(devices)}
    owner: dict[str, str] = {}
    for gi, g in enumerate(guests):
        for ai, target in enumerate(g.assign):
            path = f"guest[{gi}].assign[{ai}]"
            m = _ASSIGN_RE.match(target)
            if m is None:
                raise _Problem(path, f"{_show(target)} is not '<device>.vf<N>' or "
                                     "'<device>.adi<N>'")
            if m["dev"] not in by_name:
                raise _Problem(path, f"{_show(target)}: no device named {m['dev']!r}"
                                     f"{_suggest(m['dev'], list(by_name))}")
            di, dev = by_name[m["dev"]]
            count, key = (dev.vfs, "vfs") if m["kind"] == "vf" else (dev.adis, "adis")
            if len(m["idx"]) > 6 or int(m["idx"]) >= count:
                raise _Problem(path, f"{_show(target)}: device[{di}] ({dev.name}) has {key} = "
                                     f"{count}" + (f", so {m['kind']}0..{m['kind']}{count - 1}"
                                                   if count else ""))
            if target in owner:
                raise _Problem(path, f"{_show(target)} is already assigned by {owner[target]}")
            owner[target] = f"{path} ({g.name})"
            if g.irq == "ims" and m["kind"] == "vf" and dev.vf_ims_slots == 0:
                raise _Problem(f"guest[{gi}].irq", f"'ims' needs IMS slots on {target}: set "
                                                   f"device[{di}].vf_ims_slots > 0")


# ---------------------------------------------------------------------------------------------
# python -m irqlab.topology [FILE]: check a file, print the resolved topology as JSON


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m irqlab.topology [FILE]   (no FILE: the built-in default)",
              file=sys.stderr)
        return 2
    try:
        topo = load(args[0] if args else None)
    except TopologyError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(topo.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

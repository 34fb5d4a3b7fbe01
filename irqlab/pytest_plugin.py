"""irqlab's pytest plugin: the ``irqlab`` fixture starts topologies of real processes and reaps them.

Installing irqlab registers this module through the ``pytest11`` entry point, so a test
suite needs no conftest::

    async def test_vf_in_a_guest_delivers(irqlab):
        lab = await irqlab({"workload": {"per_function": 500}})   # the default, merged
        report = await lab.run()
        assert lab.row(report, "g1")["outcome"] == "delivered"

``irqlab`` is a factory (function scope): every call starts one topology and returns a
:class:`LabHandle`.  Whatever happens in the test -- pass, failure, error, a pytest-timeout
timeout -- the fixture's teardown stops every lab it started, then checks that none of
their processes is alive (``docs/testing.md``).

Theory of operation
-------------------
*Topologies.*  ``irqlab(x)`` accepts a TOML path (``str``/``PathLike``), a ``Topology``,
``None`` (the built-in default) or a dict merged over the default by
:func:`irqlab_topology`: top-level keys replace the default's, except that a table
(``platform``, ``workload``) is merged key by key; arrays of tables (``device``,
``guest``) and scalars (``name``, ``transport``) replace the default's whole value.

*Teardown.*  pytest-asyncio runs the fixture's teardown on the same event loop as the
test.  pytest-timeout's signal method raises ``Failed`` from its SIGALRM handler; when
it lands while the loop waits in ``select()`` (where a waiting test spends its time) it
unwinds ``run_until_complete`` and leaves the test's task pending.  The teardown first
cancels that task (the one that called the factory), so the test's own code does not run
again concurrently with the shutdown; then it stops every lab (``Lab.stop``: polite,
SIGTERM, SIGKILL, each bounded); then it SIGKILLs the process group of any process still
alive and fails the test naming it.  SIGALRM is deferred during the teardown, so a
timeout that expires there is reported after the processes are reaped, not in the middle.  A
pytest that dies outright (``timeout_method = thread``, SIGKILL) is covered by
``PR_SET_PDEATHSIG``: the kernel kills every lab process with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import pytest

from irqlab.topology import Topology, load

if TYPE_CHECKING:  # the lab (zmq, msgpack) is imported when a fixture first starts one
    from irqlab.lab import Event, Lab

__all__ = ["LabHandle", "LabError", "irqlab", "irqlab_topology", "rows", "row"]

#: How long the teardown waits for a test task it cancelled (a pending run_workload
#: stops the OSes' runs on cancellation, 10 s per OS at most).
CANCEL_GRACE_S = 30.0


def __getattr__(name: str) -> Any:
    if name == "LabError":             # ``from irqlab.pytest_plugin import LabError``
        from irqlab.lab import LabError
        return LabError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Topologies


def irqlab_topology(overrides: Mapping[str, Any] | None = None, *,
                    base: str | os.PathLike[str] | Topology | None = None) -> Topology:
    """A checked ``Topology``: ``base`` (the built-in default, a TOML path or a Topology) with
    ``overrides`` merged in.

    Merge rule: each top-level key of ``overrides`` replaces the base's value, except a table
    (``platform``, ``workload``) whose keys are merged one by one.  ``device`` and ``guest``
    are arrays of tables and are replaced whole: ``{"guest": []}`` is case 1 (no VMs),
    ``{"workload": {"per_function": 500}}`` keeps the rest of the workload.  Errors are
    ``TopologyError`` naming the key (source ``<test>``).
    """
    if isinstance(base, Topology):
        d = base.to_dict()
    else:
        d = load(base).to_dict()
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return Topology.from_dict(d, source="<test>")


def _as_topology(topology: Any) -> Topology:
    if isinstance(topology, Topology):
        return topology
    if topology is None:
        return load(None)
    if isinstance(topology, (str, os.PathLike)):
        return load(topology)
    if isinstance(topology, Mapping):
        return irqlab_topology(topology)
    raise TypeError(f"irqlab(): expected a TOML path, a dict, a Topology or None, "
                    f"got {type(topology).__name__}")


# ---------------------------------------------------------------------------------------------
# Reports


def rows(report: dict, os_name: str | None = None) -> list[dict]:
    """The report's function rows, all of them or those of one OS (``"host"``, ``"g1"`` ...)."""
    return [r for r in report["functions"] if os_name is None or r["os"] == os_name]


def row(report: dict, os_name: str, phys: str | None = None) -> dict:
    """The one function row of ``os_name`` (of its function ``phys``, e.g. ``"01:00.0"``, when
    the OS drives several); AssertionError listing the rows when there is not exactly one."""
    found = [r for r in rows(report, os_name) if phys is None or r["phys"] == phys]
    if len(found) != 1:
        have = [(r["os"], r["phys"], r["outcome"]) for r in report["functions"]]
        raise AssertionError(f"expected one row for os={os_name!r}"
                             + (f" phys={phys!r}" if phys else "") + f", found {len(found)}; rows: {have}")
    return found[0]


# ---------------------------------------------------------------------------------------------
# The handle


class LabHandle:
    """A running topology (a thin wrapper around :class:`irqlab.lab.Lab`).

    Every attribute of the ``Lab`` is reachable through the handle (``call``,
    ``run_workload``, ``children``, ``events``, ``deaths``, ``guest_info``, ``pids()``,
    ``runtime``, ``stop()`` ...); ``handle.lab`` is the ``Lab`` itself.  Every method that
    waits is bounded and its error says what it waited for.
    """

    def __init__(self, lab: "Lab") -> None:
        self.lab = lab

    def __getattr__(self, name: str) -> Any:
        if name == "lab":              # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.lab, name)

    def __repr__(self) -> str:
        alive = [n for n, c in self.lab.children.items() if c.proc.returncode is None]
        return f"<LabHandle {self.lab.topology.name!r} runtime={self.lab.runtime} alive={alive}>"

    # the workload -------------------------------------------------------------------------

    async def run(self, per_function: int | None = None, inflight: int | None = None,
                  rate: float | None = None, oses: list[str] | None = None, *,
                  timeout_s: float | None = None, stall_s: float = 3.0) -> dict:
        """Run the workload (on ``oses``, default: the host and every live guest) and return the
        report: ``functions`` (rows, see :meth:`row`), ``oses``, ``fabric``, ``faults``,
        ``vms``, ``deaths``, ``ok``.  Unset arguments come from the topology's ``[workload]``."""
        return await self.lab.run_workload(per_function=per_function, inflight=inflight, rate=rate,
                                           oses=oses, timeout_s=timeout_s, stall_s=stall_s)

    row = staticmethod(row)
    rows = staticmethod(rows)

    # misbehaviours and processes ----------------------------------------------------------

    async def hostile(self, guest: str, action: str, *, timeout: float = 60.0, **args: Any) -> Any:
        """Make ``guest`` commit a misbehaviour (``docs/misbehaviours.md``); returns its result."""
        return await self.lab.call(guest, "hostile", {"action": action, **args}, timeout=timeout)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (SIGKILL) to the process ``name`` (``"g1"``, ``"d0"``, ``"host"``,
        ``"fabric"``); returns its pid.  A guest's or device's death is survivable: wait for
        ``wait_event("reclaimed", name)``.  The host's or the fabric's ends the lab: the next
        call raises ``LabError`` naming it."""
        child = self.lab.children.get(name)
        if child is None:
            raise KeyError(f"no process {name!r} in this lab (have: {', '.join(self.lab.children)})")
        if child.proc.returncode is not None:
            raise ProcessLookupError(f"{name!r} already exited ({child.proc.returncode})")
        os.kill(child.proc.pid, sig)
        return child.proc.pid

    # events ------------------------------------------------------------------------------

    async def wait_event(self, kind: str | Callable[["Event"], bool], name: str | None = None,
                         timeout: float = 60.0, *, what: str | None = None) -> "Event":
        """The first event of ``kind`` (from process ``name``, any when None) since the lab
        started -- events that already happened count, so there is no race.  Kinds:
        ``ready``/``failed`` (boot), ``died`` and ``reclaimed`` (a guest or device killed), and
        whatever processes emit.  On expiry ``LabError`` says what it waited for and what it
        saw; a fatal death (host, fabric) raises at once.

        ``wait_event(pred, what, timeout)`` (a callable first) is ``Lab.wait_event``.
        """
        if callable(kind):
            return await self.lab.wait_event(kind, what or name or "an event", timeout=timeout)
        pred = lambda e: e.kind == kind and (name is None or e.name == name)   # noqa: E731
        return await self.lab.wait_event(pred, what or f"event {name or '<any>'}:{kind}", timeout=timeout)

    # what the fabric and the OSes show -----------------------------------------------------

    async def counters(self) -> dict:
        """The fabric's counters: routed TLPs, ``delivered``, ``injected``, ``drop:<reason>`` ..."""
        return await self.lab.call("fabric", "counters")

    async def faults(self, full: bool = False) -> list[str] | dict:
        """The pending DMAR fault lines (Linux format); ``full=True``: the whole answer
        (``lines``, ``totals`` per reason, ``by_source`` per RID, ``overflow``)."""
        res = await self.lab.call("fabric", "faults")
        return res if full else list(res["lines"])

    async def irt(self) -> list[str]:
        """The programmed IRTEs, one line each after a header line."""
        return await self.lab.call("fabric", "irt")

    async def views(self, os_name: str = "host") -> dict:
        """An OS's ``proc_interrupts``, ``domains``, ``lspci``, ``dmesg`` ..."""
        return await self.lab.call(os_name, "views")

    async def vms(self) -> dict:
        """Per VM, from the host's VMM: exits, hypercalls, injections, assigned, refused, state."""
        return await self.lab.call("host", "vms")


# ---------------------------------------------------------------------------------------------
# Reaping


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie is dead for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _sigalrm_deferred() -> Iterator[None]:
    """Defer SIGALRM (pytest-timeout's signal method) while reaping: a timeout that expires
    meanwhile is raised when reaping is done, not in the middle of it.  (Masking the signal
    would not do: the kernel delivers it to any thread that does not mask it, e.g. asyncio's
    child-watcher threads, and Python runs the handler in the main thread anyway.)"""
    old = signal.getsignal(signal.SIGALRM) if hasattr(signal, "SIGALRM") else None
    if threading.current_thread() is not threading.main_thread() or not callable(old):
        yield                          # nobody is timing this teardown with SIGALRM
        return
    fired: list[tuple[int, Any]] = []
    signal.signal(signal.SIGALRM, lambda signum, frame: fired.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, old)
        if fired:
            old(*fired[0])             # pytest-timeout: dump stacks, raise Failed("Timeout")


async def _reap(handles: list[LabHandle], owners: set[asyncio.Task]) -> None:
    me = asyncio.current_task()
    # 1. a test interrupted by pytest-timeout left its task pending: stop it first
    orphans = [t for t in owners if t is not me and not t.done()]
    for t in orphans:
        t.cancel()
    if orphans:
        await asyncio.wait(orphans, timeout=CANCEL_GRACE_S)
        for t in orphans:
            if t.done() and not t.cancelled():
                t.exception()          # retrieved: it was the test's, already reported
    # 2. stop every lab, whatever happens to the others
    pids: dict[int, str] = {}
    errors: list[BaseException] = []
    for h in handles:
        pids.update({c.proc.pid: c.name for c in h.lab.children.values()})
        try:
            await h.lab.stop()
        except BaseException as exc:   # noqa: BLE001 - keep reaping; re-raised below
            errors.append(exc)
    # 3. nothing may be left behind: SIGKILL the stragglers' groups, then say so
    left = {p: n for p, n in pids.items() if _alive(p)}
    for pid in left:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    leftovers = (f"irqlab: processes left behind after Lab.stop(): "
                 f"{', '.join(f'{n} (pid {p})' for p, n in left.items())} -- SIGKILLed now")
    if errors:
        if left:
            errors[0].add_note(leftovers)
        raise errors[0]
    assert not left, leftovers


# ---------------------------------------------------------------------------------------------
# The fixture


async def _irqlab_fixture():
    """Factory: ``lab = await irqlab(topology=None, **Lab kwargs)`` -> LabHandle.

    ``topology``: a TOML path, a dict merged over the built-in default (``irqlab_topology``),
    a ``Topology``, or None (the default).  Every lab started is stopped after the test --
    pass, fail or timeout -- and none of its processes may outlive it."""
    handles: list[LabHandle] = []
    owners: set[asyncio.Task] = set()

    async def start(topology: str | os.PathLike[str] | Mapping[str, Any] | Topology | None = None,
                    /, **lab_kwargs: Any) -> LabHandle:
        """``lab = await irqlab(topology, **Lab kwargs)`` (``start_timeout``, ``keep_runtime``,
        ``spawn``, ``stubs``): start it and wait until every process has booted."""
        from irqlab.lab import Lab
        topo = _as_topology(topology)
        task = asyncio.current_task()
        if task is not None:
            owners.add(task)
        handle = LabHandle(Lab(topo, **lab_kwargs))
        handles.append(handle)          # before start(): a half-started lab is reaped too
        await handle.lab.start()
        return handle

    try:
        yield start
    finally:
        with _sigalrm_deferred():
            await _reap(handles, owners)


try:
    import pytest_asyncio
except ImportError:                    # pragma: no cover - exercised only without pytest-asyncio
    @pytest.fixture
    def irqlab():
        """Needs pytest-asyncio; see docs/testing.md."""
        pytest.fail("the irqlab fixture needs pytest-asyncio: pip install pytest-asyncio "
                    "(or pip install 'irqlab[test]')", pytrace=False)
else:
    irqlab = pytest_asyncio.fixture(_irqlab_fixture, name="irqlab")

"""Starting, watching and stopping a topology's processes (the launcher's engine).

``Lab`` is what ``launch.py`` and the test fixtures use::

    async with Lab(topology) as lab:          # start(): fabric, devices, host; waits for "ready"
        result = await lab.run_workload()
        views = await lab.call("host", "views")
    # stop(): polite shutdown, then SIGTERM, then SIGKILL; nothing is left behind

Theory of operation
-------------------
*Secrets.*  The runtime directory (mode 0700) holds one JSON file per process;
only ``fabric.json`` (mode 0600) holds the token table.  Each child gets its
own one-time token in its environment, so a process can register only as the
role it was started for, and only once.  Over tcp the launcher also issues CURVE
keys: the fabric's keypair and one per client; the fabric admits (ZAP) only the
issued client keys (docs/multihost.md).

*Processes.*  Every child runs in its own process group and asks the kernel to
SIGKILL it when the launcher dies (``PR_SET_PDEATHSIG``), so even a launcher
killed with SIGKILL leaves nothing behind.  Each child's stderr goes to
``<name>.log`` in the runtime directory; when a child dies unexpectedly the
error names it, its exit status and the tail of that log.

*Waiting.*  Every wait has a bound and races the death of any child: a wait that
expires says what it waited for and what it saw instead.

*Shutdown* (as jupyter_client's ``_async_finish_shutdown``): ask each process to
shut down over the control interface (host and devices first, the fabric last),
wait, SIGTERM every process group still alive, wait, SIGKILL.  ``stop()`` is
idempotent and is also called from ``__aexit__`` whatever happened.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from fabric import trace as tracing
from fabric import wire
from fabric.port import Port, PortError
from fabric.provenance import adi_origin, describe
from irqlab.topology import Topology, burst_problem
from irqlab.zygote import ZygoteClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a topology with this many guests or more forks them from a zygote (``Lab._want_zygote``)
FORK_GUESTS_FROM = 4


class LabError(RuntimeError):
    """The topology could not be started or a process died; the message says which and why."""


class ShutdownStatus(enum.Enum):
    POLITE = "polite"
    TERMINATED = "terminated"
    KILLED = "killed"


@dataclass
class Child:
    name: str
    role: str
    proc: asyncio.subprocess.Process
    log_path: str
    expected_exit: bool = False

    def tail(self, lines: int = 12) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return ""


@dataclass
class Event:
    name: str
    kind: str
    data: dict
    t: float = field(default_factory=time.monotonic)


class Lab:
    """A running topology; see the module docstring."""

    def __init__(self, topology: Topology, *, keep_runtime: bool = False,
                 start_timeout: float = 60.0, on_progress: Callable[[str], None] | None = None,
                 spawn: tuple[str, ...] = ("devices", "host", "guests"),
                 stubs: dict[str, tuple[str, tuple[int, int] | None]] | None = None,
                 netns: dict[str, str] | None = None, listen: str | None = None,
                 local_control: bool | None = None, trace: bool = False):
        """``spawn`` says which processes beyond the fabric to start; ``stubs`` issues extra
        tokens (name -> (role, bus range)) for ports a test drives itself (``self.tokens``,
        and over tcp ``self.curve``: name -> the ``curve`` argument of its ``Port``).

        ``netns`` (process name -> network namespace) starts those processes with
        ``ip netns exec NS``; ``listen`` (``HOST:PORT``) is where a tcp fabric binds
        (default 127.0.0.1 and a free port); ``local_control`` makes the fabric also bind
        ``ipc://<runtime>/fabric-local.sock`` for this controller (default: when the fabric
        runs in a namespace of its own)."""
        self.topology = topology
        self.spawn = spawn
        self.stubs = dict(stubs or {})
        self.tokens: dict[str, str] = {}
        self.netns = dict(netns or {})
        self.listen = listen
        self.local_control = ("fabric" in self.netns) if local_control is None else local_control
        self.local_endpoint: str | None = None
        self.curve: dict[str, dict] = {}
        self.keep_runtime = keep_runtime
        self._zygote: ZygoteClient | None = None
        self.start_timeout = start_timeout
        self.on_progress = on_progress or (lambda msg: None)
        self.runtime: str | None = None
        self.endpoint: str | None = None
        self.children: dict[str, Child] = {}
        self.events: list[Event] = []
        self._event_cond: asyncio.Condition | None = None
        self.port: Port | None = None
        self._died: asyncio.Future | None = None
        self._watchers: list[asyncio.Task] = []
        self.shutdown_status: ShutdownStatus | None = None
        self.boot_info: dict = {}
        self.guest_info: dict[str, dict] = {}
        self.deaths: list[dict] = []
        self.provenance: dict[str, dict[int, int]] = {}
        self._stopped = False
        self.trace = trace         # every process records a trace from its start (trace_collect)
        self._trace_max_events = 0

    # ------------------------------------------------------------------
    # start

    async def __aenter__(self) -> "Lab":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _write(self, name: str, obj: dict, mode: int = 0o600) -> None:
        path = os.path.join(self.runtime, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)

    def _plan(self) -> dict[str, str]:
        """Write the runtime directory; return name -> token."""
        topo = self.topology
        self.runtime = tempfile.mkdtemp(prefix="irqlab-")
        tcp = topo.transport == "tcp"
        if tcp:
            self.endpoint = "tcp://" + (self.listen or "127.0.0.1:%d" % _free_port())
        else:
            self.endpoint = f"ipc://{self.runtime}/fabric.sock"
        self.local_endpoint = f"ipc://{self.runtime}/fabric-local.sock" if tcp and self.local_control else None
        tokens: dict[str, str] = {}
        table: dict[str, dict] = {}
        server_pub, server_sec = zmq.curve_keypair() if tcp else (b"", b"")
        client_pubs: dict[str, str] = {}
        self.curve = {}

        def issue(name: str, role: str, **extra) -> None:
            tok = secrets.token_hex(16)
            tokens[name] = tok
            table[tok] = {"name": name, "role": role, **extra}
            if tcp:   # one CURVE keypair per process; the fabric's ZAP admits exactly these
                pub, sec = zmq.curve_keypair()
                client_pubs[name] = pub.decode()
                self.curve[name] = {"server": server_pub.decode(), "public": pub.decode(), "secret": sec.decode()}

        def keys(name: str) -> dict:
            return {"curve": self.curve[name]} if name in self.curve else {}

        issue("control", "control")
        issue("host", "host")
        for g in topo.guests:
            issue(g.name, "guest")
        for name, (role, buses) in self.stubs.items():
            issue(name, role, **({"buses": list(buses)} if buses else {}))
        for d in topo.devices:
            issue(d.name, "device", buses=list(d.bus_range))
            self._write(f"{d.name}.json", {**keys(d.name), "endpoint": self.endpoint, "name": d.name, "kind": d.kind,
                                           "total_vfs": d.total_vfs, "pf_vectors": d.pf_vectors,
                                           "vf_vectors": d.vf_vectors, "pf_ims_slots": d.pf_ims_slots,
                                           "vf_ims_slots": d.vf_ims_slots, "adis": d.adis,
                                           "adi_ims_slots": d.adi_ims_slots,
                                           "pasid_interrupts": d.pasid_interrupts,
                                           "irq_generator": d.irq_generator})
        plat = topo.platform
        max_bus = max((d.bus_range[1] for d in topo.devices), default=1)
        security = {"curve": {"public": server_pub.decode(), "secret": server_sec.decode(),
                              "clients": client_pubs}} if tcp else {}
        if self.local_endpoint:
            security["local_endpoint"] = self.local_endpoint
        self._write("fabric.json", {**security, "endpoint": self.endpoint, "tokens": table,
                                    "platform": {"ir": plat.ir, "ir_entries": plat.ir_entries,
                                                 "pasid_ir": plat.pasid_ir, "posted": plat.posted,
                                                 "pasid_interrupts": plat.pasid_interrupts,
                                                 "vm_frame_rate": plat.vm_frame_rate,
                                                 "vm_frame_burst": plat.vm_frame_burst,
                                                 "waste_penalty": plat.waste_penalty,
                                                 "max_bus": max_bus}})

        vms = []
        self.provenance = {}
        for g in topo.guests:
            rids = [_function_rid(topo, t) for t in g.assign if ".vf" in t]
            adis = [_adi(topo, t) for t in g.assign if ".adi" in t]
            vms.append({"name": g.name, "cpus": g.cpus, "memory_mib": g.memory_mib, "cpuid": g.cpuid,
                        "kernel": g.kernel, "assign_rids": rids, "assign_adis": adis,
                        "delivery": topo.delivery(g)})
            # The VMM puts assigned VFs, then ADIs, at 00:03.0, 00:04.0, ... of the guest's bus;
            # the oracle's identity of each is the VF's RID or (PF RID, ADI index).
            origins = rids + [adi_origin(rid, i) for rid, i in adis]
            prov = {str((3 + i) << 3): o for i, o in enumerate(origins)}
            self.provenance[g.name] = {int(k): v for k, v in prov.items()}
            # each assigned function's IMS kind preference, by the RID the guest sees it at
            targets = [t for t in g.assign if ".vf" in t] + [t for t in g.assign if ".adi" in t]
            kinds = {str((3 + i) << 3): topo.device(t.partition(".")[0]).ims for i, t in enumerate(targets)}
            self._write(f"{g.name}.json", {**keys(g.name), "endpoint": self.endpoint, "name": g.name, "cpus": g.cpus,
                                           "memory_mib": g.memory_mib, "kernel": g.kernel, "irq_mode": g.irq,
                                           "ims_kinds": kinds, "provenance": prov,
                                           "behaviours": list(g.behaviours)})
        self._write("host.json", {**keys("host"), "endpoint": self.endpoint, "name": "host", "cpus": plat.cpus,
                                  "memory_mib": plat.memory_mib, "ir": plat.ir, "ir_entries": plat.ir_entries,
                                  "vmm_unsafe_ims": plat.vmm_unsafe_ims,
                                  "sriov": {str(d.bus): d.vfs for d in topo.devices if d.vfs},
                                  "siov": {str(d.pf_rid): {"ims": d.ims, "vmm_emulation": d.vmm_emulation,
                                                           "mangle": d.mangle}
                                           for d in topo.devices if d.kind == "siov"},
                                  "vms": vms})
        return tokens

    async def _spawn(self, name: str, role: str, module: str, token: str | None) -> Child:
        log_path = os.path.join(self.runtime, f"{name}.log")
        env = dict(os.environ)
        env["IRQLAB_PARENT_PID"] = str(os.getpid())
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop(tracing.ENV, None)
        if self.trace:
            env[tracing.ENV] = "1"
        if token:
            env["IRQLAB_TOKEN"] = token
        args = [sys.executable, "-m", module, "--runtime", self.runtime]
        if role != "fabric":
            args += ["--name", name]
        if role == "guest" and self._zygote is not None and name not in self.netns:
            proc = await self._fork(name, module, args[3:], env, log_path)
            if proc is not None:
                return self._adopt(Child(name, role, proc, log_path))
        if name in self.netns:   # ``ip netns exec`` execs in place: the pid is the child's
            args = ["ip", "netns", "exec", self.netns[name]] + args
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True, cwd=REPO_ROOT)
        return self._adopt(Child(name, role, proc, log_path))

    def _adopt(self, child: Child) -> Child:
        self.children[child.name] = child
        self._watchers.append(asyncio.get_running_loop().create_task(self._watch(child)))
        return child

    # Guests of a topology with FORK_GUESTS_FROM or more of them are forked from a zygote that
    # has imported the OS model once (irqlab/zygote.py): a new interpreter and its imports cost
    # ~0.2 s of CPU per guest, most of a 64-VM boot on 2 cores.  IRQLAB_FORK_GUESTS=1 forks
    # every topology's guests, =0 none (they are exec'd like the other processes).

    def _want_zygote(self) -> bool:
        guests = [g for g in self.topology.guests if g.name not in self.netns]
        how = os.environ.get("IRQLAB_FORK_GUESTS", "")
        if how == "0" or not guests or "guests" not in self.spawn:
            return False
        return how == "1" or len(guests) >= FORK_GUESTS_FROM

    async def _start_zygote(self) -> None:
        env = dict(os.environ)
        env["IRQLAB_PARENT_PID"] = str(os.getpid())
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("IRQLAB_TOKEN", None)
        self._zygote = ZygoteClient()
        try:
            await self._zygote.start(env, REPO_ROOT, os.path.join(self.runtime, "zygote.log"))
        except OSError as exc:
            self.on_progress(f"guests will be exec'd: the zygote did not start ({exc})")
            self._zygote = None

    async def _fork(self, name: str, module: str, argv: list[str], env: dict, log_path: str):
        """A guest forked by the zygote, or None (then it is exec'd) if the zygote is not there."""
        z = self._zygote
        try:
            await self._race(z.ready(), "the guest zygote to import the OS model")
            open(log_path, "wb").close()
            return await self._race(z.spawn(name, module, argv, env, log_path, REPO_ROOT),
                                    f"the guest zygote to fork {name}")
        except (RuntimeError, OSError) as exc:      # LabError included: then exec
            if self._died.done():
                raise
            self.on_progress(f"guests will be exec'd: {exc} (see {os.path.join(self.runtime, 'zygote.log')})")
            self._zygote = None
            await z.close()
            return None

    async def _watch(self, child: Child) -> None:
        """Supervise one child.  A guest or device that dies is survivable (like a VM process
        or a surprise-removed card): the fabric forgets its port and completes what waited on
        it, the host reclaims what it had.  The death of the fabric or the host is not."""
        await child.proc.wait()
        if child.expected_exit or self._stopped:
            self._notify()
            return
        survivable = child.role in ("guest", "device") and self.port is not None and self.boot_info
        if not survivable:
            if self._died is not None and not self._died.done():
                self._died.set_result(child)
            self._notify()
            return
        rc = child.proc.returncode
        how = signal.Signals(-rc).name if rc is not None and rc < 0 else f"status {rc}"
        record = {"name": child.name, "role": child.role, "how": how, "log": child.tail(5)}
        self.deaths.append(record)
        self.events.append(Event(child.name, "died", record))
        self._notify()
        try:
            record["fabric"] = await self.call("fabric", "peer.gone", {"name": child.name})
            op = "vm.died" if child.role == "guest" else "device.removed"
            record["host"] = await self.call("host", op, {"name": child.name,
                                                         "buses": record["fabric"].get("buses", [])})
        except LabError as exc:
            record["error"] = str(exc)
        self.events.append(Event(child.name, "reclaimed", record))
        self._notify()

    def _death_error(self, child: Child) -> LabError:
        rc = child.proc.returncode
        how = f"was killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exited with status {rc}"
        tail = child.tail()
        return LabError(f"{child.role} {child.name!r} {how} unexpectedly"
                        + (f"; last lines of its log:\n{tail}" if tail else ""))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._died = loop.create_future()
        self._event_cond = asyncio.Condition()
        tokens = self.tokens = self._plan()
        if self._want_zygote():
            await self._start_zygote()     # it imports the OS model while the others boot
        self.on_progress("starting fabric")
        await self._spawn("fabric", "fabric", "fabric", None)
        self.port = Port(self.local_endpoint or self.endpoint, tokens["control"], "control",
                         on_message=self._on_message, curve=self.curve.get("control"))
        await self._race(self.port.connect(timeout=self.start_timeout), "the fabric to accept the controller")
        if "devices" in self.spawn:
            for d in self.topology.devices:
                self.on_progress(f"starting device {d.name}")
                await self._spawn(d.name, "device", "device", tokens[d.name])
            for d in self.topology.devices:
                await self.wait_event(lambda e, n=d.name: e.name == n and e.kind == "ready",
                                      f"device {d.name} to register")
        if "host" not in self.spawn:
            return
        self.on_progress("starting host (enumeration, drivers)")
        await self._spawn("host", "host", "host", tokens["host"])
        ev = await self.wait_event(lambda e: e.name == "host" and e.kind in ("ready", "failed"),
                                   "the host to boot")
        if ev.kind == "failed":
            raise LabError(f"host failed to boot: {ev.data.get('error')}\n{self.children['host'].tail()}")
        self.boot_info = ev.data
        if "guests" not in self.spawn:
            return
        for g in self.topology.guests:
            self.on_progress(f"starting guest {g.name} (cpuid {g.cpuid}, kernel {g.kernel}, irq {g.irq})")
            await self._spawn(g.name, "guest", "guest", tokens[g.name])
        for g in self.topology.guests:
            ev = await self.wait_event(lambda e, n=g.name: e.name == n and e.kind in ("ready", "failed", "died"),
                                       f"guest {g.name} to boot")
            if ev.kind == "died":
                raise self._death_error(self.children[g.name])
            if ev.kind == "failed":
                raise LabError(f"guest {g.name} failed to boot: {ev.data.get('error')}\n"
                               f"{self.children[g.name].tail()}")
            self.guest_info[g.name] = ev.data

    # ------------------------------------------------------------------
    # a topology split across machines (``launch.py commands``)

    def commands(self, python: str = "python") -> list[dict]:
        """Write the runtime directory of a tcp topology whose processes are started by hand,
        on several machines, and return what each needs, in start order; start nothing.

        Each process's token goes into its own config file (mode 0600), not onto a command
        line; ``control.json`` holds a controller's endpoint, token and keys.  An entry has
        ``name``, ``role``, ``files`` (absolute paths to copy), ``argv`` (``None`` for the
        controller, which is a ``Port`` of your own: docs/multihost.md) and ``when``."""
        if self.topology.transport != "tcp":
            raise LabError(f"topology {self.topology.name!r} has transport {self.topology.transport!r}; "
                           f"a topology split across machines needs transport = \"tcp\"")
        tokens = self.tokens = self._plan()
        entries = []

        def entry(name: str, role: str, when: str, module: str | None = None) -> None:
            path = os.path.join(self.runtime, f"{name}.json")
            if role == "control":
                self._write("control.json", {"endpoint": self.endpoint, "name": name, "token": tokens[name],
                                             "curve": self.curve[name]})
            elif role != "fabric":
                with open(path) as f:
                    cfg = json.load(f)
                self._write(f"{name}.json", {**cfg, "token": tokens[name]})
            argv = None
            if module:
                argv = [python, "-m", module, "--runtime", self.runtime] + (["--name", name] if role != "fabric" else [])
            entries.append({"name": name, "role": role, "files": [path], "argv": argv, "when": when})

        entry("fabric", "fabric", f"first, on the machine that owns {self.endpoint[len('tcp://'):]}", "fabric")
        entry("control", "control", "second, from any machine that reaches the fabric: the one controller; "
                                    "it receives every '<name>:ready' event")
        for d in self.topology.devices:
            entry(d.name, "device", "after the fabric; then wait for its ready event", "device")
        entry("host", "host", "after every device's ready event; then wait for 'host:ready'", "host")
        for g in self.topology.guests:
            entry(g.name, "guest", "after 'host:ready'; then wait for its ready event", "guest")
        return entries

    # ------------------------------------------------------------------
    # events and calls

    def _on_message(self, msg: list) -> None:
        if msg[0] == wire.EVENT:
            _, name, kind, data = msg
            self.events.append(Event(name, kind, data if isinstance(data, dict) else {}))
            self._notify()

    def _notify(self) -> None:
        cond = self._event_cond
        if cond is None:
            return

        async def poke():
            async with cond:
                cond.notify_all()
        asyncio.get_running_loop().create_task(poke())

    async def _race(self, aw, what: str, timeout: float | None = None):
        """Await ``aw`` unless a child dies first or ``timeout`` expires."""
        task = asyncio.ensure_future(aw)
        timeout = self.start_timeout if timeout is None else timeout
        done, _ = await asyncio.wait({task, self._died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        if self._died.done():
            raise self._death_error(self._died.result())
        raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")

    async def wait_event(self, pred: Callable[[Event], bool], what: str, timeout: float | None = None) -> Event:
        """Wait for an event matching ``pred``; on expiry say what was seen instead."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            if self._died.done():
                raise self._death_error(self._died.result())
            left = deadline - time.monotonic()
            if left <= 0:
                recent = ", ".join(f"{e.name}:{e.kind}" for e in self.events[-8:]) or "no events"
                alive = ", ".join(f"{c.name}({'alive' if c.proc.returncode is None else c.proc.returncode})"
                                  for c in self.children.values())
                raise LabError(f"timed out after {timeout:.0f} s waiting for {what}; saw {recent}; processes: {alive}")
            async with self._event_cond:
                try:
                    await asyncio.wait_for(self._event_cond.wait(), timeout=min(left, 1.0))
                except TimeoutError:
                    pass

    async def call(self, peer: str, op: str, args: dict | None = None, timeout: float = 60.0) -> Any:
        """A control request to a process (``"fabric"``, ``"host"``, a device name)."""
        if self.port is None:
            raise LabError("the lab is not running")
        try:
            return await self._race(self.port.call(peer, op, args or {}, timeout=timeout),
                                    f"{peer} to answer {op!r}", timeout=timeout + 5)
        except PortError as exc:
            raise LabError(str(exc)) from None

    # ------------------------------------------------------------------
    # tracing (launch.py --trace; docs/tracing.md)

    def trace_order(self) -> list[str]:
        """The live processes in track order: devices, fabric, host, guests (the way an
        interrupt travels)."""
        roles = {"device": 0, "fabric": 1, "host": 2, "guest": 3}
        live = [c for c in self.children.values() if c.proc.returncode is None and c.role in roles]
        return [c.name for c in sorted(live, key=lambda c: roles[c.role])]

    async def trace_start(self, max_events: int | None = None) -> dict:
        """Every live process forgets what it recorded and records from now on (bounded:
        ``max_events`` each, default ``fabric.trace.MAX_EVENTS``)."""
        args = {} if max_events is None else {"max_events": max_events}
        self._trace_max_events = max_events or 0
        return {name: await self.call(name, "trace.start", args) for name in self.trace_order()}

    async def trace_collect(self) -> dict:
        """Stop every process's recording and fetch its events over the control interface,
        chunk by chunk (a device's or guest's reply must fit an 8 KiB frame).

        Returns ``{"dumps": [{"process", "events", "dropped", "malformed"}, ...] (track
        order), "missing": {name: why}, "chunks", "bytes", "seconds"}``; ``dumps`` is what
        ``fabric.trace.to_chrome`` takes.  A guest's answers are checked like anything a guest
        sends: a chunk that is not one, a dump that makes no progress or outgrows the bound
        the process was given, events that do not decode (dropped, counted as ``malformed``).
        A guest or device that died or answered nonsense is ``missing`` (with why); the host or
        the fabric failing raises ``LabError``."""
        t0 = time.monotonic()
        dumps, missing = [], {}
        chunks = nbytes = 0
        bound = max(self._trace_max_events, tracing.MAX_EVENTS)
        for name in self.trace_order():
            events: list[tuple] = []
            offset = dropped = malformed = 0
            try:
                while True:
                    r = await self.call(name, "trace.dump", {"offset": offset})
                    if (not isinstance(r, dict) or type(r.get("events")) is not bytes
                            or not all(type(r.get(k)) is int for k in ("next", "total", "dropped", "count"))):
                        raise LabError(f"{name}: trace.dump answered something that is not a trace chunk")
                    got = tracing.unpack_events(r["events"])
                    events.extend(got)
                    malformed += max(r["count"] - len(got), 0)
                    chunks += 1
                    nbytes += len(r["events"])
                    dropped = r["dropped"]
                    if r["next"] >= r["total"]:
                        break
                    if r["next"] <= offset:
                        raise LabError(f"{name}: trace.dump made no progress at event {offset}")
                    if len(events) > bound:
                        raise LabError(f"{name}: trace.dump returned more than the {bound:,} events it may hold")
                    offset = r["next"]
            except LabError as exc:
                child = self.children[name]
                if child.role in ("fabric", "host"):
                    raise
                gone = child.proc.returncode is not None
                missing[name] = (f"died before its trace was collected ({exc})" if gone else str(exc)).splitlines()[0]
                continue
            dumps.append({"process": name, "events": events, "dropped": dropped, "malformed": malformed})
        return {"dumps": dumps, "missing": missing, "chunks": chunks, "bytes": nbytes,
                "seconds": time.monotonic() - t0}

    # ------------------------------------------------------------------
    # the workload and its report

    async def run_workload(self, per_function: int | None = None, inflight: int | None = None,
                           timeout_s: float | None = None, stall_s: float = 3.0,
                           rate: float | None = None, oses: list[str] | None = None,
                           burst: int | None = None) -> dict:
        """Run the workload on the host and every guest at once; join it with the devices' counts.

        ``burst``: interrupts each work item raises (the engine's IRQ_BURST, 1..256; default the
        topology's ``workload.burst``): a run then expects ``per_function * burst`` interrupts
        per function.

        ``stall_s``: an OS whose completions stop for this long stops waiting (interrupts that
        never arrive are what some matrix rows are about); the report says so.  ``oses``
        restricts the run to some of the OSes (default: the host and every guest).
        """
        wl = self.topology.workload
        if burst is not None and burst > 1 and (why := burst_problem(burst, self.topology.devices)):
            raise LabError(f"burst: {why}")
        args = {"per_function": wl.per_function if per_function is None else per_function,
                "inflight": wl.inflight if inflight is None else inflight,
                "timeout_s": wl.timeout_s if timeout_s is None else timeout_s,
                "stall_s": stall_s, "rate": wl.rate if rate is None else rate,
                "burst": wl.burst if burst is None else burst}
        devices = [d.name for d in self.topology.devices if self.children.get(d.name)
                   and self.children[d.name].proc.returncode is None]
        before = {d: await self.call(d, "stats") for d in devices}
        if oses is None:
            oses = ["host"] + [g.name for g in self.topology.guests if g.name in self.children
                               and self.children[g.name].proc.returncode is None]
        calls = [asyncio.ensure_future(self.call(name, "workload.run", args, timeout=args["timeout_s"] + 30))
                 for name in oses]
        try:
            got = await asyncio.gather(*calls, return_exceptions=True)
        except asyncio.CancelledError:
            # the caller gave up: stop the OSes' runs too, so the next run can start
            for c in calls:
                c.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            for name in oses:
                try:
                    await self.call(name, "workload.stop", {}, timeout=10)
                except LabError:
                    pass
            raise
        results = []
        for name, res in zip(oses, got):
            if isinstance(res, BaseException):
                dead = self.children.get(name)
                if name == "host" or dead is None or dead.proc.returncode is None:
                    raise res          # the host, or a live guest, failed: not survivable
                res = {"functions": {}, "os": {}, "died": True}   # the guest died mid-run
            results.append(res)
        after = {}
        for d in devices:
            if self.children[d].proc.returncode is None:
                try:
                    after[d] = await self.call(d, "stats")
                except LabError:
                    if self.children[d].proc.returncode is None:
                        raise
        fabric = await self.call("fabric", "counters")
        faults = await self.call("fabric", "faults")
        vms = await self.call("host", "vms")
        report = build_report(self.topology, dict(zip(oses, results)), before, after, fabric, faults,
                              self.provenance, vms)
        report["deaths"] = list(self.deaths)
        return report

    # ------------------------------------------------------------------
    # stop

    async def stop(self, grace: float = 5.0) -> ShutdownStatus | None:
        if self._stopped:
            return self.shutdown_status
        self._stopped = True
        alive = [c for c in self.children.values() if c.proc.returncode is None]
        status = ShutdownStatus.POLITE
        # Shutdown requests travel through the fabric: with the fabric dead nobody can carry
        # them (each would wait out its timeout), so it is SIGTERM straight away.
        fabric_up = any(c.role == "fabric" for c in alive)
        if alive and self.port is not None and fabric_up:
            order = [c for c in alive if c.role != "fabric"] + [c for c in alive if c.role == "fabric"]
            for c in order:
                c.expected_exit = True
                if c.proc.returncode is not None:
                    continue
                try:
                    await asyncio.wait_for(self.port.call(c.name, "shutdown", {}, timeout=grace / 2),
                                           timeout=grace / 2)
                except (PortError, TimeoutError, asyncio.CancelledError):
                    pass
            await _wait_all(alive, grace / 2)
        for c in self.children.values():
            c.expected_exit = True
        still = [c for c in self.children.values() if c.proc.returncode is None]
        if still:
            status = ShutdownStatus.TERMINATED
            _signal_groups(still, signal.SIGTERM)
            await _wait_all(still, grace)
            still = [c for c in still if c.proc.returncode is None]
        if still:
            status = ShutdownStatus.KILLED
            _signal_groups(still, signal.SIGKILL)
            await _wait_all(still, grace)
        # Reap anything a child may have left in its group.
        _signal_groups(list(self.children.values()), signal.SIGKILL)
        if self.port is not None:
            self.port.close(linger_ms=0)
        for t in self._watchers:
            if not t.done():
                t.cancel()
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._zygote is not None:
            await self._zygote.close(grace)
        if self.runtime and not self.keep_runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)
        self.shutdown_status = status if self.children else None
        return self.shutdown_status

    # ------------------------------------------------------------------
    # the launcher's own control socket (``launch.py ctl`` / ``views`` from another shell)

    def control_endpoint(self) -> str:
        return f"ipc://{self.runtime}/launcher.sock"

    async def serve_control(self) -> None:
        """Relay requests from ``ipc://<runtime>/launcher.sock`` to the topology until cancelled,
        or until the fabric or the host dies: then ``LabError`` names it and says how.

        A request is msgpack ``[peer, op, args]``; the answer ``[ok, result]``.  The socket
        lives in the 0700 runtime directory, so only this user can reach it.
        """
        import msgpack
        import zmq
        import zmq.asyncio
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.control_endpoint())
        recv = None
        try:
            while True:
                recv = asyncio.ensure_future(sock.recv_multipart())
                await asyncio.wait({recv, self._died}, return_when=asyncio.FIRST_COMPLETED)
                if not recv.done():          # a fatal death (a guest's or device's is survivable)
                    raise self._death_error(self._died.result())
                ident, _, body = recv.result()
                try:
                    peer, op, args = msgpack.unpackb(body, raw=False)
                    result = [True, await self.call(str(peer), str(op), dict(args or {}))]
                except (LabError, ValueError, TypeError) as exc:
                    result = [False, str(exc)]
                except Exception as exc:  # a malformed request must not stop the relay
                    result = [False, f"{type(exc).__name__}: {exc}"]
                await sock.send_multipart([ident, b"", msgpack.packb(result, use_bin_type=True)])
        finally:
            if recv is not None and not recv.done():
                recv.cancel()
            sock.close(0)
            ctx.term()

    def pids(self) -> list[int]:
        """Every process this lab started (the guest zygote too, if there is one)."""
        zygote = [self._zygote.proc.pid] if self._zygote is not None and self._zygote.proc else []
        return [c.proc.pid for c in self.children.values()] + zygote


def _signal_groups(children: list[Child], sig: int) -> None:
    for c in children:
        try:
            os.killpg(c.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


async def _wait_all(children: list[Child], timeout: float) -> None:
    waits = [c.proc.wait() for c in children if c.proc.returncode is None]
    if waits:
        await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=timeout)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _function_rid(topo: Topology, target: str) -> int:
    dev_name, _, fn = target.partition(".")
    dev = topo.device(dev_name)
    if fn.startswith("vf"):
        return dev.vf_rid(int(fn[2:]))
    raise ValueError(f"{target} is not a VF")


def _adi(topo: Topology, target: str) -> tuple[int, int]:
    dev_name, _, fn = target.partition(".")
    return topo.device(dev_name).pf_rid, int(fn[3:])


def _outcome(row: dict, faults_by_source: dict) -> tuple[str, str]:
    """Classify one function's run the way the matrix does (DESIGN.md §5)."""
    sent, got, target = row["sent"], row["interrupts"], row["target"] * row.get("burst", 1)
    why = ""
    if row["ims_error"]:
        fallback = {"msix": "MSI-X", "ims": "device-kind IMS", "ims-memory": "memory-kind IMS"}.get(
            row["irq_mode"], row["irq_mode"])
        why = f"IMS refused: {row['ims_error']}; the driver used {fallback} instead"
    if row["breaches"]:
        return "breach", f"{row['breaches']} interrupts reached a vector their emitter does not own"
    if row.get("removed"):
        return "clean error", f"{row['removed']} ({row['interrupts']}/{target} delivered before)"
    if row["record_missing"]:
        return "ordering violated", f"{row['record_missing']} interrupts overtook their completion record"
    if target and got >= target and sent == got:
        return ("clean error" if why else "delivered"), why
    faults = faults_by_source.get(row["phys"].split(" ")[0], {})
    reasons = ", ".join(f"fault {r} x{n}" for r, n in sorted(faults.items()))
    if sent > got:
        detail = (f"{sent} interrupts sent by {row['phys']}, {got} reached {row['os']}"
                  + (f"; the IR unit blocked them ({reasons})" if reasons else ""))
        return ("silent loss detected" if not why else "lost"), detail
    return "incomplete", f"{got}/{target} interrupts, {sent} sent"


def build_report(topo: Topology, results: dict, before: dict, after: dict, fabric: dict, faults: dict,
                 provenance: dict | None = None, vms: dict | None = None) -> dict:
    """Join each OS's view (delivered) with the devices' (sent) per function."""
    from fabric.bdf import rid_str
    provenance = provenance or {}
    sent_by_rid: dict[int, int] = {}     # by provenance identity: a function's RID or an ADI's origin
    for name in after:
        for key, f in after[name].get("functions", {}).items():
            prev = before.get(name, {}).get("functions", {}).get(key, {})
            sent_by_rid[f["rid"]] = sum(f.get(k, 0) - prev.get(k, 0) for k in ("msix_sent", "ims_sent"))
        pf_rid = after[name].get("pf_rid")
        for i, a in enumerate(after[name].get("adis", [])):
            prev = (before.get(name, {}).get("adis") or [{}] * (i + 1))[i]
            sent_by_rid[adi_origin(pf_rid, a.get("index", i))] = a.get("ims_sent", 0) - prev.get("ims_sent", 0)
    rows = []
    by_source = faults.get("by_source", {})
    for os_name, res in results.items():
        for fname, f in res.get("functions", {}).items():
            phys = f.get("origin", provenance.get(os_name, {}).get(f["rid"], f["rid"]))
            sent = sent_by_rid.get(phys, 0)
            row = {"os": os_name, "function": fname, "rid": rid_str(f["rid"]), "phys": describe(phys),
                   "sent": sent, "delivered": f["completed"], "interrupts": f["interrupts"],
                   "handled": f.get("handled", 0),
                   "target": f["target"], "burst": f.get("burst", 1), "lost": max(sent - f["interrupts"], 0),
                   "record_missing": f["record_missing"], "rate_per_s": f["rate_per_s"],
                   "latency": f["latency"], "hist": f["hist"], "irq_mode": f.get("irq_mode", "msix"),
                   "ims_error": f.get("ims_error", ""), "breaches": f.get("breaches", 0),
                   "removed": f.get("removed", "")}
            row["outcome"], row["why"] = _outcome(row, by_source)
            rows.append(row)
        for fname, f in res.get("failed", {}).items():
            phys = f["origin"]
            rows.append({"os": os_name, "function": f"dev {fname}", "rid": fname, "phys": describe(phys),
                         "sent": sent_by_rid.get(phys, 0), "delivered": 0, "interrupts": 0, "target": 0,
                         "lost": 0, "record_missing": 0, "rate_per_s": None,
                         "latency": {"count": 0, "p50_us": None, "p99_us": None, "p999_us": None,
                                     "max_us": None},
                         "hist": "", "irq_mode": "none", "ims_error": f["error"], "breaches": 0,
                         "outcome": "clean error", "why": f"the driver could not bind: {f['error']}"})
    oses = {name: {**res.get("os", {}), "died": res.get("died", False), "timed_out": res.get("timed_out", False),
                   "stalled": res.get("stalled", False), "elapsed_s": res.get("elapsed_s")}
            for name, res in results.items()}
    total_sent = sum(r["sent"] for r in rows)
    total_delivered = sum(r["interrupts"] for r in rows)
    ok = (bool(rows) and all(r["outcome"] in ("delivered", "clean error") for r in rows)
          and not any(o.get("breaches") for o in oses.values()))
    elapsed = max((o["elapsed_s"] or 0) for o in oses.values()) if oses else 0
    return {"topology": topo.name, "ok": ok, "timed_out": any(o["timed_out"] for o in oses.values()),
            "elapsed_s": elapsed, "functions": rows, "oses": oses, "host": oses.get("host", {}),
            "total_sent": total_sent, "total_delivered": total_delivered,
            "fabric": fabric, "faults": faults, "vms": vms or {}}


def control_request(runtime: str, peer: str, op: str, args: dict | None = None, timeout: float = 30.0):
    """Ask a running ``launch.py run --hold`` topology (by its runtime directory) one question."""
    import msgpack
    import zmq
    path = os.path.join(runtime, "launcher.sock")
    if not os.path.exists(path):
        raise LabError(f"no running topology at {runtime} (no launcher.sock); start one with "
                       f"'launch.py run --hold'")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        sock.connect(f"ipc://{path}")
        sock.send(msgpack.packb([peer, op, args or {}], use_bin_type=True))
        try:
            ok, result = msgpack.unpackb(sock.recv(), raw=False)
        except zmq.Again:
            raise LabError(f"the launcher at {runtime} did not answer within {timeout:.0f} s") from None
    finally:
        sock.close(0)
        ctx.term()
    if not ok:
        raise LabError(str(result))
    return result

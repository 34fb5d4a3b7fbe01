"""The authenticated tcp transport (DESIGN.md §3, docs/multihost.md).

Over tcp the launcher issues CURVE keys: the fabric's ROUTER is a CURVE server whose ZAP
handler admits exactly the client keys the launcher issued; the one-time tokens stay.
These tests run real processes: a tcp topology on 127.0.0.1, clients with a wrong key or no
CURVE at all, a topology split by ``launch.py commands`` and started by hand, and a topology
split across two network namespaces joined by a veth pair.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import zmq

from fabric import wire
from fabric.port import Port, PortError
from irqlab.lab import REPO_ROOT, _free_port
from tests.conftest import _alive

TCP = {"transport": "tcp"}
#: how long a refused client waits for a WELCOME that must not come
REFUSED_WAIT_S = 3.0
WAIT_S = 30.0


async def counters_until(lab, pred, what: str, timeout: float = WAIT_S) -> dict:
    """Poll the fabric's counters until ``pred(counters)``; fail saying what was seen."""
    deadline = time.monotonic() + timeout
    while True:
        c = await lab.call("fabric", "counters")
        if pred(c):
            return c
        if time.monotonic() > deadline:
            seen = {k: v for k, v in c.items() if k.startswith(("zap:", "refused:", "drop:", "registered"))}
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; fabric counters: {seen}")
        await asyncio.sleep(0.1)


def assert_all_delivered(report: dict, per_function: int) -> None:
    assert report["functions"], report
    for r in report["functions"]:
        where = (r["os"], r["function"], r["phys"])
        assert r["sent"] == per_function, where + (r,)
        assert r["interrupts"] == per_function and r["lost"] == 0, where + (r,)
        assert r["record_missing"] == 0 and r["breaches"] == 0, where + (r,)
    assert report["ok"], report


# ----------------------------------------------------------------------------------------
# one machine: 127.0.0.1

async def test_tcp_topology_authenticates_every_process_and_delivers(start_lab):
    lab = await start_lab({**TCP, "workload": {"per_function": 2000}})
    assert lab.endpoint.startswith("tcp://127.0.0.1:"), lab.endpoint
    report = await lab.run_workload(per_function=2000, inflight=8)
    assert_all_delivered(report, 2000)
    assert {r["os"] for r in report["functions"]} == {"host", "g1", "g2"}
    counters = report["fabric"]
    assert not any(k.startswith("zap:refused") for k in counters), counters

    # the secrets on disk: 0700 directory, 0600 files; one keypair per process, all distinct;
    # the fabric admits exactly the issued client keys, each process holds only its own secret
    assert stat.S_IMODE(os.stat(lab.runtime).st_mode) == 0o700
    with open(os.path.join(lab.runtime, "fabric.json")) as f:
        fab = json.load(f)
    names = ["control", "host", "d0", "g1", "g2"]
    assert sorted(fab["curve"]["clients"]) == sorted(names)
    pubs = [fab["curve"]["public"]] + list(fab["curve"]["clients"].values())
    assert len(set(pubs)) == len(pubs)
    for name in ["fabric"] + names[1:]:
        path = os.path.join(lab.runtime, f"{name}.json")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        if name == "fabric":
            continue
        with open(path) as f:
            cfg = json.load(f)
        assert cfg["curve"]["server"] == fab["curve"]["public"], name
        assert cfg["curve"]["public"] == fab["curve"]["clients"][name], name
        assert "token" not in cfg, f"{name}: the token belongs in the environment, not the file"
        assert zmq.curve_public(cfg["curve"]["secret"].encode()) == cfg["curve"]["public"].encode(), name
    assert "tokens" in fab and len(fab["tokens"]) == len(names)


async def test_wrong_key_and_no_curve_cannot_register(start_lab):
    # An issued, unused token: the CURVE gate must stop a client even when it holds one.
    lab = await start_lab({**TCP, "guest": []}, spawn=(), stubs={"rogue": ("device", (9, 9))})
    server_key = lab.curve["rogue"]["server"]
    tried = []

    async def must_be_refused(label: str, curve: dict | None) -> None:
        port = Port(lab.endpoint, lab.tokens["rogue"], "rogue", curve=curve)
        tried.append(port)
        with pytest.raises(PortError, match="no WELCOME"):
            await port.connect(timeout=REFUSED_WAIT_S)
        assert port.info == {}, f"{label}: registered"
        port.close(0)

    def grew(before: dict, *keys: str):
        return lambda c: sum(c.get(k, 0) for k in keys) > sum(before.get(k, 0) for k in keys)

    # 1. a fresh keypair the launcher never issued (it knows the server key: that is public)
    pub, sec = zmq.curve_keypair()
    await must_be_refused("unknown key", {"server": server_key, "public": pub, "secret": sec})
    c = await counters_until(lab, lambda c: c.get("zap:refused:unknown_key", 0) >= 1,
                             "the fabric to count the unknown key (zap:refused:unknown_key)")
    # 2. no CURVE at all (a plain ZMTP client, what every process was before this transport).  Who
    # sees the mechanism mismatch first is a race: the fabric (no_curve) or the client, which then
    # hangs up mid-handshake (handshake).
    await must_be_refused("no CURVE", None)
    c = await counters_until(lab, grew(c, "zap:refused:no_curve", "zap:refused:handshake"),
                             "the fabric to count the client without CURVE (zap:refused:no_curve or :handshake)")
    # 3. the issued client key but the wrong server key: the fabric cannot decrypt its HELLO
    wrong_server, _ = zmq.curve_keypair()
    await must_be_refused("wrong server key", {**lab.curve["rogue"], "server": wrong_server})
    c = await counters_until(lab, grew(c, "zap:refused:handshake"),
                             "the fabric to count the failed handshake (zap:refused:handshake)")
    assert c["zap:refused"] >= 3, c
    # none of them reached the bus: no frame from them was seen, their token is still unused
    assert c.get("drop:unregistered", 0) == 0 and c.get("refused:token", 0) == 0, c
    assert "rogue" not in await lab.call("fabric", "peers")
    # ... so the process the launcher issued that token and key to registers with them
    good = Port(lab.endpoint, lab.tokens["rogue"], "rogue", curve=lab.curve["rogue"])
    try:
        info = await good.connect(timeout=WAIT_S)
        assert info.get("buses") == [9, 9], info
        assert "rogue" in await lab.call("fabric", "peers")
    finally:
        good.close(0)


# ----------------------------------------------------------------------------------------
# launch.py commands: a split topology started by hand (here all on 127.0.0.1)

def _default_toml() -> str:
    with open(os.path.join(REPO_ROOT, "irqlab", "default_topology.toml")) as f:
        return f.read()


def _tcp_topology_file(tmp_path) -> str:
    text = _default_toml()
    assert 'transport = "ipc"' in text
    path = tmp_path / "split.toml"
    path.write_text(text.replace('transport = "ipc"', 'transport = "tcp"'))
    return str(path)


def _launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_commands_rejects_bad_input_in_one_line(tmp_path):
    topo = _tcp_topology_file(tmp_path)
    ipc = tmp_path / "ipc.toml"
    ipc.write_text(_default_toml())
    cases = [
        ((topo, "--listen", "10.0.0.1"), "expected HOST:PORT"),
        ((topo, "--listen", "fabric.example:5555"), "must be an IPv4 address"),
        ((topo, "--listen", "0.0.0.0:5555"), "cannot be 0.0.0.0"),
        ((topo, "--listen", "10.0.0.1:70000"), "PORT must be 1..65535"),
        ((str(ipc), "--listen", "10.0.0.1:5555"), 'needs transport = "tcp"'),
        ((str(tmp_path / "missing.toml"), "--listen", "10.0.0.1:5555"), "cannot read"),
    ]
    for args, needle in cases:
        p = _launch("commands", *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert needle in p.stderr and p.stderr.startswith("launch.py: "), (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert p.stdout == "", (args, p.stdout)


async def test_commands_split_topology_runs_by_hand(tmp_path):
    port = _free_port()
    p = _launch("commands", _tcp_topology_file(tmp_path), "--listen", f"127.0.0.1:{port}",
                "--python", sys.executable, "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    runtime = plan["runtime"]
    procs: list[subprocess.Popen] = []
    ctl = None
    try:
        assert plan["endpoint"] == f"tcp://127.0.0.1:{port}"
        assert [e["name"] for e in plan["processes"]] == ["fabric", "control", "d0", "host", "g1", "g2"]
        for e in plan["processes"]:
            for f in e["files"]:
                assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
        # the human-readable form names every file and command
        text = _launch("commands", _tcp_topology_file(tmp_path), "--listen", f"127.0.0.1:{port}")
        assert text.returncode == 0, text.stderr
        assert "python -m device --runtime" in text.stdout and "d0.json" in text.stdout, text.stdout
        shutil.rmtree(text.stdout.split("runtime directory ", 1)[1].split()[0], ignore_errors=True)

        events: list[list] = []
        ready = asyncio.Event()

        def on_message(msg):
            if msg[0] == wire.EVENT:
                events.append(msg)
                ready.set()

        async def started(e: dict) -> None:
            with open(os.path.join(runtime, f"{e['name']}.log"), "wb") as log:
                procs.append(subprocess.Popen(e["argv"], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=log, start_new_session=True))
            if e["role"] == "fabric":
                return
            deadline = time.monotonic() + WAIT_S
            while not any(m[1] == e["name"] and m[2] in ("ready", "failed") for m in events):
                ready.clear()
                dead = [q.args for q in procs if q.poll() is not None]
                assert not dead, f"exited before {e['name']} was ready: {dead}"
                assert time.monotonic() < deadline, (
                    f"timed out after {WAIT_S:.0f} s waiting for {e['name']}:ready; "
                    f"events: {[f'{m[1]}:{m[2]}' for m in events]}")
                try:
                    await asyncio.wait_for(ready.wait(), 1.0)
                except TimeoutError:
                    pass
            ev = [m for m in events if m[1] == e["name"]][-1]
            assert ev[2] == "ready", ev

        for e in plan["processes"]:
            if e["role"] == "control":
                with open(e["files"][0]) as f:
                    cfg = json.load(f)
                ctl = Port(cfg["endpoint"], cfg["token"], "control", on_message=on_message, curve=cfg["curve"])
                await ctl.connect(timeout=WAIT_S)
            else:
                await started(e)
        args = {"per_function": 500, "inflight": 8, "timeout_s": 60, "stall_s": 3.0, "rate": 0.0}
        results = await asyncio.gather(*(ctl.call(n, "workload.run", args, timeout=90) for n in ("host", "g1", "g2")))
        for name, res in zip(("host", "g1", "g2"), results):
            assert res["functions"], (name, res)
            for fname, f in res["functions"].items():
                assert f["interrupts"] == 500 and f["completed"] == 500, (name, fname, f)
        counters = await ctl.call("fabric", "counters")
        assert counters.get("registered") == 5 and not any(k.startswith("zap:refused") for k in counters), counters
        for name in ("g1", "g2", "host", "d0", "fabric"):
            await ctl.call(name, "shutdown", {}, timeout=10)
        for q in procs:
            try:
                q.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{q.args} did not exit within 15 s of its shutdown") from None
        assert [q.returncode for q in procs] == [0] * len(procs), [q.args for q in procs]
    finally:
        if ctl is not None:
            ctl.close(0)
        for q in procs:
            if q.poll() is None:
                os.killpg(q.pid, signal.SIGKILL)
                q.wait(timeout=10)
        left = [q.pid for q in procs if _alive(q.pid)]
        shutil.rmtree(runtime, ignore_errors=True)
        assert not left, f"processes left behind: {left}"


# ----------------------------------------------------------------------------------------
# two network namespaces joined by a veth pair

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and p.returncode != 0:
        raise RuntimeError(f"'ip {' '.join(args)}' failed ({p.returncode}): {p.stderr.strip()}")
    return p


@pytest.fixture(scope="session")
def ip_netns() -> str | None:
    """``None`` when ``ip netns`` works here, else why not (the test fails with that reason)."""
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}); 'ip netns add' needs CAP_SYS_ADMIN"
    if shutil.which("ip") is None:
        return "no 'ip' command (install iproute2)"
    probe = f"irqlab-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns add' failed: {exc}"
    try:
        _ip("netns", "exec", probe, "true")
        _ip("-n", probe, "link", "add", "irqp0", "type", "veth", "peer", "name", "irqp1")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces are only half available: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class TwoNamespaces:
    """``irqlab-<unique>-a`` and ``-b`` joined by a veth pair, 10.250.N.1/30 <-> 10.250.N.2/30."""

    def __init__(self) -> None:
        unique = uuid.uuid4().hex[:8]
        self.a, self.b = f"irqlab-{unique}-a", f"irqlab-{unique}-b"
        n = int(unique[:2], 16) % 250
        self.addr_a, self.addr_b = f"10.250.{n}.1", f"10.250.{n}.2"
        self._veth = f"irq{unique[:6]}"

    def create(self) -> None:
        _ip("netns", "add", self.a)
        _ip("netns", "add", self.b)
        _ip("link", "add", self._veth + "a", "netns", self.a, "type", "veth",
            "peer", "name", self._veth + "b", "netns", self.b)
        for ns, dev, addr in ((self.a, self._veth + "a", self.addr_a), (self.b, self._veth + "b", self.addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        ping = subprocess.run(["ip", "netns", "exec", self.b, "ping", "-c", "1", "-W", "2", self.addr_a],
                              capture_output=True, text=True, timeout=10) if shutil.which("ping") else None
        if ping is not None and ping.returncode != 0:
            raise RuntimeError(f"{self.b} cannot reach {self.addr_a} over the veth pair: {ping.stdout}{ping.stderr}")

    def destroy(self) -> list[str]:
        """Kill what still runs inside (only ours: the namespaces are this test's), delete both;
        return the namespaces that could not be deleted."""
        failed = []
        for ns in (self.a, self.b):
            if ns not in _ip("netns", "list", check=False).stdout.split():
                continue
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if _ip("netns", "del", ns, check=False).returncode != 0:
                failed.append(ns)
        return failed


#: a client in namespace b with a fresh key: sends HELLO with an issued token, waits for any answer
INTRUDER = textwrap.dedent("""
    import json, sys, zmq
    from fabric import wire
    endpoint, server, token = sys.argv[1:4]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    pub, sec = zmq.curve_keypair()
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server.encode(), pub, sec
    s.connect(endpoint)
    s.send(wire.hello(token, "rogue"))
    answered = bool(s.poll(%d))
    print(json.dumps({"answered": answered}))
    s.close(0)
    ctx.term()
""" % int(REFUSED_WAIT_S * 1000))


async def test_two_namespaces_guest_across_a_veth_pair(start_lab, ip_netns):
    if ip_netns is not None:
        pytest.fail(f"ip netns is not available here, so the two-namespace test cannot run: {ip_netns}. "
                    f"It needs root and iproute2 (ip netns add/exec, veth).")
    ns = TwoNamespaces()
    lab = None
    try:
        ns.create()
        listen = f"{ns.addr_a}:5555"
        netns = {"fabric": ns.a, "d0": ns.a, "host": ns.a, "g2": ns.a, "g1": ns.b}
        lab = await start_lab({**TCP, "workload": {"per_function": 1000}}, netns=netns, listen=listen,
                              stubs={"rogue": ("guest", None)})
        # the fabric is in namespace a: the controller (root namespace) reaches it by its ipc endpoint
        assert lab.endpoint == f"tcp://{listen}"
        assert lab.port.endpoint == lab.local_endpoint and lab.local_endpoint.startswith("ipc://")
        for name, where in netns.items():
            pid = lab.children[name].proc.pid
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{where}").st_ino, (name, where)

        report = await lab.run_workload(per_function=1000, inflight=8)
        assert_all_delivered(report, 1000)
        g1 = [r for r in report["functions"] if r["os"] == "g1"]
        assert len(g1) == 1 and g1[0]["function"].startswith("vf") and g1[0]["phys"] == "01:00.1", g1  # d0.vf0
        assert g1[0]["interrupts"] == 1000 and g1[0]["lost"] == 0, g1

        # a client with a key the launcher never issued, from namespace b, holding a valid token
        before = (await lab.call("fabric", "counters")).get("zap:refused:unknown_key", 0)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns.b, sys.executable, "-c", INTRUDER, lab.endpoint,
            lab.curve["rogue"]["server"], lab.tokens["rogue"], cwd=REPO_ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(REFUSED_WAIT_S + 20):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("the intruder in namespace b did not finish") from None
        assert proc.returncode == 0, err.decode()
        assert json.loads(out) == {"answered": False}, (out, err)
        await counters_until(lab, lambda c: c.get("zap:refused:unknown_key", 0) > before,
                             f"the fabric to count the unknown key from {ns.b}")
        assert "rogue" not in await lab.call("fabric", "peers")
    finally:
        pids = lab.pids() if lab is not None else []
        if lab is not None:
            await lab.stop()
        failed = ns.destroy()
        left = [p for p in pids if _alive(p)]
        listed = _ip("netns", "list", check=False).stdout
        assert not left, f"processes left behind: {left}"
        assert not failed and ns.a not in listed and ns.b not in listed, f"namespaces left behind: {listed}"

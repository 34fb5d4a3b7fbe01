"""launch.py as a user runs it: its report, its exit status, its errors, and that it leaves nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from irqlab.lab import LabError
from tests.conftest import _alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = [sys.executable, os.path.join(ROOT, "launch.py")]


def project_processes() -> dict[int, tuple[int, str]]:
    """Live processes of ours (fabric, host, device, guest shells): pid -> (ppid, command line)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        if any(f" -m {m} " in cmd for m in ("fabric", "host", "device", "guest")):
            out[int(pid)] = (int(fields[1]), cmd)
    return out


async def run_launch(*args: str, timeout: float = 240) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*LAUNCH, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"launch.py {' '.join(args)} did not finish within {timeout} s")
    return proc.returncode, out.decode(), err.decode()


async def test_default_run_reports_every_function_and_exits_0():
    before = set(project_processes())
    rc, out, err = await run_launch("--per-function", "300")
    assert rc == 0, (out, err)
    assert "PASS: every outcome as it should be" in out, out
    # the host drives the PF; g1 and g2 each drive the VF assigned to them
    assert "PF 01:00.0" in out and "(= 01:00.1)" in out and "(= 01:00.2)" in out, out
    for os_name in ("host", "g1", "g2"):
        assert f"  {os_name} " in out, out
    assert "total: 900 sent, 900 delivered" in out, out
    assert set(project_processes()) - before == set(), project_processes()


async def test_json_report_is_machine_readable():
    rc, out, err = await run_launch("run", "--json", "--per-function", "200")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] is True
    assert report["total_sent"] == report["total_delivered"] == 600
    assert {r["phys"] for r in report["functions"]} == {"01:00.0", "01:00.1", "01:00.2"}
    assert {r["os"] for r in report["functions"]} == {"host", "g1", "g2"}
    assert all(r["lost"] == 0 and r["outcome"] == "delivered" for r in report["functions"])


async def test_bad_topology_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\nname = "d0"\nvfs = 9\n')
    rc, out, err = await run_launch("run", str(bad))
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines == [f"launch.py: {bad}: device[0].vfs: 9 exceeds device[0].total_vfs = 4"], err
    assert "Traceback" not in err + out


async def test_missing_topology_file():
    rc, out, err = await run_launch("run", "/nonexistent/topo.toml")
    assert rc == 2 and "cannot read" in err and "Traceback" not in err


async def test_sigint_stops_everything():
    proc = await asyncio.create_subprocess_exec(*LAUNCH, "--per-function", "2000000", "--inflight", "4",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                cwd=ROOT)
    # Wait until the topology is up (the launcher logs to stderr that it runs the workload).
    line, seen = b"", []
    async with asyncio.timeout(120):
        while b"running" not in line:
            line = await proc.stderr.readline()
            seen.append(line)
            assert line, b"".join(seen).decode() + (await proc.stdout.read()).decode()
    kids = [pid for pid, (ppid, _) in project_processes().items() if ppid == proc.pid]
    assert len(kids) == 5, project_processes()  # fabric, device, host, g1, g2
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(60):
        rc = await proc.wait()
    assert rc == 130
    for pid in kids:
        assert not _alive(pid), pid


async def test_a_dying_device_is_named_in_the_report(start_lab):
    lab = await start_lab()
    dev = lab.children["d0"]
    os.kill(dev.proc.pid, signal.SIGKILL)
    await lab.wait_event(lambda e: e.name == "d0" and e.kind == "reclaimed", "d0's removal to be handled")
    report = await lab.run_workload(per_function=100, inflight=8, stall_s=2.0)
    assert [(d["name"], d["role"], d["how"]) for d in report["deaths"]] == [("d0", "device", "SIGKILL")]
    # every function of the default topology lives on d0: all report the surprise removal
    assert report["functions"] and all(r["outcome"] == "clean error" and "surprise removal" in r["why"]
                                       for r in report["functions"]), report["functions"]


async def wait_exit(pid: int, timeout: float) -> None:
    """Await the death of a process that is not our child (pidfd becomes readable on exit)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await gone
    except TimeoutError:
        raise AssertionError(f"process {pid} still alive {timeout} s after its launcher died: "
                             f"{project_processes().get(pid)}") from None
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_sigkilled_launcher_takes_its_topology_with_it():
    import glob
    import shutil
    import tempfile
    runtimes = set(glob.glob(os.path.join(tempfile.gettempdir(), "irqlab-*")))
    proc = await asyncio.create_subprocess_exec(*LAUNCH, "--per-function", "2000000", "--inflight", "4",
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                                                cwd=ROOT)
    line, seen = b"", []
    async with asyncio.timeout(120):
        while b"running" not in line:
            line = await proc.stderr.readline()
            seen.append(line)
            assert line, b"".join(seen).decode()
    kids = [pid for pid, (ppid, _) in project_processes().items() if ppid == proc.pid]
    assert len(kids) == 5, project_processes()
    proc.kill()                      # no chance to clean up: the kernel must do it (PDEATHSIG)
    await proc.wait()
    for pid in kids:
        await wait_exit(pid, 30)
    # the launcher could not remove its runtime directory: we do
    for d in set(glob.glob(os.path.join(tempfile.gettempdir(), "irqlab-*"))) - runtimes:
        shutil.rmtree(d, ignore_errors=True)


async def test_hold_then_views_and_ctl_from_another_command():
    proc = await asyncio.create_subprocess_exec(*LAUNCH, "run", "--hold", "--per-function", "100",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                cwd=ROOT)
    runtime, seen = None, []
    try:
        async with asyncio.timeout(120):
            while runtime is None:
                line = (await proc.stderr.readline()).decode()
                seen.append(line)
                assert line, "".join(seen)
                if "holding the topology; runtime " in line:
                    runtime = line.rsplit(" ", 1)[1].strip()
        rc, out, err = await run_launch("views", "--runtime", runtime, "g1", "--only", "domains")
        assert rc == 0, err
        assert "== g1: irq domains ==" in out and "PCI-MSIX-0000:00:03.0" in out, out
        rc, out, err = await run_launch("views", "--runtime", runtime)
        assert rc == 0, err
        for name in ("host", "g1", "g2"):
            assert f"== {name}: /proc/interrupts ==" in out and f"== {name}: lspci -vv ==" in out, out
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "fabric", "counters")
        assert rc == 0 and json.loads(out)["injected"] == 200, (out, err)
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "nobody", "stats")
        assert rc == 3 and "no such peer 'nobody'" in err, err
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "host", "stats", "[1]")
        assert rc == 2 and "must be a JSON object" in err, err
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            await proc.wait()
    assert not os.path.exists(runtime)

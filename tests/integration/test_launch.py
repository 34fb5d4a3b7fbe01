"""launch.py as a user runs it: its report, its exit status, its errors, and that it leaves nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import pytest

from tests.conftest import _alive
from tests.integration.launcher import HOLDING, LAUNCH, ROOT, run_launch, start_held, wait_exit, wait_stderr



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


def started_by(pid: int, launcher_pid: int) -> bool:
    """Whether the lab process ``pid`` was started by the launcher ``launcher_pid`` (the Lab
    marks each child's environment with IRQLAB_PARENT_PID)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"IRQLAB_PARENT_PID={launcher_pid}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def left_behind(before: set[int], launcher_pid: int) -> dict[int, tuple[int, str]]:
    """Processes of ours that appeared since ``before`` and outlived the launcher ``launcher_pid``:
    still its children, or orphans (reparented) that it started.  Other labs on this machine
    (other engineers', other pytest-xdist workers') have their own launchers, live or dead, so
    they do not count."""
    return {pid: (ppid, cmd) for pid, (ppid, cmd) in project_processes().items()
            if pid not in before and (ppid == launcher_pid or started_by(pid, launcher_pid))}


async def test_default_run_reports_every_function_and_exits_0():
    before, launcher = set(project_processes()), []
    rc, out, err = await run_launch("--per-function", "300", pid=launcher)
    assert rc == 0, (out, err)
    assert "PASS: every outcome as it should be" in out, out
    # the host drives the PF; g1 and g2 each drive the VF assigned to them
    assert "PF 01:00.0" in out and "(= 01:00.1)" in out and "(= 01:00.2)" in out, out
    for os_name in ("host", "g1", "g2"):
        assert f"  {os_name} " in out, out
    assert "total: 900 sent, 900 delivered" in out, out
    assert left_behind(before, launcher[0]) == {}, project_processes()


async def test_json_report_is_machine_readable():
    rc, out, err = await run_launch("run", "--json", "--per-function", "200")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] is True
    assert report["total_sent"] == report["total_delivered"] == 600
    assert {r["phys"] for r in report["functions"]} == {"01:00.0", "01:00.1", "01:00.2"}
    assert {r["os"] for r in report["functions"]} == {"host", "g1", "g2"}
    assert all(r["lost"] == 0 and r["outcome"] == "delivered" for r in report["functions"])


GENERATOR_TOPOLOGY = """
[[device]]
name = "d0"
vfs = 2
irq_generator = true

[[guest]]
name = "g1"
assign = ["d0.vf0"]

[[guest]]
name = "g2"
assign = ["d0.vf1"]
"""


async def test_burst_raises_each_work_items_interrupt_n_times(tmp_path):
    """``run --burst N``: the engine's interrupt generator; every function delivers N per work
    item.  A device without the generator, or N outside 1..256, is refused in one line."""
    topo = tmp_path / "gen.toml"
    topo.write_text(GENERATOR_TOPOLOGY)
    rc, out, err = await run_launch("run", str(topo), "--json", "--per-function", "30", "--burst", "8")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] is True and report["total_sent"] == report["total_delivered"] == 3 * 30 * 8
    for r in report["functions"]:
        assert (r["burst"], r["delivered"], r["sent"], r["lost"], r["outcome"]) == (8, 30, 240, 0, "delivered"), r
    rc, out, err = await run_launch("run", str(topo), "--per-function", "10", "--burst", "3")
    assert rc == 0 and "each work item raised its interrupt 3 times" in out and "total: 90 sent" in out, out
    for args, why in ((["--burst", "0"], "--burst must be 1..256"), (["--burst", "257"], "--burst must be 1..256"),
                      (["--burst", "2"], "--burst: 2 interrupts per work item need the interrupt generator on "
                                         "every device (irq_generator = true); device[0] (d0) does not have it")):
        rc, out, err = await run_launch("run", *args)
        assert rc == 2 and err.strip() == f"launch.py: {why}" and "Traceback" not in err, err


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


async def test_run_views_include_the_fault_log_and_the_irt(tmp_path):
    """``run --views``: after the report, every OS's views, then the fabric's DMAR fault log
    (a guest that makes its VF DMA outside its memory put a line in it) and its IRT."""
    topo = tmp_path / "views.toml"
    topo.write_text('name = "views"\n[[device]]\nname = "d0"\nkind = "sriov"\nvfs = 1\n'
                    '[[guest]]\nname = "g1"\nassign = ["d0.vf0"]\nbehaviours = ["dma-outside-memory"]\n')
    rc, out, err = await run_launch("run", str(topo), "--views", "--per-function", "100")
    assert rc == 0, (out, err)
    assert "PASS: every outcome as it should be" in out, out
    for name in ("host", "g1"):
        for title in ("/proc/interrupts", "irq domains", "lspci -vv", "dmesg"):
            assert f"== {name}: {title} ==" in out, out
    faults = out.index("== fabric: DMAR fault log ==")
    irt = out.index("== fabric: interrupt remapping table ==")
    assert out.index("== g1: dmesg ==") < faults < irt, out
    fault_view = out[faults:irt].splitlines()[1:]
    assert len(fault_view) == 1 and re.fullmatch(
        r"DMAR: \[DMA Write NO_PASID\] Request device \[01:00\.1\] fault addr 0x[0-9a-f]+ "
        r"\[fault reason 0x05\] PTE Write access is not set", fault_view[0]), fault_view
    irt_view = out[irt:].splitlines()[1:]
    assert irt_view[0].startswith("Entry SrcID"), irt_view
    sids = {line.split()[1] for line in irt_view[1:] if line.strip() and line.split()[0].isdigit()}
    assert sids == {"01:00.0", "01:00.1"}, irt_view

    rc, out, err = await run_launch("run", str(topo), "--views", "--json", "--per-function", "50")
    assert rc == 0, err
    fabric = json.loads(out)["views"]["fabric"]
    assert fabric["irt"][0].startswith("Entry SrcID") and len(fabric["irt"]) > 1, fabric
    assert any("[fault reason 0x05]" in line for line in fabric["faults"]["lines"]), fabric


def launcher_children(launcher_pid: int) -> dict[str, int]:
    """The launcher's children by role (fabric, host, device, guest -> pid; the last of a role)."""
    kids = {}
    for pid, (ppid, cmd) in project_processes().items():
        if ppid == launcher_pid:
            role = next(m for m in ("fabric", "host", "device", "guest") if f" -m {m} " in cmd)
            kids[role] = pid
    return kids


@pytest.mark.parametrize("victim, hold", [("host", False), ("fabric", True)])
async def test_a_fatal_death_exits_3_naming_it_and_leaves_nothing(victim, hold):
    """The host dies mid-run, or the fabric while the topology is held: launch.py says which
    process died and how (exit status 3), and every other process goes with it."""
    args = (["run", "--hold", "--per-function", "100"] if hold
            else ["run", "--per-function", "2000000", "--inflight", "4"])
    proc = await asyncio.create_subprocess_exec(*LAUNCH, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        seen = await wait_stderr(proc, HOLDING if hold else "running")
        kids = launcher_children(proc.pid)
        assert set(kids) == {"fabric", "host", "device", "guest"}, project_processes()
        everyone = [pid for pid, (ppid, _) in project_processes().items() if ppid == proc.pid]
        assert len(everyone) == 5, project_processes()
        os.kill(kids[victim], signal.SIGKILL)
        try:
            async with asyncio.timeout(120):
                out, err = await proc.communicate()
        except TimeoutError:
            raise AssertionError(f"launch.py still running 120 s after the {victim} was killed") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = "".join(seen) + err.decode()
    assert proc.returncode == 3, (proc.returncode, err)
    assert f"launch.py: {victim} {victim!r} was killed by SIGKILL unexpectedly" in err, err
    assert "Traceback" not in err + out.decode(), err
    for pid in everyone:
        await wait_exit(pid, 30, "its launcher died")
    if hold:
        runtime = next(l for l in seen if HOLDING in l).rsplit(" ", 1)[1].strip()
        assert not os.path.exists(runtime), runtime


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


async def test_sigkilled_launcher_takes_its_topology_with_it():
    import shutil
    proc = await asyncio.create_subprocess_exec(*LAUNCH, "--per-function", "2000000", "--inflight", "4",
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                                                cwd=ROOT)
    line, seen = b"", []
    async with asyncio.timeout(120):
        while b"running" not in line:
            line = await proc.stderr.readline()
            seen.append(line)
            assert line, b"".join(seen).decode()
    ours = {pid: cmd for pid, (ppid, cmd) in project_processes().items() if ppid == proc.pid}
    assert len(ours) == 5, project_processes()
    # its runtime directory, from its children's command lines (not every new irqlab-* directory:
    # other labs on this machine have theirs)
    (runtime,) = {cmd.split(" --runtime ", 1)[1].split()[0] for cmd in ours.values()}
    proc.kill()                      # no chance to clean up: the kernel must do it (PDEATHSIG)
    await proc.wait()
    for pid in ours:
        await wait_exit(pid, 30, "its launcher died")
    # the launcher could not remove its runtime directory: we do
    shutil.rmtree(runtime, ignore_errors=True)


async def test_hold_then_views_and_ctl_from_another_command():
    proc, runtime, seen = await start_held("--per-function", "100")
    try:
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
        # the fabric's views: the IRT holds the host's PF vectors and the VFs' real MSI-X entries
        rc, out, err = await run_launch("views", "--runtime", runtime, "--only", "irt")
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0] == "== fabric: interrupt remapping table ==" and lines[1].startswith("Entry SrcID"), out
        assert {line.split()[1] for line in lines[2:]} == {"01:00.0", "01:00.1", "01:00.2"}, out
        rc, out, err = await run_launch("views", "--runtime", runtime, "--only", "faults")
        assert rc == 0 and out.splitlines() == ["== fabric: DMAR fault log ==", "(no faults)"], (out, err)
        # g1 makes its VF DMA into the interrupt range: a forged interrupt request the IR unit faults
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "g1", "hostile",
                                        '{"action": "dma-into-interrupt-range"}')
        assert rc == 0, err
        # barrier: the device answers this after the doorbell g1 rang before it (one queue), and
        # its DMA write reached the fabric before the answer (one link)
        rc, out, err = await run_launch("ctl", "--runtime", runtime, "d0", "stats")
        assert rc == 0, err
        rc, out, err = await run_launch("views", "--runtime", runtime, "--only", "faults")
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0] == "== fabric: DMAR fault log ==" and len(lines) >= 2, out
        assert all(line.startswith("DMAR: [INTR-REMAP] Request device [01:00.1] fault index 0x")
                   for line in lines[1:]), out
        assert any("[fault reason 0x20] Detected reserved fields in the decoded interrupt-remapped request"
                   in line for line in lines[1:]), out        # the 16-byte record: not a DWORD write
        # without OS names or --only: every OS's views, then the fabric's
        rc, out, err = await run_launch("views", "--runtime", runtime)
        assert rc == 0, err
        assert out.index("== g2: dmesg ==") < out.index("== fabric: DMAR fault log ==") \
            < out.index("== fabric: interrupt remapping table =="), out
        assert "[fault reason 0x20]" in out, out
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            await proc.wait()
    assert not os.path.exists(runtime)

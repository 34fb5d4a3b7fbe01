"""Guests forked from the zygote (irqlab/zygote.py) are supervised like exec'd ones: they boot and
run, a SIGKILLed one is reported and reclaimed, and nothing outlives the lab -- not even when the
zygote itself is killed (its children die with it and are reported as killed)."""

from __future__ import annotations

import asyncio
import os
import signal

from irqlab.pytest_plugin import _alive

WAIT_S = 60


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def test_forked_guests_boot_run_and_die_like_execd_ones(start_lab, monkeypatch):
    monkeypatch.setenv("IRQLAB_FORK_GUESTS", "1")      # the default topology has 2 guests
    lab = await start_lab()
    zygote = lab._zygote
    assert zygote is not None and zygote.proc.returncode is None, "the guests were not forked"
    for g in ("g1", "g2"):
        pid = lab.children[g].proc.pid
        assert ppid(pid) == zygote.proc.pid, f"{g} (pid {pid}) is not the zygote's child"
        assert os.getpgid(pid) == pid, f"{g} is not in a process group of its own"
    assert zygote.proc.pid in lab.pids()
    report = await lab.run_workload(per_function=300, inflight=8)
    for r in report["functions"]:
        assert r["outcome"] == "delivered" and r["lost"] == 0 and r["sent"] == 300, r

    os.kill(lab.children["g1"].proc.pid, signal.SIGKILL)
    ev = await lab.wait_event(lambda e: e.name == "g1" and e.kind == "reclaimed", "g1 to be reclaimed",
                              timeout=WAIT_S)
    assert ev.data["how"] == "SIGKILL", ev.data                 # the zygote reported the signal
    assert ev.data["host"]["vfs_reset"] == ["01:00.1"], ev.data
    report = await lab.run_workload(per_function=300, inflight=8)
    assert {r["os"] for r in report["functions"]} == {"host", "g2"}
    assert all(r["outcome"] == "delivered" and r["lost"] == 0 for r in report["functions"]), report["functions"]

    pids = lab.pids()
    await lab.stop()
    assert [p for p in pids if _alive(p)] == []


async def test_killing_the_zygote_takes_its_guests_and_the_lab_says_so(start_lab, monkeypatch):
    monkeypatch.setenv("IRQLAB_FORK_GUESTS", "1")
    lab = await start_lab()
    guests = {g: lab.children[g].proc.pid for g in ("g1", "g2")}
    os.killpg(lab._zygote.proc.pid, signal.SIGKILL)
    for g in guests:     # their parent-death signal: both die, and the lab records how
        ev = await lab.wait_event(lambda e, g=g: e.name == g and e.kind == "reclaimed", f"{g} to be reclaimed",
                                  timeout=WAIT_S)
        assert ev.data["how"] == "SIGKILL", ev.data
    assert all(lab.children[g].proc.returncode == -signal.SIGKILL for g in guests)
    report = await lab.run_workload(per_function=200, inflight=8)      # the host carries on
    assert [r["os"] for r in report["functions"]] == ["host"], report["functions"]   # its PF
    assert all(r["outcome"] == "delivered" for r in report["functions"])
    pids = lab.pids()
    await asyncio.wait_for(lab.stop(), WAIT_S)
    assert [p for p in pids if _alive(p)] == []

"""irqlab's pytest plugin as a user gets it: installed (the ``pytest11`` entry point), in a
fresh directory with no conftest of ours -- the docs' example passes, and a failing or
timed-out user test still leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from irqlab.pytest_plugin import _alive, irqlab_topology, row, rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs", "testing.md")
RUN_TIMEOUT = 240.0        # a whole user pytest run

#: the user files below run in strict mode, marked; fresh rootdir, our config not used
STRICT_INI = "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"

#: records the lab's pids, then (a later test, after the fixture's teardown) checks them
PIDS_CHECK = '''
PIDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pids.json")


def record(lab):
    with open(PIDS, "w") as f:
        json.dump(lab.pids(), f)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_zz_nothing_left_after_the_teardown():
    with open(PIDS) as f:
        pids = json.load(f)
    assert len(pids) >= 3, pids
    assert [p for p in pids if alive(p)] == []
'''


def doc_files() -> dict[str, str]:
    """The fenced blocks of docs/testing.md marked ``<!-- irqlab-example: NAME -->``."""
    with open(DOCS) as f:
        text = f.read()
    blocks = re.findall(r"<!-- irqlab-example: (\S+) -->\n```[a-z]*\n(.*?)^```", text, re.S | re.M)
    return dict(blocks)


def lab_processes_of(pid: int) -> dict[int, str]:
    """Live lab processes started by process ``pid`` (they carry IRQLAB_PARENT_PID=pid)."""
    mark = f"IRQLAB_PARENT_PID={pid}".encode()
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mark in env and _alive(int(entry)):
            out[int(entry)] = cmd
    return out


def run_user_pytest(directory, files: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Write ``files`` into ``directory`` and run this interpreter's pytest there, as a user would:
    rootdir and config are the directory's own, plugins come from their entry points."""
    for name, body in files.items():
        (directory / name).write_text(body)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTHONPATH")}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(directory),
           "-rA", *args, str(directory)]
    proc = subprocess.Popen(cmd, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the user's pytest run in {directory} did not finish within "
                             f"{RUN_TIMEOUT:.0f} s; output so far:\n{out}") from None
    left = lab_processes_of(proc.pid)
    assert not left, f"lab processes of the user's run still alive after it ended: {left}\n{out}"
    assert "irqlab-0.1.0" in out, f"the plugin was not loaded from its entry point:\n{out}"
    assert f"rootdir: {directory}" in out and "tests/conftest.py" not in out, out
    return proc, out


def summary(out: str) -> str:
    return out.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# no processes: the helpers


def test_irqlab_topology_merges_tables_and_replaces_arrays():
    topo = irqlab_topology({"workload": {"per_function": 7}, "guest": [], "platform": {"cpus": 4}})
    assert topo.workload.per_function == 7 and topo.workload.inflight == 8    # merged
    assert topo.platform.cpus == 4 and topo.platform.ir is True
    assert topo.guests == () and [d.name for d in topo.devices] == ["d0"]     # replaced / kept
    base = irqlab_topology({"device": [{"name": "x0", "vfs": 1}], "guest": []})
    again = irqlab_topology({"name": "again"}, base=base)
    assert again.name == "again" and [d.name for d in again.devices] == ["x0"]
    with pytest.raises(ValueError, match=r"guest\[0\]\.assign\[0\]"):
        irqlab_topology({"guest": [{"name": "g1", "assign": ["d0.vf9"]}]})


def test_row_finds_exactly_one():
    report = {"functions": [{"os": "host", "phys": "01:00.0", "outcome": "delivered"},
                            {"os": "host", "phys": "01:00.1", "outcome": "delivered"},
                            {"os": "g1", "phys": "01:00.2", "outcome": "delivered"}]}
    assert row(report, "g1")["phys"] == "01:00.2"
    assert row(report, "host", phys="01:00.1")["phys"] == "01:00.1"
    assert len(rows(report, "host")) == 2 and len(rows(report)) == 3
    with pytest.raises(AssertionError, match="expected one row for os='host', found 2"):
        row(report, "host")


# ---------------------------------------------------------------------------------------------
# (a) the docs' example, against the installed plugin


def test_docs_example_passes_against_the_installed_plugin(tmp_path):
    files = doc_files()
    assert set(files) == {"pytest.ini", "test_irqlab_example.py"}, set(files)
    proc, out = run_user_pytest(tmp_path, files)
    assert proc.returncode == 0, out
    assert re.search(r"\b4 passed\b", summary(out)) and "failed" not in summary(out), out
    assert "asyncio: mode=Mode.AUTO" in out, out


# ---------------------------------------------------------------------------------------------
# (b) a failing test still reaps


def test_a_failing_user_test_leaves_no_process(tmp_path):
    user = textwrap.dedent('''
        import json, os
        import pytest


        @pytest.mark.asyncio
        async def test_fails_with_a_lab_running(irqlab):
            lab = await irqlab({"guest": [{"name": "g1", "assign": ["d0.vf0"]}]})
            record(lab)
            assert lab.row(await lab.run(per_function=50), "g1")["outcome"] == "delivered"
            assert False, "deliberate failure"
        ''') + PIDS_CHECK
    proc, out = run_user_pytest(tmp_path, {"pytest.ini": STRICT_INI, "test_user.py": user})
    assert proc.returncode == 1, out
    assert re.search(r"\b1 failed, 1 passed\b", summary(out)) and "error" not in summary(out), out
    assert "AssertionError: deliberate failure" in out, out
    assert "PASSED test_user.py::test_zz_nothing_left_after_the_teardown" in out, out


# ---------------------------------------------------------------------------------------------
# (c) a test stopped by pytest-timeout still reaps


# the run: interrupts flow (50 work items a second per function) until the timeout stops the
# test; unthrottled it would spend ~10 s of both cores on traffic nobody looks at
@pytest.mark.parametrize("wait", [
    'await lab.wait_event("never-happens", "g1", timeout=600)',
    "await lab.run(per_function=10_000_000, inflight=4, rate=50, timeout_s=600)",
], ids=["wait_event", "run"])
def test_a_timed_out_user_test_leaves_no_process(tmp_path, wait):
    user = textwrap.dedent(f'''
        import json, os
        import pytest


        @pytest.mark.timeout(10)
        @pytest.mark.asyncio
        async def test_waits_too_long(irqlab):
            lab = await irqlab()
            record(lab)
            {wait}
        ''') + PIDS_CHECK
    proc, out = run_user_pytest(tmp_path, {"pytest.ini": STRICT_INI, "test_user.py": user})
    assert proc.returncode == 1, out
    assert re.search(r"\b1 failed, 1 passed\b", summary(out)) and "error" not in summary(out), out
    assert "Failed: Timeout (>10.0s) from pytest-timeout" in out, out
    assert "PASSED test_user.py::test_zz_nothing_left_after_the_teardown" in out, out
    assert "Task was destroyed" not in out and "unhandled exception" not in out, out


def test_a_timeout_during_the_teardown_is_reported_after_reaping(tmp_path):
    # the alarm is made to fire while Lab.stop() runs: it must not interrupt the reaping
    user = textwrap.dedent('''
        import asyncio, json, os, signal
        import pytest

        LABS = []


        @pytest.mark.timeout(60)
        @pytest.mark.asyncio
        async def test_alarm_in_teardown(irqlab):
            lab = await irqlab({"guest": []})
            record(lab)
            LABS.append(lab.lab)
            stop = lab.lab.stop

            async def stop_late(*args, **kwargs):
                signal.setitimer(signal.ITIMER_REAL, 0.01)    # pytest-timeout's alarm, now
                await asyncio.sleep(0.5)
                return await stop(*args, **kwargs)
            lab.lab.stop = stop_late


        def test_zz_stop_ran_to_completion():
            assert LABS[0].shutdown_status is not None and LABS[0].shutdown_status.value == "polite"
        ''') + PIDS_CHECK
    proc, out = run_user_pytest(tmp_path, {"pytest.ini": STRICT_INI, "test_user.py": user})
    assert proc.returncode == 1, out
    assert re.search(r"\b3 passed, 1 error\b", summary(out)), out
    assert "ERROR at teardown of test_alarm_in_teardown" in out and "Failed: Timeout" in out, out
    assert "PASSED test_user.py::test_zz_stop_ran_to_completion" in out, out
    assert "PASSED test_user.py::test_zz_nothing_left_after_the_teardown" in out, out

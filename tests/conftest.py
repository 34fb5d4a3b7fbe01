"""Fixtures shared by the integration tests: topologies of real processes that are always reaped.

The lab fixture is irqlab's own pytest plugin (``irqlab/pytest_plugin.py``, registered by the
``pytest11`` entry point, see ``docs/testing.md``); ``start_lab`` is its historical name here.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

from irqlab.pytest_plugin import _alive, irqlab_topology  # noqa: F401  (_alive: test_launch.py)
from irqlab.topology import Topology

# The suite starts several hundred Python processes (every lab's fabric, devices, host and
# guests; launch.py; the plugin tests' own pytest runs).  With PYTHONDONTWRITEBYTECODE set
# (containers often set it) each of them would compile the project from source again, and
# pytest would rewrite every test module again in each run and worker: ~20% of the suite's
# CPU.  The bytecode goes where Python puts it by default (``__pycache__``, ignored by git).
# Set here, in the first conftest pytest loads: before the test modules are imported and
# before pytest-xdist starts its workers, which inherit the environment.
if sys.dont_write_bytecode or os.environ.get("PYTHONDONTWRITEBYTECODE"):
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Two shared cores and process-level tests next door: Hypothesis's per-example deadline and
# its "too slow" health check would measure the machine's load, not the code.  Property
# tests here assert behaviour only (speed is bench/'s business).
settings.register_profile("irqlab", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("irqlab")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one pytest-xdist worker per core, plus one.  The process
    tests spend part of their time waiting -- for a boot, for the stall that proves a silent
    loss, for a timeout that must expire, for a launcher to exit -- and the extra worker runs
    other tests meanwhile (on 2 cores, 3 workers keep both cores busy where 2 left them idle
    a sixth of the time).  ``-n 0`` runs everything in one process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 1


#: The modules with the suite's longest tests (a user's whole pytest run, a matrix group of six
#: labs, a Hypothesis state machine, a launcher whose fabric dies, a timeout that must expire).
RUN_FIRST = ("integration/test_plugin.py", "integration/test_matrix.py", "unit/test_fuzz_isolation.py",
             "integration/test_launch.py", "integration/test_tcp_curve.py", "integration/test_recovery.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Longest first: the RUN_FIRST modules, then the other process tests, then the unit tests.
    pytest-xdist hands the tests out in this order, one at a time as a worker frees up
    (pyproject: ``--dist load --maxschedchunk 1``), so the long ones start early side by side
    and the run ends with short tests on every worker, not with one long test on one worker
    while the others idle.  Only the order changes, never which tests run."""
    def rank(item) -> int:
        module = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        if module in RUN_FIRST:
            return RUN_FIRST.index(module)
        return len(RUN_FIRST) + (0 if module.startswith("integration/") else 1)
    items.sort(key=rank)             # stable: the order inside each module is kept


#: Case 1 only: no guests, so the host drives the PF and both VFs itself.
CASE1 = {"guest": []}


def topology(overrides: dict | None = None) -> Topology:
    """The built-in default topology with ``overrides`` merged in (section by section)."""
    return irqlab_topology(overrides)


@pytest.fixture
def start_lab(irqlab):
    """Factory: ``lab = await start_lab(topology_or_overrides, **Lab kwargs)`` -- the plugin's
    ``irqlab`` fixture: every lab it starts is stopped after the test (pass, fail or timeout)
    and none of its processes may be left alive."""
    return irqlab

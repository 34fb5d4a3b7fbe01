"""Fixtures shared by the integration tests: topologies of real processes that are always reaped.

The lab fixture is irqlab's own pytest plugin (``irqlab/pytest_plugin.py``, registered by the
``pytest11`` entry point, see ``docs/testing.md``); ``start_lab`` is its historical name here.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from irqlab.pytest_plugin import _alive, irqlab_topology  # noqa: F401  (_alive: test_launch.py)
from irqlab.topology import Topology

# Two shared cores and process-level tests next door: Hypothesis's per-example deadline and
# its "too slow" health check would measure the machine's load, not the code.  Property
# tests here assert behaviour only (speed is bench/'s business).
settings.register_profile("irqlab", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("irqlab")

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

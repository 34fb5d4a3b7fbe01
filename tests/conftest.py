"""Fixtures shared by the integration tests: topologies of real processes that are always reaped."""

from __future__ import annotations

import os

import pytest

from irqlab.lab import Lab
from irqlab.topology import Topology, load


#: Case 1 only: no guests, so the host drives the PF and both VFs itself.
CASE1 = {"guest": []}


def topology(overrides: dict | None = None) -> Topology:
    """The built-in default topology with ``overrides`` merged in (section by section)."""
    d = load(None).to_dict()
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return Topology.from_dict(d, source="<test>")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent reaps it).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
async def start_lab():
    """Factory: ``lab = await start_lab(topology_or_overrides, **Lab kwargs)``.

    Records every lab it starts and, after the test (pass, fail or timeout),
    stops them all and asserts that none of their processes is still alive.
    """
    labs: list[Lab] = []

    async def start(topo: Topology | dict | None = None, **kwargs) -> Lab:
        if not isinstance(topo, Topology):
            topo = topology(topo)
        lab = Lab(topo, **kwargs)
        labs.append(lab)
        await lab.start()
        return lab

    try:
        yield start
    finally:
        pids = []
        for lab in labs:
            pids += lab.pids()
            await lab.stop()
        left = [p for p in pids if _alive(p)]
        assert not left, f"processes left behind: {left}"

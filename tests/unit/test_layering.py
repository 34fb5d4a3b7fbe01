"""DESIGN.md §9: who may import whom (the layering mirrors who may know what in a real machine)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "fabric": {"host", "guest", "device", "irqlab"},
    "device": {"host", "guest", "irqlab"},
    "guest": {"host", "device", "irqlab"},
    "host": {"device", "irqlab"},
}


def imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(imports(f) & FORBIDDEN[package]) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_models_do_no_io():
    """The models are sans-I/O: only the process shells and ports touch zmq or asyncio."""
    shells = {"fabric/process.py", "fabric/port.py", "fabric/loop.py", "host/process.py", "host/hw.py",
              "host/vmm.py", "device/process.py", "guest/process.py", "guest/hw.py", "guest/shell.py",
              "guest/hostile.py"}
    offenders = {}
    for pkg in ("fabric", "device", "guest", "host"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            if rel in shells or f.name == "__main__.py":
                continue
            used = imports(f) & {"zmq", "asyncio", "socket", "subprocess"}
            if used:
                offenders[rel] = sorted(used)
    assert not offenders, offenders

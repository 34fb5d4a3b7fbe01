"""``launch.py matrix``: every row of DESIGN.md §5, quiet and with a hostile guest, observed = expected."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from irqlab import matrix
from tests.integration.launcher import run_launch


#: The rows in four ``launch.py matrix ROW...`` runs of about the same length (each group has
#: at most one of the rows whose silent loss is detected by a stall), so that pytest-xdist can
#: run them side by side; ``test_matrix_groups_are_every_row_once`` keeps them complete.
GROUPS = (("1", "2", "2-hidden"), ("2-ims", "2-oldkvm", "2-legacy"),
          ("3", "3-noplat", "4-unsafe"), ("4", "4-noemul", "mangle"))


def test_matrix_groups_are_every_row_once():
    ids = [i for group in GROUPS for i in group]
    assert sorted(ids) == sorted(r.id for r in matrix.ROWS) and len(ids) == len(set(ids)) == 12, ids


@pytest.mark.parametrize("ids", GROUPS, ids="+".join)
async def test_matrix_every_row_observed_as_expected(ids):
    rc, out, err = await run_launch("matrix", *ids, "--json", timeout=600)
    result = json.loads(out)
    assert result["mismatches"] == [], (result["mismatches"], err)
    assert rc == 0
    rows = {(r["row"], r["hostile"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((i, h) for i in ids for h in (False, True)), sorted(rows)
    if "2-hidden" in ids:
        assert rows[("2-hidden", False)]["observed"] == "silent loss detected"
        assert "fault 0x25" in rows[("2-hidden", False)]["why"]
    if "4-unsafe" in ids:
        assert rows[("4-unsafe", True)]["observed"] == "breach" and rows[("4-unsafe", True)]["breaches"] >= 1
    # in the secure rows the attacks were stopped: faults recorded, refusals logged, no breach
    for rid in {"2-ims", "3", "4"} & set(ids):
        r = rows[(rid, True)]
        assert r["breaches"] == 0 and r["observed"] == "delivered", r
        assert r["refused"].get("evil", 0) >= 3, r
        assert any(f for f in r["faults"].values()), r
    if "3" in ids:
        assert "0x26" in rows[("3", True)]["faults"]["01:00.0"]          # the PASID check caught the redirect


def test_launch_matrix_without_rows_runs_every_row_quiet_and_hostile(monkeypatch, capsys):
    """``launch.py matrix`` with no row named runs all of them, each quiet and with a hostile
    guest (the rows' runs are replaced: what is tested is which ones the launcher runs)."""
    import launch
    ran = []

    async def run_row(row, hostile, on_progress=None):
        ran.append((row.id, hostile))
        return {"row": row.id, "title": row.title, "hostile": hostile, "expected": row.expected,
                "observed": row.expected, "why": "", "ok": True, "breaches": 0,
                "faults": {}, "refused": {}, "attacks": [], "seconds": 0.1}

    monkeypatch.setattr(matrix, "run_row", run_row)
    rc = launch._run_matrix(argparse.Namespace(rows=[], quiet_only=False, json=True))
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["ok"] is True and result["mismatches"] == [], result
    assert ran == [(r.id, h) for r in matrix.ROWS for h in (False, True)] and len(ran) == 24, ran


async def test_matrix_rejects_unknown_rows():
    rc, out, err = await run_launch("matrix", "9-nonexistent")
    assert rc == 2 and "unknown row(s) 9-nonexistent" in err and "Traceback" not in err


# -- rows that do not pass are reported, never raised and never counted as passing -------------


#: row 2 with a device kind nobody knows: its topology cannot even be built
BROKEN = dataclasses.replace(matrix.ROWS[1], id="2-broken", devices=({"name": "d0", "kind": "no-such-kind"},))


async def test_a_row_whose_topology_cannot_start_is_an_error_row():
    res = await matrix.run_row_reported(BROKEN, False)
    assert res["observed"] == "error" and res["ok"] is False, res
    assert res["why"].startswith("TopologyError: ") and "no-such-kind" in res["why"], res
    assert matrix.how(res) == res["why"] and matrix.to_json([res])["mismatches"] == ["2-broken"]


async def test_a_row_that_is_not_implemented_says_so(monkeypatch):
    async def not_yet(row, hostile, on_progress=None):
        raise NotImplementedError("row 5: no model of it yet")
    monkeypatch.setattr(matrix, "run_row", not_yet)
    res = await matrix.run_row_reported(matrix.ROWS[0], True)
    assert (res["observed"], res["why"], res["ok"], res["hostile"]) == (
        "not implemented", "row 5: no model of it yet", False, True), res


async def test_a_wrong_expectation_is_a_mismatch(start_lab):
    """Row 2 delivers; told to expect a clean error, the matrix reports the mismatch."""
    row = dataclasses.replace(matrix.ROWS[1], id="2-wrong", expected="clean error")
    lab = await start_lab(row.topology(False))
    res = await matrix.observe_row(lab, row, False)
    assert (res["expected"], res["observed"], res["ok"]) == ("clean error", "delivered", False), res
    assert matrix.to_json([res]) == {"rows": [res], "ok": False, "mismatches": ["2-wrong"]}


def test_launch_matrix_reports_failing_rows_and_exits_1(monkeypatch, capsys):
    """``launch.py matrix`` with a row that raises (not a LabError) and a row observed wrong:
    both are reported (JSON and table), the matrix finishes, and the exit status is 1.  The
    rows' runs are replaced (no processes): what is tested is the launcher's handling."""
    import launch
    rows = [dataclasses.replace(matrix.ROWS[0], id="boom"), dataclasses.replace(matrix.ROWS[1], id="wrong")]

    async def run_row(row, hostile, on_progress=None):
        if row.id == "boom":
            raise RuntimeError("kaput\nsecond line")
        return {"row": row.id, "title": row.title, "hostile": hostile, "expected": row.expected,
                "observed": "silent loss detected", "why": "300 sent, 0 delivered", "ok": False, "breaches": 0,
                "faults": {}, "refused": {}, "attacks": [], "seconds": 0.1}

    monkeypatch.setattr(matrix, "select", lambda ids: rows)
    monkeypatch.setattr(matrix, "run_row", run_row)
    rc = launch._run_matrix(argparse.Namespace(rows=[], quiet_only=True, json=True))
    result = json.loads(capsys.readouterr().out)
    assert rc == 1 and result["ok"] is False and result["mismatches"] == ["boom", "wrong"], result
    boom = result["rows"][0]
    assert (boom["observed"], boom["why"], boom["ok"]) == ("error", "RuntimeError: kaput", False), boom
    rc = launch._run_matrix(argparse.Namespace(rows=[], quiet_only=True, json=False))
    out, err = capsys.readouterr()
    assert rc == 1 and "0/2 as expected; mismatches: boom, wrong" in out, out
    assert "RuntimeError: kaput" in out and "silent loss detected" in out and "Traceback" not in out + err, out

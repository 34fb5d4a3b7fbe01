"""``launch.py matrix``: every row of DESIGN.md §5, quiet and with a hostile guest, observed = expected."""

from __future__ import annotations

import json

from irqlab import matrix
from tests.integration.test_launch import run_launch


async def test_matrix_every_row_observed_as_expected():
    rc, out, err = await run_launch("matrix", "--json", timeout=600)
    result = json.loads(out)
    assert result["mismatches"] == [], (result["mismatches"], err)
    assert rc == 0
    rows = {(r["row"], r["hostile"]): r for r in result["rows"]}
    assert len(rows) == 2 * len(matrix.ROWS) == 24
    assert rows[("2-hidden", False)]["observed"] == "silent loss detected"
    assert "fault 0x25" in rows[("2-hidden", False)]["why"]
    assert rows[("4-unsafe", True)]["observed"] == "breach" and rows[("4-unsafe", True)]["breaches"] >= 1
    # in the secure rows the attacks were stopped: faults recorded, refusals logged, no breach
    for rid in ("2-ims", "3", "4"):
        r = rows[(rid, True)]
        assert r["breaches"] == 0 and r["observed"] == "delivered", r
        assert r["refused"].get("evil", 0) >= 3, r
        assert any(f for f in r["faults"].values()), r
    assert "0x26" in rows[("3", True)]["faults"]["01:00.0"]          # the PASID check caught the redirect


async def test_matrix_rejects_unknown_rows():
    rc, out, err = await run_launch("matrix", "9-nonexistent")
    assert rc == 2 and "unknown row(s) 9-nonexistent" in err and "Traceback" not in err

"""bench/campaign.py's verdict: "as expected" needs the issue's bar of 100,000 hostile actions
against the secure topology; below it a run that held says it was a quick run (exit 2)."""

from __future__ import annotations

import pytest

from bench.campaign import ISSUE_BAR, verdict


def secure(actions: int = ISSUE_BAR, **kw) -> dict:
    res = {"actions": actions, "breaches": 0, "lost": 0, "deaths": [], "settle_outcomes": ["delivered"],
           "victims": {"host pf 01:00.0": {"outcome": "delivered"}, "vict1 vf 00:03.0": {"outcome": "delivered"}}}
    return {**res, **kw}


UNSAFE_BREACHED = {"breaches": 3}


def test_as_expected_only_at_the_issues_bar():
    assert ISSUE_BAR == 100_000
    rc, line = verdict(secure(102_000), UNSAFE_BREACHED)
    assert rc == 0 and line.startswith("as expected: ") and "102,000 hostile actions" in line, line
    rc, line = verdict(secure(ISSUE_BAR - 1), UNSAFE_BREACHED)
    assert rc == 2 and "below the issue's bar of 100,000" in line and "99,999" in line, line
    assert "as expected" not in line


@pytest.mark.parametrize("changes, unsafe, why", [
    ({"breaches": 1}, UNSAFE_BREACHED, "1 breach(es) in the secure topology"),
    ({"lost": 4}, UNSAFE_BREACHED, "4 legitimate interrupt(s) lost"),
    ({"deaths": [{"name": "vict1"}]}, UNSAFE_BREACHED, "1 process(es) died"),
    ({"settle_outcomes": ["delivered", "lost"]}, UNSAFE_BREACHED, "victims' outcomes delivered, lost"),
    ({"victims": {"vict2 adi": {"outcome": "silent loss detected"}}}, UNSAFE_BREACHED,
     "victims' outcomes silent loss detected"),
    ({}, {"breaches": 0}, "no breach found in 4-unsafe"),
])
def test_anything_wrong_is_not_as_expected_whatever_the_count(changes, unsafe, why):
    for actions in (ISSUE_BAR * 2, 10):
        rc, line = verdict(secure(actions, **changes), unsafe)
        assert rc == 1 and line.startswith("NOT as expected: ") and why in line, line

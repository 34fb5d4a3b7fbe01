"""bench/run.py's pure helpers: the section list and the table of figures, ratios and goals
(built from a results dict; nothing is measured here)."""

from __future__ import annotations

import pytest

from bench.boot import summarize
from bench.run import SECTIONS, build_rows, parse_only


def lab(rate: float, p50: float, p99: float, cpu: float | None = None, delivery: float | None = None) -> dict:
    out = {"saturation": {"rate_per_s": rate}, "latency": {"latency": {"p50_us": p50, "p99_us": p99,
                                                                      "p999_us": 2 * p99}}}
    if delivery is not None:
        out["delivery"] = {"rate_per_s": delivery, "handler_runs_per_interrupt": 0.25,
                           "cpu_us_per_interrupt": {"fabric": 5.0, "d0": 2.5}}
    if cpu is not None:
        out["saturation"]["cpu_us_per_interrupt"] = {"fabric": cpu}
    return out


RESULTS = {
    "sections": list(SECTIONS), "errors": {},
    "relay": {"throughput": {"rate_per_s": 100_000.0, "cpu_us_per_msg": {"relay": 5.0}},
              "latency": {"latency": {"p50_us": 200.0, "p99_us": 400.0, "p999_us": 800.0}}},
    "case1": lab(10_000.0, 300.0, 600.0, cpu=30.0, delivery=40_000.0),
    "injection": lab(8_000.0, 800.0, 3000.0, delivery=30_000.0),
    "posted": lab(12_000.0, 280.0, 700.0, delivery=120_000.0),
    "dma": {"bytes": 65536, "mb_per_s": 4.5, "tlps_per_s": 35_000.0},
    "boot": {"runs": {"1": {"vms": 1, "wall_s": 0.9}, "64": {
        "vms": 64, "wall_s": 5.2, "guest_rss_kib": {"median": 27_648, "max": 28_672},
        "guest_pss_kib": {"median": 10_240}, "rss_kib": {"fabric": 36_000, "d0": 31_000, "host": 40_000}}}},
    "tracing": {"not_measured": "no bench"},
    "codec": {"kinds": {"CfgRd0": {"ours_encode_us": 1.0, "theirs_encode_us": 20.0, "ours_decode_us": 2.0,
                                   "theirs_decode_us": 10.0, "cocotbext_without_prefix": False}}},
}


def row(rows, figure: str) -> tuple:
    hits = [r for r in rows if r[0] == figure]
    assert len(hits) == 1, (figure, [r[0] for r in rows])
    return hits[0]


def test_parse_only_keeps_suite_order_and_names_unknown_sections():
    assert parse_only(None) == SECTIONS
    assert parse_only("codec, relay") == ("relay", "codec")
    with pytest.raises(ValueError, match=r"unknown section relya.*known: relay,"):
        parse_only("relay,relya")
    with pytest.raises(ValueError):
        parse_only(" , ")


def test_rows_give_each_figure_its_ratio_and_goal():
    rows = build_rows(RESULTS)
    assert all(len(r) == 5 for r in rows)
    assert row(rows, "case 1: interrupts/s")[1:4] == ("100,000", "10,000", "0.100")
    assert row(rows, "  fabric frames/s (3 per interrupt)")[3] == "0.300"
    assert row(rows, "  relay | fabric CPU µs per frame")[1:4] == ("5.00", "10.00", "2.00")
    # the goals go with interrupt delivery (one crossing per interrupt, like a relayed message)
    assert row(rows, "posted (-> vCPU, no host): interrupts/s")[1:] == (
        "100,000", "120,000", "1.200", ">= 0.5 met; coalesced above the relay: >= 1 met")
    assert row(rows, "case 1 (-> host vector): interrupts/s")[1:] == ("100,000", "40,000", "0.400", "")
    assert row(rows, "injection (-> host -> guest): interrupts/s")[2:4] == ("30,000", "0.300")
    assert row(rows, "  posted ÷ injection interrupts/s (baseline: injection)")[1:] == (
        "30,000", "120,000", "4.00", ">= 1.4 met")
    hc = [r for r in rows if r[0].startswith("  handler runs per interrupt")]
    assert len(hc) == 3 and hc[0][2] == "0.25 | 7.5"
    # the work-item loop is shown beside them, without goals
    assert row(rows, "posted: interrupts/s")[3:] == ("0.120", "")
    p50 = [r for r in rows if r[0] == "  one-way latency p50 µs" and r[2] == "280"]
    assert p50 and p50[0][3:] == ("1.40", "<= 1.5 met")
    assert row(rows, "  posted ÷ injection, one per work item (baseline: injection)")[3] == "1.50"
    assert row(rows, "  TLPs/s through the fabric (MRd, CplD, MWr)")[3] == "0.350"
    assert row(rows, "64 VMs: boot s")[2:] == ("5.20", "", "<= 10 s met")
    assert row(rows, "  64 VMs: guest RSS MiB median / max")[2] == "27.0 / 28.0"
    assert row(rows, "encode CfgRd0")[1:] == ("20.00", "1.00", "0.050", "<= 0.1 met")
    assert row(rows, "decode CfgRd0")[3:] == ("0.200", "<= 0.1 NOT met")


def test_missing_figures_are_said_never_made_up():
    rows = build_rows(RESULTS)
    assert row(rows, "tracing cost")[2] == "not measured"
    res = dict(RESULTS, sections=[s for s in SECTIONS if s != "relay"], errors={"dma": "RuntimeError: boom"})
    del res["relay"]
    rows = build_rows(res)
    assert row(rows, "raw relay")[2] == "not run (--only): no ratios"
    assert row(rows, "case 1: interrupts/s")[1:4] == ("-", "10,000", "-")     # no baseline, no ratio
    assert row(rows, "DMA copy")[2] == "failed (see below)"
    assert row(rows, "posted: interrupts/s")[3] == "-"
    assert row(rows, "posted (-> vCPU, no host): interrupts/s")[3:] == (
        "-", ">= 0.5; coalesced above the relay: >= 1")
    rows = build_rows(dict(RESULTS, sections=["relay", "codec"]))
    assert row(rows, "boot")[2] == "not run (--only)" and row(rows, "case 1")[2] == "not run (--only)"
    assert not [r for r in rows if "interrupts/s" in r[0] and r[2]]   # no delivery row either


def test_summarize_per_guest_figures():
    assert summarize([3, None, 1, 2]) == {"n": 3, "median": 2, "max": 3}
    assert summarize([]) == {"n": 0, "median": None, "max": None}

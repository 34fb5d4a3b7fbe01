"""Per-VM frame budgets in the fabric model: credits, the ordered backlog, WASTED penalties.

A guest may send ``Platform.vm_frame_rate`` frames/s in bursts of ``vm_frame_burst``; over
that it is throttled: the fabric stops taking its frames (they wait in order, and no CREDIT
comes, so a guest that keeps to its credit window stalls) and ``release`` runs its backlog
once the budget is back.  A device's WASTED (stores of that guest's link that rang a full
work queue) charges ``waste_penalty`` frames each.  The clock is the test's: nothing sleeps.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import wire
from fabric.bus import CREDIT_BATCH, CREDIT_WINDOW, MAX_DEBT_S, THROTTLED, Fabric, PeerSpec, Platform

HOST, D0, G1, G2 = b"\x00host", b"\x00d0", b"\x00g1", b"\x00g2"
SPECS = {"t-host": PeerSpec("host", "host"), "t-d0": PeerSpec("d0", "device", (1, 1)),
         "t-g1": PeerSpec("g1", "guest"), "t-g2": PeerSpec("g2", "guest")}
IDENT = {"host": HOST, "d0": D0, "g1": G1, "g2": G2}


class Clocked:
    def __init__(self, rate: int = 1000, burst: int = 10, penalty: int = 50) -> None:
        self.now = 1_000_000_000
        self.sent: list[tuple[bytes, list]] = []
        self.f = Fabric(dict(SPECS), Platform(vm_frame_rate=rate, vm_frame_burst=burst, waste_penalty=penalty),
                        send=lambda ident, frame: self.sent.append((ident, wire.decode(frame))),
                        clock=lambda: self.now)
        for tok, spec in SPECS.items():
            self.f.on_frame(IDENT[spec.name], wire.hello(tok, spec.name))
        self.sent.clear()

    def exit(self, ident: bytes, seq: int) -> None:
        """A guest frame the fabric forwards (a hypercall exit), numbered so order shows."""
        self.f.on_frame(ident, wire.vmexit("", seq, "hypercall", {"nr": 1, "a": []}))

    def take(self) -> list[tuple[bytes, list]]:
        out, self.sent = self.sent, []
        return out

    def forwarded(self) -> list[int]:
        """Seqs of the exits the host received since the last take (and nothing else for it)."""
        return [m[2] for ident, m in self.take() if ident == HOST and m[0] == wire.VMEXIT]

    def peer(self, name: str):
        return self.f.by_name[name]


def test_a_guest_within_its_burst_is_never_held() -> None:
    c = Clocked(burst=10)
    for seq in range(1, 11):
        c.exit(G1, seq)
    assert c.forwarded() == list(range(1, 11))
    assert c.peer("g1").throttles == 0 and c.f.wake_ns is None


def test_over_budget_the_guest_is_told_and_its_frames_wait_in_order() -> None:
    c = Clocked(rate=1000, burst=10)
    for seq in range(1, 11):
        c.exit(G1, seq)
    c.take()
    c.exit(G1, 11)                                   # the 11th in the same instant
    # not taken (so no CREDIT will come for it): it waits for one frame's worth at 1000/s
    assert c.take() == []
    assert c.peer("g1").stalled == THROTTLED and c.f.wake_ns == c.now + 1_000_001
    for seq in (12, 13):                             # already on the wire when it was told
        c.exit(G1, seq)
    assert c.take() == [] and list(map(len, [c.peer("g1").backlog])) == [3]
    # the other guest and the host are not affected
    c.exit(G2, 100)
    assert c.forwarded() == [100]
    # too early: nothing moves
    c.f.release(c.now + 500_000)
    assert c.take() == [] and c.peer("g1").stalled == THROTTLED
    # 3 ms later there is budget for all three: they go, in order, and the guest runs again
    c.now += 3_000_000
    c.f.release(c.now)
    assert c.forwarded() == [11, 12, 13]
    assert c.peer("g1").stalled == 0 and not c.peer("g1").backlog and c.f.wake_ns is None
    assert c.peer("g1").throttles == 1 and c.f.counters["throttled"] == 1
    assert c.peer("g1").rx == 13                     # each frame counted once, when it ran


def test_a_backlog_longer_than_the_budget_runs_in_pieces_in_order() -> None:
    c = Clocked(rate=1000, burst=4)
    for seq in range(1, 21):
        c.exit(G1, seq)
    got = c.forwarded()
    assert got == [1, 2, 3, 4]
    while c.f.wake_ns is not None:
        c.now = c.f.wake_ns
        c.f.release(c.now)
        got += c.forwarded()
    assert got == list(range(1, 21))
    assert c.peer("g1").throttles >= 2            # it ran out again part-way through the backlog


def test_wasted_stores_cost_the_guest_on_that_link_its_penalty() -> None:
    c = Clocked(rate=1000, burst=10, penalty=50)
    g1 = c.peer("g1")
    assert g1.link and g1.link != c.peer("g2").link
    c.f.on_frame(D0, wire.wasted(g1.link, 2))       # two stores rang a full work queue
    assert c.take() == [] and g1.wasted == 2 and c.f.counters["wasted"] == 2
    assert g1.tokens == 10 - 100
    c.exit(G1, 1)
    # 91 frames of debt at 1000/s: 91 ms before its frames are taken again
    assert c.take() == [] and c.f.wake_ns == c.now + 91_000_001
    c.exit(G2, 7)
    assert c.forwarded() == [7]                     # g2 pays nothing for g1's waste
    c.now += 91_000_001
    c.f.release(c.now)
    assert c.forwarded() == [1]


def test_the_debt_is_capped_at_one_second_of_rate() -> None:
    c = Clocked(rate=1000, burst=10, penalty=50)
    c.f.on_frame(D0, wire.wasted(c.peer("g1").link, 1_000_000))
    assert c.peer("g1").tokens == -1000 * MAX_DEBT_S
    c.exit(G1, 1)
    assert c.take() == [] and c.f.wake_ns - c.now <= 1_001_000_001


def test_wasted_from_anyone_but_a_device_or_for_no_guest_is_refused() -> None:
    c = Clocked()
    c.f.on_frame(G1, wire.wasted(c.peer("g2").link, 5))      # a guest framing another
    assert c.take() == [(G1, [wire.DROPPED, "unauthorized", 1])] and c.peer("g2").wasted == 0
    for bad in ([wire.WASTED, 999, 1], [wire.WASTED, c.peer("g1").link, -3], [wire.WASTED, "g1", 1]):
        c.f.on_frame(D0, wire._packb(bad))
    assert c.peer("d0").drops["invalid"] == 3 and c.peer("g1").wasted == 0


def test_a_malformed_batch_costs_the_guest_a_frame_of_budget() -> None:
    """A BATCH dropped whole (here: a BATCH inside a BATCH) still cost the fabric work: it
    is charged like one frame, so a flood of them runs the guest out of budget too."""
    c = Clocked(rate=1000, burst=10)
    bad = wire.batch([wire.batch([b"a", b"b"]), b"c"])
    for _ in range(10):
        c.f.on_multipart([G1, bad])
    assert c.peer("g1").drops["malformed"] == 10 and c.peer("g1").tokens == 0.0
    c.take()
    c.exit(G1, 1)                                    # the next frame waits for budget
    assert c.forwarded() == [] and c.peer("g1").throttles == 1
    c.f.on_multipart([D0, bad])
    assert c.peer("d0").tokens == float("inf")       # only guests have a budget
    for _ in range(5000):                            # the debt is capped at 1 s of rate
        c.f.on_multipart([G1, bad])
    assert c.peer("g1").tokens == -1000 * MAX_DEBT_S


def test_rate_zero_means_no_budget_at_all() -> None:
    c = Clocked(rate=0, burst=1)
    c.f.on_frame(D0, wire.wasted(c.peer("g1").link, 100))
    for seq in range(1, 501):
        c.exit(G1, seq)
    assert c.forwarded() == list(range(1, 501)) and c.peer("g1").throttles == 0


def test_only_guests_have_a_budget() -> None:
    c = Clocked(rate=1000, burst=1)
    for _ in range(50):
        c.f.on_frame(D0, wire.event("d0", "ready", {}))
        c.f.on_frame(HOST, wire.event("host", "ready", {}))
    assert c.peer("d0").stalled == 0 and c.peer("host").stalled == 0 and c.f.counters["throttled"] == 0


def test_a_throttled_guest_that_dies_leaves_nothing_waiting() -> None:
    c = Clocked(rate=1000, burst=1)
    c.exit(G1, 1)
    c.exit(G1, 2)
    c.take()
    assert c.f.wake_ns is not None
    c.f.peer_gone("g1")
    c.take()
    c.now += 10_000_000
    c.f.release(c.now)                                # must not raise or forward a dead guest's frames
    assert c.forwarded() == [] and c.f.wake_ns is None
    assert c.peer("g2").link not in (None, 0) and len(c.f.links) == 1


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.one_of(st.tuples(st.just("send"), st.integers(1, 30)),
                                st.tuples(st.just("wait"), st.integers(0, 40_000_000)),
                                st.tuples(st.just("waste"), st.integers(1, 5))), max_size=40))
def test_whatever_happens_every_frame_arrives_once_and_in_order(steps) -> None:
    """Sends, time passing and penalties in any order: the host sees the guest's frames in
    the order sent, none twice, and all of them once enough time has passed."""
    c = Clocked(rate=2000, burst=8, penalty=20)
    sent = 0
    got: list[int] = []
    for kind, n in steps:
        if kind == "send":
            for _ in range(n):
                sent += 1
                c.exit(G1, sent)
        elif kind == "wait":
            c.now += n
            if c.f.wake_ns is not None and c.f.wake_ns <= c.now:
                c.f.release(c.now)
        else:
            c.f.on_frame(D0, wire.wasted(c.peer("g1").link, n))
        got += c.forwarded()
    while c.f.wake_ns is not None:
        c.now = c.f.wake_ns
        c.f.release(c.now)
        got += c.forwarded()
    assert got == list(range(1, sent + 1))
    assert c.peer("g1").stalled == 0 and not c.peer("g1").backlog


def test_credits_come_every_batch_of_frames_taken_and_not_for_frames_held() -> None:
    c = Clocked(rate=1_000_000, burst=CREDIT_BATCH + 10)
    credits = []
    for seq in range(1, CREDIT_BATCH * 2 + 1):
        c.exit(G1, seq)
        credits += [m[1] for ident, m in c.sent if ident == G1 and m[0] == wire.CREDIT]
        c.sent.clear()
    # the budget ran out after CREDIT_BATCH + 10: the first CREDIT came, the second did not
    assert credits == [CREDIT_BATCH] and c.peer("g1").stalled == THROTTLED
    assert CREDIT_WINDOW >= 2 * CREDIT_BATCH          # a guest that keeps to it is stalled, not dropped
    c.now += 1_000_000_000
    c.f.release(c.now)
    out = c.take()
    assert [m[2] for i, m in out if i == HOST] == list(range(CREDIT_BATCH + 11, CREDIT_BATCH * 2 + 1))
    assert [m for i, m in out if i == G1] == [[wire.CREDIT, CREDIT_BATCH * 2]]


def test_replies_and_events_pass_a_throttled_guest() -> None:
    c = Clocked(rate=1000, burst=1)
    c.exit(G1, 1)
    c.exit(G1, 2)                                     # held
    c.take()
    c.f.on_frame(G1, wire.event("g1", "ready", {}))  # instrumentation: never held
    c.f.on_frame(G1, wire.ctl_rep(99, True, None))   # (no such request: dropped, but not held)
    # both were taken (counted, and credited in time) while exit 2 still waits
    assert list(c.peer("g1").backlog) and len(c.peer("g1").backlog) == 1
    assert c.peer("g1").rx == 3

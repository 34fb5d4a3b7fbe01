"""LocalApic: acceptance, priority classes, TPR, nesting, EOI."""

import pytest

from guest.apic import ESR_RECEIVE_ILLEGAL_VECTOR, LocalApic


@pytest.fixture
def apic():
    return LocalApic(apic_id=3)


@pytest.mark.parametrize("vector", [0, 2, 15])
def test_illegal_vectors_refused_and_counted(apic, vector):
    assert apic.accept(vector) is False
    assert apic.irr == 0
    assert apic.illegal_vector == 1
    assert apic.esr & ESR_RECEIVE_ILLEGAL_VECTOR
    assert apic.clear_esr() == ESR_RECEIVE_ILLEGAL_VECTOR
    assert apic.esr == 0


@pytest.mark.parametrize("vector", [-1, 256])
def test_out_of_range_vector_is_a_programming_error(apic, vector):
    with pytest.raises(ValueError):
        apic.accept(vector)


def test_lowest_legal_vector_is_accepted_and_delivered(apic):
    assert apic.accept(16)
    assert apic.pending() == 16


def test_pending_is_highest_vector(apic):
    for v in (0x31, 0x45, 0x41):
        apic.accept(v)
    assert apic.pending() == 0x45
    assert apic.ack() == 0x45
    assert apic.isr == 1 << 0x45
    assert apic.irr == (1 << 0x31) | (1 << 0x41)


def test_coalescing(apic):
    assert apic.accept(0x40) and apic.accept(0x40)
    assert apic.coalesced == 1 and apic.accepted == 2
    assert apic.service_pending() == [0x40]


def test_nothing_pending(apic):
    assert apic.pending() is None
    assert apic.ack() is None
    apic.eoi()
    assert apic.spurious_eoi == 1 and apic.eoi_count == 0


def test_tpr_blocks_its_class_and_below(apic):
    apic.tpr = 0x50
    apic.accept(0x5F)
    apic.accept(0x42)
    assert apic.pending() is None
    apic.accept(0x60)
    assert apic.pending() == 0x60
    apic.tpr = 0x4F  # class 4: 0x5F now deliverable once 0x60 is done
    assert apic.service_pending() == [0x60, 0x5F]
    assert apic.pending() is None  # 0x42 is class 4 == TPR class
    apic.tpr = 0
    assert apic.service_pending() == [0x42]


def test_tpr_range(apic):
    with pytest.raises(ValueError):
        apic.tpr = 256


def test_in_service_class_masks_same_and_lower_class(apic):
    apic.accept(0x55)
    assert apic.ack() == 0x55
    assert apic.ppr == 0x50
    apic.accept(0x5A)  # same class, higher vector: must wait
    apic.accept(0x41)  # lower class: must wait
    assert apic.pending() is None
    apic.accept(0x61)  # higher class nests
    assert apic.ack() == 0x61
    assert apic.ppr == 0x60
    apic.eoi()  # clears 0x61, the highest in service
    assert apic.isr == 1 << 0x55
    assert apic.pending() is None
    apic.eoi()  # clears 0x55
    assert apic.isr == 0
    assert apic.service_pending() == [0x5A, 0x41]


def test_ppr_is_tpr_when_tpr_class_is_higher(apic):
    apic.accept(0x35)
    apic.ack()
    apic.tpr = 0x72
    assert apic.ppr == 0x72
    apic.tpr = 0x30
    assert apic.ppr == 0x30  # equal classes: TPR wins (SDM 11.8.3.1)
    apic.tpr = 0x10
    assert apic.ppr == 0x30


def test_eoi_clears_only_highest_in_service(apic):
    apic.accept(0x30)
    apic.ack()
    apic.accept(0x80)
    apic.ack()
    apic.eoi()
    assert apic.isr == 1 << 0x30
    assert apic.eoi_count == 1


def test_service_pending_order_and_counters(apic):
    for v in (0x21, 0xE0, 0x80, 0x8F):
        apic.accept(v)
    seen = []
    assert apic.service_pending(seen.append) == [0xE0, 0x8F, 0x80, 0x21]
    assert seen == [0xE0, 0x8F, 0x80, 0x21]
    assert apic.isr == apic.irr == 0
    assert apic.delivered == apic.eoi_count == 4


def test_service_pending_respects_outer_frame(apic):
    # An outer handler for 0x70 is running (in service) when the shell drains.
    apic.accept(0x70)
    apic.ack()
    apic.accept(0x90)
    apic.accept(0x71)
    apic.accept(0x40)
    assert apic.service_pending() == [0x90]
    assert apic.isr == 1 << 0x70
    apic.eoi()
    assert apic.service_pending() == [0x71, 0x40]


def test_vectors_raised_by_a_handler_are_delivered_after_its_eoi(apic):
    apic.accept(0x50)

    def handler(vector):
        if vector == 0x50:
            apic.accept(0x30)
            apic.accept(0xA0)
            assert apic.isr == 1 << 0x50  # still in service while the handler runs

    assert apic.service_pending(handler) == [0x50, 0xA0, 0x30]

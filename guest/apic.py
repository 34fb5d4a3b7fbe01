"""Local APIC model: interrupt acceptance, priority, in-service nesting, EOI.

Pure and synchronous. One ``LocalApic`` per (v)CPU. The CPU shell feeds it
vectors (``accept``) as interrupt messages reach the CPU, then drains it with
``service_pending``; nothing here knows about sockets or irq numbers.

Theory of operation (Intel SDM vol. 3, 11.8 "Handling interrupts")::

    accept(v) ---> IRR[v] = 1            (a second accept before ack coalesces)
                     |
    pending()  highest v in IRR with  v[7:4] > PPR[7:4]
                     |                 PPR = TPR if TPR[7:4] >= ISRV[7:4] else ISRV & 0xF0
    ack()      IRR[v] = 0, ISR[v] = 1  (INTA: the vector is now in service)
                     |
    eoi()      clear the highest ISR bit (the innermost handler finished)

Rule 1: a vector is delivered only if its priority class (vector >> 4) is
strictly greater than the processor priority class, so a handler is never
interrupted by a vector of its own class or lower (nesting is by class).
Rule 2: vectors 0..15 are reserved (exceptions); receiving one is an APIC
error (ESR bit 6, "Received Illegal Vector") and the vector is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

NR_VECTORS = 256
FIRST_LEGAL_VECTOR = 16

# Error Status Register bits (SDM 11.5.3)
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6


def _highest(bitmap: int) -> int | None:
    return bitmap.bit_length() - 1 if bitmap else None


class LocalApic:
    """A local APIC's interrupt-acceptance state (IRR, ISR, TPR, PPR, ESR).

    Counters (plain ints, read them directly): ``accepted`` (IRR set),
    ``coalesced`` (accepted while already pending in IRR: the two edges become
    one interrupt), ``illegal_vector`` (refused vectors < 16), ``delivered``
    (acks that returned a vector), ``eoi_count`` and ``spurious_eoi`` (EOI with
    nothing in service; the hardware ignores it).
    """

    def __init__(self, apic_id: int) -> None:
        self.apic_id = apic_id
        self.irr = 0
        self.isr = 0
        self._tpr = 0
        self.esr = 0
        self.accepted = 0
        self.coalesced = 0
        self.illegal_vector = 0
        self.delivered = 0
        self.eoi_count = 0
        self.spurious_eoi = 0

    def __repr__(self) -> str:
        return (f"LocalApic(apic_id={self.apic_id}, irr={self.irr:#x}, isr={self.isr:#x}, "
                f"tpr={self._tpr:#x})")

    # ---------------------------------------------------------------- priority
    @property
    def tpr(self) -> int:
        """Task priority register (8 bits; only the class, bits 7:4, matters here)."""
        return self._tpr

    @tpr.setter
    def tpr(self, value: int) -> None:
        if not 0 <= value < NR_VECTORS:
            raise ValueError(f"TPR must be 0..255, got {value}")
        self._tpr = value

    @property
    def ppr(self) -> int:
        """Processor priority (SDM 11.8.3.1): max of TPR and the highest in-service class."""
        isrv = _highest(self.isr) or 0
        if (self._tpr >> 4) >= (isrv >> 4):
            return self._tpr
        return isrv & 0xF0

    # ------------------------------------------------------------- interrupts
    def accept(self, vector: int) -> bool:
        """Latch a fixed-mode interrupt into the IRR.

        Returns False (and counts ``illegal_vector``, sets ESR bit 6) for the
        reserved vectors 0..15; True otherwise, including when the vector was
        already pending (counted in ``coalesced``). ``vector`` must fit 8 bits.
        """
        if not 0 <= vector < NR_VECTORS:
            raise ValueError(f"vector must be 0..255, got {vector}")
        if vector < FIRST_LEGAL_VECTOR:
            self.illegal_vector += 1
            self.esr |= ESR_RECEIVE_ILLEGAL_VECTOR
            return False
        bit = 1 << vector
        if self.irr & bit:
            self.coalesced += 1
        self.irr |= bit
        self.accepted += 1
        return True

    def pending(self) -> int | None:
        """Highest-priority IRR vector deliverable under the current PPR, or None."""
        vector = _highest(self.irr)
        if vector is None or (vector >> 4) <= (self.ppr >> 4):
            return None
        return vector

    def ack(self) -> int | None:
        """Interrupt acknowledge (INTA): move the deliverable vector IRR -> ISR.

        Returns the vector the CPU now services, or None if nothing is
        deliverable (a real APIC would return its spurious vector).
        """
        vector = self.pending()
        if vector is None:
            return None
        bit = 1 << vector
        self.irr &= ~bit
        self.isr |= bit
        self.delivered += 1
        return vector

    def eoi(self) -> None:
        """End of interrupt: clear the highest-priority in-service bit."""
        vector = _highest(self.isr)
        if vector is None:
            self.spurious_eoi += 1
            return
        self.isr &= ~(1 << vector)
        self.eoi_count += 1

    def clear_esr(self) -> int:
        """Read and clear the error status register (write-then-read in hardware)."""
        esr, self.esr = self.esr, 0
        return esr

    # ------------------------------------------------------------- CPU shell
    def service_pending(self, handler: Callable[[int], object] | None = None) -> list[int]:
        """Deliver every deliverable vector, in service order; return them.

        The loop is ack -> ``handler(vector)`` -> EOI, repeated until nothing
        is deliverable. Handlers run with interrupts disabled, as Linux runs
        hard-irq handlers: a vector accepted by ``handler`` (an IPI, a device
        completing synchronously) is delivered after that handler's EOI, in
        priority order. Vectors already in service when this is called (an
        outer handler frame) keep masking their class and lower: those IRR
        bits stay pending until the outer frame's EOI.
        """
        serviced: list[int] = []
        while (vector := self.ack()) is not None:
            serviced.append(vector)
            if handler is not None:
                handler(vector)
            self.eoi()
        return serviced

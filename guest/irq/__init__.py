"""guest/irq."""

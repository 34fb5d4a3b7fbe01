"""irqlab."""

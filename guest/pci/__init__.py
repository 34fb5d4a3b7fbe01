"""guest/pci."""

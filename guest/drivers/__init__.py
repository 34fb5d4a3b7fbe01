"""Drivers of the OS model."""

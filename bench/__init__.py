"""irqlab benchmarks: see bench/run.py and docs/performance.md."""

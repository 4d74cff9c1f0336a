"""Timings of jaxicl: each module is run as `python -m benchmarks.NAME` and writes JSON + a table."""

"""Benchmarks for pqa (not installed; run from a source checkout: ``pqa bench`` or ``python bench/run.py``)."""

"""Sweeps on Ray: the spec, trials as tasks, the parallel-coordinates plot."""

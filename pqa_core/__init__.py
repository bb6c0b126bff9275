"""pqa_core: interfaces, plugin manager, model, data, training, evaluation, checkpoints.

Nothing in this package imports Sacred or talks to a database: a plain nested
config drives it, so a Sacred run, a test and a notebook all use the same code.
"""
__version__ = "0.1.0"

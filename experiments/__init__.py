"""pqa_experiments: Sacred experiments, the MongoDB run store and the ``pqa`` CLI.

Kept import-light on purpose: ``settings`` and ``db`` must load without Sacred
so that ``pqa db status`` answers instantly; only ``observers`` imports Sacred.
"""

"""Evaluation: QA scoring, metrics, intervals and paired tests, per-question analysis."""

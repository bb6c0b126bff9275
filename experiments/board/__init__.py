"""Omniboard: install, start, and its seeded column settings."""

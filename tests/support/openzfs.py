"""Fixtures for openzfs tests (filled in by its issue)."""

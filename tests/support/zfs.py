"""Fixtures for zfs tests (filled in by its issue)."""

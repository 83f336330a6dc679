"""Fixtures for vcsim tests (filled in by its issue)."""

"""Postgres fixtures."""

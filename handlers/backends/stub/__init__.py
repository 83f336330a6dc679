"""Stub backends and the shared world they imagine (ZERFAUX_USE_STUBS=true)."""

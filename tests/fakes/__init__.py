"""Faithful fakes of services that run only as Docker images (Supabase PostgREST and Realtime)."""

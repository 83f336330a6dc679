"""ZFS replication over SSH: plans, commands, streams, connections (docs/replication.md)."""

"""Recovery runs (``recovery.run``): test failover and its cleanup, step by step (docs/recovery.md).

``backends`` declares what a run needs from the DR site (storage: ZFS on the DR storage host;
compute: the DR vCenter); ``plan`` turns a run's input into its steps; ``runner`` executes them,
recording each before and after its effect, resuming from the first unfinished one.
"""

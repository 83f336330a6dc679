-- Streams as the two sides allow (docs/replication.md, "Encrypted datasets" and "Compression on
-- the wire"): the target's wire compression, and the name of the secret holding an encrypted
-- group's key. Replication never reads the key: a raw send needs none (the recovery issues load it
-- at the DR site during a failover or a test, never storing it there).

alter table public.replication_targets
    add column wire_compression text not null default 'auto'
        constraint replication_targets_wire_compression_check
        check (wire_compression in ('auto', 'zstd', 'lz4', 'off'));

comment on column public.replication_targets.wire_compression is
    'compression of a stream that is not already compressed, as a pipe stage on both hosts: '
    'auto (zstd -1, else lz4, where both hosts have it) | zstd | lz4 | off';

alter table public.protection_groups
    add column encryption_key_secret text;

comment on column public.protection_groups.encryption_key_secret is
    'name of the secret holding the key of an encrypted source dataset, loaded at the DR site only '
    'during a failover or a test; replication sends raw and never uses it';

-- Admins write both like the other configuration columns (the policies keep it to admins);
-- authenticated reads wire_compression but, like every *_secret column, not the secret's name.
grant select (wire_compression),
      insert (wire_compression),
      update (wire_compression)
    on public.replication_targets to authenticated;
grant insert (encryption_key_secret),
      update (encryption_key_secret)
    on public.protection_groups to authenticated;

-- Dataset trees (issue 15, section 4): a group may replicate its dataset and every child.
-- When true, the listener snapshots the tree at once (zfs snapshot -r) and sends each child as
-- its own stream, parent before child (never send -R, never receive -F); see docs/replication.md.

alter table public.protection_groups
    add column recursive boolean not null default false;

comment on column public.protection_groups.recursive is
    'Replicate source_dataset and every child dataset (one atomic zfs snapshot -r, one stream per child); '
    'children gone from the source are never destroyed on the target.';

-- A group configuration column, granted like the others (20261201100100_policies.sql).
grant select (recursive) on public.protection_groups to authenticated;
grant insert (recursive), update (recursive) on public.protection_groups to authenticated;

-- Replica names that do not collide: tank1/vms and tank2/vms replicated to one target used to
-- both become <target_root>/vms. A group now records its replica's name, chosen when the group
-- gets its source_dataset (or a new source_dataset or target, which means a new replica, as
-- before): the dataset's last component when no other group of the same target already uses it,
-- else that name, '-' and 8 hex digits of the group id. Existing groups keep the name they
-- replicate to today (the basename), so no replica is renamed. A name set by hand is kept until
-- the dataset or the target changes (or set in the same update).

alter table public.protection_groups
    add column replica_name text;
-- Not checked here: the backend validates the whole target_dataset (characters, length) before any
-- command runs, and says which column to fix.

comment on column public.protection_groups.replica_name is
    'name of the replica under replication_targets.target_root; chosen once (basename of source_dataset, '
    'or basename-<8 hex of id> when another group of the target has that name), again when source_dataset '
    'or replication_target_id changes; set it yourself to choose';

update public.protection_groups
   set replica_name = regexp_replace(source_dataset, '^.*/', '')
 where source_dataset is not null and replica_name is null;

create or replace function public.protection_groups_fill_replica_name() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
declare
    base text;
begin
    if tg_op = 'UPDATE' and new.replica_name is not distinct from old.replica_name
       and (new.source_dataset is distinct from old.source_dataset
            or new.replication_target_id is distinct from old.replication_target_id) then
        new.replica_name := null;  -- another dataset or another target: another replica, named afresh
    end if;
    if new.replica_name is not null or new.source_dataset is null then
        return new;
    end if;
    base := regexp_replace(new.source_dataset, '^.*/', '');
    if base = '' then
        return new;  -- no name to take (a dataset ending in '/': the backend refuses it)
    end if;
    -- Two groups of one target inserted at once must not both see the name free.
    perform pg_advisory_xact_lock(hashtext('zerfaux.replica_name'), hashtext(coalesce(new.replication_target_id::text, '')));
    -- Another group of this target (or of no target yet) replicating under the same name?
    if exists (select 1 from public.protection_groups g
                where g.id <> new.id
                  and g.replica_name = base
                  and g.replication_target_id is not distinct from new.replication_target_id) then
        base := base || '-' || left(replace(new.id::text, '-', ''), 8);
    end if;
    new.replica_name := base;
    return new;
end $$;

revoke execute on function public.protection_groups_fill_replica_name() from public, anon, authenticated;

create trigger protection_groups_fill_replica_name
    before insert or update of source_dataset, replication_target_id, replica_name on public.protection_groups
    for each row execute function public.protection_groups_fill_replica_name();

-- The job's target_dataset: the group's replica name when the job replicates the group's dataset.
create or replace function public.replication_jobs_fill_datasets() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
declare
    g public.protection_groups;
    t public.replication_targets;
begin
    select * into g from public.protection_groups where id = new.protection_group_id;
    if new.source_dataset is null then
        new.source_dataset := g.source_dataset;
    end if;
    if new.target_dataset is null and g.replication_target_id is not null then
        select * into t from public.replication_targets where id = g.replication_target_id;
        if new.source_dataset is not null then
            new.target_dataset := t.target_root || '/' ||
                case when new.source_dataset = g.source_dataset and g.replica_name is not null
                     then g.replica_name
                     else regexp_replace(new.source_dataset, '^.*/', '') end;
        end if;
    end if;
    new.status := 'pending';
    new.bytes_transferred := 0;
    new.attempts := 0;
    return new;
end $$;

grant select (replica_name) on public.protection_groups to authenticated;

-- Two guards around recovery runs (issue 13).
--
-- 1. A protection group cannot be deleted while one of its recovery runs is under way or holds
--    something at the DR site (pending, running, active, awaiting_commit): its runs would go with
--    it (on delete cascade) and the clone, the datastore, the port group and the test VMs would be
--    left with no row that names them. Clean up first; a finished run goes with the group as before.
--
-- 2. replication_targets.nfs_clients: who may mount a test's clone over NFS. The export is
--    read-write with root not squashed (ESXi needs both), so "everyone" is not a default Zerfaux
--    chooses: null means the DR hosts the run places its VMs on, by the names the DR vCenter
--    knows them by; set it when the hosts mount from other addresses (a storage VLAN).

create function zerfaux.protection_groups_guard_delete() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
begin
    select * into v_run from public.recovery_runs r
     where r.protection_group_id = old.id
       and r.status in ('pending', 'running', 'active', 'awaiting_commit')
     order by r.created_at
     limit 1;
    if found then
        raise exception 'protection_groups_delete_during_recovery: protection group % has recovery run % (%, %)',
                        old.name, v_run.id, v_run.kind, v_run.status
              using errcode = '55000',
                    hint = case when v_run.kind = 'test' and v_run.status = 'active'
                                then format('clean it up first: insert into recovery_runs (protection_group_id, kind, test_run_id) '
                                            'values (%L, ''cleanup'', %L)', old.id, v_run.id)
                                else 'wait for it to end, or cancel it (update recovery_runs set cancel_requested = true)' end;
    end if;
    return old;
end $$;

revoke execute on function zerfaux.protection_groups_guard_delete() from public, anon, authenticated;

create trigger protection_groups_guard_delete
    before delete on public.protection_groups
    for each row execute function zerfaux.protection_groups_guard_delete();

alter table public.replication_targets
    add column nfs_clients text[],
    add constraint replication_targets_nfs_clients_names check (
        nfs_clients is null
        or (cardinality(nfs_clients) between 1 and 64
            and array_to_string(nfs_clients, ',', '') ~ '^[A-Za-z0-9._:/-]{1,253}(,[A-Za-z0-9._:/-]{1,253})*$'));

comment on column public.replication_targets.nfs_clients is
    'hosts or networks (name, address or address/prefix) allowed to mount a test''s clone over NFS, read-write; '
    'null = the DR hosts the run places its VMs on, by their names at the DR vCenter';
grant select (nfs_clients), insert (nfs_clients), update (nfs_clients) on public.replication_targets to authenticated;

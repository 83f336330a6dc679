-- Row Level Security by role (docs/authorization.md), replacing the `using (true)` policies of
-- *_security.sql. Column grants still decide WHICH columns `authenticated` may read or write
-- (never a *_secret column to read); the policies decide WHICH ROWS, from the caller's rows in
-- zerfaux.operators. service_role bypasses RLS and the database owner (the listener) owns the
-- tables: neither is touched here.

drop policy authenticated_read on public.vcenters;
drop policy authenticated_request_sync on public.vcenters;
drop policy authenticated_read on public.vcenter_vms;
drop policy authenticated_read on public.vcenter_datastores;
drop policy authenticated_read on public.replication_targets;
drop policy authenticated_read on public.protection_groups;
drop policy authenticated_read on public.protected_vms;
drop policy authenticated_write on public.protected_vms;
drop policy authenticated_flip on public.protected_vms;
drop policy authenticated_delete on public.protected_vms;
drop policy authenticated_read on public.replication_jobs;
drop policy authenticated_request on public.replication_jobs;
drop policy authenticated_cancel on public.replication_jobs;
drop policy authenticated_read on zerfaux.operations;
drop policy authenticated_read on zerfaux.workers;

-- ---------------------------------------------------------------------------------------------
-- Grants: what an admin writes (configuration) joins what anyone signed in could already ask
-- for; the policies below keep each to its role. Columns the engine writes (last_synced_at,
-- last_sync_error, ...) stay out.

grant insert (name, host, port, username, password_secret, verify_tls, site, sync_requested_at),
      update (name, host, port, username, password_secret, verify_tls, site),
      delete
    on public.vcenters to authenticated;
grant insert (name, ssh_host, ssh_port, ssh_user, ssh_key_secret, ssh_host_key, target_root,
              dr_datastore, transport, max_concurrent),
      update (name, ssh_host, ssh_port, ssh_user, ssh_key_secret, ssh_host_key, target_root,
              dr_datastore, transport, max_concurrent),
      delete
    on public.replication_targets to authenticated;
grant insert (name, source_vcenter_id, dr_vcenter_id, replication_target_id, source_dataset,
              protection_datastore, rpo_minutes, retention_snapshots, source_ssh_host,
              source_ssh_port, source_ssh_user, source_ssh_key_secret, source_ssh_host_key,
              dr_cluster, dr_resource_pool, dr_folder, dr_network, dr_vm_suffix),
      update (name, source_vcenter_id, dr_vcenter_id, replication_target_id, source_dataset,
              protection_datastore, rpo_minutes, retention_snapshots, source_ssh_host,
              source_ssh_port, source_ssh_user, source_ssh_key_secret, source_ssh_host_key,
              dr_cluster, dr_resource_pool, dr_folder, dr_network, dr_vm_suffix),
      delete
    on public.protection_groups to authenticated;

alter table zerfaux.operators enable row level security;
revoke all on zerfaux.operators from public, anon, authenticated;
grant all on zerfaux.operators to service_role;
grant select, insert (user_id, role, protection_group_id), update (role), delete
    on zerfaux.operators to authenticated;

-- ---------------------------------------------------------------------------------------------
-- Policies. `in (select zerfaux.group_ids(...))` and `(select zerfaux.has_role(...))` are
-- evaluated once per statement, not once per row.

create policy viewer_read on public.vcenters for select to authenticated
    using (id in (select zerfaux.vcenter_ids('viewer')));
-- An operator sets sync_requested_at; any other column needs a global admin
-- (zerfaux.vcenters_guard_update below: a policy cannot see which columns change).
create policy operator_update on public.vcenters for update to authenticated
    using (id in (select zerfaux.vcenter_ids('operator')))
    with check (id in (select zerfaux.vcenter_ids('operator')));
create policy admin_insert on public.vcenters for insert to authenticated
    with check ((select zerfaux.has_role('admin')));
create policy admin_delete on public.vcenters for delete to authenticated
    using ((select zerfaux.has_role('admin')));

create policy viewer_read on public.vcenter_vms for select to authenticated
    using (vcenter_id in (select zerfaux.vcenter_ids('viewer')));
create policy viewer_read on public.vcenter_datastores for select to authenticated
    using (vcenter_id in (select zerfaux.vcenter_ids('viewer')));

-- A target or a group can point at any host, dataset or secret name, so changing one could
-- reach another group's data: only a global admin writes them.
create policy viewer_read on public.replication_targets for select to authenticated
    using (id in (select zerfaux.target_ids('viewer')));
create policy admin_insert on public.replication_targets for insert to authenticated
    with check ((select zerfaux.has_role('admin')));
create policy admin_update on public.replication_targets for update to authenticated
    using ((select zerfaux.has_role('admin'))) with check ((select zerfaux.has_role('admin')));
create policy admin_delete on public.replication_targets for delete to authenticated
    using ((select zerfaux.has_role('admin')));

create policy viewer_read on public.protection_groups for select to authenticated
    using (id in (select zerfaux.group_ids('viewer')));
create policy admin_insert on public.protection_groups for insert to authenticated
    with check ((select zerfaux.has_role('admin')));
create policy admin_update on public.protection_groups for update to authenticated
    using ((select zerfaux.has_role('admin'))) with check ((select zerfaux.has_role('admin')));
create policy admin_delete on public.protection_groups for delete to authenticated
    using ((select zerfaux.has_role('admin')));

create policy viewer_read on public.protected_vms for select to authenticated
    using (protection_group_id in (select zerfaux.group_ids('viewer')));
create policy operator_insert on public.protected_vms for insert to authenticated
    with check (protection_group_id in (select zerfaux.group_ids('operator')));
create policy operator_update on public.protected_vms for update to authenticated
    using (protection_group_id in (select zerfaux.group_ids('operator')))
    with check (protection_group_id in (select zerfaux.group_ids('operator')));
create policy operator_delete on public.protected_vms for delete to authenticated
    using (protection_group_id in (select zerfaux.group_ids('operator')));

create policy viewer_read on public.replication_jobs for select to authenticated
    using (protection_group_id in (select zerfaux.group_ids('viewer')));
create policy operator_insert on public.replication_jobs for insert to authenticated
    with check (protection_group_id in (select zerfaux.group_ids('operator')));
create policy operator_cancel on public.replication_jobs for update to authenticated
    using (protection_group_id in (select zerfaux.group_ids('operator')))
    with check (protection_group_id in (select zerfaux.group_ids('operator')));

-- An operation is readable by whoever reads its subject; a global viewer reads all of them.
create policy viewer_read on zerfaux.operations for select to authenticated
    using ((select zerfaux.has_role('viewer'))
           or (kind, subject_id) in (select s.kind, s.subject_id from zerfaux.operation_subjects('viewer') s));
-- Workers belong to no group: anyone with a role sees which listeners are alive.
create policy member_read on zerfaux.workers for select to authenticated
    using ((select zerfaux.is_member()));

-- A user reads its own roles; an admin reads and grants the roles of its groups, a global admin
-- every role (a group admin cannot create a global row: null is in no group).
create policy member_read on zerfaux.operators for select to authenticated
    using (user_id = (select auth.uid())
           or (select zerfaux.has_role('admin'))
           or protection_group_id in (select zerfaux.group_ids('admin')));
create policy admin_insert on zerfaux.operators for insert to authenticated
    with check ((select zerfaux.has_role('admin'))
                or protection_group_id in (select zerfaux.group_ids('admin')));
create policy admin_update on zerfaux.operators for update to authenticated
    using ((select zerfaux.has_role('admin'))
           or protection_group_id in (select zerfaux.group_ids('admin')))
    with check ((select zerfaux.has_role('admin'))
                or protection_group_id in (select zerfaux.group_ids('admin')));
create policy admin_delete on zerfaux.operators for delete to authenticated
    using ((select zerfaux.has_role('admin'))
           or protection_group_id in (select zerfaux.group_ids('admin')));

-- ---------------------------------------------------------------------------------------------
-- Where a role may write some columns of a row but not others, a trigger decides: it runs as
-- the caller (row_security_active is false for the owner and service_role, who are not limited).

create function zerfaux.vcenters_guard_update() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
begin
    if row_security_active('public.vcenters')
       and to_jsonb(new) - 'sync_requested_at' is distinct from to_jsonb(old) - 'sync_requested_at'
       and not zerfaux.has_role('admin') then
        raise exception 'only a global admin changes vCenter % (%) beyond sync_requested_at', old.name, old.id
            using errcode = 'insufficient_privilege',
                  hint = 'an operator asks for a sync by setting sync_requested_at alone; see docs/authorization.md';
    end if;
    return new;
end $$;

create trigger vcenters_guard_update before update on public.vcenters
    for each row execute function zerfaux.vcenters_guard_update();

revoke execute on function zerfaux.vcenters_guard_update() from public, anon, authenticated;

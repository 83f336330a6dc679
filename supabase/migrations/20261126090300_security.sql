-- Who may do what (DESIGN §4). The same file applies to Supabase and to a bare Postgres: the
-- API roles are created when absent. RLS is on for every table:
--   anon           nothing at all;
--   authenticated  reads the control plane (not the *_secret columns) and the operations; asks
--                  for work the way a person does (request a sync, insert or cancel a
--                  replication job, protect a VM and flip its flags); no engine function;
--   service_role   everything (it bypasses RLS), including the engine functions.
-- Credentials never live in tables: the *_secret columns hold names (DESIGN §7).

do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then
        create role anon nologin noinherit;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin noinherit;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'service_role') then
        create role service_role nologin noinherit bypassrls;
    end if;
end $$;

-- auth.uid() exists on Supabase; policies here need only the role, so bare Postgres is fine.

alter table public.vcenters enable row level security;
alter table public.vcenter_vms enable row level security;
alter table public.vcenter_datastores enable row level security;
alter table public.replication_targets enable row level security;
alter table public.protection_groups enable row level security;
alter table public.protected_vms enable row level security;
alter table public.replication_jobs enable row level security;
alter table zerfaux.operations enable row level security;
alter table zerfaux.workers enable row level security;

-- Supabase grants everything in public to the API roles by default: start from nothing.
revoke all on all tables in schema public from anon, authenticated;
revoke all on all tables in schema zerfaux from public, anon, authenticated;
revoke all on schema zerfaux from public, anon;
revoke execute on all functions in schema zerfaux from public, anon, authenticated;
revoke execute on function public.replication_jobs_fill_datasets() from public, anon, authenticated;

grant usage on schema public to anon, authenticated, service_role;
grant usage on schema zerfaux to authenticated, service_role;
grant all on all tables in schema public to service_role;
grant all on all tables in schema zerfaux to service_role;
grant execute on all functions in schema zerfaux to service_role;

-- authenticated: read, minus the secret-name columns.
grant select (id, name, host, port, username, verify_tls, site, sync_requested_at,
              last_synced_at, last_sync_error, created_at)
    on public.vcenters to authenticated;
grant update (sync_requested_at) on public.vcenters to authenticated;
grant select on public.vcenter_vms, public.vcenter_datastores to authenticated;
grant select (id, name, ssh_host, ssh_port, ssh_user, ssh_host_key, target_root, dr_datastore,
              transport, max_concurrent, created_at)
    on public.replication_targets to authenticated;
grant select (id, name, source_vcenter_id, dr_vcenter_id, replication_target_id, source_dataset,
              protection_datastore, rpo_minutes, retention_snapshots, source_ssh_host,
              source_ssh_port, source_ssh_user, source_ssh_host_key, dr_cluster, dr_resource_pool,
              dr_folder, dr_network, dr_vm_suffix, created_at)
    on public.protection_groups to authenticated;
grant select, delete on public.protected_vms to authenticated;
grant insert (protection_group_id, vm_id, needs_storage_vmotion, needs_dr_shell),
      update (needs_storage_vmotion, needs_dr_shell)
    on public.protected_vms to authenticated;
grant select on public.replication_jobs to authenticated;
-- Only the group: which datasets are sent where is configuration (the group and its target),
-- not something a signed-in user may point elsewhere.
grant insert (protection_group_id),
      update (cancel_requested)
    on public.replication_jobs to authenticated;
grant select on zerfaux.operations, zerfaux.workers to authenticated;

create policy authenticated_read on public.vcenters for select to authenticated using (true);
create policy authenticated_request_sync on public.vcenters for update to authenticated
    using (true) with check (true);
create policy authenticated_read on public.vcenter_vms for select to authenticated using (true);
create policy authenticated_read on public.vcenter_datastores for select to authenticated using (true);
create policy authenticated_read on public.replication_targets for select to authenticated using (true);
create policy authenticated_read on public.protection_groups for select to authenticated using (true);
create policy authenticated_read on public.protected_vms for select to authenticated using (true);
create policy authenticated_write on public.protected_vms for insert to authenticated with check (true);
create policy authenticated_flip on public.protected_vms for update to authenticated
    using (true) with check (true);
create policy authenticated_delete on public.protected_vms for delete to authenticated using (true);
create policy authenticated_read on public.replication_jobs for select to authenticated using (true);
create policy authenticated_request on public.replication_jobs for insert to authenticated
    with check (true);
create policy authenticated_cancel on public.replication_jobs for update to authenticated
    using (true) with check (true);
create policy authenticated_read on zerfaux.operations for select to authenticated using (true);
create policy authenticated_read on zerfaux.workers for select to authenticated using (true);

-- Realtime reads publication supabase_realtime (present, empty, on every Supabase project).
do $$
begin
    if exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
        alter publication supabase_realtime add table
            zerfaux.operations, public.replication_jobs, public.protected_vms, public.vcenters;
    end if;
end $$;

-- The list of Zerfaux's own relations in public (20261201157000_named_grants_only.sql), grown by
-- network_mappings (20261201159200) and the recovery runs (20261201160000): each gets by name
-- what service_role holds on it, and the check for relations that are not Zerfaux's and that the
-- API roles cannot use is made again with the longer list, so none of ours is named in its notice.

grant all on public.vcenters, public.vcenter_vms, public.vcenter_datastores, public.replication_targets,
             public.protection_groups, public.protected_vms, public.replication_jobs,
             public.recovery_points, public.rpo_events, public.network_mappings,
             public.recovery_runs, public.recovery_run_steps
    to service_role;
grant select on public.protection_status to service_role;

do $$
declare
    r record;
begin
    for r in
        select c.oid::regclass as relation
          from pg_class c
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'v', 'm', 'f')
           and c.relname not in ('vcenters', 'vcenter_vms', 'vcenter_datastores', 'replication_targets',
                                 'protection_groups', 'protected_vms', 'replication_jobs',
                                 'recovery_points', 'rpo_events', 'protection_status', 'network_mappings',
                                 'recovery_runs', 'recovery_run_steps')
           and not has_table_privilege('anon', c.oid, 'select, insert, update, delete')
           and not has_table_privilege('authenticated', c.oid, 'select, insert, update, delete')
           and not exists (select 1 from pg_depend d where d.objid = c.oid and d.deptype = 'e')
         order by 1
    loop
        raise notice '%: anon and authenticated have no privilege on it; if 20261126090300_security.sql '
                     'was applied to this project by `supabase db push` or a zerfaux older than 20261201157000, '
                     'it may have removed the application''s grants: see docs/deploy-supabase.md', r.relation;
    end loop;
end $$;

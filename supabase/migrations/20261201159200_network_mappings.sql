-- network_mappings: which DR network a protected VM's NIC joins at recovery (docs/recovery.md).
-- Read by the recovery runs that come later. A source network with no row here is refused by
-- such a run before any effect: zerfaux.unmapped_networks(group) lists those networks.

create table public.network_mappings (
    id                  uuid primary key default gen_random_uuid(),
    protection_group_id uuid not null references public.protection_groups (id) on delete cascade,
    source_network      text not null,
    recovery_network    text not null,
    test_network        text,  -- null: an isolated port group Zerfaux creates for the test
    created_at          timestamptz not null default now(),
    constraint network_mappings_group_source_key unique (protection_group_id, source_network),
    constraint network_mappings_source_network_name check (
        char_length(source_network) between 1 and 80 and source_network !~ '[\n\r]'),
    constraint network_mappings_recovery_network_name check (
        char_length(recovery_network) between 1 and 80 and recovery_network !~ '[\n\r]'),
    constraint network_mappings_test_network_name check (
        char_length(test_network) between 1 and 80 and test_network !~ '[\n\r]')
);
-- The unique constraint's index leads with protection_group_id: it serves the foreign key
-- (the cascade from protection_groups) as well.

comment on table public.network_mappings is
    'per protection group: the DR network a NIC on source_network joins at a failover '
    '(recovery_network) and at a test (test_network; null = an isolated port group made for the test)';

alter table public.network_mappings enable row level security;
revoke all on public.network_mappings from public, anon, authenticated;
grant all on public.network_mappings to service_role;
grant select,
      insert (protection_group_id, source_network, recovery_network, test_network),
      update (protection_group_id, source_network, recovery_network, test_network),
      delete
    on public.network_mappings to authenticated;

-- Like protection_groups: a viewer of the group reads them; a mapping decides where a recovered
-- VM is reachable from, so only a global admin writes them.
create policy viewer_read on public.network_mappings for select to authenticated
    using (protection_group_id in (select zerfaux.group_ids('viewer')));
create policy admin_insert on public.network_mappings for insert to authenticated
    with check ((select zerfaux.has_role('admin')));
create policy admin_update on public.network_mappings for update to authenticated
    using ((select zerfaux.has_role('admin'))) with check ((select zerfaux.has_role('admin')));
create policy admin_delete on public.network_mappings for delete to authenticated
    using ((select zerfaux.has_role('admin')));

-- The source networks of the group's protected VMs (vcenter_vms.networks, a JSON array of
-- network names as the inventory sync writes it) that have no mapping, each with the names of
-- the VMs that use it. Empty: every NIC has somewhere to go. A VM whose inventory row is gone
-- (vm_id null) has no known network and adds nothing.
create function zerfaux.unmapped_networks(p_group uuid)
returns table (source_network text, vm_names text[])
language sql stable set search_path = zerfaux, public, pg_temp as $$
    select n.network, array_agg(distinct v.name order by v.name)
      from public.protected_vms p
      join public.vcenter_vms v on v.id = p.vm_id
     cross join lateral jsonb_array_elements_text(
           case when jsonb_typeof(v.networks) = 'array' then v.networks else '[]'::jsonb end) as n(network)
     where p.protection_group_id = p_group and n.network is not null
       and not exists (select 1 from public.network_mappings m
                        where m.protection_group_id = p_group and m.source_network = n.network)
     group by n.network
     order by n.network
$$;

comment on function zerfaux.unmapped_networks(uuid) is
    'source networks of the group''s protected VMs with no network_mappings row, and the VMs on each';

revoke execute on function zerfaux.unmapped_networks(uuid) from public, anon, authenticated;
grant execute on function zerfaux.unmapped_networks(uuid) to service_role;

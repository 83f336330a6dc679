-- Who may do what (docs/authorization.md), as `supabase test db` runs it: each persona asks on a
-- row of its own group (gold-tap) and of another (other-tap). pg_temp.try runs one statement as
-- the current role and undoes it, answering 'ok' (rows touched), 'none' (no row reached: RLS hid
-- them), 'denied' (a privilege or RLS error) or 'error: ...'.
begin;
select plan(66);

-- The world, as the owner.
insert into public.vcenters (id, name, host) values
    ('7a000000-0000-4000-a000-000000000001', 'vc-tap', 'vc-tap.example'),
    ('7a000000-0000-4000-a000-000000000002', 'vc-tap-other', 'vc-tap-other.example');
insert into public.replication_targets (id, name, ssh_host, target_root) values
    ('7a000000-0000-4000-b000-000000000001', 'zfs-tap', 'zfs-tap.example', 'tank/tap'),
    ('7a000000-0000-4000-b000-000000000002', 'zfs-tap-other', 'zfs-tap-other.example', 'tank/tap-other');
insert into public.protection_groups (id, name, source_vcenter_id, replication_target_id, source_dataset) values
    ('7a000000-0000-4000-c000-000000000001', 'gold-tap', '7a000000-0000-4000-a000-000000000001',
     '7a000000-0000-4000-b000-000000000001', 'tank/gold'),
    ('7a000000-0000-4000-c000-000000000002', 'other-tap', '7a000000-0000-4000-a000-000000000002',
     '7a000000-0000-4000-b000-000000000002', 'tank/other');
insert into public.vcenter_vms (id, vcenter_id, moref, name) values
    ('7a000000-0000-4000-d000-000000000001', '7a000000-0000-4000-a000-000000000001', 'vm-1', 'gold-01'),
    ('7a000000-0000-4000-d000-000000000002', '7a000000-0000-4000-a000-000000000002', 'vm-2', 'other-01'),
    ('7a000000-0000-4000-d000-000000000003', '7a000000-0000-4000-a000-000000000001', 'vm-3', 'gold-02');
insert into public.protected_vms (protection_group_id, vm_id) values
    ('7a000000-0000-4000-c000-000000000001', '7a000000-0000-4000-d000-000000000001'),
    ('7a000000-0000-4000-c000-000000000002', '7a000000-0000-4000-d000-000000000002');
insert into public.replication_jobs (id, protection_group_id, status) values
    ('7a000000-0000-4000-e000-000000000001', '7a000000-0000-4000-c000-000000000001', 'completed'),
    ('7a000000-0000-4000-e000-000000000002', '7a000000-0000-4000-c000-000000000002', 'completed');
-- fill_datasets makes every new job pending: mark them finished, as the engine would.
update public.replication_jobs set status = 'completed' where id in
    ('7a000000-0000-4000-e000-000000000001', '7a000000-0000-4000-e000-000000000002');
update public.vcenters set sync_requested_at = now() where name like 'vc-tap%';
insert into zerfaux.operators (user_id, role, protection_group_id) values
    ('7a000000-0000-4000-9000-000000000001', 'viewer',   '7a000000-0000-4000-c000-000000000001'),
    ('7a000000-0000-4000-9000-000000000002', 'operator', '7a000000-0000-4000-c000-000000000001'),
    ('7a000000-0000-4000-9000-000000000003', 'admin',    '7a000000-0000-4000-c000-000000000001'),
    ('7a000000-0000-4000-9000-000000000004', 'admin',    null),
    ('7a000000-0000-4000-9000-000000000005', 'viewer',   '7a000000-0000-4000-c000-000000000002');

create function pg_temp.become(p_user uuid, p_role text default 'authenticated') returns void
language plpgsql as $$
begin
    execute format('set local role %I', p_role);
    perform set_config('request.jwt.claims',
                       json_build_object('role', p_role, 'sub', p_user)::text, true);
end $$;

create function pg_temp.try(p_sql text) returns text language plpgsql as $$
declare
    v_rows bigint;
    v_detail text;
begin
    begin
        execute p_sql;
        get diagnostics v_rows = row_count;
        raise exception 'tap-undo' using detail = v_rows::text;
    exception
        when insufficient_privilege then
            return 'denied';
        when others then
            get stacked diagnostics v_detail = pg_exception_detail;
            if sqlerrm = 'tap-undo' then
                return case when v_detail::bigint > 0 then 'ok' else 'none' end;
            end if;
            return 'error: ' || sqlerrm;
    end;
end $$;

-- anon: no grant at all.
select pg_temp.become(null, 'anon');
select is(pg_temp.try($$select 1 from public.vcenters$$), 'denied', 'anon reads no vCenter');
select is(pg_temp.try($$update public.protected_vms set needs_dr_shell = true$$), 'denied', 'anon flips no flag');
select is(pg_temp.try($$select 1 from zerfaux.operators$$), 'denied', 'anon reads no role');
reset role;

-- A stranger: signed up, no row in zerfaux.operators.
select pg_temp.become('7a000000-0000-4000-9000-0000000000ff');
select is(pg_temp.try($$select 1 from public.vcenters where name like 'vc-tap%'$$), 'none', 'a stranger sees no vCenter');
select is(pg_temp.try($$select 1 from public.vcenter_vms where name like '%-0_'$$), 'none', 'a stranger sees no VM');
select is(pg_temp.try($$select 1 from public.protection_groups where name like '%-tap'$$), 'none', 'a stranger sees no group');
select is(pg_temp.try($$select 1 from zerfaux.operations$$), 'none', 'a stranger sees no operation');
select is(pg_temp.try($$select 1 from zerfaux.operators$$), 'none', 'a stranger sees no role');
select is(pg_temp.try($$update public.vcenters set sync_requested_at = now()$$), 'none', 'a stranger asks for no sync');
select is(pg_temp.try($$update public.protected_vms set needs_storage_vmotion = true$$), 'none', 'a stranger moves no VM');
select is(pg_temp.try($$delete from public.protected_vms$$), 'none', 'a stranger unprotects no VM');
select is(pg_temp.try($$update public.replication_jobs set cancel_requested = true$$), 'none', 'a stranger cancels no job');
select is(pg_temp.try($$insert into public.replication_jobs (protection_group_id) values ('7a000000-0000-4000-c000-000000000001')$$),
          'denied', 'a stranger asks for no replication');
select is(pg_temp.try($$insert into zerfaux.operators (user_id, role) values ((select auth.uid()), 'admin')$$),
          'denied', 'a stranger cannot make itself admin');
reset role;

-- A viewer of gold-tap: reads its group, never another's, writes nothing.
select pg_temp.become('7a000000-0000-4000-9000-000000000001');
select is(pg_temp.try($$select 1 from public.vcenters where name = 'vc-tap'$$), 'ok', 'a viewer reads its group''s vCenter');
select is(pg_temp.try($$select 1 from public.vcenters where name = 'vc-tap-other'$$), 'none', 'a viewer does not read another group''s vCenter');
select is(pg_temp.try($$select password_secret from public.vcenters$$), 'denied', 'a viewer reads no secret name');
select is(pg_temp.try($$select 1 from public.vcenter_vms where name = 'gold-01'$$), 'ok', 'a viewer reads its vCenter''s inventory');
select is(pg_temp.try($$select 1 from public.vcenter_vms where name = 'other-01'$$), 'none', 'a viewer does not read another inventory');
select is(pg_temp.try($$select 1 from public.replication_targets where name = 'zfs-tap'$$), 'ok', 'a viewer reads its target');
select is(pg_temp.try($$select 1 from public.replication_targets where name = 'zfs-tap-other'$$), 'none', 'a viewer does not read another target');
select is(pg_temp.try($$select 1 from public.protected_vms where protection_group_id = '7a000000-0000-4000-c000-000000000001'$$), 'ok', 'a viewer reads its protected VMs');
select is(pg_temp.try($$select 1 from public.replication_jobs where protection_group_id = '7a000000-0000-4000-c000-000000000002'$$), 'none', 'a viewer does not read another group''s jobs');
select is(pg_temp.try($$select 1 from zerfaux.operations where subject_id = '7a000000-0000-4000-a000-000000000001'$$), 'ok', 'a viewer reads the sync of its vCenter');
select is(pg_temp.try($$select 1 from zerfaux.operations where subject_id = '7a000000-0000-4000-a000-000000000002'$$), 'none', 'a viewer does not read another vCenter''s sync');
select is(pg_temp.try($$select 1 from zerfaux.operators where user_id = (select auth.uid())$$), 'ok', 'a viewer reads its own role');
select is(pg_temp.try($$select 1 from zerfaux.operators where user_id <> (select auth.uid())$$), 'none', 'a viewer reads no one else''s role');
select is(pg_temp.try($$update public.vcenters set sync_requested_at = now() where name = 'vc-tap'$$), 'none', 'a viewer asks for no sync');
select is(pg_temp.try($$insert into public.replication_jobs (protection_group_id) values ('7a000000-0000-4000-c000-000000000001')$$),
          'denied', 'a viewer asks for no replication');
select is(pg_temp.try($$update public.protected_vms set needs_dr_shell = true$$), 'none', 'a viewer flips no flag');
reset role;

-- An operator of gold-tap: asks for work in its group only, writes no configuration.
select pg_temp.become('7a000000-0000-4000-9000-000000000002');
select is(pg_temp.try($$update public.vcenters set sync_requested_at = now() where name = 'vc-tap'$$), 'ok', 'an operator asks for a sync of its vCenter');
select is(pg_temp.try($$update public.vcenters set sync_requested_at = now() where name = 'vc-tap-other'$$), 'none', 'an operator asks for no sync of another vCenter');
select is(pg_temp.try($$update public.vcenters set host = 'elsewhere.example' where name = 'vc-tap'$$), 'denied', 'an operator does not move its vCenter');
select is(pg_temp.try($$insert into public.replication_jobs (protection_group_id) values ('7a000000-0000-4000-c000-000000000001')$$),
          'ok', 'an operator asks for a replication of its group');
select is(pg_temp.try($$insert into public.replication_jobs (protection_group_id) values ('7a000000-0000-4000-c000-000000000002')$$),
          'denied', 'an operator asks for no replication of another group');
select is(pg_temp.try($$update public.replication_jobs set cancel_requested = true where protection_group_id = '7a000000-0000-4000-c000-000000000001'$$),
          'ok', 'an operator cancels a job of its group');
select is(pg_temp.try($$update public.replication_jobs set cancel_requested = true where protection_group_id = '7a000000-0000-4000-c000-000000000002'$$),
          'none', 'an operator cancels no job of another group');
select is(pg_temp.try($$update public.replication_jobs set status = 'completed'$$), 'denied', 'an operator writes no job status');
select is(pg_temp.try($$insert into public.protected_vms (protection_group_id, vm_id) values ('7a000000-0000-4000-c000-000000000001', '7a000000-0000-4000-d000-000000000003')$$),
          'ok', 'an operator protects a VM in its group');
select is(pg_temp.try($$update public.protected_vms set needs_storage_vmotion = true, needs_dr_shell = true where protection_group_id = '7a000000-0000-4000-c000-000000000001'$$),
          'ok', 'an operator flips the flags of its protected VMs');
select is(pg_temp.try($$update public.protected_vms set needs_storage_vmotion = true where protection_group_id = '7a000000-0000-4000-c000-000000000002'$$),
          'none', 'an operator flips no flag of another group');
select is(pg_temp.try($$delete from public.protected_vms where protection_group_id = '7a000000-0000-4000-c000-000000000001'$$), 'ok', 'an operator unprotects a VM of its group');
select is(pg_temp.try($$delete from public.protected_vms where protection_group_id = '7a000000-0000-4000-c000-000000000002'$$), 'none', 'an operator unprotects no VM of another group');
select is(pg_temp.try($$update public.protection_groups set retention_snapshots = 1$$), 'denied', 'an operator changes no group''s configuration');
select is(pg_temp.try($$update public.protection_groups set paused = true where name = 'gold-tap'$$), 'ok', 'an operator pauses its group');
select is(pg_temp.try($$update public.protection_groups set paused = true where name = 'other-tap'$$), 'none', 'an operator pauses no other group');
select is(pg_temp.try($$insert into zerfaux.operators (user_id, role, protection_group_id) values (gen_random_uuid(), 'viewer', '7a000000-0000-4000-c000-000000000001')$$),
          'denied', 'an operator grants no role');
reset role;

-- An admin of gold-tap: grants roles in its group; configuration stays a global admin's.
select pg_temp.become('7a000000-0000-4000-9000-000000000003');
select is(pg_temp.try($$insert into zerfaux.operators (user_id, role, protection_group_id) values (gen_random_uuid(), 'operator', '7a000000-0000-4000-c000-000000000001')$$),
          'ok', 'a group admin grants a role in its group');
select is(pg_temp.try($$insert into zerfaux.operators (user_id, role, protection_group_id) values (gen_random_uuid(), 'operator', '7a000000-0000-4000-c000-000000000002')$$),
          'denied', 'a group admin grants no role in another group');
select is(pg_temp.try($$insert into zerfaux.operators (user_id, role) values (gen_random_uuid(), 'admin')$$),
          'denied', 'a group admin grants no global role');
select is(pg_temp.try($$update zerfaux.operators set role = 'admin' where role = 'viewer'$$), 'ok', 'a group admin changes a role in its group');
select is(pg_temp.try($$delete from zerfaux.operators where protection_group_id = '7a000000-0000-4000-c000-000000000002'$$), 'none', 'a group admin revokes no role of another group');
select is(pg_temp.try($$update public.protection_groups set retention_snapshots = 1 where name = 'gold-tap'$$), 'denied', 'a group admin does not change its group''s configuration');
select is(pg_temp.try($$insert into public.vcenters (name, host) values ('vc-tap-new', 'h')$$), 'denied', 'a group admin adds no vCenter');
select is(pg_temp.try($$update public.replication_jobs set cancel_requested = true where protection_group_id = '7a000000-0000-4000-c000-000000000001'$$),
          'ok', 'a group admin is an operator of its group too');
reset role;

-- A global admin: writes the configuration, and everything an operator may, everywhere.
select pg_temp.become('7a000000-0000-4000-9000-000000000004');
select is(pg_temp.try($$insert into public.vcenters (name, host, password_secret) values ('vc-tap-new', 'h', 'vc-new-password')$$), 'ok', 'an admin adds a vCenter');
select is(pg_temp.try($$update public.vcenters set host = 'elsewhere.example' where name = 'vc-tap-other'$$), 'ok', 'an admin moves a vCenter');
select is(pg_temp.try($$update public.replication_targets set max_concurrent = 4$$), 'ok', 'an admin changes a target');
select is(pg_temp.try($$insert into public.protection_groups (name, source_vcenter_id) values ('new-tap', '7a000000-0000-4000-a000-000000000001')$$), 'ok', 'an admin adds a group');
select is(pg_temp.try($$insert into zerfaux.operators (user_id, role) values (gen_random_uuid(), 'viewer')$$), 'ok', 'an admin grants a global role');
select is(pg_temp.try($$update public.protected_vms set needs_dr_shell = true where protection_group_id = '7a000000-0000-4000-c000-000000000002'$$),
          'ok', 'an admin flips a flag in any group');
select is(pg_temp.try($$select 1 from zerfaux.operations where subject_id = '7a000000-0000-4000-a000-000000000002'$$), 'ok', 'an admin reads every operation');
select is(pg_temp.try($$select ssh_key_secret from public.replication_targets$$), 'denied', 'even an admin reads no secret name');
select is(pg_temp.try($$update public.vcenters set last_synced_at = now()$$), 'denied', 'an admin writes no engine column');
reset role;

-- service_role and the owner are not limited by roles.
select pg_temp.become(null, 'service_role');
select is(pg_temp.try($$update public.replication_jobs set status = 'completed'$$), 'ok', 'service_role writes as today');
reset role;
select is(pg_temp.try($$select 1 from zerfaux.operations where subject_id = '7a000000-0000-4000-a000-000000000002'$$), 'ok', 'the owner reads as today');

select * from finish();
rollback;

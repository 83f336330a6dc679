-- Demo data for the embedded default (stub mode): a primary and a DR vCenter, a replication
-- target and a protection group. Safe to load again: fixed ids, nothing overwritten.
insert into public.vcenters (id, name, host, username, password_secret, site) values
    ('00000000-0000-4000-a000-000000000001', 'vc-primary', 'vcenter-primary.example.internal',
     'administrator@vsphere.local', 'vc-primary-password', 'primary'),
    ('00000000-0000-4000-a000-000000000002', 'vc-dr', 'vcenter-dr.example.internal',
     'administrator@vsphere.local', 'vc-dr-password', 'dr')
on conflict do nothing;

insert into public.replication_targets
    (id, name, ssh_host, ssh_user, ssh_key_secret, ssh_host_key, target_root, dr_datastore, transport, max_concurrent)
values
    ('00000000-0000-4000-b000-000000000001', 'dr-zfs-01', 'zfs-dr-01.example.internal', 'zerfaux',
     'dr-zfs-01-key', 'zfs-dr-01.example.internal ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoDemoDemoDemoDemoDemoDemoDemoDemoDemo0',
     'tank/replicas', 'zfs-dr-01', 'ssh', 2)
on conflict do nothing;

-- gold starts paused: it replicates when asked (a replication_jobs row); set paused = false and
-- its 15-minute RPO schedules it by itself (docs/rpo.md). `zerfaux demo` adds a group with a
-- one-minute RPO that replicates by itself. Paused only when made here (a group already there
-- is left as it is), and only where the schedule's column exists (older schemas load this too).
do $$
declare
    v_made integer;
begin
    insert into public.protection_groups
        (id, name, source_vcenter_id, dr_vcenter_id, replication_target_id, source_dataset,
         protection_datastore, rpo_minutes, retention_snapshots)
    values
        ('00000000-0000-4000-c000-000000000001', 'gold', '00000000-0000-4000-a000-000000000001',
         '00000000-0000-4000-a000-000000000002', '00000000-0000-4000-b000-000000000001',
         'tank/vmstore', 'zfs-protect-01', 15, 24)
    on conflict do nothing;
    get diagnostics v_made = row_count;
    if v_made = 1 and exists (select 1 from pg_attribute
                               where attrelid = 'public.protection_groups'::regclass
                                 and attname = 'paused' and not attisdropped) then
        execute 'update public.protection_groups set paused = true where id = $1'
            using '00000000-0000-4000-c000-000000000001'::uuid;
    end if;
end $$;

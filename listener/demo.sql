-- What `zerfaux demo` does as a frontend would: edit rows, then read them back.
-- These are also the commands `zerfaux run` prints for you to try by hand.

-- name: request_sync
update vcenters set sync_requested_at = now() where name = 'vc-primary';

-- name: sync_state
select last_synced_at, last_sync_error, last_synced_at >= sync_requested_at as done,
       (select count(*) from vcenter_vms v where v.vcenter_id = c.id and v.removed_at is null) as vms
  from vcenters c where name = 'vc-primary';

-- name: protect_vm
insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion)
select g.id, v.id, true from protection_groups g, vcenter_vms v
 where g.name = 'gold' and v.name = 'vc-primary-vm-0001'
on conflict (protection_group_id, vm_id) do update set needs_storage_vmotion = true
returning id;

-- name: vmotion_state
select p.needs_storage_vmotion, p.last_error, v.name, v.datastore
  from protected_vms p join vcenter_vms v on v.id = p.vm_id where p.id = %(id)s;

-- name: insert_job
insert into replication_jobs (protection_group_id)
select id from protection_groups where name = 'gold' returning id;

-- name: job_state
select status, bytes_transferred, bytes_estimated, snapshot_name, base_snapshot, error, notes
  from replication_jobs where id = %(id)s;

-- name: request_dr_shell
update protected_vms set needs_dr_shell = true where id = %(id)s;

-- name: dr_shell_state
select needs_dr_shell, dr_shell_vm_created, dr_shell_vm_id, last_error from protected_vms where id = %(id)s;

-- name: add_scheduled_group
insert into protection_groups (name, source_vcenter_id, dr_vcenter_id, replication_target_id, source_dataset,
                               protection_datastore, rpo_minutes, retention_snapshots)
select 'every-minute', source_vcenter_id, dr_vcenter_id, replication_target_id, 'tank/every-minute',
       protection_datastore, 1, 5
  from protection_groups where name = 'gold'
on conflict (name) do update set rpo_minutes = 1, paused = false
returning id, clock_timestamp() as since;

-- name: scheduled_state
select count(*) filter (where j.status = 'completed') as replicated,
       count(*) filter (where j.status = 'failed') as failed,
       (select to_char(g.next_replication_at, 'HH24:MI:SS') from protection_groups g where g.id = %(id)s) as next_at,
       (select s.rpo_status from protection_status s where s.protection_group_id = %(id)s) as rpo_status
  from replication_jobs j
 where j.protection_group_id = %(id)s and j.origin = 'schedule' and j.created_at >= %(since)s;

-- name: insert_test_run
insert into recovery_runs (protection_group_id, kind)
select id, 'test' from protection_groups where name = 'gold' returning id;

-- name: insert_cleanup_run
insert into recovery_runs (protection_group_id, kind, test_run_id)
select protection_group_id, 'cleanup', id from recovery_runs where id = %(id)s returning id;

-- name: run_state
select r.status, r.rto_seconds, r.error,
       (select count(*) from recovery_run_steps s where s.run_id = r.id) as steps,
       (select count(*) from recovery_run_steps s
         where s.run_id = r.id and s.status in ('done', 'warning', 'skipped')) as finished,
       (select s.name from recovery_run_steps s where s.run_id = r.id and s.status = 'running'
         order by s.seq limit 1) as current,
       (select p.tested_at from recovery_points p where p.id = r.recovery_point_id) as tested_at
  from recovery_runs r where r.id = %(id)s;

-- name: map_networks
-- gold's VM has a NIC on "VM Network" (the stub inventory's network): at a failover it joins
-- dr-network; at a test, the isolated port group the run makes (test_network null). Not in the
-- seed: the tests built on the seed start with no mappings.
insert into network_mappings (protection_group_id, source_network, recovery_network)
select id, 'VM Network', 'dr-network' from protection_groups where name = 'gold'
on conflict (protection_group_id, source_network) do nothing returning id;

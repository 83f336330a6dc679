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

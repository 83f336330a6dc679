-- zerfaux.run_report(run): what `zerfaux report run <id>` prints and an auditor is handed
-- (docs/recovery.md, "Recovery runs: the rows"). One JSON document, null when there is no such run:
--   run             the recovery_runs row
--   group           {id, name}
--   recovery_point  {id, snapshot_name, guid, created_at, replicated_at, tested_at} or null
--   test_run        a cleanup's test run {id, status, started_at, completed_at, rto_seconds} or null
--   cleanup_runs    a test's cleanup runs [{id, status, started_at, completed_at}]
--   steps           [{seq, name, protected_vm_id, vm_name, status, started_at, finished_at,
--                     duration_seconds, error, detail}] by seq
--   vms             per VM of the run's steps, in boot order: {protected_vm_id, vm_name,
--                     boot_priority, powered_on_at, boot_time, ready_at, ready_status, ready_how,
--                     waited_seconds}; ready_at is the VM's ready time (wait_ready's detail, else
--                     its finish when done), null when the wait timed out (ready_status 'warning')
--   rto_seconds, data_loss_seconds
--   warnings        the steps whose status is 'warning' or 'failed' [{seq, name, vm_name, status, error}]
-- Times are ISO 8601 text in UTC.

create function zerfaux.run_report(p_run uuid)
returns jsonb language sql stable security definer set search_path = zerfaux, public, pg_temp
set timezone = 'UTC' as $$
    with run as (
        select * from public.recovery_runs where id = p_run
    ), steps as (
        select s.*, v.name as vm_name, p.boot_priority,
               round(extract(epoch from s.finished_at - s.started_at)::numeric, 3) as duration_seconds
          from public.recovery_run_steps s
          left join public.protected_vms p on p.id = s.protected_vm_id
          left join public.vcenter_vms v on v.id = p.vm_id
         where s.run_id = p_run
    ), vms as (
        select s.protected_vm_id, max(s.vm_name) as vm_name, max(s.boot_priority) as boot_priority,
               max(s.finished_at) filter (where s.name = 'power_on' and s.status = 'done') as powered_on_at,
               coalesce(max(s.detail ->> 'boot_time') filter (where s.name = 'wait_ready'),
                        max(s.detail ->> 'boot_time') filter (where s.name = 'power_on')) as boot_time,
               coalesce(max(s.detail ->> 'ready_at') filter (where s.name = 'wait_ready'),
                        to_char(max(s.finished_at) filter (where s.name = 'wait_ready' and s.status = 'done')
                                    at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) as ready_at,
               max(s.status) filter (where s.name = 'wait_ready') as ready_status,
               max(s.detail ->> 'how') filter (where s.name = 'wait_ready') as ready_how,
               max(s.detail ->> 'waited_seconds') filter (where s.name = 'wait_ready') as waited_seconds
          from steps s
         where s.protected_vm_id is not null
         group by s.protected_vm_id
    )
    select jsonb_build_object(
        'run', to_jsonb(r),
        'group', (select jsonb_build_object('id', g.id, 'name', g.name)
                    from public.protection_groups g where g.id = r.protection_group_id),
        'recovery_point', (select jsonb_build_object('id', p.id, 'snapshot_name', p.snapshot_name, 'guid', p.guid,
                                                     'created_at', p.created_at, 'replicated_at', p.replicated_at,
                                                     'tested_at', p.tested_at)
                             from public.recovery_points p where p.id = r.recovery_point_id),
        'test_run', (select jsonb_build_object('id', t.id, 'status', t.status, 'started_at', t.started_at,
                                               'completed_at', t.completed_at, 'rto_seconds', t.rto_seconds)
                       from public.recovery_runs t where t.id = r.test_run_id),
        'cleanup_runs', coalesce((select jsonb_agg(jsonb_build_object('id', c.id, 'status', c.status,
                                                                      'started_at', c.started_at,
                                                                      'completed_at', c.completed_at)
                                                   order by c.created_at)
                                    from public.recovery_runs c where c.test_run_id = r.id), '[]'::jsonb),
        'steps', coalesce((select jsonb_agg(jsonb_build_object(
                                      'seq', s.seq, 'name', s.name, 'protected_vm_id', s.protected_vm_id,
                                      'vm_name', s.vm_name, 'status', s.status, 'started_at', s.started_at,
                                      'finished_at', s.finished_at, 'duration_seconds', s.duration_seconds,
                                      'error', s.error, 'detail', s.detail) order by s.seq)
                             from steps s), '[]'::jsonb),
        'vms', coalesce((select jsonb_agg(to_jsonb(v) order by v.boot_priority, v.vm_name, v.protected_vm_id)
                           from vms v), '[]'::jsonb),
        'rto_seconds', r.rto_seconds,
        'data_loss_seconds', r.data_loss_seconds,
        'warnings', coalesce((select jsonb_agg(jsonb_build_object('seq', s.seq, 'name', s.name, 'vm_name', s.vm_name,
                                                                  'status', s.status, 'error', s.error)
                                               order by s.seq)
                                from steps s where s.status in ('warning', 'failed')), '[]'::jsonb))
      from run r
$$;

comment on function zerfaux.run_report(uuid) is
    'a recovery run''s report: run, group, recovery point, steps with times, per-VM boot and ready times, '
    'RTO, data loss, warnings; null when no such run';

revoke execute on function zerfaux.run_report(uuid) from public, anon, authenticated;
grant execute on function zerfaux.run_report(uuid) to service_role;

-- zerfaux.run_report for every kind of run (issue 14; docs/recovery.md, "Failover runs: the
-- rows"): the document of 20261201160200_run_report.sql, unchanged for what it had, and besides:
--   group           also {state, direction}
--   acts_on_run     a commit's, rollback's or reprotect's run {id, kind, status, started_at,
--                   completed_at, recovery_point_id}, or null
--   acted_on_by     the commit, rollback or reprotect runs that acted on this one
--                   [{id, kind, status, completed_at}]
--   vms             per VM also the source side (planned_migration: shutdown_source; failover:
--                   fence_source): source_step, source_status, source_stopped_at, source_how,
--                   fenced, source_error; and from power_on's detail: source_state,
--                   source_changed_at (A's VM as checked just before B's powered on)
--   datastore       the datastore the VMs came up on (present_datastore's detail.datastore), or null
--   final_snapshot  a planned_migration's final snapshot {snapshot_name, guid, created_at}
--                   (report.final_point, else replicate_final's detail), or null
--   report          the handler's report (the run's report column), as it is
-- Times are ISO 8601 text in UTC.

create or replace function zerfaux.run_report(p_run uuid)
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
               max(s.detail ->> 'waited_seconds') filter (where s.name = 'wait_ready') as waited_seconds,
               max(s.name) filter (where s.name in ('shutdown_source', 'fence_source')) as source_step,
               max(s.status) filter (where s.name in ('shutdown_source', 'fence_source')) as source_status,
               max(s.finished_at) filter (where s.name in ('shutdown_source', 'fence_source')
                                            and s.status in ('done', 'warning')) as source_stopped_at,
               max(s.detail ->> 'how') filter (where s.name in ('shutdown_source', 'fence_source')) as source_how,
               max(s.detail ->> 'fenced') filter (where s.name = 'fence_source') as fenced,
               max(s.error) filter (where s.name in ('shutdown_source', 'fence_source')) as source_error,
               max(s.detail ->> 'source_state') filter (where s.name = 'power_on') as source_state,
               max(s.detail ->> 'source_changed_at') filter (where s.name = 'power_on') as source_changed_at
          from steps s
         where s.protected_vm_id is not null
         group by s.protected_vm_id
    )
    select jsonb_build_object(
        'run', to_jsonb(r),
        'group', (select jsonb_build_object('id', g.id, 'name', g.name, 'state', g.state, 'direction', g.direction)
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
        'acts_on_run', (select jsonb_build_object('id', a.id, 'kind', a.kind, 'status', a.status,
                                                  'started_at', a.started_at, 'completed_at', a.completed_at,
                                                  'recovery_point_id', a.recovery_point_id)
                          from public.recovery_runs a where a.id = r.acts_on_run_id),
        'acted_on_by', coalesce((select jsonb_agg(jsonb_build_object('id', b.id, 'kind', b.kind, 'status', b.status,
                                                                     'completed_at', b.completed_at)
                                                  order by b.created_at)
                                   from public.recovery_runs b where b.acts_on_run_id = r.id), '[]'::jsonb),
        'steps', coalesce((select jsonb_agg(jsonb_build_object(
                                      'seq', s.seq, 'name', s.name, 'protected_vm_id', s.protected_vm_id,
                                      'vm_name', s.vm_name, 'status', s.status, 'started_at', s.started_at,
                                      'finished_at', s.finished_at, 'duration_seconds', s.duration_seconds,
                                      'error', s.error, 'detail', s.detail) order by s.seq)
                             from steps s), '[]'::jsonb),
        'vms', coalesce((select jsonb_agg(to_jsonb(v) order by v.boot_priority, v.vm_name, v.protected_vm_id)
                           from vms v), '[]'::jsonb),
        'datastore', (select s.detail ->> 'datastore' from steps s
                       where s.name = 'present_datastore' and s.detail ? 'datastore' order by s.seq limit 1),
        'final_snapshot', case when r.kind = 'planned_migration' then coalesce(
            case when jsonb_typeof(r.report -> 'final_point') = 'object' then r.report -> 'final_point' end,
            (select jsonb_strip_nulls(jsonb_build_object(
                        'snapshot_name', coalesce(s.detail ->> 'snapshot_name', s.detail ->> 'snapshot'),
                        'guid', s.detail ->> 'guid', 'created_at', s.detail ->> 'created_at'))
               from steps s where s.name = 'replicate_final' and s.detail ? 'guid' order by s.seq limit 1)) end,
        'report', r.report,
        'rto_seconds', r.rto_seconds,
        'data_loss_seconds', r.data_loss_seconds,
        'warnings', coalesce((select jsonb_agg(jsonb_build_object('seq', s.seq, 'name', s.name, 'vm_name', s.vm_name,
                                                                  'status', s.status, 'error', s.error)
                                               order by s.seq)
                                from steps s where s.status in ('warning', 'failed')), '[]'::jsonb))
      from run r
$$;

comment on function zerfaux.run_report(uuid) is
    'a recovery run''s report: run, group (state, direction), recovery point, the run it acts on and those that '
    'acted on it, steps with times, per-VM source shutdown or fencing, boot and ready times, datastore, final '
    'snapshot, the handler''s report, RTO, data loss, warnings; null when no such run';

revoke execute on function zerfaux.run_report(uuid) from public, anon, authenticated;
grant execute on function zerfaux.run_report(uuid) to service_role;

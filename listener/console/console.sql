-- Named queries of the DR console (listener/console/queries.py), loaded once at import.
-- Page and action queries run as the signed-in user (role authenticated, the user's JWT claims),
-- so row-level security decides what each one returns or may change. Each page is a fixed
-- number of these, whatever the number of groups: per-group detail comes from laterals and
-- aggregates inside one statement, never from a query per group.
-- Columns are named one by one: authenticated may not read the *_secret columns.

-- name: has_runs
select to_regclass('public.recovery_runs') is not null
   and to_regclass('public.recovery_run_steps') is not null as present;

-- name: as_user
select set_config('request.jwt.claims', %(claims)s, true) as claims,
       set_config('statement_timeout', %(timeout)s, true) as timeout;

-- name: groups
-- Every group the user may read (or one, with %(group)s), with its status, the job that runs
-- now, and the last 24 hours of recovery points and RPO events for the chart.
with operate as (select zerfaux.group_ids('operator') as id),
     administer as (select zerfaux.group_ids('admin') as id)
select g.id, g.name, g.rpo_minutes, g.paused, g.state, g.next_replication_at,
       g.source_vcenter_id, g.dr_vcenter_id,
       s.current_rpo_seconds::float8 as current_rpo_seconds, s.rpo_status, s.last_recovery_point_at,
       s.last_job_status, s.last_error,
       case when g.id in (select id from administer) then 'admin'
            when g.id in (select id from operate) then 'operator' else 'viewer' end as my_role,
       j.id as job_id, j.status as job_status, j.bytes_transferred, j.bytes_estimated,
       j.started_at as job_started_at, j.origin as job_origin,
       extract(epoch from now())::float8 as now_epoch,
       coalesce(pts.points, '[]'::jsonb) as points,
       coalesce(ev.events, '[]'::jsonb) as events
  from public.protection_groups g
  join public.protection_status s on s.protection_group_id = g.id
  left join lateral (
      select r.id, r.status, r.bytes_transferred, r.bytes_estimated, r.started_at, r.origin
        from public.replication_jobs r
       where r.protection_group_id = g.id and r.status in ('pending', 'running')
       order by r.created_at desc limit 1) j on true
  left join lateral (
      select jsonb_agg(jsonb_build_array(extract(epoch from x.created_at)::float8,
                                         extract(epoch from x.arrived)::float8) order by x.arrived) as points
        from (select p.created_at, coalesce(p.replicated_at, p.created_at) as arrived
                from public.recovery_points p
               where p.protection_group_id = g.id and p.created_at >= now() - interval '24 hours'
              union all
              (select p.created_at, coalesce(p.replicated_at, p.created_at)
                 from public.recovery_points p
                where p.protection_group_id = g.id and p.created_at < now() - interval '24 hours'
                order by p.created_at desc limit 1)) x) pts on true
  left join lateral (
      select jsonb_agg(jsonb_build_array(extract(epoch from e.at)::float8, e.new_status,
                                         e.rpo_seconds::float8, e.reason) order by e.at) as events
        from public.rpo_events e
       where e.protection_group_id = g.id and e.at >= now() - interval '24 hours') ev on true
 where %(group)s::uuid is null or g.id = %(group)s::uuid
 order by g.name, g.id;

-- name: groups_page
-- One page of the groups page, worst status first (violated, at risk, unknown, ok; then by name),
-- and the counts per status over EVERY group the user may read. The status of every group is
-- computed once (the one pass over protection_status the counts need anyway); the job, the
-- recovery points and the RPO events of the chart are read only for the %(limit)s groups of the
-- page, through the (group, time) indexes. One row per group of the page, each carrying the
-- counts; a page past the last still returns one row: the counts, with a null id. Each table
-- named costs its RLS policy's group_ids() once (about 1 ms at 1,000 groups), so the columns
-- come from protection_status itself (no second join to protection_groups: the groups page
-- needs none of its other columns) and the role from has_role() on the page's groups only (a
-- global role, asked once, answers for every group). The chart's points come as a float8
-- array: building and parsing 2,400 small jsonb arrays was a third of the statement.
with listed as materialized (
         select s.protection_group_id as id, s.rpo_status, s.current_rpo_seconds, s.last_recovery_point_at,
                s.last_job_status, s.last_error, s.paused, s.name, s.rpo_minutes, s.next_replication_at,
                case s.rpo_status when 'violated' then 0 when 'at_risk' then 1 when 'unknown' then 2
                                  else 3 end as rank
           from public.protection_status s),
     summary as (
         select count(*)::int as total,
                count(*) filter (where rpo_status = 'violated')::int as n_violated,
                count(*) filter (where rpo_status = 'at_risk')::int as n_at_risk,
                count(*) filter (where rpo_status = 'unknown')::int as n_unknown,
                count(*) filter (where rpo_status = 'ok')::int as n_ok,
                count(*) filter (where paused)::int as n_paused
           from listed),
     shown as materialized (
         select l.* from listed l order by l.rank, l.name, l.id limit %(limit)s offset %(offset)s)
select sm.total, sm.n_violated, sm.n_at_risk, sm.n_unknown, sm.n_ok, sm.n_paused,
       l.id, l.name, l.rpo_minutes, l.paused, l.next_replication_at,
       l.current_rpo_seconds::float8 as current_rpo_seconds, l.rpo_status, l.last_recovery_point_at,
       l.last_job_status, l.last_error,
       case when (select zerfaux.has_role('admin')) or zerfaux.has_role('admin', l.id) then 'admin'
            when (select zerfaux.has_role('operator')) or zerfaux.has_role('operator', l.id) then 'operator'
            else 'viewer' end as my_role,
       j.id as job_id, j.status as job_status, j.bytes_transferred, j.bytes_estimated,
       j.started_at as job_started_at, j.origin as job_origin,
       extract(epoch from now())::float8 as now_epoch,
       coalesce(pts.points, '{}'::float8[]) as points,  -- [[created, arrived], ...]: no jsonb to build
       coalesce(ev.events, '[]'::jsonb) as events
  from summary sm
  left join shown l on true
  left join lateral (
      select r.id, r.status, r.bytes_transferred, r.bytes_estimated, r.started_at, r.origin
        from public.replication_jobs r
       where r.protection_group_id = l.id and r.status in ('pending', 'running')
       order by r.created_at desc limit 1) j on true
  left join lateral (
      select array_agg(array[extract(epoch from x.created_at)::float8,
                             extract(epoch from x.arrived)::float8] order by x.arrived) as points
        from (select p.created_at, coalesce(p.replicated_at, p.created_at) as arrived
                from public.recovery_points p
               where p.protection_group_id = l.id and p.created_at >= now() - interval '24 hours'
              union all
              (select p.created_at, coalesce(p.replicated_at, p.created_at)
                 from public.recovery_points p
                where p.protection_group_id = l.id and p.created_at < now() - interval '24 hours'
                order by p.created_at desc limit 1)) x) pts on true
  left join lateral (
      select jsonb_agg(jsonb_build_array(extract(epoch from e.at)::float8, e.new_status,
                                         e.rpo_seconds::float8, e.reason) order by e.at) as events
        from public.rpo_events e
       where e.protection_group_id = l.id and e.at >= now() - interval '24 hours') ev on true
 order by l.rank, l.name, l.id;

-- name: group_vms
select p.id, p.vm_id, p.boot_priority, p.boot_delay_seconds, p.tools_timeout_seconds,
       p.dr_shell_vm_created, p.dr_shell_vm_id, p.last_error,
       v.name, v.power_state, v.num_cpu, v.memory_mb, v.datastore, v.networks
  from public.protected_vms p
  left join public.vcenter_vms v on v.id = p.vm_id
 where p.protection_group_id = %(group)s
 order by p.boot_priority, v.name nulls last, p.id;

-- name: group_mappings
select m.id, m.source_network, m.recovery_network, m.test_network
  from public.network_mappings m
 where m.protection_group_id = %(group)s
 order by m.source_network;

-- name: group_points
select p.id, p.snapshot_name, p.created_at, p.replicated_at, p.on_source, p.on_target, p.bytes,
       p.tested_at, p.removed_at
  from public.recovery_points p
 where p.protection_group_id = %(group)s
 order by p.created_at desc
 limit 60;

-- name: group_point
-- One recovery point of the group by id, for a confirmation that names the point a run will use.
select p.id, p.snapshot_name, p.created_at, p.replicated_at, p.on_source, p.on_target, p.bytes,
       p.tested_at, p.removed_at
  from public.recovery_points p
 where p.protection_group_id = %(group)s and p.id = %(point)s;

-- name: group_jobs
select j.id, j.status, j.origin, j.snapshot_name, j.bytes_transferred, j.bytes_estimated, j.error,
       j.created_at, j.started_at, j.completed_at,
       extract(epoch from coalesce(j.completed_at, now()) - j.started_at)::float8 as elapsed_seconds
  from public.replication_jobs j
 where j.protection_group_id = %(group)s
 order by j.created_at desc
 limit 10;

-- name: group_vcenters
select v.id, v.name, v.site, v.last_synced_at, v.last_sync_error, v.sync_requested_at
  from public.vcenters v
 where v.id in (select g.source_vcenter_id from public.protection_groups g where g.id = %(group)s
                union select g.dr_vcenter_id from public.protection_groups g where g.id = %(group)s)
 order by v.site desc, v.name;

-- name: group_runs
select r.id, r.kind, r.status, r.recovery_point_id, r.test_run_id, r.created_at, r.started_at,
       r.completed_at, r.rto_seconds::float8 as rto_seconds, r.data_loss_seconds::float8 as data_loss_seconds,
       r.error
  from public.recovery_runs r
 where r.protection_group_id = %(group)s
 order by r.created_at desc
 limit 10;

-- name: run
select r.id, r.protection_group_id, r.kind, r.status, r.recovery_point_id, r.test_run_id,
       r.cancel_requested, r.options, r.requested_by, r.created_at, r.started_at, r.completed_at,
       r.rto_seconds::float8 as rto_seconds, r.data_loss_seconds::float8 as data_loss_seconds,
       r.error, r.report, g.name as group_name,
       p.snapshot_name as point_snapshot, p.created_at as point_created_at, p.tested_at as point_tested_at
  from public.recovery_runs r
  join public.protection_groups g on g.id = r.protection_group_id
  left join public.recovery_points p on p.id = r.recovery_point_id
 where r.id = %(run)s;

-- name: run_steps
select s.id, s.seq, s.name, s.protected_vm_id, s.status, s.started_at, s.finished_at, s.detail, s.error,
       v.name as vm_name, pv.boot_priority
  from public.recovery_run_steps s
  left join public.protected_vms pv on pv.id = s.protected_vm_id
  left join public.vcenter_vms v on v.id = pv.vm_id
 where s.run_id = %(run)s
 order by s.seq;

-- name: visible_groups
select g.id from public.protection_groups g;

-- name: feed_state
-- Run as the listener (all groups) once per refresh, shared by every feed client; each client
-- is sent only the groups it could read when it connected.
select s.protection_group_id as id, s.rpo_status, s.current_rpo_seconds::float8 as current_rpo_seconds,
       s.last_job_status, s.last_error, s.paused,
       j.id as job_id, j.status as job_status, j.bytes_transferred, j.bytes_estimated,
       extract(epoch from now() - j.started_at)::float8 as job_seconds,
       null::uuid as run_id, null::text as run_status, null::text as run_kind, null::text as run_steps
  from public.protection_status s
  left join lateral (
      select r.id, r.status, r.bytes_transferred, r.bytes_estimated, r.started_at
        from public.replication_jobs r
       where r.protection_group_id = s.protection_group_id and r.status in ('pending', 'running')
       order by r.created_at desc limit 1) j on true;

-- name: feed_state_runs
select s.protection_group_id as id, s.rpo_status, s.current_rpo_seconds::float8 as current_rpo_seconds,
       s.last_job_status, s.last_error, s.paused,
       j.id as job_id, j.status as job_status, j.bytes_transferred, j.bytes_estimated,
       extract(epoch from now() - j.started_at)::float8 as job_seconds,
       rr.id as run_id, rr.status as run_status, rr.kind as run_kind, rr.steps as run_steps
  from public.protection_status s
  left join lateral (
      select r.id, r.status, r.bytes_transferred, r.bytes_estimated, r.started_at
        from public.replication_jobs r
       where r.protection_group_id = s.protection_group_id and r.status in ('pending', 'running')
       order by r.created_at desc limit 1) j on true
  left join lateral (
      select r.id, r.status, r.kind,
             (select count(*) filter (where st.status = 'running')::text || '/'
                  || count(*) filter (where st.status in ('done', 'failed', 'skipped', 'warning'))::text || '/'
                  || count(*)::text
                from public.recovery_run_steps st where st.run_id = r.id) as steps
        from public.recovery_runs r
       where r.protection_group_id = s.protection_group_id
       order by r.created_at desc limit 1) rr on true;

-- name: request_sync
update public.vcenters v set sync_requested_at = now()
 where v.id in (select g.source_vcenter_id from public.protection_groups g where g.id = %(group)s
                union select g.dr_vcenter_id from public.protection_groups g where g.id = %(group)s)
returning v.id, v.name;

-- name: replicate_now
insert into public.replication_jobs (protection_group_id) values (%(group)s) returning id;

-- name: set_paused
update public.protection_groups g set paused = %(paused)s where g.id = %(group)s returning g.id;

-- name: start_run
insert into public.recovery_runs (protection_group_id, kind, recovery_point_id, test_run_id)
values (%(group)s, %(kind)s, %(point)s, %(test_run)s)
returning id;

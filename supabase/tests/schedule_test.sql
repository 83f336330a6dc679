-- The schedule (docs/rpo.md): a due group gets one job with origin 'schedule', a paused one none,
-- a second pass adds nothing; an RPO falling behind is recorded once, with its reason.
begin;
select plan(9);

insert into public.vcenters (id, name, host) values ('7c100000-0000-4000-a000-000000000001', 'vc-tap-sched', 'h');
insert into public.replication_targets (id, name, ssh_host, target_root) values
    ('7c100000-0000-4000-b000-000000000001', 'zfs-tap-sched', 'zfs-tap-sched.example', 'tank/sched');
insert into public.protection_groups (id, name, source_vcenter_id, replication_target_id, source_dataset, rpo_minutes, paused) values
    ('7c100000-0000-4000-c000-000000000001', 'sched-tap', '7c100000-0000-4000-a000-000000000001',
     '7c100000-0000-4000-b000-000000000001', 'tank/s1', 10, false),
    ('7c100000-0000-4000-c000-000000000002', 'sched-tap-paused', '7c100000-0000-4000-a000-000000000001',
     '7c100000-0000-4000-b000-000000000001', 'tank/s2', 10, true);

select is((select inserted from zerfaux.schedule_due(now() + interval '1 second')), 1,
          'the never replicated group gets a job at once, the paused one none');
select is((select origin from public.replication_jobs
            where protection_group_id = '7c100000-0000-4000-c000-000000000001'), 'schedule',
          'the job says the schedule made it');
select is((select count(*)::integer from zerfaux.operations o join public.replication_jobs j on j.id = o.subject_id
            where j.protection_group_id = '7c100000-0000-4000-c000-000000000001'), 1, 'and it is queued');
select is((select inserted from zerfaux.schedule_due(now() + interval '1 day')), 0,
          'while it is pending, no second job, however late');
select is((select next_replication_at from public.protection_groups where name = 'sched-tap-paused'), null,
          'a paused group has no next replication');

-- The job ran: a recovery point 8 minutes old puts the group at 80 % of its RPO.
update public.replication_jobs set status = 'completed', started_at = now() - interval '8 minutes',
       completed_at = now() - interval '8 minutes' where protection_group_id = '7c100000-0000-4000-c000-000000000001';
insert into public.recovery_points (protection_group_id, snapshot_name, guid, created_at)
    values ('7c100000-0000-4000-c000-000000000001', 'zerfaux_tap', '1', now() - interval '8 minutes');
select is((select array_agg(new_status || ': ' || reason order by at) from public.rpo_events
            where protection_group_id = '7c100000-0000-4000-c000-000000000001'),
          array['at_risk: listener down'], 'the point written records the group at risk, no listener alive');
select is(zerfaux.record_rpo_transitions(now() + interval '3 minutes'), 1, 'past the RPO: one transition');
select is(zerfaux.record_rpo_transitions(now() + interval '3 minutes'), 0, 'recorded once');
select is((select inserted from zerfaux.schedule_due(now())), 1, 'five minutes after the point, a job again');

select * from finish();
rollback;

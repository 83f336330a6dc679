-- Failover runs (issue 14): the group's new columns, the rules of planned_migration, failover,
-- commit, rollback and reprotect with the names they are refused by, the group's state at insert
-- and at each ending (the kind's functions called as the engine calls them), the commit policy
-- in the schedule, and replication_jobs_group_state. The Python side with roles and the engine's
-- claim is tests/integration/test_failover_runs_sql.py.
begin;
select plan(35);

select has_column('public', 'protection_groups', 'direction', 'protection_groups.direction exists');
select col_default_is('public', 'protection_groups', 'state', 'protected'::text, 'a new group is protected');
select col_default_is('public', 'protection_groups', 'direction', 'forward'::text, 'a new group replicates forward');
select col_default_is('public', 'protection_groups', 'commit_policy', 'manual'::text, 'commit policy manual by default');
select has_column('public', 'protection_groups', 'state_changed_at', 'protection_groups.state_changed_at exists');
select has_column('public', 'protection_groups', 'commit_timeout_minutes', 'commit_timeout_minutes exists');
select col_default_is('public', 'protected_vms', 'shutdown_timeout_seconds', '300', 'a VM gets 300 s to shut down');
select has_index('public', 'recovery_runs', 'recovery_runs_one_run_per_group', 'one run per group, as an index');
select is((select count(*)::integer from public.protection_groups where state not in
           ('protected', 'recovering', 'awaiting_commit', 'failed_over')), 0, 'no group is left in state normal');

-- A group with a point on its target and one VM.
insert into public.vcenters (id, name, host) values ('7d000000-0000-4000-a000-000000000001', 'vc-tap-fo', 'h');
insert into public.protection_groups (id, name, source_vcenter_id, source_dataset, rpo_minutes, commit_policy,
                                      commit_timeout_minutes)
    values ('7d000000-0000-4000-c000-000000000001', 'fo-tap', '7d000000-0000-4000-a000-000000000001', 'tank/fo',
            null, 'rollback', 5);
insert into public.recovery_points (id, protection_group_id, snapshot_name, guid, created_at)
    values ('7d000000-0000-4000-d000-000000000001', '7d000000-0000-4000-c000-000000000001', 'zerfaux_fo', '71',
            now() - interval '10 minutes');
select throws_like($$update public.protection_groups set state = 'normal' where id = '7d000000-0000-4000-c000-000000000001'$$,
                   '%protection_groups_state_check%', 'state normal is gone');

select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7d000000-0000-4000-c000-000000000001', 'commit')$$,
    'recovery_runs_state: protection group fo-tap % is protected: a commit needs a failover awaiting commit',
    'a commit of a protected group is refused: recovery_runs_state');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7d000000-0000-4000-c000-000000000001', 'rollback')$$,
    'recovery_runs_state: %is protected: a rollback undoes%', 'a rollback of a protected group is refused');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7d000000-0000-4000-c000-000000000001', 'reprotect')$$,
    'recovery_runs_state: %is protected: a reprotect starts only from state failed_over%',
    'a reprotect of a protected group is refused');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind, options)
      values ('7d000000-0000-4000-c000-000000000001', 'failover', '{"skip_sorce": true}')$$,
    'recovery_runs_options: a failover run knows no option skip_sorce', 'an unknown option is refused, named');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind, options)
      values ('7d000000-0000-4000-c000-000000000001', 'failover', '{"skip_source": "yes"}')$$,
    'recovery_runs_options: option skip_source must be true or false%', 'an option of the wrong type is refused');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind, recovery_point_id)
      values ('7d000000-0000-4000-c000-000000000001', 'planned_migration', '7d000000-0000-4000-d000-000000000001')$$,
    'recovery_runs_point_on_target: a planned_migration run takes no recovery_point_id%',
    'a planned migration makes its own point');

-- A failover: the group is recovering from its insert, nothing else starts.
insert into public.recovery_runs (id, protection_group_id, kind, options)
    values ('7d000000-0000-4000-e000-000000000001', '7d000000-0000-4000-c000-000000000001', 'failover',
            '{"skip_source": true, "fence_timeout_seconds": 30}');
select results_eq(
    $$select state, state_changed_at is not null from public.protection_groups where id = '7d000000-0000-4000-c000-000000000001'$$,
    $$values ('recovering'::text, true)$$, 'a failover turns the group recovering at once');
select results_eq(
    $$select recovery_point_id, group_state_before from public.recovery_runs where id = '7d000000-0000-4000-e000-000000000001'$$,
    $$values ('7d000000-0000-4000-d000-000000000001'::uuid, 'protected'::text)$$,
    'it takes the newest point on the target and records the state before');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7d000000-0000-4000-c000-000000000001', 'test')$$,
    'recovery_runs_one_run_per_group: %already has a pending failover run%', 'no test while a failover is pending');
select throws_like(
    $$insert into public.replication_jobs (protection_group_id) values ('7d000000-0000-4000-c000-000000000001')$$,
    'replication_jobs_group_state: protection group fo-tap % is recovering%', 'no replication while recovering');

-- Run by the engine: claimed, its steps, completed -> awaiting commit.
select zerfaux.claimed_recovery_run('7d000000-0000-4000-e000-000000000001', 1);
select zerfaux.progress_recovery_run('7d000000-0000-4000-e000-000000000001',
    '{"plan": [{"seq": 1, "name": "validate"}, {"seq": 2, "name": "pre_failover_snapshot"}, {"seq": 3, "name": "finish"}]}');
select throws_like(
    $$update public.recovery_runs set cancel_requested = true where id = '7d000000-0000-4000-e000-000000000001'$$,
    'recovery_runs_cancel: recovery run % (kind failover) is running: a running failover cannot be cancelled',
    'a running failover cannot be cancelled');
select zerfaux.complete_recovery_run('7d000000-0000-4000-e000-000000000001', '{"report": {"fenced": false}}');
select results_eq(
    $$select r.status, r.completed_at is null, r.data_loss_seconds > 0, g.state
        from public.recovery_runs r join public.protection_groups g on g.id = r.protection_group_id
       where r.id = '7d000000-0000-4000-e000-000000000001'$$,
    $$values ('awaiting_commit'::text, true, true, 'awaiting_commit'::text)$$,
    'a completed failover awaits commit, with its data loss; so does the group');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7d000000-0000-4000-c000-000000000001', 'reprotect')$$,
    'recovery_runs_state: %is awaiting_commit: a reprotect%', 'no reprotect before the commit');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7d000000-0000-4000-c000-000000000001', 'failover')$$,
    'recovery_runs_state: %is awaiting_commit: a failover starts only from state protected',
    'no second failover while one awaits commit');

-- The commit policy 'rollback' after 5 minutes: not yet, then a rollback run acting on the failover.
select results_eq($$select inserted from zerfaux.schedule_due(now() + interval '4 minutes')$$, $$values (0)$$,
                  'the schedule inserts no job for a group awaiting commit');
select is((select count(*)::integer from public.recovery_runs where protection_group_id = '7d000000-0000-4000-c000-000000000001'),
          1, 'and no rollback before commit_timeout_minutes');
select is((select next_due_at from zerfaux.schedule_due(now() + interval '4 minutes')),
          (select state_changed_at + interval '5 minutes' from public.protection_groups where id = '7d000000-0000-4000-c000-000000000001'),
          'the next due time is the commit deadline');
select zerfaux.schedule_due(now() + interval '6 minutes');
select results_eq(
    $$select kind, options, requested_by, acts_on_run_id, recovery_point_id from public.recovery_runs
       where protection_group_id = '7d000000-0000-4000-c000-000000000001' and kind <> 'failover'$$,
    $$values ('rollback'::text, '{"auto": true}'::jsonb, null::uuid, '7d000000-0000-4000-e000-000000000001'::uuid,
              '7d000000-0000-4000-d000-000000000001'::uuid)$$,
    'past the timeout the schedule inserts the policy''s rollback, acting on the failover, with its point');
select zerfaux.schedule_due(now() + interval '7 minutes');
select is((select count(*)::integer from public.recovery_runs where kind = 'rollback'
            and protection_group_id = '7d000000-0000-4000-c000-000000000001'), 1, 'once');

-- The rollback completes: the group is protected again, the failover completed and marked.
select zerfaux.complete_recovery_run(
    (select id from public.recovery_runs where kind = 'rollback' and protection_group_id = '7d000000-0000-4000-c000-000000000001'),
    '{"report": {"discarded_bytes": 0}}');
select results_eq(
    $$select g.state, g.direction, f.status, f.report ? 'rolled_back_by'
        from public.protection_groups g join public.recovery_runs f on f.protection_group_id = g.id and f.kind = 'failover'
       where g.id = '7d000000-0000-4000-c000-000000000001'$$,
    $$values ('protected'::text, 'forward'::text, 'completed'::text, true)$$,
    'after a rollback: protected, forward; the failover completed with rolled_back_by');

-- A planned migration records its final snapshot as a point; a reprotect flips the direction.
insert into public.recovery_runs (id, protection_group_id, kind)
    values ('7d000000-0000-4000-e000-000000000002', '7d000000-0000-4000-c000-000000000001', 'planned_migration');
select zerfaux.claimed_recovery_run('7d000000-0000-4000-e000-000000000002', 1);
select zerfaux.complete_recovery_run('7d000000-0000-4000-e000-000000000002',
    '{"report": {"final_point": {"snapshot_name": "zerfaux_final", "guid": "72", "created_at": "2026-12-01T12:00:00Z"}}}');
select results_eq(
    $$select r.status, r.data_loss_seconds, p.snapshot_name, p.guid, p.on_source and p.on_target, g.state
        from public.recovery_runs r join public.recovery_points p on p.id = r.recovery_point_id
        join public.protection_groups g on g.id = r.protection_group_id
       where r.id = '7d000000-0000-4000-e000-000000000002'$$,
    $$values ('completed'::text, 0::numeric, 'zerfaux_final'::text, '72'::text, true, 'failed_over'::text)$$,
    'a planned migration completes with no data loss, its final snapshot a recovery point, the group failed over');
select throws_like($$delete from public.protection_groups where id = '7d000000-0000-4000-c000-000000000001'$$,
                   'protection_groups_delete_during_recovery: protection group fo-tap is failed_over%',
                   'a failed-over group cannot be deleted');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7d000000-0000-4000-c000-000000000001', 'rollback')$$,
    'recovery_runs_state: %is failed_over: a rollback%', 'a completed migration is not rolled back');
insert into public.recovery_runs (id, protection_group_id, kind)
    values ('7d000000-0000-4000-e000-000000000003', '7d000000-0000-4000-c000-000000000001', 'reprotect');
select is((select acts_on_run_id from public.recovery_runs where id = '7d000000-0000-4000-e000-000000000003'),
          '7d000000-0000-4000-e000-000000000002'::uuid, 'a reprotect acts on the migration');
select zerfaux.claimed_recovery_run('7d000000-0000-4000-e000-000000000003', 1);
select zerfaux.complete_recovery_run('7d000000-0000-4000-e000-000000000003', '{"report": {}}');
select results_eq(
    $$select state, direction from public.protection_groups where id = '7d000000-0000-4000-c000-000000000001'$$,
    $$values ('protected'::text, 'reverse'::text)$$, 'after a reprotect: protected, reverse');

select * from finish();
rollback;

-- Recovery runs (issue 13): the tables, their rules' indexes and policies, and the rules
-- refused with messages that name them; the insert queues kind recovery.run.
begin;
select plan(16);

select has_table('public', 'recovery_runs', 'recovery_runs exists');
select has_table('public', 'recovery_run_steps', 'recovery_run_steps exists');
select columns_are('public', 'recovery_runs', array[
    'id', 'protection_group_id', 'kind', 'recovery_point_id', 'test_run_id', 'status', 'cancel_requested',
    'options', 'requested_by', 'created_at', 'started_at', 'completed_at', 'rto_seconds', 'data_loss_seconds',
    'error', 'report', 'acts_on_run_id', 'group_state_before'],
    'recovery_runs has the columns of the issues (13, 14)');
select columns_are('public', 'recovery_run_steps', array[
    'id', 'run_id', 'seq', 'name', 'protected_vm_id', 'status', 'started_at', 'finished_at', 'detail', 'error'],
    'recovery_run_steps has the columns of the issue');
select has_column('public', 'replication_targets', 'nfs_host', 'replication_targets.nfs_host exists');
select col_default_is('public', 'recovery_runs', 'requested_by', 'auth.uid()', 'requested_by defaults to auth.uid()');
select has_index('public', 'recovery_runs', 'recovery_runs_one_active_test_per_group', 'one active test per group');
select has_index('public', 'recovery_runs', 'recovery_runs_one_cleanup_per_test', 'one cleanup per test');
select policies_are('public', 'recovery_runs', array['viewer_read', 'operator_insert', 'operator_cancel'],
                    'runs: viewers read, operators insert and cancel');
select policies_are('public', 'recovery_run_steps', array['viewer_read'], 'steps: viewers read, nobody writes');
select is((select input_fn::text from zerfaux.kinds where kind = 'recovery.run'), 'zerfaux.input_recovery_run',
          'the kind recovery.run is registered');

insert into public.vcenters (id, name, host) values ('7c000000-0000-4000-a000-000000000001', 'vc-tap-rec', 'h');
insert into public.protection_groups (id, name, source_vcenter_id, source_dataset) values
    ('7c000000-0000-4000-c000-000000000001', 'rec-tap', '7c000000-0000-4000-a000-000000000001', 'tank/rec');

select throws_ok(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7c000000-0000-4000-c000-000000000001', 'test')$$,
    '23514',
    'recovery_runs_point_on_target: protection group rec-tap (7c000000-0000-4000-c000-000000000001) has no recovery point on its replication target: replicate first',
    'a test without a recovery point on the target is refused: replicate first');

insert into public.recovery_points (protection_group_id, snapshot_name, guid, created_at)
    values ('7c000000-0000-4000-c000-000000000001', 'zerfaux_tap', '77', now());
insert into public.recovery_runs (id, protection_group_id, kind)
    values ('7c000000-0000-4000-e000-000000000001', '7c000000-0000-4000-c000-000000000001', 'test');
select is((select count(*)::integer from zerfaux.operations
            where kind = 'recovery.run' and subject_id = '7c000000-0000-4000-e000-000000000001' and status = 'queued'),
          1, 'a test run queues one recovery.run operation');

select throws_ok(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7c000000-0000-4000-c000-000000000001', 'test')$$,
    '23505',
    'recovery_runs_one_active_test_per_group: protection group rec-tap (7c000000-0000-4000-c000-000000000001) already has a pending test run (7c000000-0000-4000-e000-000000000001)',
    'a second test of the group is refused, naming the rule and the first test');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind, test_run_id)
      values ('7c000000-0000-4000-c000-000000000001', 'cleanup', '7c000000-0000-4000-e000-000000000001')$$,
    'recovery_runs_cleanup_of_an_active_test: %in status pending%',
    'a cleanup of a test that is not active is refused');
select throws_like(
    $$insert into public.recovery_runs (protection_group_id, kind) values ('7c000000-0000-4000-c000-000000000001', 'failover')$$,
    'recovery_runs_one_run_per_group: %already has a pending test run%',
    'a failover while a test is pending is refused: one run per group (supabase/tests/failover_runs_test.sql)');

select * from finish();
rollback;

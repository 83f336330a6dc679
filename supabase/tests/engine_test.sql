-- The triggers that turn a person's request into an operation, and the engine functions' lease
-- checks: only the worker holding an operation, in its current attempt, may report on it; one
-- whose lease expired and was taken over is answered 'lost' (or false) and changes nothing.
begin;
select plan(24);

insert into public.vcenters (id, name, host) values ('7c000000-0000-4000-a000-000000000001', 'vc-tap-engine', 'h');
insert into public.replication_targets (id, name, ssh_host, target_root)
    values ('7c000000-0000-4000-b000-000000000001', 'zfs-tap-engine', 'h', 'tank/engine');
insert into public.protection_groups (id, name, source_vcenter_id, replication_target_id, source_dataset)
    values ('7c000000-0000-4000-c000-000000000001', 'engine-tap', '7c000000-0000-4000-a000-000000000001',
            '7c000000-0000-4000-b000-000000000001', 'tank/engine-src');

-- Enqueue on insert.
insert into public.replication_jobs (id, protection_group_id)
    values ('7c000000-0000-4000-e000-000000000001', '7c000000-0000-4000-c000-000000000001');
select results_eq(
    $$select kind, status, concurrency_key from zerfaux.operations
       where subject_id = '7c000000-0000-4000-e000-000000000001'$$,
    $$values ('replication.run', 'queued', 'target:7c000000-0000-4000-b000-000000000001')$$,
    'a new job enqueues one replication.run, keyed by its target');
update public.vcenters set sync_requested_at = now() where id = '7c000000-0000-4000-a000-000000000001';
select is((select count(*) from zerfaux.operations where kind = 'vcenter.sync'
            and subject_id = '7c000000-0000-4000-a000-000000000001')::int, 1, 'asking for a sync enqueues one');
update public.vcenters set host = 'h2' where id = '7c000000-0000-4000-a000-000000000001';
select is((select count(*) from zerfaux.operations where kind = 'vcenter.sync'
            and subject_id = '7c000000-0000-4000-a000-000000000001')::int, 1, 'another change does not');
delete from zerfaux.operations where kind = 'vcenter.sync';

-- Cancel before it started: the job and its operation end at once.
update public.replication_jobs set cancel_requested = true where id = '7c000000-0000-4000-e000-000000000001';
select is((select status from public.replication_jobs where id = '7c000000-0000-4000-e000-000000000001'),
          'cancelled', 'a pending job cancelled ends cancelled');
select is((select status from zerfaux.operations where subject_id = '7c000000-0000-4000-e000-000000000001'),
          'cancelled', 'and so does its queued operation');

-- A second job, claimed by worker tap-a.
insert into public.replication_jobs (id, protection_group_id)
    values ('7c000000-0000-4000-e000-000000000002', '7c000000-0000-4000-c000-000000000001');
create temp table op as
    select id from zerfaux.operations where subject_id = '7c000000-0000-4000-e000-000000000002';
select is((select count(*) from zerfaux.claim('tap-a', 1, 60) c where c.id = (select id from op))::int, 1,
          'worker tap-a claims it');
select results_eq($$select status, worker_id, attempts from zerfaux.operations where id = (select id from op)$$,
                  $$values ('running', 'tap-a', 1)$$, 'running under tap-a, attempt 1');
select is((select status from public.replication_jobs where id = '7c000000-0000-4000-e000-000000000002'),
          'running', 'the claim marks the job running');

-- Cancel while running: told to the worker, not ended.
update public.replication_jobs set cancel_requested = true where id = '7c000000-0000-4000-e000-000000000002';
select is((select cancel_requested from zerfaux.operations where id = (select id from op)), true,
          'a running job cancelled asks its operation to stop');
select is((select status from public.replication_jobs where id = '7c000000-0000-4000-e000-000000000002'),
          'running', 'and keeps running until the worker stops');

-- Another worker reports on it: refused everywhere, nothing written.
select is_empty($$select * from zerfaux.heartbeat('tap-x', array[(select id from op)], 60)$$,
                'a heartbeat from a worker that does not hold it renews nothing');
select is(zerfaux.progress((select id from op), 'tap-x', '{"bytes_transferred": 1}'), 'lost',
          'progress from another worker: lost');
select is(zerfaux.complete_one((select id from op), 'tap-x', '{}'), false, 'complete from another worker: refused');
select is(zerfaux.fail((select id from op), 'tap-x', 'boom', false, 1), 'lost', 'fail from another worker: lost');
select is(zerfaux.finish_cancelled((select id from op), 'tap-x', 'stop'), false,
          'finish_cancelled from another worker: refused');
select is(zerfaux.release('tap-x', array[(select id from op)]), 0, 'release from another worker: nothing');
select results_eq($$select status, worker_id, attempts, progress from zerfaux.operations where id = (select id from op)$$,
                  $$values ('running', 'tap-a', 1, null::jsonb)$$, 'the operation is untouched');
select results_eq($$select h.cancel_requested from zerfaux.heartbeat('tap-a', array[(select id from op)], 60) h$$,
                  $$values (true)$$, 'its holder''s heartbeat renews it and hears the cancel');

-- tap-a's lease runs out; tap-b takes over in attempt 2; tap-a's late answers are refused.
update zerfaux.operations set lease_expires_at = now() - interval '1 second' where id = (select id from op);
select is((select c.attempts from zerfaux.claim('tap-b', 1, 60) c where c.id = (select id from op)), 2,
          'tap-b takes the expired lease over, attempt 2');
select is(zerfaux.complete_one((select id from op), 'tap-a', '{}'), false,
          'the late completion of attempt 1 is refused');
select is(zerfaux.fail((select id from op), 'tap-a', 'late', true, 1), 'lost', 'and so is its late failure');
select results_eq($$select status, worker_id, attempts from zerfaux.operations where id = (select id from op)$$,
                  $$values ('running', 'tap-b', 2)$$, 'attempt 2 runs on');
select is(zerfaux.finish_cancelled((select id from op), 'tap-b', 'cancelled on request'), true,
          'the holder of attempt 2 ends it cancelled');
select results_eq(
    $$select o.status, j.status from zerfaux.operations o join public.replication_jobs j on j.id = o.subject_id
       where o.id = (select id from op)$$,
    $$values ('cancelled', 'cancelled')$$, 'operation and job both cancelled');

select * from finish();
rollback;

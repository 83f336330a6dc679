-- At most one pending or running replication job per protection group: a second insert is
-- refused with a message naming the group and the job; the partial unique index stays the
-- guarantee; other groups are not held up.
begin;
select plan(9);

insert into public.vcenters (id, name, host) values ('7b000000-0000-4000-a000-000000000001', 'vc-tap-jobs', 'h');
insert into public.protection_groups (id, name, source_vcenter_id, source_dataset) values
    ('7b000000-0000-4000-c000-000000000001', 'jobs-tap', '7b000000-0000-4000-a000-000000000001', 'tank/a'),
    ('7b000000-0000-4000-c000-000000000002', 'jobs-tap-2', '7b000000-0000-4000-a000-000000000001', 'tank/b');
insert into public.replication_jobs (id, protection_group_id)
    values ('7b000000-0000-4000-e000-000000000001', '7b000000-0000-4000-c000-000000000001');

select has_index('public', 'replication_jobs', 'replication_jobs_one_active_per_group',
                 'the partial unique index exists');
select is((select indisunique from pg_index where indexrelid = 'public.replication_jobs_one_active_per_group'::regclass),
          true, 'and it is unique');

select throws_ok(
    $$insert into public.replication_jobs (protection_group_id) values ('7b000000-0000-4000-c000-000000000001')$$,
    '23505',
    'protection group jobs-tap (7b000000-0000-4000-c000-000000000001) already has a pending replication job (7b000000-0000-4000-e000-000000000001): one at a time per group',
    'a second pending job of one group is refused, naming the group and the job');

select lives_ok(
    $$insert into public.replication_jobs (protection_group_id) values ('7b000000-0000-4000-c000-000000000002')$$,
    'another group is not held up');

update public.replication_jobs set status = 'running' where id = '7b000000-0000-4000-e000-000000000001';
select throws_like(
    $$insert into public.replication_jobs (protection_group_id) values ('7b000000-0000-4000-c000-000000000001')$$,
    '%already has a running replication job (7b000000-0000-4000-e000-000000000001)%',
    'a running job holds its group too');

-- The index alone, without the trigger (as two racing inserts would meet it).
alter table public.replication_jobs disable trigger replication_jobs_one_active;
select throws_ok(
    $$insert into public.replication_jobs (protection_group_id) values ('7b000000-0000-4000-c000-000000000001')$$,
    '23505', null, 'the index refuses what the trigger would have');
alter table public.replication_jobs enable trigger replication_jobs_one_active;

update public.replication_jobs set status = 'completed' where id = '7b000000-0000-4000-e000-000000000001';
select lives_ok(
    $$insert into public.replication_jobs (protection_group_id) values ('7b000000-0000-4000-c000-000000000001')$$,
    'once the job ended, the group takes a new one');

select lives_ok(
    $$update public.replication_jobs set cancel_requested = true
       where protection_group_id = '7b000000-0000-4000-c000-000000000001' and status = 'pending'$$,
    'cancelling the pending job (it ends at once) ...');
select lives_ok(
    $$insert into public.replication_jobs (protection_group_id) values ('7b000000-0000-4000-c000-000000000001')$$,
    '... frees the group as well');

select * from finish();
rollback;

-- The schedule and the group's state (issue 14; docs/rpo.md, "Scheduling"; docs/recovery.md,
-- "Failover runs: the rows"):
--
-- 1. zerfaux.schedule_due, as in 20261201151000_schedule.sql, and besides: a group is scheduled
--    in state 'protected' (was 'normal') in either direction; its due time counts from the
--    newest recovery point on the side that receives (forward: the target; reverse: the source,
--    on_source); and the commit policies: a group awaiting commit for longer than
--    commit_timeout_minutes (null = 60, from state_changed_at) with commit_policy 'commit' or
--    'rollback' gets that run inserted (options {"auto": true}, requested_by null), and the next
--    due time it answers is also the next such deadline.
-- 2. replication_jobs_group_state: a replication job is refused while the group is not
--    'protected' (a recovery moved, or is moving, its VMs: replicating then would send from the
--    wrong side, or into a replica that is live).

create or replace function zerfaux.schedule_due(p_now timestamptz default now())
returns table (inserted integer, next_due_at timestamptz)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_ids uuid[];
    v_marks timestamptz[];
    v_inserted integer;
    v_commit record;
    v_next_commit timestamptz;
begin
    -- One caller plans at a time; the others have nothing to add and return at once. A caller
    -- that comes after reads (each statement below takes its snapshot after the lock) what the
    -- previous one inserted, so it inserts nothing twice. The partial unique index "one pending
    -- or running job per group" still decides against a job asked for by hand at the same moment.
    if not pg_try_advisory_xact_lock(hashtext('zerfaux.schedule_due')) then
        inserted := 0;
        next_due_at := null;
        return next;
        return;
    end if;

    -- 1. The marked groups (at most 5000 a pass: a bulk change is spread over a few passes).
    select array_agg(d.protection_group_id), array_agg(d.marked_at) into v_ids, v_marks
      from (select protection_group_id, marked_at from zerfaux.schedule_dirty
             order by marked_at limit 5000) d;

    -- 2. Their next_replication_at, from what committed before this statement.
    if v_ids is not null then
        with plan as (
            select g.id,
                   case
                       when g.rpo_minutes is null or g.paused or g.state <> 'protected'
                            or g.replication_target_id is null or g.source_dataset is null then null
                       when lj.status in ('pending', 'running') then g.next_replication_at  -- shown while it runs
                       when lj.status in ('failed', 'cancelled') then
                           coalesce(lj.completed_at, lj.created_at) + iv.i + iv.i / 10 * coalesce(sl.slot, 0)
                       when rp.last_at is null and lc.started_at is null then v_now
                       else greatest(rp.last_at, lc.started_at) + iv.i + iv.i / 10 * coalesce(sl.slot, 0)
                   end as due
              from public.protection_groups g
              left join zerfaux.schedule_slots sl on sl.protection_group_id = g.id
              cross join lateral (
                  select zerfaux.replication_interval(g.replication_interval_minutes, g.rpo_minutes) as i) iv
              left join lateral (
                  select j.status, j.completed_at, j.created_at from public.replication_jobs j
                   where j.protection_group_id = g.id
                   order by j.created_at desc limit 1) lj on true
              left join lateral (
                  select j.started_at from public.replication_jobs j
                   where j.protection_group_id = g.id and j.status = 'completed'
                   order by j.created_at desc limit 1) lc on true
              left join lateral (
                  select p.created_at as last_at from public.recovery_points p
                   where p.protection_group_id = g.id
                     and case when g.direction = 'reverse' then p.on_source else p.on_target end
                   order by p.created_at desc limit 1) rp on true
             where g.id = any(v_ids)
        )
        update public.protection_groups g
           set next_replication_at = p.due
          from plan p
         where g.id = p.id and g.next_replication_at is distinct from p.due;
    end if;

    -- 3. A job for each group whose time has come and that has none.
    with jobs as (
        insert into public.replication_jobs (protection_group_id, origin)
        select g.id, 'schedule' from public.protection_groups g
         where g.next_replication_at <= v_now
           and g.rpo_minutes is not null and not g.paused and g.state = 'protected'
           and g.replication_target_id is not null and g.source_dataset is not null
           and not exists (select 1 from public.replication_jobs j
                            where j.protection_group_id = g.id and j.status in ('pending', 'running'))
         order by g.id
        on conflict (protection_group_id) where status in ('pending', 'running') do nothing
        returning 1
    )
    select count(*)::integer into v_inserted from jobs;

    -- 4. The marks seen in 1 and not made again since (a mark being made now is skipped, not waited for).
    if v_ids is not null then
        delete from zerfaux.schedule_dirty d
         using unnest(v_ids, v_marks) as seen (id, marked_at)
         where d.protection_group_id = seen.id and d.marked_at = seen.marked_at
           and d.protection_group_id in (select x.protection_group_id from zerfaux.schedule_dirty x
                                          where x.protection_group_id = any(v_ids) for update skip locked);
    end if;

    -- 5. The commit policies: a failover that has awaited commit long enough is committed or
    --    rolled back. Few groups are ever here; each insert runs on its own (a refusal of the
    --    rules, such as a run a person inserted at the same moment, is a warning, not the end of
    --    the pass).
    for v_commit in
        select g.id, g.name, g.commit_policy from public.protection_groups g
         where g.state = 'awaiting_commit' and g.commit_policy in ('commit', 'rollback')
           and coalesce(g.state_changed_at, '-infinity') + make_interval(mins => coalesce(g.commit_timeout_minutes, 60))
               <= v_now
           and not exists (select 1 from public.recovery_runs r
                            where r.protection_group_id = g.id and r.kind <> 'cleanup'
                              and r.status in ('pending', 'running'))
         order by g.id
    loop
        begin
            insert into public.recovery_runs (protection_group_id, kind, options, requested_by)
            values (v_commit.id, v_commit.commit_policy, '{"auto": true}'::jsonb, null);
        exception when others then
            raise warning 'commit policy of protection group % (%): the % run was not inserted: %',
                          v_commit.name, v_commit.id, v_commit.commit_policy, sqlerrm;
        end;
    end loop;
    select min(coalesce(g.state_changed_at, '-infinity') + make_interval(mins => coalesce(g.commit_timeout_minutes, 60)))
      into v_next_commit
      from public.protection_groups g
     where g.state = 'awaiting_commit' and g.commit_policy in ('commit', 'rollback')
       and coalesce(g.state_changed_at, '-infinity') + make_interval(mins => coalesce(g.commit_timeout_minutes, 60))
           > v_now;

    inserted := v_inserted;
    select g.next_replication_at into next_due_at
      from public.protection_groups g where g.next_replication_at > v_now
     order by g.next_replication_at limit 1;
    if v_next_commit is not null and (next_due_at is null or v_next_commit < next_due_at) then
        next_due_at := v_next_commit;
    end if;
    return next;
end $$;

revoke execute on function zerfaux.schedule_due(timestamptz) from public, anon, authenticated;
grant execute on function zerfaux.schedule_due(timestamptz) to service_role;

comment on function zerfaux.schedule_due(timestamptz) is
    'inserts one replication job (origin schedule) for each protected group that is due at p_now, keeps '
    'next_replication_at of every group, and applies the commit policies (a commit or rollback run for a '
    'failover awaiting commit past commit_timeout_minutes); answers the jobs inserted and the next due time '
    '(docs/rpo.md, docs/recovery.md)';

-- A group's direction decides which side's points its schedule counts from: mark it when it flips.
drop trigger protection_groups_schedule_mark on public.protection_groups;
create trigger protection_groups_schedule_mark
    after insert or update of rpo_minutes, replication_interval_minutes, paused, state, direction,
                              replication_target_id, source_dataset
    on public.protection_groups for each row execute function zerfaux.schedule_mark_group();

-- ---------------------------------------------------------------------------------------------

create function zerfaux.replication_jobs_group_state() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_group public.protection_groups;
begin
    -- Share-locked: a planned_migration or failover inserted at the same moment (its rules lock
    -- the group to change its state) is waited for, and its state is the one read here.
    select * into v_group from public.protection_groups g where g.id = new.protection_group_id for share;
    if found and v_group.state <> 'protected' then
        raise exception 'replication_jobs_group_state: protection group % (%) is %: it replicates only while '
                        'protected', v_group.name, v_group.id, v_group.state
            using errcode = 'object_not_in_prerequisite_state',
                  hint = case v_group.state
                             when 'recovering' then 'a planned_migration or failover is under way (or failed: a rollback '
                                                    'run undoes it); its own steps replicate what it needs'
                             when 'awaiting_commit' then 'commit or roll back the failover first (insert a commit or '
                                                         'rollback run)'
                             else 'the group''s VMs run at site B: a reprotect run starts replication in the other '
                                  'direction' end;
    end if;
    return new;
end $$;

revoke execute on function zerfaux.replication_jobs_group_state() from public, anon, authenticated;

create trigger replication_jobs_group_state before insert on public.replication_jobs
    for each row execute function zerfaux.replication_jobs_group_state();

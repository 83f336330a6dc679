-- Scheduling (docs/rpo.md, "Scheduling"): zerfaux.schedule_due(), called by every listener's
-- sweep, gives each group that is due one replication job with origin 'schedule', and keeps
-- protection_groups.next_replication_at of every group.
--
-- A group is scheduled when rpo_minutes is set, paused is false, state is 'normal' and it has a
-- replication target and a source dataset. It is due, when it has no pending or running job, at
--   base + interval + offset
-- where interval = replication_interval_minutes (null: rpo_minutes / 2; at least 0.1 minute);
-- offset = the group's slot times a tenth of the interval, the slot being its place among the
-- groups sharing its interval, ordered by a hash of their ids, spread evenly over [0, 1): stable
-- while those groups stay the same, so groups that replicated at the same moment do not start
-- again in the same second; base = the end of the last job when that job failed or was
-- cancelled, else the newest recovery point on the target (or the start of the last completed
-- job, when that is later or there is no recovery point yet). A group never replicated is due at
-- once. A due time long past gives one job, not one per interval missed: the next one is counted
-- from that job.
--
-- Fast with many groups: a pass does not recompute every group. Triggers put a group in
-- zerfaux.schedule_dirty when something its due time depends on changes (its jobs, its recovery
-- points, its settings); a pass recomputes those groups' next_replication_at, then inserts jobs
-- for the groups whose next_replication_at has come (an index range).

-- The group's interval, once, for the schedule and for the docs' examples.
create function zerfaux.replication_interval(p_interval_minutes numeric, p_rpo_minutes integer)
returns interval language sql immutable parallel safe set search_path = pg_catalog, pg_temp as $$
    select greatest(coalesce(p_interval_minutes, p_rpo_minutes / 2.0), 0.1) * interval '1 minute'
$$;

revoke execute on function zerfaux.replication_interval(numeric, integer) from public, anon, authenticated;
grant execute on function zerfaux.replication_interval(numeric, integer) to service_role;

-- The last completed job of a group (the last job of any status uses replication_jobs_group_created).
create index replication_jobs_group_completed
    on public.replication_jobs (protection_group_id, created_at desc) where status = 'completed';
create index protection_groups_next_replication
    on public.protection_groups (next_replication_at) where next_replication_at is not null;

-- Each group's slot in its interval's offset window.
create table zerfaux.schedule_slots (
    protection_group_id uuid primary key references public.protection_groups (id) on delete cascade,
    slot                double precision not null check (slot >= 0 and slot < 1)
);

-- Groups whose next_replication_at must be computed again. marked_at changes with every mark, so
-- a pass deletes only the marks it has seen, never one made while it ran.
create table zerfaux.schedule_dirty (
    protection_group_id uuid primary key,
    marked_at           timestamptz not null default clock_timestamp()
);

alter table zerfaux.schedule_slots enable row level security;
alter table zerfaux.schedule_dirty enable row level security;
revoke all on zerfaux.schedule_slots, zerfaux.schedule_dirty from public, anon, authenticated;
grant all on zerfaux.schedule_slots, zerfaux.schedule_dirty to service_role;

create function zerfaux.schedule_mark(p_groups uuid[]) returns void
language sql security definer set search_path = zerfaux, public, pg_temp as $$
    insert into zerfaux.schedule_dirty as d (protection_group_id)
    select distinct g from unnest(p_groups) g where g is not null order by 1
    on conflict (protection_group_id) do update set marked_at = clock_timestamp()
$$;

revoke execute on function zerfaux.schedule_mark(uuid[]) from public, anon, authenticated;
grant execute on function zerfaux.schedule_mark(uuid[]) to service_role;

-- Slots of every group with an RPO, again (a group added, removed, or given another interval);
-- the groups whose slot moved are marked.
create function zerfaux.schedule_spread() returns void
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_moved uuid[];
begin
    with ranked as (
        select g.id,
               (row_number() over w - 1)::double precision / count(*) over w as slot
          from public.protection_groups g
         where g.rpo_minutes is not null
        window w as (partition by zerfaux.replication_interval(g.replication_interval_minutes, g.rpo_minutes)
                     order by hashtextextended(g.id::text, 0), g.id
                     rows between unbounded preceding and unbounded following)
    ), moved as (
        insert into zerfaux.schedule_slots as s (protection_group_id, slot)
        select r.id, r.slot from ranked r order by r.id
        on conflict (protection_group_id) do update set slot = excluded.slot
         where s.slot is distinct from excluded.slot
        returning s.protection_group_id
    )
    select array_agg(protection_group_id) into v_moved from moved;
    perform zerfaux.schedule_mark(v_moved);
end $$;

revoke execute on function zerfaux.schedule_spread() from public, anon, authenticated;
grant execute on function zerfaux.schedule_spread() to service_role;

-- What a due time depends on, changed: mark the group (one function per kind of table, so each
-- is checked against the columns it reads).
create function zerfaux.schedule_mark_group() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    perform zerfaux.schedule_mark(array[new.id]);
    return null;
end $$;

create function zerfaux.schedule_mark_member() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if tg_op = 'DELETE' then
        perform zerfaux.schedule_mark(array[old.protection_group_id]);
    elsif tg_op = 'UPDATE' then
        perform zerfaux.schedule_mark(array[old.protection_group_id, new.protection_group_id]);
    else
        perform zerfaux.schedule_mark(array[new.protection_group_id]);
    end if;
    return null;
end $$;

create function zerfaux.schedule_spread_statement() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    perform zerfaux.schedule_spread();
    return null;
end $$;

revoke execute on function zerfaux.schedule_mark_group() from public, anon, authenticated;
revoke execute on function zerfaux.schedule_mark_member() from public, anon, authenticated;
revoke execute on function zerfaux.schedule_spread_statement() from public, anon, authenticated;

create trigger replication_jobs_schedule_mark
    after insert or delete or update of status, created_at, started_at, completed_at, protection_group_id
    on public.replication_jobs for each row execute function zerfaux.schedule_mark_member();
create trigger recovery_points_schedule_mark
    after insert or delete or update on public.recovery_points
    for each row execute function zerfaux.schedule_mark_member();
create trigger protection_groups_schedule_mark
    after insert or update of rpo_minutes, replication_interval_minutes, paused, state,
                              replication_target_id, source_dataset
    on public.protection_groups for each row execute function zerfaux.schedule_mark_group();
create trigger protection_groups_schedule_spread
    after insert or delete or update of rpo_minutes, replication_interval_minutes
    on public.protection_groups for each statement execute function zerfaux.schedule_spread_statement();

-- The groups there are already.
select zerfaux.schedule_spread();
select zerfaux.schedule_mark(array(select id from public.protection_groups));

create function zerfaux.schedule_due(p_now timestamptz default now())
returns table (inserted integer, next_due_at timestamptz)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_ids uuid[];
    v_marks timestamptz[];
    v_inserted integer;
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
                       when g.rpo_minutes is null or g.paused or g.state <> 'normal'
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
                   where p.protection_group_id = g.id and p.on_target
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
           and g.rpo_minutes is not null and not g.paused and g.state = 'normal'
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

    inserted := v_inserted;
    select g.next_replication_at into next_due_at
      from public.protection_groups g where g.next_replication_at > v_now
     order by g.next_replication_at limit 1;
    return next;
end $$;

revoke execute on function zerfaux.schedule_due(timestamptz) from public, anon, authenticated;
grant execute on function zerfaux.schedule_due(timestamptz) to service_role;

comment on function zerfaux.schedule_due(timestamptz) is
    'inserts one replication job (origin schedule) for each group that is due at p_now and keeps '
    'next_replication_at of every group; answers the jobs inserted and the next due time (docs/rpo.md)';

-- A scheduled insert relies on the partial unique index and ON CONFLICT: the friendly refusal
-- of replication_jobs_one_active (written for people) would otherwise turn a job asked for by
-- hand at the same moment into an error of the whole pass.
create or replace function zerfaux.replication_jobs_one_active() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
declare
    v_job uuid;
    v_status text;
    v_group text;
begin
    if new.origin = 'schedule' then
        return new;
    end if;
    select j.id, j.status into v_job, v_status from public.replication_jobs j
     where j.protection_group_id = new.protection_group_id and j.status in ('pending', 'running')
     limit 1;
    if v_job is not null then
        select g.name into v_group from public.protection_groups g where g.id = new.protection_group_id;
        raise exception 'protection group % (%) already has a % replication job (%): one at a time per group',
                coalesce(v_group, '?'), new.protection_group_id, v_status, v_job
            using errcode = 'unique_violation',
                  constraint = 'replication_jobs_one_active_per_group',
                  hint = 'wait until that job ends, or cancel it (set its cancel_requested to true) and insert again';
    end if;
    return new;
end $$;

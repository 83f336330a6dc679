-- Scheduling (docs/rpo.md, "Scheduling"): zerfaux.schedule_due(), called by every listener's
-- sweep, gives each group that is due one replication job with origin 'schedule', and writes
-- protection_groups.next_replication_at for every group.
--
-- A group is scheduled when rpo_minutes is set, paused is false, state is 'normal' and it has a
-- replication target and a source dataset. It is due, when it has no pending or running job, at
--   base + interval + offset
-- where interval = replication_interval_minutes (null: rpo_minutes / 2; at least 0.1 minute),
-- offset = a stable share of a tenth of the interval taken from a hash of the group id (groups
-- sharing an interval do not all start in the same second), and base = the end of the last job
-- when that job failed or was cancelled, else the newest recovery point on the target (or the
-- start of the last completed job, when that is later or there is no recovery point yet). A
-- group never replicated is due at once. A due time long past gives one job, not one per
-- interval missed: the next one is counted from that job.

-- The group's interval, once, for the schedule and for the docs' examples.
create function zerfaux.replication_interval(p_interval_minutes numeric, p_rpo_minutes integer)
returns interval language sql immutable parallel safe set search_path = pg_catalog, pg_temp as $$
    select greatest(coalesce(p_interval_minutes, p_rpo_minutes / 2.0), 0.1) * interval '1 minute'
$$;

-- The stable offset of a group inside its interval: [0, interval / 10).
create function zerfaux.replication_offset(p_group uuid, p_interval interval)
returns interval language sql immutable parallel safe set search_path = pg_catalog, pg_temp as $$
    select p_interval / 10 * ((hashtextextended(p_group::text, 0) & 1048575) / 1048576.0)
$$;

revoke execute on function zerfaux.replication_interval(numeric, integer) from public, anon, authenticated;
revoke execute on function zerfaux.replication_offset(uuid, interval) from public, anon, authenticated;
grant execute on function zerfaux.replication_interval(numeric, integer) to service_role;
grant execute on function zerfaux.replication_offset(uuid, interval) to service_role;

-- The last completed job of each group, read by every pass (the last job of any status uses
-- replication_jobs_group_created).
create index replication_jobs_group_completed
    on public.replication_jobs (protection_group_id, created_at desc) where status = 'completed';

create function zerfaux.schedule_due(p_now timestamptz default now())
returns table (inserted integer, next_due_at timestamptz)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_inserted integer;
    v_next timestamptz;
begin
    -- One caller plans at a time; the others have nothing to add and return at once. A caller
    -- that comes after reads (with a statement snapshot taken after the lock) what the previous
    -- one inserted, so it inserts nothing twice. The partial unique index "one pending or
    -- running job per group" still decides against a job asked for by hand at the same moment.
    if not pg_try_advisory_xact_lock(hashtext('zerfaux.schedule_due')) then
        inserted := 0;
        next_due_at := null;
        return next;
        return;
    end if;

    with plan as (
        select g.id,
               g.next_replication_at as shown,
               coalesce(lj.status in ('pending', 'running'), false) as active,
               case
                   when g.rpo_minutes is null or g.paused or g.state <> 'normal'
                        or g.replication_target_id is null or g.source_dataset is null then null
                   when lj.status in ('pending', 'running') then g.next_replication_at
                   when lj.status in ('failed', 'cancelled') then
                       coalesce(lj.completed_at, lj.created_at) + iv.i + zerfaux.replication_offset(g.id, iv.i)
                   when rp.last_at is null and lc.started_at is null then v_now
                   else greatest(rp.last_at, lc.started_at) + iv.i + zerfaux.replication_offset(g.id, iv.i)
               end as due
          from public.protection_groups g
          cross join lateral (select zerfaux.replication_interval(g.replication_interval_minutes, g.rpo_minutes) as i) iv
          left join lateral (
              select j.status, j.completed_at, j.created_at from public.replication_jobs j
               where j.protection_group_id = g.id
               order by j.created_at desc limit 1) lj on g.rpo_minutes is not null
          left join lateral (
              select j.started_at from public.replication_jobs j
               where j.protection_group_id = g.id and j.status = 'completed'
               order by j.created_at desc limit 1) lc on g.rpo_minutes is not null
          left join lateral (
              select p.created_at as last_at from public.recovery_points p
               where p.protection_group_id = g.id and p.on_target
               order by p.created_at desc limit 1) rp on g.rpo_minutes is not null
    ),
    jobs as (
        insert into public.replication_jobs (protection_group_id, origin)
        select p.id, 'schedule' from plan p
         where not p.active and p.due <= v_now
         order by p.id
        on conflict (protection_group_id) where status in ('pending', 'running') do nothing
        returning protection_group_id
    ),
    shown as (  -- run to completion whether or not anything reads it
        update public.protection_groups g
           set next_replication_at = p.due
          from plan p
         where g.id = p.id and g.next_replication_at is distinct from p.due
        returning g.id
    )
    select (select count(*) from jobs)::integer,
           (select min(p.due) from plan p where not p.active and p.due > v_now)
      into v_inserted, v_next;

    inserted := v_inserted;
    next_due_at := v_next;
    return next;
end $$;

revoke execute on function zerfaux.schedule_due(timestamptz) from public, anon, authenticated;
grant execute on function zerfaux.schedule_due(timestamptz) to service_role;

comment on function zerfaux.schedule_due(timestamptz) is
    'inserts one replication job (origin schedule) for each group that is due at p_now, writes '
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

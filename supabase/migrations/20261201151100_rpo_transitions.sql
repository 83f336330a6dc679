-- RPO health (docs/rpo.md, "RPO health"): zerfaux.record_rpo_transitions() writes an rpo_events
-- row whenever a group's rpo_status (as protection_status computes it) differs from the last one
-- recorded. The sweep calls it on every pass, so a group that falls behind because nothing runs
-- is noticed too; a new or changed recovery point calls it for its group at once.

-- protection_status's rule, at a given time: 'ok' below 75 % of the RPO, 'at_risk' from 75 %,
-- 'violated' at or past it, 'unknown' with no recovery point or no RPO.
create function zerfaux.rpo_status(p_rpo_minutes integer, p_last_at timestamptz, p_now timestamptz)
returns text language sql immutable parallel safe set search_path = pg_catalog, pg_temp as $$
    select case
               when p_rpo_minutes is null or p_last_at is null then 'unknown'
               when p_now - p_last_at >= p_rpo_minutes * interval '1 minute' then 'violated'
               when p_now - p_last_at >= p_rpo_minutes * interval '45 seconds' then 'at_risk'
               else 'ok'
           end
$$;

revoke execute on function zerfaux.rpo_status(integer, timestamptz, timestamptz) from public, anon, authenticated;
grant execute on function zerfaux.rpo_status(integer, timestamptz, timestamptz) to service_role;

-- How bad a status is, for telling an improvement from a decline ('unknown' sits beside 'ok':
-- from unknown to ok is a replication, from unknown to at_risk a decline).
create function zerfaux.rpo_rank(p_status text) returns integer
language sql immutable parallel safe set search_path = pg_catalog, pg_temp as $$
    select case p_status when 'ok' then 0 when 'unknown' then 1 when 'at_risk' then 2 when 'violated' then 3 end
$$;

-- Where each group's status was last recorded, and when it changes by itself if nothing happens
-- (ok turns at_risk at 75 % of the RPO, at_risk turns violated at 100 %): a pass looks only at
-- the groups whose time has come (an index range) and at the marked ones, not at every group.
create table zerfaux.rpo_state (
    protection_group_id uuid primary key references public.protection_groups (id) on delete cascade,
    status              text not null,
    changes_at          timestamptz
);
create index rpo_state_changes_at on zerfaux.rpo_state (changes_at) where changes_at is not null;

-- Groups whose status may have changed for another reason than time: a recovery point written,
-- moved or removed, an RPO set or changed. marked_at as in zerfaux.schedule_dirty.
create table zerfaux.rpo_dirty (
    protection_group_id uuid primary key,
    marked_at           timestamptz not null default clock_timestamp()
);

alter table zerfaux.rpo_state enable row level security;
alter table zerfaux.rpo_dirty enable row level security;
revoke all on zerfaux.rpo_state, zerfaux.rpo_dirty from public, anon, authenticated;
grant all on zerfaux.rpo_state, zerfaux.rpo_dirty to service_role;

create function zerfaux.rpo_mark(p_groups uuid[]) returns void
language sql security definer set search_path = zerfaux, public, pg_temp as $$
    insert into zerfaux.rpo_dirty as d (protection_group_id)
    select distinct g from unnest(p_groups) g where g is not null order by 1
    on conflict (protection_group_id) do update set marked_at = clock_timestamp()
$$;

revoke execute on function zerfaux.rpo_mark(uuid[]) from public, anon, authenticated;
grant execute on function zerfaux.rpo_mark(uuid[]) to service_role;

-- Why a group's status changed, in the words rpo_events.reason keeps:
--   better than before:                    'replicated'
--   unknown:                               'no rpo set' | 'no recovery point yet'
--   at_risk / violated, first that holds:  'paused' | 'last job failed: <error>' |
--                                          'listener down' (no worker seen for p_worker_seconds) |
--                                          'falling behind'
-- p_group: that group only (a trigger's call); else the marked groups and those whose time came.
create function zerfaux.record_rpo_transitions(
    p_now timestamptz default now(), p_group uuid default null, p_worker_seconds double precision default 120)
returns integer
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_ids uuid[];
    v_marks timestamptz[];
    v_alive boolean;
    v_count integer := 0;
begin
    -- Callers take turns (the sweeps of several listeners, a replication landing): each one
    -- reads, with a snapshot taken after the lock, what the one before it recorded, so no
    -- transition is recorded twice. Held to the end of the caller's transaction.
    perform pg_advisory_xact_lock(hashtext('zerfaux.record_rpo_transitions'));

    if p_group is not null then
        v_ids := array[p_group];
    else
        select array_agg(d.protection_group_id), array_agg(d.marked_at) into v_ids, v_marks
          from (select protection_group_id, marked_at from zerfaux.rpo_dirty
                 order by marked_at limit 5000) d;
        v_ids := coalesce(v_ids, '{}') || array(
            select s.protection_group_id from zerfaux.rpo_state s where s.changes_at <= v_now);
    end if;

    if cardinality(v_ids) > 0 then
        select exists (select 1 from zerfaux.workers w
                        where w.last_seen_at >= v_now - make_interval(secs => coalesce(p_worker_seconds, 120)))
          into v_alive;

        with current as (
            select g.id, g.rpo_minutes, g.paused, rp.last_at,
                   zerfaux.rpo_status(g.rpo_minutes, rp.last_at, v_now) as status,
                   st.status as recorded
              from public.protection_groups g
              left join zerfaux.rpo_state st on st.protection_group_id = g.id
              left join lateral (
                  select p.created_at as last_at from public.recovery_points p
                   where p.protection_group_id = g.id and p.on_target
                   order by p.created_at desc limit 1) rp on true
             where g.id = any(v_ids)
        ),
        kept as (
            insert into zerfaux.rpo_state as s (protection_group_id, status, changes_at)
            select c.id, c.status,
                   case c.status when 'ok' then c.last_at + c.rpo_minutes * interval '45 seconds'
                                 when 'at_risk' then c.last_at + c.rpo_minutes * interval '1 minute' end
              from current c order by c.id
            on conflict (protection_group_id) do update
               set status = excluded.status, changes_at = excluded.changes_at
             where (s.status, s.changes_at) is distinct from (excluded.status, excluded.changes_at)
        ),
        changed as (
            select c.*, lj.status as job_status, lj.error as job_error
              from current c
              left join lateral (
                  select j.status, j.error from public.replication_jobs j
                   where j.protection_group_id = c.id
                   order by j.created_at desc limit 1) lj on true
             where c.status <> coalesce(c.recorded, 'unknown')
        ),
        inserted as (
            insert into public.rpo_events (protection_group_id, at, old_status, new_status, rpo_seconds, reason)
            select c.id, v_now, c.recorded, c.status,
                   round(extract(epoch from v_now - c.last_at), 3),
                   case
                       when zerfaux.rpo_rank(c.status) < zerfaux.rpo_rank(coalesce(c.recorded, 'unknown'))
                            and c.status <> 'unknown' then 'replicated'
                       when c.status = 'ok' then 'replicated'
                       when c.status = 'unknown' and c.rpo_minutes is null then 'no rpo set'
                       when c.status = 'unknown' then 'no recovery point yet'
                       when c.paused then 'paused'
                       when c.job_status = 'failed' then
                           'last job failed: ' || left(coalesce(c.job_error, 'no error recorded'), 500)
                       when not v_alive then 'listener down'
                       else 'falling behind'
                   end
              from changed c
             order by c.id
            returning 1
        )
        select count(*)::integer into v_count from inserted;
    end if;

    -- The marks seen above and not made again since (one being made now is skipped, not waited for).
    if v_marks is not null then
        delete from zerfaux.rpo_dirty d
         using unnest(v_ids[1:cardinality(v_marks)], v_marks) as seen (id, marked_at)
         where d.protection_group_id = seen.id and d.marked_at = seen.marked_at
           and d.protection_group_id in (select x.protection_group_id from zerfaux.rpo_dirty x
                                          where x.protection_group_id = any(v_ids) for update skip locked);
    end if;
    return v_count;
end $$;

revoke execute on function zerfaux.rpo_rank(text) from public, anon, authenticated;
grant execute on function zerfaux.rpo_rank(text) to service_role;
revoke execute on function zerfaux.record_rpo_transitions(timestamptz, uuid, double precision)
    from public, anon, authenticated;
grant execute on function zerfaux.record_rpo_transitions(timestamptz, uuid, double precision) to service_role;

comment on function zerfaux.record_rpo_transitions(timestamptz, uuid, double precision) is
    'records in rpo_events every group (or p_group) whose rpo_status at p_now differs from the last '
    'recorded one, with the RPO at that moment and why; answers how many (docs/rpo.md)';

-- An RPO set or changed: the group is marked for the next pass. A recovery point written, moved
-- or removed: marked too, and a written or moved one records its group's transition at once, in
-- the same transaction (a replication landing turns the group 'ok' when it commits, not at the
-- next sweep). Row triggers fire at the end of the statement, so a listing upserted in one
-- statement is seen whole by the first call; the others find nothing more to record.
create function zerfaux.rpo_mark_group() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    perform zerfaux.rpo_mark(array[new.id]);
    return null;
end $$;

create function zerfaux.rpo_mark_point() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if tg_op = 'DELETE' then
        perform zerfaux.rpo_mark(array[old.protection_group_id]);
        return null;
    end if;
    if tg_op = 'UPDATE' and old.protection_group_id is distinct from new.protection_group_id then
        perform zerfaux.rpo_mark(array[old.protection_group_id]);
    end if;
    perform zerfaux.rpo_mark(array[new.protection_group_id]);
    perform zerfaux.record_rpo_transitions(now(), new.protection_group_id);
    return null;
end $$;

revoke execute on function zerfaux.rpo_mark_group() from public, anon, authenticated;
revoke execute on function zerfaux.rpo_mark_point() from public, anon, authenticated;

create trigger recovery_points_rpo_mark after insert or update or delete on public.recovery_points
    for each row execute function zerfaux.rpo_mark_point();
create trigger protection_groups_rpo_mark after insert or update of rpo_minutes on public.protection_groups
    for each row execute function zerfaux.rpo_mark_group();

-- What is there already: the last recorded status of each group, and every group marked.
insert into zerfaux.rpo_state (protection_group_id, status)
select distinct on (e.protection_group_id) e.protection_group_id, e.new_status
  from public.rpo_events e order by e.protection_group_id, e.at desc, e.id desc;
select zerfaux.rpo_mark(array(select id from public.protection_groups));

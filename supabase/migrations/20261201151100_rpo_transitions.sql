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

-- Why a group's status changed, in the words rpo_events.reason keeps:
--   better than before:                    'replicated'
--   unknown:                               'no rpo set' | 'no recovery point yet'
--   at_risk / violated, first that holds:  'paused' | 'last job failed: <error>' |
--                                          'listener down' (no worker seen for p_worker_seconds) |
--                                          'falling behind'
create function zerfaux.record_rpo_transitions(
    p_now timestamptz default now(), p_group uuid default null, p_worker_seconds double precision default 120)
returns integer
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_alive boolean;
    v_count integer;
begin
    -- Callers take turns (the sweeps of several listeners, a completing job): each one reads,
    -- with a snapshot taken after the lock, what the one before it recorded, so no transition
    -- is recorded twice. Held to the end of the caller's transaction.
    perform pg_advisory_xact_lock(hashtext('zerfaux.record_rpo_transitions'));

    select exists (select 1 from zerfaux.workers w
                    where w.last_seen_at >= v_now - make_interval(secs => coalesce(p_worker_seconds, 120)))
      into v_alive;

    with current as (
        select g.id, g.rpo_minutes, g.paused, rp.last_at,
               zerfaux.rpo_status(g.rpo_minutes, rp.last_at, v_now) as status,
               ev.new_status as recorded
          from public.protection_groups g
          left join lateral (
              select p.created_at as last_at from public.recovery_points p
               where p.protection_group_id = g.id and p.on_target
               order by p.created_at desc limit 1) rp on true
          left join lateral (
              select e.new_status from public.rpo_events e
               where e.protection_group_id = g.id
               order by e.at desc, e.id desc limit 1) ev on true
         where p_group is null or g.id = p_group
    ),
    changed as (
        select c.*,
               (select j.status from public.replication_jobs j where j.protection_group_id = c.id
                 order by j.created_at desc limit 1) as job_status,
               (select j.error from public.replication_jobs j where j.protection_group_id = c.id
                 order by j.created_at desc limit 1) as job_error
          from current c
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
    select count(*) into v_count from inserted;
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

-- A recovery point written (a replication that ended, retention marking one gone): the groups it
-- concerns get their transition at once, in the same transaction, instead of at the next sweep.
create function zerfaux.recovery_points_record_rpo() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_group uuid;
begin
    for v_group in select distinct n.protection_group_id from changed_points n loop
        perform zerfaux.record_rpo_transitions(now(), v_group);
    end loop;
    return null;
end $$;

revoke execute on function zerfaux.recovery_points_record_rpo() from public, anon, authenticated;

create trigger recovery_points_record_rpo_insert after insert on public.recovery_points
    referencing new table as changed_points
    for each statement execute function zerfaux.recovery_points_record_rpo();
create trigger recovery_points_record_rpo_update after update on public.recovery_points
    referencing new table as changed_points
    for each statement execute function zerfaux.recovery_points_record_rpo();

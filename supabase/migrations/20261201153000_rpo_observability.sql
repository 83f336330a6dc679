-- RPO observability (docs/rpo.md, "Metrics and reports"): what /metrics, `zerfaux status` and
-- `zerfaux report rpo` read. Engine functions in schema zerfaux, so the Postgres store and the
-- PostgREST store (RPC) call the same thing; service_role only, like every engine function.

-- One row per group from public.protection_status, for /metrics and `zerfaux status`. The error
-- is cut to 300 characters: thousands of groups through PostgREST stay a small answer.
create function zerfaux.protection_overview()
returns table (protection_group_id uuid, name text, rpo_minutes integer, last_recovery_point_at timestamptz,
               current_rpo_seconds double precision, rpo_status text, next_replication_at timestamptz,
               last_job_status text, last_error text, paused boolean)
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select s.protection_group_id, s.name, s.rpo_minutes, s.last_recovery_point_at,
           s.current_rpo_seconds::double precision, s.rpo_status, s.next_replication_at,
           s.last_job_status, left(s.last_error, 300), s.paused
      from public.protection_status s
     order by s.name
$$;

revoke execute on function zerfaux.protection_overview() from public, anon, authenticated;
grant execute on function zerfaux.protection_overview() to service_role;

-- The newest recovery point on a group's target at p_at (the rule in the comment below).
create function zerfaux.newest_recovery_point(p_group uuid, p_at timestamptz)
returns table (created_at timestamptz, removed_at timestamptz, on_target boolean)
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select p.created_at, p.removed_at, p.on_target from public.recovery_points p
     where p.protection_group_id = p_group and p.created_at <= p_at
       and (p.replicated_at is not null or p.on_target)
       and greatest(coalesce(p.replicated_at, p.created_at), p.created_at) <= p_at
       and coalesce(p.removed_at, 'infinity'::timestamptz) > p_at
       and (p.on_target or p.removed_at is not null
            or (select greatest(coalesce(q.replicated_at, q.created_at), q.created_at)
                  from public.recovery_points q
                 where q.protection_group_id = p.protection_group_id
                   and q.created_at > p.created_at and (q.replicated_at is not null or q.on_target)
                 order by q.created_at limit 1) > p_at)
     order by p.created_at desc limit 1
$$;

revoke execute on function zerfaux.newest_recovery_point(uuid, timestamptz) from public, anon, authenticated;
grant execute on function zerfaux.newest_recovery_point(uuid, timestamptz) to service_role;

-- RPO compliance of every group over [p_from, p_to).
--
-- The RPO at time t is t minus the creation of the newest recovery point that was on the target
-- at t: a point is there from its replicated_at (its created_at when that is unknown) until its
-- removed_at (gone from both sides). One gone from the target only (on_target false, no
-- removed_at: retention on the target, or destroyed by hand there) has no time of leaving; it is
-- taken as there until the next newer point arrived, and never there while no newer point has
-- (so the report's RPO now agrees with protection_status). Between two such changes the RPO
-- grows one second per second, so the window is cut at every arrival, removal and pause
-- boundary, and each piece is measured exactly:
--   * within_seconds: the part of a piece where the RPO is below the target;
--   * a violation: a maximal span where the RPO is at or past the target; spans that touch
--     across a cut are one violation; one already running at p_from or still running at p_to
--     counts, clipped to the window;
--   * worst_rpo_seconds: the largest RPO seen (the RPO at the end of some piece).
-- Paused time (from an rpo_events row with reason 'paused' until the group's next event with
-- another reason) and unknown time (before the group's first recovery point) are left out of
-- all of these and reported as paused_seconds and unknown_seconds. within_share is
-- within_seconds over observed_seconds (the window minus both). The target is the group's
-- rpo_minutes now; a group with no RPO gets the worst RPO and nulls for the rest.
create function zerfaux.rpo_report(p_from timestamptz, p_to timestamptz default now())
returns table (protection_group_id uuid, name text, rpo_minutes integer, window_seconds double precision,
               observed_seconds double precision, within_seconds double precision,
               within_share double precision, worst_rpo_seconds double precision, violations integer,
               longest_violation_seconds double precision, paused_seconds double precision,
               unknown_seconds double precision)
language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
#variable_conflict use_column
begin
    if p_from is null or p_to is null or p_from >= p_to then
        raise exception 'rpo_report: p_from (%) must be before p_to (%)', p_from, p_to
            using errcode = '22023', hint = 'e.g. zerfaux.rpo_report(now() - interval ''30 days'', now())';
    end if;
    return query
    with pts as (  -- points arriving or removed inside the window: where the RPO changes course
        select p.protection_group_id as gid, p.created_at as c,
               greatest(coalesce(p.replicated_at, p.created_at), p.created_at) as a,
               coalesce(p.removed_at, 'infinity'::timestamptz) as u,
               p.on_target or p.removed_at is not null as known
          from public.recovery_points p
         where (p.replicated_at is not null or p.on_target)
           and (greatest(coalesce(p.replicated_at, p.created_at), p.created_at) between p_from and p_to
                or p.removed_at between p_from and p_to)
    ),
    -- A point is carried as {created_at, until}: until is when it leaves the target, -infinity
    -- when that is not known (gone from the target only); an event as {at, +infinity when it
    -- is 'paused', else -infinity}. The running max of either is the newest one so far.
    start as (  -- each group at p_from: its newest point there, found exactly, and its last event
        select g.id as gid,
               (select array[n.created_at, case when n.on_target or n.removed_at is not null
                                                then coalesce(n.removed_at, 'infinity'::timestamptz)
                                                else '-infinity'::timestamptz end]
                  from zerfaux.newest_recovery_point(g.id, p_from) n) as best,
               (select array[x.at, case when x.reason = 'paused' then 'infinity'::timestamptz
                                        else '-infinity'::timestamptz end]
                  from public.rpo_events x where x.protection_group_id = g.id and x.at <= p_from
                 order by x.at desc, x.id desc limit 1) as ev
          from public.protection_groups g
    ),
    marks as (
        select st.gid, p_from as t, st.best, st.ev from start st
        union all select st.gid, p_to, null, null from start st
        union all select pt.gid, pt.a, array[pt.c, case when pt.known then pt.u else '-infinity'::timestamptz end], null
                    from pts pt where pt.a > p_from and pt.a < p_to
        union all select pt.gid, pt.u, null, null from pts pt where pt.u > p_from and pt.u < p_to
        union all select e.protection_group_id, e.at, null,
                         array[e.at, case when e.reason = 'paused' then 'infinity'::timestamptz
                                          else '-infinity'::timestamptz end]
                    from public.rpo_events e where e.at > p_from and e.at < p_to
    ),
    cuts as (
        select m.gid, m.t, max(m.best) as best, max(m.ev) as ev from marks m group by m.gid, m.t
    ),
    pieces as (
        select c.gid, c.t as s, lead(c.t) over w as e, max(c.best) over w as cand, max(c.ev) over w as ev
          from cuts c
        window w as (partition by c.gid order by c.t)
    ),
    -- The newest point so far is the answer while it is known to be there; otherwise (it left,
    -- or when it leaves is not known) the piece looks the answer up exactly.
    measured as materialized (
        select pc.gid, pc.s, pc.e,
               case when pc.cand[2] > pc.s then pc.cand[1]
                    else (select n.created_at from zerfaux.newest_recovery_point(pc.gid, pc.s) n) end as best,
               coalesce(pc.ev[2] = 'infinity'::timestamptz, false) as paused
          from pieces pc
         where pc.e is not null
    ),
    judged as (
        select m.*, g.rpo_minutes * interval '1 minute' as target,
               m.best is not null and not m.paused as observed,
               case when m.best is not null and not m.paused and g.rpo_minutes is not null
                         and m.best + g.rpo_minutes * interval '1 minute' < m.e
                    then greatest(m.s, m.best + g.rpo_minutes * interval '1 minute') end as vs
          from measured m join public.protection_groups g on g.id = m.gid
    ),
    islands as (
        select j.*, case when j.vs is null then null
                         when lag(j.vs) over w is not null and lag(j.e) over w = j.vs then 0 else 1 end as starts
          from judged j
        window w as (partition by j.gid order by j.s)
    ),
    numbered as (
        select i.*, sum(i.starts) over (partition by i.gid order by i.s) as island from islands i
    ),
    spans as (
        select n.gid, n.island, extract(epoch from max(n.e) - min(n.vs))::double precision as len
          from numbered n where n.vs is not null group by n.gid, n.island
    ),
    violations as (
        select sp.gid, count(*)::integer as n, max(sp.len) as longest from spans sp group by sp.gid
    ),
    totals as (
        select j.gid,
               sum(extract(epoch from j.e - j.s)) filter (where j.observed) as observed,
               sum(extract(epoch from least(j.e - j.s, greatest(j.best + j.target - j.s, interval '0'))))
                   filter (where j.observed) as within,
               max(extract(epoch from j.e - j.best)) filter (where j.observed) as worst,
               coalesce(sum(extract(epoch from j.e - j.s)) filter (where j.paused), 0) as paused,
               coalesce(sum(extract(epoch from j.e - j.s)) filter (where j.best is null and not j.paused), 0)
                   as unknown
          from judged j group by j.gid
    )
    select g.id, g.name, g.rpo_minutes, extract(epoch from p_to - p_from)::double precision,
           coalesce(t.observed, 0)::double precision,
           case when g.rpo_minutes is not null then coalesce(t.within, 0)::double precision end,
           case when g.rpo_minutes is not null and t.observed > 0 then (t.within / t.observed)::double precision end,
           t.worst::double precision,
           case when g.rpo_minutes is not null then coalesce(v.n, 0) end,
           case when g.rpo_minutes is not null then coalesce(v.longest, 0) end,
           t.paused::double precision, t.unknown::double precision
      from public.protection_groups g join totals t on t.gid = g.id
      left join violations v on v.gid = g.id
     order by g.name;
end
$$;

revoke execute on function zerfaux.rpo_report(timestamptz, timestamptz) from public, anon, authenticated;
grant execute on function zerfaux.rpo_report(timestamptz, timestamptz) to service_role;

-- `zerfaux status` as one SQL function, so it reads the same through a direct connection and
-- through PostgREST (service_role only, like every engine function).
create function zerfaux.status_report(p_recent integer default 15, p_worker_seconds double precision default 120)
returns jsonb language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select jsonb_build_object(
        'by_kind', coalesce((
            select jsonb_agg(jsonb_build_object('kind', k.kind, 'status', k.status, 'n', k.n)
                             order by k.kind, k.status)
              from (select o.kind, o.status, count(*) as n from zerfaux.operations o
                     group by o.kind, o.status) k), '[]'::jsonb),
        'recent', coalesce((
            select jsonb_agg(to_jsonb(r) order by r.created_at desc)
              from (select o.id, o.kind, o.subject_id, o.status, o.attempts, o.max_attempts,
                           o.worker_id, o.last_error, o.created_at, o.finished_at
                      from zerfaux.operations o order by o.created_at desc limit p_recent) r), '[]'::jsonb),
        'workers', coalesce((
            select jsonb_agg(to_jsonb(w) order by w.worker_id)
              from (select worker_id, started_at, last_seen_at, running from zerfaux.workers
                     where last_seen_at > now() - make_interval(secs => p_worker_seconds)) w), '[]'::jsonb),
        'oldest_queued_seconds', (
            select extract(epoch from now() - min(o.created_at))::double precision
              from zerfaux.operations o where o.status = 'queued'))
$$;

revoke execute on function zerfaux.status_report(integer, double precision) from public, anon, authenticated;
grant execute on function zerfaux.status_report(integer, double precision) to service_role;

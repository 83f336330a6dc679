-- Bandwidth limits per replication target, and the current rate of a running job
-- (docs/replication.md, "Bandwidth limits").
--
-- replication_targets.bandwidth_limit_mbps caps every stream to that target together: one token
-- bucket per target in each listener process (handlers/throttle.py). A running job reads the
-- row again every few seconds through zerfaux.current_input, so an edit reaches it while it runs.
-- replication_jobs.rate_bytes_per_second is written with the job's progress and cleared when
-- the job stops running.

alter table public.replication_targets
    add column bandwidth_limit_mbps numeric
        constraint replication_targets_bandwidth_limit_mbps_positive
        check (bandwidth_limit_mbps is null or bandwidth_limit_mbps > 0);
comment on column public.replication_targets.bandwidth_limit_mbps is
    'Megabits per second (10^6 bit/s) for all streams to this target together, per listener; null: no limit. '
    'Set it to null, not 0, to lift the limit.';

alter table public.replication_jobs add column rate_bytes_per_second bigint
    check (rate_bytes_per_second is null or rate_bytes_per_second >= 0);
comment on column public.replication_jobs.rate_bytes_per_second is
    'Bytes per second over the last few seconds while the job runs; null when it does not.';

grant select (bandwidth_limit_mbps), insert (bandwidth_limit_mbps), update (bandwidth_limit_mbps)
    on public.replication_targets to authenticated;
-- replication_jobs: authenticated reads the whole table (20261126090300_security.sql).

-- The progress of a replication, now with its rate. A JSON null clears the rate; a missing key
-- leaves it.
create or replace function zerfaux.progress_replication_run(p_subject uuid, p_progress jsonb)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.replication_jobs j
       set bytes_transferred = coalesce((p_progress ->> 'bytes_transferred')::bigint, j.bytes_transferred),
           bytes_estimated = coalesce((p_progress ->> 'bytes_estimated')::bigint, j.bytes_estimated),
           snapshot_name = coalesce(p_progress ->> 'snapshot_name', j.snapshot_name),
           base_snapshot = coalesce(p_progress ->> 'base_snapshot', j.base_snapshot),
           rate_bytes_per_second = case when p_progress ? 'rate_bytes_per_second'
                                        then (p_progress ->> 'rate_bytes_per_second')::bigint
                                        else j.rate_bytes_per_second end
     where j.id = p_subject
$$;
revoke execute on function zerfaux.progress_replication_run(uuid, jsonb) from public, anon, authenticated;
grant execute on function zerfaux.progress_replication_run(uuid, jsonb) to service_role;

-- A job that stops running has no rate, whichever function ended it.
create function zerfaux.clear_job_rate() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
begin
    if new.status <> 'running' then
        new.rate_bytes_per_second := null;
    end if;
    return new;
end $$;
revoke execute on function zerfaux.clear_job_rate() from public, anon, authenticated;
grant execute on function zerfaux.clear_job_rate() to service_role;

create trigger replication_jobs_clear_rate
    before update of status, rate_bytes_per_second on public.replication_jobs
    for each row execute function zerfaux.clear_job_rate();

-- The input of an operation this worker holds, read again now (the kind's input_fn): a handler
-- that runs for long sees edits to its rows (a target's bandwidth limit). Null once the worker
-- holds it no more.
create function zerfaux.current_input(p_id uuid, p_worker text)
returns jsonb language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
    v_fn regproc;
    v_payload jsonb;
begin
    select * into v_op from zerfaux.operations o
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running';
    if not found then
        return null;
    end if;
    select k.input_fn into v_fn from zerfaux.kinds k where k.kind = v_op.kind;
    if v_fn is null then
        return null;
    end if;
    execute format('select %s($1)', v_fn) into v_payload using v_op.subject_id;
    return v_payload;
end $$;
revoke execute on function zerfaux.current_input(uuid, text) from public, anon, authenticated;
grant execute on function zerfaux.current_input(uuid, text) to service_role;

-- Kind replication.run: send a protection group's dataset to its replication target (ZFS).
-- Subject: a public.replication_jobs row, which mirrors the operation for the person who asked
-- (status pending -> running -> completed / failed / cancelled, attempts, next_attempt_at, bytes,
-- error). Concurrency key 'target:<replication_targets.id>': at most max_concurrent run per
-- target. Cancel: set cancel_requested on the job (trigger below). Handler:
-- handlers/replication.py.

create function zerfaux.input_replication_run(p_subject uuid)
returns jsonb language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_job public.replication_jobs;
    v_group public.protection_groups;
begin
    select * into v_job from public.replication_jobs where id = p_subject;
    if not found then return null; end if;
    select * into v_group from public.protection_groups where id = v_job.protection_group_id;
    return jsonb_build_object(
        'job', to_jsonb(v_job),
        'group', to_jsonb(v_group),
        'target', (select to_jsonb(t) from public.replication_targets t
                    where t.id = v_group.replication_target_id),
        'last_snapshot', (select j.snapshot_name from public.replication_jobs j
                           where j.protection_group_id = v_job.protection_group_id
                             and j.target_dataset is not distinct from v_job.target_dataset
                             and j.status = 'completed' and j.id <> v_job.id
                           order by j.completed_at desc limit 1));
end $$;

create function zerfaux.claimed_replication_run(p_subject uuid, p_attempt integer)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.replication_jobs j
       set status = 'running', started_at = coalesce(j.started_at, now()), attempts = p_attempt,
           next_attempt_at = null
     where j.id = p_subject and j.status in ('pending', 'running')
$$;

create function zerfaux.progress_replication_run(p_subject uuid, p_progress jsonb)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.replication_jobs j
       set bytes_transferred = coalesce((p_progress ->> 'bytes_transferred')::bigint, j.bytes_transferred),
           bytes_estimated = coalesce((p_progress ->> 'bytes_estimated')::bigint, j.bytes_estimated),
           snapshot_name = coalesce(p_progress ->> 'snapshot_name', j.snapshot_name),
           base_snapshot = coalesce(p_progress ->> 'base_snapshot', j.base_snapshot)
     where j.id = p_subject
$$;

create function zerfaux.complete_replication_run(p_subject uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    update public.replication_jobs
       set status = 'completed', completed_at = now(), error = null, next_attempt_at = null,
           snapshot_name = p_result ->> 'snapshot_name',
           base_snapshot = p_result ->> 'base_snapshot',
           bytes_transferred = coalesce((p_result ->> 'bytes_transferred')::bigint, 0),
           bytes_estimated = (p_result ->> 'bytes_estimated')::bigint,
           notes = nullif(array_to_string(array(
               select jsonb_array_elements_text(coalesce(p_result -> 'notes', '[]'))), '; '), '')
     where id = p_subject;
    return p_result;
end $$;

-- A retry puts the job back to pending with the time of its next attempt (the operation's
-- run_after, written just before); the end fails it.
create function zerfaux.failure_replication_run(p_subject uuid, p_message text, p_final boolean)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.replication_jobs j
       set status = case when p_final then 'failed' else 'pending' end,
           error = p_message,
           completed_at = case when p_final then now() else null end,
           next_attempt_at = case when p_final then null else (
               select o.run_after from zerfaux.operations o
                where o.kind = 'replication.run' and o.subject_id = p_subject and o.status = 'queued') end
     where j.id = p_subject
$$;

create function zerfaux.cancelled_replication_run(p_subject uuid, p_message text)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.replication_jobs
       set status = 'cancelled', completed_at = now(), error = p_message, next_attempt_at = null
     where id = p_subject
$$;

create function zerfaux.released_replication_run(p_subject uuid)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.replication_jobs set status = 'pending' where id = p_subject and status = 'running'
$$;

create function zerfaux.key_limit_replication_run(p_key text) returns integer
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select coalesce((select max_concurrent from public.replication_targets
                      where p_key like 'target:%' and id::text = substr(p_key, 8)), 1)
$$;

-- A new job is queued under its target's concurrency key.
create or replace function zerfaux.on_replication_job_insert() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_target uuid;
begin
    select replication_target_id into v_target from public.protection_groups
     where id = new.protection_group_id;
    perform zerfaux.enqueue('replication.run', new.id,
                            case when v_target is null then null else 'target:' || v_target end);
    return null;
end $$;

-- Cancelling a job that has not started ends it at once; a running one is told through its
-- heartbeat (and a NOTIFY, so it hears within a moment rather than a heartbeat period). The
-- person's UPDATE has locked the job row already: job, then operation, the engine's order.
create or replace function zerfaux.on_replication_job_cancel() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.cancel_requested and not old.cancel_requested then
        if new.status = 'pending' then
            update zerfaux.operations
               set status = 'cancelled', finished_at = now(), worker_id = null,
                   lease_expires_at = null, last_error = 'cancelled before it started'
             where kind = 'replication.run' and subject_id = new.id and status = 'queued';
            new.status := 'cancelled';
            new.completed_at := now();
            new.error := 'cancelled before it started';
            new.next_attempt_at := null;
        else
            update zerfaux.operations set cancel_requested = true
             where kind = 'replication.run' and subject_id = new.id and status = 'running';
            perform pg_notify('zerfaux_cancel', new.id::text);
        end if;
    end if;
    return new;
end $$;

insert into zerfaux.kinds (kind, subject_table, input_fn, claimed_fn, progress_fn, complete_fn,
                           failure_fn, cancelled_fn, released_fn, key_limit_fn)
values ('replication.run', 'public.replication_jobs', 'zerfaux.input_replication_run',
        'zerfaux.claimed_replication_run', 'zerfaux.progress_replication_run',
        'zerfaux.complete_replication_run', 'zerfaux.failure_replication_run',
        'zerfaux.cancelled_replication_run', 'zerfaux.released_replication_run',
        'zerfaux.key_limit_replication_run');

-- Not from authenticated: it holds only the explicit grants of the policies' helpers
-- (20261201100000_operators.sql), which must survive; PUBLIC's default is what goes.
revoke execute on all functions in schema zerfaux from public, anon;
grant execute on all functions in schema zerfaux to service_role;

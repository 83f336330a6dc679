-- The engine's state changes, kind-free (issue 11, sections 3, 7, 8). Each calls the kind's
-- functions from zerfaux.kinds (20261201130000_kinds.sql) and locks in one order: the subject
-- row, then the operation row (see there). What changed from 20261126090200_engine_functions.sql:
--   enqueue   a request while the same work runs is kept (p_rerun): it runs again afterwards;
--   claim     no global lock: per concurrency key a try-lock, per subject its row lock, both
--             skipped when another claimer holds them, so claimers of unrelated work run in
--             parallel while max_concurrent stays exact; the subject and key filters apply
--             before the batch is cut, so a backlog behind one full key blocks nothing else;
--             a retried claim (p_held: the ids the worker knows it runs) gets back what else
--             runs under its worker id, no attempt counted;
--   fail      retries for a time budget (p_window_seconds, from failing_since) unless
--             max_attempts is set; the row says when the next attempt starts;
--   complete_many  one subtransaction per batch, per item only when the batch fails.

-- ---------------------------------------------------------------------------------------------
-- Enqueueing

-- Idempotent: a second request while the work is queued is the same operation. While it runs,
-- p_rerun asks for one more run after it (the request came after the running one read its
-- input); without p_rerun the request is merged into the running one.
drop function zerfaux.enqueue(text, uuid, text);
create function zerfaux.enqueue(p_kind text, p_subject uuid, p_key text default null,
                                p_rerun boolean default false)
returns uuid language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_id uuid;
begin
    for i in 1..3 loop
        insert into zerfaux.operations (kind, subject_id, concurrency_key)
        values (p_kind, p_subject, p_key)
        on conflict (kind, subject_id) where status in ('queued', 'running') do nothing
        returning id into v_id;
        if v_id is not null then
            return v_id;
        end if;
        update zerfaux.operations o
           set rerun_requested = o.rerun_requested or (p_rerun and o.status = 'running')
         where o.kind = p_kind and o.subject_id = p_subject and o.status in ('queued', 'running')
        returning o.id into v_id;
        if v_id is not null then
            return v_id;
        end if;
        -- It ended between the insert and the update: insert again.
    end loop;
    return null;
end $$;

-- A finished operation that was asked for again while it ran is queued once more.
create function zerfaux.requeue_if_asked(p_op zerfaux.operations)
returns void language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if p_op.rerun_requested then
        update zerfaux.operations set rerun_requested = false where id = p_op.id;
        perform zerfaux.enqueue(p_op.kind, p_op.subject_id, p_op.concurrency_key);
    end if;
end $$;

-- ---------------------------------------------------------------------------------------------
-- Claim

-- The streak of failures an attempt that ended at p_failed_at belongs to: a new one when none
-- was running, or when that attempt ran longer than the window (it worked, then broke anew).
create function zerfaux.streak_start(p_failing_since timestamptz, p_started_at timestamptz,
                                     p_failed_at timestamptz, p_window_seconds double precision)
returns timestamptz language sql immutable as $$
    select case when p_failing_since is null
                  or p_failed_at - p_started_at > make_interval(secs => p_window_seconds)
                then p_failed_at else p_failing_since end
$$;

drop function zerfaux.claim(text, integer, double precision);
create function zerfaux.claim(p_worker text, p_limit integer, p_lease_seconds double precision,
                              p_held uuid[] default null,
                              p_retry_window_seconds double precision default 3600)
returns table (id uuid, kind text, subject_id uuid, attempts integer, max_attempts integer,
               cancel_requested boolean, waited_seconds double precision, payload jsonb)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
#variable_conflict use_column
declare
    r record;
    v_op zerfaux.operations;
    v_taken integer := 0;
    v_keys_held text[] := '{}';
    v_keys_full text[] := '{}';
    v_kind zerfaux.kinds;
    v_kinds jsonb;  -- the registry, read once per claim: {kind: row}
    v_waits text[];
    v_found boolean;
    v_window interval := make_interval(secs => p_retry_window_seconds);
begin
    select coalesce(jsonb_object_agg(k.kind, to_jsonb(k)), '{}') into v_kinds from zerfaux.kinds k;

    -- The worker row first, as heartbeat does: the worker row before operation rows.
    insert into zerfaux.workers as w (worker_id) values (p_worker)
    on conflict (worker_id) do update set last_seen_at = now();

    -- A retried claim whose first answer was lost: what runs under this worker and it does not
    -- know it holds (p_held, the ids it runs; null for a caller that does not say) is handed
    -- back as it is (same attempt, lease renewed).
    for r in
        update zerfaux.operations o
           set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
         where o.id = any(array(
                   select b.id from zerfaux.operations b
                    where p_held is not null and b.worker_id = p_worker and b.status = 'running'
                      and b.id <> all(p_held)))
        returning o.*
    loop
        id := r.id; kind := r.kind; subject_id := r.subject_id; attempts := r.attempts;
        max_attempts := r.max_attempts; cancel_requested := r.cancel_requested;
        waited_seconds := extract(epoch from clock_timestamp() - r.run_after)::double precision;
        payload := zerfaux.operation_input(r.kind, r.subject_id);
        v_taken := v_taken + 1;
        return next;
    end loop;

    -- A worker that died on the last allowed attempt, or past the retry window: fail, do not
    -- run it again.
    for r in
        select o.id, o.kind, o.subject_id from zerfaux.operations o
         where o.status = 'running' and o.lease_expires_at < now()
           and (o.attempts >= o.max_attempts
                or (o.failing_since is not null
                    and zerfaux.streak_start(o.failing_since, o.started_at, o.lease_expires_at,
                                             p_retry_window_seconds) < now() - v_window))
    loop
        continue when not zerfaux.lock_subject(r.kind, r.subject_id, false);
        v_op := null;
        update zerfaux.operations o
           set status = 'failed', finished_at = now(), lease_expires_at = null,
               last_error = format('the worker running it (%s) stopped responding on attempt %s',
                                   o.worker_id, o.attempts)
                            || case when o.attempts >= o.max_attempts
                                    then format(' of %s', o.max_attempts)
                                    else format(', after retrying for %s minutes (ZERFAUX_RETRY_WINDOW_SECONDS)',
                                                round(p_retry_window_seconds / 60)) end
                            || coalesce('; last error: ' || o.last_error, '')
         where o.id = r.id and o.status = 'running' and o.lease_expires_at < now()
        returning o.* into v_op;
        if v_op.id is not null then
            perform zerfaux.write_failure(v_op.kind, v_op.subject_id, v_op.last_error, true);
            perform zerfaux.requeue_if_asked(v_op);
        end if;
    end loop;

    if v_taken >= p_limit then
        return;
    end if;

    -- Candidates in order, already without subjects that are busy, keys that are full and
    -- kinds that wait for another: the batch is cut only after these filters. Expired leases
    -- (their worker died) first, then due queued work by the queued index. Each candidate is
    -- then locked and looked at again, since the snapshot above may be stale.
    for r in
        with busy as (
            select b.subject_id, b.concurrency_key, b.kind from zerfaux.operations b
             where b.status = 'running' and b.lease_expires_at >= now()
        ), full_keys as (
            select k.concurrency_key from (
                select b.concurrency_key, min(b.kind) as kind, count(*) as n from busy b
                 where b.concurrency_key is not null group by b.concurrency_key) k
             where k.n >= zerfaux.key_limit(k.kind, k.concurrency_key)
        ), runnable as (
            (select o.id, o.kind, o.subject_id, o.concurrency_key from zerfaux.operations o
              where o.status = 'running' and o.lease_expires_at < now()
              order by o.lease_expires_at)
            union all
            (select o.id, o.kind, o.subject_id, o.concurrency_key from zerfaux.operations o
              where o.status = 'queued' and o.run_after <= now()
              order by o.run_after, o.created_at)
        )
        select c.* from runnable c
         where c.subject_id not in (select busy.subject_id from busy)
           and (c.concurrency_key is null or c.concurrency_key not in (select concurrency_key from full_keys))
           and not exists (
               select 1 from zerfaux.kinds k join zerfaux.operations m
                 on m.kind = any(k.waits_for) and m.subject_id = c.subject_id
                and m.status in ('queued', 'running')
                where k.kind = c.kind)
    loop
        exit when v_taken >= p_limit;
        if r.concurrency_key is not null then
            continue when r.concurrency_key = any(v_keys_full);
            if not r.concurrency_key = any(v_keys_held) then
                -- Another claimer is filling this key now: leave it to that one.
                if not pg_try_advisory_xact_lock(hashtext('zerfaux.key'), hashtext(r.concurrency_key)) then
                    v_keys_full := v_keys_full || r.concurrency_key;
                    continue;
                end if;
                v_keys_held := v_keys_held || r.concurrency_key;
            end if;
            -- Exact under the key's lock: every claim of this key before ours has committed.
            if (select count(*) from zerfaux.operations b
                 where b.concurrency_key = r.concurrency_key and b.status = 'running'
                   and b.lease_expires_at >= now()) >= zerfaux.key_limit(r.kind, r.concurrency_key) then
                v_keys_full := v_keys_full || r.concurrency_key;
                continue;
            end if;
        end if;
        perform 1 from zerfaux.operations o
         where o.id = r.id
           and ((o.status = 'queued' and o.run_after <= now())
                or (o.status = 'running' and o.lease_expires_at < now()))
           for update skip locked;
        continue when not found;
        v_kind := jsonb_populate_record(null::zerfaux.kinds, v_kinds -> r.kind);
        if v_kind.subject_table is not null then
            -- The subject's row, tried: held by another transaction means busy right now.
            execute format('select true from %s where id = $1 for no key update skip locked', v_kind.subject_table)
               into v_found using r.subject_id;
            continue when v_found is null and zerfaux.lock_subject(r.kind, r.subject_id, false) is false;
        end if;
        -- Under the subject's lock: nothing else of it started since the snapshot above.
        v_waits := coalesce(v_kind.waits_for, '{}');
        continue when exists (
            select 1 from zerfaux.operations b
             where b.subject_id = r.subject_id and b.id <> r.id
               and ((b.status = 'running' and b.lease_expires_at >= now())
                    or (b.status in ('queued', 'running') and b.kind = any(v_waits))));

        update zerfaux.operations o
           set status = 'running', worker_id = p_worker, attempts = o.attempts + 1,
               lease_expires_at = now() + make_interval(secs => p_lease_seconds),
               started_at = now(),
               -- Taking over from a dead worker: its attempt failed.
               failing_since = case when o.status = 'running'
                                    then zerfaux.streak_start(o.failing_since, o.started_at,
                                                              o.lease_expires_at, p_retry_window_seconds)
                                    else o.failing_since end
         where o.id = r.id
        returning o.* into v_op;
        if v_kind.claimed_fn is not null then
            execute format('select %s($1, $2)', v_kind.claimed_fn) using v_op.subject_id, v_op.attempts;
        end if;
        id := v_op.id; kind := v_op.kind; subject_id := v_op.subject_id; attempts := v_op.attempts;
        max_attempts := v_op.max_attempts; cancel_requested := v_op.cancel_requested;
        waited_seconds := extract(epoch from clock_timestamp() - v_op.run_after)::double precision;
        if v_kind.input_fn is null then
            payload := '{}'::jsonb;  -- a kind this schema does not know: the listener may (or says it cannot)
        else
            execute format('select %s($1)', v_kind.input_fn) into payload using v_op.subject_id;
        end if;
        v_taken := v_taken + 1;
        return next;
    end loop;
end $$;

-- ---------------------------------------------------------------------------------------------
-- A worker's writes. Each finds the operation without a lock (kind and subject never change),
-- locks the subject, then the operation, and checks the worker still holds it.

-- Renew the leases a worker holds. Returns one row per operation it still holds, saying
-- whether cancellation was asked; an id missing from the answer is a lost lease. It waits for
-- no lock: a row being written right now (this worker's own progress or completion, a cancel)
-- is answered as held and renewed on the next beat, so a heartbeat is never part of a
-- deadlock between a completion and a cancel.
create or replace function zerfaux.heartbeat(p_worker text, p_ids uuid[], p_lease_seconds double precision)
returns table (id uuid, cancel_requested boolean)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
#variable_conflict use_column
begin
    insert into zerfaux.workers as w (worker_id, running) values (p_worker, cardinality(p_ids))
    on conflict (worker_id) do update set last_seen_at = now(), running = excluded.running;
    return query
        with locked as (
            select o.id from zerfaux.operations o
             where o.id = any(p_ids) and o.worker_id = p_worker and o.status = 'running'
               for update skip locked
        ), renewed as (
            update zerfaux.operations o
               set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
              from locked where o.id = locked.id
            returning o.id, o.cancel_requested
        )
        select renewed.id, renewed.cancel_requested from renewed
        union all
        select o.id, o.cancel_requested from zerfaux.operations o
         where o.id = any(p_ids) and o.worker_id = p_worker and o.status = 'running'
           and o.id not in (select locked.id from locked);
end $$;

-- Live progress. Returns 'ok', 'cancel' (keep going only to stop cleanly) or 'lost'.
create or replace function zerfaux.progress(p_id uuid, p_worker text, p_progress jsonb)
returns text language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_kind text; v_subject uuid; v_cancel boolean; v_fn regproc;
begin
    select o.kind, o.subject_id into v_kind, v_subject from zerfaux.operations o
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running';
    if not found then
        return 'lost';
    end if;
    perform zerfaux.lock_subject(v_kind, v_subject, true);
    update zerfaux.operations o set progress = p_progress
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running'
    returning o.cancel_requested into v_cancel;
    if not found then
        return 'lost';
    end if;
    select k.progress_fn into v_fn from zerfaux.kinds k where k.kind = v_kind;
    if v_fn is not null then
        execute format('select %s($1, $2)', v_fn) using v_subject, p_progress;
    end if;
    return case when v_cancel then 'cancel' else 'ok' end;
end $$;

-- Lock the subject, then the operation this worker holds; null when it holds it no more.
create function zerfaux.lock_held(p_id uuid, p_worker text)
returns zerfaux.operations language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
begin
    select * into v_op from zerfaux.operations o
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running';
    if not found then
        return null;
    end if;
    perform zerfaux.lock_subject(v_op.kind, v_op.subject_id, true);
    select * into v_op from zerfaux.operations o
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running' for update;
    if not found then
        return null;
    end if;
    return v_op;
end $$;

-- Success of one operation: its result lands in the rows (the kind's complete function).
-- Returns false (and writes nothing) when the worker no longer holds it.
create function zerfaux.complete_one(p_id uuid, p_worker text, p_result jsonb)
returns boolean language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
    v_fn regproc;
    v_summary jsonb := p_result;
begin
    v_op := zerfaux.lock_held(p_id, p_worker);
    if v_op.id is null then
        return false;
    end if;
    select k.complete_fn into v_fn from zerfaux.kinds k where k.kind = v_op.kind;
    if v_fn is not null then
        execute format('select %s($1, $2)', v_fn) into v_summary using v_op.subject_id, p_result;
    end if;
    update zerfaux.operations o
       set status = 'succeeded', result = v_summary, finished_at = now(), lease_expires_at = null,
           last_error = null, failing_since = null
     where o.id = p_id;
    perform zerfaux.requeue_if_asked(v_op);
    return true;
end $$;

-- Many completions in one transaction. Each item is {"id": ..., "result": {...}}; an item whose
-- result cannot be written is reported, not fatal to the others. The whole batch runs in one
-- subtransaction; only when it fails is it done again item by item, each in its own (past 64
-- subtransactions in one transaction, Postgres' per-backend cache overflows and every
-- session's snapshot checks slow down).
create or replace function zerfaux.complete_many(p_worker text, p_items jsonb)
returns table (id uuid, done boolean, error text)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
#variable_conflict use_column
declare
    v_item jsonb;
    v_ids uuid[] := '{}';
    v_done boolean[] := '{}';
    v_bad text[] := '{}';
begin
    -- Items that cannot be read are answered without touching the database.
    for v_item in select * from jsonb_array_elements(p_items) loop
        if jsonb_typeof(v_item -> 'result') is distinct from 'object'
           or coalesce(v_item ->> 'id', '') !~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$' then
            v_bad := v_bad || coalesce(v_item ->> 'id', '');
        end if;
    end loop;

    begin
        for v_item in select * from jsonb_array_elements(p_items) loop
            continue when coalesce(v_item ->> 'id', '') = any(v_bad);
            v_ids := v_ids || (v_item ->> 'id')::uuid;
            v_done := v_done || zerfaux.complete_one((v_item ->> 'id')::uuid, p_worker, v_item -> 'result');
        end loop;
    exception when others then
        v_ids := '{}';  -- every write of the batch was rolled back: item by item
        v_done := '{}';
    end;

    if cardinality(v_ids) = 0 and jsonb_array_length(p_items) > cardinality(v_bad) then
        for v_item in select * from jsonb_array_elements(p_items) loop
            continue when coalesce(v_item ->> 'id', '') = any(v_bad);
            id := (v_item ->> 'id')::uuid;
            error := null;
            begin
                done := zerfaux.complete_one(id, p_worker, v_item -> 'result');
            exception when others then
                done := false;
                error := sqlerrm;
            end;
            return next;
        end loop;
    else
        for i in 1 .. coalesce(cardinality(v_ids), 0) loop
            id := v_ids[i]; done := v_done[i]; error := null;
            return next;
        end loop;
    end if;
    for i in 1 .. coalesce(cardinality(v_bad), 0) loop
        id := case when v_bad[i] ~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$' then v_bad[i]::uuid end;
        done := false;
        error := format('item %s: "id" must be a uuid and "result" an object', coalesce(nullif(v_bad[i], ''), '(no id)'));
        return next;
    end loop;
end $$;

-- Failure: retried after p_retry_seconds, or final when permanent, out of explicit attempts or
-- past the retry window (p_window_seconds from the first failure of the streak). Returns
-- 'retrying', 'failed' or 'lost'.
drop function zerfaux.fail(uuid, text, text, boolean, double precision);
create function zerfaux.fail(p_id uuid, p_worker text, p_error text, p_permanent boolean,
                             p_retry_seconds double precision,
                             p_window_seconds double precision default 3600)
returns text language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
    v_since timestamptz;
    v_end timestamptz;
    v_next timestamptz;
    v_message text;
begin
    v_op := zerfaux.lock_held(p_id, p_worker);
    if v_op.id is null then
        return 'lost';
    end if;
    v_since := zerfaux.streak_start(v_op.failing_since, v_op.started_at, now(), p_window_seconds);
    v_end := v_since + make_interval(secs => p_window_seconds);
    if p_permanent or v_op.attempts >= v_op.max_attempts or now() >= v_end then
        v_message := case
            when p_permanent then p_error
            when v_op.attempts >= v_op.max_attempts then format('failed after %s attempts: %s', v_op.attempts, p_error)
            else format('failed after %s attempts over %s minutes (the retry window, ZERFAUX_RETRY_WINDOW_SECONDS=%s): %s',
                        v_op.attempts, round(extract(epoch from now() - v_since) / 60), round(p_window_seconds), p_error)
        end;
        update zerfaux.operations o
           set status = 'failed', last_error = v_message, finished_at = now(), lease_expires_at = null,
               failing_since = null
         where o.id = p_id;
        perform zerfaux.write_failure(v_op.kind, v_op.subject_id, v_message, true);
        perform zerfaux.requeue_if_asked(v_op);
        return 'failed';
    end if;
    -- The last attempt starts when the window ends, not after it.
    v_next := least(now() + make_interval(secs => p_retry_seconds), v_end);
    v_message := format('attempt %s%s failed, next attempt at %s UTC (retrying for up to %s more minutes): %s',
                        v_op.attempts, coalesce(' of ' || v_op.max_attempts, ''),
                        to_char(v_next at time zone 'UTC', 'HH24:MI:SS'),
                        ceil(extract(epoch from v_end - now()) / 60), p_error);
    -- Running again after this request anyway: a rerun asked meanwhile is served by the retry.
    update zerfaux.operations o
       set status = 'queued', last_error = v_message, worker_id = null, lease_expires_at = null,
           run_after = v_next, failing_since = v_since, rerun_requested = false
     where o.id = p_id;
    perform zerfaux.write_failure(v_op.kind, v_op.subject_id, v_message, false);
    return 'retrying';
end $$;

-- Cancelled on request: the operation and its subject end 'cancelled'.
create or replace function zerfaux.finish_cancelled(p_id uuid, p_worker text, p_message text)
returns boolean language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
    v_fn regproc;
begin
    v_op := zerfaux.lock_held(p_id, p_worker);
    if v_op.id is null then
        return false;
    end if;
    update zerfaux.operations o
       set status = 'cancelled', finished_at = now(), lease_expires_at = null, last_error = p_message,
           failing_since = null
     where o.id = p_id;
    select k.cancelled_fn into v_fn from zerfaux.kinds k where k.kind = v_op.kind;
    if v_fn is not null then
        execute format('select %s($1, $2)', v_fn) using v_op.subject_id, p_message;
    end if;
    perform zerfaux.requeue_if_asked(v_op);
    return true;
end $$;

-- Give operations back (graceful shutdown): queued again at once, the attempt not counted.
create or replace function zerfaux.release(p_worker text, p_ids uuid[])
returns integer language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_id uuid;
    v_op zerfaux.operations;
    v_fn regproc;
    v_count integer := 0;
begin
    foreach v_id in array coalesce(p_ids, '{}') loop
        v_op := zerfaux.lock_held(v_id, p_worker);
        continue when v_op.id is null;
        update zerfaux.operations o
           set status = 'queued', worker_id = null, lease_expires_at = null, run_after = now(),
               attempts = greatest(o.attempts - 1, 0)
         where o.id = v_id;
        v_count := v_count + 1;
        select k.released_fn into v_fn from zerfaux.kinds k where k.kind = v_op.kind;
        if v_fn is not null then
            execute format('select %s($1)', v_fn) using v_op.subject_id;
        end if;
        perform pg_notify('zerfaux_operations', json_build_object('id', v_op.id, 'kind', v_op.kind)::text);
    end loop;
    delete from zerfaux.workers where worker_id = p_worker;
    return v_count;
end $$;

-- Store.complete is gone (the dispatcher completes in batches): complete_one is internal.
drop function zerfaux.complete(uuid, text, jsonb);

-- Not from authenticated: it holds only the explicit grants of the policies' helpers
-- (20261201100000_operators.sql), which must survive; PUBLIC's default is what goes.
revoke execute on all functions in schema zerfaux from public, anon;
grant execute on all functions in schema zerfaux to service_role;

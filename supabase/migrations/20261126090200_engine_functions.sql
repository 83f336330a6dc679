-- Zerfaux engine state changes. Every function that writes on behalf of a worker checks that
-- the worker still holds the operation (worker_id and status 'running'): a worker that lost its
-- lease writes nothing.

-- Claim up to p_limit runnable operations: queued ones whose run_after has come and running
-- ones whose lease expired (their worker died). One operation per subject at a time, and at
-- most max_concurrent per replication target. The advisory lock makes the running counts
-- exact across concurrent claimers; SKIP LOCKED keeps claimers off rows being written.
create function zerfaux.claim(p_worker text, p_limit integer, p_lease_seconds double precision)
returns table (id uuid, kind text, subject_id uuid, attempts integer, max_attempts integer,
               cancel_requested boolean, waited_seconds double precision, payload jsonb)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
#variable_conflict use_column
declare
    r record;
begin
    perform pg_advisory_xact_lock(hashtext('zerfaux.claim'));

    -- A worker that died on the last allowed attempt: fail, do not run it again.
    for r in
        update zerfaux.operations o
           set status = 'failed', finished_at = now(), lease_expires_at = null,
               last_error = format('the worker running it (%s) stopped responding on attempt %s of %s',
                                   o.worker_id, o.attempts, o.max_attempts)
                            || coalesce('; last error: ' || o.last_error, '')
         where o.status = 'running' and o.lease_expires_at < now() and o.attempts >= o.max_attempts
        returning o.kind, o.subject_id, o.last_error
    loop
        perform zerfaux.write_failure(r.kind, r.subject_id, r.last_error, true);
    end loop;

    for r in
        with candidates as (
            select o.id, o.subject_id, o.concurrency_key, o.run_after, o.created_at
              from zerfaux.operations o
             where ((o.status = 'queued' and o.run_after <= now())
                    or (o.status = 'running' and o.lease_expires_at < now()))
               -- A DR shell attaches the disks on the protection datastore: it waits for a
               -- Storage vMotion of the same VM that is still queued or running.
               and not (o.kind = 'vm.dr_shell' and exists (
                        select 1 from zerfaux.operations m
                         where m.kind = 'vm.storage_vmotion' and m.subject_id = o.subject_id
                           and m.status in ('queued', 'running')))
             order by o.run_after, o.created_at
             limit p_limit * 4 + 16
               for update skip locked
        ), busy as (
            select b.subject_id, b.concurrency_key from zerfaux.operations b
             where b.status = 'running' and b.lease_expires_at >= now()
        ), one_per_subject as (
            select c.*, row_number() over (partition by c.subject_id
                                           order by c.run_after, c.created_at) as subject_rank
              from candidates c
             where not exists (select 1 from busy where busy.subject_id = c.subject_id)
        ), ranked as (
            select s.*, row_number() over (partition by s.concurrency_key
                                           order by s.run_after, s.created_at) as key_rank
              from one_per_subject s where s.subject_rank = 1
        ), chosen as (
            select k.id, k.run_after from ranked k
             where k.concurrency_key is null
                or (select count(*) from busy where busy.concurrency_key = k.concurrency_key)
                   + k.key_rank <= zerfaux.key_limit(k.concurrency_key)
             order by k.run_after, k.created_at
             limit p_limit
        )
        update zerfaux.operations o
           set status = 'running', worker_id = p_worker, attempts = o.attempts + 1,
               lease_expires_at = now() + make_interval(secs => p_lease_seconds),
               started_at = now()
          from chosen where o.id = chosen.id
        returning o.id, o.kind, o.subject_id, o.attempts, o.max_attempts, o.cancel_requested,
                  extract(epoch from clock_timestamp() - chosen.run_after)::double precision as waited
    loop
        if r.kind = 'replication.run' then
            update public.replication_jobs j
               set status = 'running', started_at = coalesce(j.started_at, now()),
                   attempts = r.attempts
             where j.id = r.subject_id and j.status in ('pending', 'running');
        end if;
        id := r.id; kind := r.kind; subject_id := r.subject_id; attempts := r.attempts;
        max_attempts := r.max_attempts; cancel_requested := r.cancel_requested;
        waited_seconds := r.waited;
        payload := zerfaux.operation_input(r.kind, r.subject_id);
        return next;
    end loop;

    insert into zerfaux.workers as w (worker_id) values (p_worker)
    on conflict (worker_id) do update set last_seen_at = now();
end $$;

-- Renew the leases a worker holds. Returns one row per operation it still holds, saying
-- whether cancellation was asked; an id missing from the answer is a lost lease.
create function zerfaux.heartbeat(p_worker text, p_ids uuid[], p_lease_seconds double precision)
returns table (id uuid, cancel_requested boolean)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
#variable_conflict use_column
begin
    insert into zerfaux.workers as w (worker_id, running) values (p_worker, cardinality(p_ids))
    on conflict (worker_id) do update set last_seen_at = now(), running = excluded.running;
    return query
        update zerfaux.operations o
           set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
         where o.id = any(p_ids) and o.worker_id = p_worker and o.status = 'running'
        returning o.id, o.cancel_requested;
end $$;

-- Live progress. Returns 'ok', 'cancel' (keep going only to stop cleanly) or 'lost'.
create function zerfaux.progress(p_id uuid, p_worker text, p_progress jsonb)
returns text language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_kind text; v_subject uuid; v_cancel boolean;
begin
    update zerfaux.operations o set progress = p_progress
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running'
    returning o.kind, o.subject_id, o.cancel_requested into v_kind, v_subject, v_cancel;
    if not found then
        return 'lost';
    end if;
    if v_kind = 'replication.run' then
        update public.replication_jobs j
           set bytes_transferred = coalesce((p_progress ->> 'bytes_transferred')::bigint, j.bytes_transferred),
               bytes_estimated = coalesce((p_progress ->> 'bytes_estimated')::bigint, j.bytes_estimated),
               snapshot_name = coalesce(p_progress ->> 'snapshot_name', j.snapshot_name),
               base_snapshot = coalesce(p_progress ->> 'base_snapshot', j.base_snapshot)
         where j.id = v_subject;
    end if;
    return case when v_cancel then 'cancel' else 'ok' end;
end $$;

-- Write an inventory in one statement per table; rows not seen get removed_at.
create function zerfaux.apply_inventory(p_vcenter uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_vms integer; v_ds integer; v_gone_vms integer; v_gone_ds integer;
begin
    insert into public.vcenter_vms as t
        (vcenter_id, moref, name, instance_uuid, cluster, esx_host, power_state, datastore,
         datastores, guest_os, guest_id, firmware, num_cpu, memory_mb, disks, networks,
         synced_at, removed_at)
    select p_vcenter, x.moref, x.name, x.instance_uuid, x.cluster, x.esx_host, x.power_state,
           x.datastore, coalesce(x.datastores, '[]'), x.guest_os, x.guest_id, x.firmware,
           x.num_cpu, x.memory_mb, coalesce(x.disks, '[]'), coalesce(x.networks, '[]'), now(), null
      from jsonb_to_recordset(coalesce(p_result -> 'vms', '[]')) as x(
           moref text, name text, instance_uuid text, cluster text, esx_host text,
           power_state text, datastore text, datastores jsonb, guest_os text, guest_id text,
           firmware text, num_cpu integer, memory_mb integer, disks jsonb, networks jsonb)
    on conflict (vcenter_id, moref) do update
       set name = excluded.name, instance_uuid = excluded.instance_uuid,
           cluster = excluded.cluster, esx_host = excluded.esx_host,
           power_state = excluded.power_state, datastore = excluded.datastore,
           datastores = excluded.datastores, guest_os = excluded.guest_os,
           guest_id = excluded.guest_id, firmware = excluded.firmware,
           num_cpu = excluded.num_cpu, memory_mb = excluded.memory_mb, disks = excluded.disks,
           networks = excluded.networks, synced_at = excluded.synced_at, removed_at = null;
    get diagnostics v_vms = row_count;

    update public.vcenter_vms v set removed_at = now()
     where v.vcenter_id = p_vcenter and v.removed_at is null
       and v.moref not in (select e ->> 'moref' from jsonb_array_elements(coalesce(p_result -> 'vms', '[]')) e);
    get diagnostics v_gone_vms = row_count;

    insert into public.vcenter_datastores as t
        (vcenter_id, moref, name, type, capacity_bytes, free_bytes, used_percent, synced_at, removed_at)
    select p_vcenter, x.moref, x.name, x.type, x.capacity_bytes, x.free_bytes,
           case when coalesce(x.capacity_bytes, 0) > 0
                then round(100.0 * (x.capacity_bytes - coalesce(x.free_bytes, 0)) / x.capacity_bytes, 2)
           end, now(), null
      from jsonb_to_recordset(coalesce(p_result -> 'datastores', '[]')) as x(
           moref text, name text, type text, capacity_bytes bigint, free_bytes bigint)
    on conflict (vcenter_id, moref) do update
       set name = excluded.name, type = excluded.type, capacity_bytes = excluded.capacity_bytes,
           free_bytes = excluded.free_bytes, used_percent = excluded.used_percent,
           synced_at = excluded.synced_at, removed_at = null;
    get diagnostics v_ds = row_count;

    update public.vcenter_datastores d set removed_at = now()
     where d.vcenter_id = p_vcenter and d.removed_at is null
       and d.moref not in (select e ->> 'moref' from jsonb_array_elements(coalesce(p_result -> 'datastores', '[]')) e);
    get diagnostics v_gone_ds = row_count;

    update public.vcenters set last_synced_at = now(), last_sync_error = null where id = p_vcenter;
    return jsonb_build_object('vms', v_vms, 'datastores', v_ds,
                              'vms_removed', v_gone_vms, 'datastores_removed', v_gone_ds);
end $$;

-- Success: the operation ends and its result lands in the rows, in one transaction.
-- Returns false (and writes nothing) when the worker no longer holds the operation.
create function zerfaux.complete(p_id uuid, p_worker text, p_result jsonb)
returns boolean language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
    v_summary jsonb := p_result;
    v_ds text;
begin
    select * into v_op from zerfaux.operations o
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running' for update;
    if not found then
        return false;
    end if;

    if v_op.kind = 'vcenter.sync' then
        v_summary := zerfaux.apply_inventory(v_op.subject_id, p_result);
    elsif v_op.kind = 'replication.run' then
        update public.replication_jobs
           set status = 'completed', completed_at = now(), error = null,
               snapshot_name = p_result ->> 'snapshot_name',
               base_snapshot = p_result ->> 'base_snapshot',
               bytes_transferred = coalesce((p_result ->> 'bytes_transferred')::bigint, 0),
               bytes_estimated = (p_result ->> 'bytes_estimated')::bigint,
               notes = nullif(array_to_string(array(
                   select jsonb_array_elements_text(coalesce(p_result -> 'notes', '[]'))), '; '), '')
         where id = v_op.subject_id;
    elsif v_op.kind = 'vm.storage_vmotion' then
        v_ds := p_result ->> 'datastore';
        update public.protected_vms set needs_storage_vmotion = false, last_error = null, updated_at = now()
         where id = v_op.subject_id;
        -- The VM's files now sit on the protection datastore, under the same directories.
        update public.vcenter_vms v
           set datastore = v_ds,
               datastores = jsonb_build_array(v_ds),
               disks = coalesce((select jsonb_agg(d || jsonb_build_object(
                            'datastore', v_ds,
                            'file', regexp_replace(d ->> 'file', '^\[[^]]*\]', '[' || v_ds || ']')))
                          from jsonb_array_elements(v.disks) d), '[]')
          from public.protected_vms p
         where p.id = v_op.subject_id and v.id = p.vm_id;
    elsif v_op.kind = 'vm.dr_shell' then
        update public.protected_vms
           set needs_dr_shell = false, dr_shell_vm_created = true,
               dr_shell_vm_id = p_result ->> 'dr_shell_vm_id', last_error = null, updated_at = now()
         where id = v_op.subject_id;
    end if;

    update zerfaux.operations o
       set status = 'succeeded', result = v_summary, finished_at = now(), lease_expires_at = null,
           last_error = null
     where o.id = p_id;
    return true;
end $$;

-- Many completions in one transaction (one commit instead of one per operation). Each item is
-- {"id": ..., "result": {...}}; an item whose result cannot be written is reported, not fatal
-- to the others.
create function zerfaux.complete_many(p_worker text, p_items jsonb)
returns table (id uuid, done boolean, error text)
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
#variable_conflict use_column
declare
    v_item jsonb;
begin
    for v_item in select * from jsonb_array_elements(p_items) loop
        id := (v_item ->> 'id')::uuid;
        error := null;
        begin
            done := zerfaux.complete(id, p_worker, v_item -> 'result');
        exception when others then
            done := false;
            error := sqlerrm;
        end;
        return next;
    end loop;
end $$;

-- Failure: retried after p_retry_seconds, or final when permanent or out of attempts.
-- Returns 'retrying', 'failed' or 'lost'.
create function zerfaux.fail(p_id uuid, p_worker text, p_error text, p_permanent boolean,
                             p_retry_seconds double precision)
returns text language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
    v_message text;
begin
    select * into v_op from zerfaux.operations o
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running' for update;
    if not found then
        return 'lost';
    end if;
    if p_permanent or v_op.attempts >= v_op.max_attempts then
        v_message := case when p_permanent then p_error
                          else format('failed after %s attempts: %s', v_op.attempts, p_error) end;
        update zerfaux.operations o
           set status = 'failed', last_error = v_message, finished_at = now(), lease_expires_at = null
         where o.id = p_id;
        perform zerfaux.write_failure(v_op.kind, v_op.subject_id, v_message, true);
        return 'failed';
    end if;
    update zerfaux.operations o
       set status = 'queued', last_error = p_error, worker_id = null, lease_expires_at = null,
           run_after = now() + make_interval(secs => p_retry_seconds)
     where o.id = p_id;
    perform zerfaux.write_failure(v_op.kind, v_op.subject_id,
        format('attempt %s of %s failed, retrying in %ss: %s', v_op.attempts, v_op.max_attempts,
               round(p_retry_seconds::numeric, 1), p_error), false);
    return 'retrying';
end $$;

-- Cancelled on request: the operation and its job end 'cancelled'.
create function zerfaux.finish_cancelled(p_id uuid, p_worker text, p_message text)
returns boolean language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_op zerfaux.operations;
begin
    update zerfaux.operations o
       set status = 'cancelled', finished_at = now(), lease_expires_at = null, last_error = p_message
     where o.id = p_id and o.worker_id = p_worker and o.status = 'running'
    returning * into v_op;
    if not found then
        return false;
    end if;
    if v_op.kind = 'replication.run' then
        update public.replication_jobs
           set status = 'cancelled', completed_at = now(), error = p_message
         where id = v_op.subject_id;
    end if;
    return true;
end $$;

-- Give operations back (graceful shutdown): queued again at once, the attempt not counted.
create function zerfaux.release(p_worker text, p_ids uuid[])
returns integer language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    r record;
    v_count integer := 0;
begin
    for r in
        update zerfaux.operations o
           set status = 'queued', worker_id = null, lease_expires_at = null, run_after = now(),
               attempts = greatest(o.attempts - 1, 0)
         where o.id = any(p_ids) and o.worker_id = p_worker and o.status = 'running'
        returning o.id, o.kind, o.subject_id
    loop
        v_count := v_count + 1;
        if r.kind = 'replication.run' then
            update public.replication_jobs set status = 'pending' where id = r.subject_id and status = 'running';
        end if;
        perform pg_notify('zerfaux_operations', json_build_object('id', r.id, 'kind', r.kind)::text);
    end loop;
    delete from zerfaux.workers where worker_id = p_worker;
    return v_count;
end $$;

-- Keep the queue small: finished operations older than p_days go.
create function zerfaux.prune(p_days double precision)
returns integer language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_count integer;
begin
    delete from zerfaux.operations o
     where o.status in ('succeeded', 'failed', 'cancelled')
       and o.finished_at < now() - make_interval(secs => p_days * 86400);
    get diagnostics v_count = row_count;
    delete from zerfaux.workers w where w.last_seen_at < now() - interval '1 day';
    return v_count;
end $$;

-- What a sweep or an idle check needs to know.
create function zerfaux.queue_state()
returns table (queued bigint, runnable bigint, running bigint, expired bigint, next_run_after timestamptz)
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select count(*) filter (where status = 'queued'),
           count(*) filter (where status = 'queued' and run_after <= now()),
           count(*) filter (where status = 'running' and lease_expires_at >= now()),
           count(*) filter (where status = 'running' and lease_expires_at < now()),
           min(run_after) filter (where status = 'queued')
      from zerfaux.operations
     where status in ('queued', 'running')
$$;

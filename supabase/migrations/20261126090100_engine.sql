-- Zerfaux engine: the durable operation queue, the triggers that fill it, and the state
-- changes (claim, heartbeat, progress, complete, fail, cancel, release) as SQL functions shared
-- by every store (DESIGN §4). The public tables ask; zerfaux.operations remembers.

create schema if not exists zerfaux;

create table zerfaux.operations (
    id               uuid primary key default gen_random_uuid(),
    kind             text not null,
    subject_id       uuid not null,
    status           text not null default 'queued',
    attempts         integer not null default 0,
    max_attempts     integer not null default 5 check (max_attempts >= 1),
    run_after        timestamptz not null default now(),
    worker_id        text,
    lease_expires_at timestamptz,
    cancel_requested boolean not null default false,
    concurrency_key  text,            -- 'target:<uuid>' for replication: max_concurrent applies
    last_error       text,
    progress         jsonb,
    result           jsonb,
    created_at       timestamptz not null default now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    constraint operations_status_check
        check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled'))
);

-- Idempotent enqueueing: flipping a flag twice while the work is pending gives one operation.
create unique index operations_active_subject on zerfaux.operations (kind, subject_id)
    where status in ('queued', 'running');
create index operations_queued on zerfaux.operations (run_after, created_at) where status = 'queued';
create index operations_running on zerfaux.operations (lease_expires_at) where status = 'running';
create index operations_finished on zerfaux.operations (finished_at)
    where status in ('succeeded', 'failed', 'cancelled');
create index operations_subject on zerfaux.operations (subject_id, created_at desc);

create table zerfaux.workers (
    worker_id    text primary key,
    started_at   timestamptz not null default now(),
    last_seen_at timestamptz not null default now(),
    running      integer not null default 0
);

-- ---------------------------------------------------------------------------------------------
-- Enqueueing

create function zerfaux.enqueue(p_kind text, p_subject uuid, p_key text default null)
returns uuid language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_id uuid;
begin
    insert into zerfaux.operations (kind, subject_id, concurrency_key)
    values (p_kind, p_subject, p_key)
    on conflict (kind, subject_id) where status in ('queued', 'running') do nothing
    returning id into v_id;
    return v_id;
end $$;

-- Every new operation, however it was inserted, wakes the listeners at once. The payload is a
-- hint (id and kind); the row is the truth.
create function zerfaux.on_operation_insert() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    perform pg_notify('zerfaux_operations', json_build_object('id', new.id, 'kind', new.kind)::text);
    return null;
end $$;

create trigger operations_notify after insert on zerfaux.operations
    for each row execute function zerfaux.on_operation_insert();

create function zerfaux.on_vcenter_change() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.sync_requested_at is not null
       and (tg_op = 'INSERT' or new.sync_requested_at is distinct from old.sync_requested_at) then
        perform zerfaux.enqueue('vcenter.sync', new.id);
    end if;
    return null;
end $$;

create trigger vcenters_enqueue after insert or update of sync_requested_at on public.vcenters
    for each row execute function zerfaux.on_vcenter_change();

create function zerfaux.on_replication_job_insert() returns trigger
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

create trigger replication_jobs_enqueue after insert on public.replication_jobs
    for each row execute function zerfaux.on_replication_job_insert();

-- Cancelling a job that has not started ends it at once; a running one is told through its
-- heartbeat (and a NOTIFY, so it hears within a moment rather than a heartbeat period).
create function zerfaux.on_replication_job_cancel() returns trigger
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
        else
            update zerfaux.operations set cancel_requested = true
             where kind = 'replication.run' and subject_id = new.id and status = 'running';
            perform pg_notify('zerfaux_cancel', new.id::text);
        end if;
    end if;
    return new;
end $$;

create trigger replication_jobs_cancel before update of cancel_requested on public.replication_jobs
    for each row execute function zerfaux.on_replication_job_cancel();

create function zerfaux.on_protected_vm_change() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.needs_storage_vmotion and (tg_op = 'INSERT' or not old.needs_storage_vmotion) then
        perform zerfaux.enqueue('vm.storage_vmotion', new.id);
    end if;
    if new.needs_dr_shell and (tg_op = 'INSERT' or not old.needs_dr_shell) then
        perform zerfaux.enqueue('vm.dr_shell', new.id);
    end if;
    return null;
end $$;

create trigger protected_vms_enqueue
    after insert or update of needs_storage_vmotion, needs_dr_shell on public.protected_vms
    for each row execute function zerfaux.on_protected_vm_change();

-- ---------------------------------------------------------------------------------------------
-- What a handler is given: the rows it needs, read in the claim's transaction.

create function zerfaux.operation_input(p_kind text, p_subject uuid)
returns jsonb language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_job public.replication_jobs;
    v_group public.protection_groups;
    v_pvm public.protected_vms;
    v_vm public.vcenter_vms;
begin
    if p_kind = 'vcenter.sync' then
        return (select jsonb_build_object('vcenter', to_jsonb(v)) from public.vcenters v where v.id = p_subject);
    elsif p_kind = 'replication.run' then
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
    elsif p_kind in ('vm.storage_vmotion', 'vm.dr_shell') then
        select * into v_pvm from public.protected_vms where id = p_subject;
        if not found then return null; end if;
        select * into v_vm from public.vcenter_vms where id = v_pvm.vm_id;
        select * into v_group from public.protection_groups where id = v_pvm.protection_group_id;
        return jsonb_build_object(
            'protected_vm', to_jsonb(v_pvm),
            'vm', case when v_vm.id is null then null else to_jsonb(v_vm) end,
            'group', to_jsonb(v_group),
            'vcenter', (select to_jsonb(v) from public.vcenters v where v.id = v_vm.vcenter_id),
            'dr_vcenter', (select to_jsonb(v) from public.vcenters v where v.id = v_group.dr_vcenter_id),
            'target', (select to_jsonb(t) from public.replication_targets t
                        where t.id = v_group.replication_target_id));
    end if;
    return '{}'::jsonb;  -- a kind this schema does not know: the listener may (or says it cannot)
end $$;

-- How many operations may run at once under a concurrency key.
create function zerfaux.key_limit(p_key text) returns integer
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select case when p_key like 'target:%' then
        coalesce((select max_concurrent from public.replication_targets
                   where id::text = substr(p_key, 8)), 1)
    else 2147483647 end
$$;

-- A failure written where a person looks: the job, the protected VM, the vCenter.
create function zerfaux.write_failure(p_kind text, p_subject uuid, p_message text, p_final boolean)
returns void language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if p_kind = 'vcenter.sync' then
        update public.vcenters set last_sync_error = p_message where id = p_subject;
    elsif p_kind = 'replication.run' then
        update public.replication_jobs
           set status = case when p_final then 'failed' else 'pending' end,
               error = p_message,
               completed_at = case when p_final then now() else null end
         where id = p_subject;
    elsif p_kind in ('vm.storage_vmotion', 'vm.dr_shell') then
        update public.protected_vms set last_error = p_message, updated_at = now() where id = p_subject;
    end if;
end $$;

-- One place per kind (issue 11, section 8). What a kind needs from the engine (the rows its
-- handler is given, what its success and failure write, which row it works on, how many may run
-- under its concurrency key, what it waits for) is one row of zerfaux.kinds naming functions
-- defined in that kind's own migration (20261201130100_kind_vcenter_sync.sql and the three after
-- it). The engine functions (20261201130500_engine_v2.sql) know no kind by name: they look the
-- kind up here and call its functions. Adding a kind is one migration file and one handler.
--
-- Lock order, for every kind: the subject row (the kind's subject_table row with id =
-- subject_id) first, then the operation row. A person's UPDATE of a subject row (a cancel, a
-- sync request) locks the subject before its trigger touches the operation; the engine's
-- progress, complete, fail, cancel and release lock the subject before the operation too, and
-- the claim never waits for a lock (SKIP LOCKED, try-locks). So a cancel during progress writes
-- cannot deadlock (40P01) any more.

alter table zerfaux.operations
    -- No count cap unless one is set on purpose: transient failures are retried for a time
    -- budget (ZERFAUX_RETRY_WINDOW_SECONDS) measured from failing_since.
    alter column max_attempts drop not null,
    alter column max_attempts set default null,
    -- The first failure of the current streak of failed attempts; null when none failed, or
    -- after an attempt that ran longer than the retry window (that failure starts a new streak).
    add column failing_since timestamptz,
    -- Asked again while running (a sync requested during a sync): queued again when it ends.
    add column rerun_requested boolean not null default false;

-- Work queued with the old default of 5 attempts gets the time budget like new work.
update zerfaux.operations set max_attempts = null
 where status in ('queued', 'running') and max_attempts = 5;

-- The same rule (one queued or running operation per kind and subject), with the subject
-- first: the claim asks "is anything of this subject running?" for each candidate, and an index
-- led by kind made that a scan of the whole index. ON CONFLICT (kind, subject_id) still infers it.
drop index zerfaux.operations_active_subject;
create unique index operations_active_subject on zerfaux.operations (subject_id, kind)
    where status in ('queued', 'running');

-- The claim counts running operations per concurrency key.
create index operations_running_key on zerfaux.operations (concurrency_key)
    where status = 'running' and concurrency_key is not null;

-- When the next attempt of a retried job starts; null while running and once it ended.
alter table public.replication_jobs add column next_attempt_at timestamptz;

create table zerfaux.kinds (
    kind          text primary key,
    -- The row the kind works on (id = operations.subject_id): locked before the operation row.
    subject_table regclass,
    input_fn      regproc not null,  -- (subject uuid) -> jsonb: what the handler is given; null = subject gone
    claimed_fn    regproc,           -- (subject uuid, attempt integer): an attempt starts
    progress_fn   regproc,           -- (subject uuid, progress jsonb): live progress
    complete_fn   regproc,           -- (subject uuid, result jsonb) -> jsonb: success; returns the stored result
    failure_fn    regproc,           -- (subject uuid, message text, final boolean): a retry or the end
    cancelled_fn  regproc,           -- (subject uuid, message text): ended on request
    released_fn   regproc,           -- (subject uuid): given back at shutdown, the attempt not counted
    key_limit_fn  regproc,           -- (key text) -> integer: how many may run under a concurrency key
    waits_for     text[] not null default '{}'  -- kinds on the same subject that go first
);

alter table zerfaux.kinds enable row level security;
revoke all on zerfaux.kinds from public, anon, authenticated;
grant select on zerfaux.kinds to service_role;

-- The rows of a protected VM, shared by the two kinds that work on one.
create function zerfaux.protected_vm_rows(p_subject uuid)
returns jsonb language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_pvm public.protected_vms;
    v_vm public.vcenter_vms;
    v_group public.protection_groups;
begin
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
end $$;

-- Lock an operation's subject row. p_wait: wait for it (progress, complete, fail, ...);
-- otherwise (the claim) answer false when another transaction holds it. True also when the
-- kind has no subject table or the row is gone (the handler is told the subject no longer exists).
create function zerfaux.lock_subject(p_kind text, p_subject uuid, p_wait boolean)
returns boolean language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_table regclass;
    v_found boolean;
begin
    select k.subject_table into v_table from zerfaux.kinds k where k.kind = p_kind;
    if v_table is null then
        return true;
    end if;
    if p_wait then
        execute format('select true from %s where id = $1 for no key update', v_table)
           into v_found using p_subject;
        return true;
    end if;
    execute format('select true from %s where id = $1 for no key update skip locked', v_table)
       into v_found using p_subject;
    if v_found then
        return true;
    end if;
    execute format('select exists (select 1 from %s where id = $1)', v_table) into v_found using p_subject;
    return not v_found;
end $$;

-- What a handler is given: the kind's input function, read in the claim's transaction.
create or replace function zerfaux.operation_input(p_kind text, p_subject uuid)
returns jsonb language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_fn regproc;
    v_input jsonb;
begin
    select k.input_fn into v_fn from zerfaux.kinds k where k.kind = p_kind;
    if v_fn is null then
        return '{}'::jsonb;  -- a kind this schema does not know: the listener may (or says it cannot)
    end if;
    execute format('select %s($1)', v_fn) into v_input using p_subject;
    return v_input;
end $$;

-- How many operations of a kind may run at once under a concurrency key (no limit without one).
create function zerfaux.key_limit(p_kind text, p_key text) returns integer
language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_fn regproc;
    v_limit integer;
begin
    select k.key_limit_fn into v_fn from zerfaux.kinds k where k.kind = p_kind;
    if v_fn is null then
        return 2147483647;
    end if;
    execute format('select %s($1)', v_fn) into v_limit using p_key;
    return coalesce(v_limit, 1);
end $$;

-- A failure written where a person looks, by the kind's failure function.
create or replace function zerfaux.write_failure(p_kind text, p_subject uuid, p_message text, p_final boolean)
returns void language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_fn regproc;
begin
    select k.failure_fn into v_fn from zerfaux.kinds k where k.kind = p_kind;
    if v_fn is not null then
        execute format('select %s($1, $2, $3)', v_fn) using p_subject, p_message, p_final;
    end if;
end $$;

-- The old one-argument form knew only 'target:' keys; the claim now asks the kind.
drop function zerfaux.key_limit(text);

-- Not from authenticated: it holds only the explicit grants of the policies' helpers
-- (20261201100000_operators.sql), which must survive; PUBLIC's default is what goes.
revoke execute on all functions in schema zerfaux from public, anon;
grant execute on all functions in schema zerfaux to service_role;

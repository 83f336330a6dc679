-- Recovery runs (issue 13; docs/recovery.md, "Recovery runs: the rows"): the rows a person
-- inserts to test a group at the DR site (kind 'test') and to remove what the test made (kind
-- 'cleanup'), the steps the engine records for each, and the rules the database enforces on
-- them. The kind recovery.run that carries them out is in 20261201160100_kind_recovery_run.sql.
--
-- Also: replication_targets.nfs_host, the address DR ESXi hosts mount exported clones from
-- (null = ssh_host, which every existing row keeps meaning). recovery_points.tested_at exists
-- since 20261201150000_rpo_schema.sql; a cleanup sets it.

alter table public.replication_targets
    add column nfs_host text,
    add constraint replication_targets_nfs_host_length check (
        char_length(nfs_host) between 1 and 253 and nfs_host !~ '[\s/]');

comment on column public.replication_targets.nfs_host is
    'address the DR ESXi hosts use to mount datasets the DR storage host exports (a test''s clone); '
    'null = ssh_host';
-- Configuration, like ssh_host: a global admin sets it (the policies on replication_targets).
grant select (nfs_host), insert (nfs_host), update (nfs_host) on public.replication_targets to authenticated;

create table public.recovery_runs (
    id                  uuid primary key default gen_random_uuid(),
    protection_group_id uuid not null references public.protection_groups (id) on delete cascade,
    kind                text not null,
    recovery_point_id   uuid references public.recovery_points (id) on delete set null,
    test_run_id         uuid references public.recovery_runs (id) on delete cascade,
    status              text not null default 'pending',
    cancel_requested    boolean not null default false,
    options             jsonb not null default '{}',
    requested_by        uuid default auth.uid(),
    created_at          timestamptz not null default now(),
    started_at          timestamptz,
    completed_at        timestamptz,
    rto_seconds         numeric,
    data_loss_seconds   numeric,
    error               text,
    report              jsonb,
    constraint recovery_runs_kind_check check (kind in (
        'test', 'cleanup', 'planned_migration', 'failover', 'commit', 'rollback', 'reprotect')),
    constraint recovery_runs_status_check check (status in (
        'pending', 'running', 'active', 'awaiting_commit', 'completed', 'failed', 'cancelled')),
    constraint recovery_runs_options_object check (jsonb_typeof(options) = 'object'),
    constraint recovery_runs_options_size check (pg_column_size(options) <= 65536)
);

create index recovery_runs_group_created_idx on public.recovery_runs (protection_group_id, created_at desc);
create index recovery_runs_recovery_point_id_idx on public.recovery_runs (recovery_point_id);
create index recovery_runs_test_run_id_idx on public.recovery_runs (test_run_id);

-- The rules' guarantees, also against two inserts racing past the trigger below. A failed test
-- holds nothing (its leftovers have their own names, and a cleanup removes them); a failed or
-- cancelled cleanup may be followed by another.
create unique index recovery_runs_one_active_test_per_group on public.recovery_runs (protection_group_id)
    where kind = 'test' and status in ('pending', 'running', 'active');
create unique index recovery_runs_one_cleanup_per_test on public.recovery_runs (test_run_id)
    where kind = 'cleanup' and status in ('pending', 'running', 'completed');

comment on table public.recovery_runs is
    'a test failover of a protection group (kind test) or the removal of what a test made (kind cleanup); '
    'insert one to start it (operation recovery.run); docs/recovery.md';
comment on column public.recovery_runs.kind is
    'test | cleanup; planned_migration, failover, commit, rollback, reprotect are refused until they exist';
comment on column public.recovery_runs.recovery_point_id is
    'the point brought up; a test left null takes the newest point on the target; a cleanup copies its test''s';
comment on column public.recovery_runs.test_run_id is 'cleanup only: the test run whose VMs, clone and datastore it removes';
comment on column public.recovery_runs.status is
    'pending -> running -> active (a test is up) | completed | failed | cancelled; set by the engine';
comment on column public.recovery_runs.cancel_requested is
    'set to true to stop a pending or running run (a running test then removes what it made)';
comment on column public.recovery_runs.options is 'per-run options for the handler (a JSON object)';
comment on column public.recovery_runs.requested_by is 'auth.uid() of the person who inserted the run';
comment on column public.recovery_runs.started_at is 'when the first attempt started';
comment on column public.recovery_runs.completed_at is 'when the run ended (null while a test is active)';
comment on column public.recovery_runs.rto_seconds is
    'test: seconds from started_at to the last VM ready (or given up waiting for)';
comment on column public.recovery_runs.data_loss_seconds is
    'seconds between the recovery point''s creation on the source and the run''s start';
comment on column public.recovery_runs.error is 'why the run failed or was cancelled, or the last failed attempt';
comment on column public.recovery_runs.report is 'the handler''s summary when the run succeeded';

create table public.recovery_run_steps (
    id              uuid primary key default gen_random_uuid(),
    run_id          uuid not null references public.recovery_runs (id) on delete cascade,
    seq             integer not null,
    name            text not null,
    protected_vm_id uuid references public.protected_vms (id) on delete set null,
    status          text not null default 'pending',
    started_at      timestamptz,
    finished_at     timestamptz,
    detail          jsonb not null default '{}',
    error           text,
    constraint recovery_run_steps_run_seq_key unique (run_id, seq),
    constraint recovery_run_steps_seq_positive check (seq >= 1),
    constraint recovery_run_steps_name_length check (char_length(name) between 1 and 64),
    constraint recovery_run_steps_status_check check (status in (
        'pending', 'running', 'done', 'failed', 'skipped', 'warning')),
    constraint recovery_run_steps_detail_object check (jsonb_typeof(detail) = 'object')
);
-- The unique constraint's index leads with run_id: it serves the foreign key as well.
create index recovery_run_steps_protected_vm_id_idx on public.recovery_run_steps (protected_vm_id);

comment on table public.recovery_run_steps is
    'the steps of a recovery run, in order (seq), each recorded before and after its effect; the engine''s';
comment on column public.recovery_run_steps.seq is 'order within the run, from 1; the whole plan is written at once';
comment on column public.recovery_run_steps.name is 'validate, hold_snapshot, clone_snapshot, ..., activate; docs/recovery.md';
comment on column public.recovery_run_steps.protected_vm_id is 'the VM a per-VM step is about; null for a group step';
comment on column public.recovery_run_steps.status is 'pending | running | done | failed | skipped | warning';
comment on column public.recovery_run_steps.started_at is 'when it last went running';
comment on column public.recovery_run_steps.finished_at is 'when it ended (done, failed, skipped, warning)';
comment on column public.recovery_run_steps.detail is
    'what later steps and the cleanup need (clone, datastore, placement, morefs, boot_time, ready_at) '
    'and previous_attempts';
comment on column public.recovery_run_steps.error is 'why the step failed or warned';

-- ---------------------------------------------------------------------------------------------
-- Who may do what. A viewer of the group reads its runs and their steps; an operator of the
-- group inserts tests and cleanups and cancels them; an admin of the group (or a global one)
-- inserts any kind; only the engine (service_role) writes steps and the engine's columns.

alter table public.recovery_runs enable row level security;
alter table public.recovery_run_steps enable row level security;
revoke all on public.recovery_runs, public.recovery_run_steps from public, anon, authenticated;
grant all on public.recovery_runs, public.recovery_run_steps to service_role;
grant select, insert (protection_group_id, kind, recovery_point_id, test_run_id, options),
      update (cancel_requested)
    on public.recovery_runs to authenticated;
grant select on public.recovery_run_steps to authenticated;

create policy viewer_read on public.recovery_runs for select to authenticated
    using (protection_group_id in (select zerfaux.group_ids('viewer')));
create policy operator_insert on public.recovery_runs for insert to authenticated
    with check (protection_group_id in (select zerfaux.group_ids('operator'))
                and (kind in ('test', 'cleanup') or protection_group_id in (select zerfaux.group_ids('admin'))));
create policy operator_cancel on public.recovery_runs for update to authenticated
    using (protection_group_id in (select zerfaux.group_ids('operator')))
    with check (protection_group_id in (select zerfaux.group_ids('operator')));
create policy viewer_read on public.recovery_run_steps for select to authenticated
    using (run_id in (select r.id from public.recovery_runs r
                       where r.protection_group_id in (select zerfaux.group_ids('viewer'))));

-- The policies refuse a person with a bare "new row violates row-level security policy", and
-- only after the BEFORE triggers ran (which would then speak of recovery points or networks to
-- someone who may not start the run). This one runs first (triggers fire by name) and as the
-- caller, so row_security_active says whether a person is asking.
create function zerfaux.recovery_runs_allowed_insert() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
begin
    if row_security_active('public.recovery_runs') then
        if new.kind in ('test', 'cleanup') and not zerfaux.has_role('operator', new.protection_group_id) then
            raise exception 'recovery_runs_roles: a % run of protection group % needs the operator or admin role '
                            'for that group', new.kind, new.protection_group_id
                using errcode = 'insufficient_privilege',
                      hint = 'ask an admin for a zerfaux.operators row (role operator) for the group; '
                             'see docs/authorization.md';
        elsif new.kind not in ('test', 'cleanup') and not zerfaux.has_role('admin', new.protection_group_id) then
            raise exception 'recovery_runs_roles: a % run of protection group % needs the admin role for that group',
                            new.kind, new.protection_group_id
                using errcode = 'insufficient_privilege',
                      hint = 'operators may insert test and cleanup runs; see docs/authorization.md';
        end if;
    end if;
    return new;
end $$;

create trigger recovery_runs_allowed_insert before insert on public.recovery_runs
    for each row execute function zerfaux.recovery_runs_allowed_insert();

-- A person changes cancel_requested alone (the column grant), and only from false to true; an
-- operator only on test and cleanup runs. Fires before recovery_runs_cancel (by name), which
-- then changes status on the engine's behalf.
create function zerfaux.recovery_runs_allowed_update() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
begin
    if row_security_active('public.recovery_runs') then
        if to_jsonb(new) - 'cancel_requested' is distinct from to_jsonb(old) - 'cancel_requested' then
            raise exception 'recovery_runs_roles: only the engine changes recovery run % beyond cancel_requested', old.id
                using errcode = 'insufficient_privilege',
                      hint = 'set cancel_requested to true to stop a run; see docs/recovery.md';
        end if;
        if old.cancel_requested and not new.cancel_requested then
            raise exception 'recovery_runs_cancel: recovery run % was asked to stop; that cannot be taken back', old.id
                using errcode = 'object_not_in_prerequisite_state',
                      hint = 'insert a new run instead';
        end if;
        if old.kind not in ('test', 'cleanup') and not zerfaux.has_role('admin', old.protection_group_id) then
            raise exception 'recovery_runs_roles: cancelling a % run needs the admin role for its group', old.kind
                using errcode = 'insufficient_privilege', hint = 'see docs/authorization.md';
        end if;
    end if;
    return new;
end $$;

create trigger recovery_runs_allowed_update before update on public.recovery_runs
    for each row execute function zerfaux.recovery_runs_allowed_update();

-- ---------------------------------------------------------------------------------------------
-- The rules, checked at insert with messages that name them (and the fix). SECURITY DEFINER:
-- it reads the group's recovery points, runs and inventory whatever the caller may read; the
-- caller was checked by recovery_runs_allowed_insert first.

create function zerfaux.recovery_runs_rules() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_group public.protection_groups;
    v_point public.recovery_points;
    v_test public.recovery_runs;
    v_other public.recovery_runs;
    v_unmapped text;
begin
    -- What the engine writes is the engine's: a run starts pending, whoever inserts it.
    new.status := 'pending';
    new.cancel_requested := false;
    new.started_at := null;
    new.completed_at := null;
    new.rto_seconds := null;
    new.data_loss_seconds := null;
    new.error := null;
    new.report := null;
    new.created_at := now();

    if new.kind in ('planned_migration', 'failover', 'commit', 'rollback', 'reprotect') then
        raise exception 'recovery_runs_kind_available: kind % is not available yet: this version runs '
                        'kind test and kind cleanup only', new.kind
            using errcode = 'feature_not_supported', column = 'kind',
                  hint = 'insert a test run to check the group at the DR site';
    end if;

    select * into v_group from public.protection_groups g where g.id = new.protection_group_id;
    if not found then
        return new;  -- the foreign key refuses it, naming the column
    end if;

    if new.kind = 'test' then
        if new.test_run_id is not null then
            raise exception 'recovery_runs_test_run_only_for_cleanup: a test run takes no test_run_id'
                using errcode = 'check_violation', column = 'test_run_id',
                      hint = 'leave test_run_id null; a cleanup run names the test it removes';
        end if;
        select * into v_other from public.recovery_runs r
         where r.protection_group_id = new.protection_group_id and r.kind = 'test'
           and r.status in ('pending', 'running', 'active')
         limit 1;
        if found then
            raise exception 'recovery_runs_one_active_test_per_group: protection group % (%) already has a % test run (%)',
                            v_group.name, v_group.id, v_other.status, v_other.id
                using errcode = 'unique_violation', constraint = 'recovery_runs_one_active_test_per_group',
                      hint = case when v_other.status = 'active'
                                  then format('clean it up first: insert into recovery_runs (protection_group_id, kind, '
                                              'test_run_id) values (%L, ''cleanup'', %L)', v_group.id, v_other.id)
                                  else 'wait until it is active and clean it up, or cancel it (cancel_requested = true)' end;
        end if;
        if new.recovery_point_id is null then
            select * into v_point from public.recovery_points p
             where p.protection_group_id = new.protection_group_id and p.on_target and p.removed_at is null
             order by p.created_at desc, p.id desc
             limit 1;
            if not found then
                raise exception 'recovery_runs_point_on_target: protection group % (%) has no recovery point on its '
                                'replication target: replicate first', v_group.name, v_group.id
                    using errcode = 'check_violation', column = 'recovery_point_id',
                          hint = 'replicate first (insert into replication_jobs (protection_group_id) values (...)), '
                                 'then insert the test run again';
            end if;
            new.recovery_point_id := v_point.id;
        else
            select * into v_point from public.recovery_points p where p.id = new.recovery_point_id;
            if found and v_point.protection_group_id <> new.protection_group_id then
                raise exception 'recovery_runs_point_on_target: recovery point % belongs to another protection group, '
                                'not to % (%)', v_point.id, v_group.name, v_group.id
                    using errcode = 'check_violation', column = 'recovery_point_id',
                          hint = 'name a recovery point of this group, or leave recovery_point_id null for the newest';
            elsif found and (not v_point.on_target or v_point.removed_at is not null) then
                raise exception 'recovery_runs_point_on_target: recovery point % (snapshot %) is no longer on the '
                                'replication target', v_point.id, v_point.snapshot_name
                    using errcode = 'check_violation', column = 'recovery_point_id',
                          hint = 'name a point with on_target = true, or leave recovery_point_id null for the newest';
            end if;
            -- not found: the foreign key refuses it
        end if;
        select string_agg(format('%s (VMs %s)', u.source_network, array_to_string(u.vm_names, ', ')), '; '
                          order by u.source_network)
          into v_unmapped
          from zerfaux.unmapped_networks(new.protection_group_id) u;
        if v_unmapped is not null then
            raise exception 'recovery_runs_networks_mapped: protection group % (%) has NICs on networks with no '
                            'network mapping: %', v_group.name, v_group.id, v_unmapped
                using errcode = 'check_violation',
                      hint = 'insert a network_mappings row (protection_group_id, source_network, recovery_network, '
                             'test_network) for each of these networks, then insert the run again';
        end if;
    elsif new.kind = 'cleanup' then
        if new.test_run_id is null then
            raise exception 'recovery_runs_cleanup_of_an_active_test: a cleanup run needs test_run_id, the test it removes'
                using errcode = 'check_violation', column = 'test_run_id',
                      hint = 'set test_run_id to the id of the group''s active (or failed) test run';
        end if;
        -- Locked: two cleanups of one test, or a cleanup and the test's own end, queue up here.
        select * into v_test from public.recovery_runs r where r.id = new.test_run_id for update;
        if not found then
            return new;  -- the foreign key refuses it
        end if;
        if v_test.kind <> 'test' or v_test.protection_group_id <> new.protection_group_id
           or v_test.status not in ('active', 'failed') then
            raise exception 'recovery_runs_cleanup_of_an_active_test: run % is a % run of % in status %; a cleanup '
                            'removes an active (or failed) test of its own protection group % (%)',
                            v_test.id, v_test.kind,
                            case when v_test.protection_group_id = new.protection_group_id
                                 then 'this group' else 'another group' end,
                            v_test.status, v_group.name, v_group.id
                using errcode = 'check_violation', column = 'test_run_id',
                      hint = case when v_test.kind = 'test' and v_test.status in ('pending', 'running')
                                  then 'wait until the test is active, or cancel it (cancel_requested = true): a '
                                       'cancelled test removes what it made by itself'
                                  else 'name a test run of this group whose status is active or failed' end;
        end if;
        select * into v_other from public.recovery_runs r
         where r.test_run_id = new.test_run_id and r.kind = 'cleanup'
           and r.status in ('pending', 'running', 'completed')
         limit 1;
        if found then
            raise exception 'recovery_runs_one_cleanup_per_test: test run % already has a % cleanup run (%)',
                            v_test.id, v_other.status, v_other.id
                using errcode = 'unique_violation', constraint = 'recovery_runs_one_cleanup_per_test',
                      hint = 'wait for that cleanup; insert another only after it failed or was cancelled';
        end if;
        new.recovery_point_id := v_test.recovery_point_id;
    end if;
    return new;
end $$;

create trigger recovery_runs_rules before insert on public.recovery_runs
    for each row execute function zerfaux.recovery_runs_rules();

-- Cancelling a pending run ends it at once; a running one is told through its heartbeat (and a
-- NOTIFY, so it hears within a moment rather than a heartbeat period) and a running test then
-- removes what it made. Its operation is marked also while it waits in the queue between two
-- attempts (a retry not yet due, a dead listener's released work): the next attempt is claimed
-- with cancel_requested and runs the cleanup steps. Nothing to stop once a run is active or ended: the refusal says what
-- to do instead. The person's UPDATE has locked the run row: run, then operation, the engine's
-- order.
create function zerfaux.on_recovery_run_cancel() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.cancel_requested and not old.cancel_requested then
        if old.status = 'pending' then
            update zerfaux.operations
               set status = 'cancelled', finished_at = now(), worker_id = null,
                   lease_expires_at = null, last_error = 'cancelled before it started'
             where kind = 'recovery.run' and subject_id = new.id and status = 'queued';
            new.status := 'cancelled';
            new.completed_at := now();
            new.error := 'cancelled before it started';
        elsif old.status = 'running' then
            update zerfaux.operations set cancel_requested = true
             where kind = 'recovery.run' and subject_id = new.id and status in ('queued', 'running');
            perform pg_notify('zerfaux_cancel', new.id::text);
        else
            raise exception 'recovery_runs_cancel: recovery run % (kind %) is %: only a pending or running run can be '
                            'cancelled', old.id, old.kind, old.status
                using errcode = 'object_not_in_prerequisite_state',
                      hint = case when old.kind = 'test' and old.status in ('active', 'failed')
                                  then format('to remove what the test made, insert a cleanup run: insert into '
                                              'recovery_runs (protection_group_id, kind, test_run_id) values '
                                              '(%L, ''cleanup'', %L)', old.protection_group_id, old.id)
                                  when old.kind = 'cleanup' and old.status = 'failed'
                                  then 'insert a cleanup run again for its test run'
                                  else 'it has ended; nothing is left to stop' end;
        end if;
    end if;
    return new;
end $$;

create trigger recovery_runs_cancel before update of cancel_requested on public.recovery_runs
    for each row execute function zerfaux.on_recovery_run_cancel();

-- The Realtime hint for a cancel, as for replication jobs (20261201158000_broadcast.sql).
create trigger recovery_runs_broadcast_cancel after update of cancel_requested on public.recovery_runs
    for each row when (new.cancel_requested and not old.cancel_requested)
    execute function zerfaux.cancel_broadcast();

revoke execute on function zerfaux.recovery_runs_allowed_insert(), zerfaux.recovery_runs_allowed_update(),
    zerfaux.recovery_runs_rules(), zerfaux.on_recovery_run_cancel() from public, anon, authenticated;
